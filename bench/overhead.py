"""``python -m bench.overhead``: what ``swarm.DiLoCo`` costs a training loop, in tokens/s and memory.

    python -m bench.overhead [--config llama-20m] [--batch-size 4] [--inner-steps 6] [--outer-steps 4]
                             [--warmup 2] [--runs 3] [--threads T] [--modes plain,api,api-2peers]
                             [--json bench/results/overhead.json] [--plot bench/results/overhead.png]
    python -m bench.overhead --smoke     # llama-tiny, one run of each mode, tiny H: a check that it all works

The profile's model (built by ``swarm.architectures.build_model``, embedded corpus through ``swarm.data``)
trains outer steps x H inner steps of the same batch three ways, each in a fresh process
(bench/overhead_worker.py), the modes taking turns run after run so drift on a shared machine hits all alike:

- ``plain``: the CLI's inner loop (``swarm.inner``: make_optimizer, make_scheduler, inner_step), no swarm;
- ``api``: the same loop through ``swarm.DiLoCo`` with one peer on 127.0.0.1: every round averages alone;
- ``api-2peers``: two such processes on 127.0.0.1 in one run (round 1 waits for both).

Throughput, over the steps after the first ``--warmup`` of each process:
- ``tokens/s``: the whole loop, outer steps included (api-2peers: both peers' tokens/s summed);
- ``inner tok/s``: the loop without the ``dl.step`` calls that ended a round (the outer step: Δ, the
  average, the outer Nesterov step, the model hash); every other ``dl.step`` call, and whatever the
  swarm's threads and processes take from the inner steps, counts. The API target applies to it.
Memory: the peak over the process's whole life of the PSS summed over the peer's process tree (the
Python process, hivemind's DHT process, p2pd), sampled every ``--sample-s`` by a thread of this
process, which does nothing else meanwhile. PSS splits pages shared with the DHT process (forked after
torch is loaded) between the two, so nothing is counted twice. api-2peers: the larger peer's peak.
Reading PSS walks every page of every process in the tree, and that CPU comes out of the loop being
measured, the more so for the larger tree of the api modes: sampling every 0.1 s cut plain's tokens/s
from 1018 to 852 on 2 cores (llama-20m), while every 1.0 s (the default) changed the api's peak by
12 MB of 1848, since an outer step's buffers live for the whole round.

Threads: ``--threads`` (default: every core) torch threads in total in every mode: plain and api run one
process with all of them, api-2peers two processes with half each, so no mode oversubscribes the cores
(two peers of 2 threads each on 2 cores run several times slower than one: OpenMP's threads wait on each
other's time slices).

Targets, api against plain: inner tok/s at least 97% of plain's, and extra peak memory at most 3.5 x the
fp32 parameter bytes + 400 MB. api-2peers has no target: its two peers share the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import psutil

from bench.common import make_parents, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("plain", "api", "api-2peers")
INNER_TARGET = 0.97  # api inner-only tokens/s against plain's
MIN_QUIET_STEPS = 10  # quiet steps a mode needs before the target is judged on quiet steps only
MEM_PARAM_FACTOR, MEM_FIXED_MB = 3.5, 400.0  # api extra peak memory allowed: 3.5 x fp32 parameter bytes + 400 MB
MB = 1e6


class BenchError(RuntimeError):
    """A worker failed or went silent; the message says where its log is."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama-20m", help="profile: a built-in name or a TOML file")
    p.add_argument("--batch-size", type=int, help="sequences per inner step (default 4; --smoke: the profile's)")
    p.add_argument("--inner-steps", type=int, help="H (default 6; --smoke: 2)")
    p.add_argument("--outer-steps", type=int, help="rounds per run: each run takes outer steps x H inner steps "
                                                   "(default 4; --smoke: 2)")
    p.add_argument("--warmup", type=int, help="first inner steps of each process left out of the timing "
                                              "(default 2; --smoke: 1)")
    p.add_argument("--runs", type=int, help="fresh processes per mode (default 3; --smoke: 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads in total per mode (api-2peers: half per peer); default: every core")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, from plain,api,api-2peers")
    p.add_argument("--quiet-cores", type=float, default=0.1,
                   help="a step is quiet if other processes used at most this many cores during it")
    p.add_argument("--sample-s", type=float, default=1.0, help="PSS sampling period (module docstring: its cost)")
    p.add_argument("--timeout-s", type=float, default=900.0, help="bound on each run")
    p.add_argument("--start-timeout-s", type=float, default=180.0, help="bound on a peer's start-up")
    p.add_argument("--smoke", action="store_true", help="llama-tiny, one run each, H=2, 2 outer steps")
    p.add_argument("--workdir", default="bench/results/overhead-logs", help="worker logs and results")
    p.add_argument("--json", default="bench/results/overhead.json")
    p.add_argument("--plot", default="bench/results/overhead.png")
    args = p.parse_args(argv)
    smoke = args.smoke
    if smoke and args.config == "llama-20m":
        args.config = "llama-tiny"
    for name, full, quick in (("inner_steps", 6, 2), ("outer_steps", 4, 2), ("warmup", 2, 1), ("runs", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if smoke else full)
    if args.batch_size is None and not smoke:
        args.batch_size = 4
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or not set(args.modes) <= set(MODES):
        p.error(f"--modes: choose from {','.join(MODES)}")
    if min(args.inner_steps, args.outer_steps, args.runs, args.threads) < 1 or args.warmup < 0 \
            or (args.batch_size is not None and args.batch_size < 1):
        p.error("steps, runs, threads and batch size must be positive, warmup at least 0")
    if args.warmup >= args.inner_steps * args.outer_steps:
        p.error("--warmup leaves no step to time: raise --outer-steps or --inner-steps")
    return args


# --- memory ---------------------------------------------------------------------------------------------

class TreeSampler:
    """A thread that samples the PSS of each tracked process tree (a root and all its descendants) every
    ``period_s``: per tree its peak sum and the peak of each kind of process, and the peak of all trees together."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self.roots: list[int] = []
        self.peak: dict[int, float] = {}  # root pid -> peak of the tree's summed PSS, bytes
        self.peak_by_kind: dict[int, dict[str, float]] = {}
        self.peak_total = 0.0
        self.samples = 0
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[int, float] = {}  # pid -> the CPU seconds it had used at its last sample
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)

    def track(self, pid: int) -> None:
        with self._lock:
            self.roots.append(pid)
            self.peak[pid] = 0.0
            self.peak_by_kind[pid] = {}

    def __enter__(self) -> "TreeSampler":
        self._t0, self._busy0, self._own0 = time.monotonic(), _busy_s(), _own_cpu_s()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.wall_s = time.monotonic() - self._t0
        self.own_cpu_s = _own_cpu_s() - self._own0
        # every core-second the machine spent (or its hypervisor stole) beyond the trees' and this process's
        self.others_cpu_s = max(0.0, _busy_s() - self._busy0 - sum(self._cpu.values()) - self.own_cpu_s)

    def _process(self, pid: int) -> psutil.Process:
        proc = self._procs.get(pid)
        if proc is None:
            proc = self._procs[pid] = psutil.Process(pid)
        return proc

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period_s)

    def sample(self) -> None:
        with self._lock:
            roots = list(self.roots)
        total = 0.0
        for root in roots:
            try:
                top = self._process(root)
                tree = [top] + top.children(recursive=True)
            except psutil.Error:
                continue
            tree_sum, kinds = 0.0, {}
            for proc in tree:
                try:
                    pss = proc.memory_full_info().pss
                    kind = "main" if proc.pid == root else proc.name()
                    cpu = proc.cpu_times()
                    self._cpu[proc.pid] = cpu.user + cpu.system
                except psutil.Error:  # it exited between the listing and the read
                    continue
                tree_sum += pss
                kinds[kind] = kinds.get(kind, 0.0) + pss
            total += tree_sum
            self.peak[root] = max(self.peak[root], tree_sum)
            for kind, pss in kinds.items():
                self.peak_by_kind[root][kind] = max(self.peak_by_kind[root].get(kind, 0.0), pss)
        self.peak_total = max(self.peak_total, total)
        self.samples += 1


def _busy_s() -> float:
    """Core-seconds the machine has been busy (steal included: time the hypervisor gave our cores to others)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


def _own_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


# --- workers --------------------------------------------------------------------------------------------

def worker_argv(args: argparse.Namespace, mode: str, out: str, threads: int, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "bench.overhead_worker", "--mode", mode, "--config", args.config, "--out", out,
            "--inner-steps", str(args.inner_steps), "--outer-steps", str(args.outer_steps),
            "--warmup", str(args.warmup), "--threads", str(threads), "--start-timeout-s", str(args.start_timeout_s),
            "--quiet-cores", str(args.quiet_cores)]
    if args.batch_size:
        argv += ["--batch-size", str(args.batch_size)]
    return argv + list(extra)


def start(argv: list[str], log_path: str, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "w") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """End the worker's session: the worker if it still runs (politely first), then whatever of it is left
    (its DHT process, p2pd)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def wait_all(procs: list[subprocess.Popen], logs: list[str], deadline: float) -> None:
    while True:
        codes = [p.poll() for p in procs]
        for code, log in zip(codes, logs):
            if code not in (None, 0):
                raise BenchError(f"a worker exited with code {code}:\n{tail(log)}\n(log: {log})")
        if all(code == 0 for code in codes):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"workers still running at the deadline; logs: {', '.join(logs)}")
        time.sleep(0.2)


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return ""


def read_result(path: str, log: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise BenchError(f"no result in {path} ({e}); log: {log}") from None


def run_mode(args: argparse.Namespace, mode: str, rep: int) -> dict:
    """One fresh run of ``mode``: its workers' results and its peak memory."""
    tag = f"{mode}-{rep}"
    paths = {kind: os.path.join(args.workdir, f"{tag}{kind}") for kind in (".json", ".log", "-1.json", "-1.log",
                                                                            ".addr", ".jsonl", "-1.jsonl")}
    for path in paths.values():
        if os.path.exists(path):
            os.unlink(path)
    run_id = f"overhead-{mode}-{rep}-{os.getpid()}"
    procs: list[subprocess.Popen] = []
    with TreeSampler(args.sample_s) as sampler:
        try:
            deadline = time.monotonic() + args.timeout_s
            if mode == "plain":
                procs.append(start(worker_argv(args, "plain", paths[".json"], args.threads), paths[".log"],
                                   args.threads))
                sampler.track(procs[0].pid)
                wait_all(procs, [paths[".log"]], deadline)
                results = [read_result(paths[".json"], paths[".log"])]
            elif mode == "api":
                procs.append(start(worker_argv(args, "api", paths[".json"], args.threads, "--run-id", run_id,
                                               "--metrics-file", paths[".jsonl"]), paths[".log"], args.threads))
                sampler.track(procs[0].pid)
                wait_all(procs, [paths[".log"]], deadline)
                results = [read_result(paths[".json"], paths[".log"])]
            else:
                threads = max(1, args.threads // 2)
                procs.append(start(worker_argv(args, "api", paths[".json"], threads, "--run-id", run_id,
                                               "--peers", "2", "--address-file", paths[".addr"],
                                               "--metrics-file", paths[".jsonl"]), paths[".log"], threads))
                sampler.track(procs[0].pid)
                address = wait_for_address(procs[0], paths[".addr"], paths[".log"],
                                           time.monotonic() + args.start_timeout_s)
                procs.append(start(worker_argv(args, "api", paths["-1.json"], threads, "--run-id", run_id,
                                               "--rank", "1", "--initial-peers", address,
                                               "--metrics-file", paths["-1.jsonl"]), paths["-1.log"], threads))
                sampler.track(procs[1].pid)
                wait_all(procs, [paths[".log"], paths["-1.log"]], deadline)
                results = [read_result(paths[".json"], paths[".log"]), read_result(paths["-1.json"], paths["-1.log"])]
        finally:
            for proc in procs:
                stop(proc)
    groups = [e.get("group_size", 0) for path in (paths[".jsonl"], paths["-1.jsonl"]) for e in read_events(path)
              if e.get("event") == "outer"]
    top = max((p.pid for p in procs), key=lambda pid: sampler.peak[pid])  # api-2peers: the larger peer
    return {"results": results, "peak_mem_mb": sampler.peak[top] / MB, "peak_mem_mb_all": sampler.peak_total / MB,
            "peak_mem_mb_by_process": {k: round(v / MB, 1) for k, v in sampler.peak_by_kind[top].items()},
            "group_sizes": groups, "pss_samples": sampler.samples,
            "others_cores": sampler.others_cpu_s / sampler.wall_s,
            "sampler_cores": sampler.own_cpu_s / sampler.wall_s, "wall_s": sampler.wall_s}


def read_events(path: str) -> list[dict]:
    """A peer's metrics events (none if it wrote no file)."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def wait_for_address(proc: subprocess.Popen, path: str, log: str, deadline: float) -> str:
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()
        if proc.poll() is not None:
            raise BenchError(f"peer 0 exited with code {proc.returncode} before it started the run:\n{tail(log)}")
        time.sleep(0.2)
    raise BenchError(f"peer 0 did not start the run within the start-up bound; log: {log}")


# --- summary --------------------------------------------------------------------------------------------

def stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "runs": values}


def summarize(mode: str, runs: list[dict], args: argparse.Namespace) -> dict:
    """A JSON row of one mode from its runs; api-2peers' tokens/s is both peers' summed."""
    def tps(key: str) -> list[float]:
        return [sum(r[key] for r in run["results"]) for run in runs]

    first = runs[0]["results"][0]
    whole, inner, compute = stats(tps("tokens_per_s")), stats(tps("inner_tokens_per_s")), \
        stats(tps("compute_tokens_per_s"))
    mem = stats([run["peak_mem_mb"] for run in runs])
    outer = [s for run in runs for r in run["results"] for s in r["outer_s"]]
    after = [r["after_outer_extra_s"] for run in runs for r in run["results"]
             if r.get("after_outer_extra_s") is not None]
    api_ms = [r["api_step_ms"] for run in runs for r in run["results"]]
    return {**quiet_fields(mode, runs), 
        "mode": mode, "tokens_per_s": round(whole["mean"], 2), "tokens_per_s_stdev": round(whole["stdev"], 2),
        "tokens_per_s_runs": [round(v, 2) for v in whole["runs"]],
        "inner_tokens_per_s": round(inner["mean"], 2), "inner_tokens_per_s_stdev": round(inner["stdev"], 2),
        "inner_tokens_per_s_runs": [round(v, 2) for v in inner["runs"]],
        "compute_tokens_per_s": round(compute["mean"], 2),
        "peak_mem_mb": round(mem["mean"], 1), "peak_mem_mb_stdev": round(mem["stdev"], 1),
        "peak_mem_mb_runs": [round(v, 1) for v in mem["runs"]],
        "peak_mem_mb_all_peers": round(statistics.mean(run["peak_mem_mb_all"] for run in runs), 1),
        "peak_mem_mb_by_process": runs[-1]["peak_mem_mb_by_process"],
        "param_bytes": first["param_bytes"], "numel": first["numel"],
        "outer_step_s_mean": round(statistics.mean(outer), 3) if outer else None,
        "dl_step_ms_mean": round(statistics.mean(api_ms), 3) if mode != "plain" else None,
        "after_outer_extra_s": round(statistics.mean(after), 3) if after else None,
        "median_step_s": round(statistics.mean(r["median_step_s"] for run in runs for r in run["results"]), 4),
        "others_cores": round(statistics.mean(run["others_cores"] for run in runs), 3),
        "sampler_cores": round(statistics.mean(run["sampler_cores"] for run in runs), 3),
        "outer_steps_applied": min(r.get("outer_steps_applied", 0) for run in runs for r in run["results"])
        if mode != "plain" else None,
        "max_group_size": max((g for run in runs for g in run["group_sizes"]), default=None),
        "runs": len(runs), "peers": len(runs[0]["results"]), "threads_per_peer": first["threads"],
        "steps": first["steps"], "timed_steps": first["timed_steps"], "warmup_steps": first["warmup_steps"],
        "inner_steps": first["inner_steps"], "outer_steps": args.outer_steps, "batch_size": first["batch_size"],
        "seq_len": first["seq_len"], "profile": first["profile"],
    }


def quiet_fields(mode: str, runs: list[dict]) -> dict:
    """Throughput over the quiet steps only (other processes used at most ``quiet_cores`` meanwhile), pooled over
    the runs: what the numbers would be on a machine of our own. Not for api-2peers, whose peers are each other's
    'other processes'."""
    none = {"quiet_tokens_per_s": None, "quiet_inner_tokens_per_s": None, "quiet_inner_tokens_per_s_runs": [],
            "quiet_steps": 0, "quiet_cores": runs[0]["results"][0]["quiet_cores"]}
    if len(runs[0]["results"]) != 1:
        return none
    quiet = [run["results"][0]["quiet"] for run in runs]
    used = [q for q in quiet if q["timed_steps"] > 0]
    if not used:
        return none
    tokens = sum(q["tokens"] for q in used)
    return {**none,
            "quiet_tokens_per_s": round(tokens / sum(q["tokens"] / q["tokens_per_s"] for q in used), 2),
            "quiet_inner_tokens_per_s": round(tokens / sum(q["tokens"] / q["inner_tokens_per_s"] for q in used), 2),
            "quiet_inner_tokens_per_s_runs": [round(q["inner_tokens_per_s"], 2) for q in used],
            "quiet_steps": sum(q["timed_steps"] for q in used)}


def targets(rows: dict[str, dict]) -> list[dict]:
    """The api rows' checks against plain (none unless both ran)."""
    if "plain" not in rows or "api" not in rows:
        return []
    plain, api = rows["plain"], rows["api"]
    # on the quiet steps when both modes have enough of them (a fifth of their timed steps), else on all
    enough = all(r["quiet_steps"] >= max(MIN_QUIET_STEPS, r["timed_steps"] * r["runs"] / 5) for r in (plain, api))
    key = "quiet_inner_tokens_per_s" if enough else "inner_tokens_per_s"
    basis = (f"quiet steps only: {api['quiet_steps']} of api's, {plain['quiet_steps']} of plain's "
             f"{api['timed_steps'] * api['runs']}") if enough else "all steps: too few were quiet"
    ratio = api[key] / plain[key]
    extra = api["peak_mem_mb"] - plain["peak_mem_mb"]
    allowed = MEM_PARAM_FACTOR * api["param_bytes"] / MB + MEM_FIXED_MB
    return [
        {"target": "inner_tokens_per_s", "passed": ratio >= INNER_TARGET, "value": round(ratio, 4),
         "bound": INNER_TARGET, "basis": key,
         "line": f"api inner-only tokens/s {api[key]:.1f} = {100 * ratio:.1f}% of plain's {plain[key]:.1f} "
                 f"(at least {100 * INNER_TARGET:.0f}%; {basis})"},
        {"target": "extra_peak_mem_mb", "passed": extra <= allowed, "value": round(extra, 1),
         "bound": round(allowed, 1),
         "line": f"api extra peak memory {extra:.0f} MB (api {api['peak_mem_mb']:.0f} - plain "
                 f"{plain['peak_mem_mb']:.0f}) <= {MEM_PARAM_FACTOR:g} x {api['param_bytes'] / MB:.1f} MB "
                 f"parameters + {MEM_FIXED_MB:.0f} MB = {allowed:.0f} MB"},
    ]


def format_table(rows: list[dict]) -> str:
    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [f"{'mode':<11} {'tokens/s':>16} {'inner tok/s':>16} {'peak MB':>12} {'quiet inner':>16} "
             f"{'compute tok/s':>13} {'step s':>6} {'outer s':>7} {'dl.step ms':>10} {'after outer':>11} "
             f"{'others':>6}"]
    for r in rows:
        lines.append(f"{r['mode']:<11} {r['tokens_per_s']:>8.1f} ± {r['tokens_per_s_stdev']:<5.1f} "
                     f"{r['inner_tokens_per_s']:>8.1f} ± {r['inner_tokens_per_s_stdev']:<5.1f} "
                     f"{r['peak_mem_mb']:>6.0f} ± {r['peak_mem_mb_stdev']:<3.0f} "
                     f"{num(r['quiet_inner_tokens_per_s'], '.1f'):>8} ({r['quiet_steps']:>3} st) "
                     f"{r['compute_tokens_per_s']:>13.1f} "
                     f"{r['median_step_s']:>6.3f} {num(r['outer_step_s_mean'], '.3f'):>7} "
                     f"{num(r['dl_step_ms_mean'], '.3f'):>10} {num(r['after_outer_extra_s'], '+.3f'):>11} "
                     f"{r['others_cores']:>6.2f}")
    lines.append("peak PSS by process (MB, each process's own peak, last run): " + "; ".join(
        f"{r['mode']}: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["peak_mem_mb_by_process"].items(),
                                                                      key=lambda kv: -kv[1])) for r in rows))
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import finish_figure

    modes = [r["mode"] for r in rows]
    xs = range(len(rows))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.38
    ax_t.bar([x - width / 2 for x in xs], [r["tokens_per_s"] for r in rows], width,
             yerr=[r["tokens_per_s_stdev"] for r in rows], capsize=4, label="whole loop")
    ax_t.bar([x + width / 2 for x in xs], [r["inner_tokens_per_s"] for r in rows], width,
             yerr=[r["inner_tokens_per_s_stdev"] for r in rows], capsize=4, label="outer steps excluded")
    ax_t.set_xticks(list(xs), modes)
    ax_t.set_ylabel("tokens/s (api-2peers: both peers)")
    ax_m.bar(list(xs), [r["peak_mem_mb"] for r in rows], 0.6, yerr=[r["peak_mem_mb_stdev"] for r in rows],
             capsize=4, label="peak PSS of a peer's processes")
    if "plain" in modes:
        plain = rows[modes.index("plain")]
        bound = plain["peak_mem_mb"] + MEM_PARAM_FACTOR * plain["param_bytes"] / MB + MEM_FIXED_MB
        ax_m.axhline(bound, color="red", linestyle="--", label="api target: plain + 3.5 x params + 400 MB")
    ax_m.set_xticks(list(xs), modes)
    ax_m.set_ylabel("MB")
    finish_figure(fig, path, (ax_t, ax_m), title)


