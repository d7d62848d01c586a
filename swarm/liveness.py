"""Our liveness record and everyone else's: one DHT write and one read per heartbeat, never on the training thread.

The record (``<run>/peers``, signed, expiring after three heartbeats) says which round a peer is in,
whether others can dial it, what state it holds for joiners, and its contribution counters. The
training thread only updates fields (``update``), which wakes the heartbeat at once; the store is
fire-and-forget, retried at the next heartbeat if the DHT does not answer. Matchmaking, resync and
the dashboard read ``view``, which the heartbeat refreshes, instead of asking the DHT themselves:
the DHT load of a peer stays one store and one read per heartbeat, whatever the swarm's size.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import threading
import time
from typing import Any

from swarm.dht import SwarmDHT

log = logging.getLogger("swarm")

URGENT = ("round", "training", "state", "held", "reachable", "maddrs")  # fields others act on


def _seen_within(record: dict, now: float, ttl_s: float) -> bool:
    t = record.get("t")
    return isinstance(t, (int, float)) and now - t < ttl_s


def round_progress(records: dict[str, dict], k: int, inner_steps: int, now: float, ttl_s: float) -> int:
    """How many of round k's H inner steps the swarm has taken: the median over the live records of the peers
    that train round k (one already averaging it has taken all H), each projected from its record's time by its
    own pace (``inner`` and ``step_s``, published every heartbeat). A peer that adopts the swarm's state skips as
    many, so that it averages in round k's group. Fields of the wrong type or range are ignored, and a few
    liars move a median no further than the honest records reach."""
    estimates = []
    for rec in records.values():
        t, inner, step_s = rec.get("t"), rec.get("inner"), rec.get("step_s")
        if rec.get("training") != k or not _seen_within(rec, now, ttl_s):
            continue
        if rec.get("state") == "averaging":
            estimates.append(inner_steps)
        elif rec.get("state") == "training" and type(inner) is int and 0 <= inner <= inner_steps:
            pace = step_s if isinstance(step_s, (int, float)) and math.isfinite(step_s) and step_s > 0 else math.inf
            estimates.append(min(inner_steps, inner + int(max(0.0, now - t) / pace)))
    return statistics.median_low(estimates) if estimates else 0


class Liveness:
    def __init__(self, sdht: SwarmDHT, heartbeat_s: float, loop: asyncio.AbstractEventLoop):
        self.sdht, self.heartbeat_s, self.loop = sdht, heartbeat_s, loop
        self._fields: dict[str, Any] = {"round": 1, "state": "starting"}
        self._lock = threading.Lock()  # fields are written by the training thread, read by the network thread
        self.peers: dict[str, dict] = {}  # peer id -> its latest live record (ours excluded)
        self.refreshed_at = 0.0  # time.monotonic() of the last successful read
        self.changed = asyncio.Event()  # set after each read (on the network loop)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.failures = 0  # heartbeats in a row whose store or read failed

    @property
    def ttl_s(self) -> float:
        return 3 * self.heartbeat_s

    def update(self, **fields: Any) -> None:
        """Change what our record says (any thread, never blocks). What others act on (the round we are in, the
        state we hold, ...) is published at once in the background; counters wait for the next heartbeat."""
        with self._lock:
            changed = any(self._fields.get(k) != v for k, v in fields.items() if k in URGENT)
            self._fields.update(fields)
        if changed:
            self.loop.call_soon_threadsafe(self._wake.set)

    def fields(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._fields)

    def record(self) -> dict:
        return {**self.fields(), "t": round(time.time(), 1)}

    def start(self) -> None:
        """Begin heartbeating (on the network loop)."""
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def refresh(self) -> dict[str, dict]:
        """Read everyone's records now (a round about to close wants the freshest view). A DHT read can miss a
        record that is still current: a peer stays in the view until its last record expires or it says
        farewell."""
        me = self.sdht.identity.peer_id if self.sdht.identity is not None else None
        records = await self.sdht.peer_records()
        now = time.time()
        fresh = {p: r for p, r in records.items() if p != me and r.get("state") != "left"}
        kept = {p: r for p, r in self.peers.items() if p not in records and _seen_within(r, now, self.ttl_s)}
        self.peers = {**kept, **fresh}
        self.refreshed_at = time.monotonic()
        self.changed.set()
        self.changed = asyncio.Event()
        return self.peers

    async def _run(self) -> None:
        next_read = 0.0
        while True:
            self._wake.clear()
            try:  # a DHT hiccup must not stop the heartbeat: the next one retries
                await self.sdht.heartbeat(self.record(), self.ttl_s)
                if time.monotonic() >= next_read:
                    next_read = time.monotonic() + self.heartbeat_s * 0.9
                    await self.refresh()
                self.failures = 0
            except Exception as e:
                self.failures += 1
                log.log(logging.INFO if self.failures == 3 else logging.DEBUG,
                        "heartbeat failed %d times in a row: %s: %s", self.failures, type(e).__name__, e)
            try:  # an update wakes us early: the record is re-stored, the others' read at most once a heartbeat
                await asyncio.wait_for(self._wake.wait(), self.heartbeat_s)
                await asyncio.sleep(0.05)  # coalesce a burst of updates into one store
            except asyncio.TimeoutError:
                pass

    async def farewell(self) -> None:
        """Tell the swarm at once that we left; the DHT keeps the value that expires last, so the farewell must
        outlive the last heartbeat."""
        with self._lock:
            self._fields["state"] = "left"
        await self.sdht.heartbeat(self.record(), self.ttl_s + 1)
