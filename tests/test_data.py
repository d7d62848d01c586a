"""Corpus, tokenizers, token cache and sampler, on the real embedded corpus and real files: text, JSON Lines and
Parquet written here, and tokenizer.json files trained here with the tokenizers library."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import torch

from swarm.data import (BatchSampler, DataError, build_tokenizer, load_corpus, peer_seed, peer_shard, prepare_tokens,
                        split_tokens, tokenizer_from_json)
from swarm.chunks import CHUNK_CHARS, MAX_CHUNK_CHARS
from swarm.sources import DOC_SEPARATOR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS_TEXT_SHA256 = "84ae3b8e84827f26aa285c633f73cdcffd70934732814ea849b9c329be0ad00b"  # swarm/corpus/NOTICE
# What the embedded corpus gave before JSON Lines and Parquet existed: benchmarks and runs depend on them.
BPE4K_SHA256 = "046fcdcd5af2ba8bb1f853f29792b366f9ea257979dc4dd38442a6baa6bf96c9"
BYTE_TOKENS_SHA256 = "cc68f8aead5abe9a81b0fcb2a913f192d87c0495c75fc143423f3881d5af3cfd"
BPE4K_TOKENS_SHA256 = "9e047bbdb1dcee76cdb0935a969f494ea88c8f7216f2e295c9eaf3a12ed59ae8"
TRAIN_BPE = ("import sys; from swarm.data import build_tokenizer, load_corpus; "
             "print(build_tokenizer('bpe4k', load_corpus(None), cache_dir=sys.argv[1]).sha256)")
READ_DATA = ("import sys; from swarm.sources import load_corpus; c = load_corpus(sys.argv[1]); "
             "print(c.sha256, sum(len(d) for d in c.documents()))")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None)


@pytest.fixture(scope="module")
def text(corpus) -> str:
    return "".join(corpus.documents())


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    return build_tokenizer("bpe4k", corpus, cache_dir=tmp_path_factory.mktemp("bpe-cache"))


def documents(path, text_column: str = "text") -> list[str]:
    return list(load_corpus(path, text_column).documents())


def write_jsonl(path, docs, column: str = "text") -> None:
    path.write_text("".join(json.dumps({"id": i, column: doc}) + "\n" for i, doc in enumerate(docs)))


def write_parquet(path, docs, column: str = "text", row_group_size: int = 1024) -> None:
    pq.write_table(pa.table({"id": list(range(len(docs))), column: docs}), path, row_group_size=row_group_size)


def train_tokenizer_json(path, text: str, vocab_size: int = 400) -> tokenizers.Tokenizer:
    """A small byte-level BPE saved as a tokenizer.json, with a post-processor that adds <s>, as many have."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, special_tokens=["<s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(path))
    return tok


def test_embedded_corpus_is_the_built_shakespeare(corpus, text):
    assert (corpus.name, corpus.sha256, corpus.text_column) == ("shakespeare (embedded)", CORPUS_TEXT_SHA256, None)
    assert len(text) > 4_000_000
    assert "HAMLET, PRINCE OF DENMARK" in text and "To be, or not to be" in text
    assert text.count("<|endoftext|>") == 41  # 42 works
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == CORPUS_TEXT_SHA256


def test_embedded_corpus_tokens_are_unchanged(corpus, bpe, tmp_path):
    assert bpe.sha256 == BPE4K_SHA256
    for tokenizer, expected in [(build_tokenizer("byte", corpus), BYTE_TOKENS_SHA256), (bpe, BPE4K_TOKENS_SHA256)]:
        tokens = prepare_tokens(corpus, tokenizer, tmp_path)
        assert tokens.dtype == np.dtype("<u2") and str(tokens.filename).endswith(".u16")
        assert hashlib.sha256(tokens.tobytes()).hexdigest() == expected


def test_directory_reads_data_files_sorted_by_relative_path(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.MD").write_text("two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "c.py.gz").write_bytes(gzip.compress("three".encode()))
    write_jsonl(tmp_path / "d.jsonl", ["four", "five"])
    write_parquet(tmp_path / "e[1].parquet", ["six", "seven"])  # datasets would take [1] as a glob
    (tmp_path / "f.bin").write_bytes(b"\0\1ignored: not a data suffix")
    corpus = load_corpus(tmp_path)
    assert corpus.name == tmp_path.name and corpus.text_column == "text"
    assert list(corpus.documents()) == ["one", "two", "three", "four", "five", "six", "seven"]
    assert "".join(corpus.chunks()) == "one\n\ntwo\n\nthree\n\nfour\n\nfive\n\nsix\n\nseven"
    assert documents(str(tmp_path / "b" / "two.MD")) == ["two"]
    assert load_corpus(tmp_path / "a.txt").text_column is None  # no columns: the text column plays no part
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8: replaced, not refused
    assert documents(tmp_path / "bad.txt") == ["caf\ufffd"]


