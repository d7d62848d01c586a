"""One RSA key per peer: it is the libp2p identity (so it fixes the peer id) and it signs our DHT records.

Because both come from the same key, a reader can check that a signed record in ``<run>/peers``
(or any owner-keyed record) was written by the peer it names: the peer id derived from the
record's signing key must equal the ``peer`` field. A record signed by one identity that speaks
for another is dropped. The file format is libp2p's (a protobuf ``PrivateKey``), as p2pd and
hivemind read and write it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass

import base58
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm.config import ConfigError
from swarm.fsutil import write_atomic

_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)
_SHA2_256 = b"\x12\x20"  # multihash prefix: sha2-256, 32 bytes


@dataclass(frozen=True)
class Identity:
    key: RSAPrivateKey
    path: str | None  # where p2pd reads it; None for a throw-away identity
    peer_id: str

    @functools.cached_property  # built once: every signed store (a heartbeat every few seconds) uses it
    def owner_subkey(self) -> bytes:
        """The DHT subkey only this identity can write (hivemind's RSASignatureValidator checks it)."""
        return RSASignatureValidator(self.key).local_public_key


def _peer_id(public_key) -> str:
    """libp2p's peer id of an RSA public key: a sha2-256 multihash of its protobuf, in base58."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    blob = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return base58.b58encode(_SHA2_256 + hashlib.sha256(blob).digest()).decode()


def _identity(key: RSAPrivateKey, path: str | None) -> Identity:
    return Identity(key, path, _peer_id(key._private_key.public_key()))


def _serialize(key: RSAPrivateKey) -> bytes:
    return crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=key.to_bytes()).SerializeToString()


def load_identity(path: str | None) -> Identity:
    """The identity in ``path`` (created there if missing), or a throw-away one when ``path`` is None."""
    if path is None:
        return _identity(RSAPrivateKey(), None)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        key = RSAPrivateKey()
        try:
            write_atomic(path, _serialize(key), mode=0o600)
        except OSError as e:
            raise ConfigError(f"--identity: cannot create {path}: {e.strerror}") from None
        return _identity(key, path)
    except OSError as e:
        raise ConfigError(f"--identity: cannot read {path}: {e.strerror}") from None
    try:
        proto = crypto_pb2.PrivateKey.FromString(blob)
        if proto.key_type != crypto_pb2.RSA:
            raise ValueError(f"it holds a {crypto_pb2.KeyType.Name(proto.key_type)} key, and swarm peers sign with RSA")
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": proto.data})
    except Exception as e:
        raise ConfigError(f"--identity: {path} is not a usable libp2p identity ({e}); "
                          f"move it away to create a new one") from None
    return _identity(key, path)


def save_identity(identity: Identity, path: str) -> None:
    """Write ``identity`` in libp2p's file format (what --identity reads), readable by its owner only."""
    write_atomic(path, _serialize(identity.key), mode=0o600)


def identity_file(identity: Identity) -> tuple[str, bool]:
    """A file p2pd can read the identity from, and whether it is a temporary one the caller must remove."""
    if identity.path is not None:
        return identity.path, False
    fd, path = tempfile.mkstemp(prefix="swarm-identity-")
    with os.fdopen(fd, "wb") as f:
        f.write(_serialize(identity.key))
    return path, True


@functools.lru_cache(maxsize=4096)
def peer_id_of_owner(subkey: bytes) -> str | None:
    """The peer id whose key signs records under this owner subkey; None if it carries no valid RSA key."""
    found = _OWNER_RE.fullmatch(subkey) if isinstance(subkey, bytes) else None
    if found is None:
        return None
    try:
        return _peer_id(RSAPublicKey.from_bytes(found.group(1))._public_key)
    except Exception:
        return None
