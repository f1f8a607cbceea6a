"""Run as a separate process: tune (or look up) mm buckets in $FLASHTUNE_CACHE_DIR, print stats.

Usage: python tune_worker.py OP SIZE [SIZE ...]
"""

import json
import sys

import torch
from helpers import MMChunked, MMDefault, mm_config

import flashtune_compile as ft
from flashtune_compile.tuner.profiler import ProfilerSettings

op, sizes = sys.argv[1], [int(s) for s in sys.argv[2:]]
ft.AutoTuner.reset(ft.AutoTuner(settings=ProfilerSettings(block_seconds=2e-4, rounds=3, prune_after=2)))
runners, cfg = (MMDefault(), MMChunked()), mm_config(buckets="pow2", max_size=1 << 20)
w = torch.randn(16, 16)
choices = []
for n in sizes:
    x = torch.randn(n, 16)
    runner, tactic = ft.AutoTuner.get().choose_one(op, runners, cfg, (x, w))
    torch.testing.assert_close(runner.forward((x, w), tactic), x @ w)
    choices.append([runner.name, tactic])
print(json.dumps({"stats": ft.stats(), "choices": choices}))
