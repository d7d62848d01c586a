"""``python -m swarm.status`` as users run it: a running swarm's run and leaderboard, without joining it."""

from __future__ import annotations

import json

import pytest

from helpers import LOOPBACK, join_address, run_cli, start_cli, stop, wait_for
from swarm.metrics import read_events
from swarm.status import leaderboard

UNUSED_PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWRmh5jauYrrVxUahHrvVbNN54TZW4ppaNabhpPSCYwsQL"


@pytest.mark.slow  # ~35 s; make test-all
def test_status_lists_a_running_swarm(tmp_path):
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    a = start_cli("swarm.peer", "--config", "peers/tiny.toml", "--name", "alice", "--metrics-file",
                  str(tmp_path / "a.jsonl"), *LOOPBACK, log_path=str(a_log))
    try:
        address = wait_for(lambda: join_address(a_log), 90, "alice's join command")
        b = start_cli("swarm.peer", "--initial-peers", address, "--name", "bob", "--metrics-file",
                      str(tmp_path / "b.jsonl"), *LOOPBACK, log_path=str(b_log))
        try:
            wait_for(lambda: read_events(str(tmp_path / "b.jsonl"), "outer"), 90, "bob's first outer step")
            text = run_cli("swarm.status", "--initial-peers", address, *LOOPBACK)
            as_json = run_cli("swarm.status", "--initial-peers", address, "--json", *LOOPBACK)
        finally:
            assert stop(b) == 0, b_log.read_text()[-3000:]
    finally:
        assert stop(a) == 0, a_log.read_text()[-3000:]

    assert text.returncode == 0, text.stderr[-2000:]
    head, header, *rows = text.stdout.strip().splitlines()
    assert head.startswith("run tiny · profile tiny · H=20 · outer step ") and head.endswith("· 2 live peers")
    assert header.split() == ["#", "name", "peer", "state", "round", "samples", "compute", "tok/s", "last", "seen"]
    assert len(rows) == 2 and {row.split()[1] for row in rows} == {"alice", "bob"}

    assert as_json.returncode == 0, as_json.stderr[-2000:]
    status = json.loads(as_json.stdout)
    ids = {read_events(str(tmp_path / f"{name[0]}.jsonl"), "joined")[0]["peer"]: name for name in ("alice", "bob")}
    assert (status["run_id"], status["profile"], status["inner_steps"]) == ("tiny", "tiny", 20)
    assert {p["peer_id"]: p["name"] for p in status["peers"]} == ids
    assert all(p["samples"] > 0 and p["round"] >= 2 for p in status["peers"]), "both completed an outer step"
    assert [p["samples"] for p in status["peers"]] == sorted((p["samples"] for p in status["peers"]), reverse=True)
    assert status["tokens_seen"] == sum(p["samples"] for p in status["peers"]) * 128
    assert status["outer_step"] == max(p["round"] for p in status["peers"]) - 1


def test_status_of_an_unreachable_swarm_exits_3_with_one_line():
    result = run_cli("swarm.status", "--initial-peers", UNUSED_PEER, *LOOPBACK)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "" and result.stderr.strip().splitlines() == [
        f"error: cannot reach any initial peer ({UNUSED_PEER})"]


def test_status_refuses_an_address_without_peer_id():
    result = run_cli("swarm.status", "--initial-peers", "/ip4/127.0.0.1/tcp/9")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "lacks the peer id" in result.stderr


def test_leaderboard_ranks_and_cleans_untrusted_records():
    live = {
        "12D3KooWaaaaaa": {"name": "alice", "state": "training", "round": 4, "samples": 480, "compute_s": 9.5,
                           "tokens_per_s": 12000, "t": 1700000000.5},
        "12D3KooWbbbbbb": {"name": "bob", "state": "averaging", "round": 4, "samples": 960, "compute_s": 20.0},
        # a peer of another version, or a hostile one: wrong types, NaN, a huge name, no name at all
        "12D3KooWcccccc": {"name": "x" * 500, "state": 7, "round": 4, "samples": "lots", "compute_s": float("nan"),
                           "tokens_per_s": True},
        "12D3KooWdddddd": {"round": 2, "samples": 480, "compute_s": 30.0},
    }
    rows = leaderboard(live)
    assert [r["peer_id"][-6:] for r in rows] == ["bbbbbb", "dddddd", "aaaaaa", "cccccc"]  # samples, then compute
    assert rows[0] == {"peer_id": "12D3KooWbbbbbb", "name": "bob", "state": "averaging", "round": 4, "samples": 960,
                       "compute_s": 20.0, "tokens_per_s": 0, "last_seen": None}
    assert rows[1]["name"] == "dddddd", "a peer without a name shows the end of its id"
    assert rows[2]["last_seen"] == 1700000000.5 and rows[2]["tokens_per_s"] == 12000
    assert rows[3] == {"peer_id": "12D3KooWcccccc", "name": "x" * 40, "state": "", "round": 4, "samples": 0,
                       "compute_s": 0, "tokens_per_s": 0, "last_seen": None}
    json.dumps(rows, allow_nan=False)  # what the page parses: no NaN may get through


@pytest.mark.slow  # ~30 s; make test-all
def test_a_run_whose_peers_all_left_does_not_block_plain_joins(tmp_path):
    """A peer starts a second run ('ghost') in the same DHT and leaves. Its config stays in the DHT for a week,
    but with no live peer it is not a run to choose from: status and plain joins find the live one."""
    boot = start_cli("swarm.bootstrap", *LOOPBACK, log_path=str(tmp_path / "boot.log"))
    try:
        address = wait_for(lambda: join_address(tmp_path / "boot.log"), 60, "the bootstrap address")
        ghost = run_cli("swarm.peer", "--initial-peers", address, "--config", "tiny", "--run-id", "ghost",
                        "--max-outer-steps", "1", *LOOPBACK, timeout=120)
        assert ghost.returncode == 0, ghost.stderr[-2000:]
        live = start_cli("swarm.peer", "--initial-peers", address, "--config", "tiny", "--metrics-file",
                         str(tmp_path / "live.jsonl"), *LOOPBACK, log_path=str(tmp_path / "live.log"))
        try:
            wait_for(lambda: read_events(str(tmp_path / "live.jsonl"), "outer"), 90, "the live run's first step")
            status = run_cli("swarm.status", "--initial-peers", address, "--json", *LOOPBACK)
        finally:
            assert stop(live) == 0
    finally:
        assert stop(boot) == 0
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout)["run_id"] == "tiny"
