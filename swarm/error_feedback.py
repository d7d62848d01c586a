"""Error feedback for lossy pseudo-gradient codecs (swarm.int4, swarm.sparse): what a round did not send is carried
into the next round instead of being lost (Covenant-72B, SparseLoCo arXiv 2508.15706).

Each peer keeps a residual e (fp32, one value per parameter, zero at the start). A round sends v = delta + e, then
keeps e = v - decode(sent). Over K rounds the values sent add up to the sum of the deltas minus the last residual:
sum(sent) = sum(delta) - e_K, so nothing is dropped for good, only delayed, as long as e_K stays bounded. With int4
it does: |e| <= half a step of v = delta + e, so |e| <= absmax(delta) / 13 per block. With top-k at 1/64, each value
waits its turn: rounds of one Gaussian delta settle at |e| ~ 29 |delta| (tests/test_error_feedback.py).

The residual is this peer's own state: it goes into the peer's checkpoint (`state_dict`), never into an average.
Memory: the residual is one more model-sized fp32 vector, and nothing else: `compensate` writes v into a buffer the
caller gives (the delta itself, in place, if the caller needs it no longer), and `update` accepts the residual
itself as the decoded buffer, so `codec.decode(message, out=feedback.residual)` then `feedback.update(v,
feedback.residual)` needs no third vector.

`ErrorFeedback(numel, enabled=False)` is the option for lossless or nearly lossless codecs (fp32, int8): v = delta,
no residual kept, nothing saved.
"""

from __future__ import annotations

import torch


class ErrorFeedback:
    """The residual e of one peer's pseudo-gradient codec (module docstring)."""

    def __init__(self, numel: int, enabled: bool = True):
        if not isinstance(numel, int) or numel < 0:
            raise ValueError(f"numel must be a non-negative int, got {numel!r}")
        self.numel, self.enabled = numel, enabled
        self.residual = torch.zeros(numel) if enabled else None

    def _check(self, name: str, x: torch.Tensor) -> None:
        if x.dtype != torch.float32 or x.numel() != self.numel or not x.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor of {self.numel} values, "
                             f"got {x.dtype} of {x.numel()}")

    def compensate(self, delta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """v = delta + e, written into `out` (default: delta itself, in place) and returned: what to encode."""
        self._check("delta", delta)
        out = delta if out is None else out
        self._check("out", out)
        if not self.enabled:
            return out if out is delta else out.copy_(delta)
        torch.add(delta.view(-1), self.residual, out=out.view(-1))
        return out

    def update(self, v: torch.Tensor, sent: torch.Tensor) -> None:
        """e = v - sent, after a round that sent `v` (from compensate) as a message that decodes to `sent`. `sent`
        may be the residual itself (decode into it: no extra buffer). Call it only once the message is sent: after a
        failed round, leave e as it was."""
        if not self.enabled:
            return
        self._check("v", v)
        self._check("sent", sent)
        torch.sub(v.view(-1), sent.view(-1), out=self.residual)

    def reset(self) -> None:
        """Forget what was not sent (we adopted another peer's state: our past progress went with our own)."""
        if self.enabled:
            self.residual.zero_()

    def state_dict(self) -> dict:
        """The residual, for this peer's checkpoint (a copy: later updates leave it alone)."""
        return {"numel": self.numel, "residual": None if self.residual is None else self.residual.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a residual saved by state_dict; refuses one of another size or with non-finite values."""
        residual = state.get("residual")
        if state.get("numel") != self.numel:
            raise ValueError(f"residual of {state.get('numel')} values, this model has {self.numel}")
        if (residual is None) != (self.residual is None):
            raise ValueError(f"error feedback is {'off' if self.residual is None else 'on'} here, "
                             f"the saved state has {'no' if residual is None else 'a'} residual")
        if residual is None:
            return
        if not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32 or residual.numel() != self.numel:
            raise ValueError(f"residual must be a float32 tensor of {self.numel} values")
        if not torch.isfinite(residual).all():
            raise ValueError("residual holds non-finite values")
        self.residual.copy_(residual.reshape(-1))
