"""Corpus, tokenizers, token cache and sampler, on the real embedded corpus and real files."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from swarm.data import (BatchSampler, DataError, build_tokenizer, load_text, peer_seed, peer_shard,
                        prepare_tokens, split_tokens)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS_TEXT_SHA256 = "84ae3b8e84827f26aa285c633f73cdcffd70934732814ea849b9c329be0ad00b"  # swarm/corpus/NOTICE
TRAIN_BPE = ("import sys; from swarm.data import build_tokenizer, load_text; "
             "print(build_tokenizer('bpe4k', load_text(None), sys.argv[1]).sha256)")


@pytest.fixture(scope="module")
def corpus() -> str:
    return load_text(None)


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    return build_tokenizer("bpe4k", corpus, tmp_path_factory.mktemp("bpe-cache"))


def test_embedded_corpus_is_the_built_shakespeare(corpus):
    assert len(corpus) > 4_000_000
    assert "HAMLET, PRINCE OF DENMARK" in corpus and "To be, or not to be" in corpus
    assert corpus.count("<|endoftext|>") == 41  # 42 works
    assert hashlib.sha256(corpus.encode("utf-8")).hexdigest() == CORPUS_TEXT_SHA256


def test_directory_reads_text_files_sorted_by_relative_path(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.MD").write_text("two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "c.py.gz").write_bytes(gzip.compress("three".encode()))
    (tmp_path / "d.bin").write_bytes(b"\0\1ignored: not a text suffix")
    assert load_text(tmp_path) == "one\n\ntwo\n\nthree"
    assert load_text(str(tmp_path / "b" / "two.MD")) == "two"
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8: replaced, not refused
    assert load_text(tmp_path / "bad.txt") == "caf\ufffd"


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.txt", "no such file or directory"),
    (lambda d: d, "no text files"),
    (lambda d: (d / "empty.txt").write_text("\n \n") and d / "empty.txt", "no text in it"),
    (lambda d: (d / "x.txt").write_bytes(b"ab\0cd") and d, "not a text file"),
    (lambda d: (d / "x.txt.gz").write_bytes(b"not gzip") and d / "x.txt.gz", "cannot read it"),
])
def test_bad_data_paths_raise_data_error(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_text(make(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_raises_data_error(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("hidden")
    path.chmod(0)
    with pytest.raises(DataError, match="cannot read it"):
        load_text(path)


def test_unknown_tokenizer_kind():
    with pytest.raises(DataError, match="unknown tokenizer 'bpe99k'"):
        build_tokenizer("bpe99k", "text")


def test_byte_tokenizer_round_trips():
    tok = build_tokenizer("byte", "unused")
    text = "To be, or not to be — naïve 日本\n"
    ids = tok.encode(text)
    assert (tok.kind, tok.vocab_size, ids.dtype) == ("byte", 256, np.uint16)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text and tok.decode(torch.from_numpy(ids.astype(np.int64))) == text
    assert tok.sha256 == build_tokenizer("byte", "other text").sha256 == hashlib.sha256(b"byte-v1").hexdigest()


def test_bpe4k_round_trips_and_compresses(bpe, corpus):
    assert (bpe.kind, bpe.vocab_size) == ("bpe4k", 4096)
    sample = corpus[1_000_000:1_100_000] + " naïve 日本 \t\r\n\x00"
    ids = bpe.encode(sample)
    assert ids.dtype == np.uint16 and int(ids.max()) < 4096
    assert bpe.decode(ids) == sample
    assert len(ids) < len(sample) / 2.5  # about 3 characters a token on Shakespeare


def test_bpe4k_is_cached_and_trains_identically_in_separate_processes(bpe, corpus, tmp_path):
    # One process with tokenizers' thread pool and one without: the ids must not depend on it.
    procs = [subprocess.Popen([sys.executable, "-c", TRAIN_BPE, str(tmp_path / f"cache{i}")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM=par))
             for i, par in enumerate(["true", "false"])]
    shas = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert shas == [bpe.sha256, bpe.sha256]
    cached = list((tmp_path / "cache0").glob("bpe4k-*.json"))
    assert len(cached) == 1
    assert build_tokenizer("bpe4k", corpus, tmp_path / "cache0").sha256 == bpe.sha256
    assert hashlib.sha256(cached[0].read_bytes()).hexdigest() == bpe.sha256  # sha256 of the canonical JSON


def test_prepare_tokens_matches_encode_and_is_reused(bpe, corpus, tmp_path):
    text = corpus[:3_000_000]  # three encoding chunks: the cuts between them must not change the ids
    tokens = prepare_tokens(text, bpe, tmp_path)
    np.testing.assert_array_equal(tokens, bpe.encode(text))
    assert isinstance(tokens, np.memmap) and not tokens.flags.writeable
    path, stat = tokens.filename, os.stat(tokens.filename)
    again = prepare_tokens(text, bpe, tmp_path)
    assert again.filename == path
    assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # not rewritten
    assert prepare_tokens(text[:-1], bpe, tmp_path).filename != path


def test_prepare_tokens_ignores_leftovers_of_an_interrupted_write(tmp_path):
    tok, text = build_tokenizer("byte", ""), "a short text, encoded twice\n" * 50
    path = prepare_tokens(text, tok, tmp_path).filename
    with open(os.path.join(tmp_path, f".{os.path.basename(path)}.x1y2.tmp"), "wb") as f:
        f.write(b"\xff" * 100)  # a temp file a crash left behind
    truncated = os.path.join(tmp_path, "truncated")
    with open(truncated, "wb") as f:
        f.write(open(path, "rb").read()[:-2])
    os.replace(truncated, path)  # a final file of the wrong size: rebuilt
    tokens = prepare_tokens(text, tok, tmp_path)
    assert tokens.filename == path
    np.testing.assert_array_equal(tokens, tok.encode(text))
    x, y = BatchSampler(split_tokens(tokens)[0], seq_len=8, batch_size=2, seed=0).next_batch()  # from the memmap
    assert tok.decode(x[0]) in text and tok.decode(y[0]) in text


def test_split_holds_out_the_tail():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens)
    assert (len(train), len(val)) == (980, 20)
    assert train[-1] == 979 and val[0] == 980 and val[-1] == 999
    assert len(split_tokens(tokens, 0.0)[1]) == 0


def test_sampler_is_deterministic_and_y_is_x_shifted():
    tokens = np.arange(10_000, dtype=np.uint16)  # each token is its own position
    a, b, c = (BatchSampler(tokens, seq_len=16, batch_size=4, seed=s) for s in (7, 7, 8))
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = a.next_batch(), b.next_batch(), c.next_batch()
        assert xa.shape == ya.shape == (4, 16) and xa.dtype == ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
        assert torch.equal(ya, xa + 1)  # the next token of each position
        assert torch.equal(ya[:, :-1], xa[:, 1:])


def test_sampler_shards_are_disjoint_and_cover_their_range():
    tokens = np.arange(3000, dtype=np.uint16)
    seen = []
    for shard in range(3):
        sampler = BatchSampler(tokens, seq_len=8, batch_size=16, seed=shard, shard=shard, num_shards=3)
        x, y = zip(*(sampler.next_batch() for _ in range(200)))
        values = set(torch.cat(x).flatten().tolist()) | set(torch.cat(y).flatten().tolist())
        assert min(values) == shard * 1000 and max(values) == shard * 1000 + 999
        seen.append(values)
    assert not (seen[0] & seen[1] or seen[1] & seen[2] or seen[0] & seen[2])


def test_sampler_refuses_too_little_data():
    with pytest.raises(DataError, match="too little data"):
        BatchSampler(np.arange(40, dtype=np.uint16), seq_len=16, batch_size=2, seed=0, num_shards=3)


def test_peer_seed_and_shard_are_stable_and_spread():
    assert peer_seed("QmPeerA", 0) == 565649142791202784  # sha256-based: the same in every process
    assert peer_shard("QmPeerA", 16) == 10
    seeds = {peer_seed(f"peer{i}", 0) for i in range(100)} | {peer_seed("peer0", 1)}
    assert len(seeds) == 101 and all(0 <= s < 2**63 for s in seeds)
    counts = np.bincount([peer_shard(f"peer{i}", 4) for i in range(1000)], minlength=4)
    assert counts.sum() == 1000 and counts.min() > 200
