"""The swarm's only door to hivemind's DHT: start and bootstrap, key names, typed records.

Every record we read is untrusted input from the network, so readers check types and
drop what does not fit instead of crashing. Records stay a few hundred bytes: a DHT
value near 64 KiB kills hivemind's DHT process (docs/architecture.md, "hivemind pitfalls").

Requests go to hivemind's DHT process through one pipe per DHT, which is not thread-safe and
blocks its writer once full: one lock per DHT object (whatever number of SwarmDHT views share
it) owns the pipe, and a DHT that stops answering gets at most ``MAX_IN_FLIGHT`` requests, so
a stalled DHT process makes requests fail at once instead of freezing the caller's thread.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import threading
import time
import weakref
from functools import partial
from typing import Any

import hivemind
from hivemind.utils import get_dht_time
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.serializer import MSGPackSerializer
from multiaddr import Multiaddr

from swarm.config import RUN_ID_RE, ConfigError, RunConfig
from swarm.identity import Identity, identity_file, load_identity, peer_id_of_owner

log = logging.getLogger("swarm")

RUNS_KEY = "swarm/runs"  # subkey = run id, value = config fingerprint: how a joiner finds the run
RECORD_MAX_BYTES = 4096  # a liveness record; larger ones are not stored by us, nor read from others
CONFIG_RECORD_MAX_BYTES = 32 * 1024  # a run config with a model signature; far below the 64 KiB that kills a DHT
CONFIG_TTL_S = 7 * 24 * 3600.0
CONFIG_REFRESH_S = 24 * 3600.0  # every live peer re-stores the run's config this often: a run outlives the TTL
DHT_TIMEOUT_S = 10.0  # a DHT request that takes longer failed (swarm.dht_timeout_s in a run)
READ_REPLY_BUDGET = 16 * 1024  # bytes one read's reply from the DHT process may be expected to bring: the 64 KiB
# that kills it is 4x away, so a swarm may grow 4x between two reads
SIGNED_RECORD_BYTES = 1536  # a signed liveness record as a read returns it (value, signature, owner key), rounded up
MAX_IN_FLIGHT = 64  # unanswered requests to one DHT process: ~20 KB in its pipe, below the 64 KiB that blocks
# A signed record is about 1 KB (RSA key and signature included), and a DHT read returns all the records of
# a key at once: spread them over buckets so that one read stays far below 64 KiB with hundreds of peers.
SIGNED_BUCKETS = 8


class WriteOnceValidator(RecordValidatorBase):
    """Refuses to overwrite a run's config record (subkey ``"config"``) or its ``swarm/runs`` entry with a
    different value: the first value a node sees for such a record stays; re-publishing it is allowed."""

    MEMORY = 10_000  # records remembered per node

    def __init__(self):
        self._config_subkey = MSGPackSerializer.dumps("config")
        self._runs_key = DHTID.generate(source=RUNS_KEY).to_bytes()
        self._first: collections.OrderedDict[tuple[bytes, bytes], bytes] = collections.OrderedDict()

    def validate(self, record: DHTRecord) -> bool:
        if record.subkey != self._config_subkey and record.key != self._runs_key:
            return True
        slot, digest = (record.key, record.subkey), hashlib.sha256(record.value).digest()
        first = self._first.setdefault(slot, digest)
        self._first.move_to_end(slot)
        while len(self._first) > self.MEMORY:
            self._first.popitem(last=False)
        return first == digest


class UnreachableError(RuntimeError):
    """No initial peer answered (exit code 3)."""


class DHTUnavailable(TimeoutError):
    """The DHT process did not answer in time, or has too many requests unanswered: try again later."""


class _Pipe:
    """The one owner of a hivemind.DHT's request pipe in this process."""

    _by_dht: "weakref.WeakKeyDictionary[hivemind.DHT, _Pipe]" = weakref.WeakKeyDictionary()
    _create = threading.Lock()

    def __init__(self):
        self.lock = threading.Lock()
        self.in_flight: set = set()
        self.sent = 0  # requests sent since the process started (bench.scale reports the rate)

    @classmethod
    def of(cls, dht: hivemind.DHT) -> "_Pipe":
        with cls._create:
            pipe = cls._by_dht.get(dht)
            if pipe is None:
                pipe = cls._by_dht[dht] = cls()
            return pipe

    def send(self, request) -> Any:
        """``request()`` issues one DHT call and returns its future; refused while the DHT owes too many."""
        with self.lock:
            self.in_flight = {f for f in self.in_flight if not f.done()}
            if len(self.in_flight) >= MAX_IN_FLIGHT:
                raise DHTUnavailable(f"the DHT process has {len(self.in_flight)} requests unanswered")
            future = request()
            self.sent += 1
            self.in_flight.add(future)
            return future


