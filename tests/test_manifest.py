"""Manifest gossip and multi-source download between real peers on loopback (real DHTs and p2pd)."""

from __future__ import annotations

import asyncio
import logging

import msgpack
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from swarm.adoption import Adoption
from swarm.config import SwarmConfig
from swarm.dht import peers_key, signed_key
from swarm.manifest import CHUNKS, ChunkServer, DownloadError, download, pack_state
from swarm.node import Node

import helpers
from helpers import random_state

NUMEL = 700_000  # 5.6 MB payload, 6 chunks of 1 MiB
CFG = SwarmConfig(heartbeat_s=0.5, allreduce_timeout_s=10)


class CorruptChunkServer(ChunkServer):
    """A holder that flips one byte of every chunk it serves."""

    def chunk_bytes(self, manifest, payload, index):
        blob = bytearray(super().chunk_bytes(manifest, payload, index))
        blob[len(blob) // 2] ^= 0xFF
        return memoryview(blob)


def the_state(step: int = 7) -> dict:
    return random_state(NUMEL, step)


@pytest.fixture
def swarm_of_four():
    nodes = helpers.start_nodes(4, "manifest-test", CFG)
    yield nodes
    helpers.close_all(nodes)


def fetch(joiner: Node, our_step: int, local=None):
    """What a joiner at ``our_step`` downloads: the first candidate the adoption rules rank, if any."""
    candidates = Adoption("manifest-test", NUMEL, joiner.peer_id).candidates(joiner.live_peers(fresh=True), our_step,
                                                                           "")
    return joiner.download(candidates[0], "manifest-test", NUMEL, local) if candidates else None


def get(node: Node, holders: list[str], manifest_sha256: str, numel: int = NUMEL):
    return node.call(download(node.p2p, holders, manifest_sha256, "manifest-test", numel, 10, 60))


def test_joiner_downloads_from_three_holders_and_verifies(swarm_of_four):
    *holders, joiner = swarm_of_four
    manifest, payload = pack_state("manifest-test", the_state())
    for holder in holders:
        holder.hold(manifest, payload)
        holder.flush_status()
    got_manifest, state, stats = fetch(joiner, 0)
    assert got_manifest == manifest and stats.sources == 3 and stats.bytes == manifest.size
    assert torch.equal(state["theta_global"], the_state()["theta_global"])
    assert torch.equal(state["momentum"], the_state()["momentum"])
    assert fetch(joiner, 8) is None  # nothing newer than what we have


def test_chunks_equal_to_a_local_copy_are_not_fetched(swarm_of_four):
    holder, _, _, joiner = swarm_of_four
    state = the_state()
    manifest, payload = pack_state("manifest-test", state)
    holder.hold(manifest, payload)
    holder.flush_status()
    old = {**state, "outer_step": 6}
    old["momentum"] = old["momentum"] + 1  # the second half of the payload differs
    local = pack_state("manifest-test", old)
    got_manifest, got, stats = fetch(joiner, 6, local=local)
    assert stats.reused_chunks == 2 and stats.bytes < manifest.size  # chunks 0-1 are θ alone
    assert torch.equal(got["momentum"], state["momentum"])


def test_a_manifest_that_does_not_fit_the_run_is_refused_before_any_allocation(swarm_of_four):
    """A holder announcing the right size but serving a manifest of a 10-parameter state, or of another run."""
    liar, _, _, joiner = swarm_of_four
    for run_id, numel in (("manifest-test", 10), ("other-run", NUMEL)):
        manifest, payload = pack_state(run_id, random_state(numel))
        liar.hold(manifest, payload)
        liar.flush_status()
        with pytest.raises(DownloadError, match="refused manifest") as info:
            get(joiner, [liar.peer_id], manifest.sha256)
        assert info.value.blame == {liar.peer_id}


def test_a_holder_serving_corrupt_chunks_is_banned_and_the_rest_completes(swarm_of_four):
    honest, bad, _, joiner = swarm_of_four
    manifest, payload = pack_state("manifest-test", the_state())
    corrupt = CorruptChunkServer(bad.p2p, CFG.allreduce_timeout_s)

    async def swap_in_corrupt_server():
        await bad.p2p.remove_binary_stream_handler(CHUNKS)
        await corrupt.start()
        corrupt.hold(manifest, payload)

    bad.call(swap_in_corrupt_server())
    honest.hold(manifest, payload)
    honest.flush_status()
    _, state, stats = get(joiner, [bad.peer_id, honest.peer_id], manifest.sha256)
    assert stats.banned == (bad.peer_id,) and stats.sources == 1
    assert torch.equal(state["theta_global"], the_state()["theta_global"])
    with pytest.raises(DownloadError, match="banned for corrupt data") as info:  # only a liar left: no result
        get(joiner, [bad.peer_id], manifest.sha256)
    assert info.value.blame == {bad.peer_id}


def test_a_held_state_announced_in_another_identitys_name_is_refused(swarm_of_four):
    alice, mallory, reader, _ = swarm_of_four
    manifest, payload = pack_state("manifest-test", the_state())
    alice.hold(manifest, payload)
    alice.flush_status()
    forged = {"peer": alice.peer_id, "round": 100, "state": "training",
              "held": {"outer_step": 99, "manifest": "f" * 64, "model_sha256": "0" * 64, "size": 8 * NUMEL}}
    # mallory writes under alice's key: her DHT node cannot sign it, and every node's validator refuses it
    key = signed_key(peers_key("manifest-test"), alice.peer_id)  # where readers look for alice's record
    stored = mallory.dht.store(key, msgpack.packb(forged), get_dht_time() + 30,
                               subkey=alice.identity.owner_subkey)
    assert stored is False
    # mallory signs a record with her own key that names alice: readers drop it
    assert mallory.call(mallory.sdht.store(key, mallory.identity.owner_subkey, forged, 30))
    held = reader.live_peers(fresh=True)[alice.peer_id]["held"]
    assert held == {"outer_step": 7, "manifest": manifest.sha256, "model_sha256": manifest.model_sha256,
                    "size": manifest.size}
    candidates = Adoption("manifest-test", NUMEL, reader.peer_id).candidates(reader.live_peers(), 0, "")
    assert [(c.outer_step, c.holders) for c in candidates] == [(7, (alice.peer_id,))]


def test_malformed_and_oversized_requests_get_errors_and_serving_goes_on(swarm_of_four):
    holder, _, _, joiner = swarm_of_four
    manifest, payload = pack_state("manifest-test", the_state())
    holder.hold(manifest, payload)
    holder.flush_status()

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
    _, state, _ = get(joiner, [holder.peer_id], manifest.sha256)  # still serving
    assert torch.equal(state["theta_global"], the_state()["theta_global"])


class StallingChunkServer(ChunkServer):
    """A holder that takes requests and never answers them (a stopped process looks like this from outside)."""

    async def _serve(self, _info, reader, writer):
        await asyncio.sleep(3600)


def test_a_stalled_holder_is_given_up_and_the_others_serve_the_state(swarm_of_four, caplog):
    caplog.set_level(logging.INFO, logger="swarm")
    honest, staller, _, joiner = swarm_of_four
    manifest, payload = pack_state("manifest-test", the_state())
    stalling = StallingChunkServer(staller.p2p, CFG.allreduce_timeout_s)

    async def swap_in_stalling_server():
        await staller.p2p.remove_binary_stream_handler(CHUNKS)
        await stalling.start()

    staller.call(swap_in_stalling_server())
    honest.hold(manifest, payload)
    _, state, stats = joiner.call(download(joiner.p2p, [staller.peer_id, honest.peer_id], manifest.sha256,
                                           "manifest-test", NUMEL, 2, 120), timeout_s=130)
    assert stats.sources == 1 and torch.equal(state["theta_global"], the_state()["theta_global"])
    assert f"giving up on holder {staller.peer_id[-6:]} (no data within 2 s)" in caplog.text  # named, passed over
    with pytest.raises(DownloadError, match="no holder served manifest"):  # the staller alone: a clear failure
        joiner.call(download(joiner.p2p, [staller.peer_id], manifest.sha256, "manifest-test", NUMEL, 2, 120),
                    timeout_s=130)
