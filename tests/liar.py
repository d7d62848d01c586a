"""A lying peer, as an attacker would run one: ``python tests/liar.py --initial-peers MADDR --kind KIND``.

It joins the swarm's DHT under its own key, reads the run's config, and announces in its signed liveness
record that it is at round ``--step`` + 1 holding a state of outer step ``--step``, which it serves:

* ``zeros``: a correctly sized, correctly hashed θ of zeros;
* ``noise``: a correctly sized θ of Gaussian noise with the scale of the run's θ_0;
* ``small``: a consistent manifest of a 10-parameter state (its record announces that size);
* ``misfit``: its record announces the run's size, but the manifest it serves describes 10 parameters.

It prints "lying: <model sha256>" once its record is stored, then stays until killed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import torch

from swarm.config import SwarmConfig
from swarm.dht import find_run_config, parse_maddrs, start_dht
from swarm.identity import load_identity
from swarm.manifest import pack_state
from swarm.node import Node


def lie(initial_peer: str, kind: str, step: int) -> None:
    identity = load_identity(None)
    node = Node(start_dht(parse_maddrs([initial_peer], "--initial-peers", need_peer_id=True),
                          parse_maddrs(["/ip4/127.0.0.1/tcp/0"], "--host-maddrs"), [], identity), identity)
    cfg = node.call(find_run_config(node.dht, None, 30), timeout_s=60)
    node.join_run(cfg.run_id, SwarmConfig(**{**cfg.swarm.__dict__, "heartbeat_s": 1.0}), reachable="yes")
    numel = 10 if kind in ("small", "misfit") else cfg.model_numel
    gen = torch.Generator().manual_seed(7)
    theta = torch.zeros(numel) if kind == "zeros" else torch.randn(numel, generator=gen) * 0.05
    manifest, payload = pack_state(cfg.run_id, {"outer_step": step, "theta_global": theta,
                                                "momentum": torch.zeros(numel)})
    node.hold(manifest, payload)
    if kind == "misfit":  # announce the run's size, serve the 10-parameter manifest
        node.update_status(held={"outer_step": step, "manifest": manifest.sha256,
                                 "model_sha256": manifest.model_sha256, "size": 8 * cfg.model_numel})
    node.update_status(name="liar", round=step + 1, training=step + 1, state="training", samples=0)
    node.flush_status()
    print(f"lying: {manifest.model_sha256}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    node.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--initial-peers", required=True)
    p.add_argument("--kind", choices=("zeros", "noise", "small", "misfit"), required=True)
    p.add_argument("--step", type=int, default=1000)
    args = p.parse_args()
    lie(args.initial_peers, args.kind, args.step)
    sys.exit(0)
