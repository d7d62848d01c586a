"""One peer of ``bench.scale``: a user loop through ``swarm.DiLoCo`` whose model compute is negligible.

    python -m bench.scale_worker --initial-peers MADDR --out DIR --name peerI [--config PROFILE] [--step-s 1.0]
    python -m bench.scale_worker --initial-peers MADDR --out DIR --name claimer --silent-claimer

A trainer pads each inner step with sleep to ``--step-s``, so rounds last about H x step-s while the CPU
stays free for what is measured: matchmaking, the DHT and the all-reduce of many peers on 2 cores. At
exit it writes ``DIR/<name>.json``: the DHT requests it sent and the RPCs its DHT process sent for them
(counted inside hivemind's DHT process), and the peak PSS of its three processes (this one, hivemind's
DHT process, p2pd), each sampled every 0.5 s.

``--silent-claimer`` joins the run and says, in its liveness record, that it is in whatever round the
others are in, but never answers a join request or sends anything: what it costs the others is
``bench.scale``'s ``silent_claimer_slowdown``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time

import psutil
import torch


def peak_pss(proc: psutil.Process, stop: threading.Event, peaks: dict[str, float]) -> None:
    """Sample the PSS (MB) of ``proc`` and its children by kind until ``stop``, keeping each kind's peak."""
    while not stop.is_set():
        parts = {"python": 0.0, "dht": 0.0, "p2pd": 0.0}
        try:
            for p in [proc, *proc.children(recursive=True)]:
                kind = "python" if p.pid == proc.pid else "p2pd" if "p2pd" in p.name() else "dht"
                parts[kind] += p.memory_full_info().pss / 2**20
        except psutil.Error:
            pass
        parts["total"] = sum(parts.values())
        for k, v in parts.items():
            peaks[k] = max(peaks.get(k, 0.0), v)
        stop.wait(0.5)


async def _count_rpcs(_dht, node) -> int:
    """Runs inside hivemind's DHT process: wrap its protocol's RPC calls with a counter, once; return the count."""
    proto = node.protocol
    if not hasattr(proto, "swarm_rpcs"):
        proto.swarm_rpcs = 0
        for name in ("call_ping", "call_store", "call_find"):
            original = getattr(proto, name)

            async def counted(*args, _original=original, **kwargs):
                proto.swarm_rpcs += 1
                return await _original(*args, **kwargs)

            setattr(proto, name, counted)
    return proto.swarm_rpcs


def train(args: argparse.Namespace) -> dict:
    import swarm
    from swarm import data as swarm_data
    from swarm.architectures import build_model, causal_lm_loss
    from swarm.config import load_profile
    from swarm.dht import parse_maddrs
    from swarm.inner import make_optimizer
    from swarm.membership import open_membership

    cfg = load_profile(args.config) if args.config else None
    tokenizer = swarm_data.tokenizer_from_json(None)
    corpus = swarm_data.load_corpus(None)
    tokens = swarm_data.prepare_tokens(corpus, tokenizer, swarm_data.default_cache_dir())
    counts: dict[str, int] = {}

    def joined(dl) -> None:
        dl.node.dht.run_coroutine(_count_rpcs)
        counts.update(requests=dl.node.sdht.requests_sent, t=time.monotonic())
        threading.Thread(target=watch_view, args=(dl.node, args.expect - 1, counts), daemon=True).start()
        print(f"joined: {dl.join_addresses()[0]}", flush=True)

    # the first peer starts the run from its profile; the others learn the model from the run's config
    membership = open_membership(parse_maddrs(args.initial_peers, "--initial-peers", True),
                                 parse_maddrs(["/ip4/127.0.0.1/tcp/0"], "--host-maddrs"), [], args.identity, None, cfg)
    cfg = membership.cfg
    model = build_model(cfg.model, tokenizer.vocab_size, cfg.train.seed)
    inner = make_optimizer(model, cfg.train)
    sampler = swarm_data.BatchSampler(tokens, cfg.model.seq_len, cfg.train.batch_size, seed=swarm_data.peer_seed(args.name, 0))
    with swarm.DiLoCo(model, inner, config=cfg, membership=membership, metrics_file=os.path.join(args.out, f"{args.name}.jsonl"),
                      name=args.name, max_outer_steps=args.outer_steps, reachable="yes", on_joined=joined) as dl:
        while not dl.done:
            t0 = time.monotonic()
            x, y = sampler.next_batch()
            loss = causal_lm_loss(model, x, y)
            loss.backward()
            inner.step()
            inner.zero_grad()
            time.sleep(max(0.0, args.step_s - (time.monotonic() - t0)))
            dl.step(samples=len(x), loss=loss.item())
        requests = dl.node.sdht.requests_sent - counts["requests"]
        rpcs = dl.node.dht.run_coroutine(_count_rpcs)
        seconds = time.monotonic() - counts["t"]
    return {"dht_requests": requests, "dht_rpcs": rpcs, "seconds": seconds, "saw_all_at": counts.get("saw_all_at")}


def watch_view(node, others: int, counts: dict, limit_s: float = 300) -> None:
    """Note the wall-clock time our liveness view first holds ``others`` other peers (one DHT, not several)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if len(node.liveness.peers) >= others:
            counts["saw_all_at"] = time.time()
            return
        time.sleep(0.25)


def claim_silently(args: argparse.Namespace) -> dict:
    """Follow the others' rounds in our liveness record; accept join streams and never answer them."""
    from swarm.dht import find_run_config, parse_maddrs, start_dht
    from swarm.identity import load_identity
    from swarm.matchmaking import JOIN
    from swarm.node import Node

    identity = load_identity(args.identity)
    node = Node(start_dht(parse_maddrs(args.initial_peers, "x", True), parse_maddrs(["/ip4/127.0.0.1/tcp/0"], "h"),
                          [], identity), identity)
    cfg = node.call(find_run_config(node.dht, None, 60), timeout_s=90)
    node.join_run(cfg.run_id, cfg.swarm, reachable="yes")

    async def never_answer(_info, reader, writer):
        await asyncio.sleep(3600)

    node.call(node.p2p.remove_binary_stream_handler(JOIN))
    node.call(node.p2p.add_binary_stream_handler(JOIN, never_answer))
    print(f"joined: {node.peer_id}", flush=True)
    deadline = time.monotonic() + args.claim_s
    while time.monotonic() < deadline:
        rounds = [r["round"] for r in node.live_peers(fresh=True).values() if isinstance(r.get("round"), int)]
        if rounds:
            k = max(rounds)
            node.update_status(name="claimer", round=k, training=k, state="training")
        time.sleep(cfg.swarm.heartbeat_s / 2)
    node.close()
    return {}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--initial-peers", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--config", help="start the run with this profile (the first peer only)")
    p.add_argument("--outer-steps", type=int, default=6)
    p.add_argument("--step-s", type=float, default=1.0)
    p.add_argument("--expect", type=int, default=1, help="peers in the swarm: note when our view holds all")
    p.add_argument("--silent-claimer", action="store_true")
    p.add_argument("--identity", help="key file (bench.scale gives the claimer the lowest peer id of all)")
    p.add_argument("--claim-s", type=float, default=600)
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("hivemind", "asyncio", "multiaddr"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    peaks: dict[str, float] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=peak_pss, args=(psutil.Process(), stop, peaks), daemon=True)
    sampler.start()
    try:
        result = claim_silently(args) if args.silent_claimer else train(args)
    finally:
        stop.set()
        sampler.join(2)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump({**result, "pss_mb": peaks}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
