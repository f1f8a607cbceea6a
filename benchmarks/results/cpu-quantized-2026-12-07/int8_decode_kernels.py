"""Reproduce: python benchmarks/results/cpu-quantized-2026-12-07/int8_decode_kernels.py

quant_gemm.cpp's one-row tile alone on the block's 8 int8 weights (2 layers, the tactics the tuner
picked at T = 1: 1 x 2, gate_up 1 x 4), ksplit 1 and 2 interleaved, so 206 MB cycle and the
weights come from memory: median ms for the 8 and the rate on their 103 MB.
"""

import statistics
import time

import torch

from flashtune_compile.kernels.cpp import load_blocked_gemm

SHAPES = [(6144, 2048), (2048, 2048), (11264, 2048), (2048, 5632)] * 2
WIDTH = {11264: 4}  # the tuner's width per N; 2 elsewhere


def main() -> None:
    torch.manual_seed(0)
    kernel = load_blocked_gemm()
    calls = {}
    for ksplit in (1, 2):
        fns = []
        for n, k in SHAPES:
            q = torch.randint(-127, 127, (n, k), dtype=torch.int8)
            r = WIDTH.get(n, 2)
            packed, sp, zs = kernel.pack_quant(q, torch.rand(n, 1) * 0.01, None, 8, r)
            x = torch.randn(1, k).bfloat16()
            fns.append(
                lambda x=x, p=packed, sp=sp, zs=zs, n=n, k=k, r=r, s=ksplit: kernel.quant_linear(
                    x, p, sp, zs, None, n, 8, k, 1, r, s
                )
            )
        calls[f"ksplit {ksplit}"] = fns
    times: dict[str, list[float]] = {c: [] for c in calls}
    for _ in range(30):
        for c, fns in calls.items():
            start = time.perf_counter()
            for fn in fns:
                fn()
            times[c].append((time.perf_counter() - start) * 1e3)
    for c, v in times.items():
        ms = statistics.median(v)
        print(f"{c}: {ms:.2f} ms for the 8 weights, {103e6 / ms / 1e6:.1f} GB/s")


if __name__ == "__main__":
    main()
