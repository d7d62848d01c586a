"""Churn: peers SIGKILLed (whole process group) at random instants and restarted, every other outer step.

Both are slow (``make test-all``): the short run takes 70-120 s on 2 cores, the full one (4 peers, 12 outer steps) more.
Both run ``python -m bench.churn`` as users would and check its JSON.
"""

from __future__ import annotations

import json

import pytest

from helpers import run_cli


def churn(tmp_path, *args: str) -> dict:
    out = tmp_path / "churn.json"
    result = run_cli("bench.churn", "--workdir", str(tmp_path / "work"), "--json", str(out), *args, timeout=1200)
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["kills"] >= 1 and report["never_rejoined"] == 0, report
    assert report["steps_completed"] == report["outer_steps"], report  # every outer step completed
    assert report["steps_with_hash_agreement"] == report["steps_completed"], report  # one model per step
    assert all(n <= 2 for n in report["rejoin_steps"]) and len(report["rejoin_steps"]) == report["kills"], report
    return report


@pytest.mark.slow  # 70-120 s on 2 cores; make test-all
def test_short_churn_run(tmp_path):
    report = churn(tmp_path, "--peers", "3", "--outer-steps", "6", "--inner-steps", "40")
    assert report["kills"] == 2


@pytest.mark.slow
def test_full_churn_run_matches_the_undisturbed_loss(tmp_path):
    report = churn(tmp_path)
    assert report["kills"] >= 4
    assert abs(report["final_loss"] - report["baseline_final_loss"]) <= 0.05 * report["baseline_final_loss"]
