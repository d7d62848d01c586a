"""DiLoCo math against references written out by hand (weights set so the answers are known)."""

from __future__ import annotations

import math

import torch

from swarm.config import ModelConfig, TrainConfig
from swarm.diloco import DiLoCo, inner_lr, nesterov_step
from swarm.model import build_model, model_sha256


def test_nesterov_step_matches_hand_computed_values():
    theta = torch.tensor([1.0, -2.0])
    momentum = torch.zeros(2)
    lr, mu = 0.7, 0.9
    # step 1: m = Δ1 = [0.1, 0.2]; θ = θ - lr (Δ1 + mu m) = [1, -2] - 0.7 * 1.9 * [0.1, 0.2]
    nesterov_step(theta, momentum, torch.tensor([0.1, 0.2]), lr, mu)
    assert torch.allclose(momentum, torch.tensor([0.1, 0.2]))
    assert torch.allclose(theta, torch.tensor([1 - 0.133, -2 - 0.266]))
    # step 2: m = 0.9 [0.1, 0.2] + [0.3, -0.1] = [0.39, 0.08]; update = Δ2 + 0.9 m = [0.651, -0.028]
    nesterov_step(theta, momentum, torch.tensor([0.3, -0.1]), lr, mu)
    assert torch.allclose(momentum, torch.tensor([0.39, 0.08]))
    assert torch.allclose(theta, torch.tensor([1 - 0.133 - 0.7 * 0.651, -2 - 0.266 + 0.7 * 0.028]))


def test_nesterov_step_equals_torch_sgd_nesterov():
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(50, generator=gen)
    reference = torch.nn.Parameter(theta.clone())
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    momentum = torch.zeros(50)
    for _ in range(4):
        delta = torch.randn(50, generator=gen)
        nesterov_step(theta, momentum, delta, 0.7, 0.9)
        reference.grad = delta.clone()
        sgd.step()
    assert torch.allclose(theta, reference.detach(), atol=1e-6)


def test_inner_lr_warms_up_then_decays_by_cosine():
    cfg = TrainConfig(inner_lr=1.0, warmup_steps=10, inner_steps=10, schedule_outer_steps=3, min_lr_ratio=0.1)
    assert inner_lr(cfg, 0) == 0.1 and inner_lr(cfg, 9) == 1.0
    assert math.isclose(inner_lr(cfg, 10), 1.0)
    assert math.isclose(inner_lr(cfg, 20), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(inner_lr(cfg, 30), 0.1) and math.isclose(inner_lr(cfg, 1000), 0.1)


def test_pseudo_gradient_outer_step_and_reset():
    """Two peers with θ_local = θ_global - (rank + 1): Δ_r = rank + 1, the mean is known in advance."""
    cfg = TrainConfig(outer_lr=0.5, outer_momentum=0.0)
    peers = [DiLoCo(build_model(ModelConfig(n_layer=1, d_model=16, n_head=2, seq_len=8), 32, seed=3), cfg)
             for _ in range(2)]
    start = peers[0].theta_global.clone()
    assert peers[0].model_sha256() == peers[1].model_sha256() == model_sha256(list(peers[0].model.parameters()))
    for rank, peer in enumerate(peers):
        with torch.no_grad():
            for p in peer.params:
                p.sub_(rank + 1)
    deltas = [peer.pseudo_gradient() for peer in peers]
    for rank, delta in enumerate(deltas):
        assert torch.allclose(delta, torch.full_like(delta, rank + 1.0))
    averaged = (deltas[0] + deltas[1]) / 2  # 1.5 everywhere
    for peer in peers:
        peer.apply_outer(averaged)
        assert peer.outer_step == 1
        # no momentum: θ = θ0 - lr * 1.5
        assert torch.allclose(peer.theta_global, start - 0.75)
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in peer.params]), peer.theta_global)
    assert peers[0].model_sha256() == peers[1].model_sha256()


def test_inner_steps_reduce_the_loss_and_state_round_trips():
    torch.manual_seed(0)
    cfg = TrainConfig(inner_lr=3e-3, warmup_steps=2, inner_steps=30)
    peer = DiLoCo(build_model(ModelConfig(n_layer=1, d_model=32, n_head=2, seq_len=16), 16, seed=0), cfg)
    x = torch.randint(0, 16, (4, 16))
    y = torch.roll(x, -1, dims=1)
    losses = [peer.inner_step(x, y, i) for i in range(30)]
    assert losses[-1] < losses[0] * 0.7
    peer.apply_outer(peer.pseudo_gradient())
    other = DiLoCo(build_model(ModelConfig(n_layer=1, d_model=32, n_head=2, seq_len=16), 16, seed=9), cfg)
    other.load_state(peer.state())
    assert other.outer_step == 1 and other.model_sha256() == peer.model_sha256()
    assert torch.equal(other.momentum, peer.momentum)
