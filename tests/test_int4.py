"""The int4 blockwise codec: its error bound, wire format, block alignment, what it refuses, and determinism."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from swarm import int4
from swarm.compression import CodecError
from swarm.int4 import BLOCK_SIZE, decode, encode, encoded_size

# decode() views the received bytes read-only; torch warns once per process (silenced outside pytest)
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

SIZES = [1, 2, 127, 128, 129, 3 * 128 + 7, 5000]
# Slack over scale / 2: fp32 rounding of x * (7 / absmax) before round() and of q * scale after it.
REL_EPS = 1e-5


def sample(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if kind == "heavy":  # log-normal scale mixture: magnitudes over ~10 orders, outliers in most blocks
        x *= torch.exp(4 * torch.randn(n, generator=g))
    return x


def block_scales(x: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """absmax / 7 of each block, computed independently of the codec."""
    n = x.numel()
    padded = torch.cat([x.reshape(-1), x.new_zeros(-n % block_size)]).view(-1, block_size)
    return padded.abs().amax(1) / 7


def unpack_reference(data: bytes, n: int, block_size: int) -> tuple[list[float], list[int]]:
    """The wire format as documented, read with struct and Python ints: (scales, levels q in [-8, 7])."""
    scales, levels, offset = [], [], 0
    for start in range(0, n, block_size):
        length = min(block_size, n - start)
        h = (length + 1) // 2
        scales.append(struct.unpack_from("<f", data, offset)[0])
        body = data[offset + 4 : offset + 4 + h]
        nibbles = [b & 15 for b in body] + [b >> 4 for b in body]  # value i low, value i + h high
        levels += [v - 8 for v in nibbles[:length]]
        offset += 4 + h
    assert offset == len(data)
    return scales, levels


def assert_within_half_a_step(x: torch.Tensor, data: torch.Tensor, block_size: int = BLOCK_SIZE) -> None:
    """decode(data) is within half a step of x, each block's step being the scale the message carries."""
    y = decode(data, x.numel(), block_size)
    scales = torch.tensor(unpack_reference(bytes(data.numpy()), x.numel(), block_size)[0])
    bound = scales.repeat_interleave(block_size)[: x.numel()] * (0.5 + REL_EPS)
    err = (x - y).abs()
    if not (err <= bound).all():
        worst = int((err - bound).argmax())
        raise AssertionError(f"element {worst}: |{x[worst]} - {y[worst]}| = {err[worst]} > {bound[worst]}")


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("n", SIZES)
def test_round_trip_within_half_a_step(kind, n):
    x = sample(kind, n)
    data = encode(x)
    assert data.dtype == torch.uint8 and data.numel() == encoded_size(n)
    y = decode(data, n)
    assert y.dtype == torch.float32 and y.shape == (n,)
    assert_within_half_a_step(x, data)
    scales, levels = unpack_reference(bytes(data.numpy()), n, BLOCK_SIZE)
    assert torch.equal(torch.tensor(scales), block_scales(x))  # scale = absmax / 7, exactly
    assert min(levels) >= -7 and max(levels) <= 7
    assert all(7 in map(abs, levels[i : i + BLOCK_SIZE]) for i in range(0, n, BLOCK_SIZE))  # absmax -> +-7
    # decode is (nibble - 8) * scale in fp32: one rounding of an exact product
    expected = np.float32(np.repeat(scales, BLOCK_SIZE)[:n]) * np.array(levels, dtype=np.float32)
    assert np.array_equal(y.numpy(), expected)


def test_gaussian_error_is_twelve_percent_of_the_norm():
    x = sample("normal", 1 << 18)
    y = decode(encode(x), x.numel())
    # uniform rounding error of a step absmax / 7, absmax ~2.9 sigma a block of 128: ~12% of the norm
    assert 0.10 < float((x - y).norm() / x.norm()) < 0.13


def test_documented_layout_of_a_small_vector():
    x = torch.tensor([7.0, -7.0, 0.0, 1.0, 3.4, -3.6, 0.5, 1.5, 2.0])  # absmax 7: scale 1, q = round half to even
    data = bytes(encode(x, block_size=8).numpy())
    q = [7, -7, 0, 1, 3, -4, 0, 2]  # 0.5 -> 0 and 1.5 -> 2: half to even
    first = bytes(((q[i] + 8) | ((q[i + 4] + 8) << 4)) for i in range(4))
    last = struct.pack("<f", 2 / 7) + bytes([7 + 8 | 8 << 4])  # one value: its high nibble pads with 8
    assert data == struct.pack("<f", 1.0) + first + last
    assert encoded_size(9, 8) == len(data) == 4 + 4 + 4 + 1


