"""Group formation and all-reduce of pseudo-gradients for one outer step.

Why not hivemind's DecentralizedAverager: its matchmaking can livelock, a partial
all-reduce reports success, and with a lossy codec the owner of a part keeps values
different from everyone else's (shared/HIVEMIND.md). Here:

* Group formation is deterministic. A peer that has finished its inner steps announces
  itself under ``<run>/outer/<k>`` and waits until every live peer of round k has done
  the same (or ``gather_timeout_s`` passes). The lowest peer id among the announced is
  the leader; the others send it a join request, and it answers all of them with the
  same group (members, sample weights, group id).
* The all-reduce is a reduce-scatter then all-gather: member i owns the i-th slice of the
  flat vector, receives everyone's encoded slice, computes the sample-weighted mean,
  encodes it once and sends those very bytes back to every member; the owner decodes the
  same bytes. Every member therefore applies byte-identical averages, and each result
  carries its sha256 so a torn transfer is caught. Any missing piece fails the round
  loudly (AveragingError) instead of leaving part of the vector un-averaged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field as dc_field

import torch
from hivemind.p2p import P2P, PeerID

from swarm import compression
from swarm.config import SwarmConfig
from swarm.dht import SwarmDHT
from swarm.wire import WireError, field, read_blob, read_msg, write_blob, write_msg

log = logging.getLogger("swarm")

JOIN = "swarm.join"
REDUCE = "swarm.reduce"
POLL_S = 0.1


class AveragingError(RuntimeError):
    """The round could not be completed; nothing of it may be applied."""


class StaleRound(AveragingError):
    """The swarm finished this round without us, or from another θ_global: resynchronise."""


@dataclass(frozen=True)
class Group:
    outer_step: int
    group_id: str
    members: tuple[str, ...]  # sorted peer ids; member i owns part i
    weights: tuple[float, ...]  # samples each member processed this round


@dataclass
class AverageResult:
    average: torch.Tensor
    group: Group
    bytes_sent: int
    bytes_recv: int
    matchmaking_s: float
    allreduce_s: float
    average_sha256: str  # over the decoded result bytes of every part, in order


@dataclass
class _Round:
    outer_step: int
    weight: float
    base: str  # model_sha256 of θ_global this round starts from
    role: str = "gathering"  # gathering -> leader | follower -> reducing -> done
    leader: str | None = None
    role_decided: asyncio.Event = dc_field(default_factory=asyncio.Event)
    joins: dict[str, float] = dc_field(default_factory=dict)
    joined: asyncio.Event = dc_field(default_factory=asyncio.Event)
    group: asyncio.Future = dc_field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # reduce-scatter state of the part this peer owns
    accumulator: torch.Tensor | None = None
    contributed: set[str] = dc_field(default_factory=set)
    part_result: asyncio.Future = dc_field(default_factory=lambda: asyncio.get_running_loop().create_future())
    bytes_recv: int = 0


def part_bounds(numel: int, parts: int, block: int) -> list[tuple[int, int]]:
    """Split [0, numel) into ``parts`` contiguous slices aligned to codec blocks."""
    blocks = -(-numel // block)
    edges = [min(numel, (blocks * i // parts) * block) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


class Codec:
    """The wire form of one slice: int8 blockwise (swarm.compression) or raw fp32."""

    def __init__(self, name: str, block_size: int):
        self.name, self.block_size = name, block_size

    def size(self, numel: int) -> int:
        return compression.encoded_size(numel, self.block_size) if self.name == "int8" else 4 * numel

    def encode(self, x: torch.Tensor) -> bytes:
        if self.name == "int8":
            return compression.encode(x, self.block_size)
        if not torch.isfinite(x).all():
            raise compression.CodecError(f"refusing to send {int((~torch.isfinite(x)).sum())} non-finite values")
        return x.to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()

    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        if self.name == "int8":
            return compression.decode(data, numel, self.block_size)
        x = torch.frombuffer(bytearray(data), dtype=torch.float32)
        if not torch.isfinite(x).all():
            raise compression.CodecError("received non-finite values")
        return x


class Averager:
    """Serves and drives the all-reduce of one peer; lives on the peer's network event loop."""

    def __init__(self, p2p: P2P, sdht: SwarmDHT, peer_id: str, cfg: SwarmConfig):
        self.p2p, self.sdht, self.peer_id, self.cfg = p2p, sdht, peer_id, cfg
        self.codec = Codec(cfg.codec, cfg.block_size)
        self._rounds: dict[int, _Round] = {}
        self._closed_through = -1  # rounds <= this are finished here: late joins get "closed"
        self._numel = 0

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(JOIN, self._serve_join)
        await self.p2p.add_binary_stream_handler(REDUCE, self._serve_reduce)

    async def average(self, outer_step: int, delta: torch.Tensor, weight: float, base: str) -> AverageResult:
        """All-reduce ``delta`` (flat fp32) with the peers of round ``outer_step``; weighted by samples."""
        t0 = time.monotonic()
        self._numel = delta.numel()
        rnd = _Round(outer_step, float(weight), base)
        self._rounds[outer_step] = rnd
        try:
            group = await self._form_group(rnd)
            t1 = time.monotonic()
            if len(group.members) == 1:
                return AverageResult(delta.clone(), group, 0, 0, t1 - t0, 0.0, hashlib.sha256(b"solo").hexdigest())
            average, sent, recv, digest = await self._all_reduce(rnd, group, delta)
            return AverageResult(average, group, sent, recv, t1 - t0, time.monotonic() - t1, digest)
        finally:
            rnd.role = "done"
            self._closed_through = max(self._closed_through, outer_step)
            for k in [k for k in self._rounds if k <= outer_step]:
                del self._rounds[k]

    # --- group formation --------------------------------------------------------------------------

    async def _form_group(self, rnd: _Round) -> Group:
        k = rnd.outer_step
        await self.sdht.announce_ready(k, self.peer_id, {"w": rnd.weight, "base": rnd.base},
                                       ttl_s=self.cfg.gather_timeout_s + self.cfg.join_timeout_s + 30)
        ready = await self._gather(k)
        excluded: set[str] = set()
        deadline = time.monotonic() + self.cfg.join_timeout_s * 2
        while True:
            candidates = sorted(set(ready) - excluded | {self.peer_id})
            leader = candidates[0]
            if leader == self.peer_id:
                return await self._lead(rnd, expected=set(candidates) - {self.peer_id}, announced=set(ready))
            rnd.role, rnd.leader = "follower", leader
            rnd.role_decided.set()
            try:
                return await self._join(rnd, leader)
            except StaleRound:
                raise
            except (WireError, OSError, asyncio.TimeoutError, Exception) as e:  # p2pd errors are plain Exceptions
                log.info("round %d: leader %s unavailable (%s); trying the next one", k, leader[-6:], e)
                excluded.add(leader)
                rnd.role = "gathering"
                rnd.role_decided.clear()
            if time.monotonic() > deadline:
                raise AveragingError(f"round {k}: no leader answered within {self.cfg.join_timeout_s * 2:.0f} s")

    async def _gather(self, k: int) -> dict[str, dict]:
        """Wait until every live peer of round k has announced itself, or the gather timeout."""
        deadline = time.monotonic() + self.cfg.gather_timeout_s
        while True:
            ready, live = await asyncio.gather(self.sdht.ready_peers(k), self.sdht.live_peers())
            ahead = [p for p, rec in live.items() if rec["round"] > k]
            if ahead and self.peer_id not in ahead:
                raise StaleRound(f"round {k}: peers {', '.join(p[-6:] for p in ahead)} are already past it")
            expected = {p for p, rec in live.items() if rec["round"] == k} | {self.peer_id}
            if expected <= set(ready) | {self.peer_id} or time.monotonic() > deadline:
                return {p: info for p, info in ready.items() if p != self.peer_id}
            await asyncio.sleep(POLL_S)

    async def _lead(self, rnd: _Round, expected: set[str], announced: set[str]) -> Group:
        rnd.role, rnd.leader = "leader", self.peer_id
        rnd.role_decided.set()
        deadline = time.monotonic() + self.cfg.join_timeout_s
        while not expected <= set(rnd.joins) and time.monotonic() < deadline:
            rnd.joined.clear()
            try:
                await asyncio.wait_for(rnd.joined.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
        members = sorted(set(rnd.joins) | {self.peer_id})
        if len(members) == 1 and announced:
            # Others announced this round but none joined us: they averaged without us.
            raise StaleRound(f"round {rnd.outer_step}: the other ready peers formed a group without us")
        weights = tuple(rnd.weight if p == self.peer_id else rnd.joins[p] for p in members)
        group = _make_group(self.sdht.run_id, rnd.outer_step, members, weights)
        rnd.role = "reducing"
        rnd.group.set_result(group)
        return group

    async def _join(self, rnd: _Round, leader: str) -> Group:
        timeout = self.cfg.join_timeout_s + 5
        _, reader, writer = await asyncio.wait_for(
            self.p2p.call_binary_stream_handler(PeerID.from_base58(leader), JOIN), timeout)
        try:
            await write_msg(writer, {"step": rnd.outer_step, "peer": self.peer_id, "w": rnd.weight, "base": rnd.base})
            reply = await read_msg(reader, timeout)
        finally:
            writer.close()
        if "redirect" in reply:
            raise WireError(f"redirected to {str(reply['redirect'])[-6:]}")
        if reply.get("stale"):
            raise StaleRound(f"round {rnd.outer_step}: {reply.get('error', 'stale')}")
        if "error" in reply:
            raise WireError(str(reply["error"])[:200])
        members = tuple(field(reply, "members", list))
        weights = tuple(float(w) for w in field(reply, "weights", list))
        group = _make_group(self.sdht.run_id, rnd.outer_step, list(members), weights)
        if group.group_id != field(reply, "group_id", str) or self.peer_id not in members:
            raise WireError("leader sent an inconsistent group")
        rnd.role = "reducing"
        rnd.group.set_result(group)
        return group

    async def _serve_join(self, _info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_msg(reader, self.cfg.join_timeout_s)
            reply = await self._answer_join(request)
        except (WireError, asyncio.TimeoutError) as e:
            reply = {"error": str(e)}
        try:
            await write_msg(writer, reply)
        except Exception:
            pass  # the joiner went away; nothing to do
        finally:
            writer.close()

    async def _answer_join(self, request: dict) -> dict:
        k, peer = field(request, "step", int), field(request, "peer", str)
        weight, base = float(field(request, "w", (int, float))), field(request, "base", str)
        if not weight > 0 or weight > 1e12:
            return {"error": "weight out of range"}
        deadline = time.monotonic() + self.cfg.join_timeout_s
        while k not in self._rounds:  # we may still be finishing our inner steps
            if k <= self._closed_through:
                return {"error": f"round {k} is closed", "stale": True}
            if time.monotonic() > deadline:
                return {"error": f"not in round {k}"}
            await asyncio.sleep(POLL_S)
        rnd = self._rounds[k]
        if base != rnd.base:
            return {"error": f"round {k} starts from model {rnd.base[:12]}, yours is {base[:12]}", "stale": True}
        rnd.joins[peer] = weight
        rnd.joined.set()
        await asyncio.wait_for(rnd.role_decided.wait(), self.cfg.join_timeout_s)
        if rnd.leader != self.peer_id:
            rnd.joins.pop(peer, None)
            return {"redirect": rnd.leader or ""}
        group: Group = await asyncio.wait_for(asyncio.shield(rnd.group), self.cfg.join_timeout_s + 5)
        if peer not in group.members:
            return {"error": f"round {k} group closed before you joined", "stale": True}
        return {"members": list(group.members), "weights": list(group.weights), "group_id": group.group_id}

    # --- all-reduce -------------------------------------------------------------------------------

    async def _all_reduce(self, rnd: _Round, group: Group, delta: torch.Tensor):
        me = group.members.index(self.peer_id)
        bounds = part_bounds(delta.numel(), len(group.members), self.codec.block_size)
        lo, hi = bounds[me]
        rnd.accumulator = delta[lo:hi].mul(group.weights[me])
        average = torch.empty_like(delta)
        loop = asyncio.get_running_loop()
        timeout = self.cfg.allreduce_timeout_s

        async def exchange(j: int) -> tuple[int, int, str]:
            a, b = bounds[j]
            payload = await loop.run_in_executor(None, self.codec.encode, delta[a:b])
            peer = PeerID.from_base58(group.members[j])
            _, reader, writer = await asyncio.wait_for(self.p2p.call_binary_stream_handler(peer, REDUCE), timeout)
            try:
                sent = await write_msg(writer, {"group_id": group.group_id, "peer": self.peer_id, "part": j})
                sent += await write_blob(writer, payload)
                reply = await read_msg(reader, timeout)
                if "error" in reply:
                    raise AveragingError(f"part {j} owner {group.members[j][-6:]}: {reply['error']}")
                result = await read_blob(reader, self.codec.size(b - a), timeout)
            finally:
                writer.close()
            digest = hashlib.sha256(result).hexdigest()
            if digest != field(reply, "sha256", str):
                raise AveragingError(f"part {j} from {group.members[j][-6:]} failed its sha256 check")
            average[a:b] = await loop.run_in_executor(None, self.codec.decode, result, b - a)
            return sent, len(result) + 100, digest

        tasks = [asyncio.create_task(exchange(j)) for j in range(len(group.members)) if j != me]
        try:
            done = await asyncio.gather(*tasks)
            own_bytes, own_digest = await asyncio.wait_for(asyncio.shield(rnd.part_result), timeout)
        except Exception as e:
            for task in tasks:
                task.cancel()
            if not rnd.part_result.done():
                rnd.part_result.set_exception(AveragingError("round aborted"))
                rnd.part_result.exception()  # mark retrieved
            raise AveragingError(f"round {rnd.outer_step} all-reduce failed: {e}") from None
        average[lo:hi] = self.codec.decode(own_bytes, hi - lo)
        digests = [d for _, _, d in done]
        digests.insert(me, own_digest)
        # what we sent: our slices to their owners, then our averaged slice back to every other member
        sent = sum(s for s, _, _ in done) + (len(group.members) - 1) * (len(own_bytes) + 100)
        recv = sum(r for _, r, _ in done) + rnd.bytes_recv
        return average, sent, recv, hashlib.sha256("".join(digests).encode()).hexdigest()

    def _finish_part(self, rnd: _Round, group: Group) -> None:
        """All contributions to our part are in: encode the mean once; everyone applies these bytes."""
        mean = rnd.accumulator.div_(sum(group.weights))
        data = self.codec.encode(mean)
        rnd.part_result.set_result((data, hashlib.sha256(data).hexdigest()))

    async def _serve_reduce(self, _info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        timeout = self.cfg.allreduce_timeout_s
        try:
            request = await read_msg(reader, timeout)
            group_id, peer, part = field(request, "group_id", str), field(request, "peer", str), field(request, "part", int)
            rnd, group = await self._round_of(group_id, timeout)
            me = group.members.index(self.peer_id)
            if part != me or peer not in group.members or peer == self.peer_id or peer in rnd.contributed:
                raise WireError(f"unexpected contribution from {peer[-6:]} for part {part}")
            lo, hi = part_bounds(self._numel, len(group.members), self.codec.block_size)[me]
            data = await read_blob(reader, self.codec.size(hi - lo), timeout)
            rnd.bytes_recv += len(data) + 100
            values = await asyncio.get_running_loop().run_in_executor(None, self.codec.decode, data, hi - lo)
            if peer in rnd.contributed or rnd.part_result.done():
                raise WireError(f"duplicate contribution from {peer[-6:]}")
            rnd.accumulator.add_(values, alpha=group.weights[group.members.index(peer)])
            rnd.contributed.add(peer)
            if len(rnd.contributed) == len(group.members) - 1:
                self._finish_part(rnd, group)
            result, digest = await asyncio.wait_for(asyncio.shield(rnd.part_result), timeout)
            await write_msg(writer, {"sha256": digest})
            await write_blob(writer, result)
        except Exception as e:
            try:
                await write_msg(writer, {"error": str(e)[:200] or type(e).__name__})
            except Exception:
                pass
        finally:
            writer.close()

    async def _round_of(self, group_id: str, timeout_s: float) -> tuple[_Round, Group]:
        """The round a contribution belongs to; it may arrive before our own join reply does."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for rnd in list(self._rounds.values()):
                if rnd.accumulator is not None and rnd.group.done() and rnd.group.exception() is None:
                    group = rnd.group.result()
                    if group.group_id == group_id:
                        return rnd, group
            await asyncio.sleep(POLL_S / 4)
        raise WireError(f"unknown group {group_id[:12]}")


def _make_group(run_id: str, outer_step: int, members: list[str], weights: tuple[float, ...]) -> Group:
    if len(members) != len(weights) or len(set(members)) != len(members):
        raise WireError("malformed group")
    digest = hashlib.sha256(repr((run_id, outer_step, list(members), [float(w) for w in weights])).encode()).hexdigest()
    return Group(outer_step, digest[:32], tuple(members), tuple(float(w) for w in weights))
