"""``sudo python -m bench.train``: a DiLoCo swarm training on shaped links: compute utilization, throughput, bytes.

    sudo python -m bench.train [--peers 2] [--config peers/small.toml] [--inner-steps 4] [--outer-steps 3]
                               [--bandwidth 10,100] [--overlap off,on] [--latency-ms 0] [--threads T]
                               [--json bench/results/train.json] [--plot bench/results/train.png]

    quick run: sudo python -m bench.train --config peers/tiny.toml --inner-steps 200 --bandwidth 10
    (a round must outlast a peer's start-up, about 10 s here, or the first peer trains alone)

N real ``python -m swarm.peer`` processes, one per network namespace on a bridge, every link shaped
in both directions (bench/netns.py), train the same fixed token budget (N x outer steps x H x B
sequences) once per setting: each bandwidth, with and without ``train.overlap``. Peer i listens on
its namespace's address and is given every earlier peer's printed multiaddr (p2pd's DHT does not
hand out 198.18.0.0/15 addresses, so peers that know only peer0 could not dial one another).

What is measured, from the peers' metrics files:

- compute utilization: time in inner steps / wall time, with time in inner steps = wall − Σ wait_s
  (``wait_s``: how long the training loop blocked on an average), start-up excluded. Peers start one
  after another (each needs the earlier ones' addresses), and an early starter's head start shows up
  later as waiting for the others: at round 1's average without overlap, at the last one with
  overlap, where it keeps its lead all run. So the clock is the last-started peer's: from its
  ``joined`` event to its last ``outer`` event, its waits are all on the network or on the others'
  compute, never on a start-up lag. (Rounds a peer averaged alone because the others were still
  starting count as start-up.) The pseudo-gradient, outer step and model hash count as compute
  (tenths of a second a round); so does the first inner steps' warm-up.
- tokens/s: every peer's tokens over the same wall (to the last peer's last outer step), against N x
  one peer's tokens/s measured alone (a lone peer in namespace 0, same profile and thread count, one
  round, before the settings; its time in inner steps over its own wall less its wait).
- bytes per peer: what the ``outer`` events say was sent (payloads and framing), and eth0's transmit
  counter in the peer's namespace (TCP/IP headers and DHT traffic included).
- the physical bound: an all-reduce of S bytes among N peers over links of B bit/s needs at least
  2(N−1)/N · S/B (B: the measured TCP goodput). From it and the alone speed, the utilization a
  perfect network stack would reach: C / (C + bound) a round without overlap; with overlap every
  all-reduce but the last hides behind the next round (when it fits in one), so S·C / (S·C + bound
  + (S−1)·max(0, bound − C)) over S rounds. tbf lets a 256 KB burst through at line rate, so for
  payloads near that size (tiny's 0.45 MB) an all-reduce can beat the bound.
- final loss: the peers' mean training loss over the last round's batches.

CPU sharing: this box has few cores, and the N peers (with their p2pd and DHT processes) share them.
Each peer gets ``--threads`` torch threads (default cores // N) and the lone peer the same, so
"N x alone" is the swarm's compute ceiling only while the peers' threads, their p2pd and DHT
processes, and whatever else runs on the machine fit on its cores; otherwise the swarm falls short
of it for reasons that are not the network (the table's "ratio" against "util" shows how much).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from bench.convergence import derive
from bench.common import finish_figure, make_parents, netns_preflight, write_results
from bench.netns import NetnsError, Topology, link_bytes, peer_addr
from swarm.architectures import parameter_count
from swarm.averaging import Codec
from swarm.config import ConfigError, RunConfig, load_profile, write_profile
from swarm.evaluate import corpus_split
from swarm.launch import wait_for_join_address
from swarm.metrics import read_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 180.0  # a peer's imports, DHT and model on a loaded 2-core box


class BenchError(RuntimeError):
    """A peer failed, went silent or never averaged with the others; the message says where its log is."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--config", default="peers/small.toml", help="base profile (peers/tiny.toml: a quick run)")
    p.add_argument("--inner-steps", type=int, default=4, help="H (overrides the profile's)")
    p.add_argument("--outer-steps", type=int, default=3, help="rounds per setting: the token budget")
    p.add_argument("--bandwidth", type=lambda s: [float(x) for x in s.split(",") if x], default=[10.0, 100.0],
                   help="link rates in Mbit/s, each direction, e.g. 10,100")
    p.add_argument("--overlap", type=lambda s: [x for x in s.split(",") if x], default=["off", "on"],
                   help="train.overlap settings to run: off,on")
    p.add_argument("--latency-ms", type=float, default=0.0, help="added one-way latency between peers")
    p.add_argument("--threads", type=int, help="torch threads per peer (default: cores // peers, at least 1)")
    p.add_argument("--timeout-s", type=float, default=1200.0, help="bound on each setting")
    p.add_argument("--workdir", default="bench/results/train-logs", help="peer logs and metrics")
    p.add_argument("--json", default="bench/results/train.json")
    p.add_argument("--plot", default="bench/results/train.png")
    args = p.parse_args(argv)
    if args.peers < 2 or min(args.inner_steps, args.outer_steps) < 1 or not args.bandwidth \
            or min(args.bandwidth) <= 0 or not set(args.overlap) <= {"off", "on"} or not args.overlap:
        p.error("need --peers >= 2, positive steps and bandwidths, and --overlap from off,on")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.peers)
    return args


