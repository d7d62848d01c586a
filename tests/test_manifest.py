"""Manifest gossip and multi-source download between real peers on loopback (real DHTs and p2pd)."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from swarm.config import SwarmConfig
from swarm.dht import manifest_key, signed_key
from swarm.manifest import CHUNKS, ChunkServer, DownloadError, download, pack_state
from swarm.node import Node

import conftest

NUMEL = 700_000  # 5.6 MB payload, 6 chunks of 1 MiB
CFG = SwarmConfig(heartbeat_s=0.5, allreduce_timeout_s=10)


class CorruptChunkServer(ChunkServer):
    """A holder that flips one byte of every chunk it serves."""

    def chunk_bytes(self, manifest, payload, index):
        blob = bytearray(super().chunk_bytes(manifest, payload, index))
        blob[len(blob) // 2] ^= 0xFF
        return memoryview(blob)


def start_nodes(n: int) -> list[Node]:
    return conftest.start_nodes(n, "manifest-test", CFG)


@pytest.fixture
def swarm_of_four():
    nodes = start_nodes(4)
    yield nodes
    for node in nodes:
        node.close()


def the_state(step: int = 7) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"outer_step": step, "theta_global": torch.randn(NUMEL, generator=gen),
            "momentum": torch.randn(NUMEL, generator=gen)}


def test_joiner_downloads_from_three_holders_and_verifies(swarm_of_four):
    *holders, joiner = swarm_of_four
    manifest, payload = pack_state("manifest-test", the_state())
    for holder in holders:
        holder.publish(manifest, payload)
    got_manifest, state, stats = joiner.fetch_state_from_swarm(newer_than=0)
    assert got_manifest == manifest and stats.sources == 3 and stats.bytes == manifest.size
    assert torch.equal(state["theta_global"], the_state()["theta_global"])
    assert torch.equal(state["momentum"], the_state()["momentum"])
    assert joiner.fetch_state_from_swarm(newer_than=7) is None  # nothing newer than what we have


def test_chunks_equal_to_a_local_copy_are_not_fetched(swarm_of_four):
    holder, _, _, joiner = swarm_of_four
    state = the_state()
    manifest, payload = pack_state("manifest-test", state)
    holder.publish(manifest, payload)
    old = {**state, "outer_step": 6}
    old["momentum"] = old["momentum"] + 1  # the second half of the payload differs
    local = pack_state("manifest-test", old)
    got_manifest, got, stats = joiner.fetch_state_from_swarm(newer_than=6, local=local)
    assert stats.reused_chunks == 2 and stats.bytes < manifest.size  # chunks 0-1 are θ alone
    assert torch.equal(got["momentum"], state["momentum"])


def test_a_holder_serving_corrupt_chunks_is_banned_and_the_rest_completes(swarm_of_four):
    honest, bad, _, joiner = swarm_of_four
    manifest, payload = pack_state("manifest-test", the_state())
    corrupt = CorruptChunkServer(bad.p2p, CFG.allreduce_timeout_s)

    async def swap_in_corrupt_server():
        await bad.p2p.remove_binary_stream_handler(CHUNKS)
        await corrupt.start()
        corrupt.hold(manifest, payload)

    bad.call(swap_in_corrupt_server())
    honest.publish(manifest, payload)
    _, state, stats = joiner.call(download(joiner.p2p, [bad.peer_id, honest.peer_id], manifest.sha256, 10))
    assert stats.banned == (bad.peer_id,) and stats.sources == 1
    assert torch.equal(state["theta_global"], the_state()["theta_global"])
    with pytest.raises(DownloadError, match="banned for corrupt data"):  # only a liar left: no result at all
        joiner.call(download(joiner.p2p, [bad.peer_id], manifest.sha256, 10))


def test_a_manifest_subkey_of_another_identity_is_refused(swarm_of_four):
    alice, mallory, reader, _ = swarm_of_four
    manifest, payload = pack_state("manifest-test", the_state())
    alice.publish(manifest, payload)
    forged = {"peer": mallory.peer_id, "outer_step": 99, "manifest": "f" * 64, "model_sha256": "0" * 64, "size": 1}
    # mallory writes under alice's key: her DHT node cannot sign it, and every node's validator refuses it
    key = signed_key(manifest_key("manifest-test"), alice.peer_id)  # where readers look for alice's record
    stored = mallory.dht.store(key, msgpack.packb(forged), get_dht_time() + 30,
                               subkey=alice.identity.owner_subkey)
    assert stored is False
    # mallory signs a record with her own key that names alice as its holder: readers drop it
    assert mallory.call(mallory.sdht.store(key, mallory.identity.owner_subkey,
                                           {**forged, "peer": alice.peer_id}, 30))
    records = reader.call(reader.sdht.manifests())
    assert records == {alice.peer_id: {**alice.manifest_record, "peer": alice.peer_id}}
    assert records[alice.peer_id]["outer_step"] == 7


def test_malformed_and_oversized_requests_get_errors_and_serving_goes_on(swarm_of_four):
    holder, _, _, joiner = swarm_of_four
    manifest, payload = pack_state("manifest-test", the_state())
    holder.publish(manifest, payload)

    async def raw_exchange(frames: list[bytes]) -> bytes:
        _, reader, writer = await joiner.p2p.call_binary_stream_handler(PeerID.from_base58(holder.peer_id), CHUNKS)
        for frame in frames:
            writer.write(frame)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(1 << 16), 10)
        finally:
            writer.close()

    def framed(obj) -> bytes:
        blob = msgpack.packb(obj)
        return len(blob).to_bytes(4, "little") + blob

    replies = [
        joiner.call(raw_exchange([framed({"op": "chunk", "manifest": manifest.sha256, "index": 10 ** 9})])),
        joiner.call(raw_exchange([framed({"op": "chunk", "manifest": "nope", "index": 0})])),
        joiner.call(raw_exchange([framed({"op": "delete everything", "manifest": manifest.sha256})])),
        joiner.call(raw_exchange([framed(["not", "a", "map"])])),
    ]
    for reply in replies[:3]:
        assert b"error" in reply
    assert replies[3] == b""  # garbage: the stream is dropped
    assert joiner.call(raw_exchange([(2 ** 31).to_bytes(4, "little")])) == b""  # a 2 GiB header: dropped
    assert joiner.call(raw_exchange([b"\xff" * 64])) == b""
    _, state, _ = joiner.call(download(joiner.p2p, [holder.peer_id], manifest.sha256, 10))  # still serving
    assert torch.equal(state["theta_global"], the_state()["theta_global"])
