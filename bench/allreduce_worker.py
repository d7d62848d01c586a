"""One peer of the WAN all-reduce benchmark, run inside its network namespace by bench/allreduce.py.

    ip netns exec NS python -m bench.allreduce_worker --system swarm|gloo|hivemind --rank I --peers N
        --addr IP --numel M --expect C [--codec int8|int4|fp32] [--weight W] [--master IP:PORT]

The driver speaks to it in JSON lines: commands on stdin, one reply per command on the stdout the
process started with (fd 1 is pointed at stderr, so whatever hivemind or p2pd print cannot corrupt
the replies). It says {"loaded": true} once imported, then answers
{"cmd": "start", "initial_peers": [...]} (DHT and averager up, or gloo's rendezvous; replies with
its multiaddrs), {"cmd": "sync"} (waits until the whole group is live), {"cmd": "prepare", "k": K}
(the "training" part of round K: publish our status, reset tensors), {"cmd": "run", "k": K} (one
timed all-reduce) and {"cmd": "quit"}.

Why the driver starts DHTs one at a time, each with every earlier peer as an initial peer: p2pd's
libp2p DHT files 198.18.0.0/15 (benchmark space) as neither public nor private and never hands
those addresses out, so peers that bootstrap from rank 0 alone cannot dial each other ("routing:
not found"). On the real WAN public addresses resolve; here every peer dials every earlier one.

Every peer contributes ``(rank + 1) * pattern`` where pattern[j] = (37 j mod 255) - 127: integers
with an absmax of 127 in every 1024-block, so the int8 codec is exact on them and the driver can
pass ``--expect C`` (the weighted mean of the multipliers) to check the result value by value.
A codec that cannot be exact (int4) gets a Gaussian payload instead, ``gaussian(numel, rank)``, and the
driver checks the result against the mean it computes offline from the same messages.
Wire bytes come from eth0's counters: everything the peer really sent and received, headers
included.
"""

from __future__ import annotations

import abc
import argparse
import hashlib
import os
import threading
import time

import torch

from bench.netns import link_bytes
from bench.worker_loop import run_worker

STARTUP_TIMEOUT_S = 60.0


OFFLINE_CHECKED = ("int4",)  # codecs whose result is checked against an offline mean, on a Gaussian payload
INT4_BLOCK = 128  # values per scale for int4, as the README recommends (the int8 default of 1024 is coarse for it)


def swarm_config(codec: str, **overrides):
    """The SwarmConfig every swarm worker averages with, and the driver's offline check reproduces."""
    from swarm.config import SwarmConfig

    return SwarmConfig(codec=codec, **({"block_size": INT4_BLOCK} if codec == "int4" else {}), **overrides)


def pattern(numel: int) -> torch.Tensor:
    return ((torch.arange(numel, dtype=torch.int64) * 37) % 255 - 127).to(torch.float32)


def gaussian(numel: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s payload for a lossy codec: a Gaussian vector, so no ties or exact grids flatter the
    codec's error; the driver draws the same one from the same seed."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(rank), dtype=torch.float32)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by this process (all threads) and by our processes below it, by name."""
    import psutil

    me = psutil.Process()
    used = {"python": sum(me.cpu_times()[:2])}
    for child in me.children(recursive=True):
        try:
            name = "p2pd" if child.name() == "p2pd" else "python"
            used[name] = used.get(name, 0.0) + sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return used


def cpu_delta(before: dict[str, float]) -> dict[str, float]:
    return {name: round(s - before.get(name, 0.0), 3) for name, s in cpu_seconds().items()}


def tcp_retransmits() -> int:
    """Segments this namespace's TCP has retransmitted so far (/proc/net/snmp is per namespace)."""
    lines = [line.split() for line in open("/proc/net/snmp") if line.startswith("Tcp:")]
    return int(lines[1][lines[0].index("RetransSegs")])


def wire_bytes() -> tuple[int, int]:
    """(tx, rx) bytes through this namespace's eth0 so far."""
    with open("/proc/net/dev") as f:
        return link_bytes(f.read())


def settled_wire_bytes(quiet_s: float = 0.05, max_s: float = 2.0) -> tuple[int, int]:
    """wire_bytes() once the link has gone quiet: when an all-reduce returns, the last bytes our p2pd was
    handed may still be on their way out."""
    deadline, last = time.monotonic() + max_s, wire_bytes()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = wire_bytes()
        if now == last:
            break
        last = now
    return last


class Trace:
    """Samples eth0's byte counters every ``period_s`` on a thread, to show where a link sat idle."""

    def __init__(self, period_s: float):
        self.period_s, self.samples, self._stop = period_s, [], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "Trace":
        if self.period_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.period_s > 0:
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.period_s if self.samples else 0):
            self.samples.append([round(time.time(), 4), *wire_bytes()])


