"""CUDA peers (run with ``pytest -m gpu`` on a machine with a GPU; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from helpers import LOOPBACK, join_address, outer_by_step, start_cli, stop, wait_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]


def test_a_cuda_peer_and_a_cpu_peer_agree_on_every_outer_step(tmp_path):
    """θ_global and the outer step stay fp32 on the CPU, computed with one rounding per operation: a peer training
    on a GPU and one on a CPU apply the same averaged bytes and end every outer step with the same model_sha256."""
    gpu_log, cpu_log = tmp_path / "gpu.log", tmp_path / "cpu.log"
    gpu = start_cli("swarm.peer", "--config", "tiny", "--device", "cuda", "--metrics-file", str(tmp_path / "gpu.jsonl"),
                    "--max-outer-steps", "4", *LOOPBACK, log_path=str(gpu_log))
    cpu = None
    try:
        address = wait_for(lambda: join_address(gpu_log), 120, "the CUDA peer's join command")
        cpu = start_cli("swarm.peer", "--initial-peers", address, "--device", "cpu", "--metrics-file",
                        str(tmp_path / "cpu.jsonl"), "--max-outer-steps", "4", *LOOPBACK, log_path=str(cpu_log))
        assert cpu.wait(timeout=300) == 0, cpu_log.read_text()[-3000:]
        assert gpu.wait(timeout=120) == 0, gpu_log.read_text()[-3000:]
    finally:
        if cpu is not None:
            stop(cpu)
        stop(gpu)
    on = [outer_by_step(tmp_path / f"{d}.jsonl") for d in ("gpu", "cpu")]
    shared = sorted(set(on[0]) & set(on[1]))
    assert len(shared) >= 3, shared
    for step in shared:
        assert on[0][step]["group_size"] == 2
        assert on[0][step]["model_sha256"] == on[1][step]["model_sha256"], step
    print("outer steps with identical model_sha256 on the CUDA and the CPU peer:",
          {s: on[0][s]["model_sha256"][:12] for s in shared})
