"""The CLI's inner loop: AdamW with the profile's schedule, one step on a batch. The Python API leaves this
to the user; the CLI and the benchmarks' baselines share this one copy, so they train alike."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from swarm.architectures import causal_lm_loss
from swarm.config import TrainConfig
from swarm.diloco import inner_lr


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW as in DiLoCo (arXiv 2311.08105): weight decay on matrices only, betas (0.9, 0.95)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=train.inner_lr, betas=(0.9, 0.95))


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay over the run's global inner steps (swarm.diloco.inner_lr)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: inner_lr(train, step) / train.inner_lr)


def inner_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               train: TrainConfig) -> float:
    """One optimizer step on a batch of token windows (on the model's device); returns the loss before it."""
    device = next(model.parameters()).device
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    model.train()
    bf16 = train.autocast == "bf16" and device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        loss = causal_lm_loss(model, x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if train.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    optimizer.step()
    return float(loss.detach())
