"""Top-k sparse codec, 2 bits a kept value, for pseudo-gradients with error feedback (Templar's Covenant-72B sends
1.56% of the values at 2 bits; SparseLoCo, arXiv 2508.15706, finds 1-3% at 2 bits matches DiLoCo).

Scheme: x is flattened and cut into chunks of `chunk_size` values (C = 4096). Each chunk keeps its k =
max(1, round(density * C)) values of largest magnitude (k = 64 at density 1/64, 1.5625%), ties broken by the lowest
index, so a vector gives the same message on every machine; the last, shorter chunk of L values keeps min(k, L).

Levels: the kept magnitudes of a chunk lie in [t, m], its k-th largest and its largest (2.4 and 3.6 sigma on
Gaussian data), so a sign bit and one magnitude bit do; levels symmetric around zero ({-3, -1, 1, 3} s) would spend
half the codes on magnitudes that are never kept. A kept value is "hi" iff its magnitude > (t + m) / 2, and the chunk
sends lo and hi, the mean magnitudes of its lo and of its hi values, as fp32 (one Lloyd step from the midpoint
split). Means, not fixed points of [t, m]: next to one outlier m = 10 t, the centre of the lower half, (3t + m) / 4,
would send every value near t as 3.25 t, while a mean a' gives its group the squared error sum (a - a')^2 = sum a^2 -
n a'^2, never more than its energy: the codec never makes a vector's error larger than the vector, which keeps error
feedback's residual bounded. Each sum runs in float64 over the chunk's k kept magnitudes in index order (the other
group's as 0), zero-padded to a power of two and added neighbour to neighbour, level by level; the mean is rounded
once to fp32. A fixed order: the bytes do not depend on thread count, CPU or numpy's choice of summation order.
A chunk with fewer than k non-zero values keeps zeros (t = 0): then the split is at 0, so lo = 0 and the kept zeros
decode to exact zeros. An empty hi group sends hi = m (= lo).
Error bound: values not kept decode to exactly 0; a kept value decodes to within its group's spread of itself:
(m - t) / 2 when t > 0, m - t' when zeros are kept (t' the smallest non-zero kept magnitude), plus the fp32
rounding of its level (2^-24 m). Error feedback (swarm.error_feedback) carries what was not sent into the next
round. NaN and inf are refused.

Wire format (`encode`): one record per chunk, in order, so the encoding of a vector is the concatenation of the
encodings of its chunk-aligned parts. For a chunk of L values keeping k, with l = floor(log2(L / k)):
  lo, hi   2 fp32, little-endian
  fields   k fields of 2 + l bits, one per kept value in increasing index order, LSB first and zero-padded to a
           byte: the index's low l bits, then the value's code (bit 0: hi rather than lo, bit 1: negative)
  upper    k + ceil(L / 2^l) - 1 bits, LSB first, zero-padded to a byte: the index's high part h = index >> l of the
           i-th kept value is the position of the i-th 1 minus i (Elias-Fano: the gaps of the high parts in unary)
Elias-Fano spends 8 bits an index at C = 4096, k = 64, against 12 for plain indices and 7.36 for the best any
fixed-size code can do (log2 binomial(4096, 64) / 64). A record is 8 + ceil(k (2 + l) / 8) + ceil((k + ceil(L / 2^l)
- 1) / 8) bytes: 88 for C = 4096, k = 64 (120 with 12-bit indices), i.e. 0.172 bits a value, 186x less than fp32.
n, C and density travel out of band (they fix every size: `encoded_size`). `unpack` refuses a buffer of the wrong
length, scales that are not finite and non-negative, and indices that are out of their chunk or not strictly
increasing, naming the chunk; the padding bits are not read.

Reductions (all-gather: every member reduces every member's message itself, so all must get the same bits):
`message_norm` is the exact sqrt(sum of count * level^2), rounded once to float64, so clipping decisions agree
everywhere; `add_scaled` adds fl(level * fl32(weight)) to out[index] with one fp32 multiply and one fp32 add, never
an fma: adding the members' messages in a fixed order gives the same bits on every member.

Speed (`python -m bench.compression`, 2 cores, 64M values): top-k without sorting. Per chunk, the maxima of 256
lanes of 16 strided values (one vectorised pass over |x|); tau = the k-th largest lane maximum (np.partition; k
lanes hold a value >= tau, so the k-th largest value is >= tau); the candidates >= tau (~1.15 k a chunk, one
comparison and one np.flatnonzero); the exact top-k among them by unique keys (magnitude bits, then the lower index).
Encode: 3.4 GB/s of fp32, 0.15x of a copy (the same on one thread), short of the 0.25x aimed at. Per 1M values on
one core: |x| 0.18 ms, lane maxima 0.08, tau 0.08, comparison 0.14, scan 0.29, top-k among the candidates 0.3,
records 0.2; the rest of the cost is numpy calls over the ~18K candidates of each 1M values. decode (zero `out`,
scatter the levels): 10.4 GB/s, 0.48x of a copy, a third of it the zeroing and a third the scan of the Elias-Fano
bits; add_scaled of one message into a vector: 0.47x of a copy of the vector (one cache miss per kept value).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import numpy as np
import torch

from swarm.compression import CodecError, _flat_fp32

CHUNK_SIZE = 4096  # Covenant's: 12-bit indices there, 8 bits with Elias-Fano here
DENSITY = 1 / 64  # k = 64 of 4096 values, 1.5625%
MAX_CHUNK_SIZE = 1 << 16  # keeps count * mantissa^2 of the exact norm within int64, and the field widths <= 18 bits
# Values per selection group: their |x| (4 MiB) and comparison mask (1 MiB) stay in this machine's caches (1 MiB L2
# per core, 32 MiB L3) between the passes over them.
_GROUP_VALUES = 1 << 20
_LANES_PER_KEPT = 4  # lanes >= 4k: tau is then at the 3/4 quantile of the lane maxima, ~1.15 k candidates a chunk

# decode() views the received bytes without copying them; it never writes into them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", module=__name__)


def kept_per_chunk(chunk_size: int = CHUNK_SIZE, density: float = DENSITY) -> int:
    """k = max(1, round(density * chunk_size)): how many values a full chunk keeps."""
    if not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise CodecError(f"chunk_size must be an int in [1, {MAX_CHUNK_SIZE}], got {chunk_size!r}")
    if not 0 < density <= 1:  # NaN fails too
        raise CodecError(f"density must be in (0, 1], got {density!r}")
    return max(1, round(density * chunk_size))


class _Chunk(NamedTuple):
    """The record of a chunk of `size` values keeping `k` (see the wire format)."""

    size: int
    k: int
    low_bits: int  # l
    upper_bits: int
    fields_bytes: int
    record_bytes: int


@functools.lru_cache(maxsize=64)
def _chunk(size: int, k: int) -> _Chunk:
    k = min(k, size)
    low = (size // k).bit_length() - 1  # floor(log2(size / k))
    upper = k + ((size + (1 << low) - 1) >> low) - 1
    fields = -(-k * (2 + low) // 8)
    return _Chunk(size, k, low, upper, fields, 8 + fields + -(-upper // 8))


def _layout(numel: int, chunk_size: int, density: float) -> tuple[int, _Chunk, _Chunk | None]:
    """(full chunks, their record, the record of the last shorter chunk or None)."""
    k = kept_per_chunk(chunk_size, density)
    if not isinstance(numel, int) or numel < 0:
        raise CodecError(f"numel must be a non-negative int, got {numel!r}")
    rows, tail = divmod(numel, chunk_size)
    return rows, _chunk(chunk_size, k), _chunk(tail, k) if tail else None


def encoded_size(numel: int, chunk_size: int = CHUNK_SIZE, density: float = DENSITY) -> int:
    """Bytes of `encode` for `numel` values: one record per chunk (module docstring), fixed by (numel, C, density)."""
    rows, full, tail = _layout(numel, chunk_size, density)
    return rows * full.record_bytes + (tail.record_bytes if tail else 0)


@functools.lru_cache(maxsize=64)
def _lanes(size: int, k: int) -> int:
    """Lanes for the top-k of a chunk of `size`: the smallest divisor of size that is >= 4k (size itself at worst:
    one value a lane, and tau is then the exact k-th largest)."""
    return next(d for d in range(min(_LANES_PER_KEPT * k, size), size + 1) if size % d == 0)


class _NonFinite(Exception):
    pass


def _top_k(x: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """x (rows, size) fp32 -> (index, value), both (rows, k): each row's k values of largest magnitude, ties to the
    lowest index, by increasing index. Raises _NonFinite on NaN or inf."""
    rows, size = x.shape
    lanes = _lanes(size, k)
    group = max(1, _GROUP_VALUES // size)  # rows at a time
    magnitude = torch.empty(min(group, rows), size)
    mask = np.empty((min(group, rows), size), dtype=bool)
    flat = x.numpy().reshape(-1)
    index, value = np.empty((rows, k), dtype=np.int64), np.empty((rows, k), dtype=np.float32)
    for start in range(0, rows, group):
        stop = min(start + group, rows)
        g = stop - start
        a = torch.abs(x[start:stop], out=magnitude[:g])
        peaks = a.view(g, size // lanes, lanes).amax(1).numpy()  # each lane's largest magnitude
        if not np.isfinite(peaks).all():
            raise _NonFinite
        tau = np.partition(peaks, lanes - k, axis=1)[:, lanes - k]  # k lanes hold a value >= tau
        candidates = np.flatnonzero(np.greater_equal(a.numpy(), tau[:, None], out=mask[:g]))  # >= k a row
        row = candidates // size
        position = candidates - row * size
        counts = np.bincount(row, minlength=g)
        if (counts > k).any():  # the exact top-k among them: unique keys, magnitude bits first, then lower index
            keys = (a.numpy().reshape(-1)[candidates].view(np.int32).astype(np.int64) << 32) - position
            width = int(counts.max())
            padded = np.full((g, width), np.iinfo(np.int64).min)
            padded.reshape(-1)[np.arange(candidates.size) + np.repeat(np.arange(g) * width - np.cumsum(counts) + counts,
                                                                      counts)] = keys
            kth = np.partition(padded, width - k, axis=1)[:, width - k]
            chosen = keys >= kth[row]  # exactly k a row: the keys are unique
            candidates, position = candidates[chosen], position[chosen]
        index[start:stop] = position.reshape(g, k)
        value[start:stop] = flat[start * size + candidates].reshape(g, k)
    return index, value


def _pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """(rows, k) uint32 < 2^width -> (rows, ceil(k width / 8)) uint8, each row's fields LSB first."""
    if width == 8:
        return values.astype(np.uint8)
    rows, k = values.shape
    bytes_ = values.astype("<u4").view(np.uint8).reshape(rows, k, 4)
    bits = np.unpackbits(bytes_, axis=2, count=width, bitorder="little")
    return np.packbits(bits.reshape(rows, k * width), axis=1, bitorder="little")


