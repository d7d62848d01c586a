"""The emulated WAN of bench/: namespaces come and go cleanly, links run at their set rate and delay,
the swarm's all-reduce is exact across namespaces, and an interrupted benchmark leaves nothing behind.

Needs root and iproute2 (`ip`, `tc`); skipped otherwise.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import psutil
import pytest

from bench.allreduce import parse_args, payload_bytes, run_system
from bench.allreduce_worker import pattern
from bench.netns import Topology, missing_requirements
from bench.offline_mean import check_round
from helpers import ROOT, join_address, outer_by_step, peer_env, wait_for

pytestmark = pytest.mark.skipif(missing_requirements() is not None, reason=f"{missing_requirements()}")


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def links_here() -> set[str]:
    """Interface names in the test's own namespace: the builder must never add one here."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def test_topology_builds_delays_and_removes_its_namespaces():
    links_before = links_here()
    with Topology(peers=2, rate_mbit=100) as topo:
        assert {topo.router, *topo.namespaces} <= netns_names()
        assert topo.probe_rtt_ms(0, 1) < 5.0  # no delay line yet
        topo.set_latency_ms(20)
        rtt_ms = topo.probe_rtt_ms(1, 0)
        assert 40.0 <= rtt_ms < 60.0  # 20 ms each way, plus scheduling on a busy machine
        assert links_here() == links_before
    assert not {ns for ns in netns_names() if ns.startswith(topo.prefix)}
    assert links_here() == links_before
    assert topo.delay_stats and topo.delay_stats[0]["packets"] > 0 and topo.delay_stats[0]["dropped"] == 0


def test_shaped_link_measures_within_ten_percent_of_its_rate():
    with Topology(peers=2, rate_mbit=50) as topo:
        for src, dst in ((0, 1), (1, 0)):
            mbit = topo.probe_bandwidth_mbit(src, dst, max_s=1.5)
            assert abs(mbit - 50) <= 5, f"{src}->{dst}: {mbit:.1f} Mbit/s"


