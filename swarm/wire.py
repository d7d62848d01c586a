"""Framing for our own libp2p streams: length-prefixed msgpack headers and raw byte payloads.

Everything read here comes from an untrusted peer: every length is checked against an
explicit limit before any buffer is allocated, and every read has a deadline.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError
from multiaddr import Multiaddr

MAX_HEADER_BYTES = 64 * 1024
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
WRITE_CHUNK_BYTES = 1 << 20


class WireError(RuntimeError):
    """A peer sent something malformed, oversized or nothing at all in time."""


# What a remote peer can cause: bad or missing data, a stream it reset or refused, a dial that failed. Anything
# else raised while talking to a peer is our own failure, and no peer is blamed for it (docs/architecture.md).
REMOTE_ERRORS = (WireError, asyncio.TimeoutError, ConnectionError, EOFError, asyncio.IncompleteReadError,
                 P2PDaemonError, P2PHandlerError)


def is_remote(error: BaseException) -> bool:
    return isinstance(error, REMOTE_ERRORS)


async def write_msg(writer: asyncio.StreamWriter, message: dict[str, Any]) -> int:
    blob = msgpack.packb(message, use_bin_type=True)
    if len(blob) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(blob)} bytes exceeds {MAX_HEADER_BYTES}")
    writer.write(_U32.pack(len(blob)) + blob)
    await writer.drain()
    return _U32.size + len(blob)


async def read_msg(reader: asyncio.StreamReader, timeout_s: float) -> dict[str, Any]:
    (size,) = _U32.unpack(await _read_exactly(reader, _U32.size, timeout_s))
    if size > MAX_HEADER_BYTES:
        raise WireError(f"header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        message = msgpack.unpackb(await _read_exactly(reader, size, timeout_s), raw=False, strict_map_key=True)
    except Exception as e:
        raise WireError(f"malformed header: {e}") from None
    if not isinstance(message, dict):
        raise WireError("header is not a map")
    return message


async def write_blob(writer: asyncio.StreamWriter, data: bytes | memoryview) -> int:
    view = memoryview(data).cast("B")
    writer.write(_U64.pack(len(view)))
    for start in range(0, len(view), WRITE_CHUNK_BYTES):
        writer.write(view[start:start + WRITE_CHUNK_BYTES])
        await writer.drain()
    await writer.drain()
    return _U64.size + len(view)


async def read_blob(reader: asyncio.StreamReader, expected_bytes: int, timeout_s: float) -> bytes:
    """Read one payload that must be exactly ``expected_bytes`` long (the receiver knows the size)."""
    (size,) = _U64.unpack(await _read_exactly(reader, _U64.size, timeout_s))
    if size != expected_bytes:
        raise WireError(f"payload of {size} bytes, expected {expected_bytes}")
    return await _read_exactly(reader, size, timeout_s)


async def _read_exactly(reader: asyncio.StreamReader, size: int, timeout_s: float) -> bytes:
    try:
        return await asyncio.wait_for(reader.readexactly(size), timeout_s)
    except asyncio.IncompleteReadError:
        raise WireError("stream closed early") from None
    except asyncio.TimeoutError:
        raise WireError(f"no data within {timeout_s:.0f} s") from None


def field(message: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    """A typed header field, or WireError naming what is wrong."""
    value = message.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise WireError(f"header field {name!r} missing or of the wrong type")
    return value


async def open_stream(p2p: P2P, peer_id: str, handler: str, timeout_s: float,
                      hints: dict[str, list[str]] | None = None):
    """(info, reader, writer) of a new stream to ``peer_id``'s ``handler``.

    libp2p finds a peer's addresses through its own DHT, which may not know a peer we never met
    directly (or one behind addresses it does not advertise). If the first dial fails and the peer's
    liveness record gave us its addresses (``hints``), connect to those and dial once more.
    """
    peer = PeerID.from_base58(peer_id)
    try:
        return await asyncio.wait_for(p2p.call_binary_stream_handler(peer, handler), timeout_s)
    except Exception:
        addresses = (hints or {}).get(peer_id)
        if not addresses:
            raise
    # hivemind's P2P has no public connect(); its daemon client does
    await asyncio.wait_for(p2p._client.connect(peer, [Multiaddr(a) for a in addresses]), timeout_s)
    return await asyncio.wait_for(p2p.call_binary_stream_handler(peer, handler), timeout_s)