def test_json_lines_and_parquet_with_a_tokenizer_file(text, tmp_path):
    tok_path = tmp_path / "tokenizer.json"
    reference = train_tokenizer_json(tok_path, text[:8000])
    docs = [text[i:i + 997] for i in range(0, 200_000, 997)] + ["", "naïve 日本 \t\r\n"]
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", docs[:100], column="body")
    write_parquet(data / "b.parquet", docs[100:], column="body", row_group_size=37)  # several row groups, in order
    corpus = load_corpus(data, text_column="body")
    assert list(corpus.documents()) == docs

    tokenizer = build_tokenizer("file", corpus, tokenizer_file=tok_path)
    assert (tokenizer.kind, tokenizer.vocab_size, tokenizer.dtype) == ("file", 400, np.uint16)
    tokens = prepare_tokens(corpus, tokenizer, tmp_path / "cache")
    expected = reference.encode(DOC_SEPARATOR.join(docs), add_special_tokens=False).ids
    assert tokens.dtype == np.dtype("<u2") and tokens.tolist() == expected
    assert reference.token_to_id("<s>") not in expected  # no post-processor tokens in the training stream
    assert tokenizer.decode(tokens) == DOC_SEPARATOR.join(docs)


def test_tokens_over_many_chunks_equal_the_whole_text_encoded(text, tmp_path):
    """Cut into chunks and streamed to disk, the ids are those of the whole text, whatever the document sizes."""
    tok_path = tmp_path / "tokenizer.json"
    reference = train_tokenizer_json(tok_path, text[:8000])
    whole = text[:2_500_000]
    (tmp_path / "whole.txt").write_text(whole)
    write_jsonl(tmp_path / "parts.jsonl", whole.split(DOC_SEPARATOR))  # joined again, the same text
    as_text, as_jsonl = load_corpus(tmp_path / "whole.txt"), load_corpus(tmp_path / "parts.jsonl")
    chunks = list(as_text.chunks())
    assert list(as_jsonl.chunks()) == chunks and "".join(chunks) == whole
    assert len(chunks) == 3 and all(CHUNK_CHARS <= len(c) <= MAX_CHUNK_CHARS for c in chunks[:-1])
    tokenizer = build_tokenizer("file", as_jsonl, tokenizer_file=tok_path)
    tokens = prepare_tokens(as_jsonl, tokenizer, tmp_path / "cache")
    assert tokens.tolist() == reference.encode(whole, add_special_tokens=False).ids


def test_single_line_documents_are_cut_between_them_exactly(text, tmp_path):
    """Documents without newlines of their own (JSON Lines often hold one paragraph each) are cut at the separator
    between two of them, where the ids stay those of the whole text."""
    tok_path = tmp_path / "tokenizer.json"
    reference = train_tokenizer_json(tok_path, text[:8000])
    lines = [line for line in text[:1_300_000].splitlines() if line.strip()]
    write_jsonl(tmp_path / "lines.jsonl", lines)
    corpus = load_corpus(tmp_path / "lines.jsonl")
    chunks = list(corpus.chunks())
    first = chunks[0].removesuffix("\n").split(DOC_SEPARATOR)  # cut between the two newlines of a separator
    assert len(chunks) == 2 and first == lines[:len(first)]
    assert chunks[1] == "\n" + DOC_SEPARATOR.join(lines[len(first):]) and CHUNK_CHARS <= len(chunks[0])
    tokens = prepare_tokens(corpus, build_tokenizer("file", corpus, tokenizer_file=tok_path), tmp_path / "cache")
    assert tokens.tolist() == reference.encode(DOC_SEPARATOR.join(lines), add_special_tokens=False).ids


def test_text_without_a_safe_cut_is_still_cut_into_bounded_chunks(tmp_path):
    (tmp_path / "one-line.txt").write_text("x" * (MAX_CHUNK_CHARS + 10))
    assert [len(c) for c in load_corpus(tmp_path / "one-line.txt").chunks()] == [MAX_CHUNK_CHARS, 10]


