"""Which tensors a run averages, in which order, and the hash that proves two peers hold the same ones.

θ_global is the model's parameters flattened in ``named_parameters()`` order (tied tensors once), as
little-endian fp32. The run config carries the list of (name, shape, dtype) of those parameters: a
peer whose module differs is refused with one line naming the first difference, before it could
average a vector that means something else.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from swarm.config import ConfigError, RunConfig, pack_signature, unpack_signature

Signature = list[tuple[str, tuple[int, ...], str]]


def global_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs that DiLoCo averages, in a fixed order, without tied duplicates."""
    return list(model.named_parameters())  # named_parameters() already yields a tied tensor once


def signature(model: nn.Module) -> Signature:
    return [(name, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for name, p in global_parameters(model)]


def model_sha256(tensors: list[torch.Tensor]) -> str:
    """sha256 over the tensors in order, as little-endian fp32 bytes: equal hashes mean equal models.
    fp32 CPU tensors are hashed in place, without a copy."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            t = t.to("cpu", torch.float32).contiguous()
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def stamp(cfg: RunConfig, model: nn.Module) -> dict:
    """The run-config fields that describe ``model``: what a new run publishes about its parameters."""
    sig = signature(model)
    sha, packed = pack_signature(sig)
    params = [p for _, p in global_parameters(model)]
    return {"model_numel": sum(p.numel() for p in params), "signature_sha256": sha, "signature": packed,
            "theta0_sha256": model_sha256(params)}


def check_model(cfg: RunConfig, model: nn.Module) -> None:
    """ConfigError (one line) naming the first difference between ``model``'s parameters and the run's."""
    if not cfg.signature_sha256:
        return  # a run without a signature yet: its first peer is publishing it
    ours = signature(model)
    sha, _ = pack_signature(ours)
    if sha == cfg.signature_sha256:
        return
    numel = sum(_numel(shape) for _, shape, _ in ours)
    where = f"run {cfg.run_id!r} averages {cfg.model_numel:,} parameters"
    theirs = unpack_signature(cfg.signature)
    if theirs is None:
        raise ConfigError(f"this model's parameters ({len(ours)} tensors, {numel:,} values) differ from the ones "
                          f"{where} in (signature {sha[:12]} vs {cfg.signature_sha256[:12]})")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            raise ConfigError(f"this model's parameter {i} is {_describe(a)}, where {where} and has "
                              f"{_describe(b)}")
    raise ConfigError(f"this model has {len(ours)} parameter tensors ({numel:,} values), where {where} "
                      f"in {len(theirs)} tensors")


def _describe(entry: tuple[str, tuple[int, ...], str]) -> str:
    name, shape, dtype = entry
    return f"{name} {list(shape)} {dtype}"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def load_flat(model: nn.Module, theta: torch.Tensor) -> nn.Module:
    """Set ``model``'s parameters from a flat fp32 θ in the run's order (a checkpoint's ``theta_global``)."""
    params = [p for _, p in global_parameters(model)]
    numel = sum(p.numel() for p in params)
    if theta.numel() != numel:
        raise ValueError(f"θ has {theta.numel()} values, the model {numel}")
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(theta[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    return model
