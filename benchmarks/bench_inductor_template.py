"""Inductor's C++ GEMM template per bucket, as a would-be flashtune candidate: what it costs, what it gives.

Issue 15 asked whether Inductor's own CPU GEMM template (what ``max-autotune`` times against oneDNN)
should become a flashtune candidate, had per bucket. Inductor builds it for one static M per
compile, so as a candidate each bucket would pay one Inductor compile. This measures that compile
and the kernel it gives, per (dtype, linear shape of the Llama block in bench_cpu_block.py, M),
side by side in one process, against flashtune's own tuned choice for the same bucket:
  template      torch.compile(nn.Linear, mode="max-autotune-no-cudagraphs", dynamic=False) with
                freezing and ``max_autotune_gemm_backends="CPP"``: the template alone
  inductor-max  the same with ``"CPP,ATEN"``: what max-autotune picks between the template and oneDNN
  flashtune     backend="flashtune", the bucket tuned cold (a fresh cache directory)
Weights are cycled over enough copies of the layer that they are read from memory, as in a model.

Run: python benchmarks/bench_inductor_template.py [--dtypes fp32,bf16] [--shapes 5632x1024,1024x2816] [--m 16,128]
     2>/dev/null   (Inductor prints its autotuning tables on stderr)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import platform
import random
import tempfile
import time
import warnings

import torch
import torch.nn as nn
from timing import time_contenders

import flashtune_compile as ft

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
L3_BYTES = 32 * 2**20  # this VM's last-level cache: 2-4 copies are cycled, 1.5x of it where 4 reach that


def compiled_copies(layers: list[nn.Linear], x: torch.Tensor, compile_one, tol: float) -> tuple[list, float]:
    """Each layer compiled from its own copy, checked against the layer itself; the first one's compile seconds."""
    out, first_s = [], 0.0
    for i, layer in enumerate(layers):
        start = time.perf_counter()
        fn = compile_one(copy.deepcopy(layer))
        if i == 0:
            first_s = time.perf_counter() - start
        ref = layer(x).float()
        err = ((fn(x).float() - ref).abs().max() / ref.abs().max()).item()
        if err > tol:
            raise SystemExit(f"FAIL: copy {i} differs from eager: {err:.2e} of max |ref|")
        out.append(fn)
    return out, first_s


def inductor_max(backends: str, x: torch.Tensor):
    """Compiles a module with max-autotune + freezing, the GEMM backends given, tuned at x's M."""

    def compile_one(mod: nn.Module):
        with torch._inductor.config.patch(freezing=True, max_autotune_gemm_backends=backends):
            fn = torch.compile(mod, mode="max-autotune-no-cudagraphs", dynamic=False)
            fn(x)  # freezing and tuning happen at the first call, under this patch
        return fn

    return compile_one


def flashtune_tuned(x: torch.Tensor):
    """Compiles a module with backend="flashtune", its bucket tuned cold at x's M."""

    def compile_one(mod: nn.Module):
        options = {"cache_dir": tempfile.mkdtemp(prefix="ft-template-"), "inner": "eager"}
        fn = torch.compile(mod, backend="flashtune", dynamic=False, options=options)
        with ft.autotune():
            fn(x)
        return fn

    return compile_one


def is_bucket(entry: dict, m: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether a ``ft.tactics()`` entry is the linear x [m, k] @ w [n, k]^T in dtype."""
    key = entry["shape_key"]
    dname = str(dtype).removeprefix("torch.")
    return entry["op"] == "linear" and key[0][1:3] == ((m, k), dname) and key[1][1:3] == ((n, k), dname)


def cycling(fns: list, x: torch.Tensor):
    """A call of the next compiled copy on x, each time."""
    turn = itertools.count()
    return lambda: fns[next(turn) % len(fns)](x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--shapes", default="5632x1024,1024x2816", help="N x K of the linears")
    ap.add_argument("--m", default="16,128", help="token counts (static M per compile)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--ms", type=float, default=30.0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch._dynamo.config.cache_size_limit = 1024
    torch._inductor.config.force_disable_caches = True
    print(
        f"Inductor's C++ GEMM template per bucket vs flashtune; {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    print(
        f"{'dtype':>5} {'N x K':>10} {'M':>4} | compile s: template / flashtune | ms: template, inductor-max, "
        "flashtune | template vs flashtune | flashtune's pick | weights cycled"
    )
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            torch.manual_seed(0)
            copies = min(4, max(2, -(-3 * L3_BYTES // (2 * n * k * dtype.itemsize))))
            layers = [nn.Linear(k, n, bias=False).to(dtype).eval() for _ in range(copies)]
            tol = 1e-3 if dtype == torch.float32 else 5e-2
            for m in (int(v) for v in args.m.split(",")):
                x = torch.randn(m, k).to(dtype)
                with torch.no_grad():
                    template, template_s = compiled_copies(layers, x, inductor_max("CPP", x), tol)
                    best, _ = compiled_copies(layers, x, inductor_max("CPP,ATEN", x), tol)
                    ft.reset_stats()
                    ours, ours_s = compiled_copies(layers, x, flashtune_tuned(x), tol)
                    calls = {"template": template, "inductor-max": best, "flashtune": ours}
                    calls = {n: cycling(f, x) for n, f in calls.items()}
                    r = time_contenders(calls, args.rounds, args.ms, random.Random(m))
                pick = next(
                    (f"{e['kernel']}[{e['tactic']}]" for e in reversed(ft.tactics()) if e["op"] == "linear"), "?"
                )
                print(
                    f"{dname:>5} {shape:>10} {m:>4} | {template_s:>6.1f} / {ours_s:>4.1f} | {r['template']:>7.3f}, "
                    f"{r['inductor-max']:>7.3f}, {r['flashtune']:>7.3f} | "
                    f"{r['template'] / r['flashtune']:>5.2f}x slower | {pick} | "
                    f"{copies} copies, {copies * n * k * dtype.itemsize / 2**20:.0f} MiB",
                    flush=True,
                )


if __name__ == "__main__":
    main()
