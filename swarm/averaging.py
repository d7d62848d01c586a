"""The all-reduce of pseudo-gradients for one outer step, retried without the peers that break it.

Reduce-scatter then all-gather: member i of the group (swarm.matchmaking) owns the i-th
slice of the flat vector, receives everyone's encoded slice, computes the sample-weighted
mean, encodes it once and sends those very bytes back to every member; the owner decodes
the same bytes. Every member therefore applies byte-identical averages, and each part's
result carries its sha256 so a torn transfer is caught. hivemind's all-reduce instead
reports success when a part was lost and lets each owner keep values different from
everyone else's (shared/HIVEMIND.md).

Slices travel in chunks of ``swarm.chunk_values`` on one stream per (member, owner): the
owner reduces chunk c and sends it back as soon as every member's chunk c is in, while later
chunks are still arriving. The uplink does not sit idle between the two phases, so on a
long-RTT link a round costs close to the bandwidth bound plus a few RTTs, instead of each
phase's tail and a second TCP slow start on the return direction.

Against hostile or broken peers, the owner refuses a contribution it cannot decode or
that holds non-finite values, and clips a contribution whose norm exceeds
``CLIP_FACTOR`` times the (lower) median norm of the chunk's contributions; both are
reported with the offender's id. A member refuses a result whose norm is implausibly
large next to its own contribution (an owner lying about its part) and blames the owner.
A failed attempt (a member died or stalled) raises nothing to the caller at once: the
survivors retry the round without the peers they blame.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import statistics
import time
from dataclasses import dataclass, field as dc_field

import torch
from hivemind.p2p import P2P

from swarm import compression
from swarm.config import SwarmConfig
from swarm.dht import SwarmDHT
from swarm.matchmaking import AveragingError, Group, Matchmaker, StaleRound
from swarm.wire import WireError, field, open_stream, read_blob, read_msg, write_blob, write_msg

log = logging.getLogger("swarm")

REDUCE = "swarm.reduce"
MAX_ATTEMPTS = 3  # of one round, before the peer gives up and keeps training locally
CLIP_FACTOR = 4.0  # a contribution may be this many times the median norm of its slice
HEADER_BYTES = 100  # framing and header per transfer, for the byte counts

__all__ = ["AverageResult", "Averager", "AveragingError", "StaleRound", "chunk_bounds", "part_bounds", "robust_mean"]


@dataclass
class AverageResult:
    average: torch.Tensor
    group: Group
    bytes_sent: int
    bytes_recv: int
    matchmaking_s: float
    allreduce_s: float
    average_sha256: str  # over the result bytes of every part, in order: equal on every member
    attempts: int = 1
    refused: dict[str, str] = dc_field(default_factory=dict)  # peer -> why its contribution to our part was refused
    clipped: dict[str, float] = dc_field(default_factory=dict)  # peer -> factor its contribution was scaled by


def part_bounds(numel: int, parts: int, block: int) -> list[tuple[int, int]]:
    """Split [0, numel) into ``parts`` contiguous slices aligned to codec blocks."""
    blocks = -(-numel // block)
    edges = [min(numel, (blocks * i // parts) * block) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def robust_mean(contributions: dict[str, tuple[float, torch.Tensor]], clip_factor: float = CLIP_FACTOR
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Sample-weighted mean of {peer: (weight, slice)}, each slice's norm clipped to ``clip_factor`` times the
    lower median norm; returns the mean and {peer: scale} for the clipped ones."""
    norms = {p: float(x.norm()) for p, (_, x) in contributions.items()}
    limit = clip_factor * statistics.median_low(norms.values())
    total = sum(w for w, _ in contributions.values())
    mean = torch.zeros_like(next(iter(contributions.values()))[1])
    clipped = {}
    for peer, (weight, x) in sorted(contributions.items()):
        scale = 1.0
        if len(contributions) > 1 and norms[peer] > limit > 0:
            scale = limit / norms[peer]
            clipped[peer] = scale
        mean.add_(x, alpha=weight * scale / total)
    return mean, clipped


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
        if len(data) != 4 * numel:
            raise compression.CodecError(f"expected {4 * numel} bytes of fp32, got {len(data)}")
        if numel == 0:  # a vector shorter than one block per member leaves some parts empty
            return torch.empty(0, dtype=torch.float32)
        x = torch.frombuffer(bytearray(data), dtype=torch.float32)
        if not torch.isfinite(x).all():
            raise compression.CodecError(f"{int((~torch.isfinite(x)).sum())} non-finite values")
        return x


def chunk_bounds(lo: int, hi: int, chunk_values: int) -> list[tuple[int, int]]:
    """The pipeline chunks of the slice [lo, hi): at least one, even for an empty slice."""
    return [(a, min(a + chunk_values, hi)) for a in range(lo, hi, chunk_values)] or [(lo, hi)]


