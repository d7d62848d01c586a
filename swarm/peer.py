"""``python -m swarm.peer``: start or join a training run and train until told to stop.

A thin CLI over the Python API (swarm.api.DiLoCo): it parses flags, builds the run's model, data and
inner optimizer from the run config, and runs the inner loop. Exit codes: 0 clean, 2 bad arguments or
config, 3 no initial peer reachable, 1 anything else, each with one clear line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading

import numpy as np
import torch

from swarm import data as swarm_data
from swarm.api import DiLoCo
from swarm.architectures import build_model, causal_lm_loss, parameter_count
from swarm.cli import run_command
from swarm.config import ConfigError, RunConfig, load_profile
from swarm.device import resolve_device
from swarm.dht import parse_maddrs
from swarm.inner import inner_step, make_optimizer, make_scheduler
from swarm.membership import open_membership
from swarm.memory import check_fits
from swarm.progress import Progress, log_handler
from swarm.validation import Validation

log = logging.getLogger("swarm")

PROGRESS_EVERY_S = 10.0  # seconds between inner-step log lines when no terminal shows a bar
VALIDATION_BATCHES = 2  # batches of the loss check that decides whether to adopt another peer's state


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m swarm.peer", description=__doc__.splitlines()[0])
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR",
                   help="multiaddrs of any peers (or bootstrap nodes) of the swarm; none: start a new run")
    p.add_argument("--config", help="profile: a built-in name (tiny, small, llama-tiny, llama-20m) or a TOML file; "
                                    "required to start a run, checked when joining")
    p.add_argument("--run-id", help="run to start or join (default: the profile's, or the only live run in the DHT)")
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"], metavar="MADDR",
                   help="where to listen (default: all interfaces, a random TCP port; fix the port, e.g. "
                        "/ip4/0.0.0.0/tcp/31338, to keep the same multiaddr across restarts)")
    p.add_argument("--announce-maddrs", nargs="+", default=[], metavar="MADDR",
                   help="public addresses other peers should dial (behind NAT or port forwarding)")
    p.add_argument("--reachable", choices=("auto", "yes", "no"), default="auto",
                   help="can other peers dial this one? auto: ask a peer to dial back (default)")
    p.add_argument("--identity", help="private key file: keeps the peer id across restarts (created if missing)")
    p.add_argument("--data", help="train on this text file or directory, JSON Lines or Parquet file, instead of the "
                                  "embedded corpus")
    p.add_argument("--text-column", default="text", help="the column of --data's JSON Lines or Parquet records")
    p.add_argument("--private-data", action="store_true",
                   help="starting a run: each peer brings its own data (joiners need not pass the same --data)")
    p.add_argument("--tokenizer", metavar="FILE", help="a tokenizer.json, for profiles whose tokenizer is 'file'")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--checkpoint-dir", help="directory for this peer's checkpoints (token files are cached in "
                                            "~/.cache/swarm)")
    p.add_argument("--max-outer-steps", type=int, help="leave cleanly after this outer step")
    p.add_argument("--metrics-file", help="append JSON-lines events here")
    p.add_argument("--dashboard-port", type=int, help="serve the live dashboard (and /api/status) on this port")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="address the dashboard listens on (default 127.0.0.1; 0.0.0.0 for every interface)")
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
    if args.data and not os.path.exists(args.data):
        raise ConfigError(f"--data: no such file or directory: {args.data}")
    if args.tokenizer and not os.path.isfile(args.tokenizer):
        raise ConfigError(f"--tokenizer: no such file: {args.tokenizer}")
    if args.checkpoint_dir:
        try:
            os.makedirs(args.checkpoint_dir, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=args.checkpoint_dir, prefix=".write-test-"):
                pass
        except OSError as e:
            raise ConfigError(f"--checkpoint-dir {args.checkpoint_dir} is not writable: {e.strerror}") from None
    if args.identity and not os.path.isdir(os.path.dirname(os.path.abspath(args.identity))):
        raise ConfigError(f"--identity: directory of {args.identity} does not exist")


def cache_dir() -> str:
    path = swarm_data.default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
    except OSError:  # a read-only home: cache in the temp dir instead
        fallback = os.path.join(tempfile.gettempdir(), "swarm-cache")
        os.makedirs(fallback, exist_ok=True)
        return fallback


def check_memory(cfg: RunConfig, vocab_size: int, device: torch.device) -> None:
    gpu = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    check_fits(cfg, parameter_count(cfg.model, vocab_size), vocab_size, device.type == "cuda", gpu)


def run(args: argparse.Namespace) -> int:
    initial = parse_maddrs(args.initial_peers, "--initial-peers", need_peer_id=True)
    host = parse_maddrs(args.host_maddrs, "--host-maddrs")
    announce = parse_maddrs(args.announce_maddrs, "--announce-maddrs")
    check_paths(args)
    device = resolve_device(args.device)
    local = load_profile(args.config, args.run_id) if args.config else None
    corpus = swarm_data.load_corpus(args.data, args.text_column)
    tokenizer = None
    if local is not None:  # everything is known before any network starts: refuse what cannot fit
        tokenizer = build_tokenizer(local, corpus, args.tokenizer)
        check_memory(local, tokenizer.vocab_size, device)
    membership = open_membership(initial, host, announce, args.identity, args.run_id, local)
    try:
        cfg = membership.cfg
        if tokenizer is None:
            tokenizer = build_tokenizer(cfg, corpus, args.tokenizer)
            check_memory(cfg, tokenizer.vocab_size, device)
        tokens, _ = swarm_data.split_tokens(swarm_data.prepare_tokens(corpus, tokenizer, cache_dir()))
        model = build_model(cfg.model, tokenizer.vocab_size, cfg.train.seed).to(device)
        optimizer = make_optimizer(model, cfg.train)
        scheduler = make_scheduler(optimizer, cfg.train)
        private = args.private_data if membership.is_new else cfg.private_data
        if private and cfg.model.tokenizer == "bpe4k":
            raise ConfigError("--private-data: bpe4k is trained on the run's data, which each peer then has its own "
                              "of; use the byte tokenizer or a tokenizer.json (tokenizer = 'file')")
        peer_id = membership.node.peer_id
        sampler = swarm_data.peer_sampler(tokens, peer_id, cfg.model.seq_len, cfg.train.batch_size, cfg.train.seed)
        validation = Validation(random_batches(tokens, cfg),
                                lambda m, b: float(causal_lm_loss(m, b[0].to(device), b[1].to(device))))
        dl = DiLoCo(model, optimizer, config=cfg, scheduler=scheduler, membership=membership, validation=validation,
                    data=None if private else (corpus.name, corpus.sha256), tokenizer=(tokenizer.sha256,
                                                                                         tokenizer.to_json()),
                    checkpoint_dir=args.checkpoint_dir, metrics_file=args.metrics_file, name=args.name,
                    dashboard_port=args.dashboard_port, dashboard_host=args.dashboard_host,
                    max_outer_steps=args.max_outer_steps, reachable=args.reachable,
                    on_joined=lambda dl: print_join_command(dl, args))
    except BaseException:
        membership.close()
        raise
    with dl:
        train(dl, model, optimizer, scheduler, sampler, cfg)
    return 0


def build_tokenizer(cfg: RunConfig, corpus: swarm_data.Corpus, tokenizer_file: str | None) -> swarm_data.Tokenizer:
    if cfg.model.tokenizer == "file" and not tokenizer_file:
        raise ConfigError(f"run {cfg.run_id!r} uses a tokenizer.json: pass it with --tokenizer")
    return swarm_data.build_tokenizer(cfg.model.tokenizer, corpus,
                                      tokenizer_file if cfg.model.tokenizer == "file" else None)


def random_batches(tokens: np.ndarray, cfg: RunConfig):
    """Batches for the adoption loss check: windows at random offsets from a secret seed, so that no peer
    can predict them and fit a state to them."""
    seq, batch = cfg.model.seq_len, cfg.train.batch_size * VALIDATION_BATCHES

    def draw():
        sampler = swarm_data.BatchSampler(tokens, seq, batch, seed=secrets.randbits(63))
        return sampler.next_batch()

    return draw


def train(dl: DiLoCo, model, optimizer, scheduler, sampler, cfg: RunConfig) -> None:
    """The inner loop: one AdamW step per batch, a progress bar per round, until ``--max-outer-steps``."""
    H, batch = cfg.train.inner_steps, cfg.train.batch_size
    bar, bar_round = None, None
    try:
        while not dl.done:
            k = dl.rounds.training_round
            if bar_round != k:
                if bar is not None:
                    bar.close()
                bar, bar_round = Progress(f"{dl.metrics.name} step {k}", H, unit="step", every_s=PROGRESS_EVERY_S), k
            x, y = sampler.next_batch()
            loss = inner_step(model, optimizer, x, y, cfg.train)
            scheduler.step()
            bar.update(dl.rounds.inner_in_round + 1, loss=f"{loss:.3f}", tok_s=round(dl.tokens_per_s))
            dl.step(samples=batch, loss=loss, tokens=x.numel())
    finally:
        if bar is not None:
            bar.close()


def print_join_command(dl: DiLoCo, args: argparse.Namespace) -> None:
    """What another terminal or machine runs to join: a command that works there as printed."""
    maddrs = dl.join_addresses()
    if not maddrs:
        return
    exe = shutil.which("swarm-peer")
    command = "swarm-peer" if exe and os.path.dirname(exe) == os.path.dirname(sys.executable) else \
        f"{sys.executable} -m swarm.peer"
    extra = ""
    if not dl.cfg.private_data and args.data:
        extra += f" --data {args.data}"
    if dl.cfg.model.tokenizer == "file" and args.tokenizer:
        extra += f" --tokenizer {args.tokenizer}"
    print(f"To join run {dl.cfg.run_id!r} from another machine or terminal:\n"
          f"  {command} --initial-peers {maddrs[0]}{extra}", flush=True)


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
    return run_command(lambda: run(args), interrupted_code=0, interrupted_message="interrupted: left the swarm")


def _background_failed(where: str, exc_type: type, exc_value: BaseException) -> None:
    """One line instead of a traceback when a background thread dies; a helper process that went away first
    (a process-group kill, a shutdown) is routine and only logged with -v."""
    routine = issubclass(exc_type, (ConnectionError, EOFError))
    log.log(logging.DEBUG if routine else logging.WARNING, "background thread %s stopped: %s: %s",
            where, exc_type.__name__, exc_value)


if __name__ == "__main__":
    sys.exit(main())
