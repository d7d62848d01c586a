"""Checkpoint manifests, their gossip through the DHT, and chunked multi-source download with verification.

A holder of θ_global at outer step k packs it (with the outer momentum) into one payload,
cuts it into chunks and describes it by a manifest: sizes and the sha256 of every chunk.
The DHT carries only the ``held`` field of the holder's signed liveness record, naming the
manifest by its sha256 (a model's chunk list can outgrow the DHT's ~64 KiB value limit); the
manifest itself and the chunks travel over our own stream
protocol. A joiner (swarm.adoption decides which state) fetches the manifest from any holder,
checks it against the run's model before allocating anything, spreads the chunks over all
holders with several requests in flight to each, verifies every chunk, bans a holder that
served a bad one, and re-asks another holder on timeout.

A peer serves its live θ_global/momentum buffer (swarm.diloco.OuterState) without a copy: each
chunk is copied out, then the buffer's generation is checked, so a chunk of a state that changed
meanwhile is answered "not held any more" instead of with bytes that fail their hash.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable

import msgpack
import torch
from hivemind.p2p import P2P

from swarm.signature import model_sha256
from swarm.tokenizer import tokenizer_from_json
from swarm.wire import WireError, field, open_stream, read_blob, read_msg, write_blob, write_msg

log = logging.getLogger("swarm")

CHUNKS = "swarm.chunks"
FORMAT = "swarm-state-v1"  # payload: θ_global then outer momentum, little-endian fp32
CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 16 << 20
MAX_MANIFEST_BYTES = 16 << 20
MAX_TOKENIZER_BYTES = 64 << 20
REQUESTS_IN_FLIGHT = 4  # per holder: hides a round trip per chunk on long links


class DownloadError(RuntimeError):
    """No verified copy of the state could be assembled from the holders we know. ``blame``: holders that
    served something wrong (a manifest that does not fit the run, corrupt chunks)."""

    def __init__(self, message: str, blame: set[str] | None = None):
        super().__init__(message)
        self.blame = blame or set()


@dataclass(frozen=True)
class Manifest:
    run_id: str
    outer_step: int
    numel: int  # parameters in θ_global
    model_sha256: str
    size: int  # payload bytes
    chunk_size: int
    chunk_sha256: tuple[str, ...]
    format: str = FORMAT

    def to_bytes(self) -> bytes:
        return msgpack.packb({**self.__dict__, "chunk_sha256": list(self.chunk_sha256)}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Manifest":
        if len(blob) > MAX_MANIFEST_BYTES:
            raise WireError(f"manifest of {len(blob)} bytes is too large")
        try:
            d = msgpack.unpackb(blob, raw=False)
            m = cls(run_id=d["run_id"], outer_step=int(d["outer_step"]), numel=int(d["numel"]),
                    model_sha256=str(d["model_sha256"]), size=int(d["size"]), chunk_size=int(d["chunk_size"]),
                    chunk_sha256=tuple(str(h) for h in d["chunk_sha256"]), format=str(d["format"]))
        except Exception as e:
            raise WireError(f"malformed manifest: {e}") from None
        if m.format != FORMAT or m.size != 8 * m.numel or m.chunk_size <= 0 or \
                len(m.chunk_sha256) != -(-m.size // m.chunk_size):
            raise WireError("manifest fields are inconsistent")
        return m

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def misfit(self, run_id: str, numel: int) -> str | None:
        """Why this manifest cannot describe a state of run ``run_id``'s model of ``numel`` parameters, or None."""
        if self.run_id != run_id:
            return f"it is of run {self.run_id[:64]!r}"
        if self.numel != numel:
            return f"it describes {self.numel} parameters, this run's model has {numel}"
        if self.chunk_size > MAX_CHUNK_BYTES:
            return f"its chunks of {self.chunk_size} bytes exceed {MAX_CHUNK_BYTES}"
        return None

    def chunk(self, payload: bytes | memoryview, index: int) -> memoryview:
        return memoryview(payload)[index * self.chunk_size:(index + 1) * self.chunk_size]


def pack_state(run_id: str, state: dict, chunk_size: int = CHUNK_BYTES) -> tuple[Manifest, memoryview]:
    """(manifest, payload) of a DiLoCo state dict (outer_step, theta_global, momentum). With ``buffer`` (θ and the
    momentum as one fp32 tensor, swarm.diloco.OuterState) the payload is a view of it, else a copy; with
    ``model_sha256`` (θ's hash, already known to OuterState) θ is not hashed again."""
    theta, momentum = state["theta_global"], state["momentum"]
    buffer = state.get("buffer")
    if buffer is None:
        buffer = torch.cat([theta.reshape(-1), momentum.reshape(-1)]).to(torch.float32)
    payload = memoryview(buffer.numpy()).cast("B")
    hashes = tuple(hashlib.sha256(payload[i:i + chunk_size]).hexdigest() for i in range(0, len(payload), chunk_size))
    manifest = Manifest(run_id, int(state["outer_step"]), theta.numel(),
                        state.get("model_sha256") or model_sha256([theta]), len(payload), chunk_size, hashes)
    return manifest, payload


