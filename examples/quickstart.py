"""flashtune_compile quickstart: tune a linear layer's kernels per token-count bucket, cache-first.

Runs on a CPU in well under a minute. It tunes ``y = x @ W.T + b`` for token counts 1..512 (each
bucket profiled once, with a progress bar), prints the winner per bucket, then starts a fresh
process on the same cache to show that a warm start profiles nothing.

Run: python examples/quickstart.py            (cache: $FLASHTUNE_CACHE_DIR or the user cache dir)
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

import flashtune_compile as ft
from flashtune_compile.kernels.aten import AtenLinearRunner

HIDDEN, TOKENS = 1024, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
RUNNERS = (AtenLinearRunner(),)
CONFIG = ft.TuningConfig(dynamic=(ft.DynamicDim(input_idx=0, dim_idx=0, buckets="hybrid", max_size=512),))


def run(tokens: list[int], progress: bool) -> None:
    torch.manual_seed(0)
    w, b = torch.randn(HIDDEN, HIDDEN), torch.randn(HIDDEN)
    tuner = ft.AutoTuner.get()
    for n in tqdm(tokens, desc="tuning buckets", disable=not progress):
        x = torch.randn(n, HIDDEN)
        runner, tactic = tuner.choose_one("linear", RUNNERS, CONFIG, (x, w, b))
        torch.testing.assert_close(runner((x, w, b), tactic), torch.nn.functional.linear(x, w, b))


def main() -> None:
    if "--warm-check" in sys.argv:  # the second process: same calls, report what it had to do
        run(TOKENS, progress=False)
        print(json.dumps(ft.stats()))
        return
    console = Console()
    console.print(f"[bold]flashtune quickstart[/]: linear {HIDDEN}x{HIDDEN}, fp32, cache "
                  f"{ft.AutoTuner.get().cache.directory}")
    run(TOKENS, progress=True)
    cold = ft.stats()
    table = Table(title="chosen per bucket")
    for col in ("bucket", "kernel", "tactic", "time (us)", "default (us)", "speedup"):
        table.add_column(col, justify="right")
    for rec in sorted(ft.tactics(), key=lambda r: r["bucket"]):
        if rec["op"] == "linear" and rec["shape_key"][1][1] == (HIDDEN, HIDDEN):
            table.add_row(str(rec["bucket"][0]), rec["kernel"], str(rec["tactic"]), f"{rec['time_s'] * 1e6:.1f}",
                          f"{rec['default_s'] * 1e6:.1f}", f"{rec['speedup']:.2f}x")
    console.print(table)
    console.print(f"this process: {cold['misses']} buckets tuned, {cold['profiles']} candidate timings, "
                  f"{cold['tuning_seconds']:.1f}s tuning, {cold['hits']} cache hits")
    warm = json.loads(subprocess.run([sys.executable, __file__, "--warm-check"], check=True,
                                     capture_output=True, text=True).stdout.strip().splitlines()[-1])
    console.print(f"fresh process on the same cache: {warm['profiles']} timings, {warm['synthesized']} tensors "
                  f"synthesized, {warm['hits']} hits, {warm['misses']} misses")


if __name__ == "__main__":
    main()
