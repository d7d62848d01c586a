"""Error feedback: what the codecs do not send is delayed, not lost; the residual is checkpointed, never averaged."""

from __future__ import annotations

import pytest
import torch

from swarm import int4, sparse
from swarm.error_feedback import ErrorFeedback

N = 8 * sparse.CHUNK_SIZE + 100

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


def gaussian(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def rounds(feedback: ErrorFeedback, codec, delta: torch.Tensor, count: int):
    """`count` rounds of the same delta; yields (round, what the round's message decodes to)."""
    v = torch.empty_like(delta)
    for k in range(1, count + 1):
        feedback.compensate(delta, out=v)
        message = codec.encode(v)
        codec.decode(message, delta.numel(), out=feedback.residual)  # straight into the residual: no third vector
        sent = feedback.residual.clone()
        feedback.update(v, feedback.residual)
        yield k, sent


def test_int4_sends_k_deltas_up_to_half_a_step_of_one():
    delta = gaussian(N) * torch.linspace(0.1, 10, N)  # blocks of very different scales
    feedback = ErrorFeedback(N)
    total = torch.zeros(N, dtype=torch.float64)
    # |e| <= step / 2 of v = delta + e: |e| <= (absmax(delta) + max|e|) / 14, so |e| <= absmax(delta) / 13, per block
    absmax = torch.cat([delta, delta.new_zeros(-N % int4.BLOCK_SIZE)]).view(-1, int4.BLOCK_SIZE).abs().amax(1)
    bound = (absmax / 13).repeat_interleave(int4.BLOCK_SIZE)[:N] * (1 + 1e-5)
    for k, sent in rounds(feedback, int4, delta, 200):
        total += sent.double()
        assert (feedback.residual.abs() <= bound).all()
        # sum(sent) = k delta - e_k: the identity error feedback rests on, up to fp32 rounding of v and of e
        gap = k * delta.double() - total - feedback.residual.double()
        assert gap.abs().max() <= k * 1e-6 * float(delta.abs().max())
    assert float((200 * delta.double() - total).norm() / (200 * delta.double()).norm()) < 1e-3


def test_sparse_sends_everything_eventually():
    delta = gaussian(N, seed=1)
    feedback = ErrorFeedback(N)
    total = torch.zeros(N, dtype=torch.float64)
    norms = []
    for k, sent in rounds(feedback, sparse, delta, 400):
        total += sent.double()
        norms.append(float(feedback.residual.norm()))
        gap = k * delta.double() - total - feedback.residual.double()
        assert float(gap.norm()) <= k * 1e-6 * float(delta.norm())
    # one value in C / k = 64 is sent a round: the residual grows for ~64 rounds, then stays below 64 |delta| (it
    # settles near 29 |delta| on Gaussian data), so sum(sent) / k tends to delta like 1 / k
    assert max(norms) <= sparse.CHUNK_SIZE / 64 * float(delta.norm())
    assert norms[-1] <= 1.05 * norms[199]
    assert float((400 * delta.double() - total).norm() / (400 * delta.double()).norm()) < 0.08
    # without feedback the same rounds send the same top-k values every time: 94% of delta is never sent
    never = delta - sparse.decode(sparse.encode(delta), N)
    assert float(never.norm() / delta.norm()) > 0.9


def test_compensate_in_place_and_into_a_buffer():
    feedback = ErrorFeedback(N)
    feedback.residual.copy_(gaussian(N, seed=2))
    delta = gaussian(N, seed=3)
    v = feedback.compensate(delta.clone(), out=torch.empty(N))
    assert torch.equal(v, delta + feedback.residual)
    copy = delta.clone()
    assert feedback.compensate(copy) is copy and torch.equal(copy, v)  # in place: no copy of the model
    with pytest.raises(ValueError, match="contiguous float32 tensor of"):
        feedback.compensate(torch.zeros(N + 1))


def test_disabled_is_a_no_op_for_int8_and_fp32():
    feedback = ErrorFeedback(N, enabled=False)
    delta = gaussian(N, seed=4)
    assert feedback.compensate(delta) is delta and feedback.residual is None
    out = torch.empty(N)
    assert torch.equal(feedback.compensate(delta, out=out), delta)
    feedback.update(delta, torch.zeros(N))
    assert feedback.state_dict() == {"numel": N, "residual": None}
    feedback.load_state_dict({"numel": N, "residual": None})


def test_residual_survives_a_checkpoint_and_a_resumed_peer_sends_the_same_bytes():
    delta = gaussian(N, seed=5)
    feedback = ErrorFeedback(N)
    for _ in rounds(feedback, sparse, delta, 3):
        pass
    state = feedback.state_dict()
    resumed = ErrorFeedback(N)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.residual, feedback.residual)
    feedback.residual.add_(1.0)  # the saved state is a copy
    assert not torch.equal(state["residual"], feedback.residual)
    feedback.load_state_dict(state)
    v, w = feedback.compensate(delta.clone()), resumed.compensate(delta.clone())
    assert torch.equal(sparse.encode(v), sparse.encode(w))


def test_load_state_dict_refuses_what_does_not_fit():
    feedback = ErrorFeedback(N)
    with pytest.raises(ValueError, match=f"residual of {N + 1} values, this model has {N}"):
        feedback.load_state_dict({"numel": N + 1, "residual": torch.zeros(N + 1)})
    with pytest.raises(ValueError, match="non-finite"):
        feedback.load_state_dict({"numel": N, "residual": torch.full((N,), float("nan"))})
    with pytest.raises(ValueError, match="float32 tensor"):
        feedback.load_state_dict({"numel": N, "residual": torch.zeros(N, dtype=torch.float64)})
    with pytest.raises(ValueError, match="error feedback is on here, the saved state has no residual"):
        feedback.load_state_dict({"numel": N, "residual": None})
    with pytest.raises(ValueError, match="error feedback is off here, the saved state has a residual"):
        ErrorFeedback(N, enabled=False).load_state_dict({"numel": N, "residual": torch.zeros(N)})
