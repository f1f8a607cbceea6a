"""The memory floor of small-M products on this CPU: a STREAM-like read of a buffer far larger than
the last-level cache, then ``F.linear`` and oneDNN-packed weights at M = 1..16 on weights rotated
through 96 MB (so each call reads its weight from memory, as a decode step does), as GB/s of weight
bytes read. A kernel for decode-size tokens cannot beat the read rate: it tells how much any
candidate (ours, Inductor's) can still gain.

Run: python benchmarks/bench_small_m.py [--dtype bf16] [--n 1024] [--k 1024] [--reps 200]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch
import torch.nn.functional as F
from timing import read_gbs

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def per_call_us(fn, weights: list, reps: int) -> float:
    for w in weights[:4]:
        fn(w)
    start = time.perf_counter()
    for i in range(reps):
        fn(weights[i % len(weights)])
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    size = args.n * args.k * torch.finfo(dtype).bits // 8
    count = max(4, 96 * 2**20 // size)  # weights rotated through ~96 MB: each read comes from memory
    weights = [torch.randn(args.n, args.k).to(dtype) for _ in range(count)]
    packable = True
    try:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    except RuntimeError:
        packable = False
    print(
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}; weight [{args.n}, {args.k}] {args.dtype}, {count} rotated"
    )
    print(f"read bandwidth (sum over 512 MB fp32): {read_gbs():.1f} GB/s")
    print(f"{'M':>3} {'F.linear us':>12} {'GB/s':>6} {'oneDNN packed us':>17} {'GB/s':>6}")
    for m in (1, 2, 4, 8, 16):
        x = torch.randn(m, args.k).to(dtype)
        lin = per_call_us(lambda w, x=x: F.linear(x, w), weights, args.reps)
        row = f"{m:>3} {lin:>12.1f} {size / lin / 1e3:>6.1f}"
        if packable:
            pk = per_call_us(
                lambda p, x=x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""), packed, args.reps
            )
            row += f" {pk:>17.1f} {size / pk / 1e3:>6.1f}"
        print(row)


if __name__ == "__main__":
    main()
