"""Tune a tensor-parallel model across ranks: every rank serves the same tactics, and the work is shared.

Run on one machine with two CPU processes (gloo):

    torchrun --nproc-per-node 2 examples/distributed.py

Each rank holds half of every layer of a small MLP stack (column-parallel up projection,
row-parallel down projection, then an all-reduce), compiles it with ``backend="flashtune"`` and
runs ``ft.warmup`` over token counts 1..64. Because ``torch.distributed`` is initialized, flashtune
coordinates ("lockstep", the default): at each new bucket the ranks exchange what their caches hold
and, when none holds it, tune it together, each checking and timing its share of the candidates,
then all take the same winner. At the end rank 0 prints each rank's tuning time and timings, the
agreed winners, and checks the output against the unsharded model. Each rank starts from an empty
cache of its own (``--cache-dir`` keeps them).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from rich.console import Console
from rich.table import Table

import flashtune_compile as ft


class ParallelMLP(nn.Module):
    """This rank's shard of ``layers`` MLP blocks of width ``hidden`` and inner size ``inner``."""

    def __init__(self, hidden: int, inner: int, layers: int, rank: int, world: int) -> None:
        super().__init__()
        self.ups = nn.ModuleList(nn.Linear(hidden, inner // world) for _ in range(layers))
        self.downs = nn.ModuleList(nn.Linear(inner // world, hidden, bias=False) for _ in range(layers))
        full = full_weights(hidden, inner, layers)
        shard = slice(rank * inner // world, (rank + 1) * inner // world)
        with torch.no_grad():
            for up, down, (w_up, b_up, w_down) in zip(self.ups, self.downs, full):
                up.weight.copy_(w_up[shard])
                up.bias.copy_(b_up[shard])
                down.weight.copy_(w_down[:, shard])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for up, down in zip(self.ups, self.downs):
            y = down(torch.relu(up(x)))
            dist.all_reduce(y)  # the row-parallel sum
            x = x + y
        return x


def full_weights(hidden: int, inner: int, layers: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)  # the same on every rank
    return [
        (torch.randn(inner, hidden, generator=g) * 0.05, torch.randn(inner, generator=g) * 0.05,
         torch.randn(hidden, inner, generator=g) * 0.05)
        for _ in range(layers)
    ]  # fmt: skip


def reference(x: torch.Tensor, hidden: int, inner: int, layers: int) -> torch.Tensor:
    """The unsharded model, eager."""
    for w_up, b_up, w_down in full_weights(hidden, inner, layers):
        x = x + torch.relu(x @ w_up.T + b_up) @ w_down.T
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inner", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--cache-dir", default=None, help="root of the per-rank tactic caches (default: a temp dir)")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = args.cache_dir or tempfile.mkdtemp(prefix=f"flashtune-rank{rank}-")
    ft.AutoTuner.reset(ft.AutoTuner(cache_dir=os.path.join(root, f"rank{rank}")))

    model = ParallelMLP(args.hidden, args.inner, args.layers, rank, world).eval()
    options = {"inner": "eager", "kernels": {"aten", "cpu"}, "buckets": "pow2", "max_tokens": args.max_tokens}
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options=options)

    start = time.perf_counter()
    report = ft.warmup(compiled, lambda n: (torch.randn(n, args.hidden),), progress=rank == 0)
    seconds = time.perf_counter() - start

    x = torch.randn(5, args.hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(x), reference(x, args.hidden, args.inner, args.layers), rtol=1e-4, atol=1e-4
        )

    mine = {
        "seconds": seconds,
        "tuned": report.tuned,
        "timings": report.timings,
        "winners": sorted(
            (r["op"], str(r["shape_key"]), tuple(r["bucket"]), r["kernel"], str(r["tactic"])) for r in ft.tactics()
        ),
    }
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        console = Console()
        table = Table(title=f"flashtune across {world} ranks (lockstep): tuning per rank")
        for col in ("rank", "warmup seconds", "buckets tuned", "timings run here"):
            table.add_column(col, justify="right")
        for r, m in enumerate(everyone):
            table.add_row(str(r), f"{m['seconds']:.1f}", str(m["tuned"]), str(m["timings"]))
        console.print(table)
        same = all(m["winners"] == everyone[0]["winners"] for m in everyone)
        winners = Table(title=f"agreed winners ({'identical on every rank' if same else 'RANKS DIFFER'})")
        for col in ("op", "bucket", "kernel", "tactic"):
            winners.add_column(col)
        for op, _, bucket, kernel, tactic in everyone[0]["winners"]:
            winners.add_row(op, str(list(bucket)), kernel, tactic)
        console.print(winners)
        console.print(f"timings in all: {sum(m['timings'] for m in everyone)}; output matches the unsharded model")
        if not same:
            raise SystemExit("ranks hold different winners")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
