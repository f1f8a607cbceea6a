"""Tuning wall time of one model on 1, 2 and 4 ranks (gloo, CPU processes on this machine).

Each rank compiles the same model (an MLP stack whose forward all-reduces, as a tensor-parallel
one does; every rank holds the same shapes, so the tuning work is the same at every world size)
with ``backend="flashtune"`` and runs ``ft.warmup`` over the same token counts from an empty cache
of its own. With several ranks flashtune coordinates in lockstep: each bucket's candidates are
split across the ranks, each checks and times its share, and all pick one winner from the
gathered timings. Reported: the warmup's wall time (the slowest rank's), each rank's share of the
timings, and the speedup over one rank. Threads per rank: the machine's cores divided by the ranks
(at least one), so every run uses the same cores; with more ranks than cores the ranks share cores
and time each other's candidates slower, so that figure is limited by the cores, not by flashtune.

Run: python benchmarks/bench_distributed.py [--ranks 1,2,4] [--tokens 1,2,4,8,16,32,64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    import flashtune_compile as ft

    if args.world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world
        )
    ft.AutoTuner.reset(ft.AutoTuner(cache_dir=os.path.join(args.out, f"cache{args.rank}")))
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ModuleList(nn.Linear(args.hidden, args.inner) for _ in range(args.layers))
            self.down = nn.ModuleList(nn.Linear(args.inner, args.hidden, bias=False) for _ in range(args.layers))

        def forward(self, x):
            for up, down in zip(self.up, self.down):
                y = down(torch.relu(up(x)))
                if dist.is_initialized():
                    dist.all_reduce(y)
                x = x + y
            return x

    model = Block().eval()
    options = {"inner": "eager", "kernels": {"aten", "cpu"}, "buckets": "pow2", "max_tokens": max(args.tokens)}
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options=options)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    report = ft.warmup(compiled, lambda n: (torch.randn(n, args.hidden),), args.tokens, progress=False)
    seconds = time.perf_counter() - start
    with open(os.path.join(args.out, f"rank{args.rank}.json"), "w") as f:
        tuning = ft.stats()["tuning_seconds"]
        json.dump({"seconds": seconds, "tuned": report.tuned, "timings": report.timings, "tuning": tuning}, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def run(args, world: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp(prefix=f"ft-dist-{world}-")
    threads = max(1, (os.cpu_count() or 1) // world)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "FLASHTUNE_DISTRIBUTED": "auto"}
    base = [sys.executable, __file__, "--worker", "--world", str(world), "--port", str(port), "--out", out]
    base += ["--tokens", ",".join(map(str, args.tokens)), "--hidden", str(args.hidden), "--inner", str(args.inner)]
    base += ["--layers", str(args.layers)]
    procs = [subprocess.Popen([*base, "--rank", str(r)], env=env) for r in range(world)]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"a rank of the {world}-rank run failed (exit {p.returncode})")
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=ints, default=[1, 2, 4])
    ap.add_argument("--tokens", type=ints, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inner", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    cores = os.cpu_count()
    print(
        f"flashtune tuning across ranks: {args.layers} x (linear {args.hidden}->{args.inner}, linear "
        f"{args.inner}->{args.hidden}), token counts {args.tokens}; {platform.machine()} CPU, {cores} cores, "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    rows = []
    for world in args.ranks:
        print(f"[{world} rank(s)] warmup ...", flush=True)
        rows.append((world, run(args, world)))
    one = next((max(r["seconds"] for r in res) for w, res in rows if w == 1), None)
    head = ("ranks", "threads/rank", "warmup s", "vs 1 rank", "tuning s", "timings per rank", "total")
    widths = (5, 12, 9, 9, 9, 24, 6)
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(head, widths)))
    for world, res in rows:
        wall = max(r["seconds"] for r in res)
        per = ",".join(str(r["timings"]) for r in res)
        ratio = f"{one / wall:.2f}x" if one else "-"
        threads = max(1, (cores or 1) // world)
        tuning = max(r["tuning"] for r in res)
        cells = (world, threads, f"{wall:.1f}", ratio, f"{tuning:.1f}", per, sum(r["timings"] for r in res))
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    if any(world > (cores or 1) for world, _ in rows):
        print(f"note: more ranks than this machine's {cores} cores share them: those rows are limited by cores")


if __name__ == "__main__":
    main()