# --- peers ------------------------------------------------------------------------------------------

def run_peers(topo: Topology, cfg: RunConfig, n: int, steps: int, args, sdir: str) -> list[str]:
    """Start run ``cfg`` with ``n`` peers (peer0 from the profile, peer i dialing peers 0..i-1), wait for all to
    leave after outer step ``steps``; returns their metrics files."""
    os.makedirs(sdir, exist_ok=True)
    profile = write_profile(cfg, os.path.join(sdir, "profile.toml"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    metrics = [os.path.join(sdir, f"peer{i}.jsonl") for i in range(n)]
    procs, maddrs = [], []
    try:
        for i in range(n):
            open(metrics[i], "w").close()
            argv = [sys.executable, "-m", "swarm.peer", "--run-id", cfg.run_id, "--name", f"peer{i}",
                    "--host-maddrs", f"/ip4/{peer_addr(i)}/tcp/0", "--metrics-file", metrics[i],
                    "--max-outer-steps", str(steps)]
            argv += ["--config", profile] if i == 0 else ["--initial-peers", *maddrs]
            log_path = os.path.join(sdir, f"peer{i}.log")
            with open(log_path, "w") as log:
                procs.append(topo.popen(i, argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env))
            try:
                maddrs.append(wait_for_join_address(procs[i], log_path, START_TIMEOUT_S))
            except RuntimeError as e:
                raise BenchError(f"peer{i}: {e}") from None
        deadline = time.monotonic() + args.timeout_s
        while (codes := [p.poll() for p in procs]) != [0] * n:
            failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                raise BenchError(f"peer{failed[0]} exited with code {codes[failed[0]]}; see {sdir}")
            if time.monotonic() > deadline:
                raise BenchError(f"the peers were still running after {args.timeout_s:.0f} s; see {sdir}")
            time.sleep(0.5)
    finally:
        for proc in procs:
            topo.stop(proc)
    return metrics


def tx_bytes(topo: Topology, i: int) -> int:
    """eth0's transmit counter in peer i's namespace."""
    out = subprocess.run(["ip", "netns", "exec", topo.namespaces[i], "cat", "/proc/net/dev"],
                         capture_output=True, text=True, check=True)
    return link_bytes(out.stdout)[0]


def tokens_per_s_alone(topo: Topology, cfg: RunConfig, args, workdir: str) -> float:
    """One peer alone in namespace 0, one round: tokens over the time its loop was not waiting."""
    (path,) = run_peers(topo, cfg, 1, 1, args, os.path.join(workdir, "alone"))
    (joined,), (outer,) = read_events(path, "joined"), read_events(path, "outer")
    return round_tokens(cfg) / (outer["t"] - joined["t"] - outer["wait_s"])


def round_tokens(cfg: RunConfig) -> int:
    return cfg.train.inner_steps * cfg.train.batch_size * cfg.model.seq_len


# --- measurement ------------------------------------------------------------------------------------

def measure(metrics: list[str], cfg: RunConfig, n: int) -> dict:
    """Utilization, throughput, bytes and loss of one setting from its peers' metrics (see the module doc)."""
    peers = []
    for path in metrics:
        joined, outer = read_events(path, "joined")[0], sorted(read_events(path, "outer"), key=lambda e: e["outer_step"])
        full = [e for e in outer if e["group_size"] == n]
        if not full:
            raise BenchError(f"{path}: this peer never averaged with all {n} peers (were its rounds shorter than a "
                             f"peer's start-up? raise --inner-steps)")
        before = [e for e in outer if e["outer_step"] < full[0]["outer_step"]]  # averaged alone while others started
        counted = [e for e in outer if e["outer_step"] >= full[0]["outer_step"]]
        peers.append({"start": before[-1]["t"] if before else joined["t"], "end": counted[-1]["t"],
                      "wait_s": sum(e["wait_s"] for e in counted), "tokens": len(counted) * round_tokens(cfg),
                      "outer": outer, "split": [e["outer_step"] for e in counted if e["group_size"] < n],
                      "start_up": bool(before)})
    last = max(peers, key=lambda p: p["start"])  # no head start: all its waits are on the network or the others
    wall_s = max(p["end"] for p in peers) - last["start"]
    steps = sorted({e["outer_step"] for p in peers for e in p["outer"]})
    curve = []
    for k in steps:
        events = [e for p in peers for e in p["outer"] if e["outer_step"] == k]
        curve.append({"outer_step": k, "tokens": k * n * round_tokens(cfg),
                      "t": round(max(e["t"] for e in events) - last["start"], 2),
                      "loss": round(statistics.mean(e["loss"] for e in events), 4)})
    return {
        "compute_utilization": round(1 - last["wait_s"] / (last["end"] - last["start"]), 4),
        "tokens_per_s": round(sum(p["tokens"] for p in peers) / wall_s, 1),
        "bytes_per_peer": int(statistics.mean(sum(e["bytes_sent"] for e in p["outer"]) for p in peers)),
        "final_loss": curve[-1]["loss"],
        "allreduce_s_median": round(statistics.median(e["allreduce_s"] for p in peers for e in p["outer"]
                                                      if e["group_size"] == n), 3),
        "wait_s_per_peer": [round(p["wait_s"], 2) for p in peers],
        "start_skew_s": round(last["start"] - min(p["start"] for p in peers), 2),
        "full_groups": all(e["group_size"] == n for p in peers for e in p["outer"]),
        # after the first full group, a smaller one means the peers went separate ways: not a swarm any more
        "split_at_step": min((k for p in peers for k in p["split"]), default=None),
        "same_final_model": len({p["outer"][-1]["model_sha256"] for p in peers}) == 1,
        "start_up_rounds_alone": any(p["start_up"] for p in peers),
        "wall_s": round(wall_s, 2),
        "curve": curve,
    }


def utilization_bound(round_s: float, bound_s: float, rounds: int, overlap: bool) -> float:
    """What a network stack at the bandwidth bound would reach (see the module doc)."""
    if not overlap:
        return round_s / (round_s + bound_s)
    compute = rounds * round_s
    return compute / (compute + bound_s + (rounds - 1) * max(0.0, bound_s - round_s))


# --- output -----------------------------------------------------------------------------------------

HEADER = (f"{'setting':<24} {'util':>5} {'bound':>5} {'tok/s':>7} {'N x alone':>9} {'ratio':>5} {'MB sent/peer':>12} "
          f"{'wire MB':>7} {'all-red s':>9} {'bound s':>7} {'loss':>6}  note")


def format_row(r: dict) -> str:
    setting = f"N={r['peers']} {r['bandwidth_mbit']:g}Mbit overlap {'on' if r['overlap'] else 'off'}"
    alone = r["peers"] * r["tokens_per_s_alone"]
    return (f"{setting:<24} {r['compute_utilization']:>5.2f} {r['utilization_bound']:>5.2f} {r['tokens_per_s']:>7.0f} "
            f"{alone:>9.0f} {r['tokens_per_s'] / alone:>5.2f} {r['bytes_per_peer'] / 1e6:>12.1f} "
            f"{r['wire_tx_bytes_per_peer'] / 1e6:>7.1f} {r['allreduce_s_median']:>9.2f} {r['allreduce_bound_s']:>7.2f} "
            f"{r['final_loss']:>6.3f}  {note(r)}")


def note(r: dict) -> str:
    if r["split_at_step"] is not None or not r["same_final_model"]:
        return f"INVALID: groups split at outer step {r['split_at_step']}, the peers' models differ"
    return "first rounds averaged alone (start-up, not counted)" if r["start_up_rounds_alone"] else ""


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tok, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for r in rows:
        label = f"{r['bandwidth_mbit']:g} Mbit/s, overlap {'on' if r['overlap'] else 'off'}" + \
            (" (INVALID: groups split)" if note(r).startswith("INVALID") else "")
        ax_tok.plot([c["tokens"] for c in r["curve"]], [c["loss"] for c in r["curve"]], marker="o", label=label)
        ax_t.plot([c["t"] for c in r["curve"]], [c["loss"] for c in r["curve"]], marker="o", label=label)
    ax_tok.set_xlabel("tokens trained (all peers)")
    ax_t.set_xlabel("seconds since every peer was training")
    ax_tok.set_ylabel("train loss (mean over the round's batches and peers)")
    finish_figure(fig, path, (ax_tok, ax_t), title)


# --- main -------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        base = load_profile(args.config)
    except ConfigError as e:
        print(f"bench.train: {e}", file=sys.stderr)
        return 2
    if (code := netns_preflight("bench.train")) is not None:
        return code
    make_parents(args.json, args.plot)
    n, h, steps = args.peers, args.inner_steps, args.outer_steps
    tokenizer, _, _ = corpus_split(base)  # trains and caches the tokenizer and token file before any peer needs them
    numel = parameter_count(base.model, tokenizer.vocab_size)  # θ's size from a meta build: no weights allocated
    wire_bytes = Codec(base.swarm.codec, base.swarm.block_size).size(numel)
    budget = n * steps * round_tokens(derive(base, "x", h, steps))
    print(f"train: {n} peers x {steps} outer steps x H={h} x B={base.train.batch_size} x {base.model.seq_len} = "
          f"{budget} tokens per setting; {base.profile} profile, {numel / 1e6:.1f}M parameters, {base.swarm.codec} "
          f"pseudo-gradients of {wire_bytes / 1e6:.1f} MB; {args.threads} thread(s) per peer on {os.cpu_count()} "
          f"cores; logs in {args.workdir}", flush=True)
    rows, alone = [], None
    try:
        for mbit in args.bandwidth:
            with Topology(n, mbit) as topo:
                topo.set_latency_ms(args.latency_ms)
                goodput = topo.probe_bandwidth_mbit(0, 1, max_s=1.5)
                print(f"\n{mbit:g} Mbit/s links (measured TCP goodput {goodput:.1f} Mbit/s), "
                      f"+{args.latency_ms:g} ms one way", flush=True)
                if alone is None:
                    alone = tokens_per_s_alone(topo, derive(base, "train-alone", h, 1), args,
                                               args.workdir)
                    print(f"one peer alone: {alone:.0f} tokens/s ({args.threads} thread(s))", flush=True)
                print(HEADER, flush=True)
                bound_s = 2 * (n - 1) / n * wire_bytes * 8 / (goodput * 1e6)
                for mode in args.overlap:
                    overlap = mode == "on"
                    tag = f"{mbit:g}mbit-overlap-{mode}"
                    cfg = derive(base, f"train-{tag}", h, steps, overlap=overlap)
                    before = [tx_bytes(topo, i) for i in range(n)]
                    metrics = run_peers(topo, cfg, n, steps, args, os.path.join(args.workdir, tag))
                    sent = statistics.mean(tx_bytes(topo, i) - b for i, b in enumerate(before))
                    row = {"peers": n, "bandwidth_mbit": mbit, "overlap": overlap, **measure(metrics, cfg, n),
                           "tokens_per_s_alone": round(alone, 1), "wire_tx_bytes_per_peer": int(sent),
                           "measured_goodput_mbit": round(goodput, 2), "latency_ms": args.latency_ms,
                           "allreduce_bound_s": round(bound_s, 3), "outer_steps": steps, "inner_steps": h,
                           "tokens": budget, "threads_per_peer": args.threads, "profile": args.config}
                    row["utilization_bound"] = round(utilization_bound(round_tokens(cfg) / alone, bound_s, steps,
                                                                       overlap), 4)
                    rows.append(row)
                    print(format_row(row), flush=True)
    except (BenchError, NetnsError, RuntimeError) as e:
        print(f"bench.train: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.train: interrupted; every namespace removed", file=sys.stderr)
        return 130
    finally:
        title = f"{base.profile} profile, N={n}, H={h}, {steps} outer steps, {budget / 1e6:.2f}M tokens per setting"
        write_results(rows, args.json, args.plot, lambda rows_, path: plot(rows_, path, title))
    print("\nAll settings (util: time in inner steps / wall after start-up; bound: at the bandwidth bound; "
          "ratio: tok/s / N x alone):")
    print(HEADER)
    for row in rows:
        print(format_row(row))
    print(f"wrote {args.json} and {args.plot}; peer logs in {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
