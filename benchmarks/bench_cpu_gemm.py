"""The CPU blocked kernel (``kernels/cpp``) against oneDNN, kernel against kernel, on the eight
linears of bench_cpu_block.py's Llama-shaped block (two layers of qkv 3072 x 1024, o 1024 x 1024,
gate_up 5632 x 1024, down 1024 x 2816; 103 MB of fp32 weights, more than the last-level cache, so
every pass reads them from memory). At each M: every tactic of a small set against oneDNN-packed
weights (``cpu_linear[mkldnn_packed]``, what Inductor max-autotune + freezing picks at large M),
interleaved, as ms per pass over the eight, GFLOP/s and weight GB/s; then the best tactic's ratio
over oneDNN. The read rate (a sum over 512 MB, on 4 KB and on 2 MB pages) is measured in the same
run: at M = 1 no kernel can stream faster than it; at M >= 64 both kernels run near this CPU's
multiply rate. Kernel alone, back to back: the cache left to the code between linears, which the
blocked kernel's non-temporal stream keeps (bench_cpu_block.py), does not show here.

Run: python benchmarks/bench_cpu_gemm.py [--dtype bf16] [--m 1,16,64,128]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
from functools import partial

import torch
from bench_cpu_block import Block
from timing import read_gbs, time_contenders

from flashtune_compile.kernels.cpp import load_blocked_gemm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def blocked(kernel, xs: dict, weights: list, packed: list, tactic: tuple) -> list[torch.Tensor]:
    """The eight linears by the blocked kernel with ``tactic`` (mr, r, ksplit, pairs)."""
    mr, r, split, pairs = tactic
    return [
        kernel.linear(xs[w.shape[1]], pk, None, w.shape[0], mr, r, split, bool(pairs)) for w, pk in zip(weights, packed)
    ]


def onednn(xs: dict, weights: list, packed: list) -> list[torch.Tensor]:
    """The eight linears by oneDNN from its packed weights."""
    linear = torch.ops.mkldnn._linear_pointwise
    return [linear(xs[w.shape[1]], pk, None, "none", [], "") for w, pk in zip(weights, packed)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--m", default="1,16,64,128", help="comma-separated row counts")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--ms", type=float, default=40.0, help="minimum milliseconds per sample")
    args = ap.parse_args()
    dtype, ms = DTYPES[args.dtype], [int(v) for v in args.m.split(",")]
    kernel = load_blocked_gemm()
    pairs = (0, 1) if kernel.bf16_pairs and dtype == torch.bfloat16 else (0,)
    tactics = [(mr, r, s, p) for mr, r, s in [(1, 4, 1), (1, 4, 2), (4, 4, 1), (8, 2, 1)] for p in pairs]
    torch.manual_seed(0)
    block = Block(hidden=1024, inter=2816, heads=8, layers=2).to(dtype)  # bench_cpu_block.py's defaults
    weights = [m.weight.detach() for m in block.modules() if isinstance(m, torch.nn.Linear)]
    params = sum(w.numel() for w in weights)
    packed = {(r, p): [kernel.pack(w, r, bool(p)) for w in weights] for _, r, _, p in tactics}
    dnn_packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    nbytes = params * weights[0].element_size()
    print(
        f"CPU kernels on the block's {len(weights)} linears ({args.dtype}, {nbytes / 1e6:.0f} MB of weights); "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    print(
        f"read rate (sum over 512 MB): {read_gbs():.1f} GB/s on 4 KB pages (oneDNN's packed weights), "
        f"{read_gbs(huge_pages=True):.1f} GB/s on 2 MB pages (the blocked kernel's)"
    )
    for m in ms:
        xs = {k: torch.randn(m, k).to(dtype) for k in {w.shape[1] for w in weights}}

        for t in tactics:  # the same result as oneDNN, within the dtype's rounding
            for got, want in zip(blocked(kernel, xs, weights, packed[t[1], t[3]], t), onednn(xs, weights, dnn_packed)):
                err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                assert err < (1e-4 if dtype == torch.float32 else 2e-2), f"tactic {t} at M={m}: error {err:.1e}"
        calls = {f"blocked{t}": partial(blocked, kernel, xs, weights, packed[t[1], t[3]], t) for t in tactics}
        calls["onednn"] = partial(onednn, xs, weights, dnn_packed)
        result = time_contenders(calls, args.rounds, args.ms, random.Random(m))
        flops = 2 * m * params
        print(f"\nM={m}")
        for name, t in sorted(result.items(), key=lambda kv: kv[1]):
            print(f"  {name:<22} {t:8.3f} ms {flops / t / 1e6:7.0f} GFLOP/s {nbytes / t / 1e6:6.1f} GB/s")
        best = min((v, k) for k, v in result.items() if k != "onednn")
        print(f"  best blocked {best[1]} vs oneDNN: {result['onednn'] / best[0]:.2f}x")


if __name__ == "__main__":
    main()
