"""``python -m swarm.launch``: a local swarm of N peer processes on 127.0.0.1, summarised per outer step.

This is ``make demo``: the first peer starts the run from a profile, the others join with
nothing but its printed multiaddr, exactly as users on different machines would. The
launcher only reads the peers' metrics files; it prints one line per outer step once
every peer has reported it, and fails if the peers' models ever disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from swarm.config import ConfigError, load_profile, write_profile
from swarm.metrics import human_bytes, read_events

JOIN_LINE = re.compile(r"--initial-peers (\S+)")


def start(args: list[str], log_path: str, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def wait_for_join_address(proc: subprocess.Popen, log_path: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(log_path) as f:
            match = JOIN_LINE.search(f.read())
        if match:
            return match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"{log_path} ended with exit code {proc.returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"no join address within {timeout_s:.0f} s; see {log_path}")


def summarize(step: int, events: list[dict]) -> tuple[str, bool]:
    hashes = {e["model_sha256"] for e in events}
    line = (f"step {step:3d} | group {max(e['group_size'] for e in events)} | "
            f"loss {sum(e['loss'] for e in events) / len(events):.3f} | "
            f"all-reduce {max(e['allreduce_s'] for e in events):.2f} s | "
            f"wire {human_bytes(sum(e['bytes_sent'] for e in events))} | "
            f"model {sorted(hashes)[0][:12]}{'' if len(hashes) == 1 else ' MISMATCH'}")
    return line, len(hashes) == 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swarm.launch", description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--outer-steps", type=int, default=8)
    p.add_argument("--config", default="tiny", help="profile: a built-in name or a TOML file (default: tiny)")
    p.add_argument("--workdir", help="where peer logs and metrics go (default: a new temp dir)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per peer")
    p.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    args = p.parse_args(argv)
    if args.peers < 1 or args.outer_steps < 1:
        p.error("--peers and --outer-steps must be at least 1")
    workdir = args.workdir or tempfile.mkdtemp(prefix="swarm-demo-")
    os.makedirs(workdir, exist_ok=True)
    try:  # round 1 waits for every peer (swarm.min_peers), so that the demo's groups are whole from the start
        base = load_profile(args.config)
        profile = write_profile(dataclasses.replace(base, swarm=dataclasses.replace(base.swarm, min_peers=args.peers)),
                                os.path.join(workdir, "profile.toml"))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # a SIGTERM stops everything we started, as Ctrl-C does: the peers, the bootstrap node and their p2pd
    signal.signal(signal.SIGTERM, _interrupt)
    metrics = [os.path.join(workdir, f"peer{i}.jsonl") for i in range(args.peers)]
    logs = [os.path.join(workdir, f"peer{i}.log") for i in range(args.peers)]
    for path in metrics:
        open(path, "w").close()  # fresh files: the summary reads them while peers append
    procs: list[subprocess.Popen] = []
    print(f"local swarm of {args.peers} peers, {args.outer_steps} outer steps; logs and metrics in {workdir}")
    try:
        boot_log = os.path.join(workdir, "bootstrap.log")
        procs.append(start(["swarm.bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"], boot_log, 1))
        address = wait_for_join_address(procs[0], boot_log, 60)
        print(f"bootstrap node at {address}; peer0 starts the run from {args.config}, the others join with "
              f"nothing but that address")
        for i in range(args.peers):
            extra = ["--config", profile] if i == 0 else []
            procs.append(start(["swarm.peer", "--initial-peers", address, *extra, "--name", f"peer{i}",
                                "--metrics-file", metrics[i], "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                "--max-outer-steps", str(args.outer_steps)], logs[i], args.threads))
        return follow(procs[1:], metrics, logs, args.outer_steps, time.monotonic() + args.timeout)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        stop(procs)


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def reached(path: str) -> int:
    """The furthest outer step a peer's metrics show: averaged, downloaded (a peer that resynchronised past
    steps reports no `outer` event for them) or left at."""
    steps = [e["outer_step"] for e in read_events(path) if e.get("event") in ("outer", "bootstrap", "left")
             and isinstance(e.get("outer_step"), int)]
    return max(steps, default=0)


def follow(procs: list[subprocess.Popen], metrics: list[str], logs: list[str], outer_steps: int,
           deadline: float) -> int:
    """Print each outer step once every peer has reported it, or moved past it (a late joiner may skip steps)."""
    agree, losses = True, []
    for step in range(1, outer_steps + 1):
        while True:
            events = [{e["outer_step"]: e for e in read_events(path, "outer")} for path in metrics]
            if all(step in ev or reached(path) >= step for ev, path in zip(events, metrics)):
                break
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                raise RuntimeError(f"peer{failed[0]} exited with code {procs[failed[0]].returncode}; "
                                   f"see {logs[failed[0]]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"outer step {step} did not complete in time; see {os.path.dirname(logs[0])}")
            time.sleep(0.2)
        reported = [ev[step] for ev in events if step in ev]
        line, same = summarize(step, reported)
        print(line, flush=True)
        agree &= same
        losses.append(sum(e["loss"] for e in reported) / len(reported))
    codes = [p.wait(timeout=60) for p in procs]
    if any(codes):
        raise RuntimeError(f"peer exit codes {codes}")
    print(f"done: mean loss {losses[0]:.3f} -> {losses[-1]:.3f}; models "
          f"{'identical on every peer at every step' if agree else 'DIVERGED'}")
    return 0 if agree and losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
