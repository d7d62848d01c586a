"""Text <-> token ids: the byte tokenizer, bpe4k (a BPE trained on the corpus) or a user's ``tokenizer.json``.

``Tokenizer.sha256`` names the exact id mapping, the sha256 of the tokenizer's canonical JSON, so peers
can check they agree; ``to_json`` gives that JSON to keep beside a checkpoint, and ``tokenizer_from_json``
rebuilds the tokenizer from it (docs/architecture.md, "Data and tokenizers").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tokenizers

from swarm.fsutil import write_atomic
from swarm.sources import Corpus, DataError, one_line

log = logging.getLogger("swarm")

# The BPE trainer and encoder are deterministic either way; their thread pool buys nothing on a
# 2-core peer and makes tokenizers warn (and disable itself) in every process forked after use.
# tokenizers reads this variable at each call, so setting it after the import is enough.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KINDS = ("byte", "bpe4k", "file")
BPE_VOCAB_SIZE = 4096
BPE_TRAIN_CHARS = 64 << 20  # bpe4k trains on this much of the corpus's start, so a big corpus trains quickly
BYTE_SHA256 = hashlib.sha256(b"byte-v1").hexdigest()  # the byte tokenizer's mapping never changes
UINT16_IDS = 1 << 16  # vocabularies up to this size fit token ids in uint16; larger ones need uint32
MAX_TOKENIZER_FILE_BYTES = 256 << 20  # the largest tokenizer.json we read (real ones are tens of MB)


class Tokenizer:
    """Text <-> token ids (numpy ``dtype``: uint16, or uint32 for vocabularies above 65536 ids).

    ``kind`` is "byte", "bpe4k" or "file" (a tokenizer.json: one given by the user, or rebuilt from a
    checkpoint). Only ``sha256`` identifies the mapping. ``source`` names the JSON in error messages.
    """

    def __init__(self, kind: str, tokenizer_json: bytes | None = None, source: str = "tokenizer.json"):
        self.kind = kind
        if tokenizer_json is None:
            self._json, self._tokenizer = None, None
            self.vocab_size, self.sha256 = 256, BYTE_SHA256
        else:
            self._json = _canonical_json(tokenizer_json, source)
            try:
                self._tokenizer = tokenizers.Tokenizer.from_str(self._json.decode("utf-8"))
            except Exception as e:  # the tokenizers library raises plain Exception for a JSON it cannot use
                raise DataError(f"{source}: the tokenizers library cannot load it ({one_line(e)})") from None
            self.vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
            if self.vocab_size == 0:
                raise DataError(f"{source}: its vocabulary is empty")
            self.sha256 = hashlib.sha256(self._json).hexdigest()
        self.dtype = np.uint16 if self.vocab_size <= UINT16_IDS else np.uint32

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``, without the special tokens a tokenizer.json's post-processor would add."""
        if self._tokenizer is None:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        try:
            ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        except Exception as e:  # e.g. a WordLevel model without an unknown token meets an unknown word
            raise DataError(f"the {self.kind} tokenizer cannot encode the text ({one_line(e)})") from None
        return np.asarray(ids, dtype=self.dtype)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if self._tokenizer is None:
            return bytes(ids.tolist()).decode("utf-8", errors="replace")
        return self._tokenizer.decode(ids.tolist())

    def to_json(self) -> bytes | None:
        """The canonical tokenizer.json (its sha256 is ``sha256``); None for the byte tokenizer."""
        return self._json


