"""``python -m bench.churn``: a swarm that loses a peer to SIGKILL every other outer step, against an undisturbed one.

Peers run on 127.0.0.1 (tiny profile) with fixed identities, so both runs train the same
peers on the same data shards with the same seeds. In the churn run a chaos driver kills
one random peer's whole process group (peer, DHT process, p2pd: a machine that vanished)
at a random instant of every other outer step (inner steps, matchmaking or all-reduce)
and restarts it with the same ``--identity`` and ``--checkpoint-dir``. Reported: steps
completed, kills, how long each restarted peer took to be in a group again, the steps on
which every member agreed on ``model_sha256``, and final loss against the undisturbed run.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import write_json
from swarm.launch import start, stop, wait_for_join_address
from swarm.metrics import read_events

TIMEOUT_S = 900


class Swarm:
    """A bootstrap node and N peers with fixed identities under ``workdir/<tag>``."""

    def __init__(self, workdir: str, tag: str, peers: int, steps: int, config: str):
        self.dir = os.path.join(workdir, tag)
        os.makedirs(self.dir, exist_ok=True)
        self.workdir, self.n, self.steps, self.config = workdir, peers, steps, config
        self.procs: dict[int, subprocess.Popen] = {}
        self.instances: dict[int, int] = {i: 0 for i in range(peers)}  # restarts so far, per peer
        boot_log = os.path.join(self.dir, "bootstrap.log")
        self.boot = start(["swarm.bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"], boot_log, 1)
        self.address = wait_for_join_address(self.boot, boot_log, 60)

    def metrics(self, i: int) -> str:
        return os.path.join(self.dir, f"peer{i}.jsonl")

    def start_peer(self, i: int) -> None:
        args = ["swarm.peer", "--initial-peers", self.address, "--name", f"peer{i}", "--metrics-file",
                self.metrics(i), "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--max-outer-steps", str(self.steps),
                "--identity", os.path.join(self.workdir, f"peer{i}.id"),
                "--checkpoint-dir", os.path.join(self.dir, f"ck{i}")]
        if i == 0:
            args += ["--config", self.config]
        log = os.path.join(self.dir, f"peer{i}.{self.instances[i]}.log")
        self.procs[i] = start(args, log, 1)

    def kill(self, i: int) -> None:
        os.killpg(self.procs[i].pid, signal.SIGKILL)
        self.procs[i].wait()
        self.instances[i] += 1

    def outer(self) -> dict[int, dict[int, list[dict]]]:
        """peer -> outer step -> its outer events (a restarted peer may report a step twice at most)."""
        out: dict[int, dict[int, list[dict]]] = {}
        for i in range(self.n):
            for e in read_events(self.metrics(i), "outer"):
                out.setdefault(i, {}).setdefault(e["outer_step"], []).append(e)
        return out

    def newest_step(self) -> int:
        return max((max(steps) for steps in self.outer().values() if steps), default=0)

    def wait_done(self, deadline: float) -> list[int]:
        codes = []
        for proc in self.procs.values():
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        return codes

    def close(self) -> None:
        stop(list(self.procs.values()) + [self.boot])


def step_s(outer: dict[int, dict[int, list[dict]]]) -> float:
    """Recent duration of an outer step, from the peers' event times."""
    times = sorted({round(e["t"]) for steps in outer.values() for events in steps.values() for e in events})
    return statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 2 else 2.0


def derived_profile(base: str, inner_steps: int, workdir: str) -> str:
    """The base profile with another H: longer rounds give restarted peers time to come back within two."""
    with open(base) as f:
        text = f.read()
    path = os.path.join(workdir, "churn.toml")
    with open(path, "w") as f:
        f.write(re.sub(r"(?m)^inner_steps = \d+", f"inner_steps = {inner_steps}", text))
    return path


