// The swarm dashboard: polls api/status every 2 s and redraws in place, no reload.
// Peer names and states come from other peers' DHT records, so they are untrusted:
// every value reaches the page through textContent, never innerHTML.
"use strict";

const POLL_MS = 2000;
const CHART_HEIGHT = 220;
const $ = (id) => document.getElementById(id);

const fmtInt = (n) => Math.round(n).toLocaleString("en-US");

function fmtCount(n) {  // 1234567 -> "1.23M": big counters stay readable
  for (const [div, unit] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (Math.abs(n) >= div) return (n / div).toPrecision(3) + unit;
  }
  return fmtInt(n);
}

function fmtBytes(n) {  // decimal units, as swarm.metrics.human_bytes
  for (const [div, unit] of [[1e9, "GB"], [1e6, "MB"], [1e3, "kB"]]) {
    if (Math.abs(n) >= div) return +(n / div).toPrecision(3) + " " + unit;
  }
  return fmtInt(n) + " B";
}

function fmtAgo(unixS) {  // peers' clocks differ a little: never show "-1 s ago"
  if (!unixS) return "–";
  const s = Math.max(0, Date.now() / 1000 - unixS);
  return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function fillRows(tbody, rows) {  // rows: {cls, cells}, each cell a <td> Node or [text, class]
  tbody.replaceChildren(...rows.map(({ cells, cls }) => {
    const tr = el("tr", undefined, cls);
    for (const cell of cells) tr.append(cell instanceof Node ? cell : el("td", cell[0], cell[1]));
    return tr;
  }));
}

// --- charts (uPlot, vendored: static/NOTICE) -------------------------------------------------------

const stepAxis = { label: "outer step", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000], values: (u, v) => v.map(fmtInt) };
// half a step of margin each side: the first and last bars show whole, and a single point is not a degenerate range
const stepRange = (u, min, max) => (min == null ? [0, 1] : [min - 0.5, max + 0.5]);
// bars stand on zero: an axis that starts at the smallest value would make equal-looking bars of 1.00 and 1.01 MB
const fromZero = (u, min, max) => [0, max > 0 ? max * 1.1 : 1];
const bars = () => uPlot.paths.bars({ size: [0.6, 40] });

function makeChart(id, series, yValues, yRange) {
  const host = $(id);
  const opts = {
    width: host.clientWidth, height: CHART_HEIGHT,
    scales: { x: { time: false, range: stepRange }, ...(yRange ? { y: { range: yRange } } : {}) },
    series: [{ label: "outer step" }, ...series],
    axes: [stepAxis, { size: 72, values: (u, v) => v.map(yValues) }],
    legend: { show: series.length > 1, live: false },  // names only, where there are several series to tell apart
    cursor: { drag: { x: false, y: false } },
  };
  return { host, plot: new uPlot(opts, [[], ...series.map(() => [])], host) };
}

function setChart(chart, data) {
  chart.host.classList.toggle("empty", data[0].length === 0);
  chart.plot.setData(data);
}

const fmtLoss = (v) => (v == null ? "–" : v.toFixed(3));  // as the peer's log line

const charts = {
  // The group's mean is the run's loss (what every member's log line says); this peer's own is one term of it,
  // drawn as a thin line over the group's wide translucent one (they are often close: neither hides the other),
  // so a peer whose data or hardware makes it lag the group stands out. group_loss is null for rounds logged
  // before it existed: those steps are a gap in the group's line.
  loss: makeChart("loss-chart", [
    { label: "group mean", stroke: "rgba(37,99,235,0.6)", width: 5, points: { size: 8 } },
    { label: "this peer", stroke: "#ea580c", width: 1.5, points: { size: 4 } },
  ], (v) => v.toFixed(2)),
  time: makeChart("allreduce-time-chart", [
    { label: "all-reduce", stroke: "#0d9488", fill: "rgba(13,148,136,0.35)", paths: bars(), points: { show: false } },
  ], (v) => v.toFixed(2) + " s", fromZero),
  // In an all-reduce every member sends and receives about the same bytes, so two lines of sent and received
  // lie on top of each other and one hides the other. Instead each round is one stacked bar whose height is
  // this peer's whole traffic of the round (sent + received), split into what it sent (bottom) and what it
  // received (top, so the legend lists it first); the card header gives the latest three numbers. uPlot has
  // no stacking: the "received" series is drawn first at the full height (sent + received) and "sent" is
  // drawn over its lower part.
  bytes: makeChart("allreduce-bytes-chart", [
    { label: "received", stroke: "#f59e0b", fill: "#f59e0b", paths: bars(), points: { show: false } },
    { label: "sent", stroke: "#7c3aed", fill: "#7c3aed", paths: bars(), points: { show: false } },
  ], fmtBytes, fromZero),
};

window.addEventListener("resize", () => {
  for (const c of Object.values(charts)) c.plot.setSize({ width: c.host.clientWidth, height: CHART_HEIGHT });
});

