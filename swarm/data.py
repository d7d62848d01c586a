"""Training data: the corpus (the embedded one or ``--data``), its tokens, and each peer's shard of them.

Every peer tokenizes the same corpus with the same tokenizer (``Corpus.sha256`` and ``Tokenizer.sha256``
let the run check both), keeps the last 2% of its tokens as held-out validation, and samples training
windows from its own contiguous shard of the rest with its own seed, so peers see different data (as in
DiLoCo, arXiv 2311.08105, where each worker trains on its own shard). Reading the data is
``swarm.sources``' job and turning text into ids ``swarm.tokenizer``'s; this module caches the ids and
samples them (docs/architecture.md, "Data and tokenizers").
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from swarm.fsutil import write_streamed
from swarm.sources import Corpus, DataError, load_corpus
from swarm.tokenizer import BYTE_SHA256, Tokenizer, build_tokenizer, default_cache_dir, tokenizer_from_json

__all__ = ["Corpus", "DataError", "load_corpus", "Tokenizer", "BYTE_SHA256", "build_tokenizer", "tokenizer_from_json",
           "default_cache_dir", "prepare_tokens", "split_tokens", "BatchSampler", "peer_sampler", "peer_seed",
           "peer_shard"]


def prepare_tokens(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | os.PathLike) -> np.memmap:
    """The corpus's token ids, memory-mapped read-only from ``<cache_dir>/tokens-<key>-<n_tokens>.u16`` (``.u32``
    for vocabularies above 65536 ids), where key hashes the tokenizer's and the corpus's sha256 (which covers
    the text column). Encoded once, chunk by chunk, and reused while the file has the size its name promises."""
    cache = Path(cache_dir)
    dtype = np.dtype(tokenizer.dtype).newbyteorder("<")
    suffix = f".u{8 * dtype.itemsize}"
    stem = "tokens-" + hashlib.sha256(f"{tokenizer.sha256}\n{corpus.sha256}".encode()).hexdigest()
    for path in cache.glob(f"{stem}-*{suffix}"):
        n_tokens = path.name[len(stem) + 1:-len(suffix)]
        if n_tokens.isdigit() and path.stat().st_size == dtype.itemsize * int(n_tokens):
            return np.memmap(path, dtype=dtype, mode="r")
    cache.mkdir(parents=True, exist_ok=True)
    return np.memmap(_encode_to_file(corpus, tokenizer, dtype, cache / stem, suffix), dtype=dtype, mode="r")


def _encode_to_file(corpus: Corpus, tokenizer: Tokenizer, dtype: np.dtype, stem: Path, suffix: str) -> Path:
    """Append each chunk's ids to a temp file beside the final one as they come, then rename it to
    ``<stem>-<n_tokens><suffix>`` (fsutil.write_streamed: a crash leaves only a temp file, never read)."""

    def fill(f) -> Path:
        n_tokens = 0
        for chunk in corpus.chunks():
            ids = tokenizer.encode(chunk).astype(dtype, copy=False)
            f.write(memoryview(ids))
            n_tokens += len(ids)
        if n_tokens == 0:
            raise DataError(f"the {tokenizer.kind} tokenizer turns {corpus.name} into no tokens")
        return stem.with_name(f"{stem.name}-{n_tokens}{suffix}")

    return write_streamed(stem.parent, stem.name, fill)


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
