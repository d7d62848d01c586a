"""DHT records under attack: a run config cannot be overwritten, the states a joiner may adopt are chosen by the
adoption rules, liveness records speak only for their signer, expire, and a claimed far-ahead round without a
model is ignored."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import time

import torch

from swarm.adoption import Adoption
from swarm.config import RunConfig, SwarmConfig
from swarm.dht import (READ_REPLY_BUDGET, RUNS_KEY, SIGNED_BUCKETS, SIGNED_RECORD_BYTES, SwarmDHT,
                       _buckets_per_read, peers_key, signed_key)
from swarm.liveness import round_progress

import helpers
from helpers import wait_for

CFG = SwarmConfig(codec="fp32", gather_timeout_s=20, join_timeout_s=10, allreduce_timeout_s=20, heartbeat_s=0.5)


def start_nodes(n: int) -> list:
    return helpers.start_nodes(n, "manifest-test", CFG)


def test_a_run_config_cannot_be_overwritten():
    first, second, reader = start_nodes(3)
    try:
        original = RunConfig(run_id="locked")
        first.call(SwarmDHT(first.dht, "locked").publish_config(original))
        first.call(SwarmDHT(first.dht, "locked").publish_config(original))  # re-publishing the same is fine
        hijack = dataclasses.replace(original, train=dataclasses.replace(original.train, outer_lr=7.0))
        attacker = SwarmDHT(second.dht, "locked")
        assert not second.call(attacker.store("locked/config", "config", hijack.to_bytes(), 3600))
        assert not second.call(attacker.store(RUNS_KEY, "locked", hijack.fingerprint, 3600))
        seen = reader.call(SwarmDHT(reader.dht, "locked").fetch_config())
        assert seen == original and seen.train.outer_lr == 0.7
        assert reader.call(SwarmDHT(reader.dht, "_").get_subkeys(RUNS_KEY))["locked"] == original.fingerprint
    finally:
        for node in (first, second, reader):
            node.close()


def holding(step: int, model: str, numel: int = 100, reachable: bool = True) -> dict:
    """A liveness record that announces a state of ``numel`` parameters at ``step``."""
    return {"round": step + 1, "training": step + 1, "reachable": reachable,
            "held": {"outer_step": step, "manifest": model * 64, "model_sha256": model * 64, "size": 8 * numel}}


def test_the_state_most_live_peers_hold_is_chosen_and_misfits_are_banned():
    adoption = Adoption("run", 100, "me")
    honest = {f"p{i}": holding(6, "a") for i in range(3)}
    assert [(c.outer_step, c.holders) for c in adoption.candidates(honest, 0, "")] == [(6, ("p0", "p1", "p2"))]
    liars = {**honest, "m1": holding(99, "e"), "m2": holding(99, "e")}
    assert adoption.candidates(liars, 0, "")[0].outer_step == 6  # two keys far ahead do not outvote three
    misfit = {**honest, "big": holding(7, "b", numel=10**6), "nat": holding(7, "c", reachable=False)}
    assert [c.outer_step for c in adoption.candidates(misfit, 0, "")] == [6]  # nobody can dial "nat"
    assert adoption.banned() == {"big"}  # a size that is not this run's: never considered again
    fork = {"p0": holding(6, "a"), "p1": holding(6, "b"), "p2": holding(6, "b"), "p3": holding(6, "b")}
    assert [c.model_sha256[0] for c in adoption.candidates(fork, 6, "a" * 64)] == ["b"]  # 3 against us and p0
    assert adoption.candidates(fork, 6, "b" * 64) == []  # we are on the majority's fork already
    tie = {"p0": holding(6, "a"), "p1": holding(6, "b"), "p2": holding(6, "b")}
    assert adoption.candidates(tie, 6, "a" * 64) == []  # two against two: keep ours
    assert adoption.candidates({}, 0, "") == []


def test_each_try_is_the_best_state_of_a_fresh_view_not_the_runner_up_of_an_old_one():
    """The honest pair moves on to step 17 while a joiner fetches their step 16: its next try is their step 17,
    not the state a single liar holds, although that was second in the first view."""
    adoption = Adoption("run", 100, "me")
    liar = {"m": holding(1000, "e")}
    views = iter([{"p0": holding(16, "a"), "p1": holding(16, "a"), **liar},
                  {"p0": holding(17, "b"), "p1": holding(17, "b"), **liar}])
    tried = [(c.outer_step, c.holders) for c in adoption.tries(lambda: next(views), -1, "")]
    assert tried == [(16, ("p0", "p1")), (17, ("p0", "p1"))]
    same = {"p0": holding(16, "a"), "p1": holding(16, "a"), **liar}  # the view did not change: the runner-up
    assert [c.outer_step for c in adoption.tries(lambda: same, -1, "")] == [16, 1000]


def test_a_peer_with_history_refuses_far_ahead_steps_however_many_keys_serve_them():
    adoption = Adoption("run", 100, "me")
    adoption.pace.began(now=0.0)
    adoption.pace.averaged(5, now=10.0)  # a round took 10 s: at most one step per 5 s is plausible
    allowed = adoption.pace.allowed_step(now=20.0)
    assert allowed == 5 + 1 + 2
    live = {f"m{i}": holding(1000, "e") for i in range(5)} | {"p0": holding(7, "a")}
    adoption.pace.last_t = time.monotonic() - 10.0  # allowed_step counts on the monotonic clock
    assert [c.outer_step for c in adoption.candidates(live, 5, "")] == [7]
    assert adoption.swarm_is_past(6, {f"m{i}": holding(1000, "e") for i in range(5)}, 5, "a" * 64) is None


def test_a_peer_on_a_minority_fork_knows_it_and_the_majority_does_not_move():
    adoption = Adoption("run", 100, "me")
    fork = {"p0": holding(6, "b"), "p1": holding(6, "b"), "p3": holding(6, "b"), "p2": holding(6, "a")}
    assert "another model of outer step 6" in adoption.swarm_is_past(7, fork, 6, "a" * 64)  # 3 against us and p2
    assert adoption.swarm_is_past(7, fork, 6, "b" * 64) is None
    ahead = {"p0": holding(7, "c"), "p1": holding(7, "c"), "p2": holding(6, "a")}
    assert "outer step 7 or later" in adoption.swarm_is_past(7, ahead, 6, "a" * 64)


def test_a_liveness_record_counts_only_for_the_peer_that_signed_it():
    alice, mallory, reader = start_nodes(3)
    try:
        alice.update_status(name="alice", round=3, training=3, state="training", samples=128, compute_s=2.0)
        alice.flush_status()
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
        live = reader.live_peers(fresh=True)
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
        assert writer.peer_id not in reader.live_peers(fresh=True)
        short.call(short.liveness.stop())
        short.call(short.sdht.store_signed(peers_key("manifest-test"), {**record, "name": "short"}, ttl_s=2.0))
        assert reader.live_peers(fresh=True)[short.peer_id]["name"] == "short"
        wait_for(lambda: short.peer_id not in reader.live_peers(fresh=True), 15, "the record to expire")
    finally:
        for node in (short, reader):
            node.close()


def test_a_far_ahead_round_claim_without_a_model_does_not_stall_the_swarm():
    alice, bob, liar = helpers.start_nodes(3, "claims", CFG, round=1, training=1, state="training")
    try:
        liar.update_status(round=10**6, training=10**6)  # "everyone else is stale": nobody holds such a model
        liar.flush_status()
        alice.live_peers(fresh=True), bob.live_peers(fresh=True)
        deltas = [torch.full((1000,), 1.0), torch.full((1000,), 3.0)]
        with cf.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda i: (alice, bob)[i].average(1, deltas[i].clone(), 1.0, "b" * 64), range(2)))
        assert [len(r.group.members) for r in results] == [2, 2]
        assert all(torch.equal(r.average, torch.full((1000,), 2.0)) for r in results)
    finally:
        for node in (alice, bob, liar):
            node.close()


def test_a_peer_still_averaging_the_last_round_is_waited_for():
    """train.overlap: bob has trained round 2 while his round 1 still averages; alice, done with round 1,
    must wait for him instead of averaging round 2 alone."""
    alice, bob = helpers.start_nodes(2, "overlap", CFG, round=2, training=2, state="averaging")
    try:
        bob.update_status(round=1, training=2, state="averaging")
        bob.flush_status()
        bob.training(2)
        alice.live_peers(fresh=True)
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(alice.average, 2, torch.full((1000,), 1.0), 1.0, "b" * 64)
            time.sleep(3)
            assert not first.done()
            bob.update_status(round=2)  # his round 1 is applied now
            second = pool.submit(bob.average, 2, torch.full((1000,), 3.0), 1.0, "b" * 64)
            results = [first.result(60), second.result(60)]
        assert [len(r.group.members) for r in results] == [2, 2]
        assert all(torch.equal(r.average, torch.full((1000,), 2.0)) for r in results)
    finally:
        alice.close()
        bob.close()


def test_a_joiner_takes_up_the_round_where_the_median_peer_is_and_liars_cannot_move_it():
    now, h = 1000.0, 20
    honest = {"a": {"training": 5, "state": "training", "inner": 8, "step_s": 0.5, "t": now - 1.0},  # 8 + 2
              "b": {"training": 5, "state": "training", "inner": 12, "step_s": 0.0, "t": now},  # no pace yet: 12
              "c": {"training": 5, "state": "averaging", "inner": 3, "t": now}}  # done with round 5: 20
    assert round_progress(honest, 5, h, now, ttl_s=3.0) == 12
    assert round_progress(honest, 6, h, now, ttl_s=3.0) == 0  # nobody trains round 6 yet
    liars = {"x": {"training": 5, "state": "training", "inner": 10**9, "step_s": 0.1, "t": now},  # out of range
             "y": {"training": 5, "state": "training", "inner": "19", "t": now},  # not an int
             "z": {"training": 5, "state": "training", "inner": True, "t": now},  # a bool is no step count
             "w": {"training": 5, "state": "training", "inner": 19, "step_s": -1, "t": now - 60}}  # expired
    assert round_progress({**honest, **liars}, 5, h, now, ttl_s=3.0) == 12
    one_more = {"v": {"training": 5, "state": "training", "inner": 0, "step_s": 1e-9, "t": now - 2}}  # capped at H
    assert round_progress({**honest, **one_more}, 5, h, now, ttl_s=3.0) == 12


def test_liveness_reads_group_buckets_only_while_the_reply_stays_small():
    """One request for a small swarm's view, one per bucket for a large one, and never a reply the last count says
    would exceed the budget (a reply near 64 KiB kills hivemind's DHT process)."""
    assert _buckets_per_read(None) == 1  # nothing known yet
    assert _buckets_per_read(0) == _buckets_per_read(10) == SIGNED_BUCKETS
    assert _buckets_per_read(43) == _buckets_per_read(5000) == 1
    for seen in range(1, 400):
        step = _buckets_per_read(seen)
        assert step == 1 or step * seen * SIGNED_RECORD_BYTES / SIGNED_BUCKETS <= READ_REPLY_BUDGET, seen
