"""A userspace delay line: every packet routed into a TUN device comes back out of it ``delay_ms`` later.

    python -m bench.delayline --tun dl0 --delay-ms 50      (inside the router namespace; bench/netns.py)

Why: this kernel has no netem (nor fq, whose timestamps could delay packets), so latency is added
here. The router routes forwarded packets into the TUN device; we read each one, stamp it with
``now + delay``, keep it in a FIFO (the delay is constant, so due times are already in order) and
write it back into the same device when due; the kernel then routes it on to its destination.

Why it does not cap bandwidth: the device is opened with IFF_VNET_HDR and TSO/checksum offloads,
so the kernel hands us the same up-to-64 KB GSO packets TCP sent instead of 1500-byte segments
(about 200 reads a second per 100 Mbit/s), and we write them back untouched, header included.
The queue only drops beyond ``--max-queue-mbyte`` (1 s at 500 Mbit/s by default); rate limits and
bottleneck queues stay with tbf on the veths. Python's epoll rounds its timeout up to the next
millisecond, so a packet leaves 0-1 ms late when we get the CPU on time; SCHED_FIFO sees to that
while peers keep both cores busy, and the stats line on exit counts the packets more than 2 ms late.

Prints "ready" once the device is up, and one JSON line of stats when stopped with SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
READ_BYTES = 10 + 65535  # virtio_net_hdr + the largest GSO packet
READ_BURST = 64  # packets read before due ones are written again


def open_tun(name: str) -> int:
    """A non-blocking fd of a new TUN device ``name`` with offloads on, brought up."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR))
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
    subprocess.run(["ip", "link", "set", name, "up", "txqueuelen", "10000"], check=True)
    return fd


def run(fd: int, delay_s: float, max_queue_bytes: int, stats: dict) -> None:
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    queued_bytes = 0
    poller = select.epoll()
    poller.register(fd, select.EPOLLIN)
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            due, packet = queue.popleft()
            queued_bytes -= len(packet)
            late_ms = (now - due) * 1e3
            stats["max_late_ms"] = max(stats["max_late_ms"], late_ms)
            stats["late_over_2ms"] += late_ms > 2.0
            try:
                os.write(fd, packet)
                stats["packets"] += 1
                stats["bytes"] += len(packet)
            except OSError:
                stats["write_errors"] += 1
        poller.poll(queue[0][0] - now if queue else -1)
        for _ in range(READ_BURST):
            try:
                packet = os.read(fd, READ_BYTES)
            except BlockingIOError:
                break
            if queued_bytes + len(packet) > max_queue_bytes:
                stats["dropped"] += 1
                continue
            queue.append((time.monotonic() + delay_s, packet))
            queued_bytes += len(packet)
            stats["max_queue_bytes"] = max(stats["max_queue_bytes"], queued_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.delayline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tun", required=True, help="name of the TUN device to create")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to every packet")
    parser.add_argument("--max-queue-mbyte", type=float, default=64.0, help="drop beyond this many queued bytes")
    args = parser.parse_args()
    stats = dict(delay_ms=args.delay_ms, packets=0, bytes=0, dropped=0, write_errors=0, max_late_ms=0.0, late_over_2ms=0,
                 max_queue_bytes=0)

    def report(signum, _frame) -> None:
        print(json.dumps(stats), flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, report)
    try:
        fd = open_tun(args.tun)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"cannot create TUN device {args.tun}: {e}", flush=True)
        sys.exit(1)
    try:  # wake up on time even when every core is busy with peers: a late packet is added latency
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except OSError:
        pass
    print("ready", flush=True)
    run(fd, args.delay_ms / 1e3, int(args.max_queue_mbyte * 2**20), stats)


if __name__ == "__main__":
    main()
