"""An emulated WAN on one machine: one network namespace per peer, all on one bridge.

    with Topology(peers=4, rate_mbit=100) as topo:
        topo.set_latency_ms(50)                     # one way, every direction
        topo.probe_bandwidth_mbit(0, 1)             # bulk TCP, peer 0 -> peer 1
        topo.probe_rtt_ms(0, 1)                     # TCP ping-pong
        topo.popen(0, ["python", "-m", "..."])      # a process inside peer 0's namespace

Layout (every name starts with ``swb-<pid>-``, so a later run can find and remove leftovers):

    peer i: namespace swb-<pid>-p<i>, eth0 = 198.18.0.<10+i>/24, tbf on eth0 egress (its upload)
      │ veth
    router: namespace swb-<pid>-r, v<i> on bridge br0 (198.18.0.1/24), tbf on v<i> egress (i's download)

Why a router on the bridge: this kernel has no netem (``netem_available`` checks), so latency comes
from a userspace delay line (bench/delayline.py) on a TUN device in the router namespace. Each peer
routes the other peers' /32s via 198.18.0.1; the router forwards what arrives on br0 through table
100, whose only route points at the delay line's TUN device while one runs (with no delay line the
table is empty and the router forwards straight back onto the bridge). Delaying in a middle hop,
not in a peer's own qdisc, matters: a sender's qdisc that holds packets for 50 ms throttles TCP
through TCP small queues, which a real WAN does not.

Peers listed in ``nat`` sit behind a home router, as most volunteers' machines do: namespace
swb-<pid>-h<i> holds the bridge side (198.18.0.<10+i>) and a LAN (198.19.<i>.1/24) where the peer lives
(198.19.<i>.2); it masquerades outbound connections and drops inbound ones that are not replies
(iptables, conntrack). Others can only reach such a peer through connections it opened.

Everything lives in our namespaces, so deleting them removes every veth, bridge and TUN device; no
device or route is ever added to the caller's own namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

PREFIX = "swb-"
ROUTER_ADDR = "198.18.0.1"
DELAY_TABLE = 100  # routing table of the router that sends forwarded packets into the delay line
TUN_NAME = "dl0"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """The emulated network could not be built, probed or used."""


def missing_requirements() -> str | None:
    """One line saying why we cannot build namespaces here, or None if we can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veths and tc qdiscs): run it with sudo"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the `{tool}` command (iproute2) on PATH"
    return None


def peer_addr(i: int) -> str:
    """Where others reach peer i: its own address, or its home router's for a peer behind NAT."""
    return f"198.18.0.{10 + i}"


def lan_addr(i: int) -> str:
    """Peer i's own address behind its home router (a peer in ``Topology.nat``)."""
    return f"198.19.{i}.2"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines() if line.strip()]


def _kill_namespace(ns: str) -> None:
    """SIGKILL whatever still runs inside ``ns`` (all of it ours: we made the namespace), then delete it."""
    for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    _run("ip", "netns", "del", ns, check=False)


def cleanup_leftovers(prefix: str = PREFIX) -> list[str]:
    """Remove namespaces that a run which no longer exists left behind (``<prefix><pid>-...``)."""
    removed = []
    for ns in _namespaces():
        match = re.match(re.escape(prefix) + r"(\d+)-", ns)
        if match and not _alive(int(match.group(1))):
            _kill_namespace(ns)
            removed.append(ns)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netem_available() -> bool:
    """Try a netem qdisc on a veth in a scratch namespace: the kernel either has it or says no."""
    ns = f"{PREFIX}{os.getpid()}-netem"
    _run("ip", "netns", "add", ns)
    try:
        _run("ip", "-n", ns, "link", "add", "name", "x0", "type", "veth", "peer", "name", "x1")
        return _run("tc", "-n", ns, "qdisc", "add", "dev", "x0", "root", "netem", "delay", "1ms", check=False).returncode == 0
    finally:
        _kill_namespace(ns)


def link_bytes(proc_net_dev: str, dev: str = "eth0") -> tuple[int, int]:
    """(tx, rx) byte counters of ``dev`` from the text of /proc/net/dev.

    /proc/net follows the reading process's namespace. /sys/class/net follows whoever mounted sysfs,
    and `ip netns exec` cannot remount it in every container, so there it shows the host's links.
    """
    for line in proc_net_dev.splitlines():
        name, sep, counters = line.partition(":")
        if sep and name.strip() == dev:
            fields = counters.split()
            return int(fields[8]), int(fields[0])
    raise NetnsError(f"no {dev} in /proc/net/dev")


