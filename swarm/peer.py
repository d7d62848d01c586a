"""``python -m swarm.peer``: start or join a training run and train until told to stop.

Wiring and the outer loop only: the math is in swarm.diloco, the network in swarm.node.
Exit codes: 0 clean, 2 bad arguments or config, 3 no initial peer reachable, 1 anything
else, each with one clear line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
import logging
import os
import signal
import sys
import tempfile
import threading
import time

import torch

from swarm import data as swarm_data
from swarm.averaging import AveragingError, StaleRound
from swarm.config import ConfigError, RunConfig, load_profile
from swarm import checkpoint
from swarm.cli import run_command
from swarm.dht import SwarmDHT, find_run_config, parse_maddrs, start_dht
from swarm.diloco import DiLoCo, flatten
from swarm.holder import Holder
from swarm.identity import load_identity
from swarm.manifest import DownloadError
from swarm.metrics import Metrics, human_bytes
from swarm.model import build_model
from swarm.node import Node
from swarm.progress import Progress, log_handler
from swarm.status import leaderboard
from swarm.wire import WireError

log = logging.getLogger("swarm")

CONFIG_LOOKUP_S = 20.0  # how long a joiner keeps asking the DHT for the run config
INNER_EVENT_EVERY = 10  # inner steps between `inner` metrics events
PROGRESS_EVERY_S = 10.0  # seconds between inner-step log lines when no terminal shows a bar


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m swarm.peer", description=__doc__.splitlines()[0])
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR",
                   help="multiaddrs of any peers (or bootstrap nodes) of the swarm; none: start a new run")
    p.add_argument("--config", help="TOML profile (peers/tiny.toml): required to start a run, checked when joining")
    p.add_argument("--run-id", help="run to start or join (default: the profile's, or the only run in the DHT)")
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"], metavar="MADDR",
                   help="where to listen (default: all interfaces, a random TCP port)")
    p.add_argument("--announce-maddrs", nargs="+", default=[], metavar="MADDR",
                   help="public addresses other peers should dial (behind NAT or port forwarding)")
    p.add_argument("--identity", help="private key file: keeps the peer id across restarts (created if missing)")
    p.add_argument("--data", help="train on this text file or directory instead of the embedded corpus")
    p.add_argument("--checkpoint-dir", help="directory for checkpoints and cached token files")
    p.add_argument("--max-outer-steps", type=int, help="leave cleanly after this outer step")
    p.add_argument("--metrics-file", help="append JSON-lines events here")
    p.add_argument("--dashboard-port", type=int, help="serve the live dashboard (and /api/status) on this port")
    p.add_argument("--name", help="display name in logs and metrics (default: end of the peer id)")
    p.add_argument("-v", "--verbose", action="store_true", help="more log lines, tracebacks on errors")
    args = p.parse_args(argv)
    if args.max_outer_steps is not None and args.max_outer_steps < 1:
        p.error("--max-outer-steps must be at least 1")
    if args.dashboard_port is not None and not 0 < args.dashboard_port < 65536:
        p.error("--dashboard-port must be in 1..65535")
    return args


def check_paths(args: argparse.Namespace) -> None:
    """Refuse unusable paths before any daemon starts."""
    if args.config and not os.path.isfile(args.config):
        raise ConfigError(f"--config: no such file: {args.config}")
    if args.data and not os.path.exists(args.data):
        raise ConfigError(f"--data: no such file or directory: {args.data}")
    if args.checkpoint_dir:
        try:
            os.makedirs(args.checkpoint_dir, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=args.checkpoint_dir, prefix=".write-test-"):
                pass
        except OSError as e:
            raise ConfigError(f"--checkpoint-dir {args.checkpoint_dir} is not writable: {e.strerror}") from None
    if args.identity and not os.path.isdir(os.path.dirname(os.path.abspath(args.identity))):
        raise ConfigError(f"--identity: directory of {args.identity} does not exist")


class Peer:
    """One swarm member: resolves the run, builds model and data, then runs outer steps until told to stop."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.node: Node | None = None
        self.metrics: Metrics | None = None
        self._dashboard = None
        self.holder: Holder | None = None

    def run(self) -> int:
        args = self.args
        initial = parse_maddrs(args.initial_peers, "--initial-peers", need_peer_id=True)
        host = parse_maddrs(args.host_maddrs, "--host-maddrs")
        announce = parse_maddrs(args.announce_maddrs, "--announce-maddrs")
        check_paths(args)
        local = load_profile(args.config, args.run_id) if args.config else None
        corpus = swarm_data.load_text(None)
        text = swarm_data.load_text(args.data) if args.data else corpus
        identity = load_identity(args.identity)
        self.node = Node(start_dht(initial, host, announce, identity), identity)
        try:
            cfg, is_new = self._resolve_config(local)
            # The tokenizer comes from the embedded corpus on every peer, so ids agree even with --data.
            tokenizer = swarm_data.build_tokenizer(cfg.model.tokenizer, corpus)
            if is_new:
                cfg = dataclasses.replace(cfg, tokenizer_sha256=tokenizer.sha256)
                self.node.call(SwarmDHT(self.node.dht, cfg.run_id).publish_config(cfg))
            elif tokenizer.sha256 != cfg.tokenizer_sha256:
                raise ConfigError(f"this peer's {cfg.model.tokenizer} tokenizer ({tokenizer.sha256[:12]}) differs "
                                  f"from run {cfg.run_id!r}'s ({cfg.tokenizer_sha256[:12]}): upgrade swarm")
            self._train(cfg, tokenizer, text)
        finally:
            self._close()
        return 0

    def _resolve_config(self, local: RunConfig | None) -> tuple[RunConfig, bool]:
        """The run's config from the DHT when it is there (checked against --config), else --config's (new run)."""
        args, node = self.args, self.node
        # a joiner with nothing but --initial-peers may come up before the run's first peer has published
        wait_s = CONFIG_LOOKUP_S if args.initial_peers and local is None else 0
        remote = node.call(find_run_config(node.dht, args.run_id or (local.run_id if local else None), wait_s))
        if remote is not None:
            if local is not None:
                local.check_compatible(remote)
            return remote, False
        if local is None:
            raise ConfigError("no run found in the DHT: start one with --config peers/tiny.toml" if not args.run_id
                              else f"run {args.run_id!r} has no config in the DHT: start it with --config")
        return local, True

    def _train(self, cfg: RunConfig, tokenizer: swarm_data.Tokenizer, text: str) -> None:
        args, node = self.args, self.node
        self.cfg = cfg
        cache_dir = swarm_data.default_cache_dir()
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only home: cache in the temp dir instead
            cache_dir = os.path.join(tempfile.gettempdir(), "swarm-cache")
            os.makedirs(cache_dir, exist_ok=True)
        tokens, _ = swarm_data.split_tokens(swarm_data.prepare_tokens(text, tokenizer, cache_dir))
        name = args.name or node.peer_id[-6:]
        sampler = swarm_data.peer_sampler(tokens, node.peer_id, cfg.model.seq_len, cfg.train.batch_size,
                                          cfg.train.seed)
        self.diloco = diloco = DiLoCo(build_model(cfg.model, tokenizer.vocab_size, cfg.train.seed), cfg.train)
        self.metrics = metrics = Metrics(args.metrics_file, node.peer_id, name)
        node.status.update(name=name, round=1, training=1, state="joining", samples=0, compute_s=0.0)
        node.join_run(cfg.run_id, cfg.swarm)
        self.holder = Holder(cfg, node.publish, args.checkpoint_dir, on_saved=self._saved)
        if args.dashboard_port is not None:
            from swarm.dashboard import start_dashboard

            self._dashboard = node.call(start_dashboard(args.dashboard_port, self.status))
            log.info("dashboard at http://127.0.0.1:%d/", args.dashboard_port)

        source = self._initial_state()
        metrics.emit("joined", run_id=cfg.run_id, outer_step=diloco.outer_step, source=source)
        print_join_command(node, cfg.run_id)
        log.info("%s %s run %r (%s profile, %.2fM parameters, H=%d) at outer step %d (from %s)", name,
                 "started" if source == "new" else "joined", cfg.run_id, cfg.profile,
                 diloco.theta_global.numel() / 1e6, cfg.train.inner_steps, diloco.outer_step, source)

        self.sampler, self.name = sampler, name
        self._train_rounds()
        node.set_status(round=diloco.outer_step + 1, state="leaving")
        self.holder.close()  # the last state is published and saved before we go
        metrics.emit("left", reason="max-outer-steps", outer_step=diloco.outer_step)

    def _train_rounds(self) -> None:
        """Train round after round; each round's Δ is averaged on the network thread.

        Without overlap the next round starts once the average is applied. With ``train.overlap``
        it starts at once, and the average, when it arrives, is applied with a one-step delay: the
        outer step moves θ_global and the local progress made meanwhile is carried over onto it
        (Streaming DiLoCo, arXiv 2501.18512, with the whole model as one fragment).
        """
        cfg, node, diloco, max_steps = self.cfg, self.node, self.diloco, self.args.max_outer_steps
        self.samples_total, self.compute_total, self._resynced = 0, 0.0, False
        pending: _Pending | None = None
        losses: list[float] = []
        round_samples = 0  # samples in θ_local's progress since θ_global (several rounds after a failure)
        pool = ThreadPoolExecutor(1, thread_name_prefix="swarm-average")
        try:
            while max_steps is None or diloco.outer_step + (pending is not None) < max_steps:
                k_train = diloco.outer_step + 1 + (pending is not None)
                node.set_status(round=diloco.outer_step + 1, training=k_train, state="training",
                                samples=self.samples_total, compute_s=round(self.compute_total, 1))
                bar = Progress(f"{self.name} step {k_train}", cfg.train.inner_steps, unit="step",
                               every_s=PROGRESS_EVERY_S)
                for i in range(cfg.train.inner_steps):
                    losses.append(self._inner_step(k_train, i))
                    bar.update(i + 1, loss=f"{losses[-1]:.3f}", tok_s=round(self._tokens_per_s))
                    if pending is not None and pending.future.done():
                        round_samples += self._settle(pending)
                        pending = None
                bar.close()
                round_samples += cfg.train.inner_steps * cfg.train.batch_size
                self.samples_total += cfg.train.inner_steps * cfg.train.batch_size
                node.set_status(state="averaging", samples=self.samples_total, compute_s=round(self.compute_total, 1))
                if pending is not None:  # the previous round's average is still on the wire: wait for it
                    round_samples += self._settle(pending)
                    pending = None
                if self._resynced:  # θ_local was replaced by the swarm's model: this round's work is void
                    self._resynced, losses, round_samples = False, [], 0
                    continue
                snapshot = flatten(diloco.params) if cfg.train.overlap else None
                future = pool.submit(node.average, diloco.outer_step + 1, diloco.pseudo_gradient(), round_samples,
                                     diloco.model_sha256())
                pending = _Pending(diloco.outer_step + 1, future, snapshot, losses, round_samples)
                losses, round_samples = [], 0
                if not cfg.train.overlap:
                    round_samples += self._settle(pending)
                    pending, self._resynced = None, False  # the next round starts from whatever θ we now hold
            if pending is not None:
                self._settle(pending)
        finally:  # on Ctrl-C do not wait for a round in flight: closing the node cancels it
            pool.shutdown(wait=False, cancel_futures=True)

    def _inner_step(self, k: int, i: int) -> float:
        t0 = time.monotonic()
        x, y = self.sampler.next_batch()
        loss = self.diloco.inner_step(x, y, i)
        elapsed = time.monotonic() - t0
        self.compute_total += elapsed
        self._tokens_per_s = 0.9 * getattr(self, "_tokens_per_s", x.numel() / elapsed) + 0.1 * x.numel() / elapsed
        self.node.status["tokens_per_s"] = round(self._tokens_per_s)
        if (i + 1) % INNER_EVENT_EVERY == 0 or i + 1 == self.cfg.train.inner_steps:
            self.metrics.emit("inner", outer_step=k, inner_step=i + 1, loss=round(loss, 4),
                              tokens_per_s=round(self._tokens_per_s))
        return loss

    def _settle(self, pending: "_Pending") -> int:
        """Wait for a round's average and apply it. Returns the samples still to be averaged: the round's own
        when its average failed and nothing was applied (θ_global stays, local progress is kept), else 0."""
        diloco = self.diloco
        t0 = time.monotonic()
        try:
            result = pending.future.result()
        except StaleRound as e:
            log.info("%s %s: fetching the swarm's model", self.name, e)
            self._resynced = self._sync_from_swarm() or self._resynced
            return 0
        except AveragingError as e:
            log.warning("%s outer step %d not averaged: %s", self.name, pending.outer_step, e)
            return pending.samples
        wait_s = time.monotonic() - t0
        diloco.apply_outer(result.average, carry_from=pending.snapshot)
        self._hold_current_state()
        model_hash = diloco.model_sha256()
        mean_loss = sum(pending.losses) / max(len(pending.losses), 1)
        self.metrics.emit(
            "outer", outer_step=pending.outer_step, group_size=len(result.group.members),
            group=list(result.group.members), weights=list(result.group.weights), loss=round(mean_loss, 4),
            bytes_sent=result.bytes_sent, bytes_recv=result.bytes_recv, allreduce_s=round(result.allreduce_s, 3),
            matchmaking_s=round(result.matchmaking_s, 3), wait_s=round(wait_s, 3), model_sha256=model_hash,
            average_sha256=result.average_sha256, attempts=result.attempts, refused=result.refused,
            clipped=result.clipped)
        log.info("%s outer step %d: group %d, loss %.3f, all-reduce %.2f s, waited %.2f s, sent %s, model %s",
                 self.name, pending.outer_step, len(result.group.members), mean_loss, result.allreduce_s, wait_s,
                 human_bytes(result.bytes_sent), model_hash[:12])
        self.node.set_status(round=diloco.outer_step + 1)
        return 0

    def _initial_state(self) -> str:
        """Resume from our own checkpoint if it is current, else fetch what we lack from the swarm."""
        local = None
        if self.args.checkpoint_dir:
            loaded = checkpoint.load_latest(self.args.checkpoint_dir, self.cfg.run_id,
                                            self.diloco.theta_global.numel())
            if loaded is not None:
                self.diloco.load_state(loaded.state)
                if loaded.inner is not None:
                    self.diloco.load_inner_state(loaded.inner)
                local = (loaded.manifest, loaded.payload)
                log.info("loaded checkpoint of outer step %d from %s", loaded.manifest.outer_step,
                         self.args.checkpoint_dir)
        if self._sync_from_swarm(local):
            return "peers"
        if local is not None:
            self._hold_current_state()
            return "checkpoint"
        return "new"

    def _sync_from_swarm(self, local=None) -> bool:
        """Replace θ_global with the swarm's newest verified one, if it is ahead of ours."""
        try:
            got = self.node.fetch_state_from_swarm(self.diloco.outer_step, local)
        except (DownloadError, WireError) as e:
            log.warning("could not fetch the swarm's model: %s", e)
            return False
        if got is None:
            return False
        manifest, state, stats = got
        self.diloco.load_state(state)
        self._hold_current_state()
        self.metrics.emit("bootstrap", outer_step=manifest.outer_step, bytes=stats.bytes, sources=stats.sources,
                          seconds=round(stats.seconds, 3), verified=True, reused_chunks=stats.reused_chunks,
                          banned=list(stats.banned), model_sha256=manifest.model_sha256)
        log.info("downloaded outer step %d (%s from %d peers, %d chunks reused, verified) in %.1f s",
                 manifest.outer_step, human_bytes(stats.bytes), stats.sources, stats.reused_chunks, stats.seconds)
        return True

    def _hold_current_state(self) -> None:
        """Publish (and maybe save) the state after an outer step, in the background."""
        step = self.diloco.outer_step
        save_now = bool(self.args.checkpoint_dir) and step % self.cfg.swarm.checkpoint_every == 0
        self.holder.submit(self.diloco.state(), self.diloco.inner_state() if save_now else None)

    def _saved(self, saved: checkpoint.Saved) -> None:
        self.metrics.emit("checkpoint", outer_step=saved.outer_step, path=saved.path, bytes=saved.bytes,
                          save_s=round(saved.save_s, 3))

    async def status(self) -> dict:
        """The dashboard's view: this peer's history of the run and every live peer's DHT record."""
        peers = leaderboard(await self.node.sdht.live_peers())
        bootstraps = self.metrics.recent["bootstrap"]
        return {
            "run_id": self.cfg.run_id, "profile": self.cfg.profile, "outer_step": self.diloco.outer_step,
            "inner_steps": self.cfg.train.inner_steps,
            "tokens_seen": sum(p["samples"] for p in peers) * self.cfg.model.seq_len,
            "self": {"peer_id": self.node.peer_id, "name": self.metrics.name},
            "peers": peers,
            "loss_history": [{"outer_step": e["outer_step"], "loss": e["loss"], "t": e["t"]}
                             for e in self.metrics.recent["outer"]],
            "allreduce_history": [{k: e[k] for k in ("outer_step", "allreduce_s", "bytes_sent", "bytes_recv",
                                                     "group_size", "t")} for e in self.metrics.recent["outer"]],
            "last_bootstrap": bootstraps[-1] if bootstraps else None,
        }

    def _close(self) -> None:
        if self.holder is not None:
            self.holder.close(timeout_s=5)
        if self._dashboard is not None:
            try:
                self.node.call(self._dashboard.cleanup(), timeout_s=5)
            except Exception:
                pass
        if self.metrics is not None:
            self.metrics.close()
        if self.node is not None:
            self.node.close()