def _unpack_bits(data: np.ndarray, width: int, k: int) -> np.ndarray:
    """The inverse of _pack_bits: (rows, bytes) uint8 -> (rows, k) uint8 or uint32."""
    if width == 8:
        return data
    rows = data.shape[0]
    bits = np.zeros((rows, k, 32), dtype=np.uint8)
    bits[:, :, :width] = np.unpackbits(data, axis=1, count=k * width, bitorder="little").reshape(rows, k, width)
    return np.packbits(bits, axis=2, bitorder="little").view("<u4").reshape(rows, k)


def _tree_sum(x: np.ndarray) -> np.ndarray:
    """Sums of the last axis of x (float64) over a fixed pairwise tree: the same additions in the same order on
    every machine (numpy leaves the order of its own reductions to the build)."""
    width = 1 << (x.shape[-1] - 1).bit_length()
    if width != x.shape[-1]:  # zeros add exactly
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (width - x.shape[-1],))], axis=-1)
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def _write_records(records: np.ndarray, index: np.ndarray, values: np.ndarray, chunk: _Chunk) -> None:
    """records (rows, record_bytes) uint8 <- the chunks' kept indices (rows, k) and values (rows, k) fp32."""
    rows, k = index.shape
    magnitude = np.abs(values)
    t, m = magnitude.min(1).astype(np.float64), magnitude.max(1).astype(np.float64)
    split = np.where(t > 0, (t + m) / 2, 0.0)  # at 0 when zeros are kept: they alone are lo, and lo = 0
    high = magnitude > split[:, None]
    count_hi = high.sum(1)
    groups = np.where(np.stack([~high, high], axis=1), magnitude[:, None, :].astype(np.float64), 0.0)
    sum_lo, sum_hi = _tree_sum(groups).T
    lo = sum_lo / (k - count_hi)  # t <= split: never an empty group
    hi = np.where(count_hi > 0, sum_hi / np.maximum(count_hi, 1), m)
    records[:, :8] = np.stack([lo, hi], axis=1).astype("<f4").view(np.uint8)  # one rounding each, to nearest
    code = high.view(np.uint8) | ((values < 0).view(np.uint8) << 1)
    fields = (index.astype(np.uint32) & ((1 << chunk.low_bits) - 1)) | (code.astype(np.uint32) << chunk.low_bits)
    records[:, 8 : 8 + chunk.fields_bytes] = _pack_bits(fields, 2 + chunk.low_bits)
    upper_bytes = chunk.record_bytes - 8 - chunk.fields_bytes
    upper = np.zeros((rows, 8 * upper_bytes), dtype=np.uint8)
    upper.reshape(-1)[((index >> chunk.low_bits) + np.arange(k) + np.arange(rows)[:, None] * 8 * upper_bytes)] = 1
    records[:, 8 + chunk.fields_bytes :] = np.packbits(upper, axis=1, bitorder="little")


