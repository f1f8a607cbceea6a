"""Quantized weights on CPU: a Llama-shaped block quantized with torchao, under eager, Inductor,
Inductor max-autotune + freezing and flashtune, against the same block left in bf16.

Block: bench_cpu_block.py's decoder layers (RMSNorm, qkv, causal SDPA over the T tokens, o, RMSNorm,
fused gate_up, SiLU gate, down; no biases), by default 2 layers of hidden 2048 and intermediate 5632
(103 M linear weights: 206 MB in bf16, 103 MB in int8), in bf16, called as ``block(x [T, hidden])``
under ``torch.no_grad()``, compiled with ``dynamic=True``. Schemes (``--schemes``):
  int8   torchao ``Int8WeightOnlyConfig()``: int8 weights, one fp32 scale per row
  int4   torchao ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))``: int4
         values one per byte, bf16 scales and int8 zero points per group of 32 (torchao's packed
         int4 layouts need mslk or CUDA; this is the one it runs on a CPU)
Contenders, each compiled from its own copy (the scheme's name first):
  bf16 flashtune   the unquantized block through flashtune: our own bf16 kernels, the baseline a
                   quantized model must beat
  <s> eager        the quantized block as torchao runs it
  <s> inductor     torch.compile(dynamic=True)
  <s> inductor-max torch.compile(mode="max-autotune-no-cudagraphs", dynamic=True) with
                   torch._inductor.config.freezing = True while it compiles
  <s> flashtune    torch.compile(backend="flashtune", dynamic=True), buckets up to --warmup-max
                   tuned cold by ft.warmup
Every contender's output is checked against its scheme's eager output (and bf16 against bf16
eager). Timing: all contenders interleaved in a shuffled order over --rounds rounds, median ms per
call, after 10 untimed calls each (flashtune makes a weight copy on a weight's 8th call). The read
rate (a sum over 512 MB, 4 KB and 2 MB pages, the faster kept) is timed interleaved with T = 1; the
T = 1 rows report each contender's effective read rate on its own weight bytes.

Every contender lives in one process, so flashtune's weight-copy budget is set to hold the packs of
all three of its models (bf16, int8, int4), as each would have alone: FLASHTUNE_WEIGHT_CACHE_MB=4096
unless the environment says otherwise (alone, a model's default budget, 10% of its weights or 256
MiB, holds its own packs at these sizes).

Run: python benchmarks/bench_quantized.py [--schemes int8,int4] [--processes 3]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("FLASHTUNE_WEIGHT_CACHE_MB", "4096")  # see the docstring: before the tuner reads it

import torch  # noqa: E402
from bench_cpu_block import Block, first_calls  # noqa: E402
from timing import add_process_options, in_fresh_processes, print_ratio_spread, read_buffer, time_contenders  # noqa: E402

import flashtune_compile as ft  # noqa: E402
from flashtune_compile.kernels.cpp import load_blocked_gemm  # noqa: E402

PEERS = ("eager", "inductor", "inductor-max")
TOL = 5e-2  # bf16 activations: relative to the largest output magnitude


def quantize(block: torch.nn.Module, scheme: str) -> torch.nn.Module:
    """A quantized copy of ``block`` (torchao's ``quantize_``)."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    configs = {
        "int8": Int8WeightOnlyConfig(),
        "int4": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
    }
    out = copy.deepcopy(block)
    quantize_(out, configs[scheme])
    return out


def weight_bytes(block: torch.nn.Module, scheme: str) -> int:
    """Bytes a T = 1 call must read of the linears' weights: int8 values, int4 values at half a
    byte each (as flashtune packs them), scales and zero points."""
    total = 0
    for name, p in block.named_parameters():
        if "norm" in name:
            continue
        inner = [getattr(p, a) for a in ("qdata", "scale", "zero_point") if getattr(p, a, None) is not None]
        if not inner:
            total += p.numel() * p.element_size()
            continue
        for a, t in zip(("qdata", "scale", "zero_point"), inner):
            if a == "zero_point" and scheme == "int8":
                continue  # torchao's per-row int8 product never reads it
            total += t.numel() * t.element_size() // (2 if a == "qdata" and scheme == "int4" else 1)
    return total


