"""The all-reduce of pseudo-gradients for one outer step, retried without the peers that break it.

Reduce-scatter then all-gather: owner i of the group (swarm.matchmaking; the members others can
dial) owns the i-th slice of the flat vector, receives every member's encoded slice, computes the
sample-weighted mean, encodes it once and sends those very bytes back to every member; the owner
decodes the same bytes. Every member therefore applies byte-identical averages, and each part's
result carries its sha256 so a torn transfer is caught. A member behind NAT owns no part: it
opens its streams to the owners, and receives the results on them. hivemind's all-reduce
instead reports success when a part was lost and lets each owner keep values different from
everyone else's (docs/architecture.md, "hivemind pitfalls").

Slices travel in chunks of ``swarm.chunk_values`` on one stream per (member, owner): the
owner reduces chunk c and sends it back as soon as every member's chunk c is in, while later
chunks are still arriving. The uplink does not sit idle between the two phases, so on a
long-RTT link a round costs close to the bandwidth bound plus a few RTTs.

Against hostile or broken peers, the owner refuses a contribution it cannot decode or that
holds non-finite values, and clips a contribution whose norm exceeds ``CLIP_FACTOR`` times the
(lower) median norm of the chunk's contributions; both are reported with the offender's id. A
member refuses a result whose norm is implausibly large next to its own contribution (an owner
lying about its part) and blames the owner. Failures are classified: a remote one (a timeout, a
reset or refused stream, bad data) blames the peer behind it, and the survivors retry the round
without it; a local one (our own bug or resources) blames nobody and fails the round at once.
Δ is overwritten with the average only once every part has arrived and verified, so a failed
attempt leaves it intact for the next.
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

from swarm import caps, compression, int4
from swarm.config import SwarmConfig
from swarm.liveness import Liveness
from swarm.matchmaking import AveragingError, Group, Matchmaker, StaleRound
from swarm.wire import WireError, field, is_remote, open_stream, read_blob, read_msg, write_blob, write_msg

log = logging.getLogger("swarm")

REDUCE = "swarm.reduce"
CLIP_FACTOR = 4.0  # a contribution may be this many times the median norm of its slice
WEIGHT_FACTOR = 4.0  # and weigh at most this many times the median weight: the weight is the member's own claim
HEADER_BYTES = 100  # framing and header per transfer, for the byte counts

__all__ = ["AverageResult", "Averager", "AveragingError", "StaleRound", "chunk_bounds", "part_bounds", "robust_mean"]


@dataclass
class AverageResult:
    average: torch.Tensor  # the Δ buffer that was averaged, now holding the group's average
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
    lower median norm and each weight to ``WEIGHT_FACTOR`` times the upper median weight (a member that claims
    10^11 samples would otherwise be the average on its own); returns the mean and {peer: scale} for the clipped
    ones. Computed by the slice's owner alone, whose encoded result every member applies: its float details need
    not agree across machines."""
    norms = {p: float(x.norm()) for p, (_, x) in contributions.items()}
    limit = clip_factor * statistics.median_low(norms.values())
    heaviest = WEIGHT_FACTOR * statistics.median_high(w for w, _ in contributions.values())
    weights = {p: min(w, heaviest) for p, (w, _) in contributions.items()}  # alone: w <= 4w, as it is
    total = sum(weights.values())
    mean = torch.zeros_like(next(iter(contributions.values()))[1])
    clipped = {}
    for peer, (_, x) in sorted(contributions.items()):
        scale = 1.0
        if len(contributions) > 1 and norms[peer] > limit > 0:
            scale = limit / norms[peer]
            clipped[peer] = scale
        mean.add_(x, alpha=weights[peer] * scale / total)
    return mean, clipped