def config_key(run_id: str) -> str:
    return f"{run_id}/config"


def peers_key(run_id: str) -> str:
    return f"{run_id}/peers"


def signed_key(key: str, peer_id: str) -> str:
    """The bucket of ``key`` that holds ``peer_id``'s signed record."""
    return f"{key}/{int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], 'little') % SIGNED_BUCKETS}"


def parse_maddrs(values: list[str], flag: str, need_peer_id: bool = False) -> list[Multiaddr]:
    """Validate user-typed multiaddrs before any daemon starts, so a typo is one clear line."""
    out = []
    for value in values:
        try:
            maddr = Multiaddr(value)
            names = [p.name for p in maddr.protocols()]
        except Exception as e:
            raise ConfigError(f"{flag}: bad multiaddr {value!r}: {e}") from None
        if not {"ip4", "ip6", "dns", "dns4", "dns6"} & set(names) or "tcp" not in names and "udp" not in names:
            raise ConfigError(f"{flag}: {value!r} needs an address and a port, like /ip4/1.2.3.4/tcp/31337")
        if need_peer_id and "p2p" not in names:
            raise ConfigError(f"{flag}: {value!r} lacks the peer id: end it with /p2p/<peer id> as printed by the peer")
        out.append(maddr)
    return out


def start_dht(initial_peers: list[Multiaddr], host_maddrs: list[Multiaddr], announce_maddrs: list[Multiaddr],
              identity: Identity | None = None) -> hivemind.DHT:
    """Start this node's DHT (and its p2pd) under ``identity`` (a throw-away one if None);
    UnreachableError if no initial peer answers.

    Every node checks owner-only records (subkeys that carry an RSA public key) by signature, and never lets
    a run's config be overwritten.

    Every read of ours asks for the newest value, a full traversal that a cached copy never cuts short, so
    hivemind's copying of each found value to the nearest node without it (``cache_nearest``) and its
    re-reading of cached values about to expire (``cache_refresh_before_expiry``) are switched off: they were
    RPCs for nothing (docs/architecture.md, "hivemind pitfalls").
    """
    identity = identity or load_identity(None)
    path, temporary = identity_file(identity)
    try:
        return hivemind.DHT(
            initial_peers=[str(m) for m in initial_peers], start=True,
            host_maddrs=[str(m) for m in host_maddrs], announce_maddrs=[str(m) for m in announce_maddrs],
            identity_path=path, check_if_identity_free=False, startup_timeout=20,
            record_validators=[RSASignatureValidator(identity.key), WriteOnceValidator()],
            cache_nearest=0, cache_refresh_before_expiry=0,
        )
    except P2PDaemonError as e:
        if "bootstrap" in str(e) and initial_peers:
            raise UnreachableError(f"cannot reach any initial peer ({', '.join(map(str, initial_peers))})") from None
        raise RuntimeError(f"cannot start the p2p daemon: {str(e).splitlines()[0]}") from None
    finally:
        if temporary:  # p2pd has read it by now
            os.unlink(path)