def run(workdir: str, peers: int, steps: int, config: str, chaos: bool, seed: int) -> dict:
    rng = random.Random(seed)
    swarm = Swarm(workdir, "churn" if chaos else "baseline", peers, steps, config)
    kills, rejoin_s, rejoin_steps = 0, [], []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for i in range(peers):
            swarm.start_peer(i)
        killed_at_step = 0
        pending: list[tuple[int, float, int]] = []  # (peer, restart time, step it was killed at)
        while any(p.poll() is None for p in swarm.procs.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the swarm did not finish within {TIMEOUT_S} s; see {swarm.dir}")
            step = swarm.newest_step()
            outer = swarm.outer()
            for peer, restarted, at in list(pending):  # a restarted peer is back once it is in a group again
                back = [(e["t"], s) for s, events in outer.get(peer, {}).items() for e in events if e["t"] > restarted]
                if back:
                    t_back, step_back = min(back)
                    rejoin_s.append(round(t_back - restarted, 2))
                    rejoin_steps.append(step_back - at)  # 1: in the very next group after the kill
                    pending.remove((peer, restarted, at))
            # every other step, kill a peer that is training with the others (not one still restarting)
            in_groups = [i for i in range(peers) if i not in {p for p, _, _ in pending}]
            if chaos and step % 2 == 1 and step > killed_at_step and step < steps - 2 and in_groups:
                killed_at_step = step
                victim = rng.choice(in_groups)
                time.sleep(rng.uniform(0.0, step_s(outer)))  # a random instant of the next round
                if swarm.procs[victim].poll() is None:
                    swarm.kill(victim)
                    kills += 1
                    killed_during = swarm.newest_step() + 1  # the round the victim was working on
                    time.sleep(0.5)
                    swarm.start_peer(victim)
                    pending.append((victim, time.time(), killed_during))
            time.sleep(0.2)
        codes = [p.returncode for p in swarm.procs.values()]
        if any(codes):
            raise RuntimeError(f"peer exit codes {codes}; see {swarm.dir}")
    finally:
        swarm.close()
    outer = swarm.outer()
    per_step: dict[int, list[dict]] = {}
    for steps_of_peer in outer.values():
        for s, events in steps_of_peer.items():
            per_step.setdefault(s, []).extend(events)
    agree = sorted(s for s, events in per_step.items() if len({e["model_sha256"] for e in events}) == 1)
    last = per_step.get(steps, [])
    return {"steps_completed": len(per_step), "kills": kills, "rejoin_s": rejoin_s, "rejoin_steps": rejoin_steps,
            "steps_with_hash_agreement": len(agree), "disagreeing_steps": sorted(set(per_step) - set(agree)),
            "final_loss": round(statistics.mean(e["loss"] for e in last), 4) if last else None,
            "group_sizes": {s: max(e["group_size"] for e in events) for s, events in sorted(per_step.items())},
            "never_rejoined": len(pending)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--outer-steps", type=int, default=12)
    p.add_argument("--config", default="peers/tiny.toml")
    p.add_argument("--inner-steps", type=int, default=60, help="H for both runs (overrides the profile's)")
    p.add_argument("--seed", type=int, default=0, help="chaos schedule seed")
    p.add_argument("--workdir", help="logs and metrics (default: a new temp dir)")
    p.add_argument("--json", default="bench/results/churn.json")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="swarm-churn-")
    os.makedirs(workdir, exist_ok=True)
    print(f"churn benchmark: {args.peers} peers, {args.outer_steps} outer steps; logs in {workdir}", flush=True)
    config = derived_profile(args.config, args.inner_steps, workdir)
    try:
        baseline = run(workdir, args.peers, args.outer_steps, config, chaos=False, seed=args.seed)
        churn = run(workdir, args.peers, args.outer_steps, config, chaos=True, seed=args.seed)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = {**{k: churn[k] for k in ("steps_completed", "kills", "rejoin_s", "steps_with_hash_agreement",
                                      "final_loss")},
              "baseline_final_loss": baseline["final_loss"], "outer_steps": args.outer_steps, "peers": args.peers,
              "rejoin_steps": churn["rejoin_steps"], "disagreeing_steps": churn["disagreeing_steps"],
              "never_rejoined": churn["never_rejoined"],
              "group_sizes": churn["group_sizes"]}
    gap = (result["final_loss"] - result["baseline_final_loss"]) / result["baseline_final_loss"]
    rows = [("steps completed", f"{result['steps_completed']} / {args.outer_steps}"),
            ("kills (SIGKILL, then restart)", result["kills"]),
            ("rejoin time per restart (s)", ", ".join(f"{s:.1f}" for s in result["rejoin_s"]) or "-"),
            ("rejoined at round k+n, n (target <= 2)", ", ".join(map(str, result["rejoin_steps"])) or "-"),
            ("steps with one model_sha256", f"{result['steps_with_hash_agreement']} / {result['steps_completed']}"),
            ("group size per step", " ".join(str(g) for g in result["group_sizes"].values())),
            ("final loss, churn", result["final_loss"]),
            ("final loss, undisturbed", result["baseline_final_loss"]),
            ("difference (target within 5%)", f"{100 * gap:+.2f}%")]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}} | {value}")
    write_json(result, args.json)
    print(f"wrote {args.json}")
    ok = result["steps_completed"] == args.outer_steps and result["never_rejoined"] == 0 and \
        result["steps_with_hash_agreement"] == result["steps_completed"] and abs(gap) <= 0.05 and \
        all(n <= 2 for n in result["rejoin_steps"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
