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
import urllib.request

import aiohttp
import pytest

from helpers import LOOPBACK, join_address, run_cli, start_cli, stop, wait_for
from swarm.config import ConfigError
from swarm.dashboard import start_dashboard
from swarm.metrics import read_events

CHROMIUM = "/usr/bin/chromium"
SEQ_LEN = 128  # peers/tiny.toml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no headless browser at {CHROMIUM} (apt-get install chromium): the page itself was not rendered")
    shot = tmp_path / "dashboard.png"
    result = chromium("--window-size=1280,1100", f"--screenshot={shot}", url)
    assert shot.exists() and shot.stat().st_size > 20_000, result.stderr[-2000:]  # a blank page is ~6 kB
    dom = chromium("--dump-dom", url).stdout  # the DOM after the page's script ran
    loss_chart = dom[dom.index('id="loss-chart"'):dom.index('id="allreduce-time-chart"')]
    assert 'class="chart" id="loss-chart"' in dom and "<canvas" in loss_chart, "the loss chart is drawn, not empty"
    leaderboard = re.search(r'<tbody id="leaderboard-rows">(.*?)</tbody>', dom, re.S).group(1)
    assert leaderboard.count("<tr") == 2, leaderboard
    ranks = re.findall(r'<tr[^>]*><td class="num">(\d+)</td><td class="name"[^>]*>([^<]+)', leaderboard)
    assert [rank for rank, _ in ranks] == ["1", "2"] and {name for _, name in ranks} == {"alice", "bob"}, ranks


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
