"""Does timing noise flip the tuner's choices on a shared CPU? Tune the same buckets many times.

For each linear bucket, a fresh in-memory tuner picks among the ATen variants ``--repeats`` times.
Every pick is then judged against a careful re-measurement of all candidates (interleaved, many
more rounds). The tuner promises never to be slower than the default beyond noise, so a pick is
*harmful* if it is more than ``--margin`` slower than the default; we also report how far picks
fall behind the best candidate (ties within the margin cost nothing).
``--load`` adds a busy process on one core, as a neighbour on a shared machine would.

Run: python benchmarks/profiler_stability.py [--repeats 10] [--load]
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp

import torch

import flashtune_compile as ft
from flashtune_compile.kernels.aten import AtenLinearRunner
from flashtune_compile.tuner.profiler import ProfilerSettings, time_cpu


def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(10000))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--margin", type=float, default=0.05)
    ap.add_argument("--load", action="store_true", help="keep one core busy meanwhile")
    ap.add_argument("--rounds", type=int, default=ProfilerSettings.rounds)
    args = ap.parse_args()
    stop = mp.Event()
    hog = mp.Process(target=_spin, args=(stop,), daemon=True) if args.load else None
    if hog:
        hog.start()
    runner = AtenLinearRunner()
    runners, cfg = (runner,), ft.TuningConfig(dynamic=(ft.DynamicDim(0, 0),))
    tactics = [-1, *AtenLinearRunner.VARIANTS]
    harmful = behind_best = total = 0
    print(f"{'M':>5} {'N':>5} {'K':>5}  picks (tactic: count)              best     worst-pick/best")
    for m, n, k in [(1, 1024, 1024), (16, 1024, 1024), (256, 1024, 1024), (4, 4096, 512), (64, 512, 4096)]:
        x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        picks = collections.Counter()
        for _ in range(args.repeats):
            tuner = ft.AutoTuner(cache_dir=None, settings=ProfilerSettings(rounds=args.rounds))
            _, tactic = tuner.choose_one("linear", runners, cfg, (x, w, b))
            picks[tactic] += 1
        careful = ProfilerSettings(rounds=41, prune_after=10**9, block_seconds=5e-3)
        fns = [lambda t=t, x=x, w=w, b=b: runner.forward((x, w, b), t) for t in tactics]
        for f in fns:
            f()
        truth = {t: timing.median for t, timing in zip(tactics, time_cpu(fns, careful))}
        best = min(truth.values())
        worst = max(truth[t] for t in picks) / best
        harmful += sum(c for t, c in picks.items() if truth[t] > truth[-1] * (1 + args.margin))
        behind_best += sum(c for t, c in picks.items() if truth[t] > best * (1 + args.margin))
        total += args.repeats
        desc = ", ".join(f"{t}: {c}" for t, c in picks.most_common())
        print(f"{m:>5} {n:>5} {k:>5}  {desc:<34} {min(truth, key=truth.get)!s:<8} {worst:.3f}")
    load = " (one core loaded)" if args.load else ""
    print(f"harmful picks (> {args.margin:.0%} slower than the default): {harmful} of {total}{load}")
    print(f"picks > {args.margin:.0%} behind the best candidate: {behind_best} of {total}{load}")
    if hog:
        stop.set()
        hog.join(timeout=5)


if __name__ == "__main__":
    main()
