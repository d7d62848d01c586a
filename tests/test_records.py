"""DHT records under attack: a run config cannot be overwritten, forged or lone far-ahead manifests lose."""

from __future__ import annotations

import dataclasses

from swarm.config import RunConfig
from swarm.dht import RUNS_KEY, SwarmDHT
from swarm.manifest import choose_manifest

from test_manifest import start_nodes


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
