"""The peer's network side: its DHT, a replica of the DHT's p2pd, and an asyncio loop on a thread.

The training loop stays plain synchronous torch on the main thread; it calls into this
thread for the few network operations of an outer step, while the loop keeps serving
other peers (join, all-reduce parts, state downloads) and refreshing our liveness record.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Coroutine

import hivemind
import torch
import uvloop

from swarm.averaging import Averager, AverageResult
from swarm.config import SwarmConfig
from swarm.dht import SwarmDHT
from swarm.identity import Identity
from swarm.manifest import ChunkServer, DownloadStats, Manifest, choose_manifest, download
from swarm.metrics import human_bytes
from swarm.progress import Progress

log = logging.getLogger("swarm")


class Node:
    def __init__(self, dht: hivemind.DHT, identity: Identity | None = None):
        """``identity``: the one ``dht`` was started with; without it the node only reads (tools, not members)."""
        self.dht, self.identity = dht, identity
        self.peer_id = dht.peer_id.to_base58()
        self.status: dict[str, Any] = {"round": 1, "state": "starting"}
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarm-network", daemon=True)
        self._thread.start()
        self.p2p = self.call(dht.replicate_p2p())
        self._heartbeat_task = None
        self.manifest_record: dict | None = None  # what we hold, re-announced with every heartbeat

    def join_run(self, run_id: str, cfg: SwarmConfig, serve: bool = True) -> None:
        """Serve this run's protocols (join, all-reduce, chunks) and publish our liveness record; with
        ``serve=False`` only read the run's records and download from it (a tool, not a member)."""
        self.cfg = cfg
        self.sdht = SwarmDHT(self.dht, run_id, self.identity)
        if not serve:
            return
        # our addresses travel in our liveness record: peers whose libp2p cannot find us still can dial
        self.status["maddrs"] = [str(m) for m in self.call(self.p2p.get_visible_maddrs())][:4]
        self.averager = Averager(self.p2p, self.sdht, self.peer_id, cfg)
        self.chunk_server = ChunkServer(self.p2p, cfg.allreduce_timeout_s)
        self.call(self.averager.start())
        self.call(self.chunk_server.start())
        self._heartbeat_task = asyncio.run_coroutine_threadsafe(self._heartbeat(), self._loop)

    def call(self, coro: Coroutine, timeout_s: float | None = None) -> Any:
        """Run a coroutine on the network thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def set_status(self, **fields: Any) -> None:
        """Update what our liveness record says; published now and at every heartbeat."""
        self.status.update(fields)
        self.call(self.sdht.heartbeat(self._record(), self._ttl_s))

    def _record(self) -> dict:
        return {**self.status, "t": round(time.time(), 1)}

    @property
    def _ttl_s(self) -> float:
        return 3 * self.cfg.heartbeat_s

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.sdht.heartbeat(self._record(), self._ttl_s)
                if self.manifest_record is not None:
                    await self.sdht.publish_manifest(self.manifest_record, self._ttl_s)
            except Exception as e:  # a DHT hiccup must not stop the heartbeat
                log.debug("heartbeat failed: %s", e)
            await asyncio.sleep(self.cfg.heartbeat_s)

    def average(self, outer_step: int, delta: torch.Tensor, weight: float, base: str) -> AverageResult:
        return self.call(self.averager.average(outer_step, delta, weight, base))

    def live_peers(self) -> dict[str, dict]:
        return self.call(self.sdht.live_peers())

    def publish(self, manifest: Manifest, payload: bytes) -> None:
        """Serve this state and announce it under ``<run>/manifest`` (called from the holder thread)."""
        record = {"peer": self.peer_id, "outer_step": manifest.outer_step, "manifest": manifest.sha256,
                  "model_sha256": manifest.model_sha256, "size": manifest.size}

        async def hold_and_announce():
            self.chunk_server.hold(manifest, payload)
            self.manifest_record = record
            await self.sdht.publish_manifest(record, self._ttl_s)

        self.call(hold_and_announce(), timeout_s=30)

    def fetch_state_from_swarm(self, newer_than: int, local: tuple[Manifest, bytes] | None = None
                               ) -> tuple[Manifest, dict, DownloadStats] | None:
        """Download and verify the newest state the swarm holds if it is newer than ``newer_than`` outer steps;
        chunks equal to those of ``local`` (manifest, payload) are reused instead of fetched."""
        for _ in range(4):  # holders publish a few ms apart after each step: let the newest one settle
            records = self.call(self.sdht.manifests())
            chosen = choose_manifest(records)
            if chosen is None or len(chosen[1]) == len(records):
                break
            time.sleep(0.5)
        if chosen is None or chosen[0]["outer_step"] <= newer_than:
            return None
        record, holders = chosen
        # tell the swarm at once which round we will join, so its groups wait for us while we download
        self.set_status(round=record["outer_step"] + 1, training=record["outer_step"] + 1, state="syncing")
        local_manifest, local_payload = local if local else (None, None)
        self.live_peers()  # refreshes the holders' address hints
        progress = Progress(f"downloading outer step {record['outer_step']} from {len(holders)} peers", None,
                            _describe_download, unit="B", unit_scale=True)
        try:
            return self.call(download(self.p2p, holders, record["manifest"], self.cfg.allreduce_timeout_s,
                                      local_payload=local_payload, local_manifest=local_manifest,
                                      hints=self.sdht.addresses, progress=progress.update))
        finally:
            progress.close()

    def close(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            try:  # tell the swarm at once instead of letting the record expire; the DHT keeps the value that
                # expires last, so the farewell must outlive the last heartbeat
                self.status["state"] = "left"
                self.call(self.sdht.heartbeat(self._record(), self._ttl_s + 1), timeout_s=2)
            except Exception:
                pass
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