// --- rendering -------------------------------------------------------------------------------------

function render(s) {
  document.title = `swarm · ${s.run_id} · step ${s.outer_step}`;
  $("run-id").textContent = s.run_id;
  $("profile").textContent = s.profile;
  $("outer-step").textContent = fmtInt(s.outer_step);
  $("inner-steps").textContent = fmtInt(s.inner_steps);
  $("tokens-seen").textContent = fmtCount(s.tokens_seen);
  $("peer-count").textContent = fmtInt(s.peers.length);
  $("self-name").textContent = s.self.name;

  const loss = s.loss_history, ar = s.allreduce_history;
  const group = (e) => e.group_loss ?? null;  // absent or null in rounds logged before it existed
  setChart(charts.loss, [loss.map((e) => e.outer_step), loss.map(group), loss.map((e) => e.loss)]);
  setChart(charts.time, [ar.map((e) => e.outer_step), ar.map((e) => e.allreduce_s)]);
  setChart(charts.bytes, [ar.map((e) => e.outer_step), ar.map((e) => e.bytes_sent + e.bytes_recv),
    ar.map((e) => e.bytes_sent)]);

  // the latest round's numbers, in the card headers: every chart's last point, readable without hovering
  const lastLoss = loss[loss.length - 1], lastAr = ar[ar.length - 1];
  $("loss-step").textContent = lastLoss ? fmtInt(lastLoss.outer_step) : "–";
  $("loss-group").textContent = fmtLoss(lastLoss ? group(lastLoss) : null);
  $("loss-self").textContent = fmtLoss(lastLoss ? lastLoss.loss : null);
  for (const id of ["time-step", "bytes-step"]) $(id).textContent = lastAr ? fmtInt(lastAr.outer_step) : "–";
  $("time-s").textContent = lastAr ? lastAr.allreduce_s.toFixed(2) + " s" : "–";
  $("group-size").textContent = lastAr ? fmtInt(lastAr.group_size) : "–";
  $("bytes-sent").textContent = lastAr ? fmtBytes(lastAr.bytes_sent) : "–";
  $("bytes-recv").textContent = lastAr ? fmtBytes(lastAr.bytes_recv) : "–";
  $("bytes-total").textContent = lastAr ? fmtBytes(lastAr.bytes_sent + lastAr.bytes_recv) : "–";

  const nameCell = (p) => {
    const td = el("td", p.name, "name");
    td.title = p.peer_id;
    if (p.peer_id === s.self.peer_id) td.append(el("span", "you", "you"));
    return td;
  };
  const rowClass = (p) => (p.peer_id === s.self.peer_id ? "self" : "");

  fillRows($("swarm-rows"), s.peers.map((p) => {
    const state = el("td");
    state.append(el("span", p.state || "?", "state " + (p.state || "")));
    return { cls: rowClass(p), cells: [nameCell(p), state, [fmtInt(p.round), "num"],
      [fmtInt(p.tokens_per_s), "num"], [fmtAgo(p.last_seen), "num"]] };
  }));

  // the server sends peers already ranked (swarm.status.leaderboard): keep its order
  const total = s.peers.reduce((sum, p) => sum + p.samples, 0) || 1;
  fillRows($("leaderboard-rows"), s.peers.map((p, i) => {
    const pct = (100 * p.samples) / total;
    const share = el("td"), wrap = el("div", undefined, "share"), bar = el("div", undefined, "bar"), fill = el("span");
    fill.style.width = pct.toFixed(1) + "%";
    bar.append(fill);
    wrap.append(bar, el("span", pct.toFixed(0) + "%"));
    share.append(wrap);
    return { cls: rowClass(p), cells: [[String(i + 1), "num"], nameCell(p), [fmtInt(p.samples), "num"],
      [fmtInt(p.compute_s) + " s", "num"], share] };
  }));

  const b = s.last_bootstrap;
  const names = Object.fromEntries(s.peers.map((p) => [p.peer_id, p.name]));
  $("bootstrap").textContent = b
    ? `outer step ${b.outer_step}: ${fmtBytes(b.bytes)} from ${b.sources} source${b.sources === 1 ? "" : "s"}` +
      ` (${(b.holders || []).map((h) => names[h] || h.slice(-6)).join(", ") || "?"}) in ${b.seconds.toFixed(2)} s,` +
      ` ${b.verified ? "verified" : "NOT verified"} · ${fmtAgo(b.t)}`
    : "none: this peer has not downloaded the model from the swarm";
}

async function poll() {
  const conn = $("conn");
  try {
    const reply = await fetch("api/status", { cache: "no-store" });
    const body = await reply.json();
    if (!reply.ok) throw new Error(body.error || reply.statusText);
    render(body);
    conn.className = "conn ok";
    conn.textContent = "live · updated " + new Date().toLocaleTimeString();
  } catch (e) {
    conn.className = "conn down";
    conn.textContent = "no answer from the peer (" + e.message + "), retrying";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
