"""Deterministic group formation for one outer step, without livelock.

A peer that has finished its inner steps announces itself under ``<run>/outer/<k>`` and
waits until every live peer of round k (from the signed ``<run>/peers`` liveness records:
those whose θ_global is at round k, or who are training round k while round k-1 averages)
has done the same, or ``gather_timeout_s`` passes. The lowest peer id among those announced is
the leader: the others send it a join request and it answers all of them with one group
(members, sample weights, a fresh group id). hivemind's matchmaking picks leaders by
expiration time and can keep peers asking one another to lead (shared/HIVEMIND.md); here
the choice is a pure function of what the DHT shows, and a leader that does not answer
is skipped.

An all-reduce that fails is retried as a new *attempt* of the same round without the
peers it blames; announcements carry the attempt number and everyone moves to the highest
one they see, so the survivors of a failed attempt meet again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field as dc_field

from hivemind.p2p import P2P

from swarm.config import SwarmConfig
from swarm.dht import SwarmDHT
from swarm.manifest import choose_manifest
from swarm.wire import WireError, field, open_stream, read_msg, write_msg

log = logging.getLogger("swarm")

JOIN = "swarm.join"
POLL_S = 0.1


class AveragingError(RuntimeError):
    """The round could not be completed; nothing of it may be applied. ``blame``: peers suspected of causing it."""

    def __init__(self, message: str, blame: set[str] | None = None):
        super().__init__(message)
        self.blame = blame or set()


class StaleRound(AveragingError):
    """The swarm finished this round without us, or from another θ_global: resynchronise."""


@dataclass(frozen=True)
class Group:
    outer_step: int
    attempt: int
    group_id: str
    members: tuple[str, ...]  # sorted peer ids; member i owns part i of the all-reduce
    weights: tuple[float, ...]  # samples each member processed this round
    nonce: str  # the leader's random value: a retried round never reuses a failed attempt's group id


@dataclass
class _Gathering:
    """One peer's view of round k while the group forms."""

    outer_step: int
    attempt: int
    weight: float
    base: str  # model_sha256 of θ_global this round starts from
    leader: str | None = None
    ignored_claims: bool = False  # said once that far-ahead claims lack a model
    role_decided: asyncio.Event = dc_field(default_factory=asyncio.Event)
    joins: dict[str, float] = dc_field(default_factory=dict)
    joined: asyncio.Event = dc_field(default_factory=asyncio.Event)
    group: asyncio.Future = dc_field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Matchmaker:
    def __init__(self, p2p: P2P, sdht: SwarmDHT, peer_id: str, cfg: SwarmConfig):
        self.p2p, self.sdht, self.peer_id, self.cfg = p2p, sdht, peer_id, cfg
        self._gatherings: dict[int, _Gathering] = {}
        self._closed_through = -1  # rounds <= this were applied here: late joiners are told they are stale

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(JOIN, self._serve_join)

    def close_round(self, outer_step: int) -> None:
        """The round was applied: forget it, and tell late joiners they are stale."""
        self._closed_through = max(self._closed_through, outer_step)
        self._gatherings.pop(outer_step, None)

    def abandon(self, outer_step: int) -> None:
        """The attempt failed: forget it; the round stays open for the next attempt."""
        self._gatherings.pop(outer_step, None)

    async def form_group(self, k: int, attempt: int, weight: float, base: str, excluded: set[str]) -> Group:
        g = _Gathering(k, attempt, float(weight), base)
        self._gatherings[k] = g
        ready = await self._gather(g, excluded)
        deadline = time.monotonic() + self.cfg.join_timeout_s * 2
        while True:
            candidates = sorted(set(ready) - excluded | {self.peer_id})
            if candidates[0] == self.peer_id:
                return await self._lead(g, expected=set(candidates) - {self.peer_id}, announced=set(ready))
            g.leader = candidates[0]
            g.role_decided.set()
            try:
                return await self._join(g, candidates[0])
            except StaleRound:
                raise
            except Exception as e:  # refused, unreachable, timed out: p2pd errors are plain Exceptions
                log.info("round %d: leader %s unavailable (%s); trying the next one", k, candidates[0][-6:], e)
                excluded = excluded | {candidates[0]}
                g.leader = None
                g.role_decided.clear()
            if time.monotonic() > deadline:
                raise AveragingError(f"round {k}: no leader answered within {self.cfg.join_timeout_s * 2:.0f} s")

    async def _announce(self, g: _Gathering) -> None:
        await self.sdht.announce_ready(g.outer_step, {"w": g.weight, "base": g.base, "a": g.attempt},
                                       ttl_s=self.cfg.gather_timeout_s + self.cfg.join_timeout_s + 30)

    async def _gather(self, g: _Gathering, excluded: set[str]) -> dict[str, dict]:
        """Wait until every live, non-excluded peer of round k has announced this attempt, or the timeout."""
        k = g.outer_step
        await self._announce(g)
        started = time.monotonic()
        deadline, next_note = started + self.cfg.gather_timeout_s, started + 5
        while True:
            ready, live = await asyncio.gather(self.sdht.ready_peers(k), self.sdht.live_peers())
            ahead = [p for p, rec in live.items() if rec["round"] > k and p != self.peer_id]
            if ahead and await self._round_is_held(k, ahead, g):
                raise StaleRound(f"round {k}: peers {', '.join(p[-6:] for p in ahead)} are already past it")
            attempts = [info.get("a", 0) for p, info in ready.items() if p in live and isinstance(info.get("a"), int)]
            if attempts and max(attempts) > g.attempt:  # the others are retrying: meet them there
                g.attempt = max(attempts)
                await self._announce(g)
                continue
            # announcements outlive their peers by up to a minute: only live peers count
            ready = {p: info for p, info in ready.items()
                     if p != self.peer_id and p in live and info.get("a", 0) == g.attempt}
            # with train.overlap a peer still averaging round k-1 has already trained round k: it is coming
            expected = {p for p, rec in live.items() if k in (rec["round"], rec.get("training"))}
            expected -= excluded | {self.peer_id}
            if expected <= set(ready) or time.monotonic() > deadline:
                return ready
            if time.monotonic() > next_note:  # say why we are idle
                next_note += 5
                waiting = sorted(str(live[p].get("name", p[-6:])) for p in expected - set(ready))
                log.info("round %d: waiting for %s to finish their inner steps (%.0f s of %.0f)", k,
                         ", ".join(waiting), time.monotonic() - started, self.cfg.gather_timeout_s)
            await asyncio.sleep(POLL_S)

    async def _round_is_held(self, k: int, ahead: list[str], g: _Gathering) -> bool:
        """Whether the swarm's models have moved past round k: the manifest most peers hold is of step k or later.
        A liveness record alone is a claim; without a model behind it a peer that says it is far ahead is
        ignored, or one liar would send every honest peer to resynchronise forever."""
        chosen = choose_manifest(await self.sdht.manifests())
        if chosen is not None and chosen[0]["outer_step"] >= k:
            return True
        if not g.ignored_claims:
            g.ignored_claims = True
            log.info("round %d: peers %s claim a later round, but no model of it is held yet", k,
                     ", ".join(p[-6:] for p in ahead))
        return False

    async def _lead(self, g: _Gathering, expected: set[str], announced: set[str]) -> Group:
        g.leader = self.peer_id
        g.role_decided.set()
        deadline = time.monotonic() + self.cfg.join_timeout_s
        while not expected <= set(g.joins) and time.monotonic() < deadline:
            g.joined.clear()
            try:
                await asyncio.wait_for(g.joined.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
        members = sorted(set(g.joins) | {self.peer_id})
        if len(members) == 1 and announced:
            # others announced this attempt, yet none joined us: they averaged without us
            raise StaleRound(f"round {g.outer_step}: the other ready peers formed a group without us")
        weights = tuple(g.weight if p == self.peer_id else g.joins[p] for p in members)
        group = make_group(self.sdht.run_id, g.outer_step, g.attempt, members, weights, nonce=os.urandom(8).hex())
        g.group.set_result(group)
        return group

    async def _join(self, g: _Gathering, leader: str) -> Group:
        timeout = self.cfg.join_timeout_s + 5
        _, reader, writer = await open_stream(self.p2p, leader, JOIN, timeout, self.sdht.addresses)
        try:
            await write_msg(writer, {"step": g.outer_step, "peer": self.peer_id, "w": g.weight, "base": g.base})
            reply = await read_msg(reader, timeout)
        finally:
            writer.close()
        if "redirect" in reply:
            raise WireError(f"redirected to {str(reply['redirect'])[-6:]}")
        if reply.get("stale"):
            raise StaleRound(f"round {g.outer_step}: {str(reply.get('error', 'stale'))[:200]}")
        if "error" in reply:
            raise WireError(str(reply["error"])[:200])
        members, weights = field(reply, "members", list), field(reply, "weights", list)
        if not all(isinstance(w, (int, float)) for w in weights):
            raise WireError("leader sent non-numeric weights")
        group = make_group(self.sdht.run_id, g.outer_step, field(reply, "attempt", int), members, tuple(weights),
                           nonce=field(reply, "nonce", str))
        if group.group_id != field(reply, "group_id", str) or self.peer_id not in group.members \
                or group.weights[group.members.index(self.peer_id)] != g.weight:
            raise WireError("leader sent an inconsistent group")
        g.group.set_result(group)
        return group

    async def _serve_join(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_msg(reader, self.cfg.join_timeout_s)
            if request.get("peer") != info.peer_id.to_base58():  # libp2p authenticated the stream's end
                raise WireError("the stream's peer id differs from the join request's")
            reply = await self._answer_join(request)
        except (WireError, asyncio.TimeoutError, ValueError) as e:
            reply = {"error": str(e)[:200] or type(e).__name__}
        try:
            await write_msg(writer, reply)
        except Exception:
            pass  # the joiner went away; nothing to do
        finally:
            writer.close()

    async def _answer_join(self, request: dict) -> dict:
        k, peer = field(request, "step", int), field(request, "peer", str)
        weight, base = float(field(request, "w", (int, float))), field(request, "base", str)
        if not 0 < weight < 1e12 or len(peer) > 128 or len(base) > 128:
            return {"error": "malformed join"}
        deadline = time.monotonic() + self.cfg.join_timeout_s
        while k not in self._gatherings:  # we may still be finishing our inner steps
            if k <= self._closed_through:
                return {"error": f"round {k} is closed", "stale": True}
            if time.monotonic() > deadline:
                return {"error": f"not in round {k}"}
            await asyncio.sleep(POLL_S)
        g = self._gatherings[k]
        if base != g.base:
            return {"error": f"round {k} starts from model {g.base[:12]}, yours is {base[:12]}", "stale": True}
        g.joins[peer] = weight
        g.joined.set()
        await asyncio.wait_for(g.role_decided.wait(), self.cfg.join_timeout_s)
        if g.leader != self.peer_id:
            g.joins.pop(peer, None)
            return {"redirect": g.leader or ""}
        group: Group = await asyncio.wait_for(asyncio.shield(g.group), self.cfg.join_timeout_s + 5)
        if peer not in group.members:
            return {"error": f"round {k} group closed before you joined", "stale": True}
        return {"members": list(group.members), "weights": list(group.weights), "group_id": group.group_id,
                "attempt": group.attempt, "nonce": group.nonce}


def make_group(run_id: str, outer_step: int, attempt: int, members: list[str], weights: tuple[float, ...],
               nonce: str) -> Group:
    """A group and its id, which every member recomputes from the leader's answer."""
    if len(members) != len(weights) or len(set(members)) != len(members) or len(members) > 4096 or \
            not all(isinstance(m, str) for m in members) or list(members) != sorted(members):
        raise WireError("malformed group")
    digest = hashlib.sha256(repr((run_id, outer_step, attempt, nonce, list(members),
                                  [float(w) for w in weights])).encode()).hexdigest()[:32]
    return Group(outer_step, attempt, digest, tuple(members), tuple(float(w) for w in weights), nonce)
