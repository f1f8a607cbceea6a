"""The long run of the edge-input property test (tests/test_edge_inputs.py): thousands of random
matmul-family calls through ``backend="flashtune"``, each compared with eager and float64.

Each case is a form (F.linear with/without bias and N-D input, mm, addmm, bmm, baddbmm, matmul of
ranks 1-4 with broadcasting, x @ w.t()), sizes in {0, 1, 2, 3, 5, 8}, fp32/bf16/fp16/fp64,
contiguous/transposed/sliced/stride-0 operands, with and without requires_grad (tests/matmul_cases.py).
Hypothesis stops at the first mismatch and prints the smallest failing case.

Run: python benchmarks/fuzz_matmul.py [--cases 3000] [--seed 1] [--inner eager|inductor]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from matmul_cases import cases, check  # noqa: E402

import flashtune_compile as ft  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=3000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--inner", choices=("eager", "inductor"), default="eager")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch._dynamo.config.cache_size_limit = 100_000
    ft.AutoTuner.reset(ft.AutoTuner(cache_dir=None, settings=ft.ProfilerSettings(block_seconds=2e-4, rounds=3)))
    counts = {"cases": 0, "eager_raised": 0}
    start = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def run(case):
        torch._dynamo.reset()
        counts["cases"] += 1
        counts["eager_raised"] += check(case, inner=args.inner) == "raised"
        if counts["cases"] % 250 == 0:
            print(f"  {counts['cases']} cases, {time.perf_counter() - start:.0f}s", flush=True)

    try:
        run()
    except Exception as e:
        print(f"MISMATCH after {counts['cases']} cases (seed {args.seed}): {type(e).__name__}: {e}")
        return 1
    print(
        f"{counts['cases']} cases, seed {args.seed}, inner={args.inner}: 0 mismatches "
        f"({counts['eager_raised']} where eager raised and compiled raised too), {time.perf_counter() - start:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
