"""The validation hook: how a peer scores a state (a model's θ) on data nobody else chose.

A user of the Python API passes ``Validation(batches, loss)``: ``batches()`` returns a batch drawn
at random from their own data, ``loss(model, batch)`` the model's loss on it (lower is better).
The swarm uses it to refuse a state another peer serves that is worse than its own
(swarm.adoption), always on one fresh batch for both states, so a liar cannot fit it. A peer
without one is marked unverifiable in its liveness record: it adopts what the majority holds.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from swarm.diloco import OuterState


class Validation:
    def __init__(self, batches: Callable[[], Any], loss: Callable[[nn.Module, Any], float], model: nn.Module | None = None):
        self.batches, self.loss, self.model = batches, loss, model

    def score(self, model: nn.Module, batch: Any) -> float:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return float(self.loss(model, batch))
        finally:
            model.train(was_training)

    def compare(self, outer: OuterState, theta: torch.Tensor) -> tuple[float, float]:
        """(our θ_global's loss, ``theta``'s loss) on one fresh batch; θ_local is restored afterwards."""
        batch = self.batches()
        snapshot = outer.local_snapshot()
        try:
            outer.set_local(outer.theta_global)
            ours = self.score(self.model, batch)
            outer.set_local(theta)
            theirs = self.score(self.model, batch)
        finally:
            outer.set_local(snapshot)
        return ours, theirs
