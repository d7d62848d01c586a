"""Where the training text comes from: the embedded corpus or ``--data`` (plain text, JSON Lines, Parquet).

``load_corpus`` only lists the files and hashes their bytes, which gives the run a data identity that
every peer with the same files computes alike. The text itself is read later, one document at a time,
by ``Corpus.documents()`` and ``Corpus.chunks()``, so a corpus larger than memory can be tokenized
(docs/architecture.md, "Data and tokenizers"). Whatever a user's file holds, reading it either works or raises
``DataError`` with one line that names the file.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from swarm.chunks import chunks

EMBEDDED_NAME = "shakespeare (embedded)"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".csv", ".tex", ".html")  # and .gz of them
JSONL_SUFFIXES = (".jsonl", ".json")  # JSON Lines, one document a line (and .gz of them)
PARQUET_SUFFIX = ".parquet"
DOC_SEPARATOR = "\n\n"  # between documents: what joined a directory's text files before JSON Lines existed
MAX_JSON_LINE_BYTES = 64 << 20  # one JSON Lines record; a longer line is refused, not read whole
PARQUET_BATCH_ROWS = 1024  # Parquet rows decoded at a time
NAMES_SHOWN = 8  # field or column names an error message lists
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON escapes can make them; UTF-8 cannot encode them


class DataError(ValueError):
    """A ``--data`` path, tokenizer file or tokenizer choice we cannot train on; the message is one line for users."""


@dataclass(frozen=True)
class Corpus:
    """Training text and its identity. ``name`` is for people; ``sha256`` is what peers compare: two peers
    with the same files and text column compute the same value (see ``load_corpus``). ``text_column`` is the
    field read from JSON Lines and Parquet files, None when the corpus has none."""

    name: str
    sha256: str
    text_column: str | None = None
    files: tuple[Path, ...] = ()  # in reading order; () is the embedded corpus
    root: Path | None = None  # what --data named

    def documents(self) -> Iterator[str]:
        """The documents, read as they are consumed: a text file is one document, a JSON Lines line or a
        Parquet row is one. Raises DataError on the first thing that cannot be read, or if there is no text."""
        if self.root is None:
            yield _embedded_text()
            return
        has_text = False
        for file in self.files:
            for doc in _read_documents(file, self.text_column):
                has_text = has_text or (doc != "" and not doc.isspace())
                yield doc
        if not has_text:
            raise DataError(f"--data {self.root}: no text in it")

    def chunks(self) -> Iterator[str]:
        """The documents joined by DOC_SEPARATOR, in bounded chunks that a byte-level BPE encodes exactly as the
        whole text (``swarm.chunks``): what tokenizers are given."""
        return chunks(_joined(self.documents()))


def load_corpus(path: str | os.PathLike | None, text_column: str = "text") -> Corpus:
    """The embedded corpus for None, else the file or directory at ``path``.

    A directory holds every text, JSON Lines and Parquet file under it (by suffix, ``.gz`` too for text and
    JSON Lines), read in the order of their relative paths; a single file with another suffix is read as
    text. ``sha256`` hashes each file's bytes with its relative path (its name, for a single file), in that
    order, and ``text_column`` where a file has columns, so it is cheap to compute, the same on every
    machine, and differs whenever the documents would; for the embedded corpus it is the sha256 of the
    decompressed text.
    """
    if path is None:
        return Corpus(EMBEDDED_NAME, hashlib.sha256(_embedded_text().encode("utf-8")).hexdigest())
    root = Path(path)
    if root.is_dir():
        named = sorted((f.relative_to(root).as_posix(), f) for f in root.rglob("*") if f.is_file() and _format(f))
        if not named:
            raise DataError(f"--data {path}: no data files in it ({' '.join(TEXT_SUFFIXES)}, "
                            f"{' '.join(JSONL_SUFFIXES)}, .gz of those, or {PARQUET_SUFFIX})")
    elif root.is_file():
        named = [(root.name, root)]
    elif root.exists():
        raise DataError(f"--data {path}: not a regular file or directory")
    else:
        raise DataError(f"--data {path}: no such file or directory")
    files = tuple(f for _, f in named)
    column = text_column if any(_format(f) in ("jsonl", "parquet") for f in files) else None
    return Corpus(name=root.resolve().name or str(root), sha256=_data_sha256(named, column),
                  text_column=column, files=files, root=root)


def one_line(error: BaseException) -> str:
    """The first line of a library's error message, for a DataError that must stay one line."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _embedded_text() -> str:
    blob = (resources.files("swarm") / "corpus" / "shakespeare.txt.gz").read_bytes()
    return gzip.decompress(blob).decode("utf-8")


def _format(path: Path) -> str | None:
    """"text", "jsonl" or "parquet" by the file's suffix; None for files a directory's listing skips."""
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIX):
        return "parquet"
    suffix = Path(name.removesuffix(".gz")).suffix
    return "jsonl" if suffix in JSONL_SUFFIXES else "text" if suffix in TEXT_SUFFIXES else None