class SwarmDHT:
    """Typed, size-checked records of one run, on top of a started hivemind.DHT.

    Methods are coroutines meant for the peer's network thread; a lock keeps the DHT's
    request pipe (not thread-safe) to one writer.
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, identity: Identity | None = None,
                 timeout_s: float = DHT_TIMEOUT_S):
        """``identity`` (the one the DHT was started with) is needed only to write our signed records."""
        self.dht, self.run_id, self.identity, self.timeout_s = dht, run_id, identity, timeout_s
        if identity is not None and identity.peer_id != dht.peer_id.to_base58():
            raise ValueError("SwarmDHT: the identity is not the one this DHT node runs under")
        self.addresses: dict[str, list[str]] = {}  # peer id -> multiaddrs from its liveness record
        self._signed_seen: dict[str, int] = {}  # key -> records its last read found: sizes the next read
        self._pipe = _Pipe.of(dht)

    @property
    def requests_sent(self) -> int:
        """Requests this process sent to its DHT (all views of it together)."""
        return self._pipe.sent

    async def _answer(self, future) -> Any:
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError:
            raise DHTUnavailable(f"no answer from the DHT within {self.timeout_s:.0f} s") from None

    async def store(self, key: str, subkey: Any, value: Any, ttl_s: float) -> bool:
        future = self._pipe.send(lambda: self.dht.store(key, value, get_dht_time() + ttl_s, subkey=subkey,
                                                        return_future=True))
        return bool(await self._answer(future))

    async def get_subkeys(self, key: str) -> dict[str, Any]:
        """{subkey: value} of a dictionary record; anything else reads as empty."""
        future = self._pipe.send(lambda: self.dht.get(key, latest=True, return_future=True))
        return _subkeys(await self._answer(future))

    async def get_many_subkeys(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """get_subkeys of several keys in one request to the DHT process, and one search of the DHT for all: a
        request costs the DHT process far more than the records it returns (hivemind passes each request's
        reply pipe between the processes), and one search shares its RPCs among the keys. The caller keeps the
        reply small (READ_REPLY_BUDGET)."""
        future = self._pipe.send(lambda: self.dht.run_coroutine(partial(_get_latest, keys=tuple(keys)),
                                                                return_future=True))
        # shielded: hivemind's run_coroutine, unlike its get, fails loudly when its future was cancelled
        found = await self._answer(asyncio.shield(future))
        return {key: _subkeys(found.get(key)) for key in keys}

    # --- run config -------------------------------------------------------------------------------

    async def publish_config(self, cfg: RunConfig) -> None:
        """Publish a new run's config; ConfigError if the DHT already holds a different one for this run id."""
        if not await self.store(config_key(cfg.run_id), "config", cfg.to_bytes(), CONFIG_TTL_S):
            existing = await self.fetch_config()
            if existing is not None and existing != cfg:
                cfg.check_compatible(existing)
                raise ConfigError(f"run {cfg.run_id!r} was started meanwhile by another peer, with another model or "
                                  f"data: join it with --initial-peers, or pick another --run-id")
        await self.store(RUNS_KEY, cfg.run_id, cfg.fingerprint, CONFIG_TTL_S)

    async def keep_config(self, cfg: RunConfig) -> None:
        """Re-store the run's config and its ``swarm/runs`` entry (the same bytes) every CONFIG_REFRESH_S while we
        are in the run, so that joiners find a run that has gone on for longer than CONFIG_TTL_S."""
        while True:
            await asyncio.sleep(CONFIG_REFRESH_S)
            try:
                await self.publish_config(cfg)
            except Exception as e:  # the DHT is slow now: the next day tries again, days before the TTL runs out
                log.info("could not re-store the run config: %s: %s", type(e).__name__, e)

    async def fetch_config(self) -> RunConfig | None:
        records = await self.get_subkeys(config_key(self.run_id))
        blob = records.get("config")
        if blob is None:
            return None
        if not isinstance(blob, bytes) or len(blob) > CONFIG_RECORD_MAX_BYTES:
            raise ConfigError(f"run {self.run_id!r} has a malformed config record in the DHT")
        return RunConfig.from_bytes(blob)

    async def list_runs(self) -> list[str]:
        return sorted(k for k in await self.get_subkeys(RUNS_KEY) if isinstance(k, str) and RUN_ID_RE.match(k))

    # --- liveness and readiness ------------------------------------------------------------------

    async def store_signed(self, key: str, value: dict, ttl_s: float) -> bool:
        """Our record under ``key`` (in our bucket of it), in the subkey only our identity can write, naming us
        as its ``peer``."""
        peer = self.identity.peer_id
        record = {**value, "peer": peer}
        if len(MSGPackSerializer.dumps(record)) > RECORD_MAX_BYTES:  # a bug of ours: every field we write is bounded
            raise ValueError(f"our record under {key} is over {RECORD_MAX_BYTES} bytes")
        return await self.store(signed_key(key, peer), self.identity.owner_subkey, record, ttl_s)

    async def get_signed(self, key: str) -> dict[str, dict]:
        """peer id -> record, for the records under ``key`` that their named peer signed itself; a record
        signed by one identity that names another peer is dropped (the DHT already checked the signature)."""
        out, keys, found = {}, [f"{key}/{b}" for b in range(SIGNED_BUCKETS)], 0
        step = _buckets_per_read(self._signed_seen.get(key))
        replies = await asyncio.gather(*(self.get_many_subkeys(keys[i:i + step]) for i in range(0, len(keys), step)))
        for records in (records for reply in replies for records in reply.values()):
            found += len(records)
            for subkey, value in records.items():
                peer = peer_id_of_owner(subkey)
                if peer is not None and isinstance(value, dict) and value.get("peer") == peer and \
                        len(MSGPackSerializer.dumps(value)) <= RECORD_MAX_BYTES:
                    out[peer] = value
        self._signed_seen[key] = found
        return out

    async def heartbeat(self, info: dict, ttl_s: float) -> None:
        await self.store_signed(peers_key(self.run_id), info, ttl_s)

    async def live_peers(self) -> dict[str, dict]:
        """peer id -> its latest liveness record (name, round, training, state, reachable, held, samples, ...)."""
        return {p: r for p, r in (await self.peer_records()).items() if r.get("state") != "left"}

    async def peer_records(self) -> dict[str, dict]:
        """Every well-formed liveness record of the run, farewells ("state": "left") included."""
        records = {k: v for k, v in (await self.get_signed(peers_key(self.run_id))).items()
                   if _is_int(v.get("round")) and _is_int(v.get("training", 0))
                   and isinstance(v.get("reachable", True), bool)}
        live = {k: v for k, v in records.items() if v.get("state") != "left"}
        for peer, record in live.items():
            maddrs = record.get("maddrs")
            if isinstance(maddrs, list) and all(isinstance(m, str) and len(m) < 256 for m in maddrs[:4]):
                self.addresses[peer] = maddrs[:4]
        return records


