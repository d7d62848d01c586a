"""The outer loop of one peer, as a small state machine with a typed outcome per round.

A round ends after H inner steps. Its Δ is averaged on the network thread; then one of four things
happened, and each says what becomes of the round's samples:

* ``Averaged``: the group's average was applied (outer Nesterov step); the samples are spent.
* ``Carried``: no average (no group, a failed all-reduce, a stale round with nothing better to adopt).
  θ_global is unchanged and θ_local keeps the progress, so the next Δ holds it: the samples are
  carried over and weigh in the next average. No work is lost while Δ is kept.
* ``Resynced``: the swarm was ahead and we adopted its state (swarm.adoption); θ_local was replaced,
  and the samples went with it.
* ``RolledBack``: the round diverged (a non-finite loss or Δ): θ_local ← θ_global, the inner
  optimizer's state is reset, and the samples are dropped. Three in a row end the peer.

With ``train.overlap`` the next round trains while the last one averages; its average is applied
with a one-step delay, and the progress made meanwhile is carried over onto the new θ_global
(Streaming DiLoCo, arXiv 2501.18512, with the whole model as one fragment).

A lossy codec (int4) sends v = Δ + e, where e is what earlier rounds' encodings left out (error feedback,
swarm.error_feedback); once a round is averaged, e becomes v minus what the owners received of it. A round
that is not averaged leaves e as it was, and an adopted state resets it.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from swarm.adoption import Adoption
from swarm.averaging import AverageResult
from swarm.config import RunConfig
from swarm.diloco import NonFiniteError, OuterState
from swarm.error_feedback import ErrorFeedback
from swarm.liveness import round_progress
from swarm.manifest import DownloadError, Manifest
from swarm.matchmaking import AveragingError, StaleRound
from swarm.metrics import Metrics, human_bytes
from swarm.node import Node
from swarm.validation import Validation

log = logging.getLogger("swarm")

MAX_DIVERGED = 3  # rounds in a row that diverge before the peer gives up


class DivergedError(RuntimeError):
    """Training diverged in MAX_DIVERGED rounds in a row (exit code 1)."""


@dataclass(frozen=True)
class Averaged:
    outer_step: int
    result: AverageResult
    wait_s: float  # how long training waited for the average (overlap: usually 0)


@dataclass(frozen=True)
class Carried:
    outer_step: int
    samples: int  # now owed to the next average
    reason: str


@dataclass(frozen=True)
class Resynced:
    outer_step: int  # the step of the state we adopted
    dropped_samples: int


@dataclass(frozen=True)
class RolledBack:
    outer_step: int
    dropped_samples: int
    reason: str


Outcome = Averaged | Carried | Resynced | RolledBack


@dataclass
class _Pending:
    """A round whose Δ is being averaged on the network thread."""

    outer_step: int
    future: Future
    snapshot: torch.Tensor | None  # θ_local when Δ was taken (overlap: progress since is carried over)
    loss: float
    samples: int  # the weight it was averaged with: its own samples and those carried into it
    residual: torch.Tensor | None  # error feedback: what this round's encoding leaves out, kept if it is averaged


class Rounds:
    """Counts inner steps, ends rounds, averages them and applies the outcome."""

    def __init__(self, cfg: RunConfig, outer: OuterState, node: Node, adoption: Adoption, metrics: Metrics,
                 name: str, hold: Callable[[], None], reset_optimizer: Callable[[], None],
                 validation: Validation | None, on_adopted: Callable[[], None]):
        self.cfg, self.outer, self.node, self.adoption, self.metrics = cfg, outer, node, adoption, metrics
        self.name, self.hold, self.reset_optimizer = name, hold, reset_optimizer
        self.validation, self.on_adopted = validation, on_adopted
        self.codec = node.averager.codec
        self.feedback = ErrorFeedback(outer.numel, enabled=self.codec.lossy)
        self.inner_in_round = 0
        self.round_samples = 0  # samples of the round in progress
        self.carried = 0  # samples in θ_local's progress from rounds that were not averaged
        self.losses: list[float] = []
        self.pending: _Pending | None = None
        self.diverged_in_a_row = 0
        self.samples_total = 0
        self.outcomes: list[Outcome] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="swarm-average")

    @property
    def training_round(self) -> int:
        """The round the inner steps now being taken belong to."""
        return self.outer.outer_step + 1 + (self.pending is not None)

    @property
    def global_step(self) -> int:
        """The swarm's inner step: the same on every peer of the round, for learning-rate schedules."""
        return (self.training_round - 1) * self.cfg.train.inner_steps + self.inner_in_round

    def inner_step_done(self, samples: int, loss: float | None) -> Outcome | None:
        """Count one inner step; after the H-th, end the round. Returns the outcome of a round settled now."""
        self.inner_in_round += 1
        self.round_samples += samples
        self.samples_total += samples
        if loss is not None:
            self.losses.append(float(loss))
        outcome = None
        if self.pending is not None and self.pending.future.done():  # overlap: apply it between inner steps
            outcome = self._settle()
        if self.inner_in_round >= self.cfg.train.inner_steps:
            outcome = self._end_round() or outcome
        return outcome

    def _end_round(self) -> Outcome | None:
        k = self.training_round
        losses, samples = self.losses, self.round_samples
        self.inner_in_round, self.round_samples, self.losses = 0, 0, []
        mean_loss = sum(losses) / len(losses) if losses else float("nan")
        if losses and not all(math.isfinite(x) for x in losses):
            return self._roll_back(k, samples, f"loss {mean_loss}")
        outcome = None
        if self.pending is not None:  # the previous round's average is still on the wire: wait for it
            outcome = self._settle()
            if isinstance(outcome, (Resynced, RolledBack)):  # θ_local was replaced: this round's work is void
                return outcome
        delta = self.outer.pseudo_gradient()
        if not bool(torch.isfinite(delta).all()):
            return self._roll_back(k, samples, "non-finite parameters")
        self.diverged_in_a_row = 0
        weight = self.carried + samples
        self.carried = 0
        snapshot = self.outer.local_snapshot() if self.cfg.train.overlap else None
        residual = None
        if self.feedback.enabled:
            self.feedback.compensate(delta)  # v = Δ + e, in place
            sent = self.codec.sent(delta)
            residual = torch.sub(delta, sent, out=sent)
        self.node.update_status(state="averaging", samples=self.samples_total, inner=self.cfg.train.inner_steps)
        future = self._pool.submit(self.node.average, k, delta, weight, self.outer.model_sha256(),
                                   0.0 if math.isnan(mean_loss) else mean_loss)
        self.pending = _Pending(k, future, snapshot, mean_loss, weight, residual)
        self.node.training(self.training_round)
        if not self.cfg.train.overlap:
            outcome = self._settle()
        self.node.update_status(round=self.outer.outer_step + 1, training=self.training_round, state="training",
                                inner=self.inner_in_round)
        return outcome

    def _roll_back(self, k: int, samples: int, why: str) -> RolledBack:
        """A diverged round: back to θ_global, a fresh inner optimizer state, the round's samples dropped."""
        if self.pending is not None:
            self._settle()
        self.diverged_in_a_row += 1
        dropped = samples + self.carried
        self.carried = 0
        self.outer.reset_local()
        self.reset_optimizer()
        log.warning("%s round %d diverged (%s): rolled back to θ_global of outer step %d and reset the optimizer "
                    "state (%d of %d in a row)", self.name, k, why, self.outer.outer_step, self.diverged_in_a_row,
                    MAX_DIVERGED)
        if self.diverged_in_a_row >= MAX_DIVERGED:
            raise DivergedError(f"training diverged in {MAX_DIVERGED} rounds in a row ({why}); lower the learning "
                                f"rates, or check the data")
        return self._record(RolledBack(k, dropped, why))

    def _settle(self) -> Outcome:
        """Wait for the pending round's average and apply it, or say what became of its samples."""
        pending, self.pending = self.pending, None
        t0 = time.monotonic()
        try:
            result = pending.future.result()
        except StaleRound as e:
            log.info("%s %s: fetching the swarm's model", self.name, e)
            if self.resync():
                return self._record(Resynced(self.outer.outer_step, pending.samples))
            return self._carry(pending, f"{e}, and no newer state to adopt")
        except AveragingError as e:
            log.warning("%s outer step %d not averaged: %s", self.name, pending.outer_step, e)
            return self._carry(pending, str(e))
        except Exception as e:  # our own failure (or the network thread's cap): nobody else is to blame
            log.warning("%s outer step %d not averaged: %s: %s", self.name, pending.outer_step, type(e).__name__, e)
            log.debug("averaging failed on our side", exc_info=True)
            return self._carry(pending, f"{type(e).__name__}: {e}")
        wait_s = time.monotonic() - t0
        try:
            self.outer.apply_outer(result.average, carry_from=pending.snapshot)
        except NonFiniteError as e:  # θ_local still holds the round's progress: the next Δ carries it
            log.warning("%s outer step %d not applied: %s", self.name, pending.outer_step, e)
            return self._carry(pending, str(e))
        if pending.residual is not None:
            self.feedback.residual = pending.residual
        self.adoption.pace.averaged(self.outer.outer_step)
        self.adoption.pace.began()
        self.hold()
        model_hash = self.outer.model_sha256()
        group = result.group
        losses = [x for x in group.losses if math.isfinite(x)]
        self.metrics.emit(
            "outer", outer_step=pending.outer_step, group_size=len(group.members), group=list(group.members),
            weights=list(group.weights), loss=round(pending.loss, 4),
            group_loss=round(sum(losses) / len(losses), 4) if losses else None, bytes_sent=result.bytes_sent,
            bytes_recv=result.bytes_recv, allreduce_s=round(result.allreduce_s, 3),
            matchmaking_s=round(result.matchmaking_s, 3), wait_s=round(wait_s, 3), model_sha256=model_hash,
            average_sha256=result.average_sha256, attempts=result.attempts, refused=result.refused,
            clipped=result.clipped, samples=pending.samples)
        log.info("%s outer step %d: group %d, loss %.3f, all-reduce %.2f s, waited %.2f s, sent %s, model %s",
                 self.name, pending.outer_step, len(group.members), pending.loss, result.allreduce_s, wait_s,
                 human_bytes(result.bytes_sent), model_hash[:12])
        return self._record(Averaged(pending.outer_step, result, wait_s))

    def _carry(self, pending: _Pending, reason: str) -> Carried:
        self.carried += pending.samples
        return self._record(Carried(pending.outer_step, self.carried, reason))

    def _record(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        self.node.training(self.training_round)
        self.node.update_status(round=self.outer.outer_step + 1, training=self.training_round,
                                inner=self.inner_in_round)
        return outcome

    def resync(self, local: tuple[Manifest, bytes] | None = None, any_step: bool = False) -> bool:
        """Adopt the swarm's state if one passes the adoption rules (swarm.adoption); False keeps ours.
        ``any_step``: ours is no state of the run (a joiner whose own θ is not the run's θ_0): take any."""
        ours = (-1, "") if any_step else (self.outer.outer_step, self.outer.model_sha256())
        for candidate in self.adoption.tries(lambda: self.node.live_peers(fresh=True), *ours):
            holders = ", ".join(h[-6:] for h in candidate.holders)
            try:
                manifest, state, stats = self.node.download(candidate, self.cfg.run_id, self.outer.numel, local)
            except DownloadError as e:
                if e.blame:
                    self.adoption.ban(e.blame, str(e))
                log.warning("could not fetch outer step %d from %s: %s", candidate.outer_step, holders, e)
                continue
            except Exception as e:  # our side (a timeout of the network thread, say): keep what we have
                log.warning("could not fetch outer step %d: %s: %s", candidate.outer_step, type(e).__name__, e)
                log.debug("download failed on our side", exc_info=True)
                continue
            if not (torch.isfinite(state["theta_global"]).all() and torch.isfinite(state["momentum"]).all()):
                self.adoption.ban(candidate.holders, f"its state of outer step {candidate.outer_step} is not finite")
                continue
            if self.validation is not None:
                ours, theirs = self.validation.compare(self.outer, state["theta_global"])
                if not self.adoption.acceptable(theirs, ours, self.cfg.swarm.adopt_loss_margin):
                    self.adoption.refuse(candidate, f"its validation loss is {theirs:.4f}, ours {ours:.4f}")
                    continue
            self.outer.load(state)
            self.carried, self.round_samples, self.losses = 0, 0, []
            self.feedback.reset()
            self.inner_in_round = self._catch_up()
            self.adoption.pace.adopted(manifest.outer_step)
            self.adoption.pace.began()
            self.hold()
            self.on_adopted()
            self.metrics.emit("bootstrap", outer_step=manifest.outer_step, bytes=stats.bytes, sources=stats.sources,
                              seconds=round(stats.seconds, 3), verified=True, reused_chunks=stats.reused_chunks,
                              banned=list(stats.banned), model_sha256=manifest.model_sha256)
            log.info("downloaded outer step %d (%s from %d peers, %d chunks reused, verified) in %.1f s",
                     manifest.outer_step, human_bytes(stats.bytes), stats.sources, stats.reused_chunks, stats.seconds)
            return True
        return False

    def _catch_up(self) -> int:
        """The inner steps the swarm has already taken in the round we now train (we just adopted its state):
        we skip them, and average in that round's group with the samples we did train, instead of arriving
        after the group closed and fetching the swarm's model once more."""
        k, h = self.training_round, self.cfg.train.inner_steps
        skip = min(h - 1, round_progress(self.node.live_peers(), k, h, time.time(), 3 * self.cfg.swarm.heartbeat_s))
        if skip:
            log.info("%s starts round %d at inner step %d of %d, where the swarm is", self.name, k, skip + 1, h)
        return skip

    def finish(self) -> None:
        """Settle the round still averaging, if any (the last round of a peer that leaves)."""
        if self.pending is not None:
            self._settle()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