@dataclass
class _Pending:
    """A round whose Δ is being averaged on the network thread."""

    outer_step: int
    future: Future
    snapshot: torch.Tensor | None  # θ_local when Δ was taken (overlap: progress since is carried over)
    losses: list[float]
    samples: int


def print_join_command(node: Node, run_id: str) -> None:
    maddrs = [str(m) for m in node.dht.get_visible_maddrs()]
    maddrs.sort(key=lambda m: ("/127.0.0.1/" in m or "/::1/" in m, m))  # reachable addresses first
    if maddrs:
        print(f"To join run {run_id!r} from another machine or terminal:\n"
              f"  python -m swarm.peer --initial-peers {maddrs[0]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = log_handler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    for noisy in ("hivemind", "asyncio", "multiaddr"):
        logging.getLogger(noisy).setLevel(logging.WARNING if args.verbose else logging.CRITICAL)
    main_pid = os.getpid()

    def interrupt(signum, _frame):
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        # A forked helper (hivemind's DHT process) inherited this handler: Ctrl-C is ours to handle,
        # and SIGTERM (from our shutdown, or a process-group kill) ends it as if we had never set one.
        if signum == signal.SIGTERM:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    threading.excepthook = lambda hook: _background_failed(getattr(hook.thread, "name", "?"), hook.exc_type,
                                                           hook.exc_value)
    # multiprocessing's helper threads (its fd sharer) report through sys.excepthook instead
    sys.excepthook = lambda exc_type, exc_value, _tb: _background_failed("helper", exc_type, exc_value)
    return run_command(Peer(args).run, interrupted_code=0, interrupted_message="interrupted: left the swarm")


def _background_failed(where: str, exc_type: type, exc_value: BaseException) -> None:
    """One line instead of a traceback when a background thread dies; a helper process that went away first
    (a process-group kill, a shutdown) is routine and only logged with -v."""
    routine = issubclass(exc_type, (ConnectionError, EOFError))
    log.log(logging.DEBUG if routine else logging.WARNING, "background thread %s stopped: %s: %s",
            where, exc_type.__name__, exc_value)


if __name__ == "__main__":
    sys.exit(main())