async def _get_latest(_dht: hivemind.DHT, node: DHTNode, keys: tuple[str, ...]) -> dict:
    """Runs in the DHT process (DHT.run_coroutine): the latest value of each key, or None."""
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))


def _buckets_per_read(records_seen: int | None) -> int:
    """How many buckets of a signed key one request may read, given how many records the last read found: a
    small swarm's whole view in one request, a large one's in several, each reply within READ_REPLY_BUDGET. The
    first read knows nothing yet: one bucket per request."""
    if records_seen is None:
        return 1
    per_bucket = max(1, records_seen) * SIGNED_RECORD_BYTES / SIGNED_BUCKETS
    return max(1, min(SIGNED_BUCKETS, int(READ_REPLY_BUDGET // per_bucket)))


def _subkeys(found) -> dict[str, Any]:
    """{subkey: value} of a dictionary record found in the DHT; anything else reads as empty."""
    if found is None or not isinstance(found.value, dict):
        return {}
    return {k: v.value for k, v in found.value.items() if hasattr(v, "value")}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40


async def find_run_config(dht: hivemind.DHT, run_id: str | None, wait_s: float) -> RunConfig | None:
    """The config of run ``run_id`` (or of the only run in the DHT with live peers), polling up to ``wait_s`` for
    it to appear. A run whose peers have all left does not count when none is named: it cannot block joins.

    ConfigError if the DHT holds several live runs and none was named.
    """
    deadline = time.monotonic() + wait_s
    named = run_id
    while True:
        if named is None:
            runs = await SwarmDHT(dht, "_").list_runs()
            alive = [r for r in runs if await SwarmDHT(dht, r).live_peers()]
            if len(alive) > 1:
                raise ConfigError(f"the swarm has several runs ({', '.join(alive)}): choose one with --run-id")
            if not alive and len(runs) > 1 and time.monotonic() >= deadline:
                raise ConfigError(f"no run in the DHT has live peers ({', '.join(runs)}): choose one with --run-id")
            run_id = alive[0] if alive else runs[0] if len(runs) == 1 else None
        found = await SwarmDHT(dht, run_id).fetch_config() if run_id else None
        if found is not None or time.monotonic() >= deadline:
            return found
        await asyncio.sleep(0.5)
