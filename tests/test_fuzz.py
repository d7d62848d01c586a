"""Every stream handler of ours against garbage: malformed msgpack, wrong types, huge lengths, random bytes.

Thousands of cases, bounded in count and time. The peer must answer with an error or drop the
stream, keep serving real requests afterwards, and keep its memory bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import random
import struct
import time

import msgpack
import psutil
import torch
from hivemind.p2p import PeerID

from swarm.averaging import REDUCE
from swarm.config import SwarmConfig
from swarm.manifest import CHUNKS, download, pack_state
from swarm.matchmaking import JOIN
from swarm.reachability import DIALBACK
from swarm.wire import read_msg, write_msg

import helpers

NUMEL = 700_000
CFG = SwarmConfig(heartbeat_s=0.5, allreduce_timeout_s=10)


def start_nodes(n: int) -> list:
    return helpers.start_nodes(n, "fuzz", CFG, round=1, training=1, state="training")


def the_state() -> dict:
    return helpers.random_state(NUMEL)

CASES = 1500
TIME_LIMIT_S = 60
HANDLERS = [JOIN, REDUCE, CHUNKS, DIALBACK]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return rng.randint(-2 ** 63, 2 ** 64 - 1)
    if kind == 1:
        return rng.random() * 10 ** rng.randint(-5, 300) * rng.choice([1, -1])
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(0, 40)))
    if kind == 3:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 4:
        return rng.choice([None, True, False, float("nan"), float("inf")])
    if kind == 5:
        return rng.choice(["chunk", "manifest", "0" * 64, 0, 1, -1, 2 ** 31])
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    keys = ["op", "manifest", "index", "step", "peer", "w", "base", "group_id", "part", "size", "x", "attempt", "loss",
            "reachable", "ports"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(0, 6))}


def random_message(rng: random.Random) -> bytes:
    """One hostile write: a well-framed random map, a lying length, random bytes, or a truncated frame."""
    kind = rng.randrange(5)
    if kind == 0:
        body = msgpack.packb(random_value(rng), use_bin_type=True)
        return struct.pack("<I", len(body)) + body
    if kind == 1:
        return struct.pack("<I", rng.choice([2 ** 32 - 1, 2 ** 31, 65537, 10 ** 6])) + rng.randbytes(16)
    if kind == 2:
        return rng.randbytes(rng.randrange(1, 512))
    if kind == 3:  # a plausible header followed by a payload with an absurd length
        body = msgpack.packb({"op": "chunk", "manifest": "0" * 64, "index": 0, "group_id": "x", "peer": "p",
                              "part": 0}, use_bin_type=True)
        return struct.pack("<I", len(body)) + body + struct.pack("<Q", 2 ** 62) + rng.randbytes(8)
    body = msgpack.packb(random_value(rng), use_bin_type=True)
    return struct.pack("<I", len(body) + 100) + body  # promises more than it sends


def test_handlers_survive_thousands_of_malformed_requests():
    target, attacker, witness = start_nodes(3)
    try:
        manifest, payload = pack_state("fuzz", the_state())
        target.hold(manifest, payload)
        rss_before = psutil.Process().memory_info().rss
        rng = random.Random(1234)
        deadline = time.monotonic() + TIME_LIMIT_S

        async def one_case(handler: str, message: bytes, read_reply: bool) -> bytes:
            try:
                _, reader, writer = await asyncio.wait_for(
                    attacker.p2p.call_binary_stream_handler(PeerID.from_base58(target.peer_id), handler), 5)
            except Exception:
                return b"<no stream>"
            try:
                writer.write(message)
                await writer.drain()
                return await asyncio.wait_for(reader.read(256), 0.3) if read_reply else b""
            except Exception:
                return b""
            finally:
                writer.close()

        async def fuzz() -> tuple[int, int]:
            done = answered = 0
            while done < CASES and time.monotonic() < deadline:
                batch = [one_case(rng.choice(HANDLERS), random_message(rng), rng.random() < 0.1) for _ in range(50)]
                replies = await asyncio.gather(*batch)
                answered += sum(1 for r in replies if r.startswith(b"\x00") or b"error" in r)
                done += len(batch)
            return done, answered

        done, answered = attacker.call(fuzz(), timeout_s=TIME_LIMIT_S + 60)
        assert done >= 1000, f"only {done} cases ran in {TIME_LIMIT_S} s"
        assert answered > 0  # some requests were well-formed enough to get an error reply

        # the target still serves a real download and a real all-reduce
        _, state, _ = witness.call(download(witness.p2p, [target.peer_id], manifest.sha256, "fuzz", NUMEL, 10, 60))
        assert torch.equal(state["theta_global"], the_state()["theta_global"])
        attacker.close()  # the real all-reduce is between the target and the witness
        with cf.ThreadPoolExecutor(2) as pool:
            a, b = pool.map(lambda n: n.average(1, torch.full((5000,), float(n is target)), 1.0, "c" * 64),
                            [target, witness])
        assert torch.equal(a.average, b.average) and torch.allclose(a.average, torch.full((5000,), 0.5), atol=0.01)
        growth_mb = (psutil.Process().memory_info().rss - rss_before) / 2 ** 20
        assert growth_mb < 200, f"memory grew by {growth_mb:.0f} MB under fuzzing"
    finally:
        for node in (target, attacker, witness):
            node.close()



def test_a_peer_cannot_join_or_contribute_in_another_peers_name():
    target, mallory, victim = start_nodes(3)
    try:
        async def ask(handler: str, request: dict) -> dict:
            _, reader, writer = await mallory.p2p.call_binary_stream_handler(PeerID.from_base58(target.peer_id),
                                                                              handler)
            try:
                await write_msg(writer, request)
                return await read_msg(reader, 10)
            finally:
                writer.close()

        joined = mallory.call(ask(JOIN, {"step": 1, "attempt": 0, "peer": victim.peer_id, "w": 1.0, "base": "b" * 64,
                                         "loss": 1.0, "reachable": True}))
        reduced = mallory.call(ask(REDUCE, {"group_id": "g", "peer": victim.peer_id, "part": 0}))
        assert "differs from the join request's" in joined["error"]
        assert "differs from the contribution's" in reduced["error"]
    finally:
        for node in (target, mallory, victim):
            node.close()
