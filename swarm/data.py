"""Training data: the embedded corpus (or ``--data``), tokenizers, and each peer's shard of the tokens.

Every peer tokenizes with the same tokenizer (``Tokenizer.sha256`` lets the run check it), keeps
the last 2% of its tokens as held-out validation, and samples training windows from its own
contiguous shard of the rest with its own seed, so peers see different data (as in DiLoCo,
arXiv 2311.08105, where each worker trains on its own shard).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import tokenizers
import torch

from swarm.fsutil import write_atomic

log = logging.getLogger("swarm")

# The BPE trainer and encoder are deterministic either way; their thread pool buys nothing on a
# 2-core peer and makes tokenizers warn (and disable itself) in every process forked after use.
# tokenizers reads this variable at each call, so setting it after the import is enough.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".csv", ".tex", ".html")
BPE_VOCAB_SIZE = 4096
BYTE_SHA256 = hashlib.sha256(b"byte-v1").hexdigest()  # the byte tokenizer's mapping never changes
CHUNK_CHARS = 1 << 20  # characters encoded per tokenizer call: bounds the tokenizer's memory
# A newline between two printable ASCII characters: the byte-level pre-tokenizer always cuts
# there, so encoding the pieces on either side separately gives the same ids as encoding the whole.
_SAFE_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~])")


class DataError(ValueError):
    """A ``--data`` path (or tokenizer choice) we cannot train on; the message is one line for the user."""


def load_text(path: str | os.PathLike | None) -> str:
    """The training text: the embedded corpus for None, else a file's text, or every text file (``.gz``
    too) under a directory, sorted by relative path so that peers with the same files read the same text."""
    if path is None:
        blob = (resources.files("swarm") / "corpus" / "shakespeare.txt.gz").read_bytes()
        return gzip.decompress(blob).decode("utf-8")
    root = Path(path)
    if root.is_dir():
        files = sorted((f for f in root.rglob("*") if f.is_file() and _is_text_name(f.name)),
                       key=lambda f: f.relative_to(root).as_posix())
        if not files:
            raise DataError(f"--data {path}: no text files ({' '.join(TEXT_SUFFIXES)}, or .gz of them) in it")
        text = "\n\n".join(_read_text(f) for f in files)
    elif root.exists():
        text = _read_text(root)
    else:
        raise DataError(f"--data {path}: no such file or directory")
    if not text.strip():
        raise DataError(f"--data {path}: no text in it")
    return text


def _is_text_name(name: str) -> bool:
    return Path(name.lower().removesuffix(".gz")).suffix in TEXT_SUFFIXES


def _read_text(path: Path) -> str:
    try:
        blob = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            blob = gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as e:  # EOFError, zlib.error: a truncated or corrupt .gz
        raise DataError(f"--data {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if b"\0" in blob:  # what git and grep take as the mark of a binary file
        raise DataError(f"--data {path}: not a text file (it holds NUL bytes)")
    return blob.decode("utf-8", errors="replace")


class Tokenizer:
    """Text <-> token ids (numpy uint16). ``sha256`` names the exact id mapping, so peers can check they agree."""

    def __init__(self, kind: str, bpe_json: str | None = None):
        self.kind = kind
        self._bpe = None if bpe_json is None else tokenizers.Tokenizer.from_str(bpe_json)
        self.vocab_size = 256 if self._bpe is None else self._bpe.get_vocab_size()
        self.sha256 = BYTE_SHA256 if bpe_json is None else hashlib.sha256(bpe_json.encode()).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        if self._bpe is None:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        return np.asarray(self._bpe.encode(text).ids, dtype=np.uint16)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if self._bpe is None:
            return bytes(ids.tolist()).decode("utf-8", errors="replace")
        return self._bpe.decode(ids.tolist())


def default_cache_dir() -> Path:
    """Where trained tokenizers and token files are cached: ``$XDG_CACHE_HOME/swarm`` (``~/.cache/swarm``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swarm"


def build_tokenizer(kind: str, text: str, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """``"byte"`` (the 256 UTF-8 byte values) or ``"bpe4k"`` (a 4096-token byte-level BPE trained on ``text``).

    Training is deterministic, so every peer that trains on the same text gets the same ids.
    A trained BPE is cached in ``cache_dir`` (default ``$XDG_CACHE_HOME/swarm``) under the text's sha256.
    """
    if kind == "byte":
        return Tokenizer("byte")
    if kind != "bpe4k":
        raise DataError(f"unknown tokenizer {kind!r}: choose 'byte' or 'bpe4k'")
    if cache_dir is None:
        cache_dir = default_cache_dir()
    path = Path(cache_dir) / f"bpe4k-{hashlib.sha256(text.encode('utf-8')).hexdigest()}.json"
    if path.is_file():
        return Tokenizer("bpe4k", path.read_text(encoding="utf-8"))
    bpe_json = _train_bpe(text)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, bpe_json.encode("utf-8"))
    except OSError as e:  # a cache we cannot write costs a retraining at the next start, nothing more
        log.warning("bpe4k tokenizer not cached in %s: %s", path.parent, e)
    return Tokenizer("bpe4k", bpe_json)


def _train_bpe(text: str) -> str:
    """Train GPT-2-style byte-level BPE and return its canonical JSON (sorted keys, no spaces).

    All 256 bytes are in the initial alphabet, so any text encodes without unknown tokens.
    """
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_chunks(text), trainer=trainer)
    return json.dumps(json.loads(bpe.to_str()), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _chunks(text: str) -> Iterator[str]:
    """``text`` in pieces of about CHUNK_CHARS, cut only where the pieces tokenize as the whole does."""
    start = 0
    while start < len(text):
        cut = _SAFE_CUT.search(text, start + CHUNK_CHARS) if start + CHUNK_CHARS < len(text) else None
        end = cut.start() if cut else len(text)
        yield text[start:end]
        start = end


def prepare_tokens(text: str, tokenizer: Tokenizer, cache_dir: str | os.PathLike) -> np.memmap:
    """``text`` as uint16 ids in ``<cache_dir>/tokens-<sha256 of tokenizer and text>-<n_tokens>.u16``,
    encoded once and reused while the file has the size its name promises (2 bytes a token)."""
    cache = Path(cache_dir)
    key = hashlib.sha256(f"{tokenizer.sha256}\n".encode() + text.encode("utf-8")).hexdigest()
    for path in cache.glob(f"tokens-{key}-*.u16"):
        if path.stat().st_size == 2 * int(path.stem.rsplit("-", 1)[1]):
            return np.memmap(path, dtype="<u2", mode="r")
    ids = np.concatenate([tokenizer.encode(chunk) for chunk in _chunks(text)]).astype("<u2", copy=False)
    path = cache / f"tokens-{key}-{len(ids)}.u16"
    cache.mkdir(parents=True, exist_ok=True)
    write_atomic(path, memoryview(ids))
    return np.memmap(path, dtype="<u2", mode="r")


def split_tokens(tokens: np.ndarray, val_fraction: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): val is the last ``val_fraction`` of the tokens, held out and never sampled for training."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
    n_train = len(tokens) - int(len(tokens) * val_fraction)
    return tokens[:n_train], tokens[n_train:]


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens from shard ``shard`` of ``num_shards`` contiguous, equal
    shards of ``tokens``; the same seed gives the same batches."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 shard: int = 0, num_shards: int = 1):
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not one of {num_shards} shards")
        shard_tokens = len(tokens) // num_shards
        if shard_tokens < seq_len + 1:
            raise DataError(f"too little data: a shard holds {shard_tokens} tokens ({len(tokens)} in "
                            f"{num_shards} shards), fewer than seq_len + 1 = {seq_len + 1}")
        self.tokens = tokens[shard * shard_tokens:(shard + 1) * shard_tokens]
        self.seq_len, self.batch_size = seq_len, batch_size
        self._rng = np.random.default_rng(seed)
        self._offsets = np.arange(seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 of shape (batch_size, seq_len); y[:, t] is the token after x[:, t]."""
        starts = self._rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))  # (B, T+1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


DATA_SHARDS = 16  # peers hash into this many contiguous slices of the corpus


def peer_sampler(tokens: np.ndarray, peer_key: str, seq_len: int, batch_size: int, base_seed: int) -> BatchSampler:
    """The batches peer ``peer_key`` trains on: its own seed and its own shard, so peers see different data
    and a restarted peer (same ``--identity``) sees the same. Small data gets fewer shards, so each still
    holds about a hundred windows."""
    shards = max(1, min(DATA_SHARDS, len(tokens) // (100 * (seq_len + 1))))
    return BatchSampler(tokens, seq_len, batch_size, seed=peer_seed(peer_key, base_seed),
                        shard=peer_shard(peer_key, shards), num_shards=shards)


def peer_seed(peer_key: str, base_seed: int) -> int:
    """A 63-bit data seed for one peer: stable across processes and machines (unlike ``hash()``)."""
    digest = hashlib.sha256(f"seed\n{base_seed}\n{peer_key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def peer_shard(peer_key: str, num_shards: int) -> int:
    """Which of ``num_shards`` data shards a peer trains on, spread evenly over peer keys."""
    digest = hashlib.sha256(f"shard\n{peer_key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % num_shards
