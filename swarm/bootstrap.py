"""``python -m swarm.bootstrap``: a stand-alone DHT node that gives a swarm a stable entry point.

It trains nothing and holds no model; peers list it in ``--initial-peers`` so that the
swarm stays reachable however its training peers come and go. Run it on a machine with
a public address and a fixed port (``--host-maddrs /ip4/0.0.0.0/tcp/31337``) and keep
``--identity`` so its multiaddr survives restarts. It also answers the dial-back test
(swarm.reachability) with which a new peer learns whether others can dial it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from swarm.cli import run_command
from swarm.dht import parse_maddrs, start_dht
from swarm.identity import load_identity
from swarm.node import Node
from swarm.reachability import DIALBACK, serve_dialback


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swarm.bootstrap", description=__doc__.splitlines()[0])
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/0.0.0.0/tcp/31337"], metavar="MADDR")
    p.add_argument("--announce-maddrs", nargs="+", default=[], metavar="MADDR")
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR", help="other bootstrap nodes")
    p.add_argument("--identity", help="private key file: keeps the peer id (and so the multiaddr) across restarts")
    args = p.parse_args(argv)
    logging.getLogger("hivemind").setLevel(logging.CRITICAL)
    return run_command(lambda: serve(args))


def serve(args: argparse.Namespace) -> int:
    dht = start_dht(parse_maddrs(args.initial_peers, "--initial-peers", need_peer_id=True),
                    parse_maddrs(args.host_maddrs, "--host-maddrs"),
                    parse_maddrs(args.announce_maddrs, "--announce-maddrs"), load_identity(args.identity))
    node = Node(dht)
    node.call(node.p2p.add_binary_stream_handler(DIALBACK, serve_dialback))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("bootstrap node running; peers join with any of:", flush=True)
    for maddr in dht.get_visible_maddrs():
        print(f"  python -m swarm.peer --initial-peers {maddr}", flush=True)
    stop.wait()
    node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
