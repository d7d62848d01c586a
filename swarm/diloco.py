"""DiLoCo's outer side (arXiv 2311.08105) for one peer: θ_global, the outer momentum, Δ, the Nesterov step.

Pure torch and no networking, so the math is testable alone. The model's parameters are θ_local,
wherever they live (CPU or GPU, any dtype); θ_global and the momentum are one flat fp32 buffer on
the CPU: the bytes that are averaged, hashed, served to joiners and checkpointed. That buffer is the
payload peers serve, without a copy, so it only ever changes in ``apply_outer`` and ``load``, and
``generation`` counts those changes for readers on other threads.

The outer step uses only correctly rounded elementwise operations (a multiply, then an add, never a
fused multiply-add or an alpha-scaled add), in fp32 on the CPU, chunk by chunk: every machine that
applies the same averaged bytes to the same θ_global gets the same bits, whatever its vector unit
(docs/architecture.md, "Byte-identical replicas").
"""

from __future__ import annotations

import math

import torch

from swarm.config import TrainConfig
from swarm.signature import model_sha256

OUTER_CHUNK = 1 << 20  # values per outer-step chunk: its scratch stays in cache


class NonFiniteError(ArithmeticError):
    """Training produced NaN or inf: in a loss, in Δ, or in θ_global after an outer step."""


