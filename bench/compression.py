"""Throughput of the codecs (int8: swarm/compression.py, int4: swarm/int4.py, top-k sparse: swarm/sparse.py) against
a plain memory copy.

    python -m bench.compression [--numel N] [--repeats R] [--json PATH] [--threads T] [--block-size B]
                                [--no-compile]

Every op runs on the same N(0,1) fp32 vector; its speed is GB/s of fp32 data (4 bytes a value: the
input of quantize/encode, the output of dequantize/decode), the median of R rounds after one warm-up
call each. The ops take turns within a round, so drift on this shared machine hits them alike.
The bound is `dst.copy_(src)` of the same fp32 size (read 4 B + write 4 B a value, preallocated),
timed again in each phase: quantize and dequantize should reach 75% of it, as should int4 encode and
decode and sparse decode; sparse encode (top-k included) 25%. `clone`, a copy into fresh memory, shows
what page faults cost the ops that return a fresh tensor. `sparse add_scaled` adds one message into a
vector (the all-gather reduction's step). int4 and sparse run at their default block / chunk size and
density, into preallocated buffers.
Phase 1 runs the eager kernels; then the int8 and int4 `compile_kernels()` (their first-call costs are
rows of their own); phase 2 runs the ops they speed up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import write_json
from swarm import int4, sparse
from swarm.compression import BLOCK_SIZE, compile_kernels, decode, dequantize, encode, encoded_size, quantize

TARGET = 0.75
TARGETS = {"sparse encode out=": 0.25}  # top-k selection included; every other target op: TARGET


def _phase(ops: dict, repeats: int) -> dict[str, float]:
    """ops: name -> callable, "copy" among them. Returns name -> median seconds."""
    seconds = {name: [] for name in ops}
    for call in ops.values():
        call()
    for _ in range(repeats):
        for name, call in ops.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def _rows(median: dict[str, float], kernel: str | None, n: int, targets: set[str]) -> list[dict]:
    return [
        dict(op=name, kernel=None if name in ("copy", "clone") else kernel, numel=n, gb_per_s=4 * n / s / 1e9,
             ratio_to_copy=median["copy"] / s, seconds_median=s,
             target=TARGETS.get(name, TARGET) if name in targets else None)
        for name, s in median.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compression", description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=64 * 2**20, help="fp32 values (default 64M = 256 MiB)")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds; the median is reported")
    parser.add_argument("--json", default="bench/results/compression.json", help="where to write the rows")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="values per scale")
    parser.add_argument("--no-compile", action="store_true", help="skip compile_kernels() and phase 2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, block = args.numel, args.block_size

    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    dst, deq_out = torch.empty_like(x), torch.empty_like(x)
    q, scales = quantize(x, block)
    data = encode(x, block)
    assert len(data) == encoded_size(n, block)
    int4_out, sparse_out = int4.encode(x), sparse.encode(x)
    quantizers = {
        "quantize": lambda: quantize(x, block),
        "quantize out=": lambda: quantize(x, block, out=(q, scales)),
        "encode": lambda: encode(x, block),
    }
    int4_encoders = {"int4 encode out=": lambda: int4.encode(x, out=int4_out)}
    targets = {"quantize", "quantize out=", "dequantize", "dequantize out=", "int4 encode out=", "int4 decode out=",
               "sparse encode out=", "sparse decode out="}
    eager = {
        "copy": lambda: dst.copy_(x),
        "clone": lambda: x.clone(),
        **quantizers,
        "dequantize": lambda: dequantize(q, scales, block_size=block),
        "dequantize out=": lambda: dequantize(q, scales, out=deq_out, block_size=block),
        "decode": lambda: decode(data, n, block),
        **int4_encoders,
        "int4 decode out=": lambda: int4.decode(int4_out, n, out=deq_out),
        "sparse encode out=": lambda: sparse.encode(x, out=sparse_out),
        "sparse decode out=": lambda: sparse.decode(sparse_out, n, out=deq_out),
        "sparse add_scaled": lambda: sparse.add_scaled(deq_out, sparse_out, n, 0.5),
    }
    rows = _rows(_phase(eager, args.repeats), "eager", n, targets)
    if not args.no_compile:
        compiled = {}
        for codec, compile_once, ops in (("int8", lambda: compile_kernels(block), quantizers),
                                         ("int4", int4.compile_kernels, int4_encoders)):
            compile_s = compile_once()
            rows.append(dict(op=f"{codec} compile_kernels", kernel="compiled", numel=n, gb_per_s=None,
                             ratio_to_copy=None, seconds_median=compile_s, target=None))
            if compile_s is not None:
                compiled.update(ops)
        if compiled:
            rows += _rows(_phase({"copy": eager["copy"], **compiled}, args.repeats), "compiled", n, targets)

    print(f"{n} fp32 values ({4 * n / 2**20:.0f} MiB), int8 block {block}, int4 block {int4.BLOCK_SIZE}, sparse chunk "
          f"{sparse.CHUNK_SIZE} keeping {sparse.kept_per_chunk()}, {args.threads} torch threads, median of "
          f"{args.repeats}, torch {torch.__version__}")
    print(f"wire bytes a value: int8 {encoded_size(n, block) / n:.4f}, int4 {int4.encoded_size(n) / n:.4f}, "
          f"sparse {sparse.encoded_size(n) / n:.4f} (fp32: 4)")
    print(f"{'op':<18} {'kernel':<9} {'GB/s':>7} {'x copy':>7} {'target':>7}  result")
    for row in rows:
        if row["gb_per_s"] is None:
            took = "failed: eager only" if row["seconds_median"] is None else f"{row['seconds_median']:.1f} s"
            print(f"{row['op']:<18} {row['kernel']:<9} first call {took}")
            continue
        target = row["target"]
        verdict = "-" if target is None else "pass" if row["ratio_to_copy"] >= target else "FAIL"
        print(f"{row['op']:<18} {row['kernel'] or '-':<9} {row['gb_per_s']:7.2f} {row['ratio_to_copy']:7.2f} "
              f"{'-' if target is None else f'{target:.2f}':>7}  {verdict}")
    write_json(rows, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
