"""``swarm.generate`` on checkpoints written as a peer writes them, for swarm's GPT and a transformers Llama:
text out, and a clear error for a corrupted one."""

from __future__ import annotations

import pytest

from helpers import (LOOPBACK, corpus_sampler, join_address, run_cli, run_config, save_checkpoint, start_cli, stop,
                     train, wait_for)
from swarm import checkpoint
from swarm.architectures import build_model
from swarm.metrics import read_events


@pytest.mark.parametrize("profile", ["tiny", "llama-tiny"])
def test_generate_from_a_trained_checkpoint_and_refuse_a_corrupted_one(tmp_path, profile):
    ck = tmp_path / "ck"
    cfg = run_config(profile, 256)
    model = build_model(cfg.model, 256, cfg.train.seed)
    sampler = corpus_sampler(cfg.model.seq_len, 8)
    for outer_step in (1, 2, 3):
        save_checkpoint(ck, cfg, train(model, sampler, steps=20), outer_step)
    out = run_cli("swarm.generate", "--checkpoint", str(ck), "--prompt", "KING:", "--tokens", "80", "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("KING:") and len(out.stdout) >= len("KING:") + 60
    again = run_cli("swarm.generate", "--checkpoint", str(ck), "--prompt", "KING:", "--tokens", "80", "--seed", "1")
    assert again.stdout == out.stdout  # same verified model, same seed: same text

    for step in checkpoint.step_dirs(ck):  # corrupt every checkpoint: nothing verifies any more
        blob = bytearray((step / "state.bin").read_bytes())
        blob[100] ^= 1
        (step / "state.bin").write_bytes(blob)
    newest = checkpoint.step_dirs(ck)[0]
    bad = run_cli("swarm.generate", "--checkpoint", str(newest), "--prompt", "KING:")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == f"error: {newest}: state.bin is altered (1 chunks fail their " \
                                                  "sha256, first 0)"
    none_left = run_cli("swarm.generate", "--checkpoint", str(ck), "--prompt", "KING:")
    assert none_left.returncode == 2 and "no checkpoint that verifies" in none_left.stderr


def test_generate_from_the_swarm_downloads_the_model_the_peers_hold(tmp_path):
    """--initial-peers: a read-only node (no identity, no liveness record of its own) fetches the state most live
    peers hold, verified, and samples from it."""
    log, metrics = tmp_path / "peer.log", tmp_path / "m.jsonl"
    peer = start_cli("swarm.peer", "--config", "tiny", "--metrics-file", str(metrics), *LOOPBACK, log_path=str(log))
    try:
        address = wait_for(lambda: join_address(log), 90, "the peer's join command")
        wait_for(lambda: len(read_events(str(metrics), "outer")) >= 2, 90, "two outer steps")
        out = run_cli("swarm.generate", "--initial-peers", address, "--prompt", "ROMEO:", "--tokens", "40",
                      timeout=120)
    finally:
        assert stop(peer) == 0, log.read_text()[-2000:]
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ROMEO:") and len(out.stdout) > len("ROMEO:") + 20
    assert "Traceback" not in out.stderr
