"""Averaging with real peers on loopback: real DHTs, real p2pd daemons, known tensors."""

from __future__ import annotations

import concurrent.futures as cf
import struct
import time

import pytest
import torch

from swarm.adoption import Adoption
from swarm.averaging import WEIGHT_FACTOR, Codec, StaleRound, part_bounds, robust_mean
from swarm.config import SwarmConfig
from swarm.node import Node

import helpers
from helpers import close_all as close

NUMEL = 10_000 + 17  # not a multiple of the block size


def start_nodes(n: int, cfg: SwarmConfig) -> list[Node]:
    return helpers.start_nodes(n, "avg-test", cfg, round=1, training=1, state="training")


@pytest.mark.parametrize("codec, chunk_values", [("int8", 1 << 20), ("fp32", 1 << 20), ("int8", 1024),
                                                  ("int4", 1 << 20)])
def test_three_peers_get_the_weighted_mean_as_identical_bytes(codec, chunk_values):
    """One chunk per part, and four (the pipelined path: each chunk reduced and returned on its own)."""
    cfg = SwarmConfig(codec=codec, block_size=256, chunk_values=chunk_values, gather_timeout_s=20, join_timeout_s=10,
                      allreduce_timeout_s=20, heartbeat_s=0.5)
    nodes = start_nodes(3, cfg)
    try:
        gen = torch.Generator().manual_seed(0)
        deltas = [torch.randn(NUMEL, generator=gen) * (i + 1) for i in range(3)]
        weights = [1.0, 2.0, 5.0]
        with cf.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda i: nodes[i].average(1, deltas[i].clone(), weights[i], base="b" * 64),
                                    range(3)))
        expected = sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
        groups = {r.group for r in results}
        assert len(groups) == 1 and len(results[0].group.members) == 3
        members = results[0].group.members
        assert sorted(members) == sorted(n.peer_id for n in nodes)
        assert list(results[0].group.weights) == [weights[[n.peer_id for n in nodes].index(p)] for p in members]
        for r in results[1:]:
            assert torch.equal(r.average, results[0].average)  # byte-identical on every member
            assert r.average_sha256 == results[0].average_sha256
        error = (results[0].average - expected).abs()
        if codec == "fp32":
            assert error.max() < 1e-5
        else:
            # each contribution and the result are within half a step of their block: bound per block
            levels = {"int8": 127, "int4": 7}[codec]
            bound = sum(w * d.abs().max() / levels / 2 for w, d in zip(weights, deltas)) / sum(weights)
            bound += expected.abs().max() / levels / 2
            assert error.max() <= bound
            assert error.mean() < bound / 4
        for r in results:  # each peer sends and receives 2(N-1)/N of the vector: int8 ~1/4 of fp32, int4 ~1/8
            wire = {"fp32": 4, "int8": 1, "int4": 0.5}[codec] * NUMEL * 2 * 2 / 3
            assert 0.9 * wire < r.bytes_sent < 1.3 * wire + 2000
            assert r.bytes_recv > 0.9 * wire
    finally:
        close(nodes)


def test_late_peer_is_waited_for_and_a_solo_peer_averages_alone():
    cfg = SwarmConfig(codec="int8", gather_timeout_s=20, join_timeout_s=10, allreduce_timeout_s=20, heartbeat_s=0.5)
    nodes = start_nodes(2, cfg)
    try:
        delta = torch.ones(NUMEL)
        with cf.ThreadPoolExecutor(2) as pool:
            early = pool.submit(nodes[0].average, 1, delta.clone(), 1.0, "b" * 64)
            time.sleep(3)  # the second peer is still "training": the first must wait for it
            late = pool.submit(nodes[1].average, 1, 3 * delta, 1.0, "b" * 64)
            a, b = early.result(), late.result()
        assert len(a.group.members) == 2 and torch.equal(a.average, b.average)
        assert torch.allclose(a.average, torch.full((NUMEL,), 2.0), atol=2 * 3 / 127)
    finally:
        close(nodes)


def test_a_leader_the_swarm_averaged_without_is_stale_and_does_not_average_alone():
    """The leader waits for the other peer, which averages the round alone (its view lacked the leader) and
    announces its new state a moment after its new round number. A solo step of the same number would fork the
    model: the leader, alone from then on, must wait for that state and find its round stale."""
    cfg = SwarmConfig(codec="int8", gather_timeout_s=20, join_timeout_s=10, allreduce_timeout_s=20, heartbeat_s=0.5)
    nodes = helpers.start_nodes(2, "avg-test", cfg, adoption=lambda me: Adoption("avg-test", NUMEL, me), round=1,
                                training=1, state="training")
    try:
        leader, other = sorted(nodes, key=lambda n: n.peer_id)
        leader.training(1)
        time.sleep(2)  # the leader trains round 1 for two seconds: it then waits up to that long alone
        with cf.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(leader.average, 1, torch.ones(NUMEL), 1.0, "b" * 64)
            time.sleep(3)  # longer than two heartbeats after the leader was ready
            other.update_status(round=2, training=2)
            other.flush_status()
            time.sleep(0.5)
            other.update_status(held={"outer_step": 1, "manifest": "c" * 64, "model_sha256": "d" * 64,
                                      "size": 8 * NUMEL})
            with pytest.raises(StaleRound, match="1 peers hold states of outer step 1 or later"):
                waiting.result(60)
    finally:
        close(nodes)


