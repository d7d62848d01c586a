"""Int8 blockwise absmax codec for pseudo-gradients on the wire.

Why our own: hivemind 1.1.12's 8-bit codecs break under numpy 2.4 (`int()` of a one-element array in
`compression/quantization.py`) and its blockwise one needs bitsandbytes. This one is pure torch and
takes the place of hivemind's BLOCKWISE_8BIT codec (`register_with_hivemind`).

Scheme: x is flattened and cut into blocks of `block_size` elements (the last one may be shorter).
Each block keeps scale = absmax(block) / 127 in fp32 and q = round(x / scale) in int8, |q| <= 127.
Error bound: |x - dequantize(quantize(x))| <= scale / 2 per element (plus fp32 rounding, ~1e-5 scale).
A block of zeros has scale 0 and decodes to exact zeros; NaN and inf are refused.

Wire format (`encode`): ceil(n / block_size) scales as fp32 little-endian, then the n int8 values.
n and block_size travel out of band (hivemind's `runtime_pb2.Tensor.size`; the block size is fixed).

Speed (`python -m bench.compression`, 2 cores): the eager kernel works in cache-sized chunks, each
read from memory once (the absmax reductions) while the later passes hit cache, every op writing into
preallocated buffers: ~14 GB/s of fp32. `compile_kernels()` swaps in a torch.compile'd kernel that
reads each block once and writes its int8 directly: ~25 GB/s, for 1-8 s of compilation at start-up;
both give identical bytes. dequantize converts and scales chunk by chunk: ~copy speed into `out`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from hivemind.compression import serialization
from hivemind.compression.base import CompressionBase, CompressionInfo
from hivemind.proto import runtime_pb2

if sys.byteorder != "little":  # the wire format is the in-memory layout of fp32 and int8 tensors
    raise ImportError("swarm.compression needs a little-endian host")

logger = logging.getLogger(__name__)

# 1024 values share one fp32 scale: 0.4% of the wire. One outlier sets the scale of its whole block,
# so the error on heavy-tailed data grows with the block (relative L2 error on log-normal-scaled
# N(0,1): 1.6% at 256, 2.7% at 1024, 4.4% at 4096), while the compiled kernel slows down on short rows
# (0.3x / 0.8x / 1.1x / 1.0x / 1.0x of a copy at 256 / 512 / 1024 / 2048 / 4096).
BLOCK_SIZE = 1024
# Elements per eager chunk: 4 MiB of fp32 (plus as much scratch) stays in this machine's caches (1 MiB
# L2 per core, 32 MiB L3), and 10 ops of ~3 us overhead each stay < 5% of its time. Quantize at
# 128K / 256K / 512K / 1M / 2M / 4M elements: 10.0 / 12.6 / 14.6 / 15.0 / 13.7 / 10.7 GB/s.
_CHUNK_ELEMENTS = 1 << 20
_FP32 = torch.finfo(torch.float32)
# Below this absmax, 127 / absmax overflows fp32: such (non-zero) blocks get scale = FLT_MIN instead.
_TINY_ABSMAX = 127 * _FP32.tiny
# Largest scale whose q = 127 still decodes to a finite fp32 (127 * fl(FLT_MAX / 127) rounds to inf).
_MAX_SCALE = torch.nextafter(torch.tensor(_FP32.max / 127), torch.tensor(0.0)).item()
_ROUND_MAGIC, _ROUND_MAGIC_BITS = 1.5 * 2**23, 0x4B400000  # the fp32 1.5 * 2**23 and its bit pattern
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (torch.float32, torch.float16, torch.bfloat16)}

# decode() views the received bytes without copying them; it never writes into them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", module=__name__)


class CodecError(ValueError):
    """Input the codec refuses: non-finite values, a malformed buffer, bad arguments."""


def _num_blocks(numel: int, block_size: int) -> int:
    if not isinstance(block_size, int) or block_size < 1:
        raise CodecError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(numel, int) or numel < 0:
        raise CodecError(f"numel must be a non-negative int, got {numel!r}")
    return -(-numel // block_size)


def encoded_size(numel: int, block_size: int = BLOCK_SIZE) -> int:
    """Bytes of `encode` for `numel` values: 4 per block (its scale) + 1 per value."""
    return 4 * _num_blocks(numel, block_size) + numel


def _flat_fp32(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _DTYPES.values():
        raise CodecError(f"can only quantize float32, float16 or bfloat16 tensors, got {x.dtype}")
    return x.detach().reshape(-1).to(torch.float32).contiguous()


def _quantize_chunk(xb, qb, absmax, lo, inv, scratch) -> None:
    """Eager: xb (rows, block) fp32 -> qb int8 and absmax (rows,); lo, inv, scratch are work space.
    The same arithmetic as `_quantize_rows`, so both give identical bytes."""
    torch.amax(xb, 1, out=absmax)  # NaN / inf in a block make its absmax NaN / inf: checked by the caller
    torch.amin(xb, 1, out=lo)  # vectorised reductions that only read; abs() first would write a copy
    torch.maximum(absmax, lo.neg_(), out=absmax)
    torch.reciprocal(torch.clamp(absmax, min=_TINY_ABSMAX, out=inv), out=inv).mul_(127.0)  # finite, zeros too
    torch.mul(xb, inv[:, None], out=scratch).round_()
    qb.copy_(scratch)  # exact: scratch holds integers in [-127, 127]


def _quantize_rows(xb: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """Fused form for torch.compile, one read of each row: xb (rows, block) fp32 -> qb int8; returns
    absmax (rows, 1)."""
    absmax = xb.abs().amax(1, keepdim=True)
    y = xb * (torch.reciprocal(absmax.clamp(min=_TINY_ABSMAX)) * 127.0)
    # round(y), half to even, as round_() does: adding 1.5 * 2**23 leaves round(y) in the low mantissa
    # bits (|y| <= 127.5 < 2**22). 12% faster than round() + convert in the generated code.
    qb.copy_(((y + _ROUND_MAGIC).view(torch.int32) - _ROUND_MAGIC_BITS).to(torch.int8))
    return absmax


class _Compiled(NamedTuple):
    block_size: int
    kernel: Callable  # torch.compile(_quantize_rows)
    state: torch._C._dynamo.guards.GlobalStateGuard  # dynamo's global state when it was compiled


_compiled: _Compiled | None = None  # set by compile_kernels()


def compile_kernels(block_size: int = BLOCK_SIZE) -> float | None:
    """Build the fused quantize kernel (torch.compile, inductor's C++ backend) for `block_size`.

    Returns the seconds it took (1-3 s with a warm inductor cache, ~8 s cold, on 2 cores), or None if
    it failed: then the eager kernel stays in use. Call it once at start-up, after torch.set_num_threads:
    later calls use the compiled kernel only while dynamo's global state (grad mode aside, which the
    codec sets itself; threads, default dtype, ...) matches, so they never stall on a recompilation.
    """
    global _compiled
    _num_blocks(0, block_size)
    start = time.perf_counter()
    try:
        kernel = torch.compile(_quantize_rows)
        _run_compiled(kernel, torch.zeros(2, block_size), torch.empty(2, block_size, dtype=torch.int8))
        with torch.no_grad():
            state = torch._C._dynamo.guards.GlobalStateGuard()
    except Exception as e:  # no C++ compiler, no Python headers, an inductor bug: all mean "stay eager"
        logger.warning(f"torch.compile of the int8 codec failed, staying eager: {str(e).splitlines()[0]}")
        return None
    _compiled = _Compiled(block_size, kernel, state)
    return time.perf_counter() - start


def _run_compiled(kernel: Callable, xb: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    # One graph for any number of rows >= 2 (dynamo specialises 0 and 1); block_size stays static.
    torch._dynamo.mark_dynamic(xb, 0)
    torch._dynamo.mark_dynamic(qb, 0)
    with torch.no_grad():  # grad mode is part of the graph's guards: keep it constant
        return kernel(xb, qb)


def _use_compiled(compiled: _Compiled | None, xb: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether a compiled kernel may quantize these rows: built for their block size, at least 2 of them (its one
    graph), outside inference mode, and under the global state it was compiled in (else it would recompile)."""
    rows, block_size = xb.shape
    if compiled is None or compiled.block_size != block_size or rows < 2 or \
            torch.is_inference_mode_enabled() or xb.is_inference() or out.is_inference():
        return False
    with torch.no_grad():
        return compiled.state.check()