class Codec:
    """The wire form of one slice: int8 or int4 blockwise absmax (swarm.compression, swarm.int4), or raw fp32.
    Blockwise encodings of block-aligned parts concatenate to the encoding of the whole vector, so what a member
    sends of its Δ, part by part, is what ``sent`` computes on the whole of it."""

    LOSSY = ("int4",)  # codecs whose rounding error is carried into the next round (swarm.error_feedback)

    def __init__(self, name: str, block_size: int):
        self.name, self.block_size = name, block_size

    @property
    def lossy(self) -> bool:
        return self.name in self.LOSSY

    def size(self, numel: int) -> int:
        if self.name == "int8":
            return compression.encoded_size(numel, self.block_size)
        if self.name == "int4":
            return int4.encoded_size(numel, self.block_size)
        return 4 * numel

    def encode(self, x: torch.Tensor) -> bytes:
        if self.name == "int8":
            return compression.encode(x, self.block_size)
        if self.name == "int4":
            return int4.encode(x, self.block_size).numpy().tobytes()
        if not torch.isfinite(x).all():
            raise compression.CodecError(f"refusing to send {int((~torch.isfinite(x)).sum())} non-finite values")
        return x.to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()

    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        if self.name == "int8":
            return compression.decode(data, numel, self.block_size)
        if self.name == "int4":
            return int4.decode(data, numel, self.block_size)
        if len(data) != 4 * numel:
            raise compression.CodecError(f"expected {4 * numel} bytes of fp32, got {len(data)}")
        if numel == 0:  # a vector shorter than one block per member leaves some parts empty
            return torch.empty(0, dtype=torch.float32)
        x = torch.frombuffer(bytearray(data), dtype=torch.float32)
        if not torch.isfinite(x).all():
            raise compression.CodecError(f"{int((~torch.isfinite(x)).sum())} non-finite values")
        return x

    def sent(self, x: torch.Tensor) -> torch.Tensor:
        """What the owners receive of ``x`` (flat fp32), decoded into a new tensor: for error feedback."""
        return self.decode(self.encode(x), x.numel())


def chunk_bounds(lo: int, hi: int, chunk_values: int) -> list[tuple[int, int]]:
    """The pipeline chunks of the slice [lo, hi): at least one, even for an empty slice."""
    return [(a, min(a + chunk_values, hi)) for a in range(lo, hi, chunk_values)] or [(lo, hi)]