# --- main -----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    make_parents(args.json, args.plot)
    try:
        prep_out, prep_log = os.path.join(args.workdir, "prepare.json"), os.path.join(args.workdir, "prepare.log")
        proc = start(worker_argv(args, "prepare", prep_out, args.threads), prep_log, args.threads)
        try:
            wait_all([proc], [prep_log], time.monotonic() + args.timeout_s)
        finally:
            stop(proc)
        info = read_result(prep_out, prep_log)
        batch = args.batch_size or info["batch_size"]
        total = args.inner_steps * args.outer_steps
        print(f"overhead: {info['profile']} profile, {info['numel'] / 1e6:.2f}M parameters "
              f"({info['param_bytes'] / MB:.1f} MB fp32), batch {batch} x {info['seq_len']} tokens, "
              f"H={args.inner_steps} x {args.outer_steps} outer steps = {total} inner steps a process "
              f"({args.warmup} warm-up steps not timed), {args.runs} run(s) per mode, {args.threads} torch "
              f"thread(s) per mode (api-2peers: {max(1, args.threads // 2)} per peer) on {os.cpu_count()} "
              f"cores; logs in {args.workdir}", flush=True)
        runs: dict[str, list[dict]] = {m: [] for m in args.modes}
        for rep in range(args.runs):
            for mode in args.modes:
                run = run_mode(args, mode, rep)
                runs[mode].append(run)
                tps = sum(r["tokens_per_s"] for r in run["results"])
                inner = sum(r["inner_tokens_per_s"] for r in run["results"])
                print(f"  run {rep + 1}/{args.runs} {mode:<11} {tps:8.1f} tokens/s, inner {inner:8.1f}, "
                      f"peak {run['peak_mem_mb']:.0f} MB ({run['pss_samples']} PSS samples); other processes "
                      f"used {run['others_cores']:.2f} cores meanwhile", flush=True)
    except BenchError as e:
        print(f"bench.overhead: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.overhead: interrupted", file=sys.stderr)
        return 130
    rows = [summarize(mode, runs[mode], args) for mode in args.modes]
    checks = targets({r["mode"]: r for r in rows})
    for row in rows:
        if row["mode"] == "api":
            row["targets"] = [{k: v for k, v in c.items() if k != "line"} for c in checks]
    print()
    print(format_table(rows))
    print(f"parameter bytes (fp32): {info['param_bytes']} ({info['numel']} parameters)")
    print("tokens/s, inner tok/s, peak MB: mean ± stdev over runs (api-2peers: tokens/s of both peers, the larger "
          "peer's memory); inner: without the outer steps; compute: the inner steps alone, without any dl.step; "
          "step s: median inner step; outer s: a dl.step that ended a round; dl.step ms: any other; after outer: "
          "the inner step after an outer step against the median; others: cores other processes used meanwhile; "
          f"quiet inner: inner tok/s over the steps during which others used at most {args.quiet_cores:g} cores, "
          "pooled over runs (st: how many)")
    for check in checks:
        print(f"{'PASS' if check['passed'] else 'FAIL'} {check['line']}")
    write_json(rows, args.json)
    title = (f"{info['profile']}: batch {batch} x {info['seq_len']}, H={args.inner_steps}, {args.outer_steps} outer "
             f"steps, {args.threads} threads, {args.runs} runs")
    try:
        plot(rows, args.plot, title)
        print(f"wrote {args.json} and {args.plot}")
    except ImportError:
        print(f"wrote {args.json} (no matplotlib: no plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
