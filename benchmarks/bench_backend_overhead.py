"""Warm-path cost of routing: models of small linears compiled several ways, side by side.

Models: L x (Linear(256, 256) + ReLU), 1 token (x [1, 256], or [1, 1, 256] with ``--input-dims 3``,
as models call their linears), for L = 4 and L = 12. Contenders, interleaved in
rounds in one process, median us per forward:
  eager            the nn.Sequential as is
  functional       the same layers as a plain loop of F.linear + relu (no module calls)
  dynamo_eager     torch.compile(backend="eager"): Dynamo's own per-call costs (guards on every
                   parameter), with the graph run as captured
  inductor         torch.compile(backend="inductor")
  flashtune        torch.compile(backend="flashtune") (inner Inductor), tactic cache warm
  flashtune_eager  torch.compile(backend="flashtune", options={"inner": "eager"})
  custom_op_floor  the functional loop with each F.linear wrapped in a Python custom op that does
                   nothing else: what the dispatcher charges any Python op
Per-op cost is the slope (t[L=12] - t[L=4]) / 8, so fixed per-call costs (Dynamo's guards, the
AOTAutograd wrapper) drop out; the overhead of routing is flashtune's slope minus inductor's.

Run: python benchmarks/bench_backend_overhead.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import timeit

import torch
import torch.nn as nn
import torch.nn.functional as F

import flashtune_compile as ft

DIM, SIZES = 256, (4, 12)


def contenders(layers: int, wrapped) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(DIM, DIM), nn.ReLU())]).eval()
    params = [(m.weight, m.bias) for m in model if isinstance(m, nn.Linear)]

    def functional(h):
        for w, b in params:
            h = torch.relu(F.linear(h, w, b))
        return h

    def custom_op_floor(h):
        for w, b in params:
            h = torch.relu(wrapped(h, w, b))
        return h

    def compiled(**kw):
        # Each contender compiles its own copy: copies share weights' values, not Dynamo's cache
        # entries. Compiled from one module, every call would also check the other backends' guards.
        return torch.compile(copy.deepcopy(model), **kw)

    return model, {
        "eager": model,
        "functional": functional,
        "dynamo_eager": compiled(backend="eager"),
        "inductor": compiled(backend="inductor"),
        "flashtune": compiled(backend="flashtune"),
        "flashtune_eager": compiled(backend="flashtune", options={"inner": "eager"}),
        "custom_op_floor": custom_op_floor,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--number", type=int, default=1000)
    ap.add_argument("--only", default="", help="comma-separated contenders to time (default: all)")
    ap.add_argument("--input-dims", type=int, default=2, choices=(2, 3), help="3: x [1, 1, 256], as models do")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    ft.AutoTuner.reset(ft.AutoTuner(cache_dir=tempfile.mkdtemp()))
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    lib = torch.library.Library("ftbench", "DEF")
    lib.define("linear(Tensor x, Tensor w, Tensor? b) -> Tensor")
    lib.impl("linear", F.linear, "CompositeExplicitAutograd")
    wrapped = torch.ops.ftbench.linear.default
    x = torch.randn(1, DIM) if args.input_dims == 2 else torch.randn(1, 1, DIM)
    calls = {}
    with torch.no_grad():
        for layers in SIZES:
            model, fns = contenders(layers, wrapped)
            for name, fn in fns.items():  # compile, tune, and check each
                if only and name not in only:
                    continue
                torch.testing.assert_close(fn(x), model(x), rtol=1e-4, atol=1e-4)
                calls[(name, layers)] = lambda fn=fn: fn(x)
        ft.reset_stats()
        samples: dict[tuple, list[float]] = {k: [] for k in calls}
        for r in range(args.rounds):
            keys = list(calls)
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                samples[key].append(timeit.timeit(calls[key], number=args.number) / args.number * 1e6)
    s = ft.stats()
    assert s["misses"] == 0 and s["profiles"] == 0, s  # every timed call was a warm hit
    med = {k: statistics.median(v) for k, v in samples.items()}
    lo, hi = SIZES
    slope = {name: (med[(name, hi)] - med[(name, lo)]) / (hi - lo) for name, _ in calls if _ == lo}
    print(
        f"backend overhead: L x Linear({DIM}, {DIM}) + ReLU, x {list(x.shape)}, fp32, {platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds"
    )
    print(f"{'contender':<16} {'L=4 us':>8} {'L=12 us':>8} {'per op us':>10}")
    for name in slope:
        print(f"{name:<16} {med[(name, lo)]:>8.1f} {med[(name, hi)]:>8.1f} {slope[name]:>10.1f}")
    pairs = [
        ("flashtune", "inductor"),
        ("flashtune_eager", "functional"),
        ("flashtune_eager", "dynamo_eager"),
        ("custom_op_floor", "functional"),  # the dispatcher's floor
    ]
    said = [f"{a} - {b} = {slope[a] - slope[b]:+.1f} us" for a, b in pairs if a in slope and b in slope]
    print("per-op differences: " + "; ".join(said))


if __name__ == "__main__":
    main()