def compile_contenders(block, schemes, inputs, hidden, warmup_max):
    """{name: callable} and {name: first-call seconds}, each contender from its own copy."""
    contenders, compile_s = {}, {}

    def flashtune(model, label):
        compiled = torch.compile(
            model, backend="flashtune", dynamic=True, options={"cache_dir": tempfile.mkdtemp(prefix="ft-quant-")}
        )
        start = time.perf_counter()
        report = ft.warmup(compiled, lambda n: (torch.randn(n, hidden).to(torch.bfloat16),), max_tokens=warmup_max)
        compile_s[label] = time.perf_counter() - start + first_calls(compiled, inputs)
        print(f"{label}: {report}", file=sys.stderr)
        contenders[label] = compiled

    print("compiling and tuning bf16 flashtune ...", file=sys.stderr, flush=True)
    flashtune(copy.deepcopy(block), "bf16 flashtune")
    refs = {"bf16": block}
    for scheme in schemes:
        quantized = quantize(block, scheme)
        refs[scheme] = quantized
        contenders[f"{scheme} eager"] = quantized
        print(f"compiling {scheme} inductor ...", file=sys.stderr, flush=True)
        contenders[f"{scheme} inductor"] = torch.compile(copy.deepcopy(quantized), dynamic=True)
        compile_s[f"{scheme} inductor"] = first_calls(contenders[f"{scheme} inductor"], inputs)
        print(f"compiling {scheme} inductor max-autotune + freezing (minutes) ...", file=sys.stderr, flush=True)
        with torch._inductor.config.patch(freezing=True):
            contenders[f"{scheme} inductor-max"] = torch.compile(
                copy.deepcopy(quantized), mode="max-autotune-no-cudagraphs", dynamic=True
            )
            compile_s[f"{scheme} inductor-max"] = first_calls(contenders[f"{scheme} inductor-max"], inputs)
        print(f"compiling and tuning {scheme} flashtune ...", file=sys.stderr, flush=True)
        flashtune(copy.deepcopy(quantized), f"{scheme} flashtune")
    return contenders, compile_s, refs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="int8,int4", help="comma-separated: int8, int4")
    ap.add_argument("--tokens", default="1,16,128")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--warmup-max", type=int, default=128, help="flashtune tunes every bucket up to this")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--ms", type=float, default=60.0, help="minimum milliseconds per sample")
    add_process_options(ap)
    args = ap.parse_args()
    schemes = [s for s in args.schemes.split(",") if s]
    if not schemes or set(schemes) - {"int8", "int4"}:
        ap.error(f"--schemes takes int8 and/or int4, got {args.schemes!r}")
    if args.processes > 1:
        across_processes(args, schemes)
        return
    tokens = [int(t) for t in args.tokens.split(",")]
    warnings.filterwarnings("ignore")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._inductor.config.force_disable_caches = True  # every contender compiles (and tunes) cold
    torch.manual_seed(0)
    block = Block(args.hidden, args.inter, args.heads, args.layers).to(torch.bfloat16).eval().requires_grad_(False)
    inputs = {t: torch.randn(t, args.hidden, generator=torch.Generator().manual_seed(t)) for t in tokens}
    inputs = {t: x.to(torch.bfloat16) for t, x in inputs.items()}
    print(
        f"Llama-shaped block ({args.layers} layers, hidden {args.hidden}, intermediate {args.inter}, "
        f"bf16 activations); {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    load_blocked_gemm()
    reads = {f"read {p}": read_buffer(huge_pages=p == "2M") for p in ("4K", "2M")}
    with torch.no_grad():
        contenders, compile_s, refs = compile_contenders(block, schemes, inputs, args.hidden, args.warmup_max)
        for t, x in inputs.items():
            for name, fn in contenders.items():
                ref = refs[name.split()[0]](x).float()
                err = ((fn(x).float() - ref).abs().max() / ref.abs().max()).item()
                if err > TOL:
                    sys.exit(f"FAIL: {name} differs from its eager model at T={t}: max error {err:.2e} of max |ref|")
        results, read_ms = {}, {}
        for t, x in inputs.items():
            print(f"timing T={t} ...", file=sys.stderr, flush=True)
            calls = {n: (lambda f=f, x=x: f(x)) for n, f in contenders.items()}
            first = not results
            if first:
                calls.update({n: buf.sum for n, buf in reads.items() if buf is not None})
            results[t] = time_contenders(calls, args.rounds, args.ms, random.Random(t), warm=10)
            if first:
                read_ms = {n: results[t].pop(n) for n in reads if n in results[t]}
    read_rates = {n: reads[n].numel() * 4 / ms / 1e6 for n, ms in read_ms.items()}
    bandwidth = max(read_rates.values())
    sizes = {"bf16": weight_bytes(block, "bf16"), **{s: weight_bytes(refs[s], s) for s in schemes}}
    print(
        f"weight-copy budget {os.environ['FLASHTUNE_WEIGHT_CACHE_MB']} MB; weights read per call: "
        + ", ".join(f"{s} {b / 1e6:.0f} MB" for s, b in sizes.items())
        + "; read rate (sum over 512 MB): "
        + ", ".join(f"{n} pages {v:.1f} GB/s" for n, v in read_rates.items())
    )
    print("compile (+ tune) seconds: " + ", ".join(f"{n} {s:.1f}" for n, s in compile_s.items()))
    report(results, schemes, sizes, bandwidth)
    print("\nflashtune quantized winners (bucket, N x K: kernel[tactic], speedup over default):")
    for e in sorted(ft.tactics(), key=lambda e: (e["bucket"], str(e["shape_key"]))):
        if e["op"] == "linear_wq":
            shape = str(e["shape_key"][1][:2])
            print(f"  {str(e['bucket']):<7} {shape:<14} {e['kernel']}[{e['tactic']}] {e['speedup']:.2f}x")
    stats = ft.stats()
    print(f"weight copies: {stats['weight_copies_made']} made, fallback calls {stats['weight_copy_fallback_calls']}")
    if args.json:
        figures = {"results": results, "compile_s": compile_s, "bandwidth": bandwidth}
        figures.update(read_rates=read_rates, sizes=sizes)
        Path(args.json).write_text(json.dumps(figures))


def ratios(results: dict, schemes: list[str]) -> dict[str, float]:
    """Per T and scheme: flashtune against the best peer on the same quantized block, and against
    our own bf16 block."""
    out = {}
    for t, r in results.items():
        for s in schemes:
            out[f"T={t} {s} vs best peer"] = min(r[f"{s} {p}"] for p in PEERS) / r[f"{s} flashtune"]
            out[f"T={t} {s} vs bf16 flashtune"] = r["bf16 flashtune"] / r[f"{s} flashtune"]
    return out


def report(results: dict, schemes: list[str], sizes: dict, bandwidth: float) -> None:
    names = list(next(iter(results.values())))
    print(f"\n{'ms per call':>18} " + " ".join(f"{'T=' + str(t):>9}" for t in results))
    for n in names:
        print(f"{n:>18} " + " ".join(f"{r[n]:>9.2f}" for r in results.values()))
    print()
    for key, v in ratios(results, schemes).items():
        print(f"{key:>34} {v:6.2f}x")
    if 1 in results:
        print("\neffective read rate at T=1 (the contender's weight bytes / time):")
        for n, ms in results[1].items():
            gbs = sizes[n.split()[0]] / ms / 1e6
            print(f"  {n:<18} {gbs:6.1f} GB/s  ({gbs / bandwidth:.0%} of the read rate)")


def across_processes(args, schemes: list[str]) -> None:
    runs = in_fresh_processes(args.processes, __file__, sys.argv[1:])
    print(
        f"Llama-shaped block, torchao {','.join(schemes)}: {args.processes} fresh processes, {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    spread: dict[str, list[float]] = {}
    for run in runs:
        results = {int(t): r for t, r in run["results"].items()}
        for key, v in ratios(results, schemes).items():
            spread.setdefault(key, []).append(v)
        if 1 in results:
            for s in schemes:
                gbs = run["sizes"][s] / results[1][f"{s} flashtune"] / 1e6
                spread.setdefault(f"T=1 {s} read share", []).append(gbs / run["bandwidth"])
    print_ratio_spread("flashtune ratios (read share: flashtune's rate on its bytes / the read rate)", spread)
    for i, run in enumerate(runs):
        reads = ", ".join(f"{n} {v:.1f}" for n, v in run["read_rates"].items())
        ms = ", ".join(f"{n} {r:.2f}" for n, r in run["results"]["1"].items()) if "1" in run["results"] else ""
        print(f"p{i + 1}: {reads} GB/s; T=1 ms: {ms}")


if __name__ == "__main__":
    main()
