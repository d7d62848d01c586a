"""The top-k sparse codec: exact top-k with lowest-index ties, its error bound, the documented wire format, what it
refuses (naming the problem), and reductions that give the same bits on every machine."""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch

from swarm import sparse
from swarm.compression import CodecError
from swarm.sparse import Message, add_scaled, decode, encode, encoded_size, kept_per_chunk, message_norm, unpack

# decode() views the received bytes read-only; torch warns once per process (silenced outside pytest)
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

C, K = sparse.CHUNK_SIZE, 64
REL_EPS = 1e-6  # fp32 rounding of a level: half an ulp, 2^-24 relative


def gaussian(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def geometry(size: int, k: int) -> tuple[int, int, int, int]:
    """(k, l, fields bytes, upper bits) of a chunk of `size` values keeping k, from the documented format."""
    k = min(k, size)
    low = math.floor(math.log2(size // k))
    upper = k + math.ceil(size / 2**low) - 1
    return k, low, math.ceil(k * (2 + low) / 8), upper


def pack_reference(chunks: list[tuple[float, float, list[int], list[int]]], size: int, k: int, numel: int) -> bytes:
    """The documented wire format, written with struct and Python ints, for (lo, hi, indices, codes) of each chunk.
    Takes any indices, so it also writes the malformed messages a hostile peer could send."""
    data = b""
    for c, (lo, hi, index, code) in enumerate(chunks):
        kk, low, fields_bytes, upper_bits = geometry(min(size, numel - c * size), k)
        fields = sum(((i & (2**low - 1)) | (q << low)) << (j * (2 + low)) for j, (i, q) in enumerate(zip(index, code)))
        upper = 0
        for j, i in enumerate(index):
            upper |= 1 << ((i >> low) + j)
        data += struct.pack("<ff", lo, hi) + fields.to_bytes(fields_bytes, "little")
        data += upper.to_bytes(math.ceil(upper_bits / 8), "little")
    return data


def parse_reference(data: bytes, numel: int, size: int, k: int) -> list[tuple[float, float, list[int], list[int]]]:
    """The inverse of pack_reference: read a message as the module docstring describes it."""
    chunks, offset = [], 0
    for start in range(0, numel, size):
        kk, low, fields_bytes, upper_bits = geometry(min(size, numel - start), k)
        lo, hi = struct.unpack_from("<ff", data, offset)
        fields = int.from_bytes(data[offset + 8 : offset + 8 + fields_bytes], "little")
        upper_bytes = math.ceil(upper_bits / 8)
        upper = int.from_bytes(data[offset + 8 + fields_bytes : offset + 8 + fields_bytes + upper_bytes], "little")
        ones = [p for p in range(upper_bits) if upper >> p & 1]
        field = [(fields >> (j * (2 + low))) & (2 ** (2 + low) - 1) for j in range(kk)]
        index = [((p - j) << low) | (f & (2**low - 1)) for j, (p, f) in enumerate(zip(ones, field))]
        chunks.append((lo, hi, index, [f >> low for f in field]))
        offset += 8 + fields_bytes + upper_bytes
    assert offset == len(data)
    return chunks


def top_k_reference(x: torch.Tensor, size: int, k: int) -> list[list[int]]:
    """Each chunk's k largest magnitudes, ties to the lowest index, by a plain sort."""
    values = x.tolist()
    chunks = []
    for start in range(0, len(values), size):
        row = values[start : start + size]
        order = sorted(range(len(row)), key=lambda i: (-abs(row[i]), i))
        chunks.append(sorted(order[: min(k, len(row))]))
    return chunks


def tree_sum(values: list[float]) -> float:
    """Neighbours added pairwise, level by level, after zero-padding to a power of two (the documented order)."""
    values = values + [0.0] * ((1 << (len(values) - 1).bit_length()) - len(values))
    while len(values) > 1:
        values = [values[i] + values[i + 1] for i in range(0, len(values), 2)]
    return values[0]


def levels_reference(kept: list[float]) -> tuple[float, float, list[bool]]:
    """(lo, hi, hi or not for each kept value) as the module docstring defines them: float64 sums over the kept
    values in index order (the other group's as zeros) by a pairwise tree, divided, rounded once to fp32."""
    magnitude = [abs(v) for v in kept]
    t, m = min(magnitude), max(magnitude)
    split = (t + m) / 2 if t > 0 else 0.0
    high = [a > split for a in magnitude]
    count = sum(high)
    lo = tree_sum([0.0 if h else a for a, h in zip(magnitude, high)]) / (len(kept) - count)
    hi = tree_sum([a if h else 0.0 for a, h in zip(magnitude, high)]) / count if count else m
    return float(np.float32(lo)), float(np.float32(hi)), high


def test_kept_per_chunk():
    assert kept_per_chunk() == kept_per_chunk(4096, 1 / 64) == 64
    assert kept_per_chunk(4096, 0.03) == 123 and kept_per_chunk(100, 0.001) == 1 and kept_per_chunk(7, 1.0) == 7
    for chunk_size, density in [(4096, 0.0), (4096, 1.5), (4096, float("nan")), (0, 0.1), ((1 << 16) + 1, 0.1)]:
        with pytest.raises(CodecError, match="chunk_size|density"):
            kept_per_chunk(chunk_size, density)


@pytest.mark.parametrize("n, size, density", [(3 * C + 100, C, 1 / 64), (10_000, 1000, 0.03), (C, C, 1 / 64),
                                              (300, 16, 0.25), (50, 64, 1 / 64), (2 * C, C, 0.5)])
def test_top_k_is_exact_with_ties_to_the_lowest_index(n, size, density):
    x = torch.round(gaussian(n) * 4) / 4  # ties everywhere, at the threshold too
    x[: n // 3] = 0.0  # and chunks with fewer non-zeros than k, whose zeros tie at 0
    k = kept_per_chunk(size, density)
    data = bytes(encode(x, size, density).numpy())
    assert len(data) == encoded_size(n, size, density)
    chunks = parse_reference(data, n, size, k)
    expected = top_k_reference(x, size, k)
    assert [index for _, _, index, _ in chunks] == expected
    assert unpack(data, n, size, density).index.tolist() == [c * size + i for c, e in enumerate(expected) for i in e]


@pytest.mark.parametrize("n", [C, 5 * C + 1234])
def test_round_trip_kept_values_within_their_group_and_the_rest_exactly_zero(n):
    x = gaussian(n, seed=1)
    y = decode(encode(x), n)
    data = bytes(encode(x).numpy())
    for c, (lo, hi, index, code) in enumerate(parse_reference(data, n, C, K)):
        kept = x[c * C + torch.tensor(index)].tolist()
        ref_lo, ref_hi, high = levels_reference(kept)
        assert (lo, hi) == (ref_lo, ref_hi) and [q & 1 == 1 for q in code] == high
        assert [q >> 1 == 1 for q in code] == [v < 0 for v in kept]
        magnitude = [abs(v) for v in kept]
        t, m = min(magnitude), max(magnitude)
        for j, (v, h) in enumerate(zip(kept, high)):  # within its group's spread, and so within (m - t) / 2
            group = [a for a, g in zip(magnitude, high) if g == h]
            decoded = float(y[c * C + index[j]])
            assert math.copysign(1, decoded) == math.copysign(1, v)
            assert abs(abs(v) - abs(decoded)) <= (max(group) - min(group)) * (1 + REL_EPS) + REL_EPS * m
            assert abs(abs(v) - abs(decoded)) <= (m - t) / 2 * (1 + REL_EPS) + REL_EPS * m
        rest = torch.ones(min(C, n - c * C), dtype=torch.bool)
        rest[index] = False
        assert not y[c * C : (c + 1) * C][rest].any()


def test_gaussian_error_is_the_energy_of_the_dropped_values():
    x = gaussian(1 << 18, seed=2)
    error = float((x - decode(encode(x), x.numel())).norm() / x.norm())
    # 1.56% of a Gaussian beyond 2.42 sigma hold 12% of its energy: the error is sqrt(0.88) = 0.94, the quantisation
    # of the kept values adds ~0.1% of the energy
    assert 0.935 < error < 0.945


def test_chunks_with_fewer_non_zeros_than_k_decode_their_zeros_exactly():
    x = torch.zeros(2 * C)
    x[[5, 100, 2000, 4000]] = torch.tensor([1.0, -2.0, 4.0, 0.5])  # 4 non-zeros in chunk 0, chunk 1 all zero
    data = encode(x)
    y = decode(data, x.numel())
    lo, hi, index, code = parse_reference(bytes(data.numpy()), 2 * C, C, K)[0]
    assert lo == 0.0 and hi == 7.5 / 4  # the non-zeros' mean magnitude
    assert index == sorted([5, 100, 2000, 4000] + [i for i in range(64) if i != 5][:60])  # zeros: the lowest indices
    assert y[[5, 100, 2000, 4000]].tolist() == [hi, -hi, hi, hi]
    assert torch.count_nonzero(y) == 4
    assert message_norm(data, 2 * C) == 2 * hi
    assert not decode(encode(torch.zeros(C + 5)), C + 5).any()


def test_documented_layout_of_a_small_chunk():
    # chunk of 16 keeping 4: l = 2, fields of 4 bits, upper 4 + 4 - 1 = 7 bits
    x = torch.zeros(16)
    x[[1, 6, 7, 14]] = torch.tensor([-1.0, 3.0, 2.0, -4.0])
    data = bytes(encode(x, 16, 0.25).numpy())
    # t = 1, m = 4, split 2.5: lo = mean(1, 2) = 1.5, hi = mean(3, 4) = 3.5
    fields = [(1 & 3) | (0b10 << 2), (6 & 3) | (0b01 << 2), (7 & 3) | (0b00 << 2), (14 & 3) | (0b11 << 2)]
    upper = sum(1 << ((i >> 2) + j) for j, i in enumerate([1, 6, 7, 14]))
    assert data == struct.pack("<ff", 1.5, 3.5) + bytes([fields[0] | fields[1] << 4, fields[2] | fields[3] << 4, upper])
    assert encoded_size(16, 16, 0.25) == 11


def test_wire_size():
    assert encoded_size(C) == 8 + 64 + 16 == 88  # lo, hi; 64 fields of 8 bits; 127 upper bits
    n = 1 << 20
    assert encoded_size(n) == 256 * 88 == 22528  # 0.172 bits a value
    assert 4 * n / encoded_size(n) == pytest.approx(186.2, abs=0.05)
    assert encoded_size(0) == 0
    k, low, fields_bytes, upper_bits = geometry(100, 64)  # the last chunk: 100 values keep 64, l = 0
    assert encoded_size(C + 100) == 88 + 8 + fields_bytes + math.ceil(upper_bits / 8) == 88 + 8 + 16 + 21


def test_chunk_aligned_parts_encode_to_slices_of_the_whole():
    n = 6 * C + 300
    x = gaussian(n, seed=3)
    whole = encode(x)
    for cuts in ([0, C, n], [0, 2 * C, 5 * C, n], [0, 6 * C, n]):
        assert torch.equal(torch.cat([encode(x[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]), whole)


def test_decode_refuses_a_wrong_length():
    data = bytes(encode(gaussian(C + 100)).numpy())
    for wrong in (data[:-1], data + b"\0", b""):
        with pytest.raises(CodecError, match=f"expected {len(data)} bytes for {C + 100} values in chunks of 4096"):
            unpack(wrong, C + 100)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), -1.0])
@pytest.mark.parametrize("which", [0, 1])  # lo, hi
def test_hostile_scales_are_refused(scale, which):
    data = bytearray(encode(gaussian(3 * C)).numpy())
    struct.pack_into("<f", data, 88 + 4 * which, scale)  # chunk 1's
    with pytest.raises(CodecError, match="chunk 1: scales must be finite and non-negative"):
        unpack(bytes(data), 3 * C)


def test_hostile_indices_are_refused_naming_the_chunk():
    x = gaussian(2 * C, seed=4)
    good = parse_reference(bytes(encode(x).numpy()), 2 * C, C, K)
    assert pack_reference(good, C, K, 2 * C) == bytes(encode(x).numpy())
    lo, hi, index, code = good[1]

    def message(bad_index: list[int]) -> bytes:
        return pack_reference([good[0], (lo, hi, bad_index, code)], C, K, 2 * C)

    same_bucket = next(j for j in range(1, K) if index[j] >> 6 == index[j - 1] >> 6)
    duplicate = index[:same_bucket] + [index[same_bucket - 1]] + index[same_bucket + 1 :]
    with pytest.raises(CodecError, match=f"chunk 1: indices must be strictly increasing, got {duplicate[same_bucket]} "
                                         f"then {duplicate[same_bucket]}"):
        unpack(message(duplicate), 2 * C)
    swapped = list(index)
    swapped[same_bucket - 1], swapped[same_bucket] = index[same_bucket], index[same_bucket - 1]
    with pytest.raises(CodecError, match="chunk 1: indices must be strictly increasing"):
        unpack(message(swapped), 2 * C)
    data = bytearray(message(index))
    data[-1] ^= 0x01  # one more (or one less) 1 among chunk 1's upper bits
    with pytest.raises(CodecError, match="chunk 1: its upper index bits mark (63|65) values, expected 64"):
        unpack(bytes(data), 2 * C)
    # out of range: only a chunk whose length is not a multiple of 2^l can express it. 9 values keeping 4: l = 1,
    # upper 4 + 5 - 1 = 8 bits, so the last high part can reach 4 and the index 9
    with pytest.raises(CodecError, match="chunk 0: index 9 is out of range for a chunk of 9 values"):
        unpack(pack_reference([(1.0, 2.0, [1, 3, 5, 9], [0, 0, 1, 1])], 9, 4, 9), 9, 9, 4 / 9)
    assert unpack(pack_reference([(1.0, 2.0, [1, 3, 5, 8], [0, 0, 1, 1])], 9, 4, 9), 9, 9, 4 / 9).index.tolist() == \
        [1, 3, 5, 8]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(bad):
    x = gaussian(3 * C + 10)
    x[[5, 1500, 3 * C + 9]] = bad
    with pytest.raises(CodecError, match="3 non-finite") as info:
        encode(x)
    assert "\n" not in str(info.value)


def vectors() -> list[torch.Tensor]:
    heavy = gaussian(3 * C + 77, seed=5) * torch.exp(8 * gaussian(3 * C + 77, seed=6))  # levels over ~30 orders
    return [gaussian(5 * C + 3, seed=7), heavy, torch.zeros(C), gaussian(10, seed=8) * 1e-42]


@pytest.mark.parametrize("case", range(4))
def test_message_norm_is_exact(case):
    x = vectors()[case]
    data = encode(x)
    levels = decode(data, x.numel())
    exact = sum(Fraction(v) ** 2 for v in levels.tolist())
    assert message_norm(data, x.numel()) == math.sqrt(float(exact))
    # the same float from float64 operations: squares of fp32 values are exact in float64, fsum rounds once
    assert message_norm(data, x.numel()) == math.sqrt(math.fsum(v * v for v in levels.double().tolist()))


@pytest.mark.parametrize("case", range(4))
def test_add_scaled_is_a_rounded_product_then_a_rounded_sum(case):
    x = vectors()[case]
    n = x.numel()
    data = encode(x)
    levels = decode(data, n).numpy()
    kept = unpack(data, n).index
    for weight in (0.37, 1 / 3, -2.5, 1e-3):
        out = gaussian(n, seed=9)
        expected = out.numpy().copy()
        add_scaled(out, data, n, weight)
        expected[kept] = expected[kept] + levels[kept] * np.float32(weight)  # numpy: fp32 multiply, then fp32 add
        assert np.array_equal(out.numpy(), expected)


def test_an_all_gather_reduction_gives_the_same_bits_with_one_or_two_threads():
    n = (1 << 20) + 3 * C + 5  # several selection groups, and a shorter last chunk
    deltas = [gaussian(n, seed=10 + i) * (i + 1) for i in range(3)]
    weights = [1.0, 2.0, 5.0]
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            messages = [encode(d) for d in deltas]
            norms = [message_norm(m, n) for m in messages]
            mean = torch.zeros(n)
            for m, w in zip(messages, weights):  # a fixed order: the members'
                add_scaled(mean, m, n, w / sum(weights))
            results.append((messages, norms, mean))
    finally:
        torch.set_num_threads(threads)
    (m1, n1, mean1), (m2, n2, mean2) = results
    assert all(torch.equal(a, b) for a, b in zip(m1, m2)) and n1 == n2 and torch.equal(mean1, mean2)
    expected = np.zeros(n, dtype=np.float32)
    for m, w in zip(m1, weights):
        kept = unpack(m, n).index
        expected[kept] = expected[kept] + decode(m, n).numpy()[kept] * np.float32(w / sum(weights))
    assert np.array_equal(mean1.numpy(), expected)


def test_a_message_unpacks_once_for_decode_norm_and_add():
    x = gaussian(2 * C + 9, seed=11)
    data = encode(x)
    message = unpack(data, x.numel())
    assert isinstance(message, Message)
    assert torch.equal(decode(message, x.numel()), decode(data, x.numel()))
    assert message_norm(message, x.numel()) == message_norm(data, x.numel())
    out = torch.zeros(x.numel())
    add_scaled(out, message, x.numel(), 1.0)
    assert torch.equal(out, decode(data, x.numel()))
    with pytest.raises(CodecError, match="message of 8201 values in chunks of 4096, expected 8200 in chunks of 4096"):
        decode(message, x.numel() - 1)


def test_out_arguments_are_written_and_returned():
    x = gaussian(3 * C + 50, seed=12)
    n = x.numel()
    out = torch.empty(encoded_size(n), dtype=torch.uint8)
    assert encode(x, out=out) is out and torch.equal(out, encode(x))
    values = torch.full((n,), 7.0)
    assert decode(out, n, out=values) is values and torch.equal(values, decode(out, n))
    assert torch.equal(decode(bytes(out.numpy()), n), decode(memoryview(out.numpy()), n))
    with pytest.raises(CodecError, match="out must be"):
        encode(x, out=torch.empty(encoded_size(n) - 1, dtype=torch.uint8))
    with pytest.raises(CodecError, match="out must be"):
        add_scaled(torch.zeros(n, dtype=torch.float64), out, n, 1.0)
    with pytest.raises(CodecError, match="weight must be finite"):
        add_scaled(torch.zeros(n), out, n, float("inf"))