def build_tokenizer(kind: str, corpus: Corpus, tokenizer_file: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """``"byte"`` (the 256 UTF-8 byte values), ``"bpe4k"`` (a 4096-token byte-level BPE trained on the first
    BPE_TRAIN_CHARS characters of ``corpus``) or ``"file"`` (``tokenizer_file``, a tokenizer.json).

    Training is deterministic, so every peer that trains on the same corpus gets the same ids. A trained
    BPE is cached in ``cache_dir`` (default ``default_cache_dir()``) under the corpus's identity.
    """
    if kind not in KINDS:
        raise DataError(f"unknown tokenizer {kind!r}: choose 'byte', 'bpe4k' or 'file' (a tokenizer.json)")
    if (kind == "file") != (tokenizer_file is not None):
        raise DataError("tokenizer 'file' needs a tokenizer.json file" if tokenizer_file is None else
                        f"a tokenizer file ({tokenizer_file}) is used only with tokenizer 'file', not {kind!r}")
    if kind == "byte":
        return Tokenizer("byte")
    if kind == "file":
        return Tokenizer("file", _read_tokenizer_file(Path(tokenizer_file)), source=f"tokenizer file {tokenizer_file}")
    if cache_dir is None:
        cache_dir = default_cache_dir()
    key = hashlib.sha256(f"{corpus.sha256}\n{BPE_TRAIN_CHARS}".encode()).hexdigest()
    path = Path(cache_dir) / f"bpe4k-{key}.json"
    if path.is_file():
        return Tokenizer("bpe4k", path.read_bytes(), source=str(path))
    bpe_json = _train_bpe(_prefix(corpus.chunks(), BPE_TRAIN_CHARS))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, bpe_json)
    except OSError as e:  # a cache we cannot write costs a retraining at the next start, nothing more
        log.warning("bpe4k tokenizer not cached in %s: %s", path.parent, e)
    return Tokenizer("bpe4k", bpe_json)


def tokenizer_from_json(blob: bytes | None) -> Tokenizer:
    """The tokenizer that ``Tokenizer.to_json`` gave ``blob`` (None: the byte tokenizer), e.g. from a checkpoint.
    Its ``kind`` is "file" whatever built it; its ``sha256`` is the original's."""
    return Tokenizer("byte") if blob is None else Tokenizer("file", blob, source="the run's tokenizer.json")


def default_cache_dir() -> Path:
    """Where trained tokenizers and token files are cached: ``$XDG_CACHE_HOME/swarm`` (``~/.cache/swarm``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swarm"


def _canonical_json(blob: bytes, source: str) -> bytes:
    """``blob`` re-serialised with sorted keys and no spaces, so the same tokenizer always hashes the same."""
    try:
        value = json.loads(blob)
        canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, a lone surrogate escape, deep nesting
        raise DataError(f"{source}: not valid JSON ({one_line(e)})") from None
    if not isinstance(value, dict):
        raise DataError(f"{source}: not a tokenizer.json (a JSON object)")
    return canonical


def _read_tokenizer_file(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"tokenizer file {path}: no such file")
    if not path.is_file():  # a FIFO or device would block or never end
        raise DataError(f"tokenizer file {path}: not a regular file")
    try:
        with open(path, "rb") as f:
            blob = f.read(MAX_TOKENIZER_FILE_BYTES + 1)
    except OSError as e:
        raise DataError(f"tokenizer file {path}: cannot read it ({e.strerror or e})") from None
    if len(blob) > MAX_TOKENIZER_FILE_BYTES:
        raise DataError(f"tokenizer file {path}: larger than {MAX_TOKENIZER_FILE_BYTES >> 20} MiB, "
                        f"so not a tokenizer.json")
    return blob


def _prefix(chunks: Iterable[str], max_chars: int) -> Iterator[str]:
    """The chunks that start within the first ``max_chars`` characters."""
    chars = 0
    for chunk in chunks:
        if chars >= max_chars:
            return
        yield chunk
        chars += len(chunk)


def _train_bpe(chunks: Iterable[str]) -> bytes:
    """Train GPT-2-style byte-level BPE and return its canonical JSON (sorted keys, no spaces).

    All 256 bytes are in the initial alphabet, so any text encodes without unknown tokens.
    """
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(chunks, trainer=trainer)
    return _canonical_json(bpe.to_str().encode("utf-8"), "bpe4k")
