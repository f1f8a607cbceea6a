"""Warm-path cost of routing: a model of small linears compiled three ways, side by side.

Model: 4 x Linear(256, 256) with ReLU between, 1 token (the case where per-op overhead shows).
Contenders, interleaved in rounds, median us per forward:
  eager                 the model as is
  inductor              torch.compile(backend="inductor")
  flashtune             torch.compile(backend="flashtune") (inner Inductor), tactic cache warm
  flashtune_eager       torch.compile(backend="flashtune", options={"inner": "eager"})
  functional            the same layers as a plain loop of F.linear + relu (no module calls)
and, for the floor, the same model with each linear wrapped in a Python custom op that only calls
F.linear (no tuning): what the dispatcher charges any Python op in a graph.
Per-op overhead = (contender - inductor) / 4.

Run: python benchmarks/bench_backend_overhead.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import timeit

import torch
import torch.nn as nn

import flashtune_compile as ft

LAYERS, DIM = 4, 256


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--number", type=int, default=2000)
    args = ap.parse_args()
    ft.AutoTuner.reset(ft.AutoTuner(cache_dir=tempfile.mkdtemp()))
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(LAYERS) for m in (nn.Linear(DIM, DIM), nn.ReLU())]).eval()
    x = torch.randn(1, DIM)

    lib = torch.library.Library("ftbench", "DEF")
    lib.define("linear(Tensor x, Tensor w, Tensor? b) -> Tensor")
    lib.impl("linear", torch.nn.functional.linear, "CompositeExplicitAutograd")
    wrapped = torch.ops.ftbench.linear.default
    layers = [(m.weight, m.bias) for m in model if isinstance(m, nn.Linear)]

    def functional(h):
        for w, b in layers:
            h = torch.relu(torch.nn.functional.linear(h, w, b))
        return h

    def custom_op_floor(h):
        for w, b in layers:
            h = torch.relu(wrapped(h, w, b))
        return h

    contenders = {
        "eager": model,
        "inductor": torch.compile(model, backend="inductor"),
        "flashtune": torch.compile(model, backend="flashtune"),
        "flashtune_eager": torch.compile(model, backend="flashtune", options={"inner": "eager"}),
        "functional": functional,
        "custom_op_floor": custom_op_floor,
    }
    with torch.no_grad():
        for name, fn in contenders.items():  # compile, tune, and check
            torch.testing.assert_close(fn(x), model(x), rtol=1e-4, atol=1e-4)
        ft.reset_stats()
        calls = {name: (lambda fn=fn: fn(x)) for name, fn in contenders.items()}
        samples: dict[str, list[float]] = {k: [] for k in calls}
        for r in range(args.rounds):
            names = list(calls)
            for name in names[r % len(names):] + names[: r % len(names)]:
                samples[name].append(timeit.timeit(calls[name], number=args.number) / args.number * 1e6)
    s = ft.stats()
    assert s["misses"] == 0 and s["profiles"] == 0, s  # every timed call was a warm hit
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"backend overhead: {LAYERS} x Linear({DIM}, {DIM}), 1 token, fp32, {platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print(f"{'contender':<18} {'median us':>10} {'x inductor':>11}")
    for name, m in med.items():
        print(f"{name:<18} {m:>10.1f} {m / med['inductor']:>11.2f}")
    print(f"per-op overhead of flashtune over inductor: {(med['flashtune'] - med['inductor']) / LAYERS:.1f} us; "
          f"flashtune_eager over eager: {(med['flashtune_eager'] - med['eager']) / LAYERS:.1f} us")
    print(f"dispatcher floor (a Python custom op that only calls F.linear, vs calling F.linear): "
          f"{(med['custom_op_floor'] - med['functional']) / LAYERS:.1f} us per op")


if __name__ == "__main__":
    main()
