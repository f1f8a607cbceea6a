"""Timing candidates: one median time per candidate, measured so that noise does not flip choices.

CPU: ``time.perf_counter``, candidates *interleaved* round by round in a shuffled order, median
per candidate. A background load that comes and goes then hits every candidate alike instead of
whichever ran during the spike; ``torch.utils.benchmark`` times one statement at a time, which is
why it is not used here. Clearly slower candidates are dropped after a few rounds to save time.
With ``cold_l2`` (the default) each sample is one call made after reading a buffer larger than the
last-level cache, so the call finds its weights in memory, as a layer of a model does when the rest
of the model's weights have streamed through the caches since its last call. (Timed warm, back to
back, oneDNN keeping a 2-6 MB weight in a 32 MiB L3 looked up to 1.14x faster than a kernel that
streams its weight past the L3; called in a model's order, the streaming kernel was 1.11-1.48x
faster.) With ``cold_l2=False`` a sample is a block of back-to-back calls, long enough to dwarf
the timer.

CUDA: ``triton.testing.do_bench`` (CUDA events, warmup, repeats, median; it flushes L2 before
every repeat, i.e. cold L2) or, with ``cold_l2=False``, the same event loop without the flush.
With ``cuda_graph=True`` (a deployment that replays CUDA graphs), each candidate is captured into
a graph once and its replays are timed: launch overhead then counts as it will when deployed, and
a candidate that cannot be captured (a host sync, say) is never chosen.
"""

from __future__ import annotations

import functools
import glob
import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("flashtune")


SIGN_TEST_P = 0.01  # a paired win must be this unlikely under "no difference" (one-sided sign test)
MIN_PAIRS = 8  # ... and rest on at least this many interleaved rounds


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate: median and interquartile range over repeats, and the
    repeats themselves in round order (CPU: round r of every candidate ran side by side)."""

    median: float
    q25: float
    q75: float
    samples: tuple[float, ...] = ()

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        qs = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3
        return cls(qs[1], qs[0], qs[2], tuple(samples))

    def at_least(self, floor: float) -> Timing:
        """This timing with every figure raised to ``floor`` (a cost the candidate cannot go under)."""
        if floor <= self.q25 and all(s >= floor for s in self.samples):
            return self
        return Timing(
            max(self.median, floor),
            max(self.q25, floor),
            max(self.q75, floor),
            tuple(max(s, floor) for s in self.samples),
        )

    def relative_to(self, own: Timing, base: Timing) -> Timing:
        """This timing, taken beside a default timed ``own``, restated beside ``base`` (the same
        default timed in another round): each sample scaled by the default's in the same round, so
        its ratio to ``base`` round by round is the ratio it had to ``own``."""
        n = min(len(self.samples), len(own.samples), len(base.samples))
        if n == 0:
            scale = base.median / own.median if own.median > 0 else 1.0
            return Timing(self.median * scale, self.q25 * scale, self.q75 * scale)
        return Timing.of([self.samples[r] * base.samples[r] / own.samples[r] for r in range(n)])

    def ahead_of(self, other: Timing, min_gain: float) -> bool:
        """Faster than ``other`` by more than ``min_gain`` at the median."""
        return self.median <= other.median * (1.0 - min_gain)

    def clearly_faster_than(self, other: Timing, min_gain: float) -> bool:
        """Ahead by more than ``min_gain`` at the median *and* by more than the noise: either the
        two interquartile ranges do not overlap, or, round by round (the rounds are interleaved, so
        a load that comes and goes hits both alike), this one won so often that chance would
        explain it less than ``SIGN_TEST_P`` of the time and by ``min_gain`` at the median ratio."""
        if not self.ahead_of(other, min_gain):
            return False
        if self.q75 < other.q25:
            return True
        pairs = list(zip(self.samples, other.samples))
        if len(pairs) < MIN_PAIRS:
            return False
        ratios = [a / b for a, b in pairs if b > 0]
        wins = sum(r < 1.0 for r in ratios)
        return statistics.median(ratios) <= 1.0 - min_gain and _sign_test_p(wins, len(ratios)) <= SIGN_TEST_P


def _sign_test_p(wins: int, n: int) -> float:
    """P(at least ``wins`` of ``n`` fair coin flips): how likely the wins are by chance alone."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def pick_winner(times: Sequence[Timing], min_gain: float) -> int:
    """The index of the candidate to use, ``times[0]`` being the default's: among candidates
    clearly faster than the default (``Timing.clearly_faster_than``), the fastest median; else 0."""
    faster = [i for i in range(1, len(times)) if times[i].clearly_faster_than(times[0], min_gain)]
    return min(faster, key=lambda i: times[i].median, default=0)