def _data_sha256(named: list[tuple[str, Path]], text_column: str | None) -> str:
    """sha256 over (relative path, NUL, sha256 of the file's bytes) for each file in order, reading each in blocks,
    then (NUL, "text_column", NUL, the column) if there is one: no path starts with NUL, so no two inputs mix."""
    total = hashlib.sha256()
    for relative, file in named:
        try:
            with open(file, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").digest()
        except OSError as e:
            raise DataError(f"--data {file}: cannot read it ({e.strerror or e})") from None
        total.update(relative.encode("utf-8", "surrogateescape") + b"\0" + digest)
    if text_column is not None:
        total.update(b"\0text_column\0" + text_column.encode("utf-8", "surrogateescape"))
    return total.hexdigest()


def _read_documents(file: Path, text_column: str | None) -> Iterator[str]:
    kind = _format(file) or "text"
    if kind == "jsonl":
        return _jsonl_documents(file, text_column)
    if kind == "parquet":
        return _parquet_documents(file, text_column)
    return iter([_read_text(file)])


def _read_text(file: Path) -> str:
    """A text file as one document; bytes that are not UTF-8 become U+FFFD, as editors show them."""
    try:
        with _open(file) as f:
            blob = f.read()
    except (OSError, EOFError, zlib.error) as e:  # EOFError, zlib.error: a truncated or corrupt .gz
        raise DataError(f"--data {file}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if b"\0" in blob:  # what git and grep take as the mark of a binary file
        raise DataError(f"--data {file}: not a text file (it holds NUL bytes)")
    return blob.decode("utf-8", errors="replace")


def _open(file: Path):
    return gzip.open(file, "rb") if file.name.lower().endswith(".gz") else open(file, "rb")


def _jsonl_documents(file: Path, text_column: str) -> Iterator[str]:
    """The ``text_column`` string of each JSON Lines record, one line in memory at a time; blank lines are skipped.

    Read here rather than with datasets' JSON builder, which on a malformed line reads the whole file into
    pandas and turns a non-string value found after its first 10 MB into its JSON text instead of failing.
    """
    records = 0
    try:
        with _open(file) as f:
            lines = iter(functools.partial(f.readline, MAX_JSON_LINE_BYTES + 1), b"")
            for line_number, line in enumerate(lines, 1):
                if len(line) > MAX_JSON_LINE_BYTES:
                    raise DataError(f"--data {file}: line {line_number} is longer than "
                                    f"{MAX_JSON_LINE_BYTES >> 20} MiB")
                if not line.isspace():
                    records += 1
                    yield _json_text(file, line_number, line, text_column)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"--data {file}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not records:
        raise DataError(f"--data {file}: no documents in it")


def _json_text(file: Path, line_number: int, line: bytes, text_column: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"--data {file}: line {line_number} is not valid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # not UTF-8; nested deeper than Python's recursion limit
        raise DataError(f"--data {file}: line {line_number} is not valid JSON ({one_line(e)})") from None
    if not isinstance(record, dict):
        raise DataError(f"--data {file}: line {line_number} is {_json_kind(record)}, not a JSON object")
    if text_column not in record:
        raise DataError(f"--data {file}: line {line_number} has no {text_column!r} field "
                        f"(it has {_names(list(record))})")
    text = record[text_column]
    if not isinstance(text, str):
        raise DataError(f"--data {file}: line {line_number}: {text_column!r} is {_json_kind(text)}, not a string")
    return _LONE_SURROGATE.sub("\ufffd", text)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "a number", float: "a number", str: "a string", list: "an array"}.get(type(value), "an object")


def _names(names: list[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(str(name)[:40]) for name in names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def _parquet_documents(file: Path, text_column: str) -> Iterator[str]:
    """The strings of ``text_column``, PARQUET_BATCH_ROWS rows at a time; the schema is checked first, so a
    wrong column or type is named before any row is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(file)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"--data {file}: not a Parquet file we can read ({one_line(e)})") from None
    if text_column not in schema.names:
        raise DataError(f"--data {file}: no {text_column!r} column (it has {_names(schema.names)})")
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"--data {file}: column {text_column!r} holds {kind}, not strings")
    rows = 0
    try:
        for table in _parquet_tables(file, text_column):
            column = table.column(text_column)
            if column.null_count:
                first_null = rows + column.is_null().to_pylist().index(True)
                raise DataError(f"--data {file}: row {first_null + 1} has no {text_column!r} (null)")
            rows += len(column)
            yield from column.to_pylist()
    except DataError:
        raise
    except Exception as e:  # a damaged file fails inside pyarrow or datasets in many ways, none of them ours
        raise DataError(f"--data {file}: cannot read it as Parquet ({one_line(e)})") from None
    if not rows:
        raise DataError(f"--data {file}: no documents in it")


def _parquet_tables(file: Path, text_column: str) -> Iterator:
    """``text_column`` of the file in Arrow tables, through datasets' streaming Parquet builder: it decodes one
    batch at a time and writes no Arrow cache, only lock files, which go to a scratch directory removed
    afterwards. datasets reads ``data_files`` as glob patterns, so it is given a link with a plain name."""
    datasets = _datasets()
    with tempfile.TemporaryDirectory(prefix="swarm-parquet-") as scratch:
        link = Path(scratch) / "data.parquet"
        link.symlink_to(file.resolve())
        stream = datasets.load_dataset("parquet", data_files=str(link), split="train", streaming=True,
                                       columns=[text_column], batch_size=PARQUET_BATCH_ROWS, cache_dir=scratch)
        yield from stream.with_format("arrow").iter(batch_size=PARQUET_BATCH_ROWS)


@functools.cache
def _datasets():
    """datasets, imported on first use (it takes most of a second), offline: local files need no network."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    # It logs a failure before raising it; the DataError we raise from it is the one line the user gets.
    logging.getLogger("datasets.packaged_modules.parquet.parquet").setLevel(logging.CRITICAL)
    return datasets


def _joined(documents: Iterable[str]) -> Iterator[str]:
    for i, doc in enumerate(documents):
        if i:
            yield DOC_SEPARATOR
        yield doc