def encode(
    x: torch.Tensor, chunk_size: int = CHUNK_SIZE, density: float = DENSITY, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Any-shaped float tensor -> its wire format (module docstring) as a uint8 tensor of encoded_size(numel) bytes,
    written into `out` (a contiguous uint8 tensor of that size) if given. Send it with `memoryview(out.numpy())`."""
    x = _flat_fp32(x)
    n = x.numel()
    rows, full, tail = _layout(n, chunk_size, density)
    size = encoded_size(n, chunk_size, density)
    if out is None:
        out = torch.empty(size, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.numel() != size or not out.is_contiguous():
        raise CodecError(f"out must be a contiguous uint8 tensor of {size} bytes")
    buf = out.view(-1).numpy()
    parts = [(x[: rows * chunk_size].view(rows, chunk_size), full, buf[: rows * full.record_bytes])] if rows else []
    if tail:
        parts.append((x[rows * chunk_size :].view(1, tail.size), tail, buf[rows * full.record_bytes :]))
    try:
        for values, chunk, records in parts:
            index, kept = _top_k(values, chunk.k)
            _write_records(records.reshape(-1, chunk.record_bytes), index, kept, chunk)
    except _NonFinite:
        bad = n - int(torch.isfinite(x).sum())
        raise CodecError(f"cannot encode {bad} non-finite value(s) (NaN or inf) among {n}") from None
    return out


class Message(NamedTuple):
    """A message that passed every check of `unpack`: what decode, message_norm and add_scaled read."""

    numel: int
    chunk_size: int
    index: np.ndarray  # int64 (kept,): the kept values' positions in the vector, strictly increasing
    code: np.ndarray  # (kept,): bit 0 hi rather than lo, bit 1 negative
    scales: np.ndarray  # fp32 (chunks, 2): each chunk's lo and hi

    def values(self) -> np.ndarray:
        """fp32 (kept,): each kept value as decoded, +-lo or +-hi of its chunk."""
        levels = np.concatenate([self.scales, -self.scales], axis=1)  # per chunk, by code: lo, hi, -lo, -hi
        return levels.reshape(-1)[self.index // self.chunk_size * 4 + self.code]


def _read_records(records: np.ndarray, chunk: _Chunk, first: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """records (rows, record_bytes) of chunks numbered from `first` -> (index in chunk, code) (rows, k), scales."""
    rows, k = records.shape[0], chunk.k
    scales = np.ascontiguousarray(records[:, :8]).view("<f4")
    bad = ~(np.isfinite(scales) & (scales >= 0)).all(1)
    if bad.any():
        c = int(bad.argmax())
        raise CodecError(f"chunk {first + c}: scales must be finite and non-negative, got {scales[c].tolist()}")
    fields = _unpack_bits(records[:, 8 : 8 + chunk.fields_bytes], 2 + chunk.low_bits, k)
    upper = np.unpackbits(records[:, 8 + chunk.fields_bytes :], axis=1, count=chunk.upper_bits, bitorder="little")
    ones = upper.sum(1)
    if (ones != k).any():
        c = int((ones != k).argmax())
        raise CodecError(f"chunk {first + c}: its upper index bits mark {ones[c]} values, expected {k}")
    position = (np.flatnonzero(upper) - np.arange(rows).repeat(k) * chunk.upper_bits).reshape(rows, k)
    index = ((position - np.arange(k)) << chunk.low_bits) | (fields & ((1 << chunk.low_bits) - 1))
    if (index[:, -1] >= chunk.size).any():  # high parts never decrease: the last index is the largest
        c = int((index[:, -1] >= chunk.size).argmax())
        raise CodecError(f"chunk {first + c}: index {index[c, -1]} is out of range for a chunk of {chunk.size} values")
    steps = np.diff(index, axis=1)
    if (steps <= 0).any():
        c, i = (int(v[0]) for v in np.nonzero(steps <= 0))
        raise CodecError(f"chunk {first + c}: indices must be strictly increasing, got {index[c, i]} "
                         f"then {index[c, i + 1]}")
    return index, fields >> chunk.low_bits, scales


def unpack(
    data: bytes | bytearray | memoryview | torch.Tensor,
    numel: int,
    chunk_size: int = CHUNK_SIZE,
    density: float = DENSITY,
) -> Message:
    """Check a received message and parse it; CodecError names what is wrong (a peer may be hostile)."""
    rows, full, tail = _layout(numel, chunk_size, density)
    size = encoded_size(numel, chunk_size, density)
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise CodecError(f"expected a uint8 tensor, got {data.dtype}")
        buf = data.reshape(-1).numpy()
    else:
        buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    if buf.size != size:
        raise CodecError(f"expected {size} bytes for {numel} values in chunks of {chunk_size} keeping {full.k}, "
                         f"got {buf.size}")
    parts = [(buf[: rows * full.record_bytes].reshape(rows, full.record_bytes), full, 0)]
    if tail:
        parts.append((buf[rows * full.record_bytes :].reshape(1, tail.record_bytes), tail, rows))
    index, code, scales = [], [], []
    for records, kind, first in parts:
        i, c, s = _read_records(records, kind, first)
        index.append((i + np.arange(first, first + records.shape[0])[:, None] * chunk_size).reshape(-1))
        code.append(c.reshape(-1))
        scales.append(s)
    return Message(numel, chunk_size, *(v[0] if len(v) == 1 else np.concatenate(v) for v in (index, code, scales)))


def _message(data, numel: int, chunk_size: int, density: float) -> Message:
    if isinstance(data, Message):
        if (data.numel, data.chunk_size) != (numel, chunk_size):
            raise CodecError(f"message of {data.numel} values in chunks of {data.chunk_size}, expected {numel} in "
                             f"chunks of {chunk_size}")
        return data
    return unpack(data, numel, chunk_size, density)


def decode(
    data: bytes | bytearray | memoryview | torch.Tensor | Message,
    numel: int,
    chunk_size: int = CHUNK_SIZE,
    density: float = DENSITY,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Wire format (or an unpacked Message) -> fp32 of `numel` values, zeros but the kept ones: 1-D, or written into
    contiguous `out` and returned."""
    message = _message(data, numel, chunk_size, density)
    if out is None:
        result = flat = torch.zeros(numel)
    else:
        if out.dtype != torch.float32 or out.numel() != numel or not out.is_contiguous():
            raise CodecError(f"out must be a contiguous float32 tensor of {numel} elements")
        result, flat = out, out.view(-1).zero_()
    flat.numpy()[message.index] = message.values()
    return result


def message_norm(
    data: bytes | bytearray | memoryview | torch.Tensor | Message,
    numel: int,
    chunk_size: int = CHUNK_SIZE,
    density: float = DENSITY,
) -> float:
    """The L2 norm of the decoded message, exactly: sum over chunks of count * level^2 for its two levels, with every
    product and the sum exact (integer mantissas, math.fsum), rounded once to float64, then one float64 sqrt. The same
    float on every machine, whatever its threads or SIMD."""
    message = _message(data, numel, chunk_size, density)
    chunks = message.scales.shape[0]
    chunk = message.index // message.chunk_size
    count_hi = np.bincount(chunk[(message.code & 1) > 0], minlength=chunks)
    counts = np.stack([np.bincount(chunk, minlength=chunks) - count_hi, count_hi], axis=1)
    # level = mantissa * 2^exponent with an integer mantissa < 2^24; mantissa^2 = a 2^24 + b with a, b < 2^24, so
    # count * a and count * b (count <= 2^16) are exact in float64, as is scaling them by a power of two
    fraction, exponent = np.frexp(message.scales.astype(np.float64))
    mantissa = (fraction * 2.0**24).astype(np.int64)
    square = mantissa * mantissa
    high, low = (square >> 24) * counts, (square & (2**24 - 1)) * counts
    terms = np.concatenate([np.ldexp(high.astype(np.float64), 2 * exponent - 24).ravel(),
                            np.ldexp(low.astype(np.float64), 2 * exponent - 48).ravel()])
    return math.sqrt(math.fsum(terms))


def add_scaled(
    out: torch.Tensor,
    data: bytes | bytearray | memoryview | torch.Tensor | Message,
    numel: int,
    weight: float,
    chunk_size: int = CHUNK_SIZE,
    density: float = DENSITY,
) -> None:
    """out += weight * decode(message), for the kept values only: each product rounded to fp32 (the weight is first
    rounded to fp32), then added with its own rounding. out: contiguous fp32 of numel values."""
    message = _message(data, numel, chunk_size, density)
    if out.dtype != torch.float32 or out.numel() != numel or not out.is_contiguous():
        raise CodecError(f"out must be a contiguous float32 tensor of {numel} elements")
    scale = np.float32(weight)
    if not np.isfinite(scale):
        raise CodecError(f"weight must be finite in fp32, got {weight!r}")
    flat = out.view(-1).numpy()
    flat[message.index] = flat[message.index] + message.values() * scale  # numpy fp32: a multiply, then an add
