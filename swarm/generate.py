"""``python -m swarm.generate``: sample text from a verified model, from a checkpoint or from the swarm.

``--checkpoint DIR`` reads the newest checkpoint that verifies (chunk hashes and model hash)
under DIR, or the one step directory DIR names; ``--initial-peers`` downloads the newest
verified θ_global the swarm holds, without joining training.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from swarm import checkpoint
from swarm import data as swarm_data
from swarm.cli import run_command
from swarm.config import ConfigError, RunConfig
from swarm.dht import find_run_config, parse_maddrs, start_dht
from swarm.diloco import DiLoCo
from swarm.manifest import DownloadError
from swarm.model import build_model
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


def from_checkpoint(path: str) -> tuple[RunConfig, dict]:
    loaded = checkpoint.load(path) if checkpoint.step_dirs(path) == [] else checkpoint.load_latest(path)
    if loaded is None:
        raise checkpoint.CheckpointError(f"{path}: no checkpoint that verifies (see the warnings above)")
    if loaded.config is None:
        raise checkpoint.CheckpointError(f"{path}: checkpoint has no run config (saved by an older swarm)")
    return loaded.config, loaded.state


def from_swarm(initial_peers: list[str], run_id: str | None) -> tuple[RunConfig, dict]:
    node = Node(start_dht(parse_maddrs(initial_peers, "--initial-peers", need_peer_id=True),
                          parse_maddrs(["/ip4/0.0.0.0/tcp/0"], "--host-maddrs"), []))
    try:
        cfg = node.call(find_run_config(node.dht, run_id, CONFIG_LOOKUP_S))
        if cfg is None:
            raise ConfigError("no run found in the DHT")
        node.join_run(cfg.run_id, cfg.swarm, serve=False)
        got = node.fetch_state_from_swarm(newer_than=-1)
        if got is None:
            raise DownloadError(f"no peer of run {cfg.run_id!r} holds a model yet")
        return cfg, got[1]
    finally:
        node.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for noisy in ("hivemind", "asyncio", "multiaddr"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    return run_command(lambda: generate(args))


def generate(args: argparse.Namespace) -> int:
    cfg, state = from_checkpoint(args.checkpoint) if args.checkpoint else from_swarm(args.initial_peers,
                                                                                      args.run_id)
    tokenizer = swarm_data.build_tokenizer(cfg.model.tokenizer, swarm_data.load_text(None))
    if cfg.tokenizer_sha256 and tokenizer.sha256 != cfg.tokenizer_sha256:
        raise ConfigError(f"the run's {cfg.model.tokenizer} tokenizer differs from this swarm version's")
    diloco = DiLoCo(build_model(cfg.model, tokenizer.vocab_size, cfg.train.seed), cfg.train)
    diloco.load_state(state)
    model = diloco.model.eval()
    prompt = torch.from_numpy(tokenizer.encode(args.prompt).astype("int64"))[None, :] if args.prompt else \
        torch.zeros(1, 1, dtype=torch.int64)
    out = model.generate(prompt, args.tokens, args.temperature, args.top_k or None,
                         torch.Generator().manual_seed(args.seed))
    print(args.prompt + tokenizer.decode(out[0, prompt.shape[1]:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
