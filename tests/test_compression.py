"""The int8 blockwise codec: its error bound, exact zeros, what it refuses, and its hivemind wiring."""

from __future__ import annotations

import struct

import pytest
import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, serialization, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from swarm import compression
from swarm.compression import (
    BLOCK_SIZE,
    CodecError,
    Int8BlockwiseCompression,
    decode,
    dequantize,
    encode,
    encoded_size,
    quantize,
    register_with_hivemind,
)

# decode() views the received bytes read-only; torch warns once per process (silenced outside pytest)
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

SIZES = [1, 1023, 1024, 1025, 3 * 1024 + 7]
# Slack over scale / 2: fp32 rounding of x * (127 / absmax) before round() and of q * scale after it.
REL_EPS = 1e-5


def sample(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if kind == "heavy":  # log-normal scale mixture: magnitudes over ~10 orders, outliers in most blocks
        x *= torch.exp(4 * torch.randn(n, generator=g))
    return x


def per_element_scale(scales: torch.Tensor, n: int, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    return scales.repeat_interleave(block_size)[:n]


def assert_within_bound(x: torch.Tensor, y: torch.Tensor, scales: torch.Tensor, extra=0.0) -> None:
    x, y = x.reshape(-1).float(), y.reshape(-1).float()
    bound = per_element_scale(scales, x.numel()) * (0.5 + REL_EPS) + extra
    err = (x - y).abs()
    if not (err <= bound).all():
        worst = int((err - bound).argmax())
        raise AssertionError(f"element {worst}: |{x[worst]} - {y[worst]}| = {err[worst]} > {bound[worst]}")


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("n", SIZES)
def test_round_trip_within_half_a_scale(kind, n):
    x = sample(kind, n)
    q, scales = quantize(x)
    assert q.dtype == torch.int8 and q.shape == (n,)
    assert scales.dtype == torch.float32 and scales.shape == (-(-n // BLOCK_SIZE),)
    padded = torch.cat([x, x.new_zeros(scales.numel() * BLOCK_SIZE - n)]).view(-1, BLOCK_SIZE)
    assert torch.equal(scales, padded.abs().amax(1) / 127)
    assert int(q.abs().max()) == 127  # each block's absmax element maps to +-127
    y = dequantize(q, scales)
    assert y.dtype == torch.float32 and y.shape == (n,)
    assert_within_bound(x, y, scales)
    assert torch.equal(decode(encode(x), n), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1,), (1025,), (4, 1024), (0, 3)])
def test_hivemind_codec_restores_shape_dtype_and_values(dtype, shape):
    x = sample("normal", torch.Size(shape).numel()).reshape(shape).to(dtype).requires_grad_()
    codec = Int8BlockwiseCompression()
    message = codec.compress(x, CompressionInfo.from_tensor(x))
    y = codec.extract(message)
    assert y.shape == x.shape and y.dtype == dtype and y.requires_grad
    _, scales = quantize(x)
    # the decoded fp32 value is rounded once more to fp16 / bf16: half an ulp of that type
    x, y = x.detach(), y.detach()
    assert_within_bound(x, y, scales, extra=x.float().abs().reshape(-1) * torch.finfo(dtype).eps)


def test_zeros_decode_exactly():
    for n in (1, 1024, 3000):
        q, scales = quantize(torch.zeros(n))
        assert not q.any() and not scales.any()
        assert torch.equal(dequantize(q, scales), torch.zeros(n))
    x = sample("heavy", 3 * BLOCK_SIZE)
    x[::3] = 0.0  # zeros inside non-zero blocks
    x[BLOCK_SIZE : 2 * BLOCK_SIZE] = 0.0  # and one block of zeros between two others
    y = decode(encode(x), x.numel())
    assert torch.equal(y[x == 0], torch.zeros(int((x == 0).sum())))
    assert quantize(x)[1][1] == 0


def test_denormal_blocks_keep_the_bound():
    # 127 / absmax overflows fp32 for these blocks: the codec raises their scale to FLT_MIN instead
    x = torch.cat([sample("normal", BLOCK_SIZE) * 1e-39, sample("normal", BLOCK_SIZE, seed=1) * 1e-30])
    q, scales = quantize(x)
    assert scales[0] == torch.finfo(torch.float32).tiny and torch.isfinite(scales).all()
    assert_within_bound(x, dequantize(q, scales), scales)


def test_does_not_depend_on_the_default_dtype():
    x = sample("normal", 2000)
    expected = encode(x)
    torch.set_default_dtype(torch.float64)
    try:
        assert encode(x) == expected
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(bad):
    x = sample("normal", 3000)
    x[[5, 1500, 2999]] = bad
    for call in (quantize, encode):
        with pytest.raises(CodecError, match="3 non-finite") as info:
            call(x)
        assert "\n" not in str(info.value)


def test_decode_refuses_a_wrong_length():
    data = encode(sample("normal", 1025))
    assert len(data) == encoded_size(1025)
    for wrong in (data[:-1], data + b"\0", b""):
        with pytest.raises(CodecError, match="expected 1033 bytes"):
            decode(wrong, 1025)
    with pytest.raises(CodecError):
        decode(data, -1)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0, 3e38])
