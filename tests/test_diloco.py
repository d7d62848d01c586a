"""DiLoCo math against references written out by hand (weights set so the answers are known)."""

from __future__ import annotations

import math

import torch

from swarm.config import ModelConfig, TrainConfig
from swarm.diloco import DiLoCo, flatten, inner_lr, nesterov_step
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


def _trained_pair(steps: int = 5):
    cfg = TrainConfig(inner_lr=3e-3, warmup_steps=1)
    peers = [DiLoCo(build_model(ModelConfig(n_layer=1, d_model=32, n_head=2, seq_len=16), 16, seed=0), cfg)
             for _ in range(2)]
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 16, (4, 17), generator=gen) for _ in range(steps)]
    for peer in peers:
        for i, b in enumerate(batches):
            peer.inner_step(b[:, :-1], b[:, 1:], i)
    return peers


def test_delayed_outer_update_with_a_zero_latency_average_equals_the_plain_update():
    plain, delayed = _trained_pair()
    averaged = plain.pseudo_gradient() * 0.5  # any average: the same bytes for both
    snapshot = flatten(delayed.params)  # overlap: Δ taken here, and the average arrives at once
    plain.apply_outer(averaged)
    delayed.apply_outer(averaged, carry_from=snapshot)
    assert torch.equal(plain.theta_global, delayed.theta_global)
    assert torch.equal(flatten(plain.params), flatten(delayed.params))
    assert plain.model_sha256() == delayed.model_sha256()


def test_delayed_outer_update_carries_the_progress_made_meanwhile():
    _, delayed = _trained_pair()
    theta_before = delayed.theta_global.clone()
    averaged = delayed.pseudo_gradient()
    snapshot = flatten(delayed.params)
    x = torch.randint(0, 16, (4, 17), generator=torch.Generator().manual_seed(9))
    delayed.inner_step(x[:, :-1], x[:, 1:], 5)  # the next round goes on while the average travels
    progress = flatten(delayed.params) - snapshot
    delayed.apply_outer(averaged, carry_from=snapshot)
    # by hand: momentum 0 -> m = Δ; θ = θ0 - lr (Δ + 0.9 Δ); θ_local = θ + progress
    expected_theta = theta_before - 0.7 * 1.9 * averaged
    assert torch.allclose(delayed.theta_global, expected_theta, atol=1e-6)
    assert torch.allclose(flatten(delayed.params), expected_theta + progress, atol=1e-6)
