"""``python -m swarm.generate``: sample text from a verified model, from a checkpoint or from the swarm.

``--checkpoint DIR`` reads the newest checkpoint that verifies (chunk hashes and model hash)
under DIR, or the one step directory DIR names; ``--initial-peers`` downloads the newest
verified θ_global the swarm holds, without joining training. Any family swarm builds works
(swarm.architectures samples from all of them); the tokenizer is the run's own tokenizer.json,
which comes with the model, so text decodes as the run encoded it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from swarm import checkpoint
from swarm import data as swarm_data
from swarm.architectures import sample
from swarm.cli import run_command
from swarm.config import ConfigError, RunConfig
from swarm.dht import find_run_config, parse_maddrs, start_dht
from swarm.evaluate import model_at
from swarm import caps
from swarm.adoption import Adoption
from swarm.manifest import MAX_TOKENIZER_BYTES, DownloadError, fetch_tokenizer
from swarm.node import Node

CONFIG_LOOKUP_S = 10.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m swarm.generate", description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="DIR", help="a --checkpoint-dir, or one step-* directory in it")
    source.add_argument("--initial-peers", nargs="+", metavar="MADDR", help="fetch the newest model from the swarm")
    p.add_argument("--run-id", help="with --initial-peers: which run (default: the only one)")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--tokens", type=int, default=200, help="how many tokens to sample")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tokens < 1 or args.temperature <= 0 or args.top_k < 0:
        p.error("--tokens must be >= 1, --temperature > 0, --top-k >= 0")
    return args


def from_checkpoint(path: str | Path) -> tuple[RunConfig, dict, bytes | None]:
    """(run config, state, the run's tokenizer.json or None for byte) of the newest checkpoint under ``path``
    that verifies, or of the one step directory ``path`` names; CheckpointError (one line) otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise checkpoint.CheckpointError(f"{path}: no such directory")
    if checkpoint.step_dirs(path):
        loaded = checkpoint.load_latest(path)
        if loaded is None:
            raise checkpoint.CheckpointError(f"{path}: no checkpoint that verifies (see the warnings above)")
    elif any(path.iterdir()):
        loaded = checkpoint.load(path)  # one step directory: its errors name the file at fault
    else:
        raise checkpoint.CheckpointError(f"{path}: empty, no checkpoint in it")
    if loaded.config is None:
        raise checkpoint.CheckpointError(f"{path}: checkpoint has no run config (saved by an older swarm)")
    return loaded.config, loaded.state, loaded.tokenizer


def run_tokenizer(cfg: RunConfig, tokenizer_json: bytes | None) -> swarm_data.Tokenizer:
    """The run's tokenizer from its tokenizer.json (None: byte), checked against the hash the run published."""
    if tokenizer_json is None and cfg.model.tokenizer != "byte":
        raise checkpoint.CheckpointError(f"run {cfg.run_id!r} has a {cfg.model.tokenizer} tokenizer, and no "
                                         f"tokenizer.json came with its model")
    tokenizer = swarm_data.tokenizer_from_json(tokenizer_json)
    if cfg.tokenizer_sha256 and tokenizer.sha256 != cfg.tokenizer_sha256:
        raise ConfigError(f"the tokenizer.json that came with run {cfg.run_id!r}'s model is not the run's "
                          f"({tokenizer.sha256[:12]} vs {cfg.tokenizer_sha256[:12]})")
    return tokenizer


def from_swarm(initial_peers: list[str], run_id: str | None) -> tuple[RunConfig, dict, bytes | None]:
    """(run config, state, tokenizer.json or None) of the state most live peers of the run hold, verified."""
    node = Node(start_dht(parse_maddrs(initial_peers, "--initial-peers", need_peer_id=True),
                          parse_maddrs(["/ip4/0.0.0.0/tcp/0"], "--host-maddrs"), []))
    try:
        cfg = node.call(find_run_config(node.dht, run_id, CONFIG_LOOKUP_S), timeout_s=CONFIG_LOOKUP_S + 60)
        if cfg is None:
            raise ConfigError("no run found in the DHT")
        node.join_run(cfg.run_id, cfg.swarm, serve=False)
        adoption = Adoption(cfg.run_id, cfg.model_numel, node.peer_id)
        for candidate in adoption.tries(lambda: node.live_peers(fresh=True), -1, ""):
            try:
                _, state, _ = node.download(candidate, cfg.run_id, cfg.model_numel)
                tokenizer = None if cfg.model.tokenizer == "byte" else node.call(fetch_tokenizer(
                    node.p2p, list(candidate.holders), cfg.tokenizer_sha256, cfg.swarm.allreduce_timeout_s,
                    node.sdht.addresses), timeout_s=caps.download_s(cfg.swarm, MAX_TOKENIZER_BYTES))
                return cfg, state, tokenizer
            except DownloadError as e:
                logging.getLogger("swarm").warning("outer step %d not fetched: %s", candidate.outer_step, e)
        raise DownloadError(f"no live peer of run {cfg.run_id!r} serves a model that verifies")
    finally:
        node.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for noisy in ("hivemind", "asyncio", "multiaddr"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    return run_command(lambda: generate(args))


def generate(args: argparse.Namespace) -> int:
    cfg, state, tokenizer_json = from_checkpoint(args.checkpoint) if args.checkpoint else \
        from_swarm(args.initial_peers, args.run_id)
    tokenizer = run_tokenizer(cfg, tokenizer_json)
    model = model_at(cfg, tokenizer.vocab_size, state["theta_global"])
    prompt = torch.from_numpy(tokenizer.encode(args.prompt).astype("int64"))[None, :] if args.prompt else \
        torch.zeros(1, 1, dtype=torch.int64)
    new_ids = sample(model, prompt, args.tokens, args.temperature, args.top_k or None,
                     torch.Generator().manual_seed(args.seed), context=cfg.model.seq_len)
    print(args.prompt + tokenizer.decode(new_ids[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
