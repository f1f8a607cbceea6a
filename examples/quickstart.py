"""flashtune_compile quickstart: tune a decoder at warmup, ship the result, start warm elsewhere.

Runs two fresh processes, each with empty flashtune and Inductor caches of its own:

1. cold: compiles the decoder (examples/decoder.py) with ``backend="flashtune"``, runs
   ``ft.warmup`` over token counts 1..256 (every new bucket of every linear shape is profiled, with
   a progress bar), checks the outputs against eager, prints the winners and writes everything to
   one artifact file with ``ft.save_artifacts``;
2. warm: ``ft.load_artifacts`` on that file, then the same compile and warmup: Inductor's caches
   hit and nothing is profiled.

Then it prints the two side by side. About a minute on a 2-core CPU.

Run: python examples/quickstart.py [--keep DIR]      (--keep: leave the artifact and caches in DIR)
In your own code the caches are simply the default ones; see the README.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoder import Decoder, DecoderConfig  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import flashtune_compile as ft  # noqa: E402

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def winners_table() -> Table:
    table = Table(title="chosen per linear shape (K x N) and token bucket")
    for col in ("K x N", "bucket", "kernel [tactic]", "time us", "vs default"):
        table.add_column(col, justify="right", no_wrap=True)
    for rec in sorted(ft.tactics(), key=lambda r: (str(r["shape_key"][1]), r["bucket"])):
        n, k = rec["shape_key"][1][1]
        bucket = str(rec["bucket"][0]) if rec["bucket"] else "1 (static)"
        table.add_row(
            f"{k} x {n}",
            bucket,
            f"{rec['kernel']} [{rec['tactic']}]",
            f"{rec['time_s'] * 1e6:.1f}",
            f"{rec['speedup']:.2f}x",
        )
    return table


def child(phase: str, artifact: Path, metrics: Path) -> None:
    """One process: (warm: load the artifact,) compile, warm up, check; write its metrics."""
    console = Console(stderr=True)
    load_s = 0.0
    if phase == "warm":
        t = time.perf_counter()
        loaded = ft.load_artifacts(artifact)
        load_s = time.perf_counter() - t
        console.print(
            f"loaded {loaded['tactics']} tactics and {loaded['inductor']} Inductor artifacts in {load_s:.2f}s"
        )
    torch.manual_seed(0)
    model = Decoder(DecoderConfig()).eval()
    compiled = torch.compile(model, backend="flashtune", dynamic=True)
    inputs = {n: (torch.randint(0, model.embed.num_embeddings, (1, n)),) for n in TOKENS}
    report = ft.warmup(compiled, inputs.__getitem__, num_tokens=TOKENS)
    with torch.no_grad():
        for n in (1, 7, 100, 256):
            tokens = torch.randint(0, model.embed.num_embeddings, (1, n))
            torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-3, atol=1e-3)
    first_output = report.steps[0].seconds
    started = time.perf_counter() - PROCESS_START - report.seconds - load_s  # imports, model building
    if phase == "cold":
        Console().print(winners_table())
        ft.save_artifacts(artifact)
    inductor = counters["inductor"]
    metrics.write_text(
        json.dumps(
            {
                **ft.stats(),
                "load_s": load_s,
                "first_output_s": load_s + first_output,
                "ready_s": load_s + report.seconds,
                "startup_s": started,
                "fx_hits": inductor["fxgraph_cache_hit"],
                "fx_misses": inductor["fxgraph_cache_miss"],
            }
        )
    )


def run_child(phase: str, work: Path, artifact: Path) -> dict:
    env = {
        **os.environ,
        "FLASHTUNE_CACHE_DIR": str(work / phase / "tactics"),
        "TORCHINDUCTOR_CACHE_DIR": str(work / phase / "inductor"),
    }
    env.pop("FLASHTUNE_TUNE", None)
    metrics = work / f"{phase}.json"
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", phase, str(artifact), str(metrics)], env=env, check=True)
    return {**json.loads(metrics.read_text()), "process_s": time.perf_counter() - start}


def compare(cold: dict, warm: dict) -> Table:
    table = Table(title="cold start vs warm start (fresh processes, empty caches, the artifact file only)")
    for col in ("", "cold", "warm", "warm / cold"):
        table.add_column(col, justify="right")

    def row(name: str, key: str, fmt: str = "{:.2f}s") -> None:
        c, w = cold[key], warm[key]
        table.add_row(name, fmt.format(c), fmt.format(w), f"{w / c:.0%}" if c else "")

    row("first output (compile + tune/load, 1 token)", "first_output_s")
    row("ready: all 9 token counts run", "ready_s")
    row("  of which tuning", "tuning_seconds")
    row("whole process (imports included)", "process_s")
    row("candidate timings", "profiles", "{:d}")
    row("Inductor FX graph cache hits", "fx_hits", "{:d}")
    row("Inductor FX graph cache misses", "fx_misses", "{:d}")
    return table


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="directory to keep the artifact and caches in")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="flashtune-quickstart-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        artifact = work / "decoder.ftart"
        console.print(
            f"[bold]flashtune quickstart[/]: decoder {DecoderConfig()}, fp32, "
            f"{'CUDA' if torch.cuda.is_available() else 'CPU'}"
        )
        console.rule("cold process: compile, tune every bucket, save the artifact")
        cold = run_child("cold", work, artifact)
        console.print(f"artifact: {artifact} ({artifact.stat().st_size / 1e3:.0f} kB)")
        console.rule("warm process: load the artifact, compile, run the same token counts")
        warm = run_child("warm", work, artifact)
        console.print(compare(cold, warm))


if __name__ == "__main__":
    main()
