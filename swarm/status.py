"""``python -m swarm.status``: the swarm's state in the terminal, without joining training.

It starts a DHT node, reads the same records a peer reads (the run's config and every
live peer's liveness record) and prints the run and a contribution leaderboard.
``leaderboard`` is also how the peer orders the peers of its dashboard's /api/status.
Exit codes as swarm.peer: 0 ok, 2 bad arguments or no such run, 3 no initial peer
reachable, 1 anything else, each with one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
from typing import Any

import hivemind

from swarm.cli import run_command
from swarm.config import ConfigError, RunConfig
from swarm.dht import SwarmDHT, find_run_config, parse_maddrs, start_dht

LOOKUP_S = 10.0  # how long to keep asking a freshly joined DHT for the run before giving up
NAME_MAX_CHARS = 40  # names come from other peers' records: keep a long one from breaking the table


def leaderboard(live: dict[str, dict]) -> list[dict]:
    """Peer records (SwarmDHT.live_peers) -> table rows, most samples first, then most compute.

    The records are written by other peers, so every field is coerced to its type: an old
    or hostile peer can put odd values in the DHT, but cannot break the table, the JSON
    (no NaN) or the page.
    """
    rows = [{"peer_id": peer_id, "name": _text(rec.get("name")) or peer_id[-6:], "state": _text(rec.get("state")),
             "round": int(_number(rec.get("round"))), "samples": int(_number(rec.get("samples"))),
             "compute_s": _number(rec.get("compute_s")), "tokens_per_s": _number(rec.get("tokens_per_s")),
             "last_seen": _number(rec.get("t")) or None}
            for peer_id, rec in live.items()]
    return sorted(rows, key=lambda r: (-r["samples"], -r["compute_s"], r["name"], r["peer_id"]))


def _number(value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else 0


def _text(value: Any) -> str:
    return value[:NAME_MAX_CHARS] if isinstance(value, str) else ""


async def read_swarm(dht: hivemind.DHT, run_id: str | None) -> tuple[RunConfig, list[dict]]:
    """The run's config and leaderboard; the run is found as a joining peer finds it."""
    cfg = await find_run_config(dht, run_id, LOOKUP_S)
    if cfg is None:
        raise ConfigError("no run found in the DHT" if run_id is None else f"run {run_id!r} has no config in the DHT")
    return cfg, leaderboard(await SwarmDHT(dht, cfg.run_id).live_peers())


def summary(cfg: RunConfig, rows: list[dict]) -> dict:
    """What --json prints: keys as the dashboard's /api/status, where outer_step is the most
    advanced live peer's last completed step (a dashboard tells its own peer's)."""
    return {"run_id": cfg.run_id, "profile": cfg.profile, "inner_steps": cfg.train.inner_steps,
            "outer_step": max((r["round"] - 1 for r in rows), default=0),
            "tokens_seen": sum(r["samples"] for r in rows) * cfg.model.seq_len, "peers": rows}


def render(status: dict, now: float) -> str:
    """Plain aligned text: readable in any terminal, a pipe or a log file."""
    head = (f"run {status['run_id']} · profile {status['profile']} · H={status['inner_steps']} · "
            f"outer step {status['outer_step']} · {status['tokens_seen']:,} tokens seen · "
            f"{len(status['peers'])} live peer{'s' * (len(status['peers']) != 1)}")
    if not status["peers"]:
        return head + "\n(no live peers)"
    table = [("#", "name", "peer", "state", "round", "samples", "compute", "tok/s", "last seen")]
    for i, r in enumerate(status["peers"], 1):
        seen = f"{max(0, now - r['last_seen']):.0f} s ago" if r["last_seen"] else "-"
        table.append((str(i), r["name"], r["peer_id"][-8:], r["state"] or "-", str(r["round"]), f"{r['samples']:,}",
                      f"{r['compute_s']:,.1f} s", f"{r['tokens_per_s']:,.0f}", seen))
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    left = {1, 2, 3}  # text columns; numbers align right
    lines = ["  ".join(cell.ljust(w) if c in left else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    return "\n".join([head, *(line.rstrip() for line in lines)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m swarm.status", description=__doc__.splitlines()[0])
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR",
                   help="multiaddrs of any peers (or bootstrap nodes) of the swarm")
    p.add_argument("--run-id", help="run to show (default: the only run in the DHT)")
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/0"], metavar="MADDR",
                   help="where this short-lived DHT node listens (default: all interfaces, a random TCP port)")
    p.add_argument("--json", action="store_true", help="print the status as one JSON object")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("hivemind").setLevel(logging.CRITICAL)
    return run_command(lambda: show(args))


def show(args: argparse.Namespace) -> int:
    initial = parse_maddrs(args.initial_peers, "--initial-peers", need_peer_id=True)
    dht = start_dht(initial, parse_maddrs(args.host_maddrs, "--host-maddrs"), [])
    try:
        cfg, rows = asyncio.run(read_swarm(dht, args.run_id))
    finally:
        dht.shutdown()
    status = summary(cfg, rows)
    print(json.dumps(status) if args.json else render(status, time.time()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