def inner_lr(cfg: TrainConfig, step: int) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio``, over the run's inner steps (``step`` counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.inner_lr * (step + 1) / cfg.warmup_steps
    total = max(cfg.schedule_outer_steps * cfg.inner_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / total, 1.0)
    floor = cfg.inner_lr * cfg.min_lr_ratio
    return floor + (cfg.inner_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def nesterov_step(theta: torch.Tensor, momentum: torch.Tensor, pseudo_gradient: torch.Tensor, lr: float, mu: float,
                  commit: bool = True) -> bool:
    """Outer SGD with Nesterov momentum (torch.optim.SGD(nesterov=True) semantics), in place, fp32 CPU:
    m ← μ·m + Δ;  θ ← θ − lr·(Δ + μ·m). Each product and sum is its own rounded operation.

    ``commit=False`` computes without writing and only says whether every new value would be finite."""
    scratch = torch.empty(min(OUTER_CHUNK, theta.numel()), dtype=torch.float32)
    m_new = torch.empty_like(scratch) if not commit else None
    mu32, lr32 = float(torch.tensor(mu, dtype=torch.float32)), float(torch.tensor(lr, dtype=torch.float32))
    for a in range(0, theta.numel(), OUTER_CHUNK):
        b = min(a + OUTER_CHUNK, theta.numel())
        m, d, t = momentum[a:b], pseudo_gradient[a:b], theta[a:b]
        s = scratch[:b - a]
        if commit:
            m.mul_(mu32).add_(d)  # m ← μ·m, then m ← m + Δ
            torch.mul(m, mu32, out=s)
        else:
            mn = m_new[:b - a]
            torch.mul(m, mu32, out=mn).add_(d)
            torch.mul(mn, mu32, out=s)
        s.add_(d).mul_(lr32)  # s ← (μ·m + Δ)·lr
        if commit:
            t.sub_(s)
        elif not torch.isfinite(torch.sub(t, s, out=s)).all():
            return False
    return True


class OuterState:
    """One peer's outer state: θ_global and the outer momentum in one fp32 buffer, the outer step counter, and
    a reused Δ buffer. ``params`` are θ_local, the model's tensors, in the run's order (swarm.signature)."""

    def __init__(self, params: list[torch.Tensor], train: TrainConfig, pin_memory: bool = False):
        self.params, self.cfg = params, train
        self.numel = sum(p.numel() for p in params)
        self.buffer = torch.empty(2 * self.numel, dtype=torch.float32, pin_memory=pin_memory)
        self.theta_global, self.momentum = self.buffer[:self.numel], self.buffer[self.numel:]
        self.delta = torch.empty(self.numel, dtype=torch.float32, pin_memory=pin_memory)  # Δ, then the average
        self._gather_local(self.theta_global)
        self.momentum.zero_()
        self.outer_step = 0  # outer steps completed by the swarm in θ_global
        self.generation = 0  # bumped before the buffer changes
        self._hashed: tuple[int, str] = (-1, "")  # (generation, θ_global's hash): one hash per outer step, not three

    def _gather_local(self, out: torch.Tensor) -> None:
        """θ_local, flat fp32, into ``out`` (one copy per parameter, no temporary of the whole model)."""
        offset = 0
        for p in self.params:
            n = p.numel()
            out[offset:offset + n].view_as(p).copy_(p.detach(), non_blocking=True)
            offset += n
        if any(p.is_cuda for p in self.params):
            torch.cuda.synchronize()

    def pseudo_gradient(self) -> torch.Tensor:
        """Δ = θ_global − θ_local, flat fp32, in the reused Δ buffer (valid until the next call)."""
        self._gather_local(self.delta)
        torch.sub(self.theta_global, self.delta, out=self.delta)
        return self.delta

    def local_snapshot(self) -> torch.Tensor:
        """A copy of θ_local, flat fp32 (overlap: the progress made after it is carried over an outer step)."""
        out = torch.empty(self.numel, dtype=torch.float32)
        self._gather_local(out)
        return out

    def apply_outer(self, averaged: torch.Tensor, carry_from: torch.Tensor | None = None) -> None:
        """Outer Nesterov step on θ_global with the group's averaged Δ, then θ_local ← θ_global.

        ``carry_from``: θ_local (flat) when Δ was taken, for the delayed update of overlapped rounds: the
        progress made since, θ_local − carry_from, is carried over onto the new θ_global (Streaming DiLoCo,
        arXiv 2501.18512). NonFiniteError, with nothing changed, if the step would leave θ_global non-finite.
        """
        lr, mu = self.cfg.outer_lr, self.cfg.outer_momentum
        if not nesterov_step(self.theta_global, self.momentum, averaged, lr, mu, commit=False):
            raise NonFiniteError(f"the outer step {self.outer_step + 1} would make θ_global non-finite")
        self.generation += 1
        nesterov_step(self.theta_global, self.momentum, averaged, lr, mu)
        self.outer_step += 1
        self.reset_local(carry_from)

    def set_local(self, flat: torch.Tensor) -> None:
        """θ_local ← ``flat`` (fp32, the run's order): to score another state with the model, or restore ours."""
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.copy_(flat[offset:offset + n].view_as(p), non_blocking=True)
                offset += n
        if any(p.is_cuda for p in self.params):
            torch.cuda.synchronize()

    def reset_local(self, carry_from: torch.Tensor | None = None) -> None:
        """θ_local ← θ_global (+ θ_local − ``carry_from``); inner optimizer state is the caller's and stays."""
        if carry_from is None:
            self.set_local(self.theta_global)
            return
        offset = 0
        with torch.no_grad():
            for p in self.params:  # p ← θ_global + (p − snapshot), in p's own precision and place
                n = p.numel()
                p.sub_(carry_from[offset:offset + n].view_as(p).to(p.device, p.dtype))
                p.add_(self.theta_global[offset:offset + n].view_as(p).to(p.device, p.dtype))
                offset += n

    def model_sha256(self) -> str:
        """θ_global's hash, computed once per change: the outer event, the manifest and the status all ask. On
        the training thread only, the one that changes θ_global."""
        if self._hashed[0] != self.generation:
            self._hashed = (self.generation, model_sha256([self.theta_global]))
        return self._hashed[1]

    def state(self) -> dict:
        """A view of the state a joiner needs: outer step, θ_global, momentum (valid until the next change)."""
        return {"outer_step": self.outer_step, "theta_global": self.theta_global, "momentum": self.momentum,
                "buffer": self.buffer, "generation": self.generation, "model_sha256": self.model_sha256()}

    def load(self, state: dict) -> None:
        """Take θ_global, momentum and step from a verified state, and set θ_local to it."""
        theta, momentum = state["theta_global"], state["momentum"]
        if theta.numel() != self.numel or momentum.numel() != self.numel:
            raise ValueError(f"state has {theta.numel()} parameters, this model has {self.numel}")
        self.generation += 1
        self.theta_global.copy_(theta.reshape(-1))
        self.momentum.copy_(momentum.reshape(-1))
        self.outer_step = int(state["outer_step"])
        self.reset_local()

    def all_finite(self) -> bool:
        return bool(torch.isfinite(self.buffer).all())
