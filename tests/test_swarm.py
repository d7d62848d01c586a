"""Real swarms of ``python -m swarm.peer`` processes on 127.0.0.1, checked through their metrics files."""

from __future__ import annotations

import os

from conftest import LOOPBACK, ROOT, join_address, run_cli, start_cli, stop, wait_for
from swarm.metrics import read_events


def outer_by_step(path) -> dict[int, dict]:
    return {e["outer_step"]: e for e in read_events(str(path), "outer")}


def shared_steps(tmp_path) -> list[int]:
    alice, bob = outer_by_step(tmp_path / "a.jsonl"), outer_by_step(tmp_path / "b.jsonl")
    return sorted(set(alice) & set(bob))


def test_three_peer_swarm_agrees_on_every_step(tmp_path):
    result = run_cli("swarm.launch", "--peers", "3", "--outer-steps", "3", "--workdir", str(tmp_path), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "identical on every peer at every step" in result.stdout
    peers = [outer_by_step(tmp_path / f"peer{i}.jsonl") for i in range(3)]
    ids = {read_events(str(tmp_path / f"peer{i}.jsonl"), "joined")[0]["peer"] for i in range(3)}
    assert len(ids) == 3
    # once all three have joined, every step is averaged by all three, into one model
    first_full = min(step for step in peers[0] if all(step in p for p in peers))
    for step in range(first_full, 4):
        events = [p[step] for p in peers]
        assert all(e["group_size"] == 3 and set(e["group"]) == ids for e in events), events
        assert len({e["model_sha256"] for e in events}) == 1
        assert len({e["average_sha256"] for e in events}) == 1
        assert all(e["bytes_sent"] > 0 and e["allreduce_s"] >= 0 for e in events)
    losses = [sum(p[s]["loss"] for p in peers if s in p) / sum(s in p for p in peers) for s in (1, 3)]
    assert losses[1] < losses[0]
    for i in range(3):
        left = read_events(str(tmp_path / f"peer{i}.jsonl"), "left")
        assert left and left[0]["outer_step"] == 3


def test_second_terminal_joins_with_only_the_printed_address(tmp_path):
    """Two terminals: the first starts the run, the second joins with nothing but --initial-peers."""
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    a = start_cli("swarm.peer", "--config", "peers/tiny.toml", "--name", "alice", "--metrics-file",
                  str(tmp_path / "a.jsonl"), "--max-outer-steps", "200", *LOOPBACK, log_path=str(a_log))
    try:
        address = wait_for(lambda: join_address(a_log), 90, "alice's join command")
        assert f"python -m swarm.peer --initial-peers {address}" in a_log.read_text()

        # a joiner whose profile disagrees with the run is refused with one line
        bad = tmp_path / "bad.toml"
        bad.write_text(open(os.path.join(ROOT, "peers", "tiny.toml")).read().replace("inner_steps = 20", "inner_steps = 7"))
        refused = run_cli("swarm.peer", "--initial-peers", address, "--config", str(bad), *LOOPBACK, timeout=120)
        assert refused.returncode == 2 and "train.inner_steps: local 7, run 20" in refused.stderr, refused.stderr

        b = start_cli("swarm.peer", "--initial-peers", address, "--name", "bob", "--metrics-file",
                      str(tmp_path / "b.jsonl"), *LOOPBACK, log_path=str(b_log))
        try:
            wait_for(lambda: len(shared_steps(tmp_path)) >= 4, 180, "four outer steps averaged by both")
        finally:
            assert stop(b) == 0, b_log.read_text()[-3000:]
    finally:
        assert stop(a) == 0, a_log.read_text()[-3000:]
    joined = read_events(str(tmp_path / "b.jsonl"), "joined")[0]
    assert joined["run_id"] == "tiny"
    if joined["source"] == "peers":  # alice was ahead: bob downloaded and verified her model first
        boot = read_events(str(tmp_path / "b.jsonl"), "bootstrap")[0]
        assert boot["verified"] and boot["bytes"] > 0
    alice, bob = outer_by_step(tmp_path / "a.jsonl"), outer_by_step(tmp_path / "b.jsonl")
    shared = shared_steps(tmp_path)
    assert min(shared) == min(bob), "bob averages with alice from his first outer step on"
    for step in shared:
        assert alice[step]["group"] == bob[step]["group"] and alice[step]["group_size"] == 2
        assert alice[step]["model_sha256"] == bob[step]["model_sha256"]
    assert "Traceback" not in a_log.read_text() + b_log.read_text()
