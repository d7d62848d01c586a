"""Late-joiner bootstrap over an emulated WAN: the swarm's multi-source download against hivemind's.

    sudo python -m bench.bootstrap [--holders 1,2,4] [--size-mb 200] [--bandwidth 100mbit] [--repeats 3]
                                   [--systems swarm,hivemind] [--json bench/results/bootstrap.json]
                                   [--plot bench/results/bootstrap.png]

One network namespace per peer (bench/netns.py): max(--holders) holders and one joiner. Every holder's
upload is shaped to B by tbf; the joiner's download is not shaped at all, so only the holders' uplinks
bound a transfer. Every holder holds the same DiLoCo state of --size-mb MB (outer_step, theta_global
and momentum, fp32, size_mb/8 million values each; bench/bootstrap_worker.py) and publishes it with
``node.hold(*pack_state(run_id, state))``. For each N in --holders the joiner runs
``swarm.manifest.download`` from the first N holders, timed from the call to the verified state.
In the same topology and run, holder 0 also serves the same tensors from a stock hivemind
``DecentralizedAverager`` and the joiner times ``load_state_from_peers`` (it streams from one peer,
so its row has one holder whatever --holders says, and it verifies nothing).

The bound for S bytes from N holders is S / (N·B), with B each holder's measured bulk TCP goodput
to the joiner (TCP payload, so headers do not count against a system; the set rate is printed
beside it); efficiency = bound / seconds. ``verified`` says whether the system checked what it
delivered against hashes; ``matches_expected`` is our own comparison afterwards of the state's sha256
with the holders'. The default run takes about 3 minutes here (2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading

from bench.allreduce import BenchError, Workers, _list, _unit
from bench.common import finish_figure, make_parents, netns_preflight, write_results
from bench.netns import NetnsError, Topology, _run, peer_addr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 180.0  # importing torch and hivemind in 5 processes on 2 cores is slow


class JoinerTopology(Topology):
    """bench.netns.Topology whose peers in ``unshaped_download`` have no tbf on their download (the
    router's egress towards them); their upload and everyone else's links stay shaped."""

    def __init__(self, peers: int, rate_mbit: float, unshaped_download: tuple[int, ...] = (), **kwargs):
        super().__init__(peers, rate_mbit, **kwargs)
        self.unshaped_download = tuple(unshaped_download)

    def _build(self) -> None:
        super()._build()
        for i in self.unshaped_download:
            _run("tc", "-n", self.router, "qdisc", "del", "dev", f"v{i}", "root")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bootstrap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--holders", type=_list(int), default=[1, 2, 4], help="holder counts, e.g. 1,2,4")
    parser.add_argument("--size-mb", type=float, default=200.0, help="state size in MB (10^6 bytes)")
    parser.add_argument("--bandwidth", type=_unit("mbit", "--bandwidth"), default=100.0,
                        help="every holder's upload rate (tbf), e.g. 100mbit")
    parser.add_argument("--systems", type=_list(str), default=["swarm", "hivemind"])
    parser.add_argument("--repeats", type=int, default=3, help="timed downloads per system and holder count")
    parser.add_argument("--probe-s", type=float, default=2.0, help="seconds of each link's bandwidth probe")
    parser.add_argument("--trace-ms", type=float, default=20.0,
                        help="the joiner samples eth0's counters this often during a download (0: off), for the "
                             "profile lines; every reply, traces included, goes to the log dir")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="bound on any one download step")
    parser.add_argument("--json", default="bench/results/bootstrap.json", help="where to write the rows")
    parser.add_argument("--plot", default="bench/results/bootstrap.png", help="where to draw them")
    parser.add_argument("--log-dir", default="bench/results/bootstrap-logs", help="worker logs, one per peer")
    args = parser.parse_args(argv)
    bad = [s for s in args.systems if s not in ("swarm", "hivemind")]
    if bad or min(args.holders, default=0) < 1 or args.repeats < 1 or args.size_mb <= 0 or args.bandwidth <= 0:
        parser.error(f"bad values: {', '.join(bad) or 'holders >= 1, repeats >= 1, size and bandwidth > 0'}")
    return args


# --- probes -----------------------------------------------------------------------------------------

def probe_links(topo: Topology, holders: int, joiner: int, max_s: float) -> tuple[list[float], float]:
    """Goodput of each holder -> joiner link alone, then of all of them at once (Mbit/s of TCP payload)."""
    alone = [topo.probe_bandwidth_mbit(h, joiner, max_s=max_s) for h in range(holders)]
    together: list[float] = [0.0] * holders
    errors: list[str] = []

    def probe(h: int) -> None:
        try:
            together[h] = topo.probe_bandwidth_mbit(h, joiner, max_s=max_s)
        except NetnsError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=probe, args=(h,), daemon=True) for h in range(holders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_s + 30)
    if errors:
        raise NetnsError(errors[0])
    return alone, sum(together)


# --- one run ----------------------------------------------------------------------------------------

def run(topo: Topology, args, numel: int, holders: int, bandwidth_mbit: float, rows: list[dict]) -> None:
    """Start ``holders`` holders and a joiner, time every requested download, stop them; a row each in ``rows``."""
    joiner = holders
    workers = Workers(topo, args.log_dir, "bootstrap")
    use_hivemind = "hivemind" in args.systems

    def argv(rank: int) -> list[str]:
        return [sys.executable, "-m", "bench.bootstrap_worker", "--role", "joiner" if rank == joiner else "holder",
                "--rank", str(rank), "--addr", peer_addr(rank), "--numel", str(numel),
                "--timeout-s", str(args.timeout_s), "--trace-ms", str(args.trace_ms),
                *(["--hivemind"] if use_hivemind and rank in (0, joiner) else [])]

    try:
        for rank in range(holders + 1):  # imports run in parallel
            workers.start(rank, argv(rank))
        workers.ask(None, START_TIMEOUT_S)
        # one at a time, each dialing every earlier peer: p2pd hands out no 198.18/15 addresses
        # (see bench/allreduce_worker.py), so the joiner knows every holder directly
        known, started = [], []
        for rank in range(holders + 1):
            (reply,) = workers.ask({"cmd": "start", "initial_peers": known}, START_TIMEOUT_S, ranks=[rank])
            known.append(next(m for m in reply["maddrs"] if f"/{peer_addr(rank)}/" in m))
            started.append(reply)
        held, expected = {r["manifest"] for r in started[:holders]}, started[0]["state_sha256"]
        if len(held) != 1 or {r["state_sha256"] for r in started[:holders]} != {expected}:
            raise BenchError("holders built different states")
        (seen,) = workers.ask({"cmd": "records", "holders": holders}, START_TIMEOUT_S, ranks=[joiner])
        print(f"holders up: {holders} holders announce the state, {started[0]['chunks']} chunks of "
              f"{started[0]['size'] // started[0]['chunks'] / 2**20:.2f} MiB, pack_state {started[0]['pack_s']:.2f} s")
        if seen["manifest"] not in held or len(seen["holders"]) != holders:
            raise BenchError(f"the joiner sees {seen['records']} holders announce the state, not {holders}")
        print(HEADER)
        peer_ids = [r["peer_id"] for r in started[:holders]]
        hints = {r["peer_id"]: [known[i]] for i, r in enumerate(started[:holders])}
        size = started[0]["size"]
        for system in args.systems:
            for n in (args.holders if system == "swarm" else [1]):
                replies = []
                for _ in range(args.repeats):
                    if system == "swarm":
                        command = {"cmd": "swarm", "holders": peer_ids[:n], "manifest": seen["manifest"],
                                   "hints": hints}
                    else:
                        command = {"cmd": "hivemind", "holders": 1}
                    (reply,) = workers.ask(command, args.timeout_s + 60, ranks=[joiner])
                    replies.append(reply)
                row = summarize(system, n, size, args, bandwidth_mbit, replies, expected)
                rows.append(row)
                print(format_row(row), flush=True)
                with open(os.path.join(args.log_dir, f"{system}-h{n}-replies.json"), "w") as f:
                    json.dump(replies, f)
    finally:
        workers.close()


# --- results ----------------------------------------------------------------------------------------

def summarize(system: str, holders: int, size: int, args, bandwidth_mbit: float, replies: list[dict],
              expected: str) -> dict:
    """One row from a system's repeats: the median of the downloads that succeeded; failures are counted
    and named, and make ``verified`` and ``matches_expected`` false."""
    ok = [r for r in replies if r["ok"]]
    seconds = statistics.median(r["seconds"] for r in ok) if ok else None
    bound_s = size * 8 / (holders * bandwidth_mbit * 1e6)
    middle = sorted(ok or replies, key=lambda r: r["seconds"])[(len(ok or replies) - 1) // 2]
    return dict(
        holders=holders, size_mb=args.size_mb, system=system,
        seconds=round(seconds, 3) if ok else None, bound_s=round(bound_s, 3),
        efficiency=round(bound_s / seconds, 3) if ok else None,
        verified=len(ok) == len(replies) and all(r["verified"] for r in ok),
        matches_expected=len(ok) == len(replies) and all(r["state_sha256"] == expected for r in ok),
        failed=len(replies) - len(ok), problems=sorted({r["problem"] for r in replies if r["problem"]}),
        sources=min((r["sources"] for r in ok), default=0), bytes=size, rx_bytes=middle["rx_bytes"],
        cpu_s=middle["cpu_s"], retransmits=sum(r["retransmits"] for r in replies),
        bandwidth_mbit=round(bandwidth_mbit, 2), bandwidth_set_mbit=args.bandwidth,
        seconds_all=[round(r["seconds"], 3) if r["ok"] else None for r in replies],
        **wire_profile(middle),
    )


def wire_profile(reply: dict) -> dict:
    """Where a download's time went, from the joiner's eth0 receive counter: seconds to the first bytes of
    payload, the rate on the wire between first and last bytes, and seconds from the last bytes to the result
    (verification and unpacking that did not overlap the transfer)."""
    trace = [(t - reply["t0_unix"], rx) for t, _tx, rx in reply["trace"]]
    if len(trace) < 3 or trace[-1][1] - trace[0][1] < 1 << 20:
        return {}
    rx0, total = trace[0][1], trace[-1][1] - trace[0][1]
    slack = min(64 << 10, total // 100)  # DHT chatter and headers around the transfer
    first = next(t for t, rx in trace if rx - rx0 > slack)
    last = next(t for t, rx in trace if rx - rx0 >= total - slack)
    return {"first_byte_s": round(max(0.0, first), 3), "after_last_byte_s": round(reply["seconds"] - last, 3),
            "wire_mbit": round((total - 2 * slack) * 8 / (last - first) / 1e6, 1) if last > first else None}


HEADER = (f"{'holders':>7} {'size MB':>7} {'system':<9} {'seconds':>8} {'bound s':>8} {'efficiency':>10} "
          f"{'verified':>8} {'matches':>7} {'sources':>7} {'MB recv':>8} {'joiner CPU s py/p2pd':>20}  runs (s)")


def format_row(row: dict) -> str:
    cpu = row["cpu_s"]
    cpu_text = f"{cpu.get('python', 0.0):.2f}/{cpu.get('p2pd', 0.0):.2f}"
    runs = " ".join("failed" if s is None else f"{s:.2f}" for s in row["seconds_all"])
    seconds = "-" if row["seconds"] is None else f"{row['seconds']:.2f}"
    efficiency = "-" if row["efficiency"] is None else f"{row['efficiency']:.3f}"
    line = (f"{row['holders']:>7} {row['size_mb']:>7g} {row['system']:<9} {seconds:>8} {row['bound_s']:>8.2f} "
            f"{efficiency:>10} {str(row['verified']).lower():>8} {str(row['matches_expected']).lower():>7} "
            f"{row['sources']:>7} {row['rx_bytes'] / 1e6:>8.1f} {cpu_text:>20}  {runs}")
    return line + "".join(f"\n{'':>9}{row['system']} failed: {p}" for p in row["problems"])


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["holders"] for r in rows})
    systems = sorted({r["system"] for r in rows}, key=lambda s: s != "swarm")
    width = 0.8 / len(systems)
    fig, (ax_t, ax_e) = plt.subplots(2, 1, figsize=(max(7, 1.8 * len(counts)), 7), sharex=True)
    for k, system in enumerate(systems):
        mine = {r["holders"]: r for r in rows if r["system"] == system and r["seconds"] is not None}
        xs = [x + (k - (len(systems) - 1) / 2) * width for x, n in enumerate(counts) if n in mine]
        picked = [mine[n] for n in counts if n in mine]
        label = "swarm (verified)" if system == "swarm" else f"{system} (one peer, unverified)"
        bars = ax_t.bar(xs, [r["seconds"] for r in picked], width, label=label)
        ax_t.scatter(xs, [r["bound_s"] for r in picked], marker="_", s=400, color="black", zorder=3,
                     label="bound S/(N·B)" if k == 0 else None)
        ax_e.bar(xs, [r["efficiency"] for r in picked], width, color=bars.patches[0].get_facecolor())
    ax_e.set_xticks(range(len(counts)), [f"{n} holder{'s' if n > 1 else ''}" for n in counts])
    ax_t.set_ylabel("time to the state, s (median)")
    ax_e.set_ylabel("efficiency = bound / time")
    ax_e.axhline(1.0, color="gray", lw=0.8)
    ax_e.axhline(0.85, color="gray", lw=0.8, ls="--", label="target 0.85")
    ax_e.legend(fontsize=8, loc="lower left")
    ax_t.set_title(f"late joiner, {rows[0]['size_mb']:g} MB state; each holder's uplink "
                   f"{rows[0]['bandwidth_set_mbit']:g} Mbit/s\n(TCP goodput {rows[0]['bandwidth_mbit']:.1f}), "
                   "the joiner's downlink unshaped", fontsize=10)
    finish_figure(fig, path, (ax_t,))


# --- main -------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if (code := netns_preflight("bench.bootstrap")) is not None:
        return code
    numel = int(args.size_mb * 1e6) // 8  # theta and momentum, fp32 each
    make_parents(args.json, args.plot)
    os.makedirs(args.log_dir, exist_ok=True)
    holders = max(args.holders)
    rows: list[dict] = []
    try:
        with JoinerTopology(holders + 1, args.bandwidth, unshaped_download=(holders,)) as topo:
            alone, together = probe_links(topo, holders, holders, args.probe_s)
            bandwidth_mbit = statistics.median(alone)
            print(f"holder -> joiner bulk TCP goodput, Mbit/s (set {args.bandwidth:g}): "
                  + ", ".join(f"{h}: {mbit:.1f}" for h, mbit in enumerate(alone))
                  + f"; all {holders} at once: {together:.1f} (ideal {holders * bandwidth_mbit:.1f})")
            run(topo, args, numel, holders, bandwidth_mbit, rows)
    except (BenchError, NetnsError) as e:
        print(f"bench.bootstrap: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.bootstrap: interrupted; every namespace removed", file=sys.stderr)
        return 130
    finally:
        write_results(rows, args.json, args.plot, plot)
    print("\nAll rows (efficiency = S/(N·B) / seconds; B = measured goodput of one holder's uplink):")
    print(HEADER)
    for row in rows:
        print(format_row(row))
    if any("wire_mbit" in row for row in rows):
        print("\nProfile of each row's median download, from the joiner's eth0 counter (every link's goodput "
              f"{rows[0]['bandwidth_mbit']:.1f} Mbit/s):")
        for row in rows:
            if "wire_mbit" in row:
                print(f"  {row['system']:<9} {row['holders']} holder(s): first bytes after {row['first_byte_s']:.2f} s, "
                      f"{row['wire_mbit']} Mbit/s on eth0, headers included (set rate {row['holders'] * row['bandwidth_set_mbit']:g}), "
                      f"result {row['after_last_byte_s']:.2f} s after the last bytes")
    best = [r for r in rows if r["system"] == "swarm" and r["holders"] == max(args.holders)]
    if best:
        met = best[0]["verified"] and best[0]["efficiency"] >= 0.85
        print(f"target (swarm, {best[0]['holders']} holders, efficiency >= 0.85, verified): "
              f"{'met' if met else 'MISSED'} at {best[0]['efficiency']}")
    print(f"wrote {args.json} and {args.plot}; worker logs in {args.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