@pytest.mark.parametrize("n", [1 << 12, 5 * 128 + 3])
def test_block_aligned_parts_encode_to_slices_of_the_whole(n):
    x = sample("heavy", n)
    whole = encode(x)
    for inner in ([128], [3 * 128, 10 * 128], [n - n % 128]):
        cuts = [0] + [c for c in inner if c < n] + [n]
        parts = [encode(x[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
        assert torch.equal(torch.cat(parts), whole)
        for (a, b), part in zip(zip(cuts[:-1], cuts[1:]), parts):  # and each part decodes to the whole's slice
            assert torch.equal(decode(part, b - a), decode(whole, n)[a:b])


def test_zeros_decode_exactly():
    for n in (1, 128, 3000):
        data = encode(torch.zeros(n))
        assert torch.equal(decode(data, n), torch.zeros(n))
    x = sample("heavy", 3 * BLOCK_SIZE)
    x[::3] = 0.0  # zeros inside non-zero blocks
    x[BLOCK_SIZE : 2 * BLOCK_SIZE] = 0.0  # and one block of zeros between two others
    y = decode(encode(x), x.numel())
    assert torch.equal(y[x == 0], torch.zeros(int((x == 0).sum())))


def test_denormal_blocks_keep_the_bound():
    # 7 / absmax overflows fp32 for the first block: the codec raises its scale to FLT_MIN instead
    x = torch.cat([sample("normal", BLOCK_SIZE) * 1e-39, sample("normal", BLOCK_SIZE, seed=1) * 1e-30])
    data = encode(x)
    assert struct.unpack_from("<f", bytes(data.numpy()))[0] == torch.finfo(torch.float32).tiny
    assert_within_half_a_step(x, data)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(bad):
    x = sample("normal", 3000)
    x[[5, 1500, 2999]] = bad
    with pytest.raises(CodecError, match="3 non-finite") as info:
        encode(x)
    assert "\n" not in str(info.value)


def test_decode_refuses_a_wrong_length():
    data = bytes(encode(sample("normal", 1025)).numpy())
    assert len(data) == encoded_size(1025) == 4 * 9 + 513
    for wrong in (data[:-1], data + b"\0", b""):
        with pytest.raises(CodecError, match="expected 549 bytes"):
            decode(wrong, 1025)
    with pytest.raises(CodecError):
        decode(data, -1)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), -1.0, 3e38])
@pytest.mark.parametrize("block", [1, 2])  # a full block's record, and the last, shorter one's
def test_decode_refuses_hostile_scales(scale, block):
    data = bytearray(encode(sample("normal", 2 * BLOCK_SIZE + 5)).numpy())
    struct.pack_into("<f", data, block * (4 + BLOCK_SIZE // 2), scale)
    with pytest.raises(CodecError, match="non-finite, negative or too large"):
        decode(bytes(data), 2 * BLOCK_SIZE + 5)


def test_the_nibble_never_sent_decodes_finite():
    data = bytearray(encode(torch.full((BLOCK_SIZE,), 3e38)).numpy())
    data[4:] = bytes(len(data) - 4)  # every nibble 0: level -8 at the largest scale decode accepts
    y = decode(bytes(data), BLOCK_SIZE)
    assert torch.isfinite(y).all() and (y < -3e38).all()


def test_out_arguments_are_written_and_returned():
    x = sample("heavy", 5000)
    out = torch.empty(encoded_size(5000), dtype=torch.uint8)
    assert encode(x, out=out) is out and torch.equal(out, encode(x))
    values = torch.empty(50, 100)
    assert decode(out, 5000, out=values) is values
    assert torch.equal(values.reshape(-1), decode(out, 5000))
    assert torch.equal(decode(bytes(out.numpy()), 5000), decode(memoryview(out.numpy()), 5000))
    with pytest.raises(CodecError, match="out must be"):
        encode(x, out=torch.empty(encoded_size(5000) + 1, dtype=torch.uint8))
    with pytest.raises(CodecError, match="out must be"):
        decode(out, 5000, out=torch.empty(5000, dtype=torch.float64))


def test_bad_arguments_are_refused():
    with pytest.raises(CodecError, match="float32, float16 or bfloat16"):
        encode(torch.arange(10))
    with pytest.raises(CodecError, match="multiple of 8"):
        encode(torch.ones(10), block_size=12)
    with pytest.raises(CodecError, match="block_size"):
        encoded_size(10, 0)


def test_wire_size_is_an_eighth_of_fp32_plus_scales():
    n = 1 << 20
    assert encoded_size(n) == n // 2 + 4 * n // BLOCK_SIZE == 557056  # 4.25 bits a value: 7.5x smaller than fp32
    assert encoded_size(0) == 0 and encoded_size(3) == 4 + 2


def test_same_bytes_and_values_with_one_or_two_threads():
    x = sample("heavy", (1 << 20) + 77)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2):
            torch.set_num_threads(t)
            data = encode(x)
            results.append((data, decode(data, x.numel())))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_compiled_kernel_gives_the_eager_bytes(monkeypatch):
    monkeypatch.setattr(int4, "_compiled", None)  # eager now, and restored afterwards
    xs = [sample("normal", 5 * BLOCK_SIZE), sample("heavy", 3 * BLOCK_SIZE + 7), torch.zeros(2 * BLOCK_SIZE)]
    xs.append(torch.cat([sample("normal", BLOCK_SIZE) * 1e-39, torch.zeros(BLOCK_SIZE), sample("normal", 100)]))
    eager = [encode(x) for x in xs]
    if int4.compile_kernels() is None:
        pytest.skip("torch.compile is not available here")
    assert int4._compiled is not None
    assert all(torch.equal(encode(x), e) for x, e in zip(xs, eager))
    xs[0][[7, 300]] = torch.tensor([float("nan"), float("inf")])
    with pytest.raises(CodecError, match="2 non-finite"):
        encode(xs[0])
