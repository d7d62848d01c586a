"""The peer's network side: its DHT, a replica of the DHT's p2pd, and an asyncio loop on a thread.

The training loop stays plain synchronous torch on the main thread; it calls into this
thread for the few network operations of an outer step, while the loop keeps serving
other peers (join, all-reduce parts, state downloads) and refreshing our liveness record.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable, Coroutine

import hivemind
import torch
import uvloop

from swarm.averaging import Averager, AverageResult
from swarm.config import SwarmConfig
from swarm.dht import SwarmDHT
from swarm.state_transfer import StateServer, fetch_state

log = logging.getLogger("swarm")


class Node:
    def __init__(self, dht: hivemind.DHT):
        self.dht = dht
        self.peer_id = dht.peer_id.to_base58()
        self.status: dict[str, Any] = {"round": 1, "state": "starting"}
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarm-network", daemon=True)
        self._thread.start()
        self.p2p = self.call(dht.replicate_p2p())
        self._heartbeat_task = None

    def join_run(self, run_id: str, cfg: SwarmConfig, snapshot: Callable[[], dict]) -> None:
        """Serve this run's protocols (join, all-reduce, state) and start publishing our liveness record."""
        self.cfg = cfg
        self.sdht = SwarmDHT(self.dht, run_id)
        self.averager = Averager(self.p2p, self.sdht, self.peer_id, cfg)
        self.state_server = StateServer(self.p2p, snapshot, cfg.allreduce_timeout_s)
        self.call(self.averager.start())
        self.call(self.state_server.start())
        self._heartbeat_task = asyncio.run_coroutine_threadsafe(self._heartbeat(), self._loop)

    def call(self, coro: Coroutine, timeout_s: float | None = None) -> Any:
        """Run a coroutine on the network thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def set_status(self, **fields: Any) -> None:
        """Update what our liveness record says; published now and at every heartbeat."""
        self.status.update(fields)
        self.call(self.sdht.heartbeat(self.peer_id, dict(self.status), self._ttl_s))

    @property
    def _ttl_s(self) -> float:
        return 3 * self.cfg.heartbeat_s

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.sdht.heartbeat(self.peer_id, dict(self.status), self._ttl_s)
            except Exception as e:  # a DHT hiccup must not stop the heartbeat
                log.debug("heartbeat failed: %s", e)
            await asyncio.sleep(self.cfg.heartbeat_s)

    def average(self, outer_step: int, delta: torch.Tensor, weight: float, base: str) -> AverageResult:
        return self.call(self.averager.average(outer_step, delta, weight, base))

    def live_peers(self) -> dict[str, dict]:
        return self.call(self.sdht.live_peers())

    def fetch_state_from_swarm(self, numel: int, newer_than: int) -> tuple[dict, int, float, str] | None:
        """Download a verified θ_global newer than ``newer_than`` outer steps from the most advanced live peer."""
        live = self.live_peers()
        holders = sorted((rec["round"] - 1, p) for p, rec in live.items()
                         if p != self.peer_id and rec["round"] - 1 > newer_than)
        for _, holder in reversed(holders):
            try:
                state, size, seconds = self.call(fetch_state(self.p2p, holder, numel, self.cfg.allreduce_timeout_s))
                return state, size, seconds, holder
            except Exception as e:
                log.warning("state download from %s failed: %s", holder[-6:], e)
        return None

    def close(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            try:  # tell the swarm at once instead of letting the record expire
                self.status["state"] = "left"
                self.call(self.sdht.heartbeat(self.peer_id, dict(self.status), self.cfg.heartbeat_s), timeout_s=5)
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
        await self.p2p.shutdown()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
