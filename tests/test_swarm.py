"""Real swarms of ``python -m swarm.peer`` processes on 127.0.0.1, checked through their metrics files."""

from __future__ import annotations

import os

import pytest

from helpers import LOOPBACK, ROOT, join_address, outer_by_step, run_cli, start_cli, stop, wait_for
from swarm.metrics import read_events


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


def start_swarm(tmp_path, n: int, extra: dict[int, list[str]] | None = None):
    """A bootstrap node and n peers (peer0 starts the run); returns (bootstrap address, processes)."""
    boot = start_cli("swarm.bootstrap", *LOOPBACK, log_path=str(tmp_path / "boot.log"))
    address = wait_for(lambda: join_address(tmp_path / "boot.log"), 60, "the bootstrap address")
    procs = [boot] + [start_peer(tmp_path, i, address, (["--config", "peers/tiny.toml"] if i == 0 else []) +
                                 (extra or {}).get(i, [])) for i in range(n)]
    return address, procs


def start_peer(tmp_path, i: int, address: str, args: list[str]):
    return start_cli("swarm.peer", "--initial-peers", address, "--name", f"peer{i}", "--metrics-file",
                     str(tmp_path / f"peer{i}.jsonl"), *LOOPBACK, *args, log_path=str(tmp_path / f"peer{i}.log"))


def stop_all(procs, tmp_path) -> None:
    codes = [stop(p) for p in reversed(procs)]
    logs = "".join(p.read_text() for p in tmp_path.glob("peer*.log"))
    assert codes == [0] * len(codes), logs[-4000:]
    assert "Traceback" not in logs


def test_late_joiner_bootstraps_from_several_holders_and_joins_the_next_group(tmp_path):
    address, procs = start_swarm(tmp_path, 3)
    try:
        wait_for(lambda: all(len(outer_by_step(tmp_path / f"peer{i}.jsonl")) >= 3 for i in range(3)), 120,
                 "three outer steps on the first three peers")
        procs.append(start_peer(tmp_path, 3, address, []))
        wait_for(lambda: len(outer_by_step(tmp_path / "peer3.jsonl")) >= 2, 120, "two outer steps of the joiner")
    finally:
        stop_all(procs, tmp_path)
    joined = read_events(str(tmp_path / "peer3.jsonl"), "joined")[0]
    boots = read_events(str(tmp_path / "peer3.jsonl"), "bootstrap")
    boot = boots[0]
    assert joined["source"] == "peers" and joined["outer_step"] == boot["outer_step"] >= 3
    # chunks came from more than one holder (a third may still be storing the state when the joiner asks)
    assert boot["verified"] is True and boot["sources"] >= 2 and boot["bytes"] > 0 and boot["banned"] == []
    holders = [outer_by_step(tmp_path / f"peer{i}.jsonl") for i in range(3)]
    assert all(boot["model_sha256"] == h[boot["outer_step"]]["model_sha256"] for h in holders)
    late = outer_by_step(tmp_path / "peer3.jsonl")
    # a member of the group right after the state it adopted; one that arrived while the swarm averaged a round
    # (its last inner step came too late for that round's group) fetched that round's result once more first
    assert len(boots) <= 2 and min(late) == boots[-1]["outer_step"] + 1
    for step in sorted(late):
        assert late[step]["group_size"] == 4, late[step]
        assert all(late[step]["model_sha256"] == h[step]["model_sha256"] for h in holders if step in h)