def test_token_cache_is_reused_and_keyed_by_tokenizer_data_and_column(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "the first text", "title": "first"}\n{"text": "and the second", "title": "second"}\n')
    corpus = load_corpus(data)
    byte = build_tokenizer("byte", corpus)
    tokens = prepare_tokens(corpus, byte, tmp_path / "cache")
    assert tokens.tolist() == list(b"the first text\n\nand the second")
    assert isinstance(tokens, np.memmap) and not tokens.flags.writeable
    path, stat = tokens.filename, os.stat(tokens.filename)
    again = prepare_tokens(load_corpus(data), byte, tmp_path / "cache")
    assert again.filename == path
    assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # not rewritten
    titles = prepare_tokens(load_corpus(data, text_column="title"), byte, tmp_path / "cache")
    assert titles.filename != path and titles.tolist() == list(b"first\n\nsecond")
    tok_path = tmp_path / "tokenizer.json"
    train_tokenizer_json(tok_path, "the first text and the second " * 50, vocab_size=300)
    other = prepare_tokens(corpus, build_tokenizer("file", corpus, tokenizer_file=tok_path), tmp_path / "cache")
    assert other.filename not in (path, titles.filename)
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(os.path.basename(t.filename)
                                                            for t in (tokens, titles, other))


def test_prepare_tokens_ignores_leftovers_of_an_interrupted_write(tmp_path):
    text = "a short text, encoded twice\n" * 50
    (tmp_path / "data.txt").write_text(text)
    corpus = load_corpus(tmp_path / "data.txt")
    tok = build_tokenizer("byte", corpus)
    cache = tmp_path / "cache"
    path = prepare_tokens(corpus, tok, cache).filename
    with open(os.path.join(cache, f".{os.path.basename(path)}.x1y2.tmp"), "wb") as f:
        f.write(b"\xff" * 100)  # a temp file a crash left behind
    truncated = os.path.join(cache, "truncated")
    with open(truncated, "wb") as f:
        f.write(open(path, "rb").read()[:-2])
    os.replace(truncated, path)  # a final file of the wrong size: rebuilt
    tokens = prepare_tokens(corpus, tok, cache)
    assert tokens.filename == path
    np.testing.assert_array_equal(tokens, tok.encode(text))
    x, y = BatchSampler(split_tokens(tokens)[0], seq_len=8, batch_size=2, seed=0).next_batch()  # from the memmap
    assert tok.decode(x[0]) in text and tok.decode(y[0]) in text


