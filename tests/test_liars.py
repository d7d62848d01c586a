"""One liar must not kill or poison a swarm: real peers, a real lying process (tests/liar.py), real DHTs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from swarm.metrics import read_events

from helpers import LOOPBACK, ROOT, join_address, outer_by_step, peer_env, start_cli, stop, wait_for


def start_liar(address: str, kind: str, log_path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "tests/liar.py", "--initial-peers", address, "--kind", kind],
                                stdout=log, stderr=subprocess.STDOUT, env=peer_env(), cwd=ROOT, start_new_session=True)


def announced_model(log_path, kind: str) -> str:
    """The model hash of the state a liar serves, once it says so."""
    line = wait_for(lambda: [x for x in open(log_path).read().splitlines() if x.startswith("lying: ")], 90,
                    f"the {kind} liar to announce its state")
    return line[0].split()[1]


@pytest.mark.parametrize("kinds", [("small", "misfit"), ("zeros", "noise")])
def test_liars_far_ahead_neither_crash_nor_poison_honest_peers_or_a_fresh_joiner(tmp_path, kinds):
    """Two honest peers train; liars announce states of outer step 1000 (a 10-parameter state, a manifest that
    contradicts its record, zeros, noise). The honest peers keep averaging with each other, their models never
    become a liar's, and a fresh joiner takes the state the honest majority holds."""
    boot = start_cli("swarm.bootstrap", *LOOPBACK, log_path=str(tmp_path / "boot.log"))
    procs = [boot]
    try:
        address = wait_for(lambda: join_address(tmp_path / "boot.log"), 60, "the bootstrap address")
        for i in range(2):
            procs.append(start_cli("swarm.peer", "--initial-peers", address, *(["--config", "tiny"] if i == 0 else []),
                                   "--name", f"peer{i}", "--metrics-file", str(tmp_path / f"peer{i}.jsonl"),
                                   *LOOPBACK, log_path=str(tmp_path / f"peer{i}.log")))
        wait_for(lambda: all(len(outer_by_step(tmp_path / f"peer{i}.jsonl")) >= 2 for i in range(2)), 120,
                 "two outer steps on both honest peers")
        procs += [start_liar(address, kind, tmp_path / f"liar-{kind}.log") for kind in kinds]  # together: faster
        lies = {announced_model(tmp_path / f"liar-{kind}.log", kind) for kind in kinds}
        after = max(max(outer_by_step(tmp_path / f"peer{i}.jsonl")) for i in range(2))
        wait_for(lambda: all(max(outer_by_step(tmp_path / f"peer{i}.jsonl")) >= after + 3 for i in range(2)), 120,
                 "three more outer steps beside the liars")
        procs.append(start_cli("swarm.peer", "--initial-peers", address, "--name", "joiner", "--metrics-file",
                               str(tmp_path / "joiner.jsonl"), *LOOPBACK, log_path=str(tmp_path / "joiner.log")))
        wait_for(lambda: len(outer_by_step(tmp_path / "joiner.jsonl")) >= 2, 120, "two outer steps of the joiner")
        assert all(p.poll() is None for p in procs), "every honest peer is still running"
    finally:
        codes = {p.pid: stop(p) for p in reversed(procs)}
    logs = "".join((tmp_path / f"{name}.log").read_text() for name in ("peer0", "peer1", "joiner"))
    # the two honest peers and the joiner (the liars are stopped too)
    assert [codes[p.pid] for p in (procs[1], procs[2], procs[-1])] == [0, 0, 0], logs[-3000:]
    assert "Traceback" not in logs
    honest = [outer_by_step(tmp_path / f"peer{i}.jsonl") for i in range(2)]
    for step in sorted(set(honest[0]) & set(honest[1])):
        assert honest[0][step]["model_sha256"] == honest[1][step]["model_sha256"], step
        assert set(honest[0][step]["group"]) >= {read_events(str(tmp_path / f"peer{i}.jsonl"), "joined")[0]["peer"]
                                                 for i in range(2)}, "the honest peers average with each other"
    for path in ("peer0.jsonl", "peer1.jsonl", "joiner.jsonl"):
        events = read_events(str(tmp_path / path))
        assert not {e.get("model_sha256") for e in events} & lies, f"{path} adopted a liar's state"
    boot_event = read_events(str(tmp_path / "joiner.jsonl"), "bootstrap")[0]
    assert boot_event["model_sha256"] == honest[0][boot_event["outer_step"]]["model_sha256"]
    joined = outer_by_step(tmp_path / "joiner.jsonl")
    assert all(joined[s]["model_sha256"] == honest[0][s]["model_sha256"] for s in joined if s in honest[0])
