"""Faults a peer must ride out: a full disk mid-checkpoint, a member that stalls mid all-reduce, a DHT that stops
answering, and a bug of our own, which must not be blamed on anyone else."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import os
import subprocess
import time

import psutil
import pytest
import torch

from swarm import checkpoint
from swarm.averaging import AveragingError, Codec
from swarm.config import SwarmConfig
from swarm.metrics import read_events

import helpers
from helpers import LOOPBACK, close_all, run_cli, start_cli, stop, wait_for

NUMEL = 10_000 + 17


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    # a tiny checkpoint is ~7.2 MB (state + AdamW state): two fit in 16 MB, the third does not
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(ck)], check=True)
    try:
        metrics = tmp_path / "m.jsonl"
        result = run_cli("swarm.peer", "--config", "peers/tiny.toml", "--checkpoint-dir", str(ck),
                         "--max-outer-steps", "5", "--metrics-file", str(metrics), *LOOPBACK, timeout=180)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        assert "checkpoint of outer step 3 not saved (No space left on device)" in result.stdout
        assert "Traceback" not in result.stdout + result.stderr
        assert sorted(e["outer_step"] for e in read_events(str(metrics), "outer")) == [1, 2, 3, 4, 5]
        assert [e["outer_step"] for e in read_events(str(metrics), "checkpoint")] == [1, 2]
        loaded = checkpoint.load_latest(ck, "tiny")
        assert loaded.manifest.outer_step == 2  # verified chunk by chunk
        assert not list(ck.glob(".step-*"))  # no half-written leftovers
    finally:
        subprocess.run(["umount", str(ck)], check=True)


def test_a_member_stalled_mid_round_is_dropped_and_not_applied_twice():
    """Three peers average; one stops answering mid all-reduce (as under SIGSTOP). The other two drop it
    and finish the round between them; when it wakes up, its late work is not applied again."""
    cfg = SwarmConfig(codec="int8", block_size=256, gather_timeout_s=10, join_timeout_s=5, allreduce_timeout_s=3,
                      heartbeat_s=0.5)
    nodes = helpers.start_nodes(3, "faults", cfg, round=1, training=1, state="training")
    try:
        stalled = nodes[2]
        deltas = [torch.full((NUMEL,), float(i + 1)) for i in range(3)]
        real_reduce = stalled.averager._serve_reduce

        async def stall_then_serve(info, reader, writer):  # what a SIGSTOPped process looks like from outside
            await asyncio.sleep(8)
            await real_reduce(info, reader, writer)

        stalled.call(stalled.p2p.remove_binary_stream_handler("swarm.reduce"))
        stalled.call(stalled.p2p.add_binary_stream_handler("swarm.reduce", stall_then_serve))
        with cf.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(n.average, 1, d.clone(), 1.0, "b" * 64) for n, d in zip(nodes, deltas)]
            survivors = [f.result() for f in futures[:2]]
            late = futures[2].exception()
        assert survivors[0].group.members == tuple(sorted(n.peer_id for n in nodes[:2]))
        assert survivors[0].attempts == 2
        assert torch.equal(survivors[0].average, survivors[1].average)
        assert torch.allclose(survivors[0].average, torch.full((NUMEL,), 1.5), atol=0.02)  # (1 + 2) / 2
        assert late is not None  # the stalled peer's round failed: it applies nothing and must resynchronise
    finally:
        close_all(nodes)



class BrokenEncoder(Codec):
    """Our own bug: the encoder raises for every slice."""

    def encode(self, x):
        raise RuntimeError("injected bug in our own encoder")


def test_a_bug_of_our_own_blames_no_remote_peer(caplog):
    """A peer whose own encoder fails: its round fails as a local failure that blames nobody; the others, who
    received nothing from it, retry without it and finish with identical bytes."""
    caplog.set_level(logging.INFO, logger="swarm")
    cfg = SwarmConfig(codec="int8", block_size=256, gather_timeout_s=10, join_timeout_s=5, allreduce_timeout_s=5,
                      heartbeat_s=0.5)
    nodes = helpers.start_nodes(3, "local-bug", cfg, round=1, training=1, state="training")
    try:
        faulty = nodes[2]
        faulty.averager.codec = BrokenEncoder("int8", 256)
        deltas = [torch.full((NUMEL,), float(i + 1)) for i in range(3)]
        with cf.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(n.average, 1, d.clone(), 1.0, "b" * 64) for n, d in zip(nodes, deltas)]
            honest = [f.result() for f in futures[:2]]
            failure = futures[2].exception()
        assert isinstance(failure, AveragingError) and failure.local and failure.blame == set()
        assert "failed on our side: RuntimeError: injected bug" in str(failure)
        honest_ids = {n.peer_id for n in nodes[:2]}
        for result in honest:
            assert result.group.members == tuple(sorted(honest_ids)) and result.attempts == 2
            assert set(result.refused) <= {faulty.peer_id}
        assert torch.equal(honest[0].average, honest[1].average)
        retried = [r.getMessage() for r in caplog.records if "retrying without" in r.getMessage()]
        assert retried and all(faulty.peer_id[-6:] in line and not any(p[-6:] in line.split("without")[1]
                                                                        for p in honest_ids) for line in retried)
    finally:
        close_all(nodes)


def dht_process(peer: subprocess.Popen) -> psutil.Process:
    """hivemind's DHT process of a peer: its Python child (the other child is p2pd)."""
    children = [c for c in psutil.Process(peer.pid).children() if "python" in c.name()]
    assert len(children) == 1, children
    return children[0]


def test_a_dht_that_stops_answering_does_not_stop_training(tmp_path):
    """The peer's DHT process is stopped for longer than three heartbeats (its liveness record expires): inner steps
    go on meanwhile, and rounds resume once the DHT answers again."""
    metrics, log = tmp_path / "m.jsonl", tmp_path / "peer.log"
    peer = start_cli("swarm.peer", "--config", "tiny", "--metrics-file", str(metrics), "--max-outer-steps", "12",
                     *LOOPBACK, log_path=str(log))
    try:
        wait_for(lambda: len(read_events(str(metrics), "outer")) >= 2, 120, "two outer steps")
        dht = dht_process(peer)
        before = len(read_events(str(metrics), "outer"))
        stopped_at = time.time()
        dht.suspend()
        time.sleep(5)
        resumed_at = time.time()
        dht.resume()
        assert peer.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        stop(peer)
    inner = [e["t"] for e in read_events(str(metrics), "inner")]
    assert any(stopped_at < t < resumed_at for t in inner), "inner steps went on while the DHT was stopped"
    outer = read_events(str(metrics), "outer")
    assert sorted(e["outer_step"] for e in outer) == list(range(1, 13))
    assert before < 12 and max(e["t"] for e in outer) > resumed_at  # rounds went on after the DHT came back
    assert "Traceback" not in log.read_text()
