"""The peer's network side: its DHT, a replica of the DHT's p2pd, and an asyncio loop on a thread.

The training loop stays plain synchronous torch on the main thread; it calls into this thread for
the few network operations of an outer step (each with a cap, swarm.caps), while the loop keeps
serving other peers (join, all-reduce parts, state downloads, reachability checks) and refreshing
our liveness record (swarm.liveness). Status updates from the training thread never wait for the
network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable, Coroutine

import hivemind
import torch
import uvloop
from multiaddr import Multiaddr

from swarm import caps
from swarm.adoption import Adoption, Candidate
from swarm.averaging import Averager, AverageResult
from swarm.config import ConfigError, RunConfig, SwarmConfig
from swarm.dht import DHT_TIMEOUT_S, SwarmDHT
from swarm.identity import Identity
from swarm.liveness import Liveness
from swarm.manifest import ChunkServer, DownloadStats, Manifest, download
from swarm.metrics import human_bytes
from swarm.progress import Progress
from swarm.reachability import check_reachable, serve_dialback

log = logging.getLogger("swarm")

CALL_TIMEOUT_S = 3 * DHT_TIMEOUT_S  # network calls that are not transfers: a few DHT requests at most
FAREWELL_S = 2.0  # leaving: one DHT store, best effort (the record expires anyway within 3 heartbeats)


class Node:
    def __init__(self, dht: hivemind.DHT, identity: Identity | None = None):
        """``identity``: the one ``dht`` was started with; without it the node only reads (tools, not members)."""
        self.dht, self.identity = dht, identity
        self.peer_id = dht.peer_id.to_base58()
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarm-network", daemon=True)
        self._thread.start()
        self.p2p = self.call(dht.replicate_p2p())
        self.liveness: Liveness | None = None
        self.averager: Averager | None = None
        self.reachable = True
        self.outer_step_held, self.model_held = 0, ""  # the outer step and model_sha256 of the state we serve

    def join_run(self, run_id: str, cfg: SwarmConfig, serve: bool = True, adoption: Adoption | None = None,
                 reachable: str = "yes", ask: list[str] = ()) -> None:
        """Serve this run's protocols (join, all-reduce, chunks, reachability checks) and publish our liveness
        record; with ``serve=False`` only read the run's records and download from it (a tool, not a member).

        ``reachable``: "yes", "no", or "auto" (ask the peers ``ask``, by peer id, to dial us back)."""
        self.cfg = cfg
        self.sdht = SwarmDHT(self.dht, run_id, self.identity, cfg.dht_timeout_s)
        self.liveness = Liveness(self.sdht, cfg.heartbeat_s, self._loop)
        if not serve:
            return
        if self.identity is None:
            raise ValueError("a node without an identity cannot serve a run")
        self._refuse_duplicate_identity()
        maddrs = [str(m) for m in self.call(self.p2p.get_visible_maddrs())]
        if reachable == "auto":
            self.reachable = self.call(check_reachable(self.p2p, ask, maddrs, self.sdht.addresses),
                                       timeout_s=CALL_TIMEOUT_S)
        else:
            self.reachable = reachable == "yes"
        # our addresses travel in our liveness record: peers whose libp2p cannot find us still can dial
        self.liveness.update(maddrs=maddrs[:4], reachable=self.reachable)
        swarm_is_past = (lambda k, live: adoption.swarm_is_past(k, live, self.outer_step_held, self.model_held)) \
            if adoption else (lambda k, live: None)
        self.averager = Averager(self.p2p, self.liveness, self.peer_id, cfg, swarm_is_past)
        self.averager.matchmaker.reachable = self.reachable
        self.chunk_server = ChunkServer(self.p2p, cfg.allreduce_timeout_s)
        self.call(self.averager.start())
        self.call(self.chunk_server.start())
        self.call(self.p2p.add_binary_stream_handler("swarm.dialback", serve_dialback))
        self.call(self._start_liveness())

    def keep_config(self, cfg: RunConfig) -> None:
        """Keep the run's config in the DHT, in the background, for as long as we are in the run (the task ends
        with the network loop)."""
        asyncio.run_coroutine_threadsafe(self.sdht.keep_config(cfg), self._loop)

    def _refuse_duplicate_identity(self) -> None:
        """ConfigError if another live process heartbeats under our identity (a key file copied to two machines).
        A record of ours that stops changing is a previous run of this peer that crashed: that is fine."""
        first = self.call(self.sdht.live_peers()).get(self.peer_id)
        if first is None:
            return
        time.sleep(1.5 * self.cfg.heartbeat_s)
        again = self.call(self.sdht.live_peers()).get(self.peer_id)
        if again is not None and again.get("t") != first.get("t"):
            raise ConfigError(f"another live peer uses this identity ({self.peer_id[-8:]}, as "
                              f"{str(again.get('name', '?'))[:40]!r}): two peers cannot share one; give each its "
                              f"own --identity")

    async def _start_liveness(self) -> None:
        self.liveness.start()

    def call(self, coro: Coroutine, timeout_s: float | None = CALL_TIMEOUT_S) -> Any:
        """Run a coroutine on the network thread and wait for its result, at most ``timeout_s`` (TimeoutError,
        and the coroutine is cancelled)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"a network operation took longer than {timeout_s:.0f} s") from None

    def update_status(self, **fields: Any) -> None:
        """Change what our liveness record says; it is published in the background (never blocks)."""
        if self.liveness is not None and self.identity is not None:
            self.liveness.update(**fields)

    def flush_status(self) -> None:
        """Store our liveness record now and wait for it (tests, and before anyone must see it)."""
        self.call(self.sdht.heartbeat(self.liveness.record(), self.liveness.ttl_s))

    def training(self, k: int) -> None:
        """We train round k now: joins for it are acknowledged, and our record says so."""
        self._loop.call_soon_threadsafe(self.averager.matchmaker.training, k)

    def average(self, outer_step: int, delta: torch.Tensor, weight: float, base: str,
                loss: float = 0.0) -> AverageResult:
        """The round's all-reduce (swarm.averaging); the averager caps it itself, this call only adds a margin."""
        cap = caps.round_s(self.cfg, self.averager.codec.size(delta.numel())) + 10
        return self.call(self.averager.average(outer_step, delta, weight, base, loss), timeout_s=cap)

    def live_peers(self, fresh: bool = False) -> dict[str, dict]:
        """Other live peers' records: the heartbeat's view, or read from the DHT now (``fresh``)."""
        if fresh or self.liveness.refreshed_at == 0:
            return dict(self.call(self.liveness.refresh()))
        return dict(self.liveness.peers)

    def mark_held(self, outer_step: int, model_sha256: str) -> None:
        """The state we hold now (the holder announces it a moment later): what stale-round checks compare with."""
        self.outer_step_held, self.model_held = outer_step, model_sha256

    def hold(self, manifest: Manifest, payload, current: Callable[[], bool] | None = None) -> None:
        """Serve this state and announce it in our liveness record (called from the holder thread)."""
        self.outer_step_held, self.model_held = manifest.outer_step, manifest.model_sha256
        held = {"outer_step": manifest.outer_step, "manifest": manifest.sha256,
                "model_sha256": manifest.model_sha256, "size": manifest.size}

        async def hold_and_announce():
            self.chunk_server.hold(manifest, payload, current)
            self.liveness.update(held=held)

        self.call(hold_and_announce())

    def download(self, candidate: Candidate, run_id: str, numel: int,
                 local: tuple[Manifest, bytes] | None = None) -> tuple[Manifest, dict, DownloadStats]:
        """Download and verify ``candidate`` from its holders; chunks equal to those of ``local`` (manifest,
        payload) are reused. DownloadError (with the holders to blame) if it cannot be had or does not fit."""
        local_manifest, local_payload = local if local else (None, None)
        cap = caps.download_s(self.cfg, 8 * numel)
        progress = Progress(f"downloading outer step {candidate.outer_step} from {len(candidate.holders)} peers",
                            None, _describe_download, unit="B", unit_scale=True)
        try:
            return self.call(download(self.p2p, list(candidate.holders), candidate.manifest, run_id, numel,
                                      self.cfg.allreduce_timeout_s, cap, local_payload=local_payload,
                                      local_manifest=local_manifest, hints=self.sdht.addresses,
                                      progress=progress.update), timeout_s=cap + 10)
        finally:
            progress.close()

    def close(self) -> None:
        if not self._thread.is_alive():
            return  # closed already
        # A signal to our whole process group (kill -- -PGID, a service manager) stops the DHT process with us:
        # then no farewell can be stored, and waiting for one only delays the exit
        if self.liveness is not None and self.identity is not None and self.dht.is_alive():
            try:  # tell the swarm at once instead of letting the record expire
                self.call(self.liveness.stop(), timeout_s=FAREWELL_S)
                self.call(self.liveness.farewell(), timeout_s=FAREWELL_S)
            except Exception as e:
                log.debug("farewell record not stored: %s", e)
        try:
            self.call(self._shutdown_loop(), timeout_s=5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self.dht.shutdown()

    async def _shutdown_loop(self) -> None:
        """Cancel whatever is in flight first (threads waiting on it get CancelledError), then the p2p client."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait_for(self.p2p.shutdown(), 3)


def _describe_download(done: int, total: int, rate: float) -> str:
    return f"{human_bytes(done)} of {human_bytes(total)}, {human_bytes(rate)}/s, {(total - done) / max(rate, 1.0):.0f} s left"


def maddr_peer_ids(maddrs: list[Multiaddr]) -> list[str]:
    """The peer ids at the end of multiaddrs (``.../p2p/<id>``), in order, without repeats."""
    out = []
    for m in maddrs:
        try:
            pid = m.value_for_protocol("p2p")
        except Exception:
            continue
        if pid and pid not in out:
            out.append(pid)
    return out
