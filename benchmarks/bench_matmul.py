"""Tuned linear vs the default kernel over the LLM matmul grid, side by side in one run.

For each (M, N, K, dtype): a fresh in-memory tuner picks among every candidate of the linear op
(ATen variants, CPU layouts, Triton, CUDA skinny-M where they apply); then the default
(``F.linear``, i.e. cuBLAS/oneDNN) and the tuned choice are timed interleaved with the tuner's own
profiler and many rounds, and the ratio printed. On CUDA it also times the Triton GEMM's best
tactic against cuBLAS at bf16 4096^3.

Grid: M in {1, 8, 16, 64, 256, 1024, 4096} x (N, K) in {(4096, 4096), (14336, 4096), (4096, 14336)}.
On a 2-core CPU one bf16 call at M=4096, N=14336 takes tens of seconds, so ``--max-m`` (default
256 on CPU, 4096 on CUDA) caps the rows that run; the output says which ran.

Run: python benchmarks/bench_matmul.py [--dtypes fp32 bf16] [--max-m 256]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

import flashtune_compile as ft
from flashtune_compile.ops import OPS, runners_for
from flashtune_compile.tuner.profiler import ProfilerSettings, time_candidates

MS = (1, 8, 16, 64, 256, 1024, 4096)
NKS = ((4096, 4096), (14336, 4096), (4096, 14336))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--max-m", type=int, default=4096 if cuda else 256)
    ap.add_argument("--ms", type=int, nargs="+", default=None, help="override the M values")
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"linear: tuned vs default, {name}, torch {torch.__version__}")
    runners = runners_for("linear", ["aten", "cpu", "cuda", "triton"])
    config = ft.TuningConfig(dynamic=(ft.DynamicDim(0, 0, buckets="pow2"),))
    careful = ProfilerSettings(rounds=9, min_rounds=5, max_seconds=20.0)
    ms = [m for m in (args.ms or MS) if m <= args.max_m]
    print(
        f"{'dtype':<5} {'M':>5} {'N':>6} {'K':>6}  {'chosen':<34} {'default ms':>10} {'tuned ms':>9} {'speedup':>7}"
        f" {'tune s':>6}"
    )
    for dname in args.dtypes:
        logs = []
        for n, k in NKS:
            w = torch.nn.Parameter(torch.randn(n, k, device=device, dtype=DTYPES[dname]), requires_grad=False)
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=DTYPES[dname])
                tuner = ft.AutoTuner(cache_dir=None)
                start = time.perf_counter()
                runner, tactic = tuner.choose_one("linear", runners, config, (x, w, None))
                tune_s = time.perf_counter() - start
                default = lambda x=x, w=w: runners[0].forward((x, w, None), -1)  # noqa: E731
                tuned = lambda x=x, w=w, r=runner, t=tactic: r.forward((x, w, None), t)  # noqa: E731
                default(), tuned()
                t_def, t_tun = time_candidates([default, tuned], device, careful)
                speedup = t_def.median / t_tun.median
                logs.append(math.log(speedup))
                chosen = f"{runner.name}[{tactic}]"
                print(
                    f"{dname:<5} {m:>5} {n:>6} {k:>6}  {chosen:<34} {t_def.median * 1e3:>10.3f} "
                    f"{t_tun.median * 1e3:>9.3f} {speedup:>6.2f}x {tune_s:>6.1f}",
                    flush=True,
                )
        print(
            f"{dname}: geometric-mean speedup {math.exp(sum(logs) / len(logs)):.3f}x over {len(logs)} shapes, "
            f"min {math.exp(min(logs)):.3f}x"
        )
    if cuda:
        from flashtune_compile.kernels.triton_runner import TritonGemmRunner

        x, w = (torch.randn(4096, 4096, device=device, dtype=torch.bfloat16) for _ in range(2))
        tri = TritonGemmRunner(OPS["linear"].gemm)
        profile = ft.BucketProfile((4096,), ((4096, 4096), (4096, 4096), None))
        tactics = tri.get_valid_tactics((x, w, None), profile)
        fns = [lambda t=t: tri.forward((x, w, None), t) for t in tactics]
        for f in fns:
            f()
        best = min(zip(time_candidates(fns, device), tactics), key=lambda p: p[0].median)[1]
        t_cublas, t_triton = time_candidates(
            [lambda: runners[0].forward((x, w, None), -1), lambda: tri.forward((x, w, None), best)], device, careful
        )
        print(
            f"Triton GEMM vs cuBLAS, bf16 4096^3: {t_cublas.median / t_triton.median:.3f}x "
            f"(best of {len(tactics)} tactics: {best})"
        )


if __name__ == "__main__":
    main()
