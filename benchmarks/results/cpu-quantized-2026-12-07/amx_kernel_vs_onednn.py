"""Reproduce: python benchmarks/results/cpu-quantized-2026-12-07/amx_kernel_vs_onednn.py  (M=128 by default)

The block's 4 distinct linears (one layer of bench_quantized.py's block: qkv 6144 x 2048, o 2048 x
2048, gate_up 11264 x 2048, down 2048 x 5632) at M rows, int8 per-row weights: quant_gemm.cpp's
AMX tile (16 rows) at widths 4 and 2 against oneDNN's bf16 linear on the same weights dequantized
and prepacked (what Inductor's freezing runs). Contenders interleaved each round; prints each
one's median ms per layer and its median per-round ratio to oneDNN (below 1: faster).
"""

import os
import statistics
import time

import torch

from flashtune_compile.kernels.cpp import load_blocked_gemm

M = int(os.environ.get("M", "128"))
ROUNDS = int(os.environ.get("ROUNDS", "15"))
SHAPES = [(6144, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]


def main() -> None:
    torch.manual_seed(0)
    kernel = load_blocked_gemm()
    xs = {k: torch.randn(M, k).bfloat16() for k in (2048, 5632)}
    calls: dict[str, list] = {"amx4": [], "amx2": [], "onednn": []}
    for n, k in SHAPES:
        q = torch.randint(-127, 127, (n, k), dtype=torch.int8)
        s = torch.rand(n, 1) * 0.01
        for r in (2, 4):
            packed, sp, zs = kernel.pack_quant(q, s, None, 8, r)
            calls[f"amx{r}"].append(
                lambda x=xs[k], p=packed, sp=sp, zs=zs, n=n, k=k, r=r: kernel.quant_linear(
                    x, p, sp, zs, None, n, 8, k, 16, r, 1
                )
            )
        w = torch.ops.mkldnn._reorder_linear_weight((q.float() * s).bfloat16(), M)
        calls["onednn"].append(lambda x=xs[k], w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))

    def once(fns: list) -> float:
        start = time.perf_counter()
        for fn in fns:
            fn()
        return time.perf_counter() - start

    for fns in calls.values():
        once(fns)
    times: dict[str, list[float]] = {c: [] for c in calls}
    for _ in range(ROUNDS):
        for c, fns in calls.items():
            times[c].append(once(fns))
    for c, v in times.items():
        ratio = statistics.median(a / b for a, b in zip(v, times["onednn"]))
        ms = statistics.median(v) * 1e3
        print(f"M={M} threads={torch.get_num_threads()} {c}: {ms:.2f} ms, {ratio:.3f}x oneDNN's time")


if __name__ == "__main__":
    main()
