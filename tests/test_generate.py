"""``swarm.generate`` on a checkpoint a real peer wrote: text out, and a clear error for a corrupted one."""

from __future__ import annotations

from conftest import LOOPBACK, run_cli

from swarm import checkpoint


def test_generate_from_a_trained_checkpoint_and_refuse_a_corrupted_one(tmp_path):
    ck = tmp_path / "ck"
    trained = run_cli("swarm.peer", "--config", "peers/tiny.toml", "--checkpoint-dir", str(ck), "--max-outer-steps",
                      "3", *LOOPBACK, timeout=120)
    assert trained.returncode == 0, trained.stderr
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
