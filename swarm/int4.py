"""Int4 blockwise absmax codec for pseudo-gradients on the wire (Streaming DiLoCo, arXiv 2501.18512, sends 4-bit
outer updates). Half the bytes of swarm.compression's int8, for a rounding step 18x as coarse (7 levels a side, not
127): meant to go with error feedback (swarm.error_feedback).

Scheme: x is flattened and cut into blocks of `block_size` values (the last one may be shorter). Each block keeps
scale = absmax(block) / 7 in fp32 and q = round(x / scale) in [-7, 7] (half to even), stored as the nibble q + 8.
decode gives (nibble - 8) * scale: an exact small integer times the scale, one fp32 rounding, so every machine,
thread count and kernel decodes the same bytes to the same bits.
Error bound: |x - decode(encode(x))| <= scale / 2 = absmax / 14 per element (plus fp32 rounding, ~1e-6 scale), for
|x| < 7/8 of FLT_MAX (the scale is capped so that every nibble decodes to a finite value). A block of zeros has scale
0 and decodes to exact zeros; NaN and inf are refused.

Wire format (`encode`): one record per block, in order: the block's scale as fp32 little-endian, then its len values
(block_size, or what is left for the last block) in h = ceil(len / 2) bytes, byte i holding value i in its low nibble
and value i + h in its high one (an odd last block pads the last high nibble with 8, a zero). Halves rather than
neighbours share a byte so that packing and unpacking read and write contiguous runs: SIMD in both kernels.
encoded_size(n) = 4 ceil(n / block_size) + ceil(n / 2) bytes: 557056 for 1M values at block 128, 4.25 bits a value,
7.5x less than fp32. Every record starts at a block boundary, so the encoding of a vector is the concatenation of the
encodings of any block-aligned parts of it (the all-reduce cuts vectors at block boundaries). n and block_size travel
out of band. The nibble 0 (level -8) is never sent; decode takes it for -8 * scale, which the scale check keeps finite.

Speed (`python -m bench.compression`, 2 cores, 64M values, GB/s of fp32): the eager kernel works in cache-sized
chunks like int8's (amax/amin, then scale, round and pack the halves in cache): 11.9 GB/s, 0.55x of a copy.
`compile_kernels()` swaps in a torch.compile'd kernel that reads each block once and writes its packed bytes
directly: 23.8 GB/s, 1.08x of a copy (0.6-0.8x on one thread); both give identical bytes. decode unpacks and scales
chunk by chunk into `out`: 17.9 GB/s, 0.83x of a copy.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch

from swarm.compression import (_CHUNK_ELEMENTS, CodecError, _Compiled, _flat_fp32, _num_blocks, _run_compiled,
                               _use_compiled)

logger = logging.getLogger(__name__)

# 128 values share one fp32 scale: 0.25 bits a value on top of the 4. With 7 levels a side, the block's absmax sets
# the step, so long blocks cost accuracy, the more so on heavy tails: relative L2 error 10.8% / 11.7% / 12.6% / 14.3%
# on N(0,1) and 18.0% / 22.4% / 27.4% / 39.6% on Student-t(3) (heavy-tailed, like pseudo-gradients) at block 64 / 128
# / 256 / 1024, for 4.5 / 4.25 / 4.125 / 4.03 bits a value. Decode slows down on short rows (0.37x / 0.58x / 0.74x /
# 0.80x of a copy on one thread); compiled encode stays at 0.6-0.8x. 128 keeps most of 64's accuracy for half its
# scale bytes and decodes 1.6x faster.
BLOCK_SIZE = 128
LEVELS = 7  # q in [-7, 7]: symmetric around an exact zero
_FP32 = torch.finfo(torch.float32)
# Below this absmax, 7 / absmax overflows fp32: such (non-zero) blocks get scale = FLT_MIN instead.
_TINY_ABSMAX = LEVELS * _FP32.tiny
# Largest scale whose nibble 0 (-8, never sent, but a hostile peer may) still decodes to a finite fp32.
_MAX_SCALE = torch.nextafter(torch.tensor(_FP32.max / 8), torch.tensor(0.0)).item()
_NIBBLE_PAIR_ZERO = 8 + 16 * 8  # byte i = (q_i + 8) + 16 (q_(i+h) + 8) = q_i + 16 q_(i+h) + 136

# decode() views the received bytes without copying them; it never writes into them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", module=__name__)


def encoded_size(numel: int, block_size: int = BLOCK_SIZE) -> int:
    """Bytes of `encode` for `numel` values: 4 per block (its scale) + half a byte per value, rounded up."""
    _check_block_size(block_size)
    return 4 * _num_blocks(numel, block_size) + (numel + 1) // 2


def _check_block_size(block_size: int) -> None:
    _num_blocks(0, block_size)
    if block_size % 8:  # two values a byte, and each record's fp32 scale 4-byte aligned: 4 + block_size / 2 bytes
        raise CodecError(f"block_size must be a multiple of 8, got {block_size}")


def _records(buf: torch.Tensor, rows: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views into `rows` records of buf (uint8) for blocks of block_size (even) values: scales (rows, 1) fp32 and
    packed nibbles (rows, block_size / 2)."""
    records = buf[: rows * (4 + block_size // 2)].view(rows, 4 + block_size // 2)
    return records[:, :4].view(torch.float32), records[:, 4:]


def _quantize_chunk(xb, packed, absmax, lo, inv, scratch, pairs) -> None:
    """Eager: xb (rows, block) fp32 -> packed (rows, block / 2) uint8 and absmax (rows,); the rest is work space.
    The same arithmetic as `_quantize_rows`, so both give identical bytes."""
    h = xb.shape[1] // 2
    torch.amax(xb, 1, out=absmax)  # NaN / inf in a block make its absmax NaN / inf: checked by the caller
    torch.amin(xb, 1, out=lo)  # vectorised reductions that only read; abs() first would write a copy
    torch.maximum(absmax, lo.neg_(), out=absmax)
    torch.reciprocal(torch.clamp(absmax, min=_TINY_ABSMAX, out=inv), out=inv).mul_(float(LEVELS))
    torch.mul(xb, inv[:, None], out=scratch).round_()
    # q_i + 16 q_(i+h) in [-119, 119], exact; as int8, + 136 in uint8 makes the two nibbles (q + 8) of byte i
    torch.add(scratch[:, :h], scratch[:, h:], alpha=16, out=pairs)
    packed.view(torch.int8).copy_(pairs)
    packed.add_(_NIBBLE_PAIR_ZERO)


def _quantize_rows(xb: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Fused form for torch.compile, one read of each row: xb (rows, block) fp32 -> packed (rows, block / 2) uint8;
    returns absmax (rows, 1)."""
    h = xb.shape[1] // 2
    absmax = xb.abs().amax(1, keepdim=True)
    q = torch.round(xb * (torch.reciprocal(absmax.clamp(min=_TINY_ABSMAX)) * float(LEVELS)))
    packed.copy_((q[:, :h] + q[:, h:] * 16 + _NIBBLE_PAIR_ZERO).to(torch.uint8))
    return absmax


_compiled: _Compiled | None = None  # set by compile_kernels()


def compile_kernels(block_size: int = BLOCK_SIZE) -> float | None:
    """Build the fused quantize kernel (torch.compile, inductor's C++ backend) for `block_size`.

    Returns the seconds it took, or None if it failed: then the eager kernel stays in use. Call it once at start-up,
    after torch.set_num_threads, as swarm.compression.compile_kernels (same guards, same fallback).
    """
    global _compiled
    _check_block_size(block_size)
    start = time.perf_counter()
    try:
        kernel = torch.compile(_quantize_rows)
        # inductor sizes its threading to the rows it first sees: a chunk's worth, not the 2 that would do
        rows = max(2, _CHUNK_ELEMENTS // block_size)
        records = torch.empty(encoded_size(rows * block_size, block_size), dtype=torch.uint8)
        _run_compiled(kernel, torch.zeros(rows, block_size), _records(records, rows, block_size)[1])
        with torch.no_grad():
            state = torch._C._dynamo.guards.GlobalStateGuard()
    except Exception as e:  # no C++ compiler, no Python headers, an inductor bug: all mean "stay eager"
        logger.warning(f"torch.compile of the int4 codec failed, staying eager: {str(e).splitlines()[0]}")
        return None
    _compiled = _Compiled(block_size, kernel, state)
    return time.perf_counter() - start


def _quantize_full_blocks(xb: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor) -> None:
    rows, block_size = xb.shape
    compiled = _compiled
    if _use_compiled(compiled, xb, packed):
        absmax.copy_(_run_compiled(compiled.kernel, xb, packed).view(-1))
        return
    step = max(1, _CHUNK_ELEMENTS // block_size)  # rows per chunk
    lo, inv = torch.empty(min(step, rows)), torch.empty(min(step, rows))
    scratch = torch.empty(min(step, rows), block_size)
    pairs = torch.empty(min(step, rows), block_size // 2)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        k = stop - start
        _quantize_chunk(xb[start:stop], packed[start:stop], absmax[start:stop], lo[:k], inv[:k], scratch[:k], pairs[:k])


def encode(x: torch.Tensor, block_size: int = BLOCK_SIZE, out: torch.Tensor | None = None) -> torch.Tensor:
    """Any-shaped float tensor -> its wire format (module docstring) as a uint8 tensor of encoded_size(numel) bytes.

    `out=` writes into (and returns) a preallocated contiguous uint8 tensor of that size: a fresh buffer per round
    costs page faults. Send it with `memoryview(out.numpy())`, no copy.
    """
    x = _flat_fp32(x)
    n = x.numel()
    size = encoded_size(n, block_size)
    if out is None:
        out = torch.empty(size, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.numel() != size or not out.is_contiguous():
        raise CodecError(f"out must be a contiguous uint8 tensor of {size} bytes")
    buf = out.view(-1)
    nb = _num_blocks(n, block_size)
    if nb == 0:
        return out
    absmax = torch.empty(nb)  # each block's, turned into its scale at the end
    rows = n // block_size
    if rows:
        scales, packed = _records(buf, rows, block_size)
        _quantize_full_blocks(x[: rows * block_size].view(rows, block_size), packed, absmax[:rows])
    tail = n - rows * block_size
    h = (tail + 1) // 2
    if tail:  # the last, shorter block: a record of h bytes, from a zero-padded copy of 2h values (a zero packs as 8)
        padded = torch.zeros(1, 2 * h)
        padded[0, :tail] = x[rows * block_size :]
        _quantize_full_blocks(padded, buf[size - h :].view(1, h), absmax[-1:])
    lo, hi = (v.item() for v in torch.aminmax(absmax))
    if not (hi < float("inf")):  # NaN fails the comparison
        bad = n - int(torch.isfinite(x).sum())
        raise CodecError(f"cannot quantize {bad} non-finite value(s) (NaN or inf) among {n}")
    if lo < _TINY_ABSMAX:  # zero blocks keep scale 0; others were quantized with inv = 7 / _TINY_ABSMAX
        absmax[(absmax > 0) & (absmax < _TINY_ABSMAX)] = _TINY_ABSMAX
    absmax.div_(float(LEVELS)).clamp_(max=_MAX_SCALE)
    if rows:
        scales.copy_(absmax[:rows, None])
    if tail:
        buf[size - h - 4 : size - h] = absmax[-1:].view(torch.uint8)
    return out


def _as_bytes(data: bytes | bytearray | memoryview | torch.Tensor) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8:
            raise CodecError(f"expected a uint8 tensor, got {data.dtype}")
        return data.reshape(-1)
    data = memoryview(data).cast("B")
    return torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)


def _dequantize_chunk(scales, packed, out, nibbles) -> None:
    """scales (rows, 1) fp32, packed (rows, block / 2) uint8 -> out (rows, block) fp32; nibbles is work space."""
    h = packed.shape[1]
    torch.bitwise_and(packed, 15, out=nibbles[:, :h])
    torch.bitwise_right_shift(packed, 4, out=nibbles[:, h:])
    signed = nibbles.view(torch.int8).sub_(8)  # exact: nibbles in [0, 15]
    torch.mul(signed, scales, out=out)  # converted exactly on the fly, then the one rounding: one pass over out


def decode(
    data: bytes | bytearray | memoryview | torch.Tensor,
    numel: int,
    block_size: int = BLOCK_SIZE,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Wire format -> fp32 of `numel` values: 1-D, or written into contiguous `out` and returned. Refuses a buffer of
    the wrong length and scales that are NaN, inf, negative or so large that -8 * scale overflows (a peer may be
    hostile). Reads `data` without copying it and never writes into it."""
    size = encoded_size(numel, block_size)
    buf = _as_bytes(data)
    if buf.numel() != size:
        raise CodecError(f"expected {size} bytes for {numel} values in blocks of {block_size}, got {buf.numel()}")
    if out is None:
        result = flat = torch.empty(numel)
    else:
        if out.dtype != torch.float32 or out.numel() != numel or not out.is_contiguous():
            raise CodecError(f"out must be a contiguous float32 tensor of {numel} elements")
        result, flat = out, out.view(-1)
    rows = numel // block_size
    tail = numel - rows * block_size
    h = (tail + 1) // 2
    scales, packed = _records(buf, rows, block_size)
    tail_scale = buf[size - h - 4 : size - h].view(torch.float32) if tail else scales.reshape(-1)[:0]
    if not all(((s >= 0) & (s <= _MAX_SCALE)).all() for s in (scales, tail_scale)):  # NaN fails both comparisons
        raise CodecError("refusing scales that are non-finite, negative or too large")
    step = max(1, _CHUNK_ELEMENTS // block_size)  # rows per chunk: the nibbles and fp32 output stay in cache
    nibbles = torch.empty(min(step, max(rows, 1)), block_size, dtype=torch.uint8)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        view = flat[start * block_size : stop * block_size].view(stop - start, block_size)
        _dequantize_chunk(scales[start:stop], packed[start:stop], view, nibbles[: stop - start])
    if tail:
        values = torch.empty(1, 2 * h)
        _dequantize_chunk(tail_scale.view(1, 1), buf[size - h :].view(1, h), values, nibbles[:1, : 2 * h])
        flat[rows * block_size :] = values[0, :tail]
    return result