@pytest.mark.slow  # ~80 s; make test-all
def test_restart_resumes_from_own_checkpoint_or_fetches_what_it_lacks(tmp_path):
    ck, ident = tmp_path / "ck", tmp_path / "id.key"
    alone = ["--config", "peers/tiny.toml", "--checkpoint-dir", str(ck), "--identity", str(ident)]
    first = run_cli("swarm.peer", *alone, "--max-outer-steps", "2", "--metrics-file", str(tmp_path / "solo.jsonl"),
                    *LOOPBACK, timeout=120)
    assert first.returncode == 0, first.stderr
    again = run_cli("swarm.peer", *alone, "--max-outer-steps", "3", "--metrics-file", str(tmp_path / "solo.jsonl"),
                    *LOOPBACK, timeout=120)
    assert again.returncode == 0, again.stderr
    joins = read_events(str(tmp_path / "solo.jsonl"), "joined")
    assert [(j["source"], j["outer_step"]) for j in joins] == [("new", 0), ("checkpoint", 2)]
    assert len({j["peer"] for j in joins}) == 1  # --identity kept the peer id
    saved = read_events(str(tmp_path / "solo.jsonl"), "checkpoint")
    assert [s["outer_step"] for s in saved] == [1, 2, 2, 3] or [s["outer_step"] for s in saved][-1] == 3
    assert all(s["bytes"] > 0 and os.path.basename(s["path"]).startswith("step-") for s in saved)
    solo = outer_by_step(tmp_path / "solo.jsonl")
    assert sorted(solo) == [1, 2, 3]

    # now the same peer rejoins a swarm that moved past its checkpoint: it fetches the newer state
    address, procs = start_swarm(tmp_path, 1, extra={0: ["--run-id", "tiny"]})
    try:
        wait_for(lambda: len(outer_by_step(tmp_path / "peer0.jsonl")) >= 5, 120, "five outer steps of peer0")
        procs.append(start_cli("swarm.peer", "--initial-peers", address, "--checkpoint-dir", str(ck), "--identity",
                               str(ident), "--metrics-file", str(tmp_path / "back.jsonl"), *LOOPBACK,
                               log_path=str(tmp_path / "peer-back.log")))
        wait_for(lambda: len(outer_by_step(tmp_path / "back.jsonl")) >= 2, 120, "two outer steps after the restart")
    finally:
        stop_all(procs, tmp_path)
    back = read_events(str(tmp_path / "back.jsonl"), "joined")[0]
    assert back["source"] == "peers" and back["outer_step"] >= 5 and back["peer"] == joins[0]["peer"]
    theirs, ours = outer_by_step(tmp_path / "peer0.jsonl"), outer_by_step(tmp_path / "back.jsonl")
    for step in ours:
        assert ours[step]["group_size"] == 2 and ours[step]["model_sha256"] == theirs[step]["model_sha256"]


def test_overlapped_rounds_keep_both_peers_on_one_model(tmp_path):
    """train.overlap: each round's average travels while the next round trains, applied one step late."""
    profile = tmp_path / "overlap.toml"
    profile.write_text(open(os.path.join(ROOT, "peers", "tiny.toml")).read().replace("seed = 0", "seed = 0\noverlap = true"))
    result = run_cli("swarm.launch", "--peers", "2", "--outer-steps", "4", "--config", str(profile), "--workdir",
                     str(tmp_path / "run"), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    peers = [outer_by_step(tmp_path / "run" / f"peer{i}.jsonl") for i in range(2)]
    assert sorted(peers[0]) == sorted(peers[1]) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert peers[0][step]["model_sha256"] == peers[1][step]["model_sha256"]
        assert peers[0][step]["group_size"] == 2 and "wait_s" in peers[0][step]
    assert peers[0][4]["loss"] < peers[0][1]["loss"]


def test_two_cli_peers_train_a_transformers_llama(tmp_path):
    result = run_cli("swarm.launch", "--peers", "2", "--outer-steps", "3", "--config", "llama-tiny", "--workdir",
                     str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    peers = [outer_by_step(tmp_path / f"peer{i}.jsonl") for i in range(2)]
    assert sorted(peers[0]) == sorted(peers[1]) == [1, 2, 3]
    for step in (1, 2, 3):
        assert peers[0][step]["model_sha256"] == peers[1][step]["model_sha256"] and peers[0][step]["group_size"] == 2
    assert peers[0][3]["group_loss"] < peers[0][1]["group_loss"]


def test_a_joiner_must_bring_the_runs_data_and_is_told_how(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 2000)
    log = tmp_path / "a.log"
    first = start_cli("swarm.peer", "--config", "tiny", "--data", str(data), *LOOPBACK, log_path=str(log))
    try:
        address = wait_for(lambda: join_address(log), 90, "the join command")
        assert f"-m swarm.peer --initial-peers {address} --data {data}" in log.read_text()
        refused = run_cli("swarm.peer", "--initial-peers", address, *LOOPBACK, timeout=120)  # the embedded corpus
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert refused.stderr.strip().splitlines()[-1].startswith("error: run 'tiny' trains on 'data' (")
        assert "pass the same data (--data)" in refused.stderr
    finally:
        assert stop(first) == 0
