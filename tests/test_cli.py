"""The CLI as users run it: bad input gives one clear line and the contract's exit code, never a traceback."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import psutil
import pytest
import torch
from hivemind.proto import crypto_pb2

from swarm.metrics import read_events

from helpers import LOOPBACK, ROOT, join_address, peer_env, run_cli, start_cli, stop, wait_for

UNUSED_PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWRmh5jauYrrVxUahHrvVbNN54TZW4ppaNabhpPSCYwsQL"


def assert_one_line_error(result, code: int, fragment: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and fragment in lines[-1], result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--initial-peers", "/ip4/1.2.3.4/tcp/notaport"], "bad multiaddr"),
    (["--initial-peers", "/ip4/127.0.0.1/tcp/4000"], "lacks the peer id"),
    (["--config", "peers/tiny.toml", "--host-maddrs", "localhost:8080"], "bad multiaddr"),
    (["--config", "no/such/profile.toml"], "no such file"),
    (["--config", "peers/tiny.toml", "--data", "no/such/corpus"], "--data"),
    (["--config", "peers/tiny.toml", "--checkpoint-dir", "/proc/swarm-checkpoints"], "not writable"),
    (["--config", "peers/tiny.toml", "--run-id", "two words"], "run id"),
])
def test_bad_input_exits_2_with_one_line(args, fragment):
    assert_one_line_error(run_cli("swarm.peer", *args), 2, fragment)


def test_bad_profile_value_exits_2(tmp_path):
    profile = tmp_path / "bad.toml"
    profile.write_text("[train]\ninner_steps = -5\n")
    assert_one_line_error(run_cli("swarm.peer", "--config", str(profile)), 2, "must be positive")


def test_an_unusable_identity_file_exits_2(tmp_path):
    garbage, ed25519 = tmp_path / "garbage.key", tmp_path / "ed25519.key"
    garbage.write_bytes(os.urandom(300))
    ed25519.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=os.urandom(64)).SerializeToString())
    for path, fragment in ((garbage, "not a usable libp2p identity"), (ed25519, "holds a Ed25519 key")):
        result = run_cli("swarm.peer", "--config", "peers/tiny.toml", "--identity", str(path), *LOOPBACK)
        assert_one_line_error(result, 2, fragment)
        assert path.read_bytes()  # never overwritten: it may be someone's only key


def run_on_terminal(argv: list[str], timeout_s: float) -> str:
    """Run a command with stdout and stderr on a 120-column pseudo-terminal; what it drew, once it exits."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=peer_env(), cwd=ROOT)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
        assert proc.wait(timeout=30) == 0, out.decode(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return out.decode(errors="replace")


def test_inner_steps_show_a_bar_on_a_terminal_and_stay_quiet_in_a_log():
    argv = ["--config", "peers/tiny.toml", "--max-outer-steps", "1", *LOOPBACK]
    drawn = run_on_terminal([sys.executable, "-m", "swarm.peer", *argv], 120)
    frames = [f for f in drawn.split("\r") if "step 1:" in f and "step/s" in f]
    assert frames and "/20 [" in frames[-1] and "loss=" in frames[-1], drawn[-3000:]
    logged = run_cli("swarm.peer", *argv, timeout=120)  # a pipe: log lines only, no bar
    assert logged.returncode == 0 and "\r" not in logged.stdout + logged.stderr
    assert "outer step 1: group 1" in logged.stdout and "step/s" not in logged.stdout + logged.stderr


def test_unreachable_initial_peer_exits_3():
    result = run_cli("swarm.peer", "--initial-peers", UNUSED_PEER, *LOOPBACK, timeout=60)
    assert_one_line_error(result, 3, "cannot reach any initial peer")


@pytest.mark.slow  # ~28 s, most of it the 20 s a joiner looks for the run's config; make test-all
def test_joining_with_nothing_to_join_exits_2(tmp_path):
    boot = start_cli("swarm.bootstrap", *LOOPBACK, log_path=str(tmp_path / "boot.log"))
    try:
        address = wait_for(lambda: join_address(tmp_path / "boot.log"), 60, "the bootstrap address")
        result = run_cli("swarm.peer", "--initial-peers", address, *LOOPBACK, timeout=90)
        assert_one_line_error(result, 2, "no run found in the DHT")
    finally:
        assert stop(boot) == 0


def test_ctrl_c_leaves_cleanly_and_stops_p2pd(tmp_path):
    log, metrics = tmp_path / "peer.log", tmp_path / "m.jsonl"
    peer = start_cli("swarm.peer", "--config", "peers/tiny.toml", "--metrics-file", str(metrics), *LOOPBACK,
                     log_path=str(log))
    wait_for(lambda: "--initial-peers" in log.read_text(), 90, "the join command")
    daemons = [p for p in psutil.Process(peer.pid).children(recursive=True) if "p2pd" in p.name()]
    assert daemons, "the peer should run a p2pd daemon"
    os.kill(peer.pid, signal.SIGINT)
    assert peer.wait(timeout=30) == 0, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()
    psutil.wait_procs(daemons, timeout=10)
    assert not any(d.is_running() and d.status() != psutil.STATUS_ZOMBIE for d in daemons)
    assert read_events(str(metrics), "left")[0]["reason"] == "interrupted"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_cuda_on_a_machine_without_one_exits_2_with_one_line():
    result = run_cli("swarm.peer", "--config", "tiny", "--device", "cuda", *LOOPBACK)
    assert_one_line_error(result, 2, "--device cuda: this torch")


def test_a_model_that_cannot_fit_is_refused_before_the_network_starts(tmp_path):
    profile = tmp_path / "huge.toml"
    profile.write_text("[model]\nn_layer = 200\nn_head = 64\nd_model = 8192\n")
    result = run_cli("swarm.peer", "--config", str(profile), *LOOPBACK)
    assert_one_line_error(result, 2, "GiB of memory, and")
    assert "dial-back" not in result.stdout and "started run" not in result.stdout  # nothing was started


def test_a_duplicate_identity_is_named_as_such(tmp_path):
    key = tmp_path / "shared.key"
    boot = start_cli("swarm.bootstrap", *LOOPBACK, log_path=str(tmp_path / "boot.log"))
    first = None
    try:
        address = wait_for(lambda: join_address(tmp_path / "boot.log"), 60, "the bootstrap address")
        first = start_cli("swarm.peer", "--initial-peers", address, "--config", "tiny", "--identity", str(key),
                          *LOOPBACK, log_path=str(tmp_path / "first.log"))
        own = wait_for(lambda: join_address(tmp_path / "first.log"), 90, "the first peer's join command")
        direct = run_cli("swarm.peer", "--initial-peers", own, "--identity", str(key), *LOOPBACK, timeout=90)
        assert_one_line_error(direct, 2, "it is the identity of the initial peer you named")
        through = run_cli("swarm.peer", "--initial-peers", address, "--identity", str(key), *LOOPBACK, timeout=90)
        assert_one_line_error(through, 2, "another live peer uses this identity")
    finally:
        if first is not None:
            assert stop(first) == 0
        assert stop(boot) == 0


def test_a_diverging_run_rolls_back_and_stops_after_three_rounds(tmp_path):
    """inner_lr = 1000 makes every round's loss NaN: each is rolled back to θ_global (never averaged, published or
    saved), and the third in a row ends the peer with one line and exit code 1."""
    profile, ck, metrics = tmp_path / "wild.toml", tmp_path / "ck", tmp_path / "m.jsonl"
    profile.write_text(open(os.path.join(ROOT, "peers", "tiny.toml")).read().replace("inner_lr = 3e-3", "inner_lr = 1e3"))
    result = run_cli("swarm.peer", "--config", str(profile), "--checkpoint-dir", str(ck), "--metrics-file",
                     str(metrics), *LOOPBACK, timeout=120)
    assert_one_line_error(result, 1, "training diverged in 3 rounds in a row")
    assert result.stdout.count("diverged (") == 3 and "rolled back to θ_global of outer step 0" in result.stdout
    assert read_events(str(metrics), "outer") == [] and read_events(str(metrics), "checkpoint") == []
    assert read_events(str(metrics), "left")[0]["reason"] == "error"
