"""Timing helpers shared by the CPU benchmarks: interleaved medians, the machine's read rate, and
repeats in fresh processes (where each process's buffers land moves memory-bound rows by tens of
percent on a VM, so one process's ratio is one draw)."""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sample(fn: Callable[[], object], n: int) -> float:
    """Mean milliseconds per call over ``n`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def time_contenders(calls: dict, rounds: int, ms: float, rng: random.Random, warm: int = 0) -> dict[str, float]:
    """Median ms per call of each contender over ``rounds`` rounds, in a shuffled order each round;
    a sample is the mean of as many calls as take >= ``ms`` ms. Each contender is first called
    ``warm`` times untimed (steady state: flashtune makes a weight copy on the weight's 8th call)."""
    ns = {}
    for name, fn in calls.items():
        for _ in range(warm):
            fn()
        once = min(sample(fn, 1) for _ in range(3))
        ns[name] = max(1, math.ceil(ms / max(once, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        order = list(calls)
        rng.shuffle(order)
        for name in order:
            samples[name].append(sample(calls[name], ns[name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def read_buffer(mb: int = 512, huge_pages: bool = False) -> torch.Tensor | None:
    """An fp32 buffer of ``mb`` MB, far larger than any last-level cache, to time a STREAM-like
    read of (``.sum()`` with torch's threads): the memory floor a weight-streaming kernel works
    against. ``huge_pages``: a fresh mapping advised onto 2 MB pages, as flashtune's CPU weight packs
    are (torch's own tensors are on 4 KB pages unless THP_MEM_ALLOC_ENABLE=1); None where the OS
    has no such advice."""
    if not huge_pages:
        return torch.ones(mb * 2**20 // 4)
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    mapping = mmap.mmap(-1, mb * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    buf = torch.frombuffer(mapping, dtype=torch.float32)  # keeps the mapping alive
    buf.fill_(1.0)
    return buf


def read_gbs(mb: int = 512, reps: int = 7, huge_pages: bool = False) -> float:
    """GB/s of a sum over ``read_buffer(mb, huge_pages)``, median of ``reps``; 0.0 without one."""
    buf = read_buffer(mb, huge_pages)
    if buf is None:
        return 0.0
    buf.sum()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return buf.numel() * 4 / statistics.median(times) / 1e9


def torch_huge_pages() -> bool:
    """Whether torch's CPU allocator puts large tensors on huge pages (THP_MEM_ALLOC_ENABLE=1)."""
    return os.environ.get("THP_MEM_ALLOC_ENABLE", "0") not in ("", "0")


def add_process_options(ap: argparse.ArgumentParser) -> None:
    """``--processes N`` (repeat the run in N fresh processes) and the child's own ``--json F``
    (where it writes its figures): what ``in_fresh_processes`` reads and strips."""
    ap.add_argument("--processes", type=int, default=1, help="repeat in N fresh processes; print the ratios' spread")
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)


def in_fresh_processes(n: int, script: str, argv: list[str]) -> list:
    """Runs ``python script *argv --json F`` ``n`` times (``--processes`` and ``--json`` dropped from
    argv), one fresh process after another, and returns what each wrote to F. A process that fails
    stops the run with its output."""
    runs = []
    argv = list(argv)
    for flag in ("--processes", "--json"):  # the child's own: one process, its own file
        while flag in argv:
            at = argv.index(flag)
            del argv[at : at + 2]
        argv = [a for a in argv if not a.startswith(flag + "=")]
    for i in range(n):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run.json"
            print(f"process {i + 1}/{n}: {Path(script).name} {' '.join(argv)}", file=sys.stderr, flush=True)
            done = subprocess.run([sys.executable, script, *argv, "--json", str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"process {i + 1} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
            runs.append(json.loads(out.read_text()))
    return runs


def print_ratio_spread(label: str, ratios: dict[str, list[float]]) -> None:
    """One row per key: each process's ratio, their median, min and max (a ratio > 1: ours faster)."""
    n = max(len(v) for v in ratios.values())
    print(f"\n{label}: ratio per process, then the median over processes and the range")
    print(f"{'':>14} " + " ".join(f"{f'p{i + 1}':>6}" for i in range(n)) + f" {'median':>7} {'min':>6} {'max':>6}")
    for key, values in ratios.items():
        cells = " ".join(f"{v:>5.2f}x" for v in values)
        print(f"{key:>14} {cells} {statistics.median(values):>6.2f}x {min(values):>5.2f}x {max(values):>5.2f}x")
