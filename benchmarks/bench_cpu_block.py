"""A Llama-shaped block on CPU: eager vs Inductor vs Inductor max-autotune + freezing vs flashtune.

Block: two decoder layers (RMSNorm, qkv linear, causal SDPA over the T tokens, o linear, RMSNorm,
fused gate_up linear, SiLU gate, down linear; no biases), hidden 1024, intermediate 2816, 8 heads,
called as ``block(x [T, hidden])`` under ``torch.no_grad()``, compiled with ``dynamic=True``. Its
weights (103 MB in fp32, 52 MB in bf16) are larger than the last-level cache, so at T = 1 every
call reads them from memory: the effective weight-read bandwidth (weight bytes / time) is set
against the machine's read rate, measured interleaved with the first T's contenders (a sum over a
512 MB buffer, on 4 KB pages and on 2 MB huge pages; the faster is the ceiling). flashtune's weight
packs are on huge pages; the peers' weights are on torch's 4 KB pages unless the run has
THP_MEM_ALLOC_ENABLE=1 in its environment (torch's allocator then advises huge pages too).
Contenders, each compiled from its own copy of the block:
  eager          the module as is
  inductor       torch.compile(dynamic=True)
  inductor-max   torch.compile(mode="max-autotune-no-cudagraphs", dynamic=True) with
                 torch._inductor.config.freezing = True while it compiles (weights prepacked, its
                 C++ GEMM template timed against oneDNN; it tunes each graph once, at the first size)
  flashtune      torch.compile(backend="flashtune", dynamic=True), every bucket up to --warmup-max
                 tuned cold by ft.warmup (a fresh cache directory)
Compile (+ tune) seconds are the first calls at each T (for flashtune: its warmup), with Inductor's
caches off so that every contender starts cold. Timing: the contenders interleaved in a shuffled
order over --rounds rounds; median ms per call. At T = 1 flashtune's time is also split, after the
timing, into its kernel calls (timed around each) and the rest of the block, which no read rate
covers.

Run: python benchmarks/bench_cpu_block.py --dtype fp32   (and again with --dtype bf16)
     [--processes N]: the whole run N times, each in a fresh process, then each process's ratio per
     T with their median and range (the T = 1 rows stream the weights at the memory's rate, which on
     a VM moves by tens of percent with where a process's buffers land)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timing import (
    add_process_options,
    in_fresh_processes,
    print_ratio_spread,
    read_buffer,
    time_contenders,
    torch_huge_pages,
)

import flashtune_compile as ft
from flashtune_compile.kernels.cpp import load_blocked_gemm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


class Layer(nn.Module):
    def __init__(self, hidden: int, inter: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(t, 3, self.heads, h // self.heads).transpose(0, 2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [heads, T, head_dim]
        x = x + self.o(a.transpose(0, 1).reshape(t, h))
        g, u = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, hidden: int, inter: int, heads: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(hidden, inter, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def first_calls(fn, inputs: dict[int, torch.Tensor]) -> float:
    """Seconds of the first call at each T (compiling, and tuning where the contender does)."""
    start = time.perf_counter()
    for x in inputs.values():
        fn(x)
    return time.perf_counter() - start


SPLIT_CALLS = 200


def split_at_linears(fn, x: torch.Tensor, linears: int, calls: int = SPLIT_CALLS) -> tuple[float, float] | None:
    """(ms per call inside flashtune's CPU kernel, ms outside it) for ``fn(x)``, the kernel timed
    around each of its calls; None unless every one of the ``linears`` ran on that kernel. Outside:
    Dynamo's guards, Inductor's kernels between the linears, the routing, and the cache misses they
    take after each weight stream (time the weight stream's rate does not cover)."""
    kernel = load_blocked_gemm()
    real, inside, count = kernel.linear, 0.0, 0

    def timed(*args):
        nonlocal inside, count
        start = time.perf_counter()
        y = real(*args)
        inside += time.perf_counter() - start
        count += 1
        return y

    kernel.linear = timed
    try:
        fn(x)
        if count != linears:
            return None
        inside = 0.0
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
        total = time.perf_counter() - start
    finally:
        kernel.linear = real
    return inside / calls * 1e3, (total - inside) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--tokens", default="1,16,128")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--warmup-max", type=int, default=256, help="flashtune tunes every bucket up to this")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--ms", type=float, default=60.0, help="minimum milliseconds per sample")
    add_process_options(ap)
    args = ap.parse_args()
    if args.processes < 1:
        ap.error("--processes must be >= 1")
    if args.processes > 1:
        across_processes(args)
        return
    dtype, tokens = DTYPES[args.dtype], [int(t) for t in args.tokens.split(",")]
    warnings.filterwarnings("ignore", message=".*TF32.*")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._inductor.config.force_disable_caches = True  # every contender compiles (and tunes) cold
    torch.manual_seed(0)
    block = Block(args.hidden, args.inter, args.heads, args.layers).to(dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in block.named_parameters() if "norm" not in n)
    inputs = {t: torch.randn(t, args.hidden, generator=torch.Generator().manual_seed(t)).to(dtype) for t in tokens}
    print(
        f"Llama-shaped block ({args.layers} layers, hidden {args.hidden}, intermediate {args.inter}, {args.dtype}, "
        f"weights {weight_bytes / 1e6:.0f} MB); {platform.machine()} CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    print(
        "torch's large tensors on huge pages (THP_MEM_ALLOC_ENABLE=1, for the peers' weights): "
        + ("on" if torch_huge_pages() else "off")
    )
    reads = {f"read {p}": read_buffer(huge_pages=p == "2M") for p in ("4K", "2M")}  # timed with the first T
    start = time.perf_counter()
    load_blocked_gemm()  # once per machine; afterwards a load from torch's extension cache
    print(f"flashtune CPU kernel built or loaded in {time.perf_counter() - start:.1f} s (a build is once per machine)")
    compile_s, contenders = {}, {"eager": block}
    with torch.no_grad():
        print("compiling inductor ...", file=sys.stderr, flush=True)
        contenders["inductor"] = torch.compile(copy.deepcopy(block), dynamic=True)
        compile_s["inductor"] = first_calls(contenders["inductor"], inputs)
        print("compiling inductor max-autotune + freezing (minutes) ...", file=sys.stderr, flush=True)
        with torch._inductor.config.patch(freezing=True):
            contenders["inductor-max"] = torch.compile(
                copy.deepcopy(block), mode="max-autotune-no-cudagraphs", dynamic=True
            )
            compile_s["inductor-max"] = first_calls(contenders["inductor-max"], inputs)
        print("compiling and tuning flashtune ...", file=sys.stderr, flush=True)
        fblock = copy.deepcopy(block)
        contenders["flashtune"] = torch.compile(
            fblock, backend="flashtune", dynamic=True, options={"cache_dir": tempfile.mkdtemp(prefix="ft-block-")}
        )
        start = time.perf_counter()
        report = ft.warmup(
            contenders["flashtune"],
            lambda n: (torch.randn(n, args.hidden).to(dtype),),
            max_tokens=args.warmup_max,
        )
        compile_s["flashtune"] = time.perf_counter() - start + first_calls(contenders["flashtune"], inputs)
        print(report, file=sys.stderr)
        for t, x in inputs.items():
            ref = block(x).float()
            for name, fn in contenders.items():
                got = fn(x).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                if err > TOL[dtype]:
                    sys.exit(f"FAIL: {name} differs from eager at T={t}: max error {err:.2e} of max |ref|")
        results, read_ms = {}, {}
        for t, x in inputs.items():
            print(f"timing T={t} ...", file=sys.stderr, flush=True)
            calls = {n: (lambda f=f, x=x: f(x)) for n, f in contenders.items()}
            first = not results
            if first:  # the read rates, interleaved with the first T's contenders
                calls.update({n: buf.sum for n, buf in reads.items() if buf is not None})
            results[t] = time_contenders(calls, args.rounds, args.ms, random.Random(t))
            if first:
                read_ms = {n: results[t].pop(n) for n in reads if n in results[t]}
        split = split_at_linears(contenders["flashtune"], inputs[1], 4 * args.layers) if 1 in inputs else None
    read_rates = {n: reads[n].numel() * 4 / ms / 1e6 for n, ms in read_ms.items()}
    bandwidth = max(read_rates.values())  # the ceiling a weight stream works against
    print(
        "read rate (sum over 512 MB, interleaved with the first T): "
        + ", ".join(f"{n} pages {v:.1f} GB/s" for n, v in read_rates.items())
        + f" -> weight-read floor at T=1: {weight_bytes / bandwidth / 1e6:.2f} ms"
    )
    print("\ncompile (+ tune) seconds: " + ", ".join(f"{n} {s:.1f}" for n, s in compile_s.items()))
    print(
        f"flashtune warmup: {len(report.steps)} token counts up to {args.warmup_max}, {report.tuned} buckets "
        f"tuned, {report.timings} timings, {report.seconds:.1f} s"
    )
    peers = ("eager", "inductor", "inductor-max")
    print(f"\n{'T':>4} " + " ".join(f"{n + ' ms':>16}" for n in contenders) + f" {'flashtune vs best':>18}")
    logs = []
    for t, r in results.items():
        gain = min(r[p] for p in peers) / r["flashtune"]
        logs.append(math.log(gain))
        print(f"{t:>4} " + " ".join(f"{r[n]:>16.2f}" for n in contenders) + f" {gain:>17.2f}x")
    print(f"{'geomean flashtune vs best peer':>60} {math.exp(sum(logs) / len(logs)):.2f}x")
    if 1 in results:
        print("\neffective weight-read bandwidth at T=1 (weight bytes / time):")
        for n, ms in results[1].items():
            gbs = weight_bytes / ms / 1e6
            print(f"  {n:<13} {gbs:6.1f} GB/s  ({gbs / bandwidth:.0%} of the faster read)")
        if split is not None:
            inside, outside = split
            print(
                f"  flashtune at T=1, timed around each kernel call ({SPLIT_CALLS} calls after the timing): "
                f"{inside:.2f} ms in its {4 * args.layers} linears ({weight_bytes / inside / 1e6:.1f} GB/s), "
                f"{outside:.2f} ms ({outside / (inside + outside):.0%}) outside them"
            )
    if args.json:
        figures = {
            "results": results,
            "compile_s": compile_s,
            "bandwidth": bandwidth,
            "read_rates": read_rates,
            "weight_bytes": weight_bytes,
            "split_t1": split,
        }
        Path(args.json).write_text(json.dumps(figures))
    print("\nflashtune linear winners (bucket, N x K: kernel[tactic], speedup over default):")
    for e in sorted(ft.tactics(), key=lambda e: (e["bucket"], str(e["shape_key"]))):
        if e["op"] == "linear":
            print(
                f"  {str(e['bucket']):<7} {str(e['shape_key'][1][:2]) if len(e['shape_key']) > 1 else '':<14} "
                f"{e['kernel']}[{e['tactic']}] {e['speedup']:.2f}x"
            )


def across_processes(args) -> None:
    """The run in ``args.processes`` fresh processes; each process's ratio, their median and range."""
    runs = in_fresh_processes(args.processes, __file__, sys.argv[1:])
    print(
        f"Llama-shaped block, {args.dtype}: {args.processes} fresh processes, {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    peers = ("eager", "inductor", "inductor-max")
    ratios: dict[str, list[float]] = {}
    for run in runs:
        logs = []
        for t, r in run["results"].items():
            gain = min(r[p] for p in peers) / r["flashtune"]
            ratios.setdefault(f"T={t}", []).append(gain)
            logs.append(math.log(gain))
        ratios.setdefault("geomean", []).append(math.exp(sum(logs) / len(logs)))
    print_ratio_spread("flashtune vs the best peer", ratios)
    for run_i, run in enumerate(runs):
        reads = ", ".join(f"{n} {v:.1f}" for n, v in run["read_rates"].items())
        line = f"p{run_i + 1}: {reads} GB/s; compile (+ tune) s " + ", ".join(
            f"{n} {s:.1f}" for n, s in run["compile_s"].items()
        )
        if "1" in run["results"]:
            rates = {n: run["weight_bytes"] / ms / 1e6 / run["bandwidth"] for n, ms in run["results"]["1"].items()}
            line += "; T=1 read " + ", ".join(f"{n} {v:.0%}" for n, v in rates.items())
        if run.get("split_t1"):
            inside, outside = run["split_t1"]
            line += f"; flashtune T=1 outside its linears {outside:.2f} ms ({outside / (inside + outside):.0%})"
        print(line)


if __name__ == "__main__":
    main()
