"""The average a group's members must apply, recomputed offline from the same messages, for lossy codecs.

A lossy codec (int4) cannot be checked value by value against the true mean, so bench.allreduce checks it two
ways: every member applied the same bytes (their sha256), and those bytes are what this module computes from the
members' payloads without any network. It redoes the all-reduce's arithmetic in the same order
(swarm.averaging): the vector split into one part per owner, each part into pipeline chunks; for every chunk the
owner's own values as they are and every other member's as decoded from its encoding, ``robust_mean`` over them,
and the encoded mean decoded again, as each member decodes it. The payloads are drawn from the workers' seeds
(bench.allreduce_worker.gaussian).
"""

from __future__ import annotations

import hashlib

import torch

from bench.allreduce_worker import gaussian, swarm_config
from swarm.averaging import Codec, chunk_bounds, part_bounds, robust_mean


def offline_average(payloads: dict[str, torch.Tensor], weights: dict[str, float], owners: list[str],
                    codec_name: str) -> torch.Tensor:
    """What every member applies when ``payloads`` ({peer id: flat fp32}) are averaged by ``owners`` in order."""
    cfg = swarm_config(codec_name)
    codec = Codec(codec_name, cfg.block_size)
    numel = next(iter(payloads.values())).numel()
    out = torch.empty(numel, dtype=torch.float32)
    for owner, (lo, hi) in zip(owners, part_bounds(numel, len(owners), cfg.block_size)):
        for a, b in chunk_bounds(lo, hi, cfg.chunk_values):
            arrived = {peer: (weights[peer], x[a:b] if peer == owner else codec.decode(codec.encode(x[a:b]), b - a))
                       for peer, x in payloads.items()}
            mean, _ = robust_mean(arrived)
            out[a:b] = codec.decode(codec.encode(mean), b - a)
    return out


def check_round(replies: list[dict], numel: int, codec_name: str) -> dict:
    """One round's replies (one per rank, each with its peer id, the group and its result's sha256) against the
    offline average: {"offline_match": bool, "rel_err": ‖result − exact mean‖ / ‖exact mean‖}."""
    torch.set_num_threads(1)  # the workers average with one thread each: the same reductions, the same bytes
    payloads = {r["peer_id"]: gaussian(numel, rank) for rank, r in enumerate(replies)}
    weights = dict(zip(replies[0]["members"], replies[0]["weights"]))
    result = offline_average(payloads, weights, replies[0]["owners"], codec_name)
    total = sum(weights.values())
    exact = torch.zeros(numel, dtype=torch.float64)
    for peer, x in payloads.items():
        exact += x.double() * (weights[peer] / total)
    digest = hashlib.sha256(result.numpy().tobytes()).hexdigest()
    return {"offline_match": all(r["result_sha256"] == digest for r in replies),
            "rel_err": float((result.double() - exact).norm() / exact.norm())}