def test_a_leader_steps_down_for_a_peer_whose_record_shows_it_first_once_it_reaches_the_round():
    """The higher id takes the lead while the lower id's record still shows an earlier round; then the lower id
    reaches the round and leads it. The first must step down and join it: two leaders would wait for each other
    until the gather timeout, and then each average alone (a fork)."""
    cfg = SwarmConfig(codec="fp32", gather_timeout_s=20, join_timeout_s=10, allreduce_timeout_s=20, heartbeat_s=0.5)
    nodes = start_nodes(2, cfg)
    try:
        low, high = sorted(nodes, key=lambda n: n.peer_id)
        low.update_status(round=0, training=0)
        low.flush_status()
        high.training(1)
        time.sleep(3)  # high trains round 1 for 3 s: alone, it then waits that long for a peer of an earlier round
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(high.average, 1, torch.full((NUMEL,), 1.0), 1.0, "b" * 64)
            time.sleep(0.5)
            low.update_status(round=1, training=1)
            low.flush_status()
            low.training(1)
            second = pool.submit(low.average, 1, torch.full((NUMEL,), 3.0), 1.0, "b" * 64)
            results = [first.result(60), second.result(60)]
        assert [r.group.members for r in results] == [tuple(sorted((low.peer_id, high.peer_id)))] * 2
        assert all(torch.equal(r.average, torch.full((NUMEL,), 2.0)) for r in results)
    finally:
        close(nodes)


def test_part_bounds_cover_the_vector_block_aligned():
    for numel, parts in [(10, 3), (1024 * 5 + 1, 4), (1, 2), (4096, 4)]:
        bounds = part_bounds(numel, parts, 1024)
        assert bounds[0][0] == 0 and bounds[-1][1] == numel
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(lo % 1024 == 0 for lo, _ in bounds if lo < numel)


class NaNScaleCodec(Codec):
    """A hostile peer's codec: every slice it sends claims a NaN scale."""

    def encode(self, x):
        blob = bytearray(super().encode(x))
        blob[0:4] = struct.pack("<f", float("nan"))
        return bytes(blob)


def robust_cfg() -> SwarmConfig:
    """Parts of four chunks: a bad contribution is caught mid-stream, clipping is decided chunk by chunk."""
    return SwarmConfig(codec="int8", block_size=256, chunk_values=1024, gather_timeout_s=10, join_timeout_s=10,
                       allreduce_timeout_s=10, heartbeat_s=0.5)


def test_non_finite_contributions_are_refused_and_the_offender_named(caplog):
    """A peer whose every message claims a NaN scale: its slices are refused, its own part's result too,
    and the honest peers finish the round without it, with identical bytes."""
    nodes = start_nodes(3, robust_cfg())
    try:
        hostile = nodes[2]
        hostile.averager.codec = NaNScaleCodec("int8", 256)
        gen = torch.Generator().manual_seed(1)
        deltas = [torch.randn(NUMEL, generator=gen) for _ in range(3)]
        with cf.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(n.average, 1, d.clone(), 1.0, "b" * 64) for n, d in zip(nodes, deltas)]
            honest = [f.result() for f in futures[:2]]
            cf.wait(futures[2:])  # the hostile peer's own round is its own business
        assert torch.equal(honest[0].average, honest[1].average)
        assert honest[0].group.members == tuple(sorted(n.peer_id for n in nodes[:2]))
        assert honest[0].attempts == 2  # the first attempt failed on the hostile peer's part and was retried
        assert f"refused the contribution of {hostile.peer_id}" in caplog.text
        expected = (deltas[0] + deltas[1]) / 2
        assert (honest[0].average - expected).abs().max() < 2 * 4 / 127
        assert torch.isfinite(honest[0].average).all()
    finally:
        close(nodes)


def test_a_pseudo_gradient_scaled_by_a_million_is_clipped_and_named(caplog):
    nodes = start_nodes(3, robust_cfg())
    try:
        gen = torch.Generator().manual_seed(2)
        deltas = [torch.randn(NUMEL, generator=gen) for _ in range(3)]
        deltas[1] = deltas[1] * 1e6
        with cf.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda i: nodes[i].average(1, deltas[i].clone(), 1.0, "b" * 64), range(3)))
        assert all(torch.equal(r.average, results[0].average) for r in results)
        clipped = {p: s for r in results for p, s in r.clipped.items()}
        assert set(clipped) == {nodes[1].peer_id} and all(s < 1e-5 for s in clipped.values())
        assert "clipped the contribution of " + nodes[1].peer_id in caplog.text
        # the outlier weighs at most CLIP_FACTOR times a normal slice: the result stays the size of an honest Δ
        assert results[0].average.abs().max() < 10
        honest_mean = (deltas[0] + deltas[2]) / 3
        assert (results[0].average - honest_mean).norm() <= 4 / 3 * deltas[0].norm() * 1.1 + 1
    finally:
        close(nodes)


def test_a_member_claiming_a_huge_weight_counts_at_most_four_medians():
    honest = {p: (100.0, torch.full((8,), 1.0)) for p in ("a", "b", "c")}
    liar = {"z": (1e11, torch.full((8,), -1.0))}  # same norm: only its weight claim is a lie
    mean, clipped = robust_mean({**honest, **liar})
    share = WEIGHT_FACTOR / (WEIGHT_FACTOR + 3)  # its weight is cut to 4 x 100 against 3 x 100
    assert torch.allclose(mean, torch.full((8,), 1.0 - 2 * share)) and clipped == {}
    fair = {"a": (100.0, torch.full((8,), 1.0)), "b": (300.0, torch.full((8,), 3.0))}  # within the bound
    assert torch.allclose(robust_mean(fair)[0], torch.full((8,), 2.5))
