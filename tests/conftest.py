"""Shared fixtures: a guard that no child process outlives its test (helpers live in tests/helpers.py)."""

from __future__ import annotations

import psutil
import pytest


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Kill whatever a test started and left running (peers, p2pd daemons), like hivemind's own conftest."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    leftovers = [p for p in psutil.Process().children(recursive=True)
                 if p.pid not in before and _name(p) != "torch_shm_manager"]  # torch's, shared by all tests
    for proc in leftovers:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=5)


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""
