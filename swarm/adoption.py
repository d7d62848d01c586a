"""Which of the swarm's states a peer may adopt, so that one liar cannot replace the run's model.

Keys are free, so "most holders" alone proves little. A state another peer serves replaces our
θ_global only if it passes every check we can make without trusting anyone:

* **It fits.** Its record announces the size of this run's model; its manifest (checked before any
  byte is allocated, swarm.manifest) names this run and this many parameters. Holders that announce
  or serve something else are banned for the run.
* **Its holders are live.** Only peers with a current, heartbeating liveness record that others can
  dial count; among states that pass, the one held by the most of them is tried first.
* **It is plausible.** A peer that has averaged with the swarm knows its pace: its fastest round so
  far. A state can be at most one step per half of that round ahead of the last step we averaged,
  counted since then. A far-ahead step label (which would also jump the learning-rate schedule)
  is refused, however many keys serve it. A fresh joiner has no pace: the majority decides.
* **It is not worse.** Where the peer has a validation function, the state's loss on a batch drawn
  locally at random (a liar cannot fit it) must not exceed our own θ_global's by more than
  ``swarm.adopt_loss_margin`` (5%). A fresh joiner compares with its freshly initialised model: that
  cannot reject a zero θ (uniform logits score about as a fresh model does), so for it the
  majority decides. docs/architecture.md, "Adopting a state", says what remains possible.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

log = logging.getLogger("swarm")

MAX_CANDIDATES = 2  # states tried per resynchronisation (each the best of a fresh view) before keeping ours


@dataclass(frozen=True)
class Candidate:
    outer_step: int
    manifest: str  # sha256 of its manifest
    model_sha256: str
    holders: tuple[str, ...]  # distinct live, reachable peers that announce it


def held_state(record: dict) -> dict | None:
    """The state a liveness record announces (``held``), if it is well formed."""
    held = record.get("held")
    if not isinstance(held, dict):
        return None
    step, manifest, model, size = (held.get(k) for k in ("outer_step", "manifest", "model_sha256", "size"))
    if not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 1 << 40 and
            isinstance(manifest, str) and len(manifest) == 64 and isinstance(model, str) and len(model) == 64 and
            isinstance(size, int) and not isinstance(size, bool)):
        return None
    return held


class Pace:
    """When we last averaged with the swarm and how fast its rounds went: the bound on plausible steps."""

    def __init__(self):
        self.last_step: int | None = None  # outer step of our last average (or adoption)
        self.last_t: float | None = None  # time.monotonic() of it
        self.round_started: float | None = None  # when we began the round now in progress
        self.fastest_round_s: float | None = None

    def began(self, now: float | None = None) -> None:
        """We started training a round (after joining, or after an average)."""
        self.round_started = time.monotonic() if now is None else now

    def averaged(self, outer_step: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.round_started is not None:
            took = now - self.round_started
            self.fastest_round_s = took if self.fastest_round_s is None else min(self.fastest_round_s, took)
        self.last_step, self.last_t = outer_step, now

    def adopted(self, outer_step: int, now: float | None = None) -> None:
        """We took the swarm's state of ``outer_step``: the next bound counts from there."""
        if self.last_step is not None:  # a fresh joiner stays without history until it has averaged
            self.last_step, self.last_t = outer_step, time.monotonic() if now is None else now

    def allowed_step(self, now: float | None = None) -> int | None:
        """The highest outer step a state may plausibly have now; None without history (anything goes)."""
        if self.last_step is None or self.fastest_round_s is None:
            return None
        now = time.monotonic() if now is None else now
        return self.last_step + 1 + int((now - self.last_t) / max(self.fastest_round_s / 2, 1e-3))