def undecided(times: Sequence[Timing], min_gain: float) -> list[int]:
    """Candidates ahead of the default at the median but not clearly (the noise may explain it)."""
    return [
        i
        for i in range(1, len(times))
        if times[i].ahead_of(times[0], min_gain) and not times[i].clearly_faster_than(times[0], min_gain)
    ]


@dataclass(frozen=True)
class ProfilerSettings:
    """Knobs of the timer, given to ``AutoTuner(settings=...)``. ``mode`` goes into the cache's
    environment: timings taken with other settings are not comparable.

    Args:
        block_seconds: CPU: minimum wall time of one timed block of calls.
        rounds: CPU: blocks per candidate (median over these) ...
        min_rounds: ... but stop after this many once ``max_seconds`` is spent.
        max_seconds: CPU: time budget of one bucket's timing loop.
        prune_after: CPU: rounds before clearly slower candidates stop being timed.
        prune_ratio: CPU: "clearly slower" = this many times the best median.
        settle_seconds: CPU: extra budget to decide candidates ahead of the default but not clearly.
        settle_rounds: CPU: rounds per settling step.
        cuda_warmup_ms: CUDA: warm-up time per candidate (``do_bench``).
        cuda_rep_ms: CUDA: timed repeats' total time per candidate.
        cold_l2: each timed call finds cold caches (CUDA: L2 flushed; CPU: last-level cache
            evicted), as a layer runs in a model; False times back-to-back calls.
        cuda_graph: CUDA: time replays of a captured graph (how a CUDA-graph deployment runs).

    Raises:
        Nothing (a frozen dataclass).

    Example: a model whose weights all fit in the cache::

        ft.AutoTuner.reset(ft.AutoTuner(settings=ft.ProfilerSettings(cold_l2=False)))
    """

    block_seconds: float = 2e-3  # CPU: minimum wall time of one timed block of calls
    rounds: int = 15  # CPU: blocks per candidate (median over these) ...
    min_rounds: int = 5  # CPU: ... but stop after this many once max_seconds is spent
    max_seconds: float = 1.5  # CPU: time budget of one bucket's timing loop
    prune_after: int = 3  # CPU: rounds before clearly slower candidates stop being timed
    prune_ratio: float = 1.5  # CPU: "clearly slower" = this many times the best median
    settle_seconds: float = 1.5  # CPU: extra budget to decide candidates ahead of the default but not clearly
    settle_rounds: int = 4  # CPU: rounds per settling step
    cuda_warmup_ms: float = 10.0
    cuda_rep_ms: float = 40.0
    cold_l2: bool = True  # each timed call finds cold caches (CUDA: L2 flushed; CPU: last-level cache evicted)
    cuda_graph: bool = False  # CUDA: time replays of a captured graph (see the module docstring)

    @property
    def mode(self) -> str:
        """The timing method, as the cache's environment records it."""
        return ("cold_l2" if self.cold_l2 else "warm_l2") + ("+cuda_graph" if self.cuda_graph else "")


def _per_call_seconds(fn: Callable[[], Any], budget: float) -> float:
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget or calls >= 1000:
            return elapsed / calls
        if calls >= 2 and elapsed * 10 >= budget:  # slow call: two are enough to size the block
            return elapsed / calls


