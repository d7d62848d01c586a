"""The dashboard as a contributor sees it: /api/status tells what the metrics files say, and the page
renders in a real headless browser with no internet (every asset served by the peer)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.request

import aiohttp
import pytest

from helpers import LOOPBACK, join_address, outer_by_step, run_cli, start_cli, stop, wait_for
from swarm.config import ConfigError
from swarm.dashboard import start_dashboard
from swarm.metrics import read_events

CHROMIUM = "/usr/bin/chromium"
SEQ_LEN = 128  # peers/tiny.toml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(host: str, port: int) -> bool:
    """Nothing listens on host:port (the whole of 127.0.0.0/8 is this machine, so 127.0.0.2 is a second
    local address that a server bound to 127.0.0.1 alone does not answer on)."""
    with socket.socket() as s:
        s.settimeout(5)
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return True
    return False


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)


def consistent_snapshot(url: str, metrics_path) -> tuple[dict, list[dict]] | None:
    """/api/status and the metrics file at one moment: the file read between two answers that agree.

    A peer writes an event to its file before the dashboard can see it, so once the two
    answers agree with each other and with the file's last step, they describe the same step.
    """
    before = get_json(url)
    events = read_events(str(metrics_path))
    after = get_json(url)
    steps = [e["outer_step"] for e in events if e["event"] in ("outer", "bootstrap")]
    same = (before["outer_step"], before["loss_history"]) == (after["outer_step"], after["loss_history"])
    return (before, events) if same and steps and before["outer_step"] == max(steps) else None


def need_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no headless browser at {CHROMIUM} (apt-get install chromium): the page itself was not rendered")


def chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args],
                              capture_output=True, text=True, timeout=60)


def test_dashboard_shows_the_swarm(tmp_path):
    port = free_port()
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    a = start_cli("swarm.peer", "--config", "peers/tiny.toml", "--name", "alice", "--dashboard-port", str(port),
                  "--metrics-file", str(tmp_path / "a.jsonl"), *LOOPBACK, log_path=str(a_log))
    try:
        address = wait_for(lambda: join_address(a_log), 90, "alice's join command")
        b = start_cli("swarm.peer", "--initial-peers", address, "--name", "bob", "--metrics-file",
                      str(tmp_path / "b.jsonl"), *LOOPBACK, log_path=str(b_log))
        try:
            wait_for(lambda: min(len(read_events(str(tmp_path / f), "outer")) for f in ("a.jsonl", "b.jsonl")) >= 3,
                     90, "three outer steps on both peers")
            url = f"http://127.0.0.1:{port}/"
            status, events = wait_for(lambda: consistent_snapshot(url + "api/status", tmp_path / "a.jsonl"), 30,
                                      "a status that matches alice's metrics file")
            check_status(status, events, read_events(str(tmp_path / "b.jsonl"), "joined")[0]["peer"])
            assert refused("127.0.0.2", port), "without --dashboard-host the page is served on 127.0.0.1 only"
            check_page(url, tmp_path)
        finally:
            assert stop(b) == 0, b_log.read_text()[-3000:]
    finally:
        assert stop(a) == 0, a_log.read_text()[-3000:]
    assert "Traceback" not in a_log.read_text() + b_log.read_text()


def check_status(status: dict, events: list[dict], bob_id: str) -> None:
    alice_id = events[0]["peer"]
    outer = [e for e in events if e["event"] == "outer"]
    bootstraps = [e for e in events if e["event"] == "bootstrap"]
    assert (status["run_id"], status["profile"], status["inner_steps"]) == ("tiny", "tiny", 20)
    assert status["self"] == {"peer_id": alice_id, "name": "alice"}
    assert len(outer) >= 3
    assert status["loss_history"] == [{k: e[k] for k in ("outer_step", "loss", "group_loss", "t")} for e in outer]
    assert status["allreduce_history"] == [
        {k: e[k] for k in ("outer_step", "allreduce_s", "bytes_sent", "bytes_recv", "group_size", "t")} for e in outer]
    assert status["last_bootstrap"] == (bootstraps[-1] if bootstraps else None)
    peers = {p["peer_id"]: p for p in status["peers"]}
    assert set(peers) == {alice_id, bob_id}
    assert (peers[alice_id]["name"], peers[bob_id]["name"]) == ("alice", "bob")
    assert all(p["samples"] > 0 and p["compute_s"] > 0 and p["round"] >= 1 for p in peers.values())
    samples = [p["samples"] for p in status["peers"]]
    assert samples == sorted(samples, reverse=True), "peers come ranked, most samples first"
    assert status["tokens_seen"] == sum(samples) * SEQ_LEN


def check_page(url: str, tmp_path) -> None:
    need_chromium()
    shot = tmp_path / "dashboard.png"
    result = chromium("--window-size=1280,1100", f"--screenshot={shot}", url)
    assert shot.exists() and shot.stat().st_size > 20_000, result.stderr[-2000:]  # a blank page is ~6 kB
    dom = chromium("--dump-dom", url).stdout  # the DOM after the page's script ran
    loss_chart = dom[dom.index('id="loss-chart"'):dom.index('id="allreduce-time-chart"')]
    assert 'class="chart" id="loss-chart"' in dom and "<canvas" in loss_chart, "the loss chart is drawn, not empty"
    assert legend(dom, "loss-chart") == ["group mean", "this peer"]
    assert legend(dom, "allreduce-bytes-chart") == ["received", "sent"]
    leaderboard = re.search(r'<tbody id="leaderboard-rows">(.*?)</tbody>', dom, re.S).group(1)
    assert leaderboard.count("<tr") == 2, leaderboard
    ranks = re.findall(r'<tr[^>]*><td class="num">(\d+)</td><td class="name"[^>]*>([^<]+)', leaderboard)
    assert [rank for rank, _ in ranks] == ["1", "2"] and {name for _, name in ranks} == {"alice", "bob"}, ranks

    # the latest round's numbers, as of the moment the page rendered: the peers trained on meanwhile, so the
    # step they belong to is read from the page and its event from alice's metrics file
    latest = {key: text(dom, key) for key in ("loss-step", "loss-group", "loss-self", "time-step", "time-s",
                                              "group-size", "bytes-step", "bytes-sent", "bytes-recv", "bytes-total")}
    outer = outer_by_step(tmp_path / "a.jsonl")
    step = int(latest["loss-step"])
    assert step >= 3 and latest["time-step"] == latest["bytes-step"] == str(step), latest
    e = outer[step]
    assert e["group_loss"] is not None, e  # every member of a group reports its loss, alone or not
    assert abs(float(latest["loss-self"]) - e["loss"]) <= 0.0005 + 1e-9, (latest, e)  # shown to 3 decimals
    assert abs(float(latest["loss-group"]) - e["group_loss"]) <= 0.0005 + 1e-9, (latest, e)
    assert latest["group-size"] == str(e["group_size"]) and latest["time-s"].endswith(" s"), (latest, e)
    assert abs(float(latest["time-s"][:-2]) - e["allreduce_s"]) <= 0.005 + 1e-9, (latest, e)  # to 2 decimals
    for key, value in (("bytes-sent", e["bytes_sent"]), ("bytes-recv", e["bytes_recv"]),
                       ("bytes-total", e["bytes_sent"] + e["bytes_recv"])):
        assert abs(parse_bytes(latest[key]) - value) <= 0.005 * value, (key, latest[key], value)  # 3 digits


def text(dom: str, element_id: str) -> str:
    """The text of the element with this id in a DOM dump (an element holding text only)."""
    return re.search(f'id="{element_id}"[^>]*>([^<]*)<', dom).group(1)


def legend(dom: str, chart_id: str) -> list[str]:
    """The series a uPlot chart was drawn with, as its legend names them."""
    chart = dom[dom.index(f'id="{chart_id}"'):]
    chart = chart[:chart.index("</table>")]
    return re.findall(r'<div class="u-label">([^<]*)</div>', chart)


def parse_bytes(shown: str) -> float:
    number, unit = shown.split(" ")
    return float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


async def fetch_all(port: int, get_status) -> dict[str, tuple[int, str]]:
    runner = await start_dashboard(port, get_status, host="127.0.0.1")
    try:
        async with aiohttp.ClientSession() as session:
            out = {}
            for path in ("/", "/api/status", "/static/dashboard.js", "/static/uPlot.iife.min.js", "/static/NOTICE"):
                async with session.get(f"http://127.0.0.1:{port}{path}") as reply:
                    out[path] = (reply.status, await reply.text())
            return out
    finally:
        await runner.cleanup()


def test_page_needs_no_internet_and_survives_a_failing_status():
    async def failing_status() -> dict:
        raise TimeoutError("DHT read timed out")

    replies = asyncio.run(fetch_all(free_port(), failing_status))
    assert all(code == 200 for path, (code, _) in replies.items() if path != "/api/status"), replies.keys()
    page = replies["/"][1]
    assert not re.search(r'(src|href)="(https?:)?//', page), "every asset is served by the peer"
    assert 'src="static/uPlot.iife.min.js"' in page and "uPlot 1.6.32" in replies["/static/NOTICE"][1]
    code, body = replies["/api/status"]
    assert code == 503 and json.loads(body) == {"error": "TimeoutError: DHT read timed out"}


def test_serves_on_the_host_it_is_given_and_nowhere_else():
    async def check(port: int) -> None:
        runner = await start_dashboard(port, lambda: None, host="127.0.0.2")
        try:
            assert runner.addresses == [("127.0.0.2", port)]
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.2:{port}/") as reply:
                    assert reply.status == 200 and "<title>swarm dashboard</title>" in await reply.text()
                    # whatever a peer's record holds, the page runs and loads nothing but the peer's own files
                    assert reply.headers["Content-Security-Policy"].startswith("default-src 'self';")
            assert await asyncio.to_thread(refused, "127.0.0.1", port)
        finally:
            await runner.cleanup()
        with pytest.raises(ConfigError, match=f"^--dashboard-host 192.0.2.1: cannot listen there on port {port}: "):
            await start_dashboard(port, lambda: None, host="192.0.2.1")  # TEST-NET-1: no interface has it

    asyncio.run(check(free_port()))


HOSTILE = '<img src=x onerror="document.title=1">'  # a peer name is whatever that peer's record says


def fake_status(now: float) -> dict:
    """A status as swarm.DiLoCo.status gives it: six rounds, the first two logged before group_loss existed, and
    a peer whose name is markup."""
    losses = [4.615, 3.9, 3.41, 3.02, 2.81, 2.574]
    return {
        "run_id": "tiny", "profile": "tiny", "outer_step": 6, "inner_steps": 20, "tokens_seen": 1500 * 128,
        "self": {"peer_id": "12D3KooWA", "name": "alice"},
        "peers": [{"peer_id": "12D3KooWA", "name": "alice", "state": "training", "round": 7, "tokens_per_s": 5100,
                   "last_seen": now, "samples": 900, "compute_s": 60.0},
                  {"peer_id": "12D3KooWB", "name": HOSTILE, "state": "averaging", "round": 7, "tokens_per_s": 4000,
                   "last_seen": now, "samples": 600, "compute_s": 50.0}],
        "loss_history": [{"outer_step": k, "loss": round(loss + (0.03 if k % 2 else -0.03), 4),
                          "group_loss": None if k <= 2 else loss, "t": now} for k, loss in enumerate(losses, 1)],
        "allreduce_history": [{"outer_step": k, "allreduce_s": round(0.04 + 0.01 * k, 3),
                               "bytes_sent": 1_234_567 + 1000 * k, "bytes_recv": 1_230_000 - 500 * k,
                               "group_size": 2 if k <= 3 else 3, "t": now} for k in range(1, 7)],
        "last_bootstrap": None,
    }


def test_page_shows_the_latest_round_and_keeps_names_as_text():
    need_chromium()
    reply = {"status": fake_status(time.time())}

    async def get_status() -> dict:
        if reply["status"] is None:
            raise TimeoutError("DHT read timed out")
        return reply["status"]

    async def render(port: int) -> tuple[str, str]:
        runner = await start_dashboard(port, get_status, host="127.0.0.2")  # not 127.0.0.1: its URLs are relative
        try:
            url = f"http://127.0.0.2:{port}/"
            live = (await asyncio.to_thread(chromium, "--dump-dom", url)).stdout
            reply["status"] = None
            down = (await asyncio.to_thread(chromium, "--dump-dom", url)).stdout
            return live, down
        finally:
            await runner.cleanup()

    live, down = asyncio.run(render(free_port()))
    assert re.search(r"<title>swarm · tiny · step 6</title>", live), live[:500]  # the hostile name's onerror never ran
    assert {key: text(live, key) for key in ("loss-step", "loss-group", "loss-self")} == {
        "loss-step": "6", "loss-group": "2.574", "loss-self": "2.544"}
    assert {key: text(live, key) for key in ("time-step", "time-s", "group-size")} == {
        "time-step": "6", "time-s": "0.10 s", "group-size": "3"}
    assert {key: text(live, key) for key in ("bytes-step", "bytes-sent", "bytes-recv", "bytes-total")} == {
        "bytes-step": "6", "bytes-sent": "1.24 MB", "bytes-recv": "1.23 MB", "bytes-total": "2.47 MB"}
    assert legend(live, "loss-chart") == ["group mean", "this peer"]
    assert legend(live, "allreduce-bytes-chart") == ["received", "sent"]
    assert 'class="chart" id="loss-chart"' in live  # drawn: not marked empty
    names = re.findall(r'<td class="name"[^>]*>([^<]*)', live)
    assert names == ["alice", "&lt;img src=x onerror=\"document.title=1\"&gt;"] * 2, names  # swarm, leaderboard
    assert "<img" not in live

    # the peer stops answering: the page says so and keeps polling
    assert text(down, "conn") == "no answer from the peer (TimeoutError: DHT read timed out), retrying"
    assert text(down, "loss-group") == "–"


def test_taken_port_is_one_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"^--dashboard-port {port} is in use"):
            asyncio.run(start_dashboard(port, lambda: None, host="127.0.0.1"))
        result = run_cli("swarm.peer", "--config", "peers/tiny.toml", "--dashboard-port", str(port), *LOOPBACK,
                         timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: --dashboard-port {port} is in use: pick another port"
