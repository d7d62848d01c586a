"""Every wait a peer does, capped by a number a user can compute from the run config.

Transfers of S bytes get S at ``swarm.min_bandwidth_mbit`` (the slowest link a peer may have)
plus ``swarm.allreduce_timeout_s``; protocol steps get their own timeouts; nothing waits longer
than ``CEILING_S``. docs/architecture.md, "Caps", is this module in words.
"""

from __future__ import annotations

from swarm.config import SwarmConfig

CEILING_S = 3600.0  # no single wait of a peer outlasts an hour, whatever the model size or link
MAX_ATTEMPTS = 3  # attempts of one round (a failed one is retried without the peers it blames)


def transfer_s(cfg: SwarmConfig, size_bytes: int) -> float:
    """Cap on moving ``size_bytes`` over one peer's link: at the slowest rate allowed, plus a margin."""
    return min(CEILING_S, size_bytes * 8 / (cfg.min_bandwidth_mbit * 1e6) + cfg.allreduce_timeout_s)


def allreduce_s(cfg: SwarmConfig, wire_bytes: int) -> float:
    """Cap on one all-reduce attempt in which this peer sends (and receives) about ``wire_bytes``: up to twice
    the encoded vector (reduce-scatter out, all-gather back)."""
    return transfer_s(cfg, 2 * wire_bytes)


def round_s(cfg: SwarmConfig, wire_bytes: int) -> float:
    """Cap on averaging one round: the gather, then up to MAX_ATTEMPTS joins and all-reduces."""
    return min(CEILING_S, cfg.gather_timeout_s + MAX_ATTEMPTS * (2 * cfg.join_timeout_s
                                                                 + allreduce_s(cfg, wire_bytes)))


def download_s(cfg: SwarmConfig, size_bytes: int) -> float:
    """Cap on downloading a state of ``size_bytes`` from the swarm (manifest, chunks, verification)."""
    return transfer_s(cfg, size_bytes) + cfg.dht_timeout_s


def dht_s(cfg: SwarmConfig) -> float:
    """Cap on one DHT request (a store or a read of a key's buckets)."""
    return cfg.dht_timeout_s


def describe(cfg: SwarmConfig, wire_bytes: int, state_bytes: int) -> str:
    """One line with the caps of this run, for the log at start-up."""
    return (f"waits capped at: DHT request {dht_s(cfg):.0f} s, gather {cfg.gather_timeout_s:.0f} s, join "
            f"{cfg.join_timeout_s:.0f} s, all-reduce attempt {allreduce_s(cfg, wire_bytes):.0f} s, round "
            f"{round_s(cfg, wire_bytes):.0f} s, state download {download_s(cfg, state_bytes):.0f} s")
