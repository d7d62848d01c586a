"""Shared fixtures: real DHTs on loopback, and a guard that no child process outlives its test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from swarm.config import SwarmConfig
from swarm.dht import parse_maddrs, start_dht
from swarm.identity import load_identity
from swarm.launch import JOIN_LINE
from swarm.node import Node

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]


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


def peer_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)


def run_cli(module: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` as a user would, and return its exit code and output."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=peer_env(), cwd=ROOT)


def start_cli(module: str, *args: str, log_path: str) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=peer_env(), cwd=ROOT, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 20) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def join_address(log_path) -> str | None:
    """The multiaddr a peer or bootstrap node printed for others to join, once it has."""
    match = JOIN_LINE.search(open(log_path).read())
    return match.group(1) if match else None


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def start_nodes(n: int, run_id: str, cfg: SwarmConfig, **status) -> list:
    """n real nodes on loopback, each under its own identity, members of ``run_id``; ``status`` fields
    (e.g. round=1) are published before the call returns."""
    loopback = parse_maddrs(["/ip4/127.0.0.1/tcp/0"], "test")
    identities = [load_identity(None) for _ in range(n)]
    first = start_dht([], loopback, [], identities[0])
    dhts = [first] + [start_dht(first.get_visible_maddrs(), loopback, [], i) for i in identities[1:]]
    nodes = [Node(d, i) for d, i in zip(dhts, identities)]
    for node in nodes:
        node.join_run(run_id, cfg)
        if status:
            node.set_status(**status)
    return nodes
