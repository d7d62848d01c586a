"""Joining the swarm: start our DHT node under our identity, then find the run (or start a new one).

Shared by the Python API (swarm.api) and the CLI, which must read the run config before it can
build the model. A joiner with nothing but an entry point learns everything from the run's
config record; one that brings its own settings is checked against it, field by field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from multiaddr import Multiaddr

from swarm.config import ConfigError, RunConfig
from swarm.dht import find_run_config, start_dht
from swarm.identity import Identity, load_identity
from swarm.node import Node, maddr_peer_ids

log = logging.getLogger("swarm")

CONFIG_LOOKUP_S = 20.0  # how long a joiner keeps asking the DHT for the run config


@dataclass
class Membership:
    node: Node
    cfg: RunConfig  # the run's config (a new run's: not published until its model is known)
    is_new: bool
    identity: Identity
    initial_peers: list[Multiaddr]

    def close(self) -> None:
        self.node.close()


def open_membership(initial_peers: list[Multiaddr], host_maddrs: list[Multiaddr], announce_maddrs: list[Multiaddr],
                    identity_path: str | None, run_id: str | None, local: RunConfig | None,
                    check_profile: bool = True, explicit: dict[str, object] | None = None,
                    wait_s: float | None = None) -> Membership:
    """Start our node and resolve the run: the DHT's config of ``run_id`` (or of the only live run) if there
    is one, checked against ``local`` (a profile: every field must agree, unless not ``check_profile``) and
    against ``explicit`` (the dotted fields an API user set, e.g. ``{"train.inner_steps": 100}``); else
    ``local``, as a new run. ``wait_s``: how long to look for the run's config (default: CONFIG_LOOKUP_S for a
    joiner that brings no config of its own, else none)."""
    identity = load_identity(identity_path)
    if identity.peer_id in maddr_peer_ids(initial_peers):
        raise ConfigError(f"--identity {identity_path}: it is the identity of the initial peer you named "
                          f"({identity.peer_id[-8:]}): two peers cannot share one identity")
    node = Node(start_dht(initial_peers, host_maddrs, announce_maddrs, identity), identity)
    try:
        # a joiner with nothing but --initial-peers may come up before the run's first peer has published
        if wait_s is None:
            wait_s = CONFIG_LOOKUP_S if initial_peers and local is None else 0
        remote = node.call(find_run_config(node.dht, run_id or (local.run_id if local and check_profile else None),
                                           wait_s), timeout_s=wait_s + 60)
        if remote is not None:
            if local is not None and check_profile:
                local.check_compatible(remote)
            check_explicit(remote, explicit or {})
            return Membership(node, remote, False, identity, initial_peers)
        if local is None:
            raise ConfigError("no run found in the DHT: start one with --config tiny" if not run_id
                              else f"run {run_id!r} has no config in the DHT: start it with --config")
        return Membership(node, local, True, identity, initial_peers)
    except BaseException:
        node.close()
        raise


def check_explicit(cfg: RunConfig, explicit: dict[str, object]) -> None:
    """ConfigError naming the first setting the user chose that the run's config contradicts."""
    flat = {f"{section}.{k}": v for section in ("train", "swarm", "model")
            for k, v in getattr(cfg, section).__dict__.items()}
    for key, value in sorted(explicit.items()):
        if key in flat and flat[key] != value:
            raise ConfigError(f"run {cfg.run_id!r} uses {key} = {flat[key]!r}, not {value!r}: "
                              f"leave it out to take the run's")