def last_level_cache_bytes() -> int:
    """The size of this CPU's largest cache, from Linux's sysfs; 64 MiB where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        digits = text.rstrip("KMB")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=64 << 20)


@functools.cache
def _eviction_buffer() -> torch.Tensor:
    """A buffer 1.5x the last-level cache (kept for the process): reading it leaves none of what
    a timed call touched before in the caches."""
    return torch.ones(last_level_cache_bytes() * 3 // 8, dtype=torch.float32)


def evict_cpu_caches() -> None:
    """Push this process's recent data out of the CPU caches (of every core torch's threads run
    on) by reading ``_eviction_buffer()`` with torch's threads; about 1 ms for a 32 MiB cache.
    Where those threads span several last-level caches (several CCDs or sockets), each cache sees
    only its threads' share of the read, so it is evicted less than fully."""
    _eviction_buffer().sum()


def time_cpu(fns: Sequence[Callable[[], Any]], settings: ProfilerSettings = ProfilerSettings()) -> list[Timing]:
    """Seconds per call of each fn, interleaved; with ``settings.cold_l2``, each call after
    ``evict_cpu_caches()`` (not timed). Each fn must already have been run once."""
    inner = None
    if not settings.cold_l2:
        inner = [
            max(1, math.ceil(settings.block_seconds / max(_per_call_seconds(f, settings.block_seconds / 2), 1e-9)))
            for f in fns
        ]
    samples: list[list[float]] = [[] for _ in fns]
    live = list(range(len(fns)))
    shuffler = random.Random(len(fns))  # a fresh order each round: no alignment with scheduler slices
    start_all = time.perf_counter()
    for r in range(settings.rounds):
        if r >= settings.min_rounds and time.perf_counter() - start_all > settings.max_seconds:
            break
        _interleaved_round(fns, live, inner, samples, shuffler)
        if r + 1 == settings.prune_after and len(live) > 1:
            best = min(statistics.median(samples[i]) for i in live)
            # the default (0) stays: it is what every other candidate is compared with, round by round
            live = [i for i in live if i == 0 or statistics.median(samples[i]) <= settings.prune_ratio * best]
    return [Timing.of(s) for s in samples]


def settle_cpu(
    fns: Sequence[Callable[[], Any]],
    times: list[Timing],
    min_gain: float,
    settings: ProfilerSettings = ProfilerSettings(),
) -> list[Timing]:
    """More interleaved rounds of the default and of the candidates ahead of it but not clearly
    (``undecided``), until each is decided or ``settings.settle_seconds`` is spent; returns the
    timings with the new rounds added. Only candidates timed in every round so far take part, so
    round r of each still ran side by side with round r of the default."""
    todo = [i for i in undecided(times, min_gain) if len(times[i].samples) == len(times[0].samples)]
    if not todo:
        return times
    samples = {i: list(times[i].samples) for i in [0, *todo]}
    inner = None
    if not settings.cold_l2:
        inner = {i: max(1, math.ceil(settings.block_seconds / max(times[i].median, 1e-9))) for i in samples}
    shuffler = random.Random(len(fns) + len(todo))
    start = time.perf_counter()
    while todo and time.perf_counter() - start < settings.settle_seconds:
        for _ in range(settings.settle_rounds):
            _interleaved_round(fns, [0, *todo], inner, samples, shuffler)
        times = [Timing.of(samples[i]) if i in samples else t for i, t in enumerate(times)]
        todo = [i for i in undecided(times, min_gain) if i in todo]
    return times


def _interleaved_round(
    fns: Sequence[Callable[[], Any]], which: Sequence[int], inner: Any, samples: Any, shuffler: random.Random
) -> None:
    """One round: a block of ``inner[i]`` calls of each ``fns[i]`` for i in ``which``, in a fresh
    shuffled order; appends each block's seconds per call to ``samples[i]``. ``inner`` None (cold
    timing): one call per sample, made after ``evict_cpu_caches()``, which is not timed."""
    order = list(which)
    shuffler.shuffle(order)
    for i in order:
        fn = fns[i]
        if inner is None:
            evict_cpu_caches()
            start = time.perf_counter()
            fn()
            samples[i].append(time.perf_counter() - start)
            continue
        n = inner[i]
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples[i].append((time.perf_counter() - start) / n)


