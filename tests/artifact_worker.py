"""Run as a separate process: compile a small model with backend="flashtune" (Inductor inside),
warm it up, and either save artifacts (``make PATH``) or load them first (``use PATH``).
Prints one JSON line: flashtune stats, Inductor/AOTAutograd cache counters, the warmup totals.

Caches come from $FLASHTUNE_CACHE_DIR and $TORCHINDUCTOR_CACHE_DIR, which the test points at
fresh directories per process, so a cache hit can only come from the artifact file.
"""

import json
import os
import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import flashtune_compile as ft
from flashtune_compile.tuner.profiler import ProfilerSettings

mode, path = sys.argv[1], sys.argv[2]
ft.AutoTuner.reset(ft.AutoTuner(settings=ProfilerSettings(block_seconds=2e-4, rounds=3, prune_after=2)))
loaded = ft.load_artifacts(path) if mode == "use" else None


def libraries():
    """Inductor's built C++ libraries in this process's cache dir: relative path -> mtime."""
    root = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return {str(f.relative_to(root)): f.stat().st_mtime_ns for f in root.glob("*/*.so")}


before = libraries()

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
compiled = torch.compile(model, backend="flashtune", dynamic=True, options={"kernels": ["aten", "cpu"]})
inputs = {n: torch.randn(n, 16) for n in (1, 2, 4, 8)}
report = ft.warmup(compiled, lambda n: (inputs[n],), num_tokens=list(inputs), progress=False)
with torch.no_grad():
    for x in inputs.values():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
saved = ft.save_artifacts(path) if mode == "make" else None
after = libraries()
built = sorted(rel for rel, mtime in after.items() if before.get(rel) != mtime)
print(
    json.dumps(
        {
            "stats": ft.stats(),
            "loaded": loaded,
            "saved": saved,
            "tuned": report.tuned,
            "built": built,
            "counters": {k: dict(counters[k]) for k in ("inductor", "aot_autograd")},
        }
    )
)