def _quantize_full_blocks(xb: torch.Tensor, qb: torch.Tensor, absmax: torch.Tensor) -> None:
    rows, block_size = xb.shape
    compiled = _compiled
    if _use_compiled(compiled, xb, qb):
        absmax.copy_(_run_compiled(compiled.kernel, xb, qb).view(-1))
        return
    step = max(1, _CHUNK_ELEMENTS // block_size)  # rows per chunk
    lo, inv = torch.empty(min(step, rows), dtype=torch.float32), torch.empty(min(step, rows), dtype=torch.float32)
    scratch = torch.empty(min(step, rows), block_size, dtype=torch.float32)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        k = stop - start
        _quantize_chunk(xb[start:stop], qb[start:stop], absmax[start:stop], lo[:k], inv[:k], scratch[:k])


def quantize(
    x: torch.Tensor, block_size: int = BLOCK_SIZE, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Any-shaped float tensor -> (q: int8 (numel,), scales: fp32 (ceil(numel / block_size),)).

    `out=(q, scales)` writes into (and returns) preallocated contiguous tensors of those dtypes and
    sizes: a fresh 64 MiB q costs about as much in page faults as the quantization itself.
    """
    x = _flat_fp32(x)
    n = x.numel()
    nb = _num_blocks(n, block_size)
    if out is None:
        q, scales = torch.empty(n, dtype=torch.int8), torch.empty(nb, dtype=torch.float32)
    else:
        q, scales = out
        if q.dtype != torch.int8 or q.numel() != n or scales.dtype != torch.float32 or scales.numel() != nb:
            raise CodecError(f"out must be (int8 of {n}, float32 of {nb}) tensors")
        if not (q.is_contiguous() and scales.is_contiguous()):
            raise CodecError("out tensors must be contiguous")
    if nb == 0:
        return q, scales
    q_flat, absmax = q.view(-1), scales.view(-1)  # absmax: each block's, turned into its scale at the end
    full = n - n % block_size
    if full:
        rows = full // block_size
        _quantize_full_blocks(x[:full].view(rows, block_size), q_flat[:full].view(rows, block_size), absmax[:rows])
    if full < n:  # the last, partial block: a zero-padded copy, which leaves its absmax unchanged
        tail = torch.zeros(1, block_size, dtype=torch.float32)
        tail[0, : n - full] = x[full:]
        q_tail = torch.empty(1, block_size, dtype=torch.int8)
        _quantize_full_blocks(tail, q_tail, absmax[-1:])
        q_flat[full:] = q_tail[0, : n - full]
    lo, hi = (v.item() for v in torch.aminmax(absmax))
    if not math.isfinite(hi):
        bad = n - int(torch.isfinite(x).sum())
        raise CodecError(f"cannot quantize {bad} non-finite value(s) (NaN or inf) among {n}")
    if lo < _TINY_ABSMAX:  # zero blocks keep scale 0; others were quantized with inv = 127 / _TINY_ABSMAX
        absmax[(absmax > 0) & (absmax < _TINY_ABSMAX)] = _TINY_ABSMAX
    absmax.div_(127.0).clamp_(max=_MAX_SCALE)
    return q, scales


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None, block_size: int = BLOCK_SIZE
) -> torch.Tensor:
    """(q int8, scales fp32) -> fp32 of numel(q) values: 1-D, or written into contiguous `out` and returned."""
    n = q.numel()
    nb = _num_blocks(n, block_size)
    if q.dtype != torch.int8 or scales.dtype != torch.float32 or scales.numel() != nb:
        raise CodecError(
            f"need int8 q and {nb} float32 scales for {n} values, got {q.dtype} and {scales.numel()} {scales.dtype}"
        )
    q, scales = q.reshape(-1), scales.reshape(-1)
    if out is None:
        result = flat = torch.empty(n, dtype=torch.float32)
    else:
        if out.dtype != torch.float32 or out.numel() != n or not out.is_contiguous():
            raise CodecError(f"out must be a contiguous float32 tensor of {n} elements")
        result, flat = out, out.view(-1)
    full = n - n % block_size
    step = max(1, _CHUNK_ELEMENTS // block_size) * block_size
    for start in range(0, full, step):  # chunks: the int8 -> fp32 copy leaves its output in cache for mul_
        stop = min(start + step, full)
        chunk = flat[start:stop].view(-1, block_size)
        chunk.copy_(q[start:stop].view(-1, block_size)).mul_(scales[start // block_size : stop // block_size, None])
    if full < n:
        flat[full:].copy_(q[full:]).mul_(scales[-1])
    return result


def encode(x: torch.Tensor, block_size: int = BLOCK_SIZE) -> bytes:
    """Quantize x into the wire format: fp32 scales, then int8 values (see the module docstring)."""
    x = _flat_fp32(x)
    n = x.numel()
    nb = _num_blocks(n, block_size)
    buf = torch.empty(4 * nb + n, dtype=torch.uint8)
    quantize(x, block_size, out=(buf[4 * nb :].view(torch.int8), buf[: 4 * nb].view(torch.float32)))
    return buf.numpy().tobytes()


def decode(data: bytes | memoryview, numel: int, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Wire format -> fp32 1-D tensor of `numel` values. Refuses a buffer of the wrong length and scales
    that are NaN, inf, negative or so large that q * scale overflows (a peer may be hostile)."""
    nb = _num_blocks(numel, block_size)
    data = memoryview(data).cast("B")
    if len(data) != 4 * nb + numel:
        raise CodecError(
            f"expected {4 * nb + numel} bytes for {numel} values in blocks of {block_size}, got {len(data)}"
        )
    if numel == 0:
        return torch.empty(0, dtype=torch.float32)
    buf = torch.frombuffer(data, dtype=torch.uint8)
    scales, q = buf[: 4 * nb].view(torch.float32), buf[4 * nb :].view(torch.int8)
    if not ((scales >= 0) & (scales <= _MAX_SCALE)).all():  # NaN fails both comparisons
        raise CodecError("refusing scales that are non-finite, negative or too large")
    return dequantize(q, scales, block_size=block_size)


class Int8BlockwiseCompression(CompressionBase):
    """hivemind codec over `encode` / `decode`; keeps shape, dtype and requires_grad."""

    compression_type = runtime_pb2.CompressionType.BLOCKWISE_8BIT

    def __init__(self, block_size: int = BLOCK_SIZE):
        _num_blocks(0, block_size)
        self.block_size = block_size

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=encode(tensor, self.block_size),
            size=tensor.shape,
            dtype=str(tensor.dtype).removeprefix("torch."),
            requires_grad=tensor.requires_grad,
        )

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        dtype = _DTYPES.get(serialized_tensor.dtype)
        if dtype is None:
            raise CodecError(f"unsupported dtype {serialized_tensor.dtype!r}")
        shape = torch.Size(serialized_tensor.size)
        flat = decode(serialized_tensor.buffer, shape.numel(), self.block_size)
        return flat.to(dtype).reshape(shape).requires_grad_(serialized_tensor.requires_grad)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return (8 + 32 / self.block_size) / torch.finfo(info.descriptor.dtype).bits


def register_with_hivemind() -> None:
    """Make hivemind's BLOCKWISE_8BIT (de)serialize with our codec in this process; idempotent.
    Call it on every peer before its averager starts (a forked averager inherits it)."""
    if not isinstance(serialization._BASE_COMPRESSION_TYPES["BLOCKWISE_8BIT"], Int8BlockwiseCompression):
        serialization._BASE_COMPRESSION_TYPES["BLOCKWISE_8BIT"] = Int8BlockwiseCompression()