def time_cuda(fns: Sequence[Callable[[], Any]], settings: ProfilerSettings = ProfilerSettings()) -> list[Timing | None]:
    """Seconds per call of each fn on the current CUDA stream. With ``settings.cuda_graph``, of a
    replay of the fn captured into a CUDA graph; None for a fn that cannot be captured, except the
    first (the default, the reference every other is compared with), which is then timed eagerly."""
    out: list[Timing | None] = []
    for i, fn in enumerate(fns):
        if settings.cuda_graph:
            try:
                fn = _captured(fn)
            except Exception as e:  # noqa: BLE001  (any capture failure means: not graph-safe)
                log.info("flashtune: candidate %d cannot be captured in a CUDA graph: %s: %s", i, type(e).__name__, e)
                if i > 0:
                    out.append(None)
                    continue
        if settings.cold_l2:
            from triton.testing import do_bench

            q25, q50, q75 = do_bench(
                fn, warmup=settings.cuda_warmup_ms, rep=settings.cuda_rep_ms, quantiles=[0.25, 0.5, 0.75]
            )
            timing = Timing(q50 * 1e-3, q25 * 1e-3, q75 * 1e-3)
        else:
            timing = Timing.of([ms * 1e-3 for ms in _cuda_events_ms(fn, settings)])
        if not settings.cuda_graph:  # launched one by one, a call costs at least its host time
            timing = timing.at_least(_host_seconds_per_call(fn))
        out.append(timing)
    return out


def _host_seconds_per_call(fn: Callable[[], Any], calls: int = 50) -> float:
    """Host seconds to issue one call, back to back, without waiting for the GPU. Without CUDA
    graphs a call cannot finish faster than the host issues it: a kernel whose launch costs 20 us
    of Python loses to a 10 us cuBLAS call when the GPU waits on the host (decode, small layers),
    though its kernel alone is faster (seen on an H200, 2026-11-30: flashtune 0.7-0.8x of
    Inductor end to end without graphs, even with them)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return seconds


def _captured(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured into a CUDA graph (after one warm-up call on a side stream, as capture
    requires); returns the graph's replay. Raises if ``fn`` cannot be captured, leaving the process
    as it found it: a host sync is caught in the warm-up (sync debug mode), before any capture, and
    a capture that fails anyway is undone (``_undo_failed_capture``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(stream):
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.current_stream().wait_stream(stream)
    device = torch.cuda.current_device()
    generator = torch.cuda.default_generators[device]
    rng = generator.clone_state()
    pool = torch.cuda.graph_pool_handle()
    graph, ended = torch.cuda.CUDAGraph(), False
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=pool)
            try:
                fn()
            finally:
                graph.capture_end()
                ended = True
    except BaseException:
        if not ended:
            _undo_failed_capture(device, pool, generator, rng)
        raise
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


def _undo_failed_capture(device: int, pool: Any, generator: torch.Generator, rng: torch.Generator) -> None:
    """After a capture that raised, put back what torch leaves half-done (torch 2.11-2.13): the
    default generator's state is left in capture mode (every later CUDA random op then raises
    "Offset increment outside graph capture"), and the graph's memory pool stays registered for
    allocation with a filter that points into the dead graph (a later capture then crashes)."""
    generator.graphsafe_set_state(rng)
    try:
        torch._C._cuda_endAllocateToPool(device, pool)  # raises when capture_end got that far
    except RuntimeError:
        pass
    torch._C._cuda_releasePool(device, pool)  # a graph whose capture never ended never releases it
    torch.cuda.synchronize()


def _cuda_events_ms(fn: Callable[[], Any], settings: ProfilerSettings) -> list[float]:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(settings.cuda_warmup_ms / est))):
        fn()
    reps = max(5, min(1000, int(settings.cuda_rep_ms / est)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def time_candidates(
    fns: Sequence[Callable[[], Any]], device: torch.device, settings: ProfilerSettings = ProfilerSettings()
) -> list[Timing | None]:
    """Seconds per call (median, quartiles) of each candidate on ``device``; None for one that
    cannot run the way it is timed (``time_cuda``). The first is never None."""
    if device.type == "cuda":
        return time_cuda(fns, settings)
    return time_cpu(fns, settings)
