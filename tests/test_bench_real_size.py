"""benchmarks/bench_real_size.py runs end to end (on its tiny model), so it does not rot: every
contender decodes the same greedy tokens as eager, and the figures it reports are there."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_real_size_runs_on_the_tiny_model(tmp_path):
    out = tmp_path / "run.json"
    argv = ["--model", "tiny", "--contenders", "eager,flashtune,flashtune-frozen", "--flashtune-options"]
    argv += ['{"inner": "eager"}', "--rounds", "1", "--tokens", "2", "--warmup", "1", "--json", str(out)]
    env_cache = {"FLASHTUNE_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_real_size.py"), *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env_cache},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    rows = {row["name"]: row for row in figures["contenders"]}
    assert set(rows) == {"eager", "flashtune", "flashtune-frozen"}
    assert rows["flashtune"]["tokens"].startswith("all") and rows["flashtune-frozen"]["tokens"].startswith("all")
    assert all(row["ms_per_token"] > 0 and row["peak_rss_gb"] > 0 for row in rows.values())
    assert "froze 14 linear(s)" in done.stdout  # 2 layers of 7; the tied output projection is kept