def test_decode_refuses_hostile_scales(scale):
    data = bytearray(encode(sample("normal", 2048)))
    data[4:8] = struct.pack("<f", scale)  # the second block's scale
    with pytest.raises(CodecError, match="non-finite, negative or too large"):
        decode(bytes(data), 2048)


def test_bad_arguments_are_refused():
    with pytest.raises(CodecError, match="float32, float16 or bfloat16"):
        quantize(torch.arange(10))
    with pytest.raises(CodecError, match="block_size"):
        quantize(torch.ones(10), block_size=0)
    q, scales = quantize(torch.ones(2048))
    with pytest.raises(CodecError, match="2 float32 scales"):
        dequantize(q, scales[:1])
    with pytest.raises(CodecError, match="out must be"):
        quantize(torch.ones(2048), out=(q.float(), scales))
    message = Int8BlockwiseCompression().compress(torch.ones(3), None)
    message.dtype = "int64"
    with pytest.raises(CodecError, match="unsupported dtype"):
        Int8BlockwiseCompression().extract(message)


def test_out_arguments_are_written_and_returned():
    x = sample("heavy", 5000)
    q, scales = torch.empty(5000, dtype=torch.int8), torch.empty(5, dtype=torch.float32)
    assert quantize(x, out=(q, scales))[0] is q
    assert torch.equal(q, quantize(x)[0]) and torch.equal(scales, quantize(x)[1])
    out = torch.empty(50, 100)
    assert dequantize(q, scales, out=out) is out
    assert torch.equal(out.reshape(-1), dequantize(q, scales))


def test_registered_with_hivemind_uses_our_bytes(monkeypatch):
    registry = serialization._BASE_COMPRESSION_TYPES
    monkeypatch.setitem(registry, "BLOCKWISE_8BIT", registry["BLOCKWISE_8BIT"])  # restored afterwards
    register_with_hivemind()
    codec = registry["BLOCKWISE_8BIT"]
    register_with_hivemind()
    assert registry["BLOCKWISE_8BIT"] is codec and isinstance(codec, Int8BlockwiseCompression)
    x = sample("heavy", 7 * 443).reshape(7, 443)
    message = serialize_torch_tensor(x, runtime_pb2.CompressionType.BLOCKWISE_8BIT)
    assert message.buffer == encode(x)
    y = deserialize_torch_tensor(message)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_within_bound(x, y, quantize(x)[1])


def test_wire_size_is_a_quarter_of_fp32_plus_scales():
    n = 1 << 20
    assert encoded_size(n) == n + 4 * n // BLOCK_SIZE
    assert len(encode(torch.randn(n))) / (4 * n) == pytest.approx(0.25 + 1 / BLOCK_SIZE)
    assert encoded_size(3 * 1024 + 7) == 3 * 1024 + 7 + 4 * 4 and encoded_size(0) == 0
    info = CompressionInfo.from_tensor(torch.zeros(n))
    assert Int8BlockwiseCompression().estimate_compression_ratio(info) == pytest.approx(0.25 + 1 / BLOCK_SIZE)


def test_compiled_kernel_gives_the_eager_bytes(monkeypatch):
    monkeypatch.setattr(compression, "_compiled", None)  # eager now, and restored afterwards
    xs = [sample("normal", 5 * BLOCK_SIZE), sample("heavy", 3 * BLOCK_SIZE + 7), torch.zeros(2 * BLOCK_SIZE)]
    xs.append(torch.cat([sample("normal", BLOCK_SIZE) * 1e-39, torch.zeros(BLOCK_SIZE), sample("normal", 100)]))
    eager = [encode(x) for x in xs]
    if compression.compile_kernels() is None:
        pytest.skip("torch.compile is not available here")
    assert compression._compiled is not None
    assert [encode(x) for x in xs] == eager
    xs[0][[7, 3000]] = torch.tensor([float("nan"), float("inf")])
    with pytest.raises(CodecError, match="2 non-finite"):
        encode(xs[0])
