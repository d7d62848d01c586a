"""One peer of the bootstrap benchmark, run inside its network namespace by bench/bootstrap.py.

    ip netns exec NS python -m bench.bootstrap_worker --role holder|joiner --rank I --addr IP --numel M
        [--hivemind] [--run-id ID] [--timeout-s S]

Driven like bench/allreduce_worker.py: JSON-line commands on stdin, one reply per command on the
stdout the process started with (fd 1 is pointed at stderr so that hivemind and p2pd cannot corrupt
the replies); it says {"loaded": true} once imported.

A holder builds the deterministic DiLoCo state (``make_state``: outer_step, theta_global and momentum
of ``--numel`` fp32 values each), and on {"cmd": "start", "initial_peers": [...]} starts its DHT, a
swarm Node that publishes the state with ``node.hold(*pack_state(run_id, state))`` and, with
``--hivemind``, a stock ``DecentralizedAverager`` over the same two tensors with state sharing on
(``get_current_state`` hands them out). Its reply names its peer id, multiaddrs, manifest and the
sha256 of the payload (theta then momentum, little-endian fp32).

The joiner answers {"cmd": "start", ...} (DHT with every holder as an initial peer, a swarm Node that
only reads, and with ``--hivemind`` an averager with state sharing off), {"cmd": "records"} (the
manifest records it sees in the DHT), {"cmd": "swarm", "holders": [...], "manifest": SHA, "hints":
{...}} (one timed ``swarm.manifest.download``) and {"cmd": "hivemind"} (one timed
``load_state_from_peers``). Both downloads are checked after the clock stops: the state's sha256 is
compared to the holders' (``matches_expected``). ``verified`` says whether the system itself verified
what it delivered: the swarm checks every chunk against its manifest, hivemind checks nothing.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import logging
import os
import time

import torch

from bench.allreduce_worker import Trace, cpu_delta, cpu_seconds, tcp_retransmits, wire_bytes
from bench.worker_loop import run_worker

# hivemind shares tensors between its processes as named files in /dev/shm by default; a process that is
# stopped before it frees them leaves them there (seen: 200 MB per run). File descriptors die with the process.
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

STARTUP_TIMEOUT_S = 60.0
OUTER_STEP = 42


def make_state(numel: int, outer_step: int = OUTER_STEP) -> dict:
    """The DiLoCo state every holder holds: the same values in every process (seeded by the step)."""
    gen = torch.Generator().manual_seed(outer_step)
    return {"outer_step": outer_step, "theta_global": torch.randn(numel, generator=gen),
            "momentum": torch.randn(numel, generator=gen).mul_(0.01)}


def state_sha256(theta: torch.Tensor, momentum: torch.Tensor) -> str:
    """sha256 of theta then momentum as little-endian fp32: the swarm payload's bytes."""
    h = hashlib.sha256()
    for t in (theta, momentum):
        h.update(t.detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False).data)
    return h.hexdigest()


class Peer:
    def __init__(self, args):
        self.args = args
        self.averager = None
        self.node = None
        self.dht = None

    def _start_dht(self, initial_peers: list[str]) -> None:
        from swarm.dht import parse_maddrs, start_dht
        from swarm.identity import load_identity

        self.identity = load_identity(None)
        self.dht = start_dht(parse_maddrs(initial_peers, "initial_peers"),
                             parse_maddrs([f"/ip4/{self.args.addr}/tcp/0"], "host"), [], self.identity)

    def _start_node(self, serve: bool) -> None:
        from swarm.config import SwarmConfig
        from swarm.node import Node

        self.node = Node(self.dht, self.identity)
        self.node.join_run(self.args.run_id, SwarmConfig(allreduce_timeout_s=self.args.timeout_s), serve=serve,
                           reachable="yes")

    def _start_averager(self, tensors: list[torch.Tensor], share: bool) -> None:
        import signal

        import hivemind

        handler = signal.getsignal(signal.SIGINT)
        self.averager = hivemind.DecentralizedAverager(
            tensors, self.dht, prefix=self.args.run_id + "-hivemind", start=True, allow_state_sharing=share,
            target_group_size=2, request_timeout=3.0, next_chunk_timeout=self.args.timeout_s,
            allreduce_timeout=self.args.timeout_s)
        # creating an averager ignores SIGINT (docs/architecture.md, "hivemind pitfalls")
        signal.signal(signal.SIGINT, handler)

    def close(self) -> None:
        if self.averager is not None:
            self.averager.shutdown()
        if self.node is not None:
            self.node.close()
        elif self.dht is not None:
            self.dht.shutdown()


class Holder(Peer):
    def start(self, initial_peers: list[str]) -> dict:
        from swarm.manifest import pack_state

        state = make_state(self.args.numel)
        self._start_dht(initial_peers)
        if self.args.hivemind:  # before the Node's network thread exists: the averager forks
            self._start_averager([state["theta_global"], state["momentum"]], share=True)
        self._start_node(serve=True)
        t0 = time.monotonic()
        manifest, payload = pack_state(self.args.run_id, state)
        pack_s = time.monotonic() - t0
        self.node.hold(manifest, payload)
        self.node.flush_status()
        return {"peer_id": self.node.peer_id, "maddrs": [str(m) for m in self.dht.get_visible_maddrs()],
                "manifest": manifest.sha256, "chunks": len(manifest.chunk_sha256), "size": manifest.size,
                "state_sha256": hashlib.sha256(payload).hexdigest(), "pack_s": round(pack_s, 3)}


