"""``swarm.DiLoCo``: your model, your optimizer, your training loop, trained together with the swarm.

    with swarm.DiLoCo(model, inner_optimizer, run_id="my-run", initial_peers=[...], inner_steps=100) as dl:
        for batch in loader:
            loss = model(**batch).loss; loss.backward(); inner_optimizer.step(); inner_optimizer.zero_grad()
            dl.step(samples=len(batch["input_ids"]), loss=loss.item())

Each call to ``step`` counts one inner step; every H-th ends a round: the swarm averages the round's
pseudo-gradient Δ = θ_global − θ_local with the peers of that round and applies the outer Nesterov
step (DiLoCo, arXiv 2311.08105) to the model's parameters in place. Everything else a peer does
happens here too: find or start the run, join late and load the swarm's θ_global into the model,
publish and serve the state, checkpoints (with the optimizer's and scheduler's state), metrics,
the dashboard, and a clean farewell. ``python -m swarm.peer`` is a thin CLI over this class.

The model may live on any device and in any dtype; θ_global and the outer momentum stay in fp32 on
the CPU, where the outer step is computed bit-identically on every machine (swarm.diloco).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

from swarm import caps, checkpoint
from swarm.adoption import Adoption
from swarm.config import ConfigError, ModelConfig, RunConfig, load_profile
from swarm.dht import SwarmDHT, parse_maddrs
from swarm.diloco import OuterState
from swarm.holder import Holder
from swarm.membership import Membership, open_membership
from swarm.metrics import Metrics
from swarm.node import maddr_peer_ids
from swarm.rounds import Outcome, Rounds
from swarm.signature import check_model, global_parameters, stamp
from swarm.status import leaderboard
from swarm.validation import Validation

log = logging.getLogger("swarm")

MAX_NAME_CHARS = 64

INNER_EVENT_EVERY = 10  # inner steps between `inner` metrics events
THETA0_WAIT_S = 30.0  # how long a fresh joiner waits for a holder of θ_0 when its own model differs from it


class DiLoCo:
    """A peer of a swarm, wrapped around a user's model and inner optimizer (see the module docstring).

    ``config``: a RunConfig or a profile (path or built-in name) for a new run; when joining, the run's own
    config is used, and the settings passed here (``inner_steps``, ``outer_lr``, ...) must agree with it.
    ``scheduler``: a learning-rate scheduler of the global inner step (a LambdaLR, say), fast-forwarded when
    this peer joins late or adopts a newer state, and checkpointed. ``validation``: a
    ``swarm.Validation(batches, loss)`` to score states other peers serve (without it this peer adopts what
    the majority holds). ``data``: (name, sha256) of the data every peer of the run trains on; None, each
    peer brings its own. ``on_joined(dl)`` is called once this peer is in the run, before round 1 waits for
    ``swarm.min_peers``: the moment to tell others how to join (``dl.join_addresses()``)."""

    def __init__(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer, *, run_id: str | None = None,
                 initial_peers: list[str] | tuple[str, ...] = (), inner_steps: int | None = None,
                 outer_lr: float | None = None, outer_momentum: float | None = None, overlap: bool | None = None,
                 config: RunConfig | str | None = None, scheduler: Any = None, validation: Validation | None = None,
                 data: tuple[str, str] | None = None, tokenizer: tuple[str, bytes | None] | None = None,
                 host_maddrs: list[str] | tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",),
                 announce_maddrs: list[str] | tuple[str, ...] = (), identity: str | None = None,
                 checkpoint_dir: str | None = None, metrics_file: str | None = None, name: str | None = None,
                 dashboard_port: int | None = None, dashboard_host: str = "127.0.0.1",
                 max_outer_steps: int | None = None, reachable: str = "auto", membership: Membership | None = None,
                 on_joined: Callable[["DiLoCo"], None] | None = None):
        self.model, self.optimizer, self.scheduler = model, inner_optimizer, scheduler
        self.validation = validation
        if validation is not None and validation.model is None:
            validation.model = model
        self.data, self.tokenizer = data, tokenizer
        self.checkpoint_dir, self.metrics_file, self.name = checkpoint_dir, metrics_file, name
        self.dashboard_port, self.dashboard_host = dashboard_port, dashboard_host
        self.max_outer_steps, self.reachable, self.membership = max_outer_steps, reachable, membership
        self.on_joined = on_joined
        if max_outer_steps is not None and max_outer_steps < 1:
            raise ConfigError("max_outer_steps must be at least 1")
        if name is not None and not 0 < len(name) <= MAX_NAME_CHARS:
            raise ConfigError(f"name must be 1 to {MAX_NAME_CHARS} characters (it travels in every liveness record)")
        if reachable not in ("auto", "yes", "no"):
            raise ConfigError(f"reachable must be 'auto', 'yes' or 'no', not {reachable!r}")
        explicit = {"train.inner_steps": inner_steps, "train.outer_lr": outer_lr,
                    "train.outer_momentum": outer_momentum, "train.overlap": overlap}
        self._explicit = {k: v for k, v in explicit.items() if v is not None}
        self._config = config
        self._run_id = run_id
        self._connect = (list(initial_peers), list(host_maddrs), list(announce_maddrs), identity)
        self.started = False
        self.node = self.outer = self.rounds = self.holder = self.metrics = None
        self._dashboard = None
        self._last_step_t: float | None = None
        self._step_s: float | None = None  # seconds per inner step, a moving average (others estimate our pace)
        self.compute_s = 0.0
        self._tokens_per_s: float | None = None

    # --- the loop's side ----------------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        """The swarm's inner step (outer steps × H + steps into this round): drive learning-rate schedules with
        it, so that a peer that joined late follows the same schedule as everyone else."""
        return self.rounds.global_step

    @property
    def outer_step(self) -> int:
        """Outer steps applied to θ_global so far."""
        return self.outer.outer_step

    @property
    def done(self) -> bool:
        """``max_outer_steps`` rounds are trained (the last one may still be averaging)."""
        return self.max_outer_steps is not None and self.rounds.training_round > self.max_outer_steps

    def join_addresses(self) -> list[str]:
        """Multiaddrs others can pass as ``initial_peers`` to join this run: ours, routable ones first, or, when
        nobody can dial us (behind NAT), the entry points we joined through."""
        if not self.node.reachable and self.membership.initial_peers:
            return [str(m) for m in self.membership.initial_peers]
        maddrs = [str(m) for m in self.node.dht.get_visible_maddrs()]
        return sorted(maddrs, key=lambda m: ("/127.0.0.1/" in m or "/::1/" in m, m))

    @property
    def tokens_per_s(self) -> float:
        """Inner-loop throughput, a moving average over recent steps (from ``step``'s ``tokens``)."""
        return self._tokens_per_s or 0.0

    def model_sha256(self) -> str:
        return self.outer.model_sha256()

    def step(self, samples: int, loss: float | None = None, tokens: int | None = None) -> Outcome | None:
        """Count one inner step of ``samples`` sequences; at the end of a round average with the swarm and apply
        the outer step to the model. Returns the outcome of a round settled during this call, if any."""
        k, i = self.rounds.training_round, self.rounds.inner_in_round + 1
        if self._last_step_t is not None:
            took = time.monotonic() - self._last_step_t
            self.compute_s += took
            if tokens and took > 0:
                rate = tokens / took
                self._tokens_per_s = rate if self._tokens_per_s is None else 0.9 * self._tokens_per_s + 0.1 * rate
            if i > 1:  # the first step of a round may include the wait for its average
                self._step_s = took if self._step_s is None else 0.9 * self._step_s + 0.1 * took
        if loss is not None and (i % INNER_EVENT_EVERY == 0 or i == self.cfg.train.inner_steps):
            self.metrics.emit("inner", outer_step=k, inner_step=i, loss=round(float(loss), 4),
                              tokens_per_s=round(self._tokens_per_s or 0))
        self.node.update_status(samples=self.rounds.samples_total + samples, compute_s=round(self.compute_s, 1),
                                tokens_per_s=round(self._tokens_per_s or 0), inner=i,
                                step_s=round(self._step_s or 0.0, 4))
        outcome = self.rounds.inner_step_done(samples, loss)
        self._last_step_t = time.monotonic()
        return outcome

    # --- joining --------------------------------------------------------------------------------------

    def __enter__(self) -> "DiLoCo":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        reason = "max-outer-steps" if exc_type is None and self.done else \
            "interrupted" if exc_type is KeyboardInterrupt else "closed" if exc_type is None else "error"
        self.close(reason)
        return False

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close("error")
            raise

    def _local_config(self) -> RunConfig:
        if isinstance(self._config, RunConfig):
            cfg = self._config
        elif self._config is not None:
            cfg = load_profile(self._config)
        else:
            cfg = RunConfig(run_id=self._run_id or "swarm", profile="api", model=ModelConfig(family="custom"))
        sections = {"train": cfg.train, "swarm": cfg.swarm}
        for key, value in self._explicit.items():
            section, name = key.split(".")
            sections[section] = dataclasses.replace(sections[section], **{name: value})
        return dataclasses.replace(cfg, run_id=self._run_id or cfg.run_id, **sections)

    def _start(self) -> None:
        initial, host, announce, identity = self._connect
        local = self._local_config()
        if self.membership is None:
            self.membership = open_membership(parse_maddrs(initial, "initial_peers", need_peer_id=True),
                                              parse_maddrs(host, "host_maddrs"), parse_maddrs(announce, "announce_maddrs"),
                                              identity, self._run_id, local, check_profile=self._config is not None,
                                              explicit=self._explicit)
        m = self.membership
        node, cfg = m.node, m.cfg
        if m.is_new:
            cfg = dataclasses.replace(cfg, **stamp(cfg, self.model), **self._data_fields(),
                                      tokenizer_sha256=self.tokenizer[0] if self.tokenizer else cfg.tokenizer_sha256)
            node.call(SwarmDHT(node.dht, cfg.run_id, timeout_s=cfg.swarm.dht_timeout_s).publish_config(cfg))
        else:
            check_model(cfg, self.model)
            self._check_data(cfg)
        self.cfg = cfg
        params = [p for _, p in global_parameters(self.model)]
        self.outer = OuterState(params, cfg.train, pin_memory=any(p.is_cuda for p in params))
        self.adoption = Adoption(cfg.run_id, self.outer.numel, node.peer_id)
        name = self.name or node.peer_id[-6:]
        self.metrics = Metrics(self.metrics_file, node.peer_id, name)
        node.join_run(cfg.run_id, cfg.swarm, adoption=self.adoption, reachable=self.reachable,
                      ask=maddr_peer_ids(m.initial_peers))
        node.keep_config(cfg)
        node.update_status(name=name, round=1, training=1, state="joining", samples=0, compute_s=0.0,
                           verifiable=self.validation is not None and not cfg.private_data)
        self.node = node
        if self.tokenizer is not None:
            node.chunk_server.tokenizer = self.tokenizer[1]
        self.holder = Holder(cfg, node.hold, lambda: self.outer.generation, self.checkpoint_dir,
                             self.tokenizer[1] if self.tokenizer else None, on_saved=self._saved)
        self.rounds = Rounds(cfg, self.outer, node, self.adoption, self.metrics, name, self._hold,
                             self._reset_optimizer, self.validation, self._align_schedule)
        if self.dashboard_port is not None:
            from swarm.dashboard import start_dashboard

            self._dashboard = node.call(start_dashboard(self.dashboard_port, self.status, self.dashboard_host))
            wildcard = self.dashboard_host in ("0.0.0.0", "::")
            host = "127.0.0.1" if wildcard else f"[{self.dashboard_host}]" if ":" in self.dashboard_host else \
                self.dashboard_host
            log.info("dashboard at http://%s:%d/%s", host, self.dashboard_port,
                     " (listening on every interface)" if wildcard else "")
        wire = self.node.averager.codec.size(self.outer.numel)
        log.debug("%s", caps.describe(cfg.swarm, wire, 8 * self.outer.numel))
        source = self._initial_state()
        self.metrics.emit("joined", run_id=cfg.run_id, outer_step=self.outer.outer_step, source=source)
        log.info("%s %s run %r (%s profile, %.2fM parameters, H=%d) at outer step %d (from %s)", name,
                 "started" if m.is_new else "joined", cfg.run_id, cfg.profile, self.outer.numel / 1e6,
                 cfg.train.inner_steps, self.outer.outer_step, source)
        if self.on_joined is not None:
            self.on_joined(self)
        self._wait_for_min_peers()
        self.started = True
        self.adoption.pace.began()
        node.training(self.rounds.training_round)
        node.update_status(round=self.outer.outer_step + 1, training=self.rounds.training_round, state="training",
                           inner=self.rounds.inner_in_round)

    def _data_fields(self) -> dict:
        if self.data is None:
            return {"data_name": "each peer brings its own", "data_sha256": ""}
        return {"data_name": self.data[0], "data_sha256": self.data[1]}

    def _check_data(self, cfg: RunConfig) -> None:
        if cfg.private_data:
            return
        if self.data is None or self.data[1] != cfg.data_sha256:
            ours = f"{self.data[0]!r} ({self.data[1][:12]})" if self.data else "its own data"
            raise ConfigError(f"run {cfg.run_id!r} trains on {cfg.data_name!r} ({cfg.data_sha256[:12]}), this peer "
                              f"on {ours}: pass the same data (--data)")
        if self.tokenizer is not None and cfg.tokenizer_sha256 and self.tokenizer[0] != cfg.tokenizer_sha256:
            raise ConfigError(f"this peer's tokenizer ({self.tokenizer[0][:12]}) differs from run {cfg.run_id!r}'s "
                              f"({cfg.tokenizer_sha256[:12]}): pass the run's (--tokenizer)")

    def _initial_state(self) -> str:
        """Resume from our own checkpoint if it is current, else take what the swarm holds, else start at θ_0."""
        local = None
        if self.checkpoint_dir:
            loaded = checkpoint.load_latest(self.checkpoint_dir, self.cfg.run_id, self.outer.numel)
            if loaded is not None:
                self.outer.load(loaded.state)
                if loaded.inner is not None:
                    self._load_local_state(loaded.inner)
                local = (loaded.manifest, loaded.payload)
                log.info("loaded checkpoint of outer step %d from %s", loaded.manifest.outer_step, self.checkpoint_dir)
        at_theta0 = local is None and self.outer.model_sha256() == self.cfg.theta0_sha256
        deadline = time.monotonic() + (0 if at_theta0 or local is not None or self.membership.is_new else THETA0_WAIT_S)
        while True:
            if not self.membership.is_new and self.rounds.resync(local, any_step=not at_theta0 and local is None):
                return "peers"
            if local is not None:
                self._hold()
                return "checkpoint"
            if at_theta0 or self.membership.is_new:
                self._align_schedule()
                self._hold()
                return "new"
            if time.monotonic() > deadline:
                raise ConfigError(f"no live peer of run {self.cfg.run_id!r} serves its model, and this model's "
                                  f"parameters differ from the run's θ_0 ({self.cfg.theta0_sha256[:12]}): build it "
                                  f"as the run's first peer did (same seed), or join while a peer is training")
            time.sleep(self.cfg.swarm.heartbeat_s)

    def _wait_for_min_peers(self) -> None:
        """Round 1 waits until ``swarm.min_peers`` peers are live, or ``swarm.min_peers_timeout_s`` passed."""
        want = self.cfg.swarm.min_peers
        if want <= 1 or self.outer.outer_step > 0:
            return
        deadline = time.monotonic() + self.cfg.swarm.min_peers_timeout_s
        next_note = 0.0
        while time.monotonic() < deadline:
            live = len(self.node.live_peers(fresh=True)) + 1
            if live >= want:
                return
            if time.monotonic() >= next_note:
                next_note = time.monotonic() + 5
                log.info("waiting for %d more peer%s before round 1 (%d of %d live; at most %.0f s more)",
                         want - live, "s" * (want - live != 1), live, want, deadline - time.monotonic())
            time.sleep(self.cfg.swarm.heartbeat_s)
        log.info("starting round 1 with %d of %d peers: min_peers_timeout_s passed",
                 len(self.node.live_peers()) + 1, want)

    # --- what the swarm keeps of us -------------------------------------------------------------------

    def _hold(self) -> None:
        """Publish (and maybe save) the state after an outer step, in the background."""
        step = self.outer.outer_step
        self.node.mark_held(step, self.outer.model_sha256())
        save = bool(self.checkpoint_dir) and step > 0 and step % self.cfg.swarm.checkpoint_every == 0
        self.holder.submit(self.outer.state(), self._local_state() if save else None)

    def _local_state(self) -> dict:
        """This peer's own state, never shared: what a restart needs besides θ_global."""
        state = {"optimizer": _copy(self.optimizer.state_dict()), "error_feedback": self.rounds.feedback.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = _copy(self.scheduler.state_dict())
        return state

    def _load_local_state(self, state: dict) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and "scheduler" in state:
                self.scheduler.load_state_dict(state["scheduler"])
        except Exception as e:  # an optimizer of another shape: start it afresh, as DiLoCo's inner state is local
            log.warning("checkpoint's optimizer state does not fit this optimizer (%s): starting it afresh", e)
        if "error_feedback" in state:
            try:
                self.rounds.feedback.load_state_dict(state["error_feedback"])
            except ValueError as e:  # saved under another codec: what was not sent is lost, not wrong
                log.warning("checkpoint's error feedback does not fit (%s): starting it at zero", e)

    def _reset_optimizer(self) -> None:
        self.optimizer.state.clear()

    def _align_schedule(self) -> None:
        """Fast-forward the scheduler to the swarm's global step (after a late join or an adopted state)."""
        if self.scheduler is None:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
            self.scheduler.last_epoch = self.global_step - 1
            self.scheduler.step()

    def _saved(self, saved: checkpoint.Saved) -> None:
        self.metrics.emit("checkpoint", outer_step=saved.outer_step, path=saved.path, bytes=saved.bytes,
                          save_s=round(saved.save_s, 3))

    async def status(self) -> dict:
        """The dashboard's view: this peer's history of the run and every live peer's record (from the liveness
        view, so a poll never waits for the DHT)."""
        node, cfg = self.node, self.cfg
        peers = leaderboard({**node.liveness.peers, node.peer_id: node.liveness.record()})
        outer = self.metrics.snapshot("outer")
        bootstraps = self.metrics.snapshot("bootstrap")
        return {
            "run_id": cfg.run_id, "profile": cfg.profile, "outer_step": self.outer.outer_step,
            "inner_steps": cfg.train.inner_steps,
            "tokens_seen": sum(p["samples"] for p in peers) * cfg.model.seq_len,
            "self": {"peer_id": node.peer_id, "name": self.metrics.name},
            "peers": peers,
            "loss_history": [{"outer_step": e["outer_step"], "loss": e["loss"], "group_loss": e.get("group_loss"),
                              "t": e["t"]} for e in outer],
            "allreduce_history": [{k: e[k] for k in ("outer_step", "allreduce_s", "bytes_sent", "bytes_recv",
                                                     "group_size", "t")} for e in outer],
            "last_bootstrap": bootstraps[-1] if bootstraps else None,
        }

    # --- leaving ----------------------------------------------------------------------------------------

    def close(self, reason: str = "closed") -> None:
        """Leave the swarm: settle the last round (unless interrupted), publish and save the state, say goodbye."""
        try:
            if self.rounds is not None:
                if reason in ("closed", "max-outer-steps") and self.started:
                    self.rounds.finish()
                self.rounds.close()
            if self.node is not None and self.node.liveness is not None:
                self.node.update_status(round=self.outer.outer_step + 1, state="leaving")
            if self.holder is not None and not self.holder.close(timeout_s=60 if reason != "interrupted" else 5):
                log.warning("the last state was not saved in time")
            if self.metrics is not None and self.started:
                self.metrics.emit("left", reason=reason, outer_step=self.outer.outer_step)
        finally:
            if self._dashboard is not None:
                try:
                    self.node.call(self._dashboard.cleanup(), timeout_s=5)
                except Exception:
                    pass
            if self.metrics is not None:
                self.metrics.close()
            if self.membership is not None:
                self.membership.close()
            self.started = False


def _copy(state: dict) -> dict:
    """A deep copy of a state dict whose tensors are on the CPU (a checkpoint is written in the background)."""
    return copy.deepcopy({k: _to_cpu(v) for k, v in state.items()})


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