def test_swarm_all_reduce_across_three_namespaces_is_exact_and_identical(tmp_path):
    numel, weights = 3_000_000, [1.0, 2.0, 5.0]  # 3 MB of int8: big enough that streams wait on the network
    with Topology(peers=3, rate_mbit=1000) as topo:
        (replies,) = run_system(topo, "swarm", 3, numel, "int8", 1, parse_args([]), str(tmp_path), "t3",
                                weights=weights)
    # peer i sends (i + 1) * pattern with weight w_i: the mean is (1*1 + 2*2 + 5*3) / 8 = 2.5 times the
    # pattern, integers times a dyadic scale that the int8 codec carries exactly
    expected_head = (pattern(4) * 2.5).tolist()
    assert [r["group_size"] for r in replies] == [3, 3, 3]
    assert all(r["head"] == expected_head for r in replies), [r["head"] for r in replies]
    assert [r["max_abs_err"] for r in replies] == [0.0, 0.0, 0.0]
    assert len({r["result_sha256"] for r in replies}) == 1  # byte-identical averages on every peer
    assert len({r["average_sha256"] for r in replies}) == 1
    # each peer sends about 2(N-1)/N of the int8 vector (parts are block-aligned, so not exactly equal)
    wire = 2 * 2 / 3 * (numel + 4 * -(-numel // 1024))
    assert all(abs(r["app_sent_bytes"] - wire) < 0.03 * wire for r in replies), [r["app_sent_bytes"] for r in replies]
    assert all(r["tx_bytes"] >= 0.97 * wire for r in replies), [r["tx_bytes"] for r in replies]



def test_int4_all_reduce_equals_the_offline_mean_of_the_same_messages(tmp_path):
    """int4 cannot be exact: on Gaussian payloads every member must apply the same bytes, and those bytes must be
    the average recomputed without any network from the members' payloads (bench/offline_mean.py)."""
    numel, weights = 2_000_000, [1.0, 2.0, 5.0]
    with Topology(peers=3, rate_mbit=1000) as topo:
        (replies,) = run_system(topo, "swarm", 3, numel, "int4", 1, parse_args([]), str(tmp_path), "i4",
                                weights=weights)
    assert [r["group_size"] for r in replies] == [3, 3, 3]
    assert len({r["result_sha256"] for r in replies}) == 1
    check = check_round(replies, numel, "int4")
    assert check["offline_match"], check
    # 4 bits per value and blocks of 128: the mean lands within a fifth of its norm of the exact one
    assert 0.01 < check["rel_err"] < 0.2, check
    wire = 2 * 2 / 3 * payload_bytes(numel, "int4")  # 4 bits a value, plus a 4-byte scale per 128-block
    assert payload_bytes(numel, "int4") == numel // 2 + 4 * (numel // 128)
    assert all(abs(r["app_sent_bytes"] - wire) < 0.03 * wire for r in replies), [r["app_sent_bytes"] for r in replies]

def test_interrupted_benchmark_leaves_no_namespace_link_or_process(tmp_path):
    """Ctrl-C while the workers run: exit 130, and the namespaces, links and workers are gone. The interrupt is
    sent only once the benchmark has printed its first setting (the network is built) and both workers and the
    delay line run, and there are far more rounds than it could finish meanwhile, so it cannot end on its own."""
    links_before = links_here()
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.allreduce", "--peers", "2", "--size-mb", "1", "--latency", "20ms",
             "--systems", "swarm", "--codec", "int8", "--rounds", "100000", "--json", str(tmp_path / "r.json"),
             "--plot", str(tmp_path / "r.png"), "--log-dir", str(tmp_path)],
            cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True, env=peer_env())
    prefix = f"swb-{proc.pid}-"
    try:
        def pids_inside() -> list[int]:
            mine = [ns for ns in netns_names() if ns.startswith(prefix)]
            return [int(pid) for ns in mine for pid in
                    subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]

        wait_for(lambda: "N=2, +20 ms one way" in out_path.read_text(), 90, "the benchmark's first setting")

        def all_three() -> list[int]:
            pids = pids_inside()
            return pids if len(pids) >= 3 else []

        inside = wait_for(all_three, 40, "the delay line and both workers inside the namespaces")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # the test failed: SIGTERM still removes the namespaces, SIGKILL would leak them
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    assert not {ns for ns in netns_names() if ns.startswith(prefix)}
    assert links_here() == links_before
    assert not [pid for pid in inside if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


@pytest.mark.skipif(shutil.which("iptables") is None, reason="NAT emulation needs iptables (apt-get install iptables)")
def test_a_peer_behind_nat_averages_through_a_public_one(tmp_path):
    """Peer 1 sits behind a home router that drops inbound connections. It learns so from the dial-back test,
    never leads and owns no part of the all-reduce, yet is a member of every group, with identical hashes."""
    with Topology(peers=2, rate_mbit=100, nat=(1,)) as topo:
        logs = [tmp_path / f"peer{i}.log" for i in range(2)]
        metrics = [tmp_path / f"peer{i}.jsonl" for i in range(2)]

        def start(i: int, extra: list[str]):
            with open(logs[i], "w") as log:
                return topo.popen(i, [sys.executable, "-m", "swarm.peer", "--host-maddrs",
                                      f"/ip4/{topo.bind_addr(i)}/tcp/0", "--metrics-file", str(metrics[i]),
                                      "--name", f"peer{i}", "--max-outer-steps", "4", *extra],
                                  stdout=log, stderr=subprocess.STDOUT, env=peer_env(), cwd=ROOT)

        profile = tmp_path / "two.toml"  # round 1 waits for both peers
        profile.write_text(open(f"{ROOT}/peers/tiny.toml").read().replace("[swarm]", "[swarm]\nmin_peers = 2"))
        public = start(0, ["--config", str(profile)])
        address = wait_for(lambda: join_address(logs[0]), 90, "the public peer's join command")
        natted = start(1, ["--initial-peers", address])
        assert natted.wait(timeout=240) == 0, logs[1].read_text()[-3000:]
        assert public.wait(timeout=120) == 0, logs[0].read_text()[-3000:]
    assert "peers cannot dial this peer" in logs[1].read_text()
    assert "this peer can be dialed" not in logs[1].read_text()
    assert f"--initial-peers {address}" in logs[1].read_text()  # it tells others the way in it took, not its own
    events = [outer_by_step(m) for m in metrics]
    shared = sorted(set(events[0]) & set(events[1]))
    assert len(shared) >= 3, shared
    for step in shared:
        assert events[0][step]["group_size"] == events[1][step]["group_size"] == 2
        assert events[0][step]["model_sha256"] == events[1][step]["model_sha256"]
        assert events[1][step]["bytes_sent"] > 0 and events[1][step]["bytes_recv"] > 0
