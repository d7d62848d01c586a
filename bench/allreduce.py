"""All-reduce over an emulated WAN: the swarm's averaging against torch.distributed gloo and stock hivemind.

    sudo python -m bench.allreduce [--peers 2,4] [--size-mb 100] [--bandwidth 100mbit] [--latency 0ms,50ms]
                                   [--codec int8,fp32] [--systems swarm,gloo,hivemind] [--rounds 3]
                                   [--json bench/results/allreduce.json] [--plot bench/results/allreduce.png]

One network namespace per peer on a bridge, every link shaped in both directions (bench/netns.py),
latency from a userspace delay line where the kernel lacks netem (bench/delayline.py). Before the
first setting it measures every link's bulk TCP goodput; before each setting, the TCP round-trip
time. Then, for each latency and peer count, the same peers run in turn (fresh processes each):
swarm.node.Node's averaging with each codec (matchmaking included), gloo's all_reduce of the fp32
tensor and hivemind's DecentralizedAverager without compression, ``--rounds`` times each.

The figure of merit (docs/architecture.md, "A round, end to end"): an all-reduce of S bytes (after
compression) among N peers on links of B bit/s needs at least 2(N-1)/N * S / B. B is the measured
goodput (TCP payload, so headers do not count against a system) and the efficiency is bound /
all-reduce time: matchmaking is timed apart and shown beside it, not hidden in it. Each round's time
is its slowest peer's; the row shows the median round. Bytes on the wire are each peer's eth0
transmit counter (headers and DHT traffic included), averaged over peers. B/param: the codec's bytes
per value on the wire (fp32: 4). Every result is checked: with int8 and fp32, value by value against the
known weighted mean of integer patterns (bench/allreduce_worker.py); with int4, which cannot be exact,
on Gaussian payloads, by identical bytes on every member and equality with the average recomputed offline
from the same messages (bench/offline_mean.py), and ``rel err`` is its distance from the exact mean,
relative to that mean's norm. A failed check shows in the last column.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import statistics
import subprocess
import sys
import time

from bench.allreduce_worker import OFFLINE_CHECKED
from bench.common import finish_figure, make_parents, netns_preflight, write_results
from bench.netns import NetnsError, Topology, netem_available, peer_addr
from bench.offline_mean import check_round

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 180.0  # importing torch and hivemind in 8 processes on 2 cores is slow
CHECK_TOLERANCE = 1e-3  # the expected values are integers times a dyadic mean: every system should be exact
_gloo_port = 29500


class BenchError(RuntimeError):
    """A worker failed or went silent; the message says which and ends with its log."""


# --- argument parsing -------------------------------------------------------------------------------

def _list(cast):
    return lambda text: [cast(part) for part in text.split(",") if part]


def _unit(suffix: str, what: str):
    def parse(text: str) -> float:
        match = re.fullmatch(r"\s*([0-9.]+)\s*" + suffix + r"?\s*", text)
        if not match:
            raise argparse.ArgumentTypeError(f"{what} must look like 100{suffix}, got {text!r}")
        return float(match.group(1))
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.allreduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=_list(int), default=[2, 4], help="peer counts, e.g. 2,4,8")
    parser.add_argument("--size-mb", type=float, default=100.0, help="fp32 vector size in MB (10^6 bytes)")
    parser.add_argument("--bandwidth", type=_unit("mbit", "--bandwidth"), default=100.0,
                        help="rate of every link, each direction (tbf), e.g. 100mbit")
    parser.add_argument("--latency", type=_list(_unit("ms", "--latency")), default=[0.0, 50.0],
                        help="added one-way latencies, e.g. 0ms,50ms")
    parser.add_argument("--codec", type=_list(str), default=["int8", "fp32"], help="swarm codecs: int8,int4,fp32")
    parser.add_argument("--systems", type=_list(str), default=["swarm", "gloo", "hivemind"])
    parser.add_argument("--rounds", type=int, default=3, help="timed all-reduces per system and setting")
    parser.add_argument("--hivemind-matchmaking-s", type=float, default=5.0,
                        help="hivemind's min_matchmaking_time (its default)")
    parser.add_argument("--trace-ms", type=float, default=0.0,
                        help="profiling: workers sample eth0's counters this often; every reply goes to the log dir")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="bound on any one worker step")
    parser.add_argument("--json", default="bench/results/allreduce.json", help="where to write the rows")
    parser.add_argument("--plot", default="bench/results/allreduce.png", help="where to draw them")
    parser.add_argument("--log-dir", default="bench/results/allreduce-logs", help="worker logs, one per peer and run")
    args = parser.parse_args(argv)
    bad = [c for c in args.codec if c not in ("int8", "int4", "fp32")] + [s for s in args.systems
                                                                  if s not in ("swarm", "gloo", "hivemind")]
    if bad or min(args.peers, default=0) < 2 or args.rounds < 1 or args.size_mb <= 0:
        parser.error(f"bad values: {', '.join(bad) or 'peers must be >= 2, rounds >= 1, size > 0'}")
    return args


# --- workers ----------------------------------------------------------------------------------------

class Workers:
    """The N worker processes of one system, one per namespace, driven in lockstep over JSON lines."""

    def __init__(self, topo: Topology, log_dir: str, label: str):
        self.topo, self.log_dir, self.label = topo, log_dir, label
        self.procs: list[subprocess.Popen] = []
        self._buffers: dict[int, bytes] = {}

    def start(self, rank: int, argv: list[str]) -> None:
        log = open(self.log_path(rank), "w")
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.procs.append(self.topo.popen(rank, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=log, cwd=ROOT, env=env))
        log.close()
        self._buffers[rank] = b""

    def log_path(self, rank: int) -> str:
        return os.path.join(self.log_dir, f"{self.label}-rank{rank}.log")

    def ask(self, command: dict | None, timeout_s: float, ranks: list[int] | None = None) -> list[dict]:
        """Send ``command`` (None: nothing, just read) to ``ranks`` and return their next replies in order."""
        ranks = list(range(len(self.procs))) if ranks is None else ranks
        if command is not None:
            for rank in ranks:
                try:
                    self.procs[rank].stdin.write((json.dumps(command) + "\n").encode())
                    self.procs[rank].stdin.flush()
                except OSError:
                    self._fail(rank, "exited")
        replies = self._read(ranks, time.monotonic() + timeout_s)
        for rank, reply in zip(ranks, replies):
            if "error" in reply:
                self._fail(rank, reply["error"])
        return replies

    def _read(self, ranks: list[int], deadline: float) -> list[dict]:
        replies: dict[int, dict] = {}
        with selectors.DefaultSelector() as selector:
            for rank in ranks:
                selector.register(self.procs[rank].stdout, selectors.EVENT_READ, rank)
            while len(replies) < len(ranks):
                for rank in ranks:
                    if rank not in replies and b"\n" in self._buffers[rank]:
                        line, self._buffers[rank] = self._buffers[rank].split(b"\n", 1)
                        replies[rank] = json.loads(line)
                        selector.unregister(self.procs[rank].stdout)
                pending = [r for r in ranks if r not in replies]
                if not pending:
                    break
                if time.monotonic() > deadline:
                    self._fail(pending[0], "no reply in time")
                for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                    chunk = os.read(key.fileobj.fileno(), 1 << 16)
                    if not chunk:
                        self._fail(key.data, "exited")
                    self._buffers[key.data] += chunk
        return [replies[r] for r in ranks]

    def _fail(self, rank: int, what: str) -> None:
        tail = open(self.log_path(rank)).read()[-1500:]
        raise BenchError(f"{self.label} rank {rank}: {what}\n--- {self.log_path(rank)} (tail) ---\n{tail}")

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.write(b'{"cmd": "quit"}\n')
                proc.stdin.flush()
            except OSError:
                pass
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.topo.stop(proc)


def run_system(topo: Topology, system: str, peers: int, numel: int, codec: str, rounds: int, args,
               log_dir: str, label: str, weights: list[float] | None = None) -> list[list[dict]]:
    """Start ``peers`` workers of ``system``, run ``rounds`` all-reduces in lockstep, stop them.

    Peer i contributes (i + 1) * pattern with weight weights[i] (default 1): the expected result is
    the weighted mean of the multipliers (gloo sums instead). Returns replies[round][rank].
    """
    global _gloo_port
    weights = weights or [1.0] * peers
    multipliers = [i + 1.0 for i in range(peers)]
    expect = sum(multipliers) if system == "gloo" else sum(w * m for w, m in zip(weights, multipliers)) / sum(weights)
    workers = Workers(topo, log_dir, label)
    _gloo_port += 1

    def argv(rank: int) -> list[str]:
        return [sys.executable, "-m", "bench.allreduce_worker", "--system", system, "--rank", str(rank),
                "--peers", str(peers), "--addr", peer_addr(rank), "--numel", str(numel), "--codec", codec,
                "--weight", str(weights[rank]), "--expect", repr(expect), "--run-id", label.replace("/", "-"),
                "--timeout-s", str(args.timeout_s), "--hivemind-matchmaking-s", str(args.hivemind_matchmaking_s),
                "--trace-ms", str(args.trace_ms),
                "--threads", str(max(1, (os.cpu_count() or 1) // peers)), "--master", f"{peer_addr(0)}:{_gloo_port}"]

    try:
        for rank in range(peers):  # imports run in parallel
            workers.start(rank, argv(rank))
        workers.ask(None, START_TIMEOUT_S)
        if system == "gloo":
            workers.ask({"cmd": "start", "initial_peers": []}, START_TIMEOUT_S)
        else:  # one at a time, each dialing every earlier peer (see bench/allreduce_worker.py)
            known: list[str] = []
            for rank in range(peers):
                (reply,) = workers.ask({"cmd": "start", "initial_peers": known}, START_TIMEOUT_S, ranks=[rank])
                known.append(next(m for m in reply["maddrs"] if f"/{peer_addr(rank)}/" in m))
        workers.ask({"cmd": "sync"}, START_TIMEOUT_S)
        results = []
        for k in range(1, rounds + 1):
            workers.ask({"cmd": "prepare", "k": k}, 60)
            results.append(workers.ask({"cmd": "run", "k": k}, args.timeout_s + 60))
        return results
    finally:
        workers.close()


# --- results ----------------------------------------------------------------------------------------

def payload_bytes(numel: int, codec: str) -> int:
    """S: bytes of the vector on the wire after compression (gloo and hivemind: fp32)."""
    from bench.allreduce_worker import swarm_config
    from swarm.averaging import Codec

    return Codec(codec, swarm_config(codec).block_size).size(numel)


def summarize(results: list[list[dict]], system: str, codec: str, peers: int, numel: int, size_mb: float,
              latency_ms: float, rtt_ms: float, bandwidth_mbit: float, set_mbit: float) -> dict:
    seconds = [max(r["allreduce_s"] for r in rnd) for rnd in results]
    matchmaking = [max(r["matchmaking_s"] for r in rnd) for rnd in results if rnd[0]["matchmaking_s"] is not None]
    groups = [min(r["group_size"] for r in rnd) for rnd in results]
    problems = sorted({f"rank {i}: {r['step_error']}" for rnd in results for i, r in enumerate(rnd)
                       if r.get("step_error")})
    errors = [r["max_abs_err"] for rnd in results for r in rnd if r["max_abs_err"] is not None]
    digests = [{r["result_sha256"] for r in rnd} for rnd in results]
    if errors and max(errors) > CHECK_TOLERANCE:
        problems.append(f"result off by up to {max(errors):.3g}")
    offline = [check_round(rnd, numel, codec) for rnd in results] if codec in OFFLINE_CHECKED else []
    if not all(o["offline_match"] for o in offline):
        problems.append("result differs from the offline mean of the same messages")
    if system != "hivemind" and any(len(d) > 1 for d in digests):
        problems.append("peers ended with different bytes")
    if any(g < peers for g in groups):
        problems.append(f"partial groups {groups}")
    s_bytes = payload_bytes(numel, codec)
    bound_s = 2 * (peers - 1) / peers * s_bytes * 8 / (bandwidth_mbit * 1e6)
    median_s = statistics.median(seconds)
    return dict(
        peers=peers, size_mb=size_mb, codec=codec, system=system, bandwidth_mbit=round(bandwidth_mbit, 2),
        rtt_ms=round(rtt_ms, 2), seconds_median=round(median_s, 3),
        bytes_per_peer=int(statistics.median(statistics.mean(r["tx_bytes"] for r in rnd) for rnd in results)),
        bound_s=round(bound_s, 3), efficiency=round(bound_s / median_s, 3),
        matchmaking_s_median=round(statistics.median(matchmaking), 3) if matchmaking else None,
        seconds_all=[round(s, 3) for s in seconds], group_sizes=groups, payload_bytes=s_bytes,
        latency_set_ms=latency_ms, bandwidth_set_mbit=set_mbit, check="ok" if not problems else "; ".join(problems),
        wire_bytes_per_param=round(s_bytes / numel, 4),
        rel_err=round(max(o["rel_err"] for o in offline), 5) if offline else None,
    )


HEADER = (f"{'setting':<30} {'system':<9} {'codec':<5} {'B/param':>7} {'all-reduce s':>12} {'matchmk s':>9} "
          f"{'MB sent/peer':>12} {'bound s':>8} {'eff (all-reduce)':>16} {'rel err':>7}  check")


def format_row(row: dict) -> str:
    setting = f"N={row['peers']} {row['size_mb']:g}MB {row['bandwidth_mbit']:.1f}Mbit rtt {row['rtt_ms']:.1f}ms"
    mm = "-" if row["matchmaking_s_median"] is None else f"{row['matchmaking_s_median']:.2f}"
    err = "-" if row["rel_err"] is None else f"{row['rel_err']:.4f}"
    return (f"{setting:<30} {row['system']:<9} {row['codec']:<5} {row['wire_bytes_per_param']:>7.3f} "
            f"{row['seconds_median']:>12.2f} {mm:>9} {row['bytes_per_peer'] / 1e6:>12.1f} {row['bound_s']:>8.2f} "
            f"{row['efficiency']:>16.3f} {err:>7}  {row['check']}")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["latency_set_ms"], r["peers"]) for r in rows})
    series = sorted({(r["system"], r["codec"]) for r in rows}, key=lambda s: (s[0] != "swarm", s))
    width = 0.8 / len(series)
    fig, (ax_t, ax_e) = plt.subplots(2, 1, figsize=(max(6, 2.2 * len(settings)), 7), sharex=True)
    for k, (system, codec) in enumerate(series):
        xs, secs, bounds, effs = [], [], [], []
        for x, (lat, n) in enumerate(settings):
            match = [r for r in rows if (r["latency_set_ms"], r["peers"], r["system"], r["codec"]) == (lat, n, system, codec)]
            if match:
                xs.append(x + (k - (len(series) - 1) / 2) * width)
                secs.append(match[0]["seconds_median"])
                bounds.append(match[0]["bound_s"])
                effs.append(match[0]["efficiency"])
        bars = ax_t.bar(xs, secs, width, label=f"{system} {codec}")
        ax_t.scatter(xs, bounds, marker="_", s=300, color="black", zorder=3,
                     label="bound 2(N-1)/N·S/B" if k == 0 else None)
        ax_e.bar(xs, effs, width, color=bars.patches[0].get_facecolor())
    labels = [f"N={n}\n+{lat:g} ms one way" for lat, n in settings]
    ax_e.set_xticks(range(len(settings)), labels)
    ax_t.set_ylabel("all-reduce time, s (median)")
    ax_e.set_ylabel("efficiency = bound / time")
    ax_e.axhline(1.0, color="gray", lw=0.8)
    ax_t.set_title(f"{rows[0]['size_mb']:g} MB fp32 vector, {rows[0]['bandwidth_set_mbit']:g} Mbit/s links")
    finish_figure(fig, path, (ax_t,))


# --- main -------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if (code := netns_preflight("bench.allreduce")) is not None:
        return code
    numel = int(args.size_mb * 1e6) // 4
    make_parents(args.json, args.plot)
    log_dir = args.log_dir
    os.makedirs(log_dir, exist_ok=True)
    rows: list[dict] = []
    try:
        print(f"netem: {'available' if netem_available() else 'missing, latency from bench/delayline.py'}")
        size = max(args.peers)
        with Topology(size, args.bandwidth) as topo:
            links = {(i, (i + 1) % size): topo.probe_bandwidth_mbit(i, (i + 1) % size) for i in range(size)}
            print("bulk TCP goodput, Mbit/s (set " + f"{args.bandwidth:g}): "
                  + ", ".join(f"{a}->{b} {mbit:.1f}" for (a, b), mbit in links.items()))
            bandwidth_mbit = statistics.median(links.values())
            for latency_ms in args.latency:
                topo.set_latency_ms(latency_ms)
                for peers in args.peers:
                    rtt_ms = statistics.median(topo.probe_rtt_ms(i, (i + 1) % peers) for i in range(peers))
                    print(f"\nN={peers}, +{latency_ms:g} ms one way: measured TCP RTT {rtt_ms:.1f} ms")
                    print(HEADER)
                    for system in args.systems:
                        for codec in (args.codec if system == "swarm" else ["fp32"]):
                            label = f"n{peers}-lat{latency_ms:g}-{system}-{codec}"
                            results = run_system(topo, system, peers, numel, codec, args.rounds, args, log_dir, label)
                            if args.trace_ms > 0:
                                with open(os.path.join(log_dir, f"{label}-replies.json"), "w") as f:
                                    json.dump(results, f)
                            row = summarize(results, system, codec, peers, numel, args.size_mb, latency_ms, rtt_ms,
                                            bandwidth_mbit, args.bandwidth)
                            rows.append(row)
                            print(format_row(row), flush=True)
            delay_stats = topo.delay_stats
    except (BenchError, NetnsError) as e:
        print(f"bench.allreduce: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.allreduce: interrupted; every namespace removed", file=sys.stderr)
        return 130
    finally:
        write_results(rows, args.json, args.plot, plot)
    print("\nAll settings (efficiency = bound / all-reduce time; matchmaking timed apart):")
    print(HEADER)
    for row in rows:
        print(format_row(row))
    for stats in delay_stats:
        print(f"delay line +{stats['delay_ms']:g} ms: {stats['packets']} packets, {stats['bytes'] / 1e9:.2f} GB, "
              f"{stats['dropped']} dropped, {stats['late_over_2ms']} late by > 2 ms (max {stats['max_late_ms']:.1f} ms)")
    print(f"wrote {args.json} and {args.plot}; worker logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