class Peer(abc.ABC):
    """The common part: the contributed tensor, the expected result, and the checks on it."""

    def __init__(self, args):
        self.args = args
        self.offline = args.codec in OFFLINE_CHECKED
        self.delta = gaussian(args.numel, args.rank) if self.offline else pattern(args.numel).mul_(args.rank + 1)
        self.expected_scale = args.expect

    def check(self, average: torch.Tensor) -> dict:
        """The result's hash; its largest error against the known mean, unless the driver checks it offline."""
        error = None if self.offline else \
            (average - pattern(average.numel()).mul_(self.expected_scale)).abs().max().item()
        return {"max_abs_err": error, "head": average[:4].tolist(),
                "result_sha256": hashlib.sha256(average.numpy().tobytes()).hexdigest()}

    @abc.abstractmethod
    def start(self, initial_peers: list[str]) -> dict:
        """Start this system's networking, given the earlier peers' addresses."""

    def sync(self) -> dict:
        return {}

    def prepare(self, k: int) -> dict:
        return {}

    def close(self) -> None:
        pass


class SwarmPeer(Peer):
    """swarm.node.Node over a hivemind.DHT on this namespace's address: matchmaking included."""

    def start(self, initial_peers: list[str]) -> dict:
        from swarm.dht import parse_maddrs, start_dht
        from swarm.identity import load_identity
        from swarm.node import Node

        identity = load_identity(None)
        self.dht = start_dht(parse_maddrs(initial_peers, "initial_peers"),
                             parse_maddrs([f"/ip4/{self.args.addr}/tcp/0"], "host"), [], identity)
        self.node = Node(self.dht, identity)
        cfg = swarm_config(self.args.codec, allreduce_timeout_s=self.args.timeout_s)
        self.node.join_run(self.args.run_id, cfg, reachable="yes")
        return {"maddrs": [str(m) for m in self.dht.get_visible_maddrs()]}

    def sync(self) -> dict:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while len(self.node.live_peers(fresh=True)) + 1 < self.args.peers:  # the others, and ourselves
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.node.live_peers()) + 1} of {self.args.peers} peers live")
            time.sleep(0.2)
        return {"p2p_peers": len(self.node.call(self.node.p2p.list_peers()))}

    def prepare(self, k: int) -> dict:
        self.node.update_status(round=k, training=k, state="training")
        self.node.training(k)
        self.node.flush_status()
        return {}

    def run(self, k: int) -> dict:
        tx, rx, cpu, retrans = *wire_bytes(), cpu_seconds(), tcp_retransmits()
        with Trace(self.args.trace_ms / 1e3) as trace:
            result = self.node.average(k, self.delta.clone(), self.args.weight, base="x" * 64)
        tx2, rx2 = settled_wire_bytes()
        return {"cpu_s": cpu_delta(cpu), "retransmits": tcp_retransmits() - retrans, "trace": trace.samples, "allreduce_s": result.allreduce_s, "matchmaking_s": result.matchmaking_s,
                "group_size": len(result.group.members), "tx_bytes": tx2 - tx, "rx_bytes": rx2 - rx,
                "app_sent_bytes": result.bytes_sent, "app_recv_bytes": result.bytes_recv,
                "average_sha256": result.average_sha256, "peer_id": self.node.peer_id,
                "owners": list(result.group.owners), "members": list(result.group.members),
                "weights": list(result.group.weights), **self.check(result.average)}

    def close(self) -> None:
        self.node.close()


