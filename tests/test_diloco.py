"""DiLoCo's outer math against references written out by hand, torch's SGD, and a numpy reference bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from swarm.config import TrainConfig
from swarm.diloco import NonFiniteError, OuterState, inner_lr, nesterov_step
from swarm.signature import model_sha256


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


def numpy_nesterov(theta, momentum, delta, lr: float, mu: float):
    """The outer step with one rounding per operation, in float32: what every machine must compute."""
    mu32, lr32 = np.float32(mu), np.float32(lr)
    m = np.multiply(momentum, mu32, dtype=np.float32)
    m = np.add(m, delta, dtype=np.float32)
    s = np.multiply(m, mu32, dtype=np.float32)
    s = np.add(s, delta, dtype=np.float32)
    s = np.multiply(s, lr32, dtype=np.float32)
    return np.subtract(theta, s, dtype=np.float32), m


def awkward_floats(n: int, seed: int) -> np.ndarray:
    """Normal values, subnormals, large magnitudes and exact zeros, mixed; no inf or NaN."""
    rng = np.random.default_rng(seed)
    scale = rng.choice(np.array([1.0, 1e-39, 1e-42, 1e30, 1e-20, 0.0]), size=n, p=[0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    return (rng.standard_normal(n) * scale).astype(np.float32)


@pytest.mark.parametrize("threads", [1, 2])
def test_outer_step_is_bit_identical_to_a_numpy_reference_of_separate_operations(threads):
    """Vectorised kernels may fuse a multiply and an add (an FMA) and round once instead of twice; the outer step
    must not, or replicas on different CPUs would drift apart in the last bits."""
    n = 3 * (1 << 20) + 123  # several chunks of the outer step, and a ragged tail
    theta, momentum, delta = (awkward_floats(n, seed) for seed in (1, 2, 3))
    assert np.isfinite(theta).all() and (np.abs(delta) < 1e-37).sum() > n // 10  # subnormals are in there
    lr, mu = 0.7, 0.9
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t, m = torch.from_numpy(theta.copy()), torch.from_numpy(momentum.copy())
        for _ in range(2):  # two steps: the momentum carries over
            nesterov_step(t, m, torch.from_numpy(delta), lr, mu)
            theta, momentum = numpy_nesterov(theta, momentum, delta, lr, mu)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(t.numpy().view(np.uint32), theta.view(np.uint32))
    assert np.array_equal(m.numpy().view(np.uint32), momentum.view(np.uint32))


def test_inner_lr_warms_up_then_decays_by_cosine():
    cfg = TrainConfig(inner_lr=1.0, warmup_steps=10, inner_steps=10, schedule_outer_steps=3, min_lr_ratio=0.1)
    assert inner_lr(cfg, 0) == 0.1 and inner_lr(cfg, 9) == 1.0
    assert math.isclose(inner_lr(cfg, 10), 1.0)
    assert math.isclose(inner_lr(cfg, 20), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(inner_lr(cfg, 30), 0.1) and math.isclose(inner_lr(cfg, 1000), 0.1)


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def test_pseudo_gradient_outer_step_and_reset():
    """Two peers with θ_local = θ_global - (rank + 1): Δ_r = rank + 1, the mean is known in advance."""
    cfg = TrainConfig(outer_lr=0.5, outer_momentum=0.0)
    models = [small_model(3), small_model(3)]
    peers = [OuterState(list(m.parameters()), cfg) for m in models]
    start = peers[0].theta_global.clone()
    assert peers[0].model_sha256() == peers[1].model_sha256() == model_sha256(list(models[0].parameters()))
    for rank, model in enumerate(models):
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(rank + 1)
    deltas = [peer.pseudo_gradient().clone() for peer in peers]
    assert all(torch.allclose(d, torch.full_like(d, rank + 1)) for rank, d in enumerate(deltas))
    mean = (deltas[0] + deltas[1]) / 2  # 1.5 everywhere
    for peer in peers:
        generation = peer.generation
        peer.apply_outer(mean.clone())
        assert peer.outer_step == 1 and peer.generation == generation + 1
    assert torch.allclose(peers[0].theta_global, start - 0.5 * 1.5)
    assert peers[0].model_sha256() == peers[1].model_sha256()
    for model, peer in zip(models, peers):  # θ_local ← θ_global
        assert model_sha256(list(model.parameters())) == peer.model_sha256()


def test_a_step_that_would_leave_theta_non_finite_changes_nothing():
    peer = OuterState(list(small_model(0).parameters()), TrainConfig(outer_lr=10.0, outer_momentum=0.0))
    before = peer.buffer.clone()
    with pytest.raises(NonFiniteError):
        peer.apply_outer(torch.full((peer.numel,), 3e38))
    assert torch.equal(peer.buffer, before) and peer.outer_step == 0


def test_delayed_outer_update_carries_the_progress_made_meanwhile():
    """Overlap: the average of round k arrives while round k+1 trains; the progress since Δ was taken is kept."""
    model = small_model(1)
    peer = OuterState(list(model.parameters()), TrainConfig(outer_lr=1.0, outer_momentum=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(1.0)  # round k's progress: Δ = 1
    snapshot = peer.local_snapshot()
    delta = peer.pseudo_gradient().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.25)  # round k+1 goes on meanwhile
    start = peer.theta_global.clone()
    peer.apply_outer(delta, carry_from=snapshot)
    local = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(peer.theta_global, start - 1.0)
    assert torch.allclose(local, peer.theta_global - 0.25)  # the later progress sits on the new θ_global


def test_state_round_trips_and_a_wrong_size_is_refused():
    a, b = OuterState(list(small_model(0).parameters()), TrainConfig()), OuterState(list(small_model(9).parameters()),
                                                                                    TrainConfig())
    a.apply_outer(torch.ones(a.numel))
    b.load({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in a.state().items()})
    assert b.outer_step == 1 and b.model_sha256() == a.model_sha256() and torch.equal(b.momentum, a.momentum)
    with pytest.raises(ValueError, match="state has 10 parameters"):
        b.load({"outer_step": 5, "theta_global": torch.zeros(10), "momentum": torch.zeros(10)})
