"""One process of ``python -m bench.overhead``: the same inner loop, plain or through ``swarm.DiLoCo``.

    python -m bench.overhead_worker --mode prepare|plain|api --config NAME --out RESULT.json [...]

``prepare`` trains and caches the profile's tokenizer and token file (so no measured process pays for that,
in time or memory) and reports the model's size. ``plain`` is the loop of ``swarm.peer.train`` without the
swarm: sample a batch, ``swarm.inner.inner_step``, ``scheduler.step()``. ``api`` is the same loop with
``dl.step(...)`` after each step, ``swarm.DiLoCo`` built as ``swarm.peer.run`` builds it (the run's config,
scheduler, data and tokenizer), on loopback. Rank 0 starts the run and writes its join address to
``--address-file``; rank 1 joins it through ``--initial-peers``.

Every step is timed in two parts: the inner step (batch, forward, backward, optimizer, scheduler) and the
``dl.step`` call. A call after which ``dl.global_step`` is a multiple of H ended a round: that call is the
outer step (Δ, the all-reduce or the lone average, the outer Nesterov step, the model hash). The first
``--warmup`` steps are not counted. The result (JSON) has the per-step times and their sums.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from typing import NamedTuple

import psutil


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.overhead_worker", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("prepare", "plain", "api"), required=True)
    p.add_argument("--config", required=True, help="profile: a built-in name or a TOML file")
    p.add_argument("--out", required=True, help="write the result here (JSON)")
    p.add_argument("--batch-size", type=int, help="sequences per inner step (default: the profile's)")
    p.add_argument("--inner-steps", type=int, required=False, help="H (default: the profile's)")
    p.add_argument("--outer-steps", type=int, default=1, help="rounds: the loop runs outer steps x H inner steps")
    p.add_argument("--warmup", type=int, default=2, help="first inner steps left out of the timing")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    p.add_argument("--run-id", default="overhead", help="api: the run to start")
    p.add_argument("--rank", type=int, default=0, help="api: 0 starts the run, others join it")
    p.add_argument("--peers", type=int, default=1, help="api: round 1 waits for this many peers (min_peers)")
    p.add_argument("--initial-peers", nargs="*", default=[], help="api, rank > 0: rank 0's address")
    p.add_argument("--address-file", help="api, rank 0: write the join address here once the run is started")
    p.add_argument("--metrics-file", help="api: the peer's metrics (JSON lines)")
    p.add_argument("--quiet-cores", type=float, default=0.1,
                   help="a step is quiet if other processes used at most this many cores during it")
    p.add_argument("--start-timeout-s", type=float, default=180.0, help="api: how long round 1 waits for the peers")
    return p.parse_args(argv)


def run_config(args: argparse.Namespace):
    """The profile with the benchmark's batch, H and peer count."""
    from swarm.config import load_profile

    cfg = load_profile(args.config, args.run_id)
    train = dataclasses.replace(cfg.train, batch_size=args.batch_size or cfg.train.batch_size,
                                inner_steps=args.inner_steps or cfg.train.inner_steps)
    swarm_cfg = dataclasses.replace(cfg.swarm, min_peers=args.peers, min_peers_timeout_s=args.start_timeout_s)
    return dataclasses.replace(cfg, train=train, swarm=swarm_cfg)


