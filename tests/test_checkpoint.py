"""Checkpoints on disk: atomic against kill -9 at any instant, refused when truncated or altered."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from swarm import checkpoint
from swarm.config import RunConfig
from swarm.manifest import pack_state

from helpers import ROOT, peer_env

NUMEL = 300_000  # 2.4 MB payload: several 1 MiB chunks
CONFIG = RunConfig(run_id="ck-test")


def state_at(step: int, numel: int = NUMEL) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"outer_step": step, "theta_global": torch.randn(numel, generator=gen),
            "momentum": torch.randn(numel, generator=gen)}


def save_step(root, step: int, keep: int = 3) -> checkpoint.Saved:
    manifest, payload = pack_state("ck-test", state_at(step))
    return checkpoint.save(root, manifest, payload, keep, {"state": {}, "param_groups": []}, CONFIG)


def test_round_trip_and_keep_last_k(tmp_path):
    for step in range(1, 6):
        saved = save_step(tmp_path, step, keep=2)
        assert saved.outer_step == step and saved.bytes > 8 * NUMEL
    assert [p.name for p in checkpoint.step_dirs(tmp_path)] == ["step-00000005", "step-00000004"]
    manifest, payload, state, inner, config, tokenizer = checkpoint.load_latest(tmp_path, "ck-test", NUMEL)
    expected = state_at(5)
    assert config == CONFIG
    assert manifest.outer_step == 5 and state["outer_step"] == 5
    assert torch.equal(state["theta_global"], expected["theta_global"])
    assert torch.equal(state["momentum"], expected["momentum"])
    assert inner == {"state": {}, "param_groups": []} and tokenizer is None  # a byte run has none
    assert checkpoint.load_latest(tmp_path, "other-run", NUMEL) is None


def test_truncated_or_altered_checkpoints_are_refused_and_skipped(tmp_path, caplog):
    save_step(tmp_path, 1)
    save_step(tmp_path, 2)
    newest = checkpoint.step_dirs(tmp_path)[0] / "state.bin"
    blob = bytearray(newest.read_bytes())
    newest.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load(newest.parent)
    blob[12345] ^= 0x40
    newest.write_bytes(blob)
    with pytest.raises(checkpoint.CheckpointError, match="altered .* first 0"):
        checkpoint.load(newest.parent)
    (newest.parent / "manifest.msgpack").write_bytes(b"\x92junk")
    with pytest.raises(checkpoint.CheckpointError, match="unreadable manifest"):
        checkpoint.load(newest.parent)
    loaded = checkpoint.load_latest(tmp_path, "ck-test", NUMEL)  # falls back to step 1, loudly
    assert loaded.manifest.outer_step == 1
    assert "skipping checkpoint" in caplog.text


WRITER = """
import sys
from swarm import checkpoint
from swarm.config import RunConfig
from swarm.manifest import pack_state
sys.path.insert(0, {tests!r})
from test_checkpoint import state_at
step = int(sys.argv[2])
print("ready", flush=True)
while True:
    step += 1
    manifest, payload = pack_state("ck-test", state_at(step))
    checkpoint.save(sys.argv[1], manifest, payload, keep=2)
    print(step, flush=True)
"""


def test_kill_9_at_random_instants_always_leaves_a_loadable_checkpoint(tmp_path):
    """A writer saving checkpoints back to back is SIGKILLed at random instants, many times."""
    rng = random.Random(7)
    save_step(tmp_path, 1)
    newest, kills, deadline = 1, 0, time.monotonic() + 90
    while kills < 10 and time.monotonic() < deadline:
        writer = subprocess.Popen([sys.executable, "-c", WRITER.format(tests=os.path.join(ROOT, "tests")),
                                   str(tmp_path), str(newest)], env=peer_env(), stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.6))  # a save takes tens of ms: kills land at every stage of one
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        kills += 1
        completed = [int(line) for line in writer.stdout.read().split()]
        loaded = checkpoint.load_latest(tmp_path, "ck-test", NUMEL)
        assert loaded is not None, "no loadable checkpoint after a kill"
        manifest, state = loaded.manifest, loaded.state
        assert manifest.outer_step >= max(completed, default=newest)  # nothing reported saved was lost
        assert torch.equal(state["theta_global"], state_at(manifest.outer_step)["theta_global"])
        newest = manifest.outer_step
    assert kills >= 5 and newest >= 3  # saves did complete between kills (few, on a loaded machine)