@contextmanager
def inside(ns: str):
    """Sockets this thread opens meanwhile belong to namespace ``ns`` (and stay there afterwards)."""
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise NetnsError(f"setns into {ns}: {os.strerror(ctypes.get_errno())}")
        yield
    finally:
        if _libc.setns(own, _CLONE_NEWNET) != 0:  # carrying on in the wrong namespace would be worse
            print(f"setns back to our own namespace: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
            os._exit(1)
        os.close(own)
        os.close(target)


class Topology:
    """Builds the namespaces on enter, removes them (and every process in them) on exit.

    SIGTERM and SIGHUP raise SystemExit while it is open so that ``finally`` blocks run, and
    signals are ignored while it tears down, so a second Ctrl-C cannot leave half a network.
    """

    def __init__(self, peers: int, rate_mbit: float, burst_kbyte: int = 256, queue_ms: int = 100,
                 nat: tuple[int, ...] = ()):
        if peers < 2:
            raise NetnsError("need at least 2 peers")
        if nat and shutil.which("iptables") is None:
            raise NetnsError("peers behind NAT need the `iptables` command (apt-get install iptables)")
        self.peers, self.rate_mbit, self.nat = peers, rate_mbit, tuple(nat)
        self.homes = {i: f"{PREFIX}{os.getpid()}-h{i}" for i in self.nat}
        self.burst_kbyte, self.queue_ms = burst_kbyte, queue_ms
        self.prefix = f"{PREFIX}{os.getpid()}-"
        self.router = self.prefix + "r"
        self.namespaces = [self.prefix + f"p{i}" for i in range(peers)]
        self.latency_ms = 0.0
        self._procs: list[subprocess.Popen] = []
        self._delay_line: subprocess.Popen | None = None
        self.delay_stats: list[dict] = []  # one per delay line stopped: packets, bytes, max_late_ms, ...
        self._old_handlers: dict[int, object] = {}

    # --- life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> "Topology":
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, _raise_exit)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop our processes, then delete our namespaces; safe to call twice."""
        held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self._stop_delay_line()
            for proc in self._procs:
                _stop(proc)
            self._procs.clear()
            self._delay_line = None
            for ns in [*self.namespaces, *self.homes.values(), self.router]:
                if os.path.exists(f"/run/netns/{ns}"):
                    _kill_namespace(ns)
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            self._old_handlers.clear()

    def _build(self) -> None:
        r, rate = self.router, f"{self.rate_mbit}mbit"
        tbf = ["tbf", "rate", rate, "burst", f"{self.burst_kbyte}kb", "latency", f"{self.queue_ms}ms"]
        _run("ip", "netns", "add", r)
        _sysctl(r, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.default.send_redirects=0", "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0", "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1")
        _run("ip", "-n", r, "link", "set", "lo", "up")
        _run("ip", "-n", r, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", r, "addr", "add", f"{ROUTER_ADDR}/24", "dev", "br0")
        _run("ip", "-n", r, "link", "set", "br0", "up")
        _run("ip", "-n", r, "rule", "add", "iif", "br0", "lookup", str(DELAY_TABLE), "pref", "100")
        for i, ns in enumerate(self.namespaces):
            _run("ip", "netns", "add", ns)
            _sysctl(ns, "net.ipv4.conf.all.accept_redirects=0", "net.ipv4.conf.default.accept_redirects=0",
                    "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
            public = self.homes.get(i, ns)  # the namespace on the bridge: the peer's own, or its home router
            if public != ns:
                _run("ip", "netns", "add", public)
                _sysctl(public, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.disable_ipv6=1")
            _run("ip", "-n", r, "link", "add", "name", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns",
                 public)
            _run("ip", "-n", r, "link", "set", f"v{i}", "master", "br0", "up")
            for space in {ns, public}:
                _run("ip", "-n", space, "link", "set", "lo", "up")
            _run("ip", "-n", public, "addr", "add", f"{peer_addr(i)}/24", "dev", "eth0")
            _run("ip", "-n", public, "link", "set", "eth0", "up")
            for j in range(self.peers):
                if j != i:
                    _run("ip", "-n", public, "route", "add", f"{peer_addr(j)}/32", "via", ROUTER_ADDR)
            if public != ns:
                self._build_home(i, ns, public)
            _run("tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", *tbf)
            _run("tc", "-n", r, "qdisc", "add", "dev", f"v{i}", "root", *tbf)

    def _build_home(self, i: int, ns: str, home: str) -> None:
        """Peer i behind a home router: its eth0 on the router's LAN, outbound masqueraded, inbound dropped
        unless it answers a connection the peer opened."""
        lan = f"198.19.{i}.1"
        _run("ip", "-n", home, "link", "add", "name", "lan", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "-n", home, "addr", "add", f"{lan}/24", "dev", "lan")
        _run("ip", "-n", home, "link", "set", "lan", "up")
        _run("ip", "-n", ns, "addr", "add", f"{lan_addr(i)}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "route", "add", "default", "via", lan)
        ipt = ["ip", "netns", "exec", home, "iptables"]
        _run(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE")
        _run(*ipt, "-A", "FORWARD", "-i", "eth0", "-o", "lan", "-m", "state", "--state", "ESTABLISHED,RELATED",
             "-j", "ACCEPT")
        _run(*ipt, "-A", "FORWARD", "-i", "eth0", "-o", "lan", "-j", "DROP")

    def bind_addr(self, i: int) -> str:
        """The address peer i's processes listen on: its own, which is not the one others see behind NAT."""
        return lan_addr(i) if i in self.nat else peer_addr(i)

    # --- processes --------------------------------------------------------------------------------

    def popen(self, peer: int | None, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside peer ``peer``'s namespace (None: the router's), in its own session;
        close() stops it."""
        ns = self.router if peer is None else self.namespaces[peer]
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        _stop(proc)
        if proc in self._procs:
            self._procs.remove(proc)

    # --- latency ----------------------------------------------------------------------------------

    def set_latency_ms(self, one_way_ms: float) -> None:
        """Delay every packet between two peers by ``one_way_ms`` (0: no delay line at all)."""
        self._stop_delay_line()
        _run("ip", "-n", self.router, "route", "flush", "table", str(DELAY_TABLE), check=False)
        self.latency_ms = float(one_way_ms)
        if one_way_ms <= 0:
            return
        proc = self.popen(None, [sys.executable, "-m", "bench.delayline", "--tun", TUN_NAME,
                                 "--delay-ms", str(one_way_ms)], stdout=subprocess.PIPE, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        line = _readline(proc, timeout_s=15)
        if line.strip() != "ready":
            self.stop(proc)
            raise NetnsError(f"the delay line did not start (said {line.strip()!r})")
        self._delay_line = proc
        _run("ip", "-n", self.router, "route", "add", "default", "dev", TUN_NAME, "table", str(DELAY_TABLE))

    def _stop_delay_line(self) -> None:
        """SIGTERM the delay line and keep the stats line it prints on the way out."""
        proc, self._delay_line = self._delay_line, None
        if proc is None:
            return
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=5)
            self.delay_stats.append(json.loads(out.strip().splitlines()[-1]))
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            pass  # no stats is no reason to fail the run
        self.stop(proc)

    # --- probes -----------------------------------------------------------------------------------

    def probe_bandwidth_mbit(self, src: int, dst: int, max_s: float = 3.0, max_bytes: int = 64 << 20,
                             skip_bytes: int = 1 << 20) -> float:
        """Goodput of one bulk TCP transfer src -> dst, in Mbit/s of payload.

        The first ``skip_bytes`` (tbf's burst, slow start) are not counted; the transfer stops after
        ``max_s`` seconds or ``max_bytes``, whichever comes first.
        """
        server, client = self._connect(src, dst)
        stop = threading.Event()

        def send() -> None:
            chunk = bytes(1 << 16)
            try:
                for _ in range(max_bytes // len(chunk) + 1):
                    if stop.is_set():
                        break
                    client.sendall(chunk)
            except OSError:
                pass  # the receiver closed: done
            finally:
                client.close()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got, t_start, buf = 0, None, bytearray(1 << 16)
        deadline = time.monotonic() + max_s + 5
        try:
            while time.monotonic() < deadline:
                n = server.recv_into(buf)
                if n == 0:
                    break
                got += n
                if t_start is None and got >= skip_bytes:
                    t_start, got_start = time.monotonic(), got
                elif t_start is not None and time.monotonic() - t_start >= max_s:
                    break
            t_end = time.monotonic()
        finally:
            stop.set()
            server.close()
            sender.join(5)
        if t_start is None or t_end <= t_start:
            raise NetnsError(f"bandwidth probe {src}->{dst}: only {got} bytes arrived")
        return (got - got_start) * 8 / (t_end - t_start) / 1e6

    def probe_rtt_ms(self, src: int, dst: int, count: int = 10) -> float:
        """Median of ``count`` one-byte TCP round trips src -> dst -> src, in ms (after connecting)."""
        server, client = self._connect(src, dst)

        def echo() -> None:
            try:
                for _ in range(count):
                    server.sendall(server.recv(1))
            except OSError:
                pass
            finally:
                server.close()

        echoer = threading.Thread(target=echo, daemon=True)
        echoer.start()
        rtts = []
        try:
            for _ in range(count):
                t0 = time.monotonic()
                client.sendall(b"x")
                if client.recv(1) != b"x":
                    raise NetnsError(f"rtt probe {src}->{dst}: connection closed")
                rtts.append(time.monotonic() - t0)
        finally:
            client.close()
            echoer.join(5)
        return statistics.median(rtts) * 1e3

    def _connect(self, src: int, dst: int) -> tuple[socket.socket, socket.socket]:
        """A connected TCP pair: (accepted socket in dst's namespace, client socket in src's)."""
        with inside(self.namespaces[dst]):
            listener = socket.create_server((peer_addr(dst), 0))
        try:
            port = listener.getsockname()[1]
            listener.settimeout(10)
            with inside(self.namespaces[src]):
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.settimeout(10)
            client.connect((peer_addr(dst), port))
            server, _ = listener.accept()
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server.settimeout(10)
            return server, client
        finally:
            listener.close()


def _sysctl(ns: str, *settings: str) -> None:
    _run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings)


def _raise_exit(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the process group (each of ours has its own session), SIGKILL it after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass


def _readline(proc: subprocess.Popen, timeout_s: float) -> str:
    """One line of ``proc``'s stdout, or "" if it says nothing within ``timeout_s``."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    return proc.stdout.readline() if ready else ""
