"""The benchmarks run end to end as users run them, at their smallest settings.

Only what must hold at any size is checked (every variant ran and produced a finite loss, int8
sends fewer bytes than fp32); how the losses compare is the benchmark's report, not a test.
"""

from __future__ import annotations

import json
import math

import pytest

from bench.netns import missing_requirements
from helpers import run_cli

VARIANTS = {"single", "sync", "fp32", "int8", "int8-overlap", "int4"}

pytestmark = pytest.mark.slow  # ~2 minutes together: make test-all


@pytest.mark.timeout(300)  # 40-50 s on a quiet 2-core box; several times that when other swarms share it
def test_convergence_smoke(tmp_path):
    out = tmp_path / "convergence.json"
    result = run_cli("bench.convergence", "--peers", "2", "--outer-steps", "2", "--inner-steps", "5",
                     "--eval-batches", "4", "--workdir", str(tmp_path / "work"), "--json", str(out),
                     "--plot", str(tmp_path / "convergence.png"), timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    assert set(rows) == VARIANTS
    assert all(math.isfinite(r["final_val_loss"]) for r in rows.values()), rows
    assert 0 < rows["int4"]["bytes_per_peer"] < rows["int8"]["bytes_per_peer"] < rows["fp32"]["bytes_per_peer"]
    assert (tmp_path / "convergence.png").stat().st_size > 0


@pytest.mark.timeout(900)
@pytest.mark.skipif(missing_requirements() is not None, reason=f"{missing_requirements()}")
def test_train_quick_run(tmp_path):
    out = tmp_path / "train.json"
    # rounds of 200 tiny steps (10-20 s) outlast a peer's start-up, so the peers meet before the budget is spent
    result = run_cli("bench.train", "--config", "peers/tiny.toml", "--inner-steps", "200", "--outer-steps", "3",
                     "--bandwidth", "50", "--workdir", str(tmp_path / "work"), "--json", str(out),
                     "--plot", str(tmp_path / "train.png"), timeout=840)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["overlap"] for r in rows] == [False, True]
    keys = {"peers", "bandwidth_mbit", "overlap", "compute_utilization", "tokens_per_s", "tokens_per_s_alone",
            "bytes_per_peer", "final_loss"}
    assert all(keys <= set(r) and r["bytes_per_peer"] > 0 and math.isfinite(r["final_loss"]) for r in rows), rows


@pytest.mark.timeout(300)  # about 30 s on a quiet 2-core box
def test_overhead_smoke(tmp_path):
    from swarm import data as swarm_data
    from swarm.architectures import parameter_count
    from swarm.config import load_profile

    out = tmp_path / "overhead.json"
    result = run_cli("bench.overhead", "--smoke", "--workdir", str(tmp_path / "work"), "--json", str(out),
                     "--plot", str(tmp_path / "overhead.png"), timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "inner-only tokens/s" in result.stdout and "extra peak memory" in result.stdout
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"plain", "api", "api-2peers"}
    cfg = load_profile("llama-tiny")
    vocab = swarm_data.build_tokenizer(cfg.model.tokenizer, swarm_data.load_corpus(None)).vocab_size
    numel = parameter_count(cfg.model, vocab)
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["inner_tokens_per_s"] >= r["tokens_per_s"] and r["peak_mem_mb"] > 0, r
        assert r["param_bytes"] == 4 * numel
        assert r["timed_steps"] > 0 and r["steps"] == rows["plain"]["steps"] and r["profile"] == "llama-tiny"
    assert rows["plain"]["peers"] == rows["api"]["peers"] == 1 and rows["api-2peers"]["peers"] == 2
    assert rows["api"]["outer_steps_applied"] == rows["api-2peers"]["outer_steps_applied"] == rows["api"]["outer_steps"]
    assert rows["api"]["max_group_size"] == 1 and rows["api-2peers"]["max_group_size"] == 2  # one run, both peers
    assert {t["target"] for t in rows["api"]["targets"]} == {"inner_tokens_per_s", "extra_peak_mem_mb"}
    assert (tmp_path / "overhead.png").stat().st_size > 0