def load_data(cfg):
    """(corpus, tokenizer, training tokens) of the embedded corpus, as swarm.peer loads them."""
    from swarm import data as swarm_data
    from swarm.peer import cache_dir

    corpus = swarm_data.load_corpus(None)
    tokenizer = swarm_data.build_tokenizer(cfg.model.tokenizer, corpus)
    tokens, _ = swarm_data.split_tokens(swarm_data.prepare_tokens(corpus, tokenizer, cache_dir()))
    return corpus, tokenizer, tokens


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("hivemind", "asyncio", "multiaddr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    from swarm import data as swarm_data
    from swarm.architectures import build_model
    from swarm.inner import inner_step, make_optimizer, make_scheduler

    cfg = run_config(args)
    corpus, tokenizer, tokens = load_data(cfg)
    model = build_model(cfg.model, tokenizer.vocab_size, cfg.train.seed)
    numel = sum(p.numel() for p in model.parameters())
    result = {"mode": args.mode, "rank": args.rank, "pid": os.getpid(), "numel": numel,
              "param_bytes": 4 * numel, "vocab_size": tokenizer.vocab_size, "threads": torch.get_num_threads(),
              "batch_size": cfg.train.batch_size, "seq_len": cfg.model.seq_len, "inner_steps": cfg.train.inner_steps,
              "profile": cfg.profile}
    if args.mode == "prepare":
        _write(args.out, result)
        return 0

    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train)
    sampler = swarm_data.BatchSampler(tokens, cfg.model.seq_len, cfg.train.batch_size, seed=cfg.train.seed + args.rank)
    H, total = cfg.train.inner_steps, args.outer_steps * cfg.train.inner_steps
    steps: list[Step] = []
    clock = CpuClock()

    def loop(dl) -> None:
        busy, own = clock.read()
        for _ in range(total):
            t0 = time.perf_counter()
            x, y = sampler.next_batch()
            loss = inner_step(model, optimizer, x, y, cfg.train)
            scheduler.step()
            t1 = time.perf_counter()
            ended = False
            if dl is not None:
                dl.step(samples=cfg.train.batch_size, loss=loss, tokens=x.numel())
                ended = dl.global_step % H == 0
            t2 = time.perf_counter()
            (busy_now, own_now), t_read = clock.read(), time.perf_counter()
            others = max(0.0, (busy_now - busy) - (own_now - own)) / (t_read - t0)
            busy, own = busy_now, own_now
            steps.append(Step(t1 - t0, t2 - t1, ended, others))

    t_start = time.monotonic()
    if args.mode == "plain":
        loop(None)
    else:
        from swarm.api import DiLoCo

        def joined(dl) -> None:
            if args.address_file:
                tmp = args.address_file + ".tmp"
                with open(tmp, "w") as f:
                    f.write(dl.join_addresses()[0])
                os.replace(tmp, args.address_file)

        config = cfg if args.rank == 0 else None
        with DiLoCo(model, optimizer, config=config, run_id=cfg.run_id, initial_peers=args.initial_peers,
                    scheduler=scheduler, data=(corpus.name, corpus.sha256),
                    tokenizer=(tokenizer.sha256, tokenizer.to_json()), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                    metrics_file=args.metrics_file, name=f"peer{args.rank}", max_outer_steps=args.outer_steps,
                    reachable="yes", on_joined=joined) as dl:
            result["started_s"] = round(time.monotonic() - t_start, 3)
            loop(dl)
            result["outer_steps_applied"] = dl.outer_step
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    result.update(summarize(steps, args.warmup, tokens_per_step))
    result["quiet"] = summarize(steps, args.warmup, tokens_per_step, max_others=args.quiet_cores)
    result["quiet_cores"] = args.quiet_cores
    _write(args.out, result)
    return 0


class Step(NamedTuple):
    compute_s: float  # batch, forward, backward, optimizer and scheduler steps
    dl_step_s: float  # the dl.step call (0 in plain)
    ended: bool  # that call ended a round: it was the outer step
    others_cores: float  # cores that processes other than this peer's used meanwhile (steal included)


class CpuClock:
    """Core-seconds the whole machine has been busy (its hypervisor's steal included), and core-seconds this peer's
    processes (this one, hivemind's DHT process, p2pd) have used: their difference over a step is what other
    processes took from it."""

    def __init__(self):
        self.me = psutil.Process()
        self._known: dict[int, psutil.Process] = {}

    def read(self) -> tuple[float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
        own = sum(self.me.cpu_times()[:2])
        try:
            children = self.me.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            try:
                own += sum(self._known.setdefault(child.pid, child).cpu_times()[:2])
            except psutil.Error:
                pass
        return busy, own


def summarize(steps: list[Step], warmup: int, tokens_per_step: int, max_others: float | None = None) -> dict:
    """Throughputs over the steps after the warm-up: whole (everything the loop did), inner-only (everything
    but the calls that ended a round), compute-only (the inner steps alone, no ``dl.step`` at all).
    ``max_others``: only the steps during which other processes used at most that many cores."""
    kept = [i for i in range(warmup, len(steps)) if max_others is None or steps[i].others_cores <= max_others]
    timed = [steps[i] for i in kept]
    if not timed:
        return {"timed_steps": 0}
    compute_s = sum(s.compute_s for s in timed)
    api_s = sum(s.dl_step_s for s in timed if not s.ended)
    outer = [s.dl_step_s for s in timed if s.ended]
    tokens = len(timed) * tokens_per_step
    # the inner step right after each outer step, against the typical one: what the swarm's background work
    # after an outer step (the holder hashing and announcing the new state) takes from training
    after = [steps[i].compute_s for i in kept if i > warmup and steps[i - 1].ended]
    median = statistics.median(s.compute_s for s in timed)
    out = {
        "timed_steps": len(timed), "tokens": tokens,
        "tokens_per_s": tokens / (compute_s + api_s + sum(outer)),
        "inner_tokens_per_s": tokens / (compute_s + api_s),
        "compute_tokens_per_s": tokens / compute_s,
        "api_step_ms": 1000 * api_s / max(1, len(timed) - len(outer)),
        "outer_steps_timed": len(outer), "outer_s": outer, "median_step_s": median,
        "after_outer_extra_s": statistics.mean(after) - median if after else None,
        "others_cores": statistics.mean(s.others_cores for s in timed),
    }
    if max_others is None:
        out.update({"steps": len(steps), "warmup_steps": min(warmup, len(steps)),
                    "step_s": [round(s.compute_s, 4) for s in steps],
                    "dl_step_s": [round(s.dl_step_s, 4) for s in steps],
                    "others_cores_by_step": [round(s.others_cores, 3) for s in steps]})
    return out


def _write(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