def test_documents_are_read_as_they_are_consumed_and_a_failed_encoding_leaves_nothing(tmp_path):
    data = tmp_path / "late-error.jsonl"
    write_jsonl(data, [f"document {i}" for i in range(3000)])
    with open(data, "a") as f:
        f.write('{"text": "unterminated\n')
    docs = load_corpus(data).documents()
    assert [next(docs) for _ in range(3000)] == [f"document {i}" for i in range(3000)]  # before the bad line
    with pytest.raises(DataError, match="late-error.jsonl: line 3001 is not valid JSON"):
        next(docs)
    corpus = load_corpus(data)
    with pytest.raises(DataError, match="line 3001"):
        prepare_tokens(corpus, build_tokenizer("byte", corpus), tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []  # neither a token file nor a temp file


def test_vocabulary_above_65536_ids_gives_uint32_token_files(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    word_level.save(str(tmp_path / "tokenizer.json"))
    write_jsonl(tmp_path / "words.jsonl", ["w1 w69999 w65536", "w65535 unknown"])
    corpus = load_corpus(tmp_path / "words.jsonl")
    tokenizer = build_tokenizer("file", corpus, tokenizer_file=tmp_path / "tokenizer.json")
    assert (tokenizer.vocab_size, tokenizer.dtype) == (70_001, np.uint32)
    tokens = prepare_tokens(corpus, tokenizer, tmp_path / "cache")
    assert tokens.dtype == np.dtype("<u4") and str(tokens.filename).endswith("-5.u32")
    assert tokens.tolist() == [1, 69_999, 65_536, 65_535, 70_000]
    x, y = BatchSampler(tokens, seq_len=3, batch_size=4, seed=0).next_batch()
    assert x.dtype == torch.int64 and int(torch.cat([x, y]).max()) > 65_535


def test_data_sha256_is_the_same_in_another_process_and_changes_with_one_byte(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_jsonl(data / "a.jsonl", ["alpha", "beta"])
    write_parquet(data / "c.parquet", ["gamma"])
    (data / "sub" / "b.txt").write_text("delta")
    sha = load_corpus(data).sha256
    records = b"".join(name.encode() + b"\0" + hashlib.sha256((data / name).read_bytes()).digest()
                       for name in ("a.jsonl", "c.parquet", "sub/b.txt"))
    assert sha == hashlib.sha256(records + b"\0text_column\0text").hexdigest()  # the scheme peers rely on

    # A fresh process, its own hash seed and an empty home: the same hash, and datasets leaves no cache behind.
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    out = subprocess.run([sys.executable, "-c", READ_DATA, str(data)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(env, HOME=str(home), PYTHONHASHSEED="12345"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [sha, str(len("alphabetagammadelta"))]
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []

    copy = tmp_path / "elsewhere"
    shutil.copytree(data, copy)
    assert load_corpus(copy).sha256 == sha  # the directory's own name plays no part
    assert load_corpus(copy, text_column="body").sha256 != sha  # another column, other documents
    blob = bytearray((copy / "sub" / "b.txt").read_bytes())
    blob[0] ^= 1
    (copy / "sub" / "b.txt").write_bytes(blob)
    assert load_corpus(copy).sha256 != sha
    (copy / "sub" / "b.txt").write_text("delta")
    assert load_corpus(copy).sha256 == sha
    (copy / "sub" / "b.txt").rename(copy / "sub" / "b2.txt")
    assert load_corpus(copy).sha256 != sha


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.txt", "no such file or directory"),
    (lambda d: d, "no data files in it"),
    (lambda d: (d / "empty.txt").write_text("\n \n") and d / "empty.txt", "no text in it"),
    (lambda d: (d / "x.txt").write_bytes(b"ab\0cd") and d, "x.txt: not a text file"),
    (lambda d: (d / "x.txt.gz").write_bytes(b"not gzip") and d / "x.txt.gz", "x.txt.gz: cannot read it"),
])
def test_bad_data_paths_raise_data_error(tmp_path, make, message):
    with pytest.raises(DataError, match=message) as error:
        documents(make(tmp_path))
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "fine"}\n{"text": oops}\n', r"line 2 is not valid JSON \(Expecting value at column 10\)"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', r"line 1 is not valid JSON \('utf-8' codec can't decode"),
    ("array.json", b'["a", "b"]\n', "line 1 is an array, not a JSON object"),
    ("other.jsonl", b'{"body": "a", "id": 1}\n', r"line 1 has no 'text' field \(it has 'body', 'id'\)"),
    ("number.jsonl", b'{"text": "a"}\n\n{"text": 5}\n', "line 3: 'text' is a number, not a string"),
    ("null.jsonl", b'{"text": null}\n', "line 1: 'text' is null, not a string"),
    ("empty.jsonl", b"", "no documents in it"),
    ("blank.json", b"\n  \n", "no documents in it"),
    ("cut.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 100)[:-9], "cannot read it"),
    ("garbage.parquet", b"PAR1 but not really", "not a Parquet file we can read"),
    ("empty.parquet", b"", "not a Parquet file we can read"),
])
def test_bad_json_lines_and_parquet_files_raise_one_line_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message) as error:
        documents(tmp_path)
    assert str(tmp_path / name) in str(error.value) and len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("table, message", [
    (pa.table({"body": ["a"], "id": [1]}), r"no 'text' column \(it has 'body', 'id'\)"),
    (pa.table({"text": [1, 2]}), "column 'text' holds int64, not strings"),
    (pa.table({"text": ["a"] * 1500 + [None]}), r"row 1501 has no 'text' \(null\)"),
    (pa.table({"text": pa.array([], pa.string())}), "no documents in it"),
])
def test_parquet_without_usable_text_raises_one_line_naming_the_file(tmp_path, table, message):
    pq.write_table(table, tmp_path / "data.parquet")
    with pytest.raises(DataError, match=message) as error:
        documents(tmp_path / "data.parquet")
    assert str(tmp_path / "data.parquet") in str(error.value) and len(str(error.value).splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_raises_data_error(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("hidden")
    path.chmod(0)
    with pytest.raises(DataError, match="cannot read it"):
        load_corpus(path)


def test_unknown_tokenizer_kind(corpus):
    with pytest.raises(DataError, match="unknown tokenizer 'bpe99k'"):
        build_tokenizer("bpe99k", corpus)


@pytest.mark.parametrize("kind, make, message", [
    ("file", lambda d: None, "tokenizer 'file' needs a tokenizer.json file"),
    ("bpe4k", lambda d: d / "tokenizer.json", "is used only with tokenizer 'file', not 'bpe4k'"),
    ("file", lambda d: d / "missing.json", "missing.json: no such file"),
    ("file", lambda d: d, "not a regular file"),
    ("file", lambda d: (d / "t.json").write_text('{"model": ') and d / "t.json", "t.json: not valid JSON"),
    ("file", lambda d: (d / "t.json").write_text("[1, 2]") and d / "t.json", "not a tokenizer.json"),
    ("file", lambda d: (d / "t.json").write_text('{"model": 5}') and d / "t.json",
     "t.json: the tokenizers library cannot load it"),
])
def test_bad_tokenizer_files_raise_one_line(corpus, tmp_path, kind, make, message):
    with pytest.raises(DataError, match=message) as error:
        build_tokenizer(kind, corpus, tokenizer_file=make(tmp_path))
    assert len(str(error.value).splitlines()) == 1


def test_tokenizer_file_hash_is_of_its_canonical_json_and_survives_a_checkpoint(text, tmp_path):
    reference = train_tokenizer_json(tmp_path / "pretty.json", text[:8000])
    reference.save(str(tmp_path / "compact.json"), pretty=False)
    value = json.loads((tmp_path / "pretty.json").read_bytes())
    (tmp_path / "reordered.json").write_text(json.dumps(dict(reversed(value.items())), indent=3))
    corpus = load_corpus(None)
    compact, pretty, reordered = (build_tokenizer("file", corpus, tokenizer_file=tmp_path / name)
                                  for name in ("compact.json", "pretty.json", "reordered.json"))
    assert len({(tmp_path / name).read_bytes() for name in ("compact.json", "pretty.json", "reordered.json")}) == 3
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert compact.to_json() == pretty.to_json() == reordered.to_json() == canonical
    assert compact.sha256 == pretty.sha256 == reordered.sha256 == hashlib.sha256(canonical).hexdigest()
    rebuilt = tokenizer_from_json(compact.to_json())
    sample = text[50_000:60_000]
    assert (rebuilt.kind, rebuilt.sha256) == ("file", compact.sha256)
    assert rebuilt.encode(sample).tolist() == compact.encode(sample).tolist()
    byte = tokenizer_from_json(None)
    assert (byte.kind, byte.sha256, byte.to_json()) == ("byte", build_tokenizer("byte", corpus).sha256, None)


def test_byte_tokenizer_round_trips(corpus):
    tok = build_tokenizer("byte", corpus)
    text = "To be, or not to be — naïve 日本\n"
    ids = tok.encode(text)
    assert (tok.kind, tok.vocab_size, ids.dtype) == ("byte", 256, np.uint16)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text and tok.decode(torch.from_numpy(ids.astype(np.int64))) == text
    assert tok.sha256 == hashlib.sha256(b"byte-v1").hexdigest()


def test_bpe4k_round_trips_and_compresses(bpe, text):
    assert (bpe.kind, bpe.vocab_size) == ("bpe4k", 4096)
    sample = text[1_000_000:1_100_000] + " naïve 日本 \t\r\n\x00"
    ids = bpe.encode(sample)
    assert ids.dtype == np.uint16 and int(ids.max()) < 4096
    assert bpe.decode(ids) == sample
    assert len(ids) < len(sample) / 2.5  # about 3 characters a token on Shakespeare
    assert tokenizer_from_json(bpe.to_json()).sha256 == bpe.sha256 == hashlib.sha256(bpe.to_json()).hexdigest()


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
    assert build_tokenizer("bpe4k", corpus, cache_dir=tmp_path / "cache0").sha256 == bpe.sha256
    assert hashlib.sha256(cached[0].read_bytes()).hexdigest() == bpe.sha256  # sha256 of the canonical JSON


def test_bpe4k_trains_on_json_lines_and_refuses_bad_data(tmp_path, text):
    write_jsonl(tmp_path / "plays.jsonl", text[:300_000].split(DOC_SEPARATOR))
    corpus = load_corpus(tmp_path / "plays.jsonl")
    tokenizer = build_tokenizer("bpe4k", corpus, cache_dir=tmp_path / "cache")
    sample = text[400_000:420_000]
    assert tokenizer.vocab_size == 4096 and tokenizer.decode(tokenizer.encode(sample)) == sample
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2 has no 'text' field"):
        build_tokenizer("bpe4k", load_corpus(tmp_path / "bad.jsonl"), cache_dir=tmp_path / "cache")


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