def unpack_state(manifest: Manifest, payload: bytes | bytearray) -> dict:
    """The state a verified payload holds; WireError if its parameters do not hash to the manifest's model."""
    flat = torch.frombuffer(bytearray(payload), dtype=torch.float32)
    theta, momentum = flat[:manifest.numel].clone(), flat[manifest.numel:].clone()
    if model_sha256([theta]) != manifest.model_sha256:
        raise WireError("assembled parameters do not match the manifest's model_sha256")
    return {"outer_step": manifest.outer_step, "theta_global": theta, "momentum": momentum}


def verify_chunks(manifest: Manifest, payload: bytes | memoryview) -> list[int]:
    """Indices of the chunks of ``payload`` whose sha256 differs from the manifest's."""
    return [i for i, digest in enumerate(manifest.chunk_sha256)
            if hashlib.sha256(manifest.chunk(payload, i)).hexdigest() != digest]


class ChunkServer:
    """Serves the manifests and chunks this peer holds (the newest few), to any number of downloaders."""

    KEEP = 2  # manifests served at once: the newest, and the one before for downloads in progress

    def __init__(self, p2p: P2P, timeout_s: float):
        self.p2p, self.timeout_s = p2p, timeout_s
        self._held: collections.OrderedDict[str, _Held] = collections.OrderedDict()
        self.tokenizer: bytes | None = None  # the run's tokenizer.json, for tools that read the model from the swarm

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(CHUNKS, self._serve)

    def hold(self, manifest: Manifest, payload: bytes | memoryview, current: Callable[[], bool] | None = None) -> None:
        """Start serving ``payload`` under its manifest (call on the network loop). ``current()`` says whether a
        live payload still holds the state the manifest describes (None: the payload never changes)."""
        self._held[manifest.sha256] = _Held(manifest, manifest.to_bytes(), payload, current)
        while len(self._held) > self.KEEP:
            self._held.popitem(last=False)

    def chunk_bytes(self, manifest: Manifest, payload: bytes | memoryview, index: int) -> bytes:
        """The bytes we send for chunk ``index``; a test subclass overrides this to play a corrupt holder."""
        return bytes(manifest.chunk(payload, index))

    async def _serve(self, _info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One stream carries any number of requests, one at a time; a bad request ends the stream."""
        try:
            while True:
                try:
                    request = await read_msg(reader, self.timeout_s)
                except WireError:
                    return  # closed, idle or garbage: drop the stream
                try:
                    op = field(request, "op", str)
                    if op == "tokenizer":
                        if self.tokenizer is None:
                            raise WireError("no tokenizer.json here")
                        await write_msg(writer, {"size": len(self.tokenizer)})
                        await write_blob(writer, self.tokenizer)
                        continue
                    held = self._held.get(field(request, "manifest", str))
                    if held is None or held.current is not None and not held.current():
                        raise WireError("manifest not held here (any more)")
                    if op == "manifest":
                        blob = held.manifest_blob
                    elif op == "chunk":
                        index = field(request, "index", int)
                        if not 0 <= index < len(held.manifest.chunk_sha256):
                            raise WireError(f"chunk index {index} out of range")
                        blob = self.chunk_bytes(held.manifest, held.payload, index)  # a copy, then:
                        if held.current is not None and not held.current():  # did the state change meanwhile?
                            raise WireError("manifest not held here (any more)")
                    else:
                        raise WireError(f"unknown op {op!r}")
                except WireError as e:
                    await write_msg(writer, {"error": str(e)})
                    continue
                await write_msg(writer, {"size": len(blob)})
                await write_blob(writer, blob)
        except Exception as e:  # the downloader went away mid-reply
            log.debug("chunk stream ended: %s", e)
        finally:
            writer.close()


@dataclass
class _Held:
    manifest: Manifest
    manifest_blob: bytes
    payload: bytes | memoryview
    current: Callable[[], bool] | None


@dataclass
class DownloadStats:
    bytes: int = 0  # payload bytes fetched over the network
    reused_chunks: int = 0  # chunks taken from a local copy instead
    seconds: float = 0.0
    sources: int = 0  # holders that served at least one verified chunk
    banned: tuple[str, ...] = ()


async def download(p2p: P2P, holders: list[str], manifest_sha256: str, run_id: str, numel: int, timeout_s: float,
                   cap_s: float, local_payload: bytes | memoryview | None = None,
                   local_manifest: Manifest | None = None, in_flight: int = REQUESTS_IN_FLIGHT,
                   hints: dict[str, list[str]] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> tuple[Manifest, dict, DownloadStats]:
    """Assemble and verify the state named ``manifest_sha256`` from ``holders`` (peer ids); ``hints``: their
    addresses, from their liveness records; ``progress(bytes fetched, bytes to fetch)`` after each chunk.

    The manifest must describe a state of run ``run_id``'s model (``numel`` parameters) before a byte is
    allocated for it; each stream read waits at most ``timeout_s``, the whole download at most ``cap_s``.
    DownloadError names in ``blame`` the holders that served a misfit manifest or corrupt data."""
    t0 = time.monotonic()
    try:
        return await asyncio.wait_for(_download(p2p, holders, manifest_sha256, run_id, numel, timeout_s, t0,
                                                local_payload, local_manifest, in_flight, hints, progress), cap_s)
    except asyncio.TimeoutError:
        raise DownloadError(f"download not complete within {cap_s:.0f} s") from None


async def _download(p2p, holders, manifest_sha256, run_id, numel, timeout_s, t0, local_payload, local_manifest,
                    in_flight, hints, progress) -> tuple[Manifest, dict, DownloadStats]:
    manifest = await _fetch_manifest(p2p, holders, manifest_sha256, timeout_s, hints)
    misfit = manifest.misfit(run_id, numel)
    if misfit is not None:  # every holder of this manifest announced it: all of them stand behind it
        raise DownloadError(f"refused manifest {manifest_sha256[:12]}: {misfit}", blame=set(holders))
    # torch.empty, not bytearray(size): the kernel zeroes pages as chunks land, not all of them (0.1-0.7 s for
    # 200 MB on a busy 2-core box) before the first request goes out
    backing = torch.empty(manifest.size, dtype=torch.uint8)
    payload = memoryview(backing.numpy())
    model_hash = _PrefixHash(4 * manifest.numel, manifest.chunk_size)  # θ's bytes are the payload's first ones
    todo: collections.deque[int] = collections.deque()
    stats = DownloadStats()
    for i in range(len(manifest.chunk_sha256)):
        if local_payload is not None and local_manifest is not None and local_manifest.chunk_size == \
                manifest.chunk_size and i < len(local_manifest.chunk_sha256) and \
                local_manifest.chunk_sha256[i] == manifest.chunk_sha256[i] and \
                hashlib.sha256(local_manifest.chunk(local_payload, i)).hexdigest() == manifest.chunk_sha256[i]:
            payload[i * manifest.chunk_size:(i + 1) * manifest.chunk_size] = local_manifest.chunk(local_payload, i)
            model_hash.landed(i, payload)
            stats.reused_chunks += 1
        else:
            todo.append(i)
    remaining = set(todo)
    banned: set[str] = set()
    served: collections.Counter[str] = collections.Counter()

    async def worker(holder: str) -> None:
        failures = 0
        stream = None
        try:
            while remaining and holder not in banned:
                if not todo:
                    await asyncio.sleep(0.02)  # others still in flight may fail and hand chunks back
                    continue
                index = todo.popleft()
                try:
                    if stream is None:
                        stream = await open_stream(p2p, holder, CHUNKS, timeout_s, hints)
                    blob = await _request(stream, manifest_sha256, "chunk", timeout_s, manifest.chunk_size, index)
                except Exception as e:  # timeout, refused, closed: give the chunk to someone else
                    todo.append(index)
                    failures += 1
                    if stream is not None:
                        stream[2].close()
                        stream = None
                    if failures >= 3:
                        log.info("download: giving up on holder %s (%s)", holder[-6:], e)
                        return
                    continue
                if hashlib.sha256(blob).hexdigest() != manifest.chunk_sha256[index]:
                    log.warning("download: holder %s served a corrupt chunk %d: banned", holder[-6:], index)
                    banned.add(holder)
                    todo.append(index)
                    return
                if index in remaining:
                    payload[index * manifest.chunk_size:index * manifest.chunk_size + len(blob)] = blob
                    model_hash.landed(index, payload)
                    remaining.discard(index)
                    served[holder] += 1
                    stats.bytes += len(blob)
                    if progress is not None:
                        progress(stats.bytes, manifest.size - stats.reused_chunks * manifest.chunk_size)
        finally:
            if stream is not None:
                stream[2].close()

    # round-robin over holders, so the first chunks already spread over all of them; workers end on their own
    # (done, banned, or 3 failures), and the caller's cap bounds a pathological trickle
    workers = [asyncio.create_task(worker(h)) for _ in range(in_flight) for h in holders]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
    if remaining:
        raise DownloadError(f"{len(remaining)} of {len(manifest.chunk_sha256)} chunks could not be fetched "
                            f"from {len(holders)} holders ({len(banned)} banned for corrupt data)", blame=banned)
    # every chunk was checked against its sha256 as it landed: no second pass over the payload, and θ's hash was
    # computed meanwhile; the state is a view of the downloaded bytes, not a copy (little-endian fp32, FORMAT)
    if model_hash.hexdigest() != manifest.model_sha256:
        raise DownloadError("assembled parameters do not match the manifest's model_sha256", blame=set(holders))
    flat = backing.view(torch.float32)
    state = {"outer_step": manifest.outer_step, "theta_global": flat[:manifest.numel],
             "momentum": flat[manifest.numel:]}
    stats.seconds, stats.sources, stats.banned = time.monotonic() - t0, len(served), tuple(sorted(banned))
    return manifest, state, stats


class _PrefixHash:
    """sha256 of ``payload[:limit]``, fed in order while chunks land in any order: the model's hash is ready
    when its last chunk lands, instead of costing a pass over the payload after the download."""

    def __init__(self, limit: int, chunk_size: int):
        self.limit, self.chunk_size = limit, chunk_size
        self.hashed = 0  # bytes of the prefix hashed so far
        self._landed: set[int] = set()
        self._sha = hashlib.sha256()

    def landed(self, index: int, payload: memoryview) -> None:
        self._landed.add(index)
        while self.hashed < self.limit and self.hashed // self.chunk_size in self._landed:
            end = min(self.limit, (self.hashed // self.chunk_size + 1) * self.chunk_size)
            self._sha.update(payload[self.hashed:end])
            self.hashed = end

    def hexdigest(self) -> str | None:
        return self._sha.hexdigest() if self.hashed == self.limit else None


async def _fetch_manifest(p2p: P2P, holders: list[str], manifest_sha256: str, timeout_s: float,
                          hints: dict[str, list[str]] | None) -> Manifest:
    errors = []
    for holder in holders:
        stream = None
        try:
            stream = await open_stream(p2p, holder, CHUNKS, timeout_s, hints)
            blob = await _request(stream, manifest_sha256, "manifest", timeout_s, MAX_MANIFEST_BYTES)
            if hashlib.sha256(blob).hexdigest() != manifest_sha256:
                raise WireError("manifest does not match its sha256")
            return Manifest.from_bytes(blob)
        except Exception as e:
            errors.append(f"{holder[-6:]}: {e}")
        finally:
            if stream is not None:
                stream[2].close()
    raise DownloadError(f"no holder served manifest {manifest_sha256[:12]} ({'; '.join(errors)[:300]})")


async def fetch_tokenizer(p2p: P2P, holders: list[str], tokenizer_sha256: str, timeout_s: float,
                          hints: dict[str, list[str]] | None) -> bytes:
    """The run's tokenizer.json from any holder whose copy hashes (canonically) to the run's ``tokenizer_sha256``."""
    for holder in holders:
        stream = None
        try:
            stream = await open_stream(p2p, holder, CHUNKS, timeout_s, hints)
            blob = await _request(stream, "", "tokenizer", timeout_s, MAX_TOKENIZER_BYTES)
            if tokenizer_from_json(blob).sha256 == tokenizer_sha256:
                return blob
        except Exception as e:
            log.debug("tokenizer from %s: %s", holder[-6:], e)
        finally:
            if stream is not None:
                stream[2].close()
    raise DownloadError("no peer served the run's tokenizer.json")


async def _request(stream, manifest_sha256: str, op: str, timeout_s: float, max_bytes: int,
                   index: int | None = None) -> bytes:
    _, reader, writer = stream
    request = {"op": op, "manifest": manifest_sha256}
    if index is not None:
        request["index"] = index
    await write_msg(writer, request)
    reply = await read_msg(reader, timeout_s)
    if "error" in reply:
        raise WireError(str(reply["error"])[:200])
    size = field(reply, "size", int)
    if not 0 <= size <= max_bytes:
        raise WireError(f"reply of {size} bytes exceeds {max_bytes}")
    return await read_blob(reader, size, timeout_s)
