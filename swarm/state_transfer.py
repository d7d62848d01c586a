"""Serve the current θ_global and outer momentum to a peer that joins late or fell behind, and fetch it.

One source per download, verified twice: the payload against the sha256 in its header,
and the parameters against the ``model_sha256`` the holder announces.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Callable

import torch
from hivemind.p2p import P2P, PeerID

from swarm.model import model_sha256
from swarm.wire import WireError, field, read_blob, read_msg, write_blob, write_msg

log = logging.getLogger("swarm")

STATE = "swarm.state"


def pack_state(state: dict) -> tuple[dict, bytes]:
    """(header, payload): θ_global then momentum as little-endian fp32."""
    theta, momentum = state["theta_global"], state["momentum"]
    payload = theta.numpy().astype("<f4").tobytes() + momentum.numpy().astype("<f4").tobytes()
    header = {"outer_step": int(state["outer_step"]), "numel": theta.numel(), "model_sha256": model_sha256([theta]),
              "sha256": hashlib.sha256(payload).hexdigest()}
    return header, payload


def unpack_state(header: dict, payload: bytes) -> dict:
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise WireError("state payload failed its sha256 check")
    flat = torch.frombuffer(bytearray(payload), dtype=torch.float32)
    numel = header["numel"]
    theta, momentum = flat[:numel].clone(), flat[numel:].clone()
    if model_sha256([theta]) != header["model_sha256"]:
        raise WireError("state parameters do not match the announced model_sha256")
    return {"outer_step": header["outer_step"], "theta_global": theta, "momentum": momentum}


class StateServer:
    """Answers STATE requests with a snapshot taken by ``snapshot()`` (cached per outer step)."""

    def __init__(self, p2p: P2P, snapshot: Callable[[], dict], timeout_s: float):
        self.p2p, self.snapshot, self.timeout_s = p2p, snapshot, timeout_s
        self._cache: tuple[int, dict, bytes] | None = None

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(STATE, self._serve)

    async def _serve(self, _info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_msg(reader, self.timeout_s)
            state = await asyncio.get_running_loop().run_in_executor(None, self.snapshot)
            if self._cache is None or self._cache[0] != state["outer_step"]:
                self._cache = (state["outer_step"], *pack_state(state))
            _, header, payload = self._cache
            await write_msg(writer, header)
            await write_blob(writer, payload)
        except Exception as e:
            try:
                await write_msg(writer, {"error": str(e)[:200] or type(e).__name__})
            except Exception:
                pass
        finally:
            writer.close()


async def fetch_state(p2p: P2P, peer_id: str, numel: int, timeout_s: float) -> tuple[dict, int, float]:
    """Download and verify one holder's state: (state, payload bytes, seconds)."""
    t0 = time.monotonic()
    _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), STATE),
                                               timeout_s)
    try:
        await write_msg(writer, {"want": "state"})
        header = await read_msg(reader, timeout_s)
        if "error" in header:
            raise WireError(f"holder refused: {str(header['error'])[:200]}")
        if field(header, "numel", int) != numel:
            raise WireError(f"holder's model has {header['numel']} parameters, ours {numel}")
        field(header, "outer_step", int), field(header, "sha256", str), field(header, "model_sha256", str)
        payload = await read_blob(reader, 8 * numel, timeout_s)
    finally:
        writer.close()
    return unpack_state(header, payload), len(payload), time.monotonic() - t0
