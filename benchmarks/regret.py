"""Regret of the tuner's picks: how much slower is what it chose than the best candidate, re-timed?

For each bucket (linear, fp32 and bf16, N x K in {4096 x 4096, 14336 x 4096}, M in {1, 8, 32, 128}:
16 CPU buckets), a fresh tuner tunes the bucket on real inputs through the op's site, as a compiled
graph would. Then every candidate (runner, tactic) the tuner could choose from is re-timed
independently: real inputs, interleaved rounds in a shuffled order, each sample a block of calls of
at least ``--ms`` ms, median over rounds. Regret = re-timed median of the pick / best re-timed
median - 1. Prints one row per bucket and the median and worst regret.

Run: python benchmarks/regret.py [--rounds 9] [--ms 30] [--dtypes fp32,bf16] [--m 1,8,32,128]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import random
import statistics
import time

import torch
import torch.nn as nn

import flashtune_compile as ft
from flashtune_compile.kernels import FAMILIES
from flashtune_compile.ops.matmul import LINEAR
from flashtune_compile.ops.site import SiteOptions, runners_for, site_of, site_string
from flashtune_compile.tuner.runner import BucketProfile

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def retime(fns: list, rounds: int, block_s: float, seed: int) -> list[float]:
    """Median seconds per call of each fn over interleaved rounds (shuffled order per round)."""
    for fn in fns:
        fn()
    per_call = []
    for fn in fns:
        start = time.perf_counter()
        fn()
        per_call.append(max(time.perf_counter() - start, 1e-7))
    reps = [max(1, math.ceil(block_s / t)) for t in per_call]
    samples: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    shuffler = random.Random(seed)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for i in order:
            start = time.perf_counter()
            for _ in range(reps[i]):
                fns[i]()
            samples[i].append((time.perf_counter() - start) / reps[i])
    return [statistics.median(s) for s in samples]


def bucket(dtype: torch.dtype, m: int, n: int, k: int, args: argparse.Namespace) -> dict:
    """Tune one bucket with a fresh tuner, then re-time every candidate it had."""
    ft.AutoTuner.reset(ft.AutoTuner(cache_dir=None))
    g = torch.Generator().manual_seed(m * 7 + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = nn.Parameter(torch.randn(n, k, generator=g).to(dtype) / k**0.5, requires_grad=False)
    inputs = (x, w, None)
    shapes, dtypes = [x.shape, w.shape, None], [dtype, dtype, None]
    site = site_of(site_string(LINEAR, ((((0, 0),), 1, 8192),), shapes, dtypes, SiteOptions()))
    start = time.perf_counter()
    with ft.autotune():
        chosen = site.choose(inputs)
    tune_s = time.perf_counter() - start
    profile = BucketProfile((m,), (tuple(x.shape), tuple(w.shape), None))
    candidates = [
        (r, t) for r in runners_for("linear", FAMILIES) for t in dict.fromkeys(r.get_valid_tactics(inputs, profile))
    ]
    if (site.runners[0], -1) not in candidates:
        candidates.insert(0, (site.runners[0], -1))
    with torch.no_grad():
        times = retime([lambda r=r, t=t: r.forward(inputs, t) for r, t in candidates], args.rounds, args.ms / 1e3, m)
    best = min(range(len(times)), key=times.__getitem__)
    picked = next(i for i, (r, t) in enumerate(candidates) if r.name == chosen[0].name and t == chosen[1])
    return dict(
        dtype=str(dtype).removeprefix("torch."),
        m=m,
        n=n,
        k=k,
        picked=f"{chosen[0].name}[{chosen[1]}]",
        picked_ms=times[picked] * 1e3,
        best=f"{candidates[best][0].name}[{candidates[best][1]}]",
        best_ms=times[best] * 1e3,
        default_ms=times[0] * 1e3,
        regret=times[picked] / times[best] - 1,
        candidates=len(candidates),
        tune_s=tune_s,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--ms", type=float, default=30.0, help="minimum milliseconds per timed block")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--m", default="1,8,32,128")
    p.add_argument("--nk", default="4096x4096,14336x4096", help="weight shapes N x K")
    args = p.parse_args()
    machine = f"{platform.processor() or platform.machine()} x{os.cpu_count()}, {torch.get_num_threads()} threads"
    print(f"{datetime.date.today()} {machine}, torch {torch.__version__}")
    print("| dtype | M | N | K | picked | ms | best re-timed | ms | default ms | regret | candidates | tune s |")
    print("| --- | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for name in args.dtypes.split(","):
        for n, k in (tuple(int(v) for v in nk.split("x")) for nk in args.nk.split(",")):
            for m in (int(v) for v in args.m.split(",")):
                r = bucket(DTYPES[name], m, n, k, args)
                rows.append(r)
                print(
                    f"| {r['dtype']} | {m} | {n} | {k} | {r['picked']} | {r['picked_ms']:.3f} | {r['best']} | "
                    f"{r['best_ms']:.3f} | {r['default_ms']:.3f} | {r['regret'] * 100:.1f}% | {r['candidates']} | "
                    f"{r['tune_s']:.1f} |",
                    flush=True,
                )
    regrets = [r["regret"] for r in rows]
    print(
        f"{len(rows)} buckets: median regret {statistics.median(regrets) * 100:.1f}%, "
        f"worst {max(regrets) * 100:.1f}% (aim: median <= 3%, worst <= 10%)"
    )


if __name__ == "__main__":
    main()
