"""Timing helpers shared by the CPU benchmarks: interleaved medians and the machine's read rate."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable

import torch


def sample(fn: Callable[[], object], n: int) -> float:
    """Mean milliseconds per call over ``n`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def time_contenders(calls: dict, rounds: int, ms: float, rng: random.Random) -> dict[str, float]:
    """Median ms per call of each contender over ``rounds`` rounds, in a shuffled order each round;
    a sample is the mean of as many calls as take >= ``ms`` ms."""
    ns = {}
    for name, fn in calls.items():
        once = min(sample(fn, 1) for _ in range(3))
        ns[name] = max(1, math.ceil(ms / max(once, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        order = list(calls)
        rng.shuffle(order)
        for name in order:
            samples[name].append(sample(calls[name], ns[name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def read_gbs(mb: int = 512, reps: int = 7) -> float:
    """GB/s of a sum over an fp32 buffer of ``mb`` MB, far larger than any last-level cache (a
    STREAM-like read with torch's threads): the memory floor a weight-streaming kernel works against."""
    buf = torch.ones(mb * 2**20 // 4)
    buf.sum()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return buf.numel() * 4 / statistics.median(times) / 1e9
