"""DiLoCo (arXiv 2311.08105) for one peer: H inner AdamW steps, a pseudo-gradient, one outer Nesterov step.

Pure torch and no networking, so the math is testable alone. θ_global is kept as one
flat fp32 vector (the bytes that are averaged, hashed and checkpointed); the model's
parameters are θ_local. The averaging of pseudo-gradients happens elsewhere
(``swarm.averaging``); this module only computes Δ and applies the averaged one.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from swarm.config import TrainConfig
from swarm.model import global_parameters, model_sha256


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])


def inner_lr(cfg: TrainConfig, step: int) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio``, over the run's inner steps (``step`` counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.inner_lr * (step + 1) / cfg.warmup_steps
    total = max(cfg.schedule_outer_steps * cfg.inner_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / total, 1.0)
    floor = cfg.inner_lr * cfg.min_lr_ratio
    return floor + (cfg.inner_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def nesterov_step(theta: torch.Tensor, momentum: torch.Tensor, pseudo_gradient: torch.Tensor,
                  lr: float, mu: float) -> None:
    """Outer SGD with Nesterov momentum, in place (torch.optim.SGD(nesterov=True) semantics):
    m ← μ·m + Δ;  θ ← θ − lr·(Δ + μ·m)."""
    momentum.mul_(mu).add_(pseudo_gradient)
    theta.sub_(pseudo_gradient.add(momentum, alpha=mu), alpha=lr)


class DiLoCo:
    """One peer's DiLoCo state: θ_global, the outer momentum, the inner optimizer, the outer step counter."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.params = global_parameters(model)
        self.theta_global = flatten(self.params)
        self.momentum = torch.zeros_like(self.theta_global)
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        self.inner_opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.inner_lr, betas=(0.9, 0.95))
        self.outer_step = 0  # outer steps completed by the swarm in θ_global

    def inner_step(self, x: torch.Tensor, y: torch.Tensor, step_in_round: int) -> float:
        """One AdamW step on a batch; returns the loss before the step."""
        lr = inner_lr(self.cfg, self.outer_step * self.cfg.inner_steps + step_in_round)
        for group in self.inner_opt.param_groups:
            group["lr"] = lr
        self.model.train()
        _, loss = self.model(x, y)
        self.inner_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.inner_opt.step()
        return float(loss.detach())

    def pseudo_gradient(self) -> torch.Tensor:
        """Δ = θ_global − θ_local, flat fp32."""
        return self.theta_global - flatten(self.params)

    def apply_outer(self, averaged_pseudo_gradient: torch.Tensor, carry_from: torch.Tensor | None = None) -> None:
        """Outer Nesterov step on θ_global with the group's averaged Δ, then θ_local ← θ_global.

        ``carry_from``: θ_local (flat) at the moment Δ was taken, for the delayed update of overlapped
        rounds: the progress made since, θ_local − carry_from, is carried over onto the new θ_global.
        """
        progress = None if carry_from is None else flatten(self.params) - carry_from
        nesterov_step(self.theta_global, self.momentum, averaged_pseudo_gradient,
                      self.cfg.outer_lr, self.cfg.outer_momentum)
        self.outer_step += 1
        self.reset_local(progress)

    def reset_local(self, progress: torch.Tensor | None = None) -> None:
        """θ_local ← θ_global (+ ``progress``); the inner AdamW state stays local and is kept, as in DiLoCo."""
        local = self.theta_global if progress is None else self.theta_global + progress
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(local[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def model_sha256(self) -> str:
        return model_sha256([self.theta_global])

    def state(self) -> dict:
        """What a joiner needs to continue the run (a copy): θ_global, outer momentum and step."""
        return {"outer_step": self.outer_step, "theta_global": self.theta_global.clone(),
                "momentum": self.momentum.clone()}

    def inner_state(self) -> dict:
        """A copy of the local AdamW state (never shared; saved in this peer's checkpoints)."""
        return copy.deepcopy(self.inner_opt.state_dict())

    def load_inner_state(self, inner_state: dict) -> None:
        self.inner_opt.load_state_dict(inner_state)

    def load_state(self, state: dict) -> None:
        theta, momentum = state["theta_global"], state["momentum"]
        if theta.shape != self.theta_global.shape or momentum.shape != self.momentum.shape:
            raise ValueError(f"state has {theta.numel()} parameters, this model has {self.theta_global.numel()}")
        self.theta_global.copy_(theta)
        self.momentum.copy_(momentum)
        self.outer_step = int(state["outer_step"])
        self.reset_local()
