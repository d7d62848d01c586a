"""``python -m bench.scale``: N peers in one swarm on 127.0.0.1, and what matchmaking and the DHT cost them.

    python -m bench.scale [--peers 8,16,32] [--outer-steps 6] [--step-s 1.0] [--claimer-at 8]
                          [--json bench/results/scale.json] [--plot bench/results/scale.png]

Each N starts a stand-alone bootstrap node and N peers (bench/scale_worker.py: a user loop through the
Python API on a micro GPT whose compute is negligible, inner steps padded with sleep so that rounds last
about H x --step-s, ~10 s): the first, which starts the run, then the other N - 1 within a few seconds of each
other in batches of ``--start-batch``, each once the previous one has joined (started all at once, 32 peers on 2
cores took longer than a joiner's 20 s search for the run's config before the first had published it, and
then 80 s for one DHT lookup while ~90 processes started). The run's profile sets ``max_group_size``
to N and ``min_peers`` to N, so every round can be one group of all of them. Per N it reports:

- ``full_group_fraction``: of the (peer, outer step) pairs, those averaged in a group of every live peer;
- ``matchmaking_median_s`` / ``_p95_s``: from the peers' ``outer`` events;
- ``dht_requests_per_peer_s``: requests our code sent to its DHT, per peer and second of training, and
  ``dht_rpcs_per_peer_s``: the RPCs hivemind's DHT process sent for them (counted inside that process);
- ``pss_per_peer_mb``: the peak PSS of a peer's three processes (Python, DHT process, p2pd), each part too;
- ``hash_disagreements``: over every outer step, the number of distinct models beyond one among its
  reporters; ``dht_split``: peers that did not see every other peer's liveness record within 30 s of the
  last one joining (hivemind users report swarms splitting into separate DHTs);
- ``silent_claimer_slowdown`` (at ``--claimer-at``): the median round time with a peer that claims every
  round and never answers (with the lowest peer id, so it would lead), over the median round time without.

An N whose peers do not all join within START_S gets a row with its ``error`` (how many had joined) and null
figures, and the benchmark goes on with the next N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import finish_figure, make_parents, write_results
from swarm.config import RunConfig, load_profile, write_profile
from swarm.identity import load_identity, save_identity
from swarm.launch import start, stop, wait_for_join_address
from swarm.metrics import read_events

START_S = 300.0  # all N peers have printed their join lines
SEE_ALL_S = 30.0
# null, beside an "error", in the row of an N whose peers did not all join within START_S
ROW_KEYS = ("full_group_fraction", "matchmaking_median_s", "matchmaking_p95_s", "dht_requests_per_peer_s",
            "pss_per_peer_mb", "hash_disagreements", "silent_claimer_slowdown")  # after that, every peer sees every other's liveness record


class StartError(RuntimeError):
    """The N peers did not all join in time: a result for that N (the bound it hit), not a crash of the benchmark."""


def micro_profile(n: int, path: str) -> str:
    """1 layer, d_model 32, H = 10: compute is negligible; one group of all N peers is allowed."""
    base = load_profile("tiny")
    model = base.model.__class__(family="gpt", tokenizer="byte", n_layer=1, n_head=2, d_model=32, seq_len=32)
    train = base.train.__class__(batch_size=4, inner_steps=10, inner_lr=3e-3, warmup_steps=10,
                                 schedule_outer_steps=50, outer_lr=0.5)
    swarm = base.swarm.__class__(codec="int8", gather_timeout_s=30.0, join_timeout_s=15.0, allreduce_timeout_s=30.0,
                                 heartbeat_s=2.0, max_group_size=max(n, 2), min_peers=n, min_peers_timeout_s=240.0)
    return write_profile(RunConfig(run_id="scale", profile="micro", model=model, train=train, swarm=swarm), path)


def identity_files(workdir: str, n: int) -> list[str]:
    """n key files, sorted by peer id: the first is the leader by our rule (the lowest id) among them all."""
    identities = sorted((load_identity(None) for _ in range(n)), key=lambda i: i.peer_id)
    paths = [os.path.join(workdir, f"key{i}") for i in range(n)]
    for identity, path in zip(identities, paths):
        save_identity(identity, path)
    return paths


def run_swarm(n: int, args, workdir: str, claimer: bool) -> dict:
    os.makedirs(workdir, exist_ok=True)
    profile = micro_profile(n, os.path.join(workdir, "micro.toml"))
    procs: list[subprocess.Popen] = []
    try:
        boot_log = os.path.join(workdir, "bootstrap.log")
        procs.append(start(["swarm.bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"], boot_log, 1))
        address = wait_for_join_address(procs[0], boot_log, 60)
        logs = [os.path.join(workdir, f"peer{i}.log") for i in range(n)]
        keys = identity_files(workdir, n + 1) if claimer else []  # the claimer's id sorts first: it would lead
        deadline = time.monotonic() + START_S
        for i in range(n):
            extra = (["--config", profile] if i == 0 else []) + (["--identity", keys[i + 1]] if claimer else [])
            procs.append(start(["bench.scale_worker", "--initial-peers", address, "--out", workdir, "--name",
                                f"peer{i}", "--outer-steps", str(args.outer_steps), "--step-s", str(args.step_s),
                                "--expect", str(n), *extra], logs[i], 1))
            if i == 0 or i % args.start_batch == 0:  # the first one's config is in the DHT before the others look
                wait_until_joined(procs[1:], logs[:i + 1], deadline, workdir)
        wait_until_joined(procs[1:], logs, deadline, workdir)
        joined_at = time.time()
        if claimer:
            procs.append(start(["bench.scale_worker", "--initial-peers", address, "--out", workdir, "--name", "claimer",
                                "--silent-claimer", "--identity", keys[0]], os.path.join(workdir, "claimer.log"), 1))
        for proc in procs[1:n + 1]:
            proc.wait(timeout=args.timeout_s)
    finally:
        stop(procs)
    return summarize(n, workdir, joined_at)


def wait_until_joined(procs: list[subprocess.Popen], logs: list[str], deadline: float, workdir: str) -> None:
    while (joined := sum("joined: " in open(log).read() for log in logs)) < len(logs):
        failed = [i for i, p in enumerate(procs) if p.poll() is not None]
        if failed:
            raise StartError(f"peer{failed[0]} exited with code {procs[failed[0]].returncode} before it joined; "
                             f"see {workdir}")
        if time.monotonic() > deadline:
            raise StartError(f"{joined} of the {len(logs)} peers started so far had joined after {START_S:.0f} s; "
                             f"see {workdir}")
        time.sleep(0.5)


def summarize(n: int, workdir: str, joined_at: float) -> dict:
    outer = {i: {e["outer_step"]: e for e in read_events(os.path.join(workdir, f"peer{i}.jsonl"), "outer")}
             for i in range(n)}
    pairs = [(i, s) for i in range(n) for s in outer[i]]
    full = sum(outer[i][s]["group_size"] == n for i, s in pairs)
    matchmaking = sorted(e["matchmaking_s"] for i, s in pairs for e in [outer[i][s]])
    steps = sorted({s for _, s in pairs})
    disagreements = sum(len({outer[i][s]["model_sha256"] for i in range(n) if s in outer[i]}) - 1 for s in steps)
    # a round's time: between consecutive outer events of the same peer
    round_s = [outer[i][s]["t"] - outer[i][s - 1]["t"] for i, s in pairs if s - 1 in outer[i]]
    workers = [json.load(open(os.path.join(workdir, f"peer{i}.json"))) for i in range(n)]
    seconds = sum(w["seconds"] for w in workers)
    seen = [e for i in range(n) for e in read_events(os.path.join(workdir, f"peer{i}.jsonl"), "outer")
            if e["outer_step"] == min(steps, default=0)]
    saw_all = [w.get("saw_all_at") for w in workers]
    return {
        "peers": n, "outer_steps": len(steps),
        "full_group_fraction": round(full / max(len(pairs), 1), 4),
        "matchmaking_median_s": round(statistics.median(matchmaking), 3) if matchmaking else None,
        "matchmaking_p95_s": round(matchmaking[int(0.95 * (len(matchmaking) - 1))], 3) if matchmaking else None,
        "dht_requests_per_peer_s": round(sum(w["dht_requests"] for w in workers) / seconds, 3),
        "dht_rpcs_per_peer_s": round(sum(w["dht_rpcs"] for w in workers) / seconds, 3),
        "pss_per_peer_mb": round(statistics.mean(w["pss_mb"]["total"] for w in workers), 1),
        "pss_parts_mb": {k: round(statistics.mean(w["pss_mb"][k] for w in workers), 1)
                         for k in ("python", "dht", "p2pd")},
        "hash_disagreements": disagreements,
        "round_median_s": round(statistics.median(round_s), 2) if round_s else None,
        "first_step_group_sizes": sorted({e["group_size"] for e in seen}),
        "dht_split": sum(t is None or t - joined_at > SEE_ALL_S for t in saw_all),
        "see_all_max_s": round(max(t - joined_at for t in saw_all), 2) if None not in saw_all else None,
    }


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    peers = [r["peers"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(peers, [r["full_group_fraction"] for r in rows], "o-", label="peer-rounds in full groups")
    axes[0].axhline(0.99, ls=":", c="k", label="target 0.99")
    axes[1].plot(peers, [r["matchmaking_median_s"] for r in rows], "o-", label="matchmaking median (s)")
    axes[1].plot(peers, [r["matchmaking_p95_s"] for r in rows], "s--", label="matchmaking p95 (s)")
    axes[1].plot(peers, [r["dht_requests_per_peer_s"] for r in rows], "^-", label="DHT requests / peer / s")
    axes[2].plot(peers, [r["pss_per_peer_mb"] for r in rows], "o-", label="PSS per peer (MB)")
    for ax in axes:
        ax.set_xlabel("peers")
        ax.set_xscale("log", base=2)
    finish_figure(fig, path, axes, "bench.scale: N peers on 127.0.0.1, micro model, rounds of ~10 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("--peers", default="8,16,32")
    p.add_argument("--outer-steps", type=int, default=6)
    p.add_argument("--step-s", type=float, default=1.0, help="seconds per inner step (sleep-padded)")
    p.add_argument("--claimer-at", type=int, default=8, help="N at which to measure a silent claimer (0: never)")
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("--start-batch", type=int, default=4, help="peers started at once (after the first)")
    p.add_argument("--workdir")
    p.add_argument("--json", default="bench/results/scale.json")
    p.add_argument("--plot", default="bench/results/scale.png")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="swarm-scale-")
    rows = []
    for n in [int(x) for x in args.peers.split(",")]:
        try:
            row = run_swarm(n, args, os.path.join(workdir, f"n{n}"), claimer=False)
        except StartError as e:
            rows.append({"peers": n, "error": str(e), **{key: None for key in ROW_KEYS}})
            print(f"N={n:3d}  did not start: {e}", flush=True)
            continue
        row["silent_claimer_slowdown"] = None
        if n == args.claimer_at:
            with_claimer = run_swarm(n, args, os.path.join(workdir, f"n{n}-claimer"), claimer=True)
            row["silent_claimer_slowdown"] = round(with_claimer["round_median_s"] / row["round_median_s"], 3)
            row["with_claimer"] = with_claimer
        rows.append(row)
        print(f"N={n:3d}  full groups {row['full_group_fraction']:.3f}  matchmaking median "
              f"{row['matchmaking_median_s']} s p95 {row['matchmaking_p95_s']} s  DHT {row['dht_requests_per_peer_s']}"
              f" req/peer/s ({row['dht_rpcs_per_peer_s']} RPCs)  PSS {row['pss_per_peer_mb']} MB/peer "
              f"{row['pss_parts_mb']}  hash disagreements {row['hash_disagreements']}  round {row['round_median_s']} s"
              f"  claimer x{row['silent_claimer_slowdown']}", flush=True)
    make_parents(args.json, args.plot)
    write_results(rows, args.json, args.plot, plot)
    print(f"wrote {args.json} and {args.plot}; logs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