class Adoption:
    """The adoption rules of one peer in one run: shared by matchmaking (is the swarm past this round?) on the
    network thread and resynchronisation on the training thread."""

    def __init__(self, run_id: str, numel: int, me: str):
        self.run_id, self.numel, self.me = run_id, numel, me
        self.state_bytes = 8 * numel  # θ_global and momentum, fp32
        self.pace = Pace()
        self._banned: dict[str, str] = {}  # peer id -> why its states are never considered again
        self._refused: set[str] = set()  # model hashes of states that failed the loss check
        self._lock = threading.Lock()

    def ban(self, peers, why: str) -> None:
        with self._lock:
            for peer in peers:
                if peer not in self._banned:
                    self._banned[peer] = why
                    log.warning("ignoring the states of %s for this run: %s", peer, why)

    def banned(self) -> set[str]:
        with self._lock:
            return set(self._banned)

    def refuse(self, candidate: Candidate, why: str) -> None:
        """Never try this state again (its holders may still serve better ones: an honest peer's early state
        can score worse than ours on one batch)."""
        with self._lock:
            self._refused.add(candidate.model_sha256)
        log.warning("not adopting outer step %d from %s: %s", candidate.outer_step,
                    ", ".join(h[-6:] for h in candidate.holders), why)

    def tries(self, read_live: Callable[[], dict[str, dict]], our_step: int, our_model: str) -> Iterator[Candidate]:
        """Up to MAX_CANDIDATES states to try in turn, each the best candidate of a view read just before it. When
        a state cannot be had because its holders moved on to a newer one meanwhile (rounds can be shorter than a
        download), the next try is the swarm's newer state, not the runner-up of the old view: that is often a
        state only one peer holds, a liar's."""
        tried: set[str] = set()
        for _ in range(MAX_CANDIDATES):
            fresh = [c for c in self.candidates(read_live(), our_step, our_model) if c.manifest not in tried]
            if not fresh:
                return
            tried.add(fresh[0].manifest)
            yield fresh[0]

    def candidates(self, live: dict[str, dict], our_step: int, our_model: str) -> list[Candidate]:
        """States that pass the record checks and are newer than ours, or of our step but another model held by
        more live peers than hold ours (we are on a fork: the majority's wins); most holders first, then the
        newest."""
        allowed, banned = self.pace.allowed_step(), self.banned()
        with self._lock:
            refused = set(self._refused)
        groups: dict[tuple[int, str, str], list[str]] = collections.defaultdict(list)
        for peer, record in live.items():
            held = held_state(record)
            if held is None or peer in banned or peer == self.me or record.get("reachable") is False:
                continue
            if held["size"] != self.state_bytes:
                self.ban([peer], f"it announces a state of {held['size']} bytes, this run's is {self.state_bytes}")
                continue
            if held["outer_step"] < our_step or allowed is not None and held["outer_step"] > allowed or \
                    held["model_sha256"] in refused:
                continue
            groups[(held["outer_step"], held["manifest"], held["model_sha256"])].append(peer)
        ours = 1 + sum(len(h) for (step, _, model), h in groups.items() if step == our_step and model == our_model)
        ranked = sorted(((key, holders) for key, holders in groups.items()
                         if key[0] > our_step or key[2] != our_model and len(holders) > ours),
                        key=lambda item: (-len(item[1]), -item[0][0]))
        return [Candidate(step, manifest, model, tuple(sorted(holders)))
                for (step, manifest, model), holders in ranked]

    def swarm_is_past(self, k: int, live: dict[str, dict], our_step: int, our_model: str) -> str | None:
        """Why round ``k`` is lost for us, or None. Either the swarm finished it without us (peers announcing
        plausible states of step k or later are at least as many as the live peers still at an earlier step,
        ourselves included), or we are on a fork: more live peers hold another model of our step than ours."""
        allowed, banned = self.pace.allowed_step(), self.banned()
        with self._lock:
            refused = set(self._refused)
        ahead, behind, same, others = 0, 1 if our_step < k else 0, 1, collections.Counter()
        for peer, record in live.items():
            held = held_state(record)
            if held is None or peer in banned or held["size"] != self.state_bytes or held["model_sha256"] in refused:
                continue
            step = held["outer_step"]
            if step >= k and (allowed is None or step <= allowed):
                ahead += 1
            elif step < k:
                behind += 1
            if step == our_step:
                if held["model_sha256"] == our_model:
                    same += 1
                else:
                    others[held["model_sha256"]] += 1
        if ahead > 0 and ahead >= behind:
            return f"{ahead} peers hold states of outer step {k} or later"
        if others and max(others.values()) > same:
            return f"{max(others.values())} peers hold another model of outer step {our_step} than ours ({same})"
        return None

    def acceptable(self, candidate_loss: float, our_loss: float, margin: float) -> bool:
        """The loss check: a finite loss at most ``margin`` worse than ours."""
        return candidate_loss == candidate_loss and candidate_loss <= our_loss * (1 + margin) + 1e-6