class GlooPeer(Peer):
    """torch.distributed gloo all_reduce (sum) of the fp32 tensor; a barrier lines the peers up first."""

    def start(self, initial_peers: list[str]) -> dict:
        import datetime

        import torch.distributed as dist

        os.environ["GLOO_SOCKET_IFNAME"] = "eth0"  # otherwise gloo binds loopback and cannot reach peers
        self.dist = dist
        dist.init_process_group("gloo", init_method=f"tcp://{self.args.master}", rank=self.args.rank,
                                world_size=self.args.peers, timeout=datetime.timedelta(seconds=self.args.timeout_s))
        self.tensor = torch.empty_like(self.delta)
        return {"maddrs": []}

    def prepare(self, k: int) -> dict:
        self.tensor.copy_(self.delta)
        return {}

    def run(self, k: int) -> dict:
        self.dist.barrier()
        tx, rx, cpu, retrans = *wire_bytes(), cpu_seconds(), tcp_retransmits()
        with Trace(self.args.trace_ms / 1e3) as trace:
            t0 = time.monotonic()
            self.dist.all_reduce(self.tensor)
            seconds = time.monotonic() - t0
        tx2, rx2 = settled_wire_bytes()
        return {"cpu_s": cpu_delta(cpu), "retransmits": tcp_retransmits() - retrans, "trace": trace.samples, "allreduce_s": seconds, "matchmaking_s": None, "group_size": self.args.peers,
                "tx_bytes": tx2 - tx, "rx_bytes": rx2 - rx, **self.check(self.tensor)}

    def close(self) -> None:
        self.dist.destroy_process_group()


class HivemindPeer(Peer):
    """Stock hivemind DecentralizedAverager, no compression. target_group_size=N with min_group_size=2:
    min == target can livelock (docs/architecture.md, "hivemind pitfalls"), so the group sizes it really got
    are reported.
    The step is split at its trigger, so matchmaking and all-reduce are timed apart."""

    def start(self, initial_peers: list[str]) -> dict:
        import hivemind

        args = self.args
        self.dht = hivemind.DHT(initial_peers=initial_peers, start=True, host_maddrs=[f"/ip4/{args.addr}/tcp/0"])
        self.averager = hivemind.DecentralizedAverager(
            [torch.zeros_like(self.delta)], self.dht, start=True, prefix=args.run_id,
            target_group_size=args.peers, min_group_size=2, min_matchmaking_time=args.hivemind_matchmaking_s,
            request_timeout=3.0, allreduce_timeout=args.timeout_s, next_chunk_timeout=args.timeout_s)
        return {"maddrs": [str(m) for m in self.dht.get_visible_maddrs()]}

    def prepare(self, k: int) -> dict:
        with self.averager.get_tensors() as tensors:
            tensors[0].copy_(self.delta)
        return {}

    def run(self, k: int) -> dict:
        from hivemind.averaging.control import AveragingStage

        tx, rx, cpu, retrans = *wire_bytes(), cpu_seconds(), tcp_retransmits()
        t0 = time.monotonic()
        control = self.averager.step(weight=self.args.weight, timeout=self.args.timeout_s, require_trigger=True,
                                     wait=False)
        deadline = t0 + self.args.timeout_s
        while control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP) and not control.done():
            if time.monotonic() > deadline:
                break
            time.sleep(0.002)
        t1 = time.monotonic()
        control.allow_allreduce()
        try:
            gathered = control.result(timeout=self.args.timeout_s)
        except Exception as e:  # no group, a failed round: reported, not fatal to the benchmark
            gathered, error = None, f"{type(e).__name__}: {e}"
        else:
            error = None
        t2 = time.monotonic()
        tx2, rx2 = settled_wire_bytes()
        with self.averager.get_tensors() as tensors:
            checked = self.check(tensors[0])
        return {"cpu_s": cpu_delta(cpu), "retransmits": tcp_retransmits() - retrans, "allreduce_s": t2 - t1, "matchmaking_s": t1 - t0, "group_size": len(gathered or {}),
                "tx_bytes": tx2 - tx, "rx_bytes": rx2 - rx, "step_error": error, **checked}

    def close(self) -> None:
        self.averager.shutdown()
        self.dht.shutdown()


SYSTEMS = {"swarm": SwarmPeer, "gloo": GlooPeer, "hivemind": HivemindPeer}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.allreduce_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=sorted(SYSTEMS), required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--addr", required=True, help="this namespace's IPv4 address")
    parser.add_argument("--numel", type=int, required=True, help="fp32 values in the averaged vector")
    parser.add_argument("--codec", default="fp32", choices=("int8", "int4", "fp32"))
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--expect", type=float, required=True, help="the result is expect * pattern")
    parser.add_argument("--master", default=None, help="IP:PORT of rank 0's rendezvous (gloo)")
    parser.add_argument("--run-id", default="bench")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--hivemind-matchmaking-s", type=float, default=5.0)
    parser.add_argument("--trace-ms", type=float, default=0.0, help="sample eth0's counters this often (0: off)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()

    run_worker(lambda: SYSTEMS[args.system](args), args.threads)


if __name__ == "__main__":
    main()