class Joiner(Peer):
    def start(self, initial_peers: list[str]) -> dict:
        self._start_dht(initial_peers)
        if self.args.hivemind:  # its own tensors are never shared or read: a placeholder will do
            self._start_averager([torch.zeros(1)], share=False)
        self._start_node(serve=False)
        return {"peer_id": self.node.peer_id, "maddrs": [str(m) for m in self.dht.get_visible_maddrs()]}

    def records(self, holders: int) -> dict:
        """Wait until ``holders`` peers announce the state; the one the swarm's adoption rules would pick."""
        from swarm.adoption import Adoption, held_state

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            live = self.node.live_peers(fresh=True)
            records = [p for p, r in live.items() if held_state(r) is not None]
            if len(records) >= holders or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        chosen = Adoption(self.args.run_id, self.args.numel, self.node.peer_id).candidates(live, -1, "")
        return {"records": len(records), "manifest": chosen[0].manifest if chosen else None,
                "holders": list(chosen[0].holders) if chosen else []}

    def _measure(self, fetch) -> dict:
        """Run ``fetch`` (returns theta, momentum, extra fields) with eth0, CPU and TCP counters around it.

        A download that fails is a result, not a crash: ``ok`` false, ``problem`` says why, ``seconds`` is the
        time it took to fail."""
        gc.collect()
        rx, cpu, retrans = wire_bytes()[1], cpu_seconds(), tcp_retransmits()
        problem, theta, momentum, extra = None, None, None, {}
        with Trace(self.args.trace_ms / 1e3) as trace:
            t0, t0_unix = time.monotonic(), time.time()
            try:
                theta, momentum, extra = fetch()
            except Exception as e:
                logging.exception("download failed")
                problem = f"{type(e).__name__}: {e}"[:300]
            seconds = time.monotonic() - t0
        reply = {"ok": problem is None, "problem": problem, "seconds": seconds, "rx_bytes": wire_bytes()[1] - rx,
                 "cpu_s": cpu_delta(cpu), "retransmits": tcp_retransmits() - retrans, "trace": trace.samples,
                 "t0_unix": t0_unix, "verified": False, "sources": 0, **extra}
        t1 = time.monotonic()  # after the clock: our own check of what was delivered
        reply["state_sha256"] = state_sha256(theta, momentum) if theta is not None else None
        reply["check_s"] = round(time.monotonic() - t1, 3)
        return reply

    def swarm(self, holders: list[str], manifest: str, hints: dict[str, list[str]]) -> dict:
        from swarm import caps
        from swarm.manifest import download

        def fetch():
            got, state, stats = self.node.call(download(self.node.p2p, holders, manifest, self.args.run_id,
                                                        self.args.numel, self.args.timeout_s, caps.CEILING_S,
                                                        hints=hints), timeout_s=None)
            # download() raises unless every chunk matched the manifest and theta its model_sha256
            return state["theta_global"], state["momentum"], {
                "verified": got.sha256 == manifest, "sources": stats.sources, "bytes": stats.bytes,
                "download_s": stats.seconds, "outer_step": state["outer_step"]}

        return self._measure(fetch)

    def hivemind(self, holders: int) -> dict:
        key = f"{self.averager.prefix}.all_averagers"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:  # the holder declares itself in the DHT a moment after it starts
            found = self.dht.get(key, latest=True)
            sharing = [k for k, v in (found.value.items() if found and isinstance(found.value, dict) else [])
                       if v.value is not None]
            if len(sharing) >= holders or time.monotonic() > deadline:
                break
            time.sleep(0.2)

        def fetch():
            loaded = self.averager.load_state_from_peers(timeout=self.args.timeout_s)
            if loaded is None:  # its log says why (it logs and moves on to the next peer)
                raise RuntimeError("load_state_from_peers returned None: no peer delivered a state")
            _, tensors = loaded
            if len(tensors) != 2:
                raise RuntimeError(f"load_state_from_peers returned {len(tensors)} tensors, not 2")
            # hivemind checks nothing: its result is whatever the one peer it chose streamed
            return tensors[0], tensors[1], {"verified": False, "sources": 1, "bytes": None, "download_s": None,
                                            "sharing_peers": len(sharing)}

        return self._measure(fetch)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bootstrap_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("holder", "joiner"), required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--addr", required=True, help="this namespace's IPv4 address")
    parser.add_argument("--numel", type=int, required=True, help="fp32 values in theta_global (and in momentum)")
    parser.add_argument("--hivemind", action="store_true", help="also start a stock DecentralizedAverager")
    parser.add_argument("--run-id", default="bootstrap-bench")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--trace-ms", type=float, default=20.0, help="sample eth0's counters this often (0: off)")
    args = parser.parse_args()

    run_worker(lambda: (Holder if args.role == "holder" else Joiner)(args), 1)


if __name__ == "__main__":
    main()
