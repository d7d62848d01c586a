"""Can other peers dial us? A dial-back test, instead of libp2p's AutoNAT.

AutoNAT may treat private or benchmark address ranges as not public, and a libp2p dial back would
reuse the connection we opened ourselves. So a peer asks another peer to open a plain TCP
connection to the IP it sees our stream come from, at the ports we listen on. Behind a home NAT
the connection is dropped by the router, and the peer learns that it must average through peers
that can be dialed: it joins groups but never leads them, owns no part of the all-reduce, and is
never a holder a joiner depends on (docs/architecture.md, "Peers behind NAT").

The server only ever connects back to the address the request came from, at most a few ports,
each once, with a short timeout: it cannot be used to make a peer connect elsewhere.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from hivemind.p2p import P2P
from multiaddr import Multiaddr

from swarm.wire import WireError, field, open_stream, read_msg, write_msg

log = logging.getLogger("swarm")

DIALBACK = "swarm.dialback"
DIAL_TIMEOUT_S = 3.0
MAX_PORTS = 4


def listen_ports(maddrs: list[str]) -> list[int]:
    ports = []
    for m in maddrs:
        try:
            port = int(Multiaddr(m).value_for_protocol("tcp"))
        except Exception:
            continue
        if 0 < port < 65536 and port not in ports:
            ports.append(port)
    return ports[:MAX_PORTS]


async def serve_dialback(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = await read_msg(reader, DIAL_TIMEOUT_S)
        ports = [p for p in field(request, "ports", list)[:MAX_PORTS] if isinstance(p, int) and 0 < p < 65536]
        host = _ip_of(info.addr)
        reached = []
        for port in ports:
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(host, port), DIAL_TIMEOUT_S)
                w.close()
                reached.append(port)
            except (OSError, asyncio.TimeoutError):
                pass
        await write_msg(writer, {"host": host, "reached": reached})
    except Exception as e:
        try:
            await write_msg(writer, {"error": str(e)[:200]})
        except Exception:
            pass
    finally:
        writer.close()


def _ip_of(maddr: Multiaddr) -> str:
    for proto in ("ip4", "ip6"):
        try:
            return str(ipaddress.ip_address(maddr.value_for_protocol(proto)))
        except Exception:
            continue
    raise WireError(f"no IP address in {maddr}")


async def check_reachable(p2p: P2P, ask: list[str], maddrs: list[str], hints: dict[str, list[str]]) -> bool:
    """Whether one of the peers in ``ask`` (peer ids) could connect to us; True when nobody can tell (we are
    the first peer, or nobody we know serves the test)."""
    ports = listen_ports(maddrs)
    for peer in ask[:3]:
        try:
            _, reader, writer = await open_stream(p2p, peer, DIALBACK, DIAL_TIMEOUT_S, hints)
            try:
                await write_msg(writer, {"ports": ports})
                reply = await read_msg(reader, DIAL_TIMEOUT_S * (len(ports) + 1))
            finally:
                writer.close()
        except Exception as e:  # no such protocol (a stock DHT node), unreachable: ask the next one
            log.debug("dial-back test by %s failed: %s", peer[-6:], e)
            continue
        if "error" in reply:
            continue
        reached = reply.get("reached")
        ok = isinstance(reached, list) and bool(reached)
        log.info("dial-back test by %s: %s", peer[-6:], "this peer can be dialed" if ok else
                 f"peers cannot dial this peer at {reply.get('host')} (behind NAT or a firewall): it averages "
                 "through peers that can, and never leads a group")
        return ok
    return True
