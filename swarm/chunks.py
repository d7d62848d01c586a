"""A stream of text in bounded chunks that a byte-level BPE encodes exactly as it encodes the whole text.

Tokenizers take one string at a time and hold all of it, so a corpus is encoded (and bpe4k trained) chunk
by chunk. A chunk ends only at a safe cut, where GPT-2's pre-tokenizer pattern (the byte tokenizer's and
bpe4k's) starts a new piece anyway, so the chunks' ids are the whole text's; a user's tokenizer.json whose
pre-tokenizer splits at newlines gets the same guarantee (docs/architecture.md, "Data and tokenizers"). The cuts
depend only on the text, never on how it arrived, so every peer cuts the same corpus the same way.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable, Iterator

CHUNK_CHARS = 1 << 20  # a chunk's least length (bar the last): bounds the tokenizer's memory per call
MAX_CHUNK_CHARS = 4 << 20  # a chunk with no safe cut in it is cut here anyway
CUT_RETRY_CHARS = 1 << 16  # text gathered before looking again for a safe cut that was not there yet
# After a newline that follows a printable ASCII character, before a printable ASCII character or before one
# more newline and one: GPT-2's pattern makes each such newline a piece of its own.
_SAFE_CUT = re.compile(r"(?<=[!-~]\n)(?=\n?[!-~])")
_CUT_LOOKAHEAD_CHARS = 2  # characters after a position that decide whether it is a safe cut


def chunks(pieces: Iterable[str]) -> Iterator[str]:
    """The concatenation of ``pieces``, in chunks of CHUNK_CHARS to MAX_CHUNK_CHARS characters that each end at
    the first safe cut at least CHUNK_CHARS after their start (at MAX_CHUNK_CHARS if none comes before)."""
    parts: list[str] = []
    size = 0  # characters in parts
    searched = 0  # no safe cut starts before this many characters into parts: searched already
    for piece in pieces:
        parts.append(piece)
        size += len(piece)
        if size > CHUNK_CHARS and size >= searched + CUT_RETRY_CHARS:
            rest = yield from _complete_chunks("".join(parts), searched, final=False)
            parts, size, searched = [rest], len(rest), max(0, len(rest) - _CUT_LOOKAHEAD_CHARS + 1)
    rest = yield from _complete_chunks("".join(parts), searched, final=True)
    if rest:
        yield rest


def _complete_chunks(text: str, searched: int, final: bool) -> Generator[str, None, str]:
    """Yield the chunks of ``text`` whose end is certain; return the rest."""
    start = 0
    while (cut := _find_cut(text, start, max(start + CHUNK_CHARS, searched), final)) is not None:
        yield text[start:cut]
        start = cut
    return text[start:]


def _find_cut(text: str, start: int, search_from: int, final: bool) -> int | None:
    """The end of the chunk that starts at ``start``, or None while text still to come could hold it."""
    if len(text) - start <= CHUNK_CHARS:
        return None
    limit = start + MAX_CHUNK_CHARS
    safe = _SAFE_CUT.search(text, search_from, limit + _CUT_LOOKAHEAD_CHARS)
    if safe:
        return safe.start()
    decided = len(text) >= limit + _CUT_LOOKAHEAD_CHARS or (final and len(text) > limit)
    return limit if decided else None
