"""flashtune_compile quickstart: compile a small decoder with backend="flashtune" and tune it.

On a CPU in about a minute: compiles the decoder (examples/decoder.py) with dynamic shapes, warms
it up across token counts (each new bucket of each linear shape profiled once, with a progress
bar), prints the winner per bucket, then starts a fresh process on the same cache to show that a
warm start profiles nothing.

Run: python examples/quickstart.py        (cache: $FLASHTUNE_CACHE_DIR or the user cache dir)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoder import Decoder, DecoderConfig  # noqa: E402

import flashtune_compile as ft  # noqa: E402

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def run(progress: bool) -> float:
    """Compile, run every token count once; returns seconds to the first output."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig()).eval()
    compiled = torch.compile(model, backend="flashtune", dynamic=True)
    start = time.perf_counter()
    first = None
    with torch.no_grad():
        for n in tqdm(TOKENS, desc="warmup (compile + tune)", disable=not progress):
            tokens = torch.randint(0, model.embed.num_embeddings, (1, n))
            out = compiled(tokens)
            first = first or time.perf_counter() - start
            torch.testing.assert_close(out, model(tokens), rtol=1e-3, atol=1e-3)
    return first


def main() -> None:
    if "--warm-check" in sys.argv:  # the second process: same model and calls, report its work
        first = run(progress=False)
        print(json.dumps({**ft.stats(), "first_output_s": first}))
        return
    console = Console()
    console.print(f"[bold]flashtune quickstart[/]: decoder {DecoderConfig()}, fp32 on CPU; "
                  f"cache {ft.AutoTuner.get().cache.directory}")
    start = time.perf_counter()
    first = run(progress=True)
    cold, total = ft.stats(), time.perf_counter() - start
    table = Table(title="chosen per linear shape (K x N) and token bucket")
    for col in ("K x N", "bucket", "kernel [tactic]", "time us", "vs default"):
        table.add_column(col, justify="right", no_wrap=True)
    for rec in sorted(ft.tactics(), key=lambda r: (str(r["shape_key"][1]), r["bucket"])):
        n, k = rec["shape_key"][1][1]
        bucket = str(rec["bucket"][0]) if rec["bucket"] else f"{rec['shape_key'][0][1][0]} (static)"
        table.add_row(f"{k} x {n}", bucket, f"{rec['kernel']} [{rec['tactic']}]", f"{rec['time_s'] * 1e6:.1f}",
                      f"{rec['speedup']:.2f}x")
    console.print(table)
    console.print(f"cold process: {total:.1f}s total, first output after {first:.1f}s; {cold['routed_ops']} ops "
                  f"routed, {cold['misses']} buckets tuned ({cold['profiles']} timings, "
                  f"{cold['tuning_seconds']:.1f}s), {cold['hits']} cache hits")
    warm = json.loads(subprocess.run([sys.executable, __file__, "--warm-check"], check=True, capture_output=True,
                                     text=True).stdout.strip().splitlines()[-1])
    console.print(f"fresh process on the same cache: first output after {warm['first_output_s']:.1f}s; "
                  f"{warm['profiles']} timings, {warm['synthesized']} tensors synthesized, "
                  f"{warm['misses']} misses, {warm['hits']} hits")


if __name__ == "__main__":
    main()
