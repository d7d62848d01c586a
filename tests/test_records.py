"""DHT records under attack: a run config cannot be overwritten, forged or lone far-ahead manifests lose,
liveness records speak only for their signer, expire, and a claimed far-ahead round without a model is ignored."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import time

import torch

from swarm.config import RunConfig, SwarmConfig
from swarm.dht import RUNS_KEY, SwarmDHT, peers_key, signed_key
from swarm.manifest import choose_manifest

import conftest
from conftest import wait_for
from test_manifest import start_nodes

CFG = SwarmConfig(codec="fp32", gather_timeout_s=20, join_timeout_s=10, allreduce_timeout_s=20, heartbeat_s=0.5)


def test_a_run_config_cannot_be_overwritten():
    first, second, reader = start_nodes(3)
    try:
        original = RunConfig(run_id="locked")
        first.call(SwarmDHT(first.dht, "locked").publish_config(original))
        first.call(SwarmDHT(first.dht, "locked").publish_config(original))  # re-publishing the same is fine
        hijack = dataclasses.replace(original, train=dataclasses.replace(original.train, outer_lr=70.0))
        attacker = SwarmDHT(second.dht, "locked")
        assert not second.call(attacker.store("locked/config", "config", hijack.to_bytes(), 3600))
        assert not second.call(attacker.store(RUNS_KEY, "locked", hijack.fingerprint, 3600))
        seen = reader.call(SwarmDHT(reader.dht, "locked").fetch_config())
        assert seen == original and seen.train.outer_lr == 0.7
        assert reader.call(SwarmDHT(reader.dht, "_").get_subkeys(RUNS_KEY))["locked"] == original.fingerprint
    finally:
        for node in (first, second, reader):
            node.close()


def record(peer: str, step: int, manifest: str) -> dict:
    return {"peer": peer, "outer_step": step, "manifest": manifest, "model_sha256": "0" * 64, "size": 8}


def test_the_newest_manifest_held_by_enough_peers_is_chosen():
    honest = {f"k{i}".encode(): record(f"p{i}", 6, "a" * 64) for i in range(3)}
    assert choose_manifest(honest) == (honest[b"k0"], ["p0", "p1", "p2"])
    liar = {**honest, b"evil": record("mallory", 99, "e" * 64)}
    assert choose_manifest(liar)[0]["outer_step"] == 6  # one peer far ahead of three does not win
    moving_on = {**honest, b"k0": record("p0", 7, "b" * 64), b"k1": record("p1", 7, "b" * 64)}
    assert choose_manifest(moving_on) == (moving_on[b"k0"], ["p0", "p1"])  # the newest step, once most have it
    assert choose_manifest({}) is None


def test_a_liveness_record_counts_only_for_the_peer_that_signed_it():
    alice, mallory, reader = start_nodes(3)
    try:
        alice.set_status(name="alice", round=3, training=3, state="training", samples=128, compute_s=2.0)
        key = signed_key(peers_key("manifest-test"), alice.peer_id)  # where readers look for alice's record
        forged = {"peer": alice.peer_id, "name": "alice", "round": 3, "state": "training", "samples": 10**9}
        # under alice's subkey: mallory's node cannot sign it and every node refuses it
        assert not mallory.call(mallory.sdht.store(key, alice.identity.owner_subkey, forged, 30))
        # under mallory's own subkey, naming alice: stored, and dropped by every reader
        assert mallory.call(mallory.sdht.store(key, mallory.identity.owner_subkey, forged, 30))
        # the old unsigned form, keyed by a peer id string: dropped too
        assert mallory.call(mallory.sdht.store(key, alice.peer_id, forged, 30))
        raw = reader.call(reader.sdht.get_subkeys(key))
        assert any(isinstance(v, dict) and v.get("samples") == 10**9 for v in raw.values())  # it is there...
        live = reader.live_peers()
        assert live[alice.peer_id]["samples"] == 128 and live[alice.peer_id]["name"] == "alice"
        assert all(rec.get("samples") != 10**9 for rec in live.values())  # ...and no reader counts it
        assert set(live) <= {alice.peer_id, mallory.peer_id, reader.peer_id}
    finally:
        for node in (alice, mallory, reader):
            node.close()


def test_an_expired_liveness_record_is_ignored():
    writer, short, reader = start_nodes(3)
    try:
        key, record = signed_key(peers_key("manifest-test"), writer.peer_id), {"round": 1, "state": "training"}
        stale = writer.sdht.store(key, writer.identity.owner_subkey, {**record, "peer": writer.peer_id}, -5)
        assert not writer.call(stale)  # already expired: no node keeps it
        writer.close()  # stops its heartbeat; its farewell ("left") record hides it at once
        assert writer.peer_id not in reader.live_peers()
        short._heartbeat_task.cancel()
        short.call(short.sdht.store_signed(peers_key("manifest-test"), {**record, "name": "short"}, ttl_s=2.0))
        assert reader.live_peers()[short.peer_id]["name"] == "short"
        wait_for(lambda: short.peer_id not in reader.live_peers(), 15, "the record to expire")
    finally:
        for node in (short, reader):
            node.close()


def test_a_far_ahead_round_claim_without_a_model_does_not_stall_the_swarm():
    alice, bob, liar = conftest.start_nodes(3, "claims", CFG, round=1, training=1, state="training")
    try:
        liar.set_status(round=10**6, training=10**6)  # "everyone else is stale": nobody holds such a model
        deltas = [torch.full((1000,), 1.0), torch.full((1000,), 3.0)]
        with cf.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda i: (alice, bob)[i].average(1, deltas[i], 1.0, "b" * 64), range(2)))
        assert [len(r.group.members) for r in results] == [2, 2]
        assert all(torch.equal(r.average, torch.full((1000,), 2.0)) for r in results)
    finally:
        for node in (alice, bob, liar):
            node.close()


def test_a_peer_still_averaging_the_last_round_is_waited_for():
    """train.overlap: bob has trained round 2 while his round 1 still averages; alice, done with round 1,
    must wait for him instead of averaging round 2 alone."""
    alice, bob = conftest.start_nodes(2, "overlap", CFG, round=2, training=2, state="averaging")
    try:
        bob.set_status(round=1, training=2, state="averaging")
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(alice.average, 2, torch.full((1000,), 1.0), 1.0, "b" * 64)
            time.sleep(3)
            assert not first.done()
            bob.set_status(round=2)  # his round 1 is applied now
            second = pool.submit(bob.average, 2, torch.full((1000,), 3.0), 1.0, "b" * 64)
            results = [first.result(60), second.result(60)]
        assert [len(r.group.members) for r in results] == [2, 2]
        assert all(torch.equal(r.average, torch.full((1000,), 2.0)) for r in results)
    finally:
        alice.close()
        bob.close()