@dataclass
class _Part:
    """The owner's side of one attempt: its slice, chunk by chunk, and what has arrived for each chunk."""

    group: Group
    chunks: list[tuple[int, int]]
    arrived: list[dict[str, tuple[float, torch.Tensor]]]  # per chunk: peer -> (weight, values), ours included
    results: list[asyncio.Future]  # per chunk: the encoded mean, the same bytes for every member
    refused: dict[str, str] = dc_field(default_factory=dict)
    clipped: dict[str, float] = dc_field(default_factory=dict)
    streams: set[str] = dc_field(default_factory=set)  # members whose contribution stream has begun
    digest: asyncio.Future = dc_field(default_factory=lambda: asyncio.get_running_loop().create_future())
    bytes_recv: int = 0
    bytes_sent: int = 0
    handled: int = 0  # member streams served to the end (result sent, or the member went away)
    all_handled: asyncio.Event = dc_field(default_factory=asyncio.Event)

    def chunk_complete(self, c: int) -> bool:
        return len(self.arrived[c]) + len(self.refused) == len(self.group.members)

    def missing(self) -> set[str]:
        """Members that owe us a chunk not yet received."""
        return {p for c, got in enumerate(self.arrived) if not self.results[c].done()
                for p in self.group.members if p not in got and p not in self.refused}


