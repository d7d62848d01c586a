"""Group formation for one outer step: a deterministic leader, joins pushed to it, no DHT polling.

Every live peer of round k (from the liveness view, swarm.liveness: peers whose θ_global is at
round k, or who train round k while round k-1 averages) agrees on the leader without talking: the
lowest peer id among those that others can dial, in this peer's part of the round's partition
(above ``swarm.max_group_size``, peers are split by a hash of the round, so the partition changes
every round and averages mix across groups, as in Moshpit SGD, arXiv 2103.03239). A peer that
finishes its inner steps sends a join request to the leader at once; the leader acknowledges at
once, even while it still trains, and answers with the group when everyone it expects has joined,
or when joins have stopped arriving for a while measured from how spread out they arrived: a peer
that claims the round and never comes costs about a second, not a timeout. A leader that does not
acknowledge within ``ACK_TIMEOUT_S`` is skipped, in this round and the next ones, and the next
lowest peer leads. hivemind's own matchmaking picks leaders by expiration time and can livelock
(docs/architecture.md, "hivemind pitfalls"); here the choice is a pure function of the view.

A failed all-reduce is retried as a new *attempt* of the same round without the peers it blames;
join requests carry the attempt, and a leader answers only joins of its own attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field as dc_field
from typing import Callable

from hivemind.p2p import P2P

from swarm.config import SwarmConfig
from swarm.liveness import Liveness
from swarm.wire import WireError, field, is_remote, open_stream, read_msg, write_msg

log = logging.getLogger("swarm")

JOIN = "swarm.join"
ACK_TIMEOUT_S = 3.0  # a leader that has not acknowledged a join by then is skipped
# Once most peers it expects have joined, a leader closes its group when joins have stopped for the longest of:
MIN_QUIET_S = 1.0  # a second,
QUIET_SPREAD = 2.0  # twice the spread of the arrivals so far,
QUIET_ROUND = 0.15  # and 15% of the time it trained this round: a peer that slow is still waited for
MAX_MEMBERS = 4096


class AveragingError(RuntimeError):
    """The round could not be completed; nothing of it may be applied. ``blame``: peers suspected of causing it;
    ``local``: the cause is on our side (a bug, our resources), and no peer is blamed."""

    def __init__(self, message: str, blame: set[str] | None = None, local: bool = False):
        super().__init__(message)
        self.blame = blame or set()
        self.local = local


class StaleRound(AveragingError):
    """The swarm finished this round without us, or from another θ_global: resynchronise."""


@dataclass(frozen=True)
class Group:
    outer_step: int
    attempt: int
    group_id: str
    members: tuple[str, ...]  # sorted peer ids
    weights: tuple[float, ...]  # samples each member processed since its θ_global
    owners: tuple[str, ...]  # members others can dial, sorted: owner i reduces part i of the all-reduce
    nonce: str  # the leader's random value: a retried round never reuses a failed attempt's group id
    losses: tuple[float, ...] = ()  # each member's mean inner loss this round (for people, not for the math)


@dataclass
class _Gathering:
    """One peer's view of round k while the group forms."""

    outer_step: int
    attempt: int
    weight: float
    base: str  # model_sha256 of θ_global this round starts from
    loss: float
    reachable: bool
    ready_t: float = dc_field(default_factory=time.monotonic)
    leader: str | None = None
    role_decided: asyncio.Event = dc_field(default_factory=asyncio.Event)
    joins: dict[str, tuple[float, float, bool]] = dc_field(default_factory=dict)  # peer -> (weight, loss, reachable)
    join_times: list[float] = dc_field(default_factory=list)
    joined: asyncio.Event = dc_field(default_factory=asyncio.Event)
    group: asyncio.Future = dc_field(default_factory=lambda: asyncio.get_running_loop().create_future())


def in_round(record: dict, k: int) -> bool:
    """Whether a liveness record's peer will average round k: its θ_global is at round k, or it trains round k
    while round k-1 averages (train.overlap)."""
    return k in (record.get("round"), record.get("training"))


