"""Faults a real peer must ride out: a full disk mid-checkpoint, a member that stalls mid all-reduce."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import subprocess
import time

import pytest
import torch

from swarm import checkpoint
from swarm.config import SwarmConfig
from swarm.metrics import read_events

import helpers
from helpers import LOOPBACK, close_all, run_cli

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
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(n.average, 1, d.clone(), 1.0, "b" * 64) for n, d in zip(nodes, deltas)]
            survivors = [f.result() for f in futures[:2]]
            elapsed = time.monotonic() - t0
            late = futures[2].exception()
        assert survivors[0].group.members == tuple(sorted(n.peer_id for n in nodes[:2]))
        assert survivors[0].attempts == 2 and elapsed < 20
        assert torch.equal(survivors[0].average, survivors[1].average)
        assert torch.allclose(survivors[0].average, torch.full((NUMEL,), 1.5), atol=0.02)  # (1 + 2) / 2
        assert late is not None  # the stalled peer's round failed: it applies nothing and must resynchronise
    finally:
        close_all(nodes)

