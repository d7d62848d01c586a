"""Helpers shared by test modules: processes run as users run them, real nodes on loopback, run configs as a
run's first peer stamps them, models trained a few steps, and checkpoints written exactly as a peer writes them."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from swarm import checkpoint
from swarm import data as swarm_data
from swarm.adoption import Adoption
from swarm.architectures import build_model, causal_lm_loss
from swarm.config import RunConfig, SwarmConfig, load_profile
from swarm.dht import parse_maddrs, start_dht
from swarm.identity import load_identity
from swarm.launch import JOIN_LINE
from swarm.manifest import pack_state
from swarm.metrics import read_events
from swarm.node import Node
from swarm.signature import global_parameters, model_sha256, stamp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]


# The "hf" family's example: a 2-layer GPT-2 config.json as the Hub would give it, with its own vocabulary (the
# run's tokenizer replaces it) and a bf16 dtype (swarm builds fp32 whatever the file says).
GPT2_JSON = json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64,
                        "vocab_size": 50257, "dtype": "bfloat16"}, sort_keys=True, separators=(",", ":"))


def run_config(profile: str, vocab_size: int, tokenizer_sha256: str = swarm_data.BYTE_SHA256,
               **model_fields) -> RunConfig:
    """A built-in profile (its [model] section changed by ``model_fields``) with the fields a run's first peer
    derives: the tokenizer's hash and θ_0's signature and hash."""
    cfg = load_profile(profile)
    if model_fields:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_fields))
    theta0 = build_model(cfg.model, vocab_size, cfg.train.seed)
    return dataclasses.replace(cfg, tokenizer_sha256=tokenizer_sha256, **stamp(cfg, theta0))


def corpus_text() -> str:
    """The embedded corpus, whole."""
    return "".join(swarm_data.load_corpus(None).chunks())


def corpus_sampler(seq_len: int, batch_size: int, seed: int = 0) -> swarm_data.BatchSampler:
    """Windows of the embedded corpus as byte ids."""
    tokens = swarm_data.tokenizer_from_json(None).encode(corpus_text())
    return swarm_data.BatchSampler(tokens, seq_len, batch_size, seed)


def train(model: nn.Module, sampler: swarm_data.BatchSampler, steps: int, lr: float = 3e-3) -> nn.Module:
    """``steps`` AdamW steps of next-token loss, so the weights are no longer θ_0."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        x, y = sampler.next_batch()
        loss = causal_lm_loss(model, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def flat_theta(model: nn.Module) -> torch.Tensor:
    """θ as DiLoCo averages it: the parameters in the run's order, flat fp32."""
    return torch.cat([p.detach().reshape(-1) for _, p in global_parameters(model)]).to(torch.float32)


def theta_sha256(model: nn.Module) -> str:
    """model_sha256 of the model's θ: what a run publishes as theta0_sha256 and peers compare."""
    return model_sha256([flat_theta(model)])


def save_checkpoint(root: str | Path, cfg: RunConfig, model: nn.Module, outer_step: int,
                    tokenizer: bytes | None = None) -> Path:
    """A checkpoint of ``model`` as θ_global at ``outer_step`` (zero momentum), the newest 3 kept."""
    theta = flat_theta(model)
    manifest, payload = pack_state(cfg.run_id, {"outer_step": outer_step, "theta_global": theta,
                                                "momentum": torch.zeros_like(theta)})
    return Path(checkpoint.save(root, manifest, payload, keep=3, config=cfg, tokenizer=tokenizer).path)


def peer_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)


def run_cli(module: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` as a user would, and return its exit code and output."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=peer_env(), cwd=ROOT)


def start_cli(module: str, *args: str, log_path: str) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=peer_env(), cwd=ROOT, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 20) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def join_address(log_path) -> str | None:
    """The multiaddr a peer or bootstrap node printed for others to join, once it has."""
    match = JOIN_LINE.search(open(log_path).read())
    return match.group(1) if match else None


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def start_nodes(n: int, run_id: str, cfg: SwarmConfig, initial: list[str] = (),
                adoption: Callable[[str], Adoption] | None = None, **status) -> list[Node]:
    """n real nodes on loopback (in the DHT of ``initial``, else their own), each under its own identity, members
    of ``run_id``; ``status`` fields (e.g. round=1) are stored in the DHT before the call returns, and every node's
    view holds the others. ``adoption``: builds each node's adoption rules from its peer id (then rounds the swarm
    is past are stale); without it no round is ever stale."""
    loopback = parse_maddrs(["/ip4/127.0.0.1/tcp/0"], "test")
    identities = [load_identity(None) for _ in range(n)]
    first = start_dht(parse_maddrs(list(initial), "test"), loopback, [], identities[0])
    dhts = [first] + [start_dht(first.get_visible_maddrs(), loopback, [], i) for i in identities[1:]]
    nodes = [Node(d, i) for d, i in zip(dhts, identities)]
    for node in nodes:
        node.join_run(run_id, cfg, reachable="yes", adoption=adoption(node.peer_id) if adoption else None)
        node.update_status(**status)
        node.flush_status()
    for node in nodes:
        node.live_peers(fresh=True)
    return nodes


def close_all(nodes: list[Node]) -> None:
    for node in nodes:
        node.close()


def random_state(numel: int, step: int = 7) -> dict:
    """A DiLoCo state (θ_global and momentum) of ``numel`` parameters, the same for the same step."""
    gen = torch.Generator().manual_seed(step)
    return {"outer_step": step, "theta_global": torch.randn(numel, generator=gen),
            "momentum": torch.randn(numel, generator=gen)}


def outer_by_step(path) -> dict[int, dict]:
    """A peer's ``outer`` events (its metrics file), by outer step."""
    return {e["outer_step"]: e for e in read_events(str(path), "outer")}