def partition(peers: list[str], k: int, max_group_size: int) -> list[list[str]]:
    """Round k's groups: peers ordered by a hash of (k, peer id), cut into the fewest groups of at most
    ``max_group_size``, sizes within one of each other. Every peer with the same view computes the same."""
    order = sorted(peers, key=lambda p: hashlib.sha256(f"{k}\n{p}".encode()).digest())
    count = -(-len(order) // max_group_size) if order else 1
    return [order[i * len(order) // count:(i + 1) * len(order) // count] for i in range(count)]


class Matchmaker:
    def __init__(self, p2p: P2P, liveness: Liveness, peer_id: str, cfg: SwarmConfig,
                 swarm_is_past: Callable[[int, dict[str, dict]], str | None]):
        self.p2p, self.liveness, self.peer_id, self.cfg = p2p, liveness, peer_id, cfg
        self.swarm_is_past = swarm_is_past
        self.reachable = True
        self._gatherings: dict[int, _Gathering] = {}
        self._closed_through = -1  # rounds <= this were applied here: late joiners are told they are stale
        self._silent_leaders: set[str] = set()  # peers that did not acknowledge a join: never tried again first
        self._training = 1  # the round we train now (joins for it are acknowledged before we are ready)
        self._training_since = time.monotonic()
        self._last_group: tuple[int, set[str]] = (0, set())  # the round we last averaged, and with whom

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(JOIN, self._serve_join)

    def training(self, k: int) -> None:
        self._training, self._training_since = k, time.monotonic()

    def close_round(self, outer_step: int, members: tuple[str, ...] = ()) -> None:
        """The round was applied: forget it, and tell late joiners they are stale. Members proved responsive, and
        are expected in the next round even before their records say so."""
        self._closed_through = max(self._closed_through, outer_step)
        self._gatherings.pop(outer_step, None)
        self._silent_leaders -= set(members)
        self._last_group = (outer_step, set(members) - {self.peer_id})

    def abandon(self, outer_step: int) -> None:
        """The attempt failed: forget it; the round stays open for the next attempt."""
        self._gatherings.pop(outer_step, None)

    def expected(self, k: int, excluded: set[str]) -> set[str]:
        """The other peers we expect in our group of round k: those whose records say they are in it, and those we
        just averaged round k-1 with (their records may not say so yet)."""
        live = self.liveness.peers
        last_round, last_members = self._last_group
        coming = {p for p in last_members if last_round == k - 1 and p in live}
        peers = sorted({p for p, rec in live.items() if in_round(rec, k)} | coming | {self.peer_id})
        mine = next(g for g in partition(peers, k, self.cfg.max_group_size) if self.peer_id in g)
        return set(mine) - excluded - {self.peer_id}

    def leader(self, k: int, excluded: set[str], passed_over: set[str] = frozenset()) -> str | None:
        """The lowest peer id others can dial among our expected group, ourselves included if we can be dialed;
        ``passed_over``: peers that told us this round that they do not lead it."""
        live = self.liveness.peers
        options = {p for p in self.expected(k, excluded) if live[p].get("reachable", True) is not False}
        options -= self._silent_leaders | passed_over
        if self.reachable:
            options.add(self.peer_id)
        return min(options) if options else None

    async def form_group(self, k: int, attempt: int, weight: float, base: str, loss: float,
                         excluded: set[str]) -> Group:
        g = _Gathering(k, attempt, float(weight), base, float(loss), self.reachable)
        self._gatherings[k] = g
        deadline = time.monotonic() + self.cfg.gather_timeout_s + self.cfg.join_timeout_s
        await self._refresh_quietly(k)  # who is in this round decides who leads it and whom it waits for
        skipped: set[str] = set()  # peers that told us they do not lead this round, or could not be reached
        redirect: str | None = None  # the leader a peer named instead of itself
        while True:
            self._check_stale(k)
            leader = redirect or self.leader(k, excluded, skipped)
            redirect = None
            if leader is None:
                raise AveragingError(f"round {k}: no peer that others can dial is in the round to lead it")
            if leader == self.peer_id:
                try:
                    return await self._lead(g, excluded, skipped)
                except _Redirect as r:
                    log.info("round %d: %s leads it (its record came after we took the lead): joining it", k,
                             r.to[-6:])
                    redirect = r.to
                    continue
            g.leader = leader
            g.role_decided.set()
            try:
                return await self._join(g, leader)
            except StaleRound:
                raise
            except _Silent:
                log.info("round %d: leader %s did not acknowledge within %.0f s: skipping it", k, leader[-6:],
                         ACK_TIMEOUT_S)
                self._silent_leaders.add(leader)
            except _Redirect as r:  # its view differs from ours: follow it once, unless it points back at us
                skipped.add(leader)
                if r.to != self.peer_id and r.to not in skipped | excluded | self._silent_leaders:
                    redirect = r.to
            except Exception as e:
                if not is_remote(e):
                    raise AveragingError(f"round {k}: joining {leader[-6:]} failed on our side: "
                                         f"{type(e).__name__}: {e}", local=True) from e
                log.info("round %d: leader %s unavailable (%s); trying the next one", k, leader[-6:], e)
                skipped.add(leader)
            g.leader = None
            g.role_decided.clear()
            if time.monotonic() > deadline:
                raise AveragingError(f"round {k}: no leader answered within "
                                     f"{self.cfg.gather_timeout_s + self.cfg.join_timeout_s:.0f} s")

    async def _refresh_quietly(self, k: int) -> None:
        try:
            await self.liveness.refresh()
        except Exception as e:  # the DHT is slow: decide on the view we have
            log.debug("round %d: view refresh failed: %s", k, e)

    def _others_claim_later_rounds(self, k: int) -> bool:
        return any(isinstance(r.get("round"), int) and r["round"] > k for r in self.liveness.peers.values())

    def _others_train_earlier_rounds(self, k: int) -> bool:
        return any(isinstance(r.get("training"), int) and r["training"] < k and r.get("state") != "leaving"
                   for r in self.liveness.peers.values())

    def _check_stale(self, k: int) -> None:
        why = self.swarm_is_past(k, self.liveness.peers)
        if why is not None:
            raise StaleRound(f"round {k}: {why}")

    async def _lead(self, g: _Gathering, excluded: set[str], passed_over: set[str]) -> Group:
        """Wait for the joins of everyone expected, or until they stop arriving, then answer all with one group.
        _Redirect if the view comes to name another leader meanwhile (a peer whose record showed it in round k
        only after we took the lead, while it leads the round itself): whoever joined us is sent there too."""
        k = g.outer_step
        g.leader = self.peer_id
        g.role_decided.set()
        hard = g.ready_t + self.cfg.gather_timeout_s
        next_note, refreshed = g.ready_t + 5, False
        patience = max(2 * self.cfg.heartbeat_s, g.ready_t - self._training_since)
        alone_since: float | None = None
        while True:
            now = time.monotonic()
            leader = self.leader(k, excluded, passed_over)
            if leader is not None and leader != self.peer_id:  # two leaders would wait for each other: step down
                g.leader = leader
                g.group.set_result(None)  # tells those who joined us to go there
                g.group = asyncio.get_running_loop().create_future()
                g.joins.clear()
                g.join_times.clear()
                raise _Redirect(leader)
            expected = self.expected(k, excluded)
            missing = expected - set(g.joins)
            if not expected and not g.joins:
                alone_since = now if alone_since is None else alone_since
                if now < min(hard, alone_since + patience) and \
                        (self._others_claim_later_rounds(k) or self._others_train_earlier_rounds(k)):
                    # Alone, while others say they are past round k (they averaged it without us, before their
                    # records showed us): their states take a moment to be announced, and then the round is stale.
                    # Or alone while others train an earlier round (peers that started the run beside us, a round
                    # later). Either way, a solo step now would fork the model: wait up to a round's training time
                    # (two heartbeats at least), counted from when we found ourselves alone, not from when we were
                    # ready, since we may have waited for one of them until then
                    await asyncio.sleep(self.cfg.heartbeat_s / 2)
                    await self._refresh_quietly(k)
                    self._check_stale(k)
                    continue
            if not missing or now >= hard:
                break
            times = [g.ready_t, *g.join_times]
            quiet = max(MIN_QUIET_S, QUIET_SPREAD * (max(times) - min(times)),
                        QUIET_ROUND * (g.ready_t - self._training_since))
            if 2 * len(g.joins) > len(expected) and now - max(times) >= quiet:
                if refreshed:  # joins stopped, and a fresh view still expects the missing ones: close without them
                    break
                await self._refresh_quietly(k)  # they may have left, or moved on, since the last heartbeat
                refreshed = True
                continue
            if now > next_note:  # say why we are idle
                next_note += 5
                names = sorted(str(self.liveness.peers.get(p, {}).get("name", p[-6:])) for p in missing)
                log.info("round %d: waiting for %s to finish their inner steps (%.0f s of %.0f)", k,
                         ", ".join(names), now - g.ready_t, self.cfg.gather_timeout_s)
            self._check_stale(k)
            wait = min(hard - now, 1.0, max(0.05, quiet - (now - max(times))))
            g.joined.clear()
            try:
                await asyncio.wait_for(g.joined.wait(), wait)
            except asyncio.TimeoutError:
                pass
        members = sorted(set(g.joins) | {self.peer_id})
        info = {p: (g.weight, g.loss, g.reachable) if p == self.peer_id else g.joins[p] for p in members}
        group = make_group(k, g.attempt, members, tuple(info[p][0] for p in members),
                           tuple(p for p in members if info[p][2]), nonce=os.urandom(8).hex(),
                           losses=tuple(info[p][1] for p in members))
        g.group.set_result(group)
        return group

    async def _join(self, g: _Gathering, leader: str) -> Group:
        k = g.outer_step
        try:
            _, reader, writer = await open_stream(self.p2p, leader, JOIN, ACK_TIMEOUT_S, self.liveness.sdht.addresses)
        except asyncio.TimeoutError:
            raise _Silent() from None
        try:
            await write_msg(writer, {"step": k, "attempt": g.attempt, "peer": self.peer_id, "w": g.weight,
                                     "base": g.base, "loss": g.loss, "reachable": g.reachable})
            try:
                ack = await read_msg(reader, ACK_TIMEOUT_S)
            except WireError as e:
                if "no data within" in str(e):
                    raise _Silent() from None
                raise
            _raise_refusal(ack, k)
            wait_s = min(float(field(ack, "wait_s", (int, float))), self.cfg.gather_timeout_s + self.cfg.join_timeout_s)
            reply = await read_msg(reader, max(wait_s, 0) + self.cfg.join_timeout_s)
        finally:
            writer.close()
        _raise_refusal(reply, k)
        members, weights, owners = field(reply, "members", list), field(reply, "weights", list), field(reply, "owners", list)
        losses = field(reply, "losses", list)
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights + losses) or \
                len(losses) != len(members):
            raise WireError("leader sent non-numeric weights or losses")
        group = make_group(k, field(reply, "attempt", int), members, tuple(weights), tuple(owners),
                           nonce=field(reply, "nonce", str), losses=tuple(losses))
        if group.group_id != field(reply, "group_id", str) or self.peer_id not in group.members or \
                group.weights[group.members.index(self.peer_id)] != g.weight or group.attempt != g.attempt or \
                (self.peer_id in group.owners) != g.reachable:
            raise WireError("leader sent an inconsistent group")
        g.group.set_result(group)
        return group

    async def _serve_join(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_msg(reader, self.cfg.join_timeout_s)
            if request.get("peer") != info.peer_id.to_base58():  # libp2p authenticated the stream's end
                raise WireError("the stream's peer id differs from the join request's")
            await self._answer_join(request, writer)
        except Exception as e:
            reply = {"error": str(e)[:200] or type(e).__name__}
            log.debug("join request from %s refused: %s: %s", info.peer_id.to_base58()[-6:], type(e).__name__, e,
                      exc_info=not is_remote(e))
            try:
                await write_msg(writer, reply)
            except Exception:
                pass  # the joiner went away; nothing to do
        finally:
            writer.close()

    async def _answer_join(self, request: dict, writer: asyncio.StreamWriter) -> None:
        k, peer, attempt = field(request, "step", int), field(request, "peer", str), field(request, "attempt", int)
        weight, base = float(field(request, "w", (int, float))), field(request, "base", str)
        loss, reachable = float(field(request, "loss", (int, float))), bool(field(request, "reachable", bool))
        if not 0 < weight < 1e12 or len(peer) > 128 or len(base) > 128 or not 0 <= attempt < 100:
            raise WireError("malformed join")
        if k <= self._closed_through:
            await write_msg(writer, {"error": f"round {k} is closed", "stale": True})
            return
        if k not in self._gatherings and (k > self._training or k < self._training - 1):
            raise WireError(f"not in round {k} (training round {self._training})")
        wait_s = self.cfg.gather_timeout_s
        await write_msg(writer, {"ack": True, "wait_s": wait_s})  # alive, and in this round: keep waiting
        deadline = time.monotonic() + wait_s
        while True:  # we may still be finishing our inner steps, or a failed attempt
            g = self._gatherings.get(k)
            if k <= self._closed_through:
                await write_msg(writer, {"error": f"round {k} is closed", "stale": True})
                return
            if g is not None and g.attempt >= attempt:
                break
            if time.monotonic() > deadline:
                raise WireError(f"not ready for round {k} attempt {attempt} in time")
            await asyncio.sleep(0.05)
        if g.attempt != attempt:
            raise WireError(f"round {k} is at attempt {g.attempt}, not {attempt}")
        if base != g.base:
            await write_msg(writer, {"error": f"round {k} starts from model {g.base[:12]}, yours is {base[:12]}",
                                     "stale": True})
            return
        await asyncio.wait_for(g.role_decided.wait(), self.cfg.join_timeout_s)
        if g.leader != self.peer_id:
            await write_msg(writer, {"redirect": g.leader})
            return
        if g.group.done():
            await write_msg(writer, {"error": f"round {k} group closed before you joined", "stale": True})
            return
        g.joins[peer] = (weight, loss, reachable)
        g.join_times.append(time.monotonic())
        g.joined.set()
        group: Group | None = await asyncio.wait_for(asyncio.shield(g.group), self.cfg.gather_timeout_s)
        if group is None:  # we stepped down after this peer joined us
            await write_msg(writer, {"redirect": g.leader})
            return
        if peer not in group.members:
            await write_msg(writer, {"error": f"round {k} group closed before you joined", "stale": True})
            return
        await write_msg(writer, {"members": list(group.members), "weights": list(group.weights),
                                 "owners": list(group.owners), "losses": list(group.losses),
                                 "group_id": group.group_id, "attempt": group.attempt, "nonce": group.nonce})


class _Silent(Exception):
    """The leader did not acknowledge in time."""


class _Redirect(Exception):
    """The peer we took for the leader names another."""

    def __init__(self, to: str):
        super().__init__(f"redirected to {to[-6:]}")
        self.to = to


def _raise_refusal(reply: dict, k: int) -> None:
    if isinstance(reply.get("redirect"), str) and 0 < len(reply["redirect"]) <= 128:
        raise _Redirect(reply["redirect"])
    if reply.get("stale"):
        raise StaleRound(f"round {k}: {str(reply.get('error', 'stale'))[:200]}")
    if "error" in reply:
        raise WireError(str(reply["error"])[:200])


def make_group(outer_step: int, attempt: int, members: list[str], weights: tuple[float, ...],
               owners: tuple[str, ...], nonce: str, losses: tuple[float, ...] = ()) -> Group:
    """A group and its id, which every member recomputes from the leader's answer."""
    if len(members) != len(weights) or len(set(members)) != len(members) or len(members) > MAX_MEMBERS or \
            not all(isinstance(m, str) for m in members) or list(members) != sorted(members) or \
            not all(isinstance(o, str) for o in owners) or list(owners) != sorted(set(owners)) or \
            not set(owners) <= set(members) or not owners or len(nonce) > 64:
        raise WireError("malformed group")
    digest = hashlib.sha256(repr((outer_step, attempt, nonce, list(members), [float(w) for w in weights],
                                  list(owners))).encode()).hexdigest()[:32]
    return Group(outer_step, attempt, digest, tuple(members), tuple(float(w) for w in weights), tuple(owners), nonce,
                 tuple(float(x) for x in losses))