class Averager:
    """Serves and drives the all-reduce of one peer; lives on the peer's network event loop."""

    def __init__(self, p2p: P2P, sdht: SwarmDHT, peer_id: str, cfg: SwarmConfig):
        self.p2p, self.sdht, self.peer_id, self.cfg = p2p, sdht, peer_id, cfg
        self.matchmaker = Matchmaker(p2p, sdht, peer_id, cfg)
        self.codec = Codec(cfg.codec, cfg.block_size)
        self._parts: dict[str, _Part] = {}  # group id -> our part, while an attempt runs

    async def start(self) -> None:
        await self.matchmaker.start()
        await self.p2p.add_binary_stream_handler(REDUCE, self._serve_reduce)

    async def average(self, outer_step: int, delta: torch.Tensor, weight: float, base: str) -> AverageResult:
        """All-reduce ``delta`` (flat fp32) with the peers of round ``outer_step``, weighted by samples.

        Bounded in time as a whole, whatever the peers do: AveragingError past the sum of its phases' timeouts."""
        cfg = self.cfg
        limit_s = MAX_ATTEMPTS * (cfg.gather_timeout_s + 2 * cfg.join_timeout_s + 3 * cfg.allreduce_timeout_s)
        try:
            return await asyncio.wait_for(self._average(outer_step, delta, weight, base), limit_s)
        except asyncio.TimeoutError:
            self.matchmaker.abandon(outer_step)
            raise AveragingError(f"round {outer_step} did not finish within {limit_s:.0f} s") from None

    async def _average(self, outer_step: int, delta: torch.Tensor, weight: float, base: str) -> AverageResult:
        t0 = time.monotonic()
        excluded: set[str] = set()
        attempt = 0
        while True:
            group = await self.matchmaker.form_group(outer_step, attempt, weight, base, excluded)
            t1 = time.monotonic()
            try:
                result = await self._all_reduce(group, delta)
            except AveragingError as e:
                self.matchmaker.abandon(outer_step)
                excluded |= e.blame
                attempt = group.attempt + 1
                if attempt >= MAX_ATTEMPTS or not e.blame:
                    raise AveragingError(f"round {outer_step} failed after {attempt} attempts: {e}") from None
                log.info("round %d attempt %d failed (%s); retrying without %s", outer_step, group.attempt, e,
                         ", ".join(p[-6:] for p in sorted(e.blame)))
                continue
            self.matchmaker.close_round(outer_step)
            result.matchmaking_s, result.allreduce_s = t1 - t0, time.monotonic() - t1
            result.attempts = group.attempt + 1
            return result

    async def _all_reduce(self, group: Group, delta: torch.Tensor) -> AverageResult:
        """Reduce-scatter and all-gather, pipelined: each slice travels in chunks, and an owner reduces and
        returns chunk c as soon as every member's chunk c is in, while later chunks are still on the wire."""
        if len(group.members) == 1:
            return AverageResult(delta.clone(), group, 0, 0, 0.0, 0.0, hashlib.sha256(b"solo").hexdigest())
        me = group.members.index(self.peer_id)
        bounds = part_bounds(delta.numel(), len(group.members), self.codec.block_size)
        chunks = chunk_bounds(*bounds[me], self.cfg.chunk_values)
        loop = asyncio.get_running_loop()
        part = _Part(group, chunks, [{self.peer_id: (group.weights[me], delta[a:b])} for a, b in chunks],
                     [loop.create_future() for _ in chunks])
        self._parts[group.group_id] = part
        for c in range(len(chunks)):  # a group where everyone else's stream fails still finishes ours
            self._reduce_if_complete(part, c)
        average = torch.empty_like(delta)
        timeout = self.cfg.allreduce_timeout_s

        async def exchange(j: int) -> tuple[int, int, str]:
            owner = group.members[j]
            try:
                _, reader, writer = await open_stream(self.p2p, owner, REDUCE, timeout, self.sdht.addresses)
                try:
                    sent, (received, digest) = await _both(self._send_chunks(writer, group, j, delta, bounds[j]),
                                                           self._receive_result(reader, delta, average, bounds[j]))
                    return sent, received, digest
                finally:
                    writer.close()
            except Exception as e:
                raise AveragingError(f"part {j} (owner {owner[-6:]}): {e}", blame={owner}) from None

        tasks = [asyncio.create_task(exchange(j)) for j in range(len(group.members)) if j != me]
        try:
            done = await asyncio.gather(*tasks)
            try:
                own_digest = await asyncio.wait_for(asyncio.shield(part.digest), timeout)
            except asyncio.TimeoutError:
                missing = part.missing()
                raise AveragingError(f"no contribution from {', '.join(p[-6:] for p in missing)}", blame=missing)
            # stay until every member has our part: a peer that leaves right after its last round
            # must not take a part of that round away from the others
            try:
                await asyncio.wait_for(part.all_handled.wait(), timeout)
            except asyncio.TimeoutError:
                log.info("round %d: our part reached only %d of %d members in time", group.outer_step,
                         part.handled, len(group.members) - 1)
        except AveragingError:
            for task in tasks:
                task.cancel()
            raise
        finally:
            self._parts.pop(group.group_id, None)
        for (a, b), result in zip(chunks, part.results):
            average[a:b] = self.codec.decode(result.result(), b - a)
        digests = [d for _, _, d in done]
        digests.insert(me, own_digest)
        sent = sum(s for s, _, _ in done) + part.bytes_sent
        recv = sum(r for _, r, _ in done) + part.bytes_recv
        return AverageResult(average, group, sent, recv, 0.0, 0.0,
                             hashlib.sha256("".join(digests).encode()).hexdigest(),
                             refused=part.refused, clipped=part.clipped)

    async def _send_chunks(self, writer: asyncio.StreamWriter, group: Group, j: int, delta: torch.Tensor,
                           bounds: tuple[int, int]) -> int:
        """Our contribution to part j, chunk after chunk, each encoded while the previous one is on the wire."""
        loop = asyncio.get_running_loop()
        sent = await write_msg(writer, {"group_id": group.group_id, "peer": self.peer_id, "part": j})
        for a, b in chunk_bounds(*bounds, self.cfg.chunk_values):
            sent += await write_blob(writer, await loop.run_in_executor(None, self.codec.encode, delta[a:b]))
        return sent

    async def _receive_result(self, reader: asyncio.StreamReader, delta: torch.Tensor, average: torch.Tensor,
                              bounds: tuple[int, int]) -> tuple[int, str]:
        """The owner's averaged chunks of its part, into ``average``; (bytes received, sha256 of the part)."""
        loop, timeout = asyncio.get_running_loop(), self.cfg.allreduce_timeout_s
        digest, received = hashlib.sha256(), 0
        for c, (a, b) in enumerate(chunk_bounds(*bounds, self.cfg.chunk_values)):
            header = await read_msg(reader, timeout)
            if "error" in header:
                raise WireError(str(header["error"])[:200])
            if field(header, "chunk", int) != c:
                raise WireError(f"chunk {header['chunk']} arrived where chunk {c} was due")
            blob = await read_blob(reader, self.codec.size(b - a), timeout)
            digest.update(blob)
            received += len(blob) + HEADER_BYTES
            values = await loop.run_in_executor(None, self.codec.decode, blob, b - a)
            # a mean of clipped contributions stays near ours: an owner returning more lies about its part
            own_norm = float(delta[a:b].norm())
            if own_norm > 0 and float(values.norm()) > 2 * CLIP_FACTOR * own_norm:
                raise WireError(f"result norm {float(values.norm()):.3g} is implausible next to ours "
                                f"({own_norm:.3g})")
            average[a:b] = values
        trailer = await read_msg(reader, timeout)
        if "error" in trailer:
            raise WireError(str(trailer["error"])[:200])
        if field(trailer, "sha256", str) != digest.hexdigest():
            raise WireError("result failed its sha256 check")
        return received, digest.hexdigest()

    def _reduce_if_complete(self, part: _Part, c: int) -> None:
        """Every contribution to chunk c of our part is in or refused: encode its robust mean once; all members
        apply these bytes. The last chunk done fixes the part's sha256."""
        if not part.chunk_complete(c) or part.results[c].done():
            return
        mean, clipped = robust_mean(part.arrived[c])
        part.arrived[c] = {}  # the contributions are spent: free them while later chunks arrive
        for peer, scale in clipped.items():
            if peer not in part.clipped:
                log.warning("clipped the contribution of %s to part %d by %.2g (norm far above the others')",
                            peer, part.group.members.index(self.peer_id), scale)
            part.clipped[peer] = min(scale, part.clipped.get(peer, 1.0))
        part.results[c].set_result(self.codec.encode(mean))
        if all(r.done() for r in part.results):
            part.digest.set_result(hashlib.sha256(b"".join(r.result() for r in part.results)).hexdigest())

    def _refuse(self, part: _Part, peer: str, why: Exception) -> None:
        part.refused[peer] = str(why)[:200]
        log.warning("refused the contribution of %s to round %d: %s", peer, part.group.outer_step, why)
        for c in range(len(part.chunks)):
            self._reduce_if_complete(part, c)

    async def _serve_reduce(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        timeout = self.cfg.allreduce_timeout_s
        part = None
        try:
            request = await read_msg(reader, timeout)
            group_id, peer = field(request, "group_id", str), field(request, "peer", str)
            if peer != info.peer_id.to_base58():  # libp2p authenticated the stream's end: no one speaks for another
                raise WireError("the stream's peer id differs from the contribution's")
            part = await self._part_of(group_id, timeout)
            group = part.group
            if field(request, "part", int) != group.members.index(self.peer_id) or peer not in group.members \
                    or peer == self.peer_id or peer in part.streams:
                part = None  # not one of the member streams we wait for
                raise WireError(f"unexpected contribution from {peer[-6:]}")
            part.streams.add(peer)
            await _both(self._take_contribution(reader, part, peer), self._return_result(writer, part))
        except Exception as e:
            log.info("all-reduce stream from %s ended: %s: %s", info.peer_id.to_base58()[-6:], type(e).__name__, e)
            try:
                await write_msg(writer, {"error": str(e)[:200] or type(e).__name__})
            except Exception:
                pass
        finally:
            writer.close()
            if part is not None:  # this member's stream is done, delivered or not
                part.handled += 1
                if part.handled == len(part.group.members) - 1:
                    part.all_handled.set()

    async def _take_contribution(self, reader: asyncio.StreamReader, part: _Part, peer: str) -> None:
        """A member's chunks of our part; one that cannot be read or decoded refuses the member for the round."""
        loop, timeout = asyncio.get_running_loop(), self.cfg.allreduce_timeout_s
        weight = part.group.weights[part.group.members.index(peer)]
        for c, (a, b) in enumerate(part.chunks):
            try:
                data = await read_blob(reader, self.codec.size(b - a), timeout)
                part.bytes_recv += len(data) + HEADER_BYTES
                values = await loop.run_in_executor(None, self.codec.decode, data, b - a)
            except (WireError, compression.CodecError) as e:
                self._refuse(part, peer, e)
                return
            part.arrived[c][peer] = (weight, values)
            self._reduce_if_complete(part, c)

    async def _return_result(self, writer: asyncio.StreamWriter, part: _Part) -> None:
        """Each averaged chunk as soon as it exists, then the part's sha256."""
        timeout, sent = self.cfg.allreduce_timeout_s, 0
        try:
            for c, result in enumerate(part.results):
                data = await asyncio.wait_for(asyncio.shield(result), timeout)
                sent += await write_msg(writer, {"chunk": c})
                sent += await write_blob(writer, data)
            sent += await write_msg(writer, {"sha256": await asyncio.shield(part.digest)})
        finally:  # one total per stream: `part.bytes_sent += await ...` would lose the other streams' updates
            part.bytes_sent += sent

    async def _part_of(self, group_id: str, timeout_s: float) -> _Part:
        """Our part of a group; a contribution may arrive just before our own join reply does."""
        deadline = time.monotonic() + min(timeout_s, self.cfg.join_timeout_s)
        while group_id not in self._parts:
            if time.monotonic() > deadline:
                raise WireError(f"unknown group {group_id[:12]}")
            await asyncio.sleep(0.02)
        return self._parts[group_id]


async def _both(first, second):
    """Run two coroutines at once (a stream's sending and receiving halves); if either fails, stop the other."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        done = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return done