@dataclass
class _Part:
    """The owner's side of one attempt: its slice, chunk by chunk, and what has arrived for each chunk."""

    group: Group
    index: int  # which part of the vector we own
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

    def __init__(self, p2p: P2P, liveness: Liveness, peer_id: str, cfg: SwarmConfig, swarm_is_past):
        self.p2p, self.liveness, self.peer_id, self.cfg = p2p, liveness, peer_id, cfg
        self.matchmaker = Matchmaker(p2p, liveness, peer_id, cfg, swarm_is_past)
        self.codec = Codec(cfg.codec, cfg.block_size)
        self._parts: dict[str, _Part] = {}  # group id -> our part, while an attempt runs

    async def start(self) -> None:
        await self.matchmaker.start()
        await self.p2p.add_binary_stream_handler(REDUCE, self._serve_reduce)

    async def average(self, outer_step: int, delta: torch.Tensor, weight: float, base: str,
                      loss: float = 0.0) -> AverageResult:
        """All-reduce ``delta`` (flat fp32) with the peers of round ``outer_step``, weighted by samples. On success
        ``delta`` holds the group's average; on failure it is unchanged.

        Bounded in time as a whole, whatever the peers do: AveragingError past swarm.caps.round_s."""
        limit_s = caps.round_s(self.cfg, self.codec.size(delta.numel()))
        try:
            return await asyncio.wait_for(self._average(outer_step, delta, weight, base, loss), limit_s)
        except asyncio.TimeoutError:
            self.matchmaker.abandon(outer_step)
            raise AveragingError(f"round {outer_step} did not finish within {limit_s:.0f} s") from None

    async def _average(self, outer_step: int, delta: torch.Tensor, weight: float, base: str,
                       loss: float) -> AverageResult:
        t0 = time.monotonic()
        excluded: set[str] = set()
        attempt = 0
        while True:
            group = await self.matchmaker.form_group(outer_step, attempt, weight, base, loss, excluded)
            if attempt > 0 and len(group.members) == 1:  # everyone else failed us: keep Δ for the next round
                self.matchmaker.abandon(outer_step)
                raise AveragingError(f"round {outer_step}: no member of the failed attempt is left to retry with")
            t1 = time.monotonic()
            try:
                result = await self._attempt(group, delta)
            except AveragingError as e:
                self.matchmaker.abandon(outer_step)
                if e.local:
                    raise
                excluded |= e.blame
                attempt = group.attempt + 1
                if attempt >= caps.MAX_ATTEMPTS or not e.blame:
                    raise AveragingError(f"round {outer_step} failed after {attempt} attempts: {e}") from None
                log.info("round %d attempt %d failed (%s); retrying without %s", outer_step, group.attempt, e,
                         ", ".join(p[-6:] for p in sorted(e.blame)))
                continue
            self.matchmaker.close_round(outer_step, group.members)
            result.matchmaking_s, result.allreduce_s = t1 - t0, time.monotonic() - t1
            result.attempts = group.attempt + 1
            return result

    async def _attempt(self, group: Group, delta: torch.Tensor) -> AverageResult:
        """One all-reduce attempt, capped by swarm.caps.allreduce_s; the members it did not hear from are blamed."""
        limit_s = caps.allreduce_s(self.cfg, self.codec.size(delta.numel()))
        task = asyncio.ensure_future(self._all_reduce(group, delta))
        try:
            return await asyncio.wait_for(asyncio.shield(task), limit_s)
        except asyncio.TimeoutError:
            part = self._parts.get(group.group_id)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            silent = part.missing() if part is not None else set(group.owners) - {self.peer_id}
            raise AveragingError(f"all-reduce not complete within {limit_s:.0f} s", blame=silent) from None

    async def _all_reduce(self, group: Group, delta: torch.Tensor) -> AverageResult:
        """Reduce-scatter and all-gather, pipelined: each slice travels in chunks, and an owner reduces and
        returns chunk c as soon as every member's chunk c is in, while later chunks are still on the wire."""
        if len(group.members) == 1:
            return AverageResult(delta, group, 0, 0, 0.0, 0.0, hashlib.sha256(b"solo").hexdigest())
        bounds = part_bounds(delta.numel(), len(group.owners), self.codec.block_size)
        me = group.owners.index(self.peer_id) if self.peer_id in group.owners else None
        part = None
        if me is not None:
            chunks = chunk_bounds(*bounds[me], self.cfg.chunk_values)
            loop = asyncio.get_running_loop()
            part = _Part(group, me, chunks,
                         [{self.peer_id: (group.weights[group.members.index(self.peer_id)], delta[a:b])}
                          for a, b in chunks], [loop.create_future() for _ in chunks])
            self._parts[group.group_id] = part
            for c in range(len(chunks)):  # a group where everyone else's stream fails still finishes ours
                self._reduce_if_complete(part, c)
        timeout = self.cfg.allreduce_timeout_s

        async def exchange(j: int) -> tuple[int, int, list[bytes], str]:
            owner = group.owners[j]
            try:
                _, reader, writer = await open_stream(self.p2p, owner, REDUCE, timeout, self.liveness.sdht.addresses)
                try:
                    sent, (received, blobs, digest) = await _both(
                        self._send_chunks(writer, group, j, delta, bounds[j]),
                        self._receive_result(reader, delta, bounds[j]))
                    return sent, received, blobs, digest
                finally:
                    writer.close()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if is_remote(e):
                    raise AveragingError(f"part {j} (owner {owner[-6:]}): {e}", blame={owner}) from None
                log.debug("all-reduce of part %d failed on our side", j, exc_info=True)
                raise AveragingError(f"part {j} failed on our side: {type(e).__name__}: {e}", local=True) from None

        tasks = {j: asyncio.create_task(exchange(j)) for j in range(len(group.owners)) if j != me}
        try:
            done = dict(zip(tasks, await asyncio.gather(*tasks.values())))
            own_digest = None
            if part is not None:
                try:
                    own_digest = await asyncio.wait_for(asyncio.shield(part.digest), timeout)
                except asyncio.TimeoutError:
                    missing = part.missing()
                    raise AveragingError(f"no contribution from {', '.join(p[-6:] for p in missing)}", blame=missing)
                if len(part.refused) == len(group.members) - 1:  # our part would be our Δ alone, the others' not
                    raise AveragingError("every other member's contribution to our part was refused",
                                         blame=set(part.refused))
                # stay until every member has our part: a peer that leaves right after its last round
                # must not take a part of that round away from the others
                try:
                    await asyncio.wait_for(part.all_handled.wait(), timeout)
                except asyncio.TimeoutError:
                    log.info("round %d: our part reached only %d of %d members in time", group.outer_step,
                             part.handled, len(group.members) - 1)
        except BaseException:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            raise
        finally:
            self._parts.pop(group.group_id, None)
        # every part is in and verified: only now is Δ replaced by the average
        digests = []
        for j, (a, b) in enumerate(bounds):
            if j == me:
                blobs = [r.result() for r in part.results]
                digests.append(own_digest)
            else:
                blobs = done[j][2]
                digests.append(done[j][3])
            for (lo, hi), blob in zip(chunk_bounds(a, b, self.cfg.chunk_values), blobs):
                delta[lo:hi] = self.codec.decode(blob, hi - lo)
        sent = sum(s for s, _, _, _ in done.values()) + (part.bytes_sent if part else 0)
        recv = sum(r for _, r, _, _ in done.values()) + (part.bytes_recv if part else 0)
        return AverageResult(delta, group, sent, recv, 0.0, 0.0, hashlib.sha256("".join(digests).encode()).hexdigest(),
                             refused=dict(part.refused) if part else {}, clipped=dict(part.clipped) if part else {})

    async def _send_chunks(self, writer: asyncio.StreamWriter, group: Group, j: int, delta: torch.Tensor,
                           bounds: tuple[int, int]) -> int:
        """Our contribution to part j, chunk after chunk, each encoded while the previous one is on the wire."""
        loop = asyncio.get_running_loop()
        sent = await write_msg(writer, {"group_id": group.group_id, "peer": self.peer_id, "part": j})
        for a, b in chunk_bounds(*bounds, self.cfg.chunk_values):
            sent += await write_blob(writer, await loop.run_in_executor(None, self.codec.encode, delta[a:b]))
        return sent

    async def _receive_result(self, reader: asyncio.StreamReader, delta: torch.Tensor,
                              bounds: tuple[int, int]) -> tuple[int, list[bytes], str]:
        """The owner's averaged chunks of its part, checked and kept encoded (Δ is still being sent meanwhile);
        (bytes received, the chunks, sha256 of the part)."""
        loop, timeout = asyncio.get_running_loop(), self.cfg.allreduce_timeout_s
        digest, received, blobs = hashlib.sha256(), 0, []
        for c, (a, b) in enumerate(chunk_bounds(*bounds, self.cfg.chunk_values)):
            header = await read_msg(reader, timeout)
            if "error" in header:
                raise WireError(str(header["error"])[:200])
            if field(header, "chunk", int) != c:
                raise WireError(f"chunk {header['chunk']} arrived where chunk {c} was due")
            blob = await read_blob(reader, self.codec.size(b - a), timeout)
            digest.update(blob)
            received += len(blob) + HEADER_BYTES
            try:
                values = await loop.run_in_executor(None, self.codec.decode, blob, b - a)
            except compression.CodecError as e:
                raise WireError(f"undecodable result: {e}") from None
            # a mean of clipped contributions stays near ours: an owner returning more lies about its part
            own_norm = float(delta[a:b].norm())
            if own_norm > 0 and float(values.norm()) > 2 * CLIP_FACTOR * own_norm:
                raise WireError(f"result norm {float(values.norm()):.3g} is implausible next to ours "
                                f"({own_norm:.3g})")
            blobs.append(blob)
        trailer = await read_msg(reader, timeout)
        if "error" in trailer:
            raise WireError(str(trailer["error"])[:200])
        if field(trailer, "sha256", str) != digest.hexdigest():
            raise WireError("result failed its sha256 check")
        return received, blobs, digest.hexdigest()

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
                            peer, part.index, scale)
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
            if field(request, "part", int) != part.index or peer not in group.members \
                    or peer == self.peer_id or peer in part.streams:
                part = None  # not one of the member streams we wait for
                raise WireError(f"unexpected contribution from {peer[-6:]}")
            part.streams.add(peer)
            await _both(self._take_contribution(reader, part, peer), self._return_result(writer, part))
        except Exception as e:
            if is_remote(e):
                log.info("all-reduce stream from %s ended: %s: %s", info.peer_id.to_base58()[-6:], type(e).__name__, e)
            else:  # our own failure: the round fails on our side, and the member is not blamed for it
                log.debug("serving the all-reduce failed on our side", exc_info=True)
                if part is not None and not part.digest.done():
                    part.digest.set_exception(AveragingError(f"serving our part failed on our side: "
                                                             f"{type(e).__name__}: {e}", local=True))
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
            except Exception as e:  # a member that sends garbage, goes silent or resets the stream is left out
                if not (is_remote(e) or isinstance(e, compression.CodecError)):
                    raise
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
