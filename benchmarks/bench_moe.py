"""One Mixtral MoE layer's expert computation: eager vs Inductor vs flashtune, side by side in one run.

Module: transformers' ``MixtralExperts`` with ``experts_implementation="grouped_mm"`` (sort tokens
by expert, two grouped GEMMs, SiLU gate, weighted scatter back), E=8 experts, top-k=2,
H=I=1024, called as ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k] fp32)``.
Routing is skewed like a trained router's and deterministic: softmax(randn + Zipf-like per-expert
bias), top-k, renormalized (Mixtral's router, whose weights stay fp32).
Contenders, all on the same module object and the same inputs, under ``torch.no_grad()``:
  eager      the module as is
  inductor   torch.compile(backend="inductor", dynamic=True, fullgraph=True)
  flashtune  torch.compile(backend="flashtune", dynamic=True, fullgraph=True), whose graph pass
             rewrites the whole layer into ``flashtune.moe``; warmed once per T so each bucket is
             tuned before timing (total tuning time and the chosen tactics are printed).
The top-k dim of the routing tensors is marked static (``torch._dynamo.mark_static``), as it is
inside a whole model where k is a constant of ``topk``; ``--dynamic-topk`` leaves it symbolic (the
flashtune MoE pattern then does not match and only the two grouped GEMMs get routed).
Both compiled outputs are checked against eager first. Each call takes the next of ``--input-sets``
input sets (default 8: other tokens, so other experts picked); repeating one set would keep the
picked experts' weights in the last-level cache, which decoding never sees. Timing: per (dtype, T) the three are
interleaved over ``--rounds`` rounds in shuffled order, after PROMOTE_AFTER + 2 untimed calls each
(flashtune makes a weight copy on the weight's 8th call that wants it; a server is past that in its
first seconds); a sample is the mean of n calls, n chosen
so a sample takes >= ``--ms`` ms; the median over rounds is reported.

``--spelling`` times instead a whole MoE block as people write it (router included;
``tests/moe_spellings.py``), called as ``block(x [T, H])``: ``hand_grouped_mm`` (written by hand
around ``torch._grouped_mm``: argsort, histc, gather, two grouped GEMMs on transposed parameters,
index-put back), ``torchtitan`` (grouped experts with separate gate/up weights, scatter_add back)
or ``gpt_fast`` (expert weights gathered by id, einsums); ``custom_combine`` (invented: its combine is
a custom op of its own) and ``torchtitan_release`` (torchtitan 0.3.0's own MoE layer, built with
``make_moe_config``; I defaults to 2816 there, as in the issue that asked for it), whose dispatch and
combine stay as written and whose experts alone become ``flashtune.moe``. flashtune routes only MoE ops there
(``ops={"moe"}``) so the router's top-k matches eager's. The ``_grouped_mm`` spellings are bf16
only: ``torch._grouped_mm`` has no fp32 meta function, so fp32 cannot be compiled.

Run: python benchmarks/bench_moe.py [--spelling transformers|hand_grouped_mm|torchtitan|gpt_fast|custom_combine|
     torchtitan_release] [--dtypes bf16,fp32]
     [--tokens 1,4,16,64,256] [--rounds 15] [--ms 20] [--processes N]

``--processes N`` runs the whole comparison N times, each in a fresh process, and prints each
process's flashtune-vs-best ratio per (dtype, T) with their median and range: at T <= 4 the layer
streams its picked experts' weights at the memory's rate, which on a VM moves by tens of percent
with where a process's buffers land, for both sides but not by the same amount.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import platform
import random
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from timing import add_process_options, in_fresh_processes, print_ratio_spread, time_contenders
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import flashtune_compile as ft
from flashtune_compile.tuner.weights import PROMOTE_AFTER

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from moe_spellings import SPELLINGS  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-4}  # rtol, and atol relative to max |ref|
NAMES = ("eager", "inductor", "flashtune")


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def make_experts(args, dtype: torch.dtype) -> MixtralExperts:
    config = MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_local_experts=args.experts,
        num_experts_per_tok=args.topk,
    )
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    experts = MixtralExperts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.02)
    return experts.to(dtype).eval()


def make_block(args, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return SPELLINGS[args.spelling](args.experts, args.topk, args.hidden, args.inter, dtype).eval()


def block_inputs(args, t: int, dtype: torch.dtype, s: int = 0) -> tuple:
    g = torch.Generator().manual_seed((1000 + t) * 100 + s)
    return (torch.randn(t, args.hidden, generator=g).to(dtype),)


def routing_inputs(args, t: int, dtype: torch.dtype, s: int = 0) -> tuple:
    """hidden [T, H] in dtype; top-k ids [T, k] int64 and weights [T, k] fp32, skewed like a trained
    router (which experts are popular is fixed; input set ``s`` draws other tokens)."""
    g = torch.Generator().manual_seed(1000 + t)
    popularity = torch.arange(1, args.experts + 1, dtype=torch.float32) ** -1.2  # Zipf-like
    bias = popularity.log()[torch.randperm(args.experts, generator=g)]  # fixed shuffle of who is popular
    g = torch.Generator().manual_seed((1000 + t) * 100 + s)
    logits = torch.randn(t, args.experts, generator=g) + bias
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), args.topk, dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    if not args.dynamic_topk:
        for x in (ids, weights):
            torch._dynamo.mark_static(x, 1)
    return torch.randn(t, args.hidden, generator=g).to(dtype), ids, weights


def cycling(fn, input_sets: list) -> Callable[[], object]:
    """A call of ``fn`` on the next input set each time."""
    turn = itertools.count()
    return lambda: fn(*input_sets[next(turn) % len(input_sets)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="bf16,fp32", help=f"comma-separated, of {list(DTYPES)}")
    ap.add_argument("--tokens", type=ints, default=[1, 4, 16, 64, 256])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=None, help="default 1024; 2816 for torchtitan_release")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--ms", type=float, default=20.0, help="minimum milliseconds per sample")
    ap.add_argument("--cache-dir", default=None, help="flashtune tactic cache (default: a fresh temp dir)")
    ap.add_argument("--dynamic-topk", action="store_true", help="leave the top-k dim symbolic")
    ap.add_argument(
        "--input-sets",
        type=int,
        default=8,
        help="each call takes the next of N input sets (other tokens, so other experts picked): one set "
        "repeated keeps the picked experts' weights in the last-level cache, which decoding never sees",
    )
    ap.add_argument("--spelling", choices=("transformers", *SPELLINGS), default="transformers")
    add_process_options(ap)
    args = ap.parse_args()
    if args.inter is None:
        args.inter = 2816 if args.spelling == "torchtitan_release" else 1024
    if args.processes < 1:
        ap.error("--processes must be >= 1")
    if args.processes > 1:
        across_processes(args)
        return
    dtypes = {d: DTYPES[d] for d in args.dtypes.split(",")}
    if args.spelling not in ("transformers", "gpt_fast") and torch.float32 in dtypes.values():
        print("note: fp32 skipped: torch._grouped_mm has no fp32 meta function, so that block cannot compile")
        dtypes = {d: t for d, t in dtypes.items() if t != torch.float32}
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="flashtune-bench-moe-")
    what = "experts (MixtralExperts, grouped_mm)" if args.spelling == "transformers" else f"block ({args.spelling})"
    print(
        f"MoE {what}: E={args.experts} top-k={args.topk} H={args.hidden} "
        f"I={args.inter}; {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {args.rounds} interleaved rounds, >= {args.ms:g} ms/sample, "
        f"top-k dim {'symbolic' if args.dynamic_topk else 'static'}"
    )
    rng, results = random.Random(0), {}
    ft.reset_stats()
    with torch.no_grad():
        for dname, dtype in dtypes.items():
            hand = args.spelling != "transformers"
            experts = make_block(args, dtype) if hand else make_experts(args, dtype)
            options = {"cache_dir": cache_dir, **({"ops": {"moe"}} if hand else {})}
            compiled = {
                "inductor": torch.compile(experts, backend="inductor", dynamic=True, fullgraph=True),
                "flashtune": torch.compile(experts, backend="flashtune", dynamic=True, fullgraph=True, options=options),
            }
            inputs = {}
            for t in args.tokens:  # compile, warm (flashtune tunes the bucket of t here) and check
                print(f"[{dname}] T={t}: compile, tune, check", file=sys.stderr, flush=True)
                make = block_inputs if hand else routing_inputs
                inputs[t] = [make(args, t, dtype, i) for i in range(max(1, args.input_sets))]
                for x in inputs[t][:2]:
                    ref = experts(*x)
                    tol = TOL[dtype]
                    for name, fn in compiled.items():
                        try:
                            torch.testing.assert_close(fn(*x), ref, rtol=tol, atol=tol * ref.abs().max().item())
                        except AssertionError as e:
                            print(f"FAIL: {name} differs from eager at {dname}, T={t}:\n{e}")
                            sys.exit(1)
            calls = {"eager": experts, **compiled}
            for t in args.tokens:
                print(f"[{dname}] T={t}: timing", file=sys.stderr, flush=True)
                xs = inputs[t]
                results[dtype, t] = time_contenders(
                    {n: cycling(f, xs) for n, f in calls.items()},
                    args.rounds,
                    args.ms,
                    rng,
                    warm=PROMOTE_AFTER + 2,  # flashtune's weight copies in place: steady state
                )
    st = ft.stats()
    print(
        f"flashtune tuning time, all buckets: {st['tuning_seconds']:.1f} s; weight copies made "
        f"{st['weight_copies_made']}, refused {st['weight_copies_denied']}; "
        f"calls left to a fallback tactic {st['weight_copy_fallback_calls']}"
    )
    worse = []
    for dname, dtype in dtypes.items():
        print(f"\n{dname}")
        print(
            f"{'T':>5} {'eager ms':>9} {'inductor ms':>11} {'flashtune ms':>12} {'vs eager':>9} {'vs inductor':>11}"
            f" {'vs best':>8}"
        )
        logs = []
        for t in args.tokens:
            r = results[dtype, t]
            gain = min(r["eager"], r["inductor"]) / r["flashtune"]
            logs.append(math.log(gain))
            if gain < 1:
                worse.append(f"{dname} T={t} ({gain:.2f}x)")
            print(
                f"{t:>5} {r['eager']:>9.3f} {r['inductor']:>11.3f} {r['flashtune']:>12.3f} "
                f"{r['eager'] / r['flashtune']:>8.2f}x {r['inductor'] / r['flashtune']:>10.2f}x {gain:>7.2f}x"
            )
        print(f"{'geomean gain over best of eager/inductor':>51} {math.exp(sum(logs) / len(logs)):>7.2f}x")
    moe = [e for e in ft.tactics() if e["op"] == "moe" and e.get("cache_dir") == cache_dir]  # this run's only
    print("\nflashtune moe tactics (dtype, bucket: kernel[tactic], tuned time vs default):")
    if not moe:
        print(
            "  none: the MoE pattern was not routed to flashtune.moe "
            f"(ops tuned: {sorted({e['op'] for e in ft.tactics()})})"
        )
    dtype_of = lambda e: e["shape_key"][0][2] if isinstance(e["shape_key"][0], tuple) else "?"  # noqa: E731
    for e in sorted(moe, key=lambda e: (dtype_of(e), len(e["bucket"]), e["bucket"])):
        dt = dtype_of(e)
        print(
            f"  {dt:<9} {str(e['bucket']):<8} {e['kernel']}[{e['tactic']}]  {e['time_s'] * 1e3:.3f} ms "
            f"vs {e['default_s'] * 1e3:.3f} ms ({e['speedup']:.2f}x, {e['timed']} timed)"
        )
    print("flashtune slower than the best of eager/inductor at: " + (", ".join(worse) if worse else "nowhere"))
    if args.json:
        rows = [{"dtype": d, "T": t, **results[dtype, t]} for d, dtype in dtypes.items() for t in args.tokens]
        chosen = [f"{e['bucket']}: {e['kernel']}[{e['tactic']}]" for e in moe]
        st = ft.stats()
        Path(args.json).write_text(
            json.dumps({"rows": rows, "tuning_s": st["tuning_seconds"], "chosen": chosen, "stats": st})
        )


def across_processes(args) -> None:
    """The comparison in ``args.processes`` fresh processes; each process's ratio, their median and range."""
    runs = in_fresh_processes(args.processes, __file__, sys.argv[1:])
    print(
        f"MoE {args.spelling}: {args.processes} fresh processes, {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    ratios: dict[str, list[float]] = {}
    for run in runs:
        per_dtype: dict[str, list[float]] = {}
        for row in run["rows"]:
            gain = min(row["eager"], row["inductor"]) / row["flashtune"]
            ratios.setdefault(f"{row['dtype']} T={row['T']}", []).append(gain)
            per_dtype.setdefault(row["dtype"], []).append(math.log(gain))
        for d, logs in per_dtype.items():
            ratios.setdefault(f"{d} geomean", []).append(math.exp(sum(logs) / len(logs)))
    print_ratio_spread("flashtune vs the best of eager/inductor", ratios)
    for i, run in enumerate(runs):
        st = run["stats"]
        ms = ", ".join(
            f"{r['dtype']} T={r['T']} {r['eager']:.2f}/{r['inductor']:.2f}/{r['flashtune']:.2f}" for r in run["rows"]
        )
        print(
            f"p{i + 1}: ms eager/inductor/flashtune {ms}; chosen {'; '.join(run['chosen'])}; copies made "
            f"{st['weight_copies_made']}, refused {st['weight_copies_denied']}; "
            f"fallback calls {st['weight_copy_fallback_calls']}"
        )


if __name__ == "__main__":
    main()
