"""Where a call of the CPU block goes, and what flashtune's own path costs per linear.

Two parts, one process (the block of ``bench_cpu_block.py``, 2 threads):
1. ``torch.profiler`` over --calls calls of Inductor max-autotune + freezing (the best peer) and of
   flashtune (every bucket up to 2T tuned), at T tokens: per call, the whole call and torch's own
   rows before the graph runs (Dynamo's guard check, the compiled region's own code, AOTAutograd's
   prologue, the pre-graph bytecode), which any torch.compile backend pays.
2. One of the block's 1024 x 1024 linears at M = T, warm, median us per call over --rounds rounds:
   the CPU kernel called directly with its packed weight, through the tactic's bound function (plus
   the weight-copy check), and through the op's implementation as Inductor's wrapper calls it (plus
   the site and size lookup). Part 2 needs the blocked kernel to be the tuned pick for that linear.

Run: python benchmarks/profile_cpu_block.py [--dtype bf16] [--tokens 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from bench_cpu_block import DTYPES, Block
from torch.profiler import profile

import flashtune_compile as ft
from flashtune_compile.kernels.cpp import load_blocked_gemm
from flashtune_compile.ops.registry import IMPLS
from flashtune_compile.ops.site import SiteSpec
from flashtune_compile.tuner.autotuner import AutoTuner

FRAMEWORK = (
    "TorchDynamo Cache Lookup",
    "Torch-Compiled Region",
    "AOTDispatcher Runtime Wrapper Prologue",
    "Pregraph bytecode",
)
CALLS = 5000  # calls per timed run of one path


def per_call_rows(fn, x: torch.Tensor, calls: int) -> dict[str, float]:
    """us per call: the whole call, and each of torch's own rows before the graph runs (self time)."""
    for _ in range(3):
        fn(x)
    with profile() as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
        total = time.perf_counter() - start
    rows = {"whole call": total / calls * 1e6}
    for event in prof.key_averages():
        name = event.key.split(":")[0]
        if name in FRAMEWORK:
            rows[name] = rows.get(name, 0.0) + event.self_cpu_time_total / calls
    return rows


def linear_path_costs(block: torch.nn.Module, tokens: int, rounds: int) -> dict[str, float] | None:
    """Median us per call of one warm 1024 x 1024 linear by three paths (see the module docstring);
    None unless flashtune's tuned pick for it is the blocked kernel."""
    w = block.layers[0].o.weight
    x = torch.randn(tokens, w.shape[1], dtype=w.dtype)
    tuner = AutoTuner.get()
    for text, site in tuner.sites.items():
        spec = SiteSpec.decode(text)
        if spec.op == "linear" and spec.sig[1][0] == list(w.shape) and site.memo:
            break
    else:
        return None
    runner, tactic = site.choose((x, w, None))
    if runner.name != "cpu_blocked":
        return None
    mr, r, ksplit, pairs = runner.resolve(tactic, (x, w, None))
    kernel = load_blocked_gemm()
    packed = kernel.pack(w, r, bool(pairs))  # the layout the bound function's cached copy has
    bound = runner.bind((mr, r, ksplit, pairs))
    impl = IMPLS["linear"]
    paths = {
        "kernel, called directly": lambda: kernel.linear(x, packed, None, w.shape[0], mr, r, ksplit, bool(pairs)),
        "+ weight-copy check (bound fn)": lambda: bound(x, w, None),
        "+ site and size lookup (op impl)": lambda: impl(x, w, None, text),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, call in paths.items():
            for _ in range(100):
                call()
            start = time.perf_counter()
            for _ in range(CALLS):
                call()
            times[name].append((time.perf_counter() - start) / CALLS * 1e6)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--tokens", type=int, default=1, help="T, the block's token count")
    ap.add_argument("--calls", type=int, default=20, help="profiled calls per contender")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of the per-linear timing")
    args = ap.parse_args()
    if args.tokens < 1:
        ap.error(f"--tokens must be at least 1, got {args.tokens}")
    torch.set_num_threads(2)
    torch._dynamo.config.cache_size_limit = 64
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    block = Block(1024, 2816, 8, 2).to(dtype).eval()
    x = torch.randn(args.tokens, 1024, dtype=dtype)
    with torch.no_grad():
        with torch._inductor.config.patch(freezing=True):
            peer = torch.compile(copy.deepcopy(block), mode="max-autotune-no-cudagraphs", dynamic=True)
            peer(torch.randn(args.tokens + 1, 1024, dtype=dtype))
            peer(x)
        ours_block = copy.deepcopy(block)
        ours = torch.compile(ours_block, backend="flashtune", dynamic=True, options={"cache_dir": tempfile.mkdtemp()})
        ft.warmup(ours, lambda t: (torch.randn(t, 1024, dtype=dtype),), max_tokens=2 * args.tokens + 1)
        ours(x)
        rows = {"peer": per_call_rows(peer, x, args.calls), "flashtune": per_call_rows(ours, x, args.calls)}
        paths = linear_path_costs(ours_block, args.tokens, args.rounds)
    print(f"Llama-shaped block, {args.dtype}, T = {args.tokens}, {args.calls} profiled calls: us per call")
    names = list(dict.fromkeys(name for r in rows.values() for name in r))
    print(f"{'':42s}{'peer':>10s}{'flashtune':>11s}")
    for name in names:
        print(f"{name:42s}" + "".join(f"{r.get(name, 0.0):{w}.1f}" for r, w in zip(rows.values(), (10, 11))))
    framework = {k: sum(v for n, v in r.items() if n != "whole call") for k, r in rows.items()}
    print(f"{'torch before the graph (sum)':42s}{framework['peer']:10.1f}{framework['flashtune']:11.1f}")
    if paths is None:
        print("per-linear path: the 1024 x 1024 linear's tuned pick is not the blocked kernel here")
        return
    print(f"\none 1024 x 1024 linear at M = {args.tokens}, warm: median us per call over {args.rounds} rounds")
    for name, us in paths.items():
        print(f"  {name:36s}{us:8.2f}")


if __name__ == "__main__":
    main()
