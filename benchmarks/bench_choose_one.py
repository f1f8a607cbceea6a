"""Warm-path cost of choose_one on a cache hit, side by side with a plain dict lookup.

Contenders, interleaved round by round in one process (medians over rounds, ns per call):
  dict_lookup      d[key] with a precomputed key: the floor of any cache
  signature        reading the call's metadata (shape, stride, dtype, device per tensor)
  choose_one_hit   ft.AutoTuner.get().choose_one(...) on a warm bucket
  synth_then_hit   the bug FlashInfer fixed: make the bucket's inputs, then look up

Run: python benchmarks/bench_choose_one.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import timeit

import torch

import flashtune_compile as ft
from flashtune_compile.kernels.aten import AtenLinearRunner
from flashtune_compile.tuner.keys import signature


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--number", type=int, default=20000)
    args = ap.parse_args()

    tuner = ft.AutoTuner(cache_dir=None)
    ft.AutoTuner.reset(tuner)
    runners, cfg = (AtenLinearRunner(),), ft.TuningConfig(dynamic=(ft.DynamicDim(0, 0),))
    x, w, b = torch.randn(3, 256), torch.randn(256, 256), torch.randn(256)
    inputs = (x, w, b)
    tuner.choose_one("linear", runners, cfg, inputs)  # tune once: bucket 4
    key = tuple(tuner.cache.entries)[0]
    table = {key: tuner.cache.entries[key]}

    def synth_then_hit():
        torch.randn(4, 256)  # what a synthesize-before-lookup tuner pays on every call
        return table[key]

    contenders = {
        "dict_lookup": lambda: table[key],
        "signature": lambda: signature(inputs),
        "choose_one_hit": lambda: tuner.choose_one("linear", runners, cfg, inputs),
        "synth_then_hit": synth_then_hit,
    }
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.rounds):
        names = list(contenders)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(timeit.timeit(contenders[name], number=args.number) / args.number * 1e9)
    assert tuner.stats.misses == 1 and tuner.stats.profiles == 3  # every timed call above was a hit

    base = statistics.median(samples["dict_lookup"])
    print(
        f"choose_one warm path, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.rounds} interleaved rounds x {args.number} calls"
    )
    print(f"{'contender':<16} {'median ns':>10} {'min ns':>8} {'x dict':>8}")
    for name, s in samples.items():
        med = statistics.median(s)
        print(f"{name:<16} {med:>10.0f} {min(s):>8.0f} {med / base:>8.1f}")


if __name__ == "__main__":
    main()
