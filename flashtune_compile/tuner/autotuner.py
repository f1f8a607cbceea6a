"""Cache-first choice of (runner, tactic) for one op call.

``choose_one`` costs one signature (each tensor's shape, stride, dtype and device) and one dict
lookup when the call's exact signature was seen before: no tensor is made, no kernel launched.
The first call of a new signature maps it to its bucket and looks the bucket up in the tactic
cache; only a bucket the cache has never seen is profiled, and only when tuning is allowed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .buckets import TuningConfig
from .cache import Entry, Key, TacticCache, environment, freeze
from .check import mismatch
from .profiler import ProfilerSettings, Timing, time_candidates
from .runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner, canonical_tactic
from .synth import bucket_shapes, synthesize

log = logging.getLogger("flashtune")

TUNE_MODES = ("auto", "off")
_override: ContextVar[bool | None] = ContextVar("flashtune_autotune", default=None)
_MEMO_LIMIT = 8192
_unset = object()


@dataclass
class Stats:
    hits: int = 0  # calls answered from the cache
    misses: int = 0  # calls whose bucket the cache did not hold
    profiles: int = 0  # candidate (runner, tactic) timings run
    synthesized: int = 0  # tensors made for profiling
    tuning_seconds: float = 0.0
    fallbacks: int = 0  # misses answered with the default because tuning was off
    rejected: int = 0  # candidates that raised or disagreed with the default
    routed_ops: int = 0  # graph nodes routed to tunable ops (counted by the backend)
    compiles: int = 0  # graphs the backend compiled


@contextlib.contextmanager
def autotune(enabled: bool = True) -> Iterator[None]:
    """Inside, unseen buckets are tuned (``enabled=False``: never), whatever the tune mode says.

    Applies to the current thread (and its asyncio tasks). Example::

        with ft.autotune():
            model(x)        # profiles the buckets of x's sizes once
    """
    token = _override.set(bool(enabled))
    try:
        yield
    finally:
        _override.reset(token)


def _signature(inputs: Sequence[Any], Tensor: type = torch.Tensor) -> tuple:
    """Everything a cache key can depend on: each tensor's shape, stride, dtype and device, and
    the value of each scalar."""
    sig = []
    for x in inputs:
        if isinstance(x, Tensor):
            sig.append((x.shape, x.stride(), x.dtype, x.device))
        elif x is None or isinstance(x, (int, float, str, bool)):
            sig.append(x)
        else:
            sig.append(freeze(x) if isinstance(x, (list, tuple)) else type(x).__name__)
    return tuple(sig)


def _bounded_add(memo: set, sig: tuple) -> None:
    if len(memo) >= _MEMO_LIMIT:
        memo.clear()
    memo.add(sig)


class _Alias:
    """One caller's (runners, config) objects: holds them alive (so their ids stay unique while
    they key the alias map) and memoizes signature -> (runner, tactic) for cache hits, and the
    signatures known to miss while tuning is off."""

    __slots__ = ("ctx", "runners", "config", "memo", "missed")

    def __init__(self, ctx: _OpContext, runners: Sequence[TunableRunner], config: TuningConfig) -> None:
        self.ctx, self.runners, self.config = ctx, runners, config
        self.memo: dict[tuple, tuple[TunableRunner, Tactic]] = {}
        self.missed: set[tuple] = set()


class _OpContext:
    """What is fixed for one (op, runner names, config): how cache keys are made."""

    def __init__(self, op: str, runners: Sequence[TunableRunner], config: TuningConfig) -> None:
        if not runners:
            raise ValueError(f"choose_one({op!r}): needs at least one runner (the first is the default)")
        names = tuple(r.name for r in runners)
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"choose_one({op!r}): runner names must be distinct non-empty strings, got {names}")
        self.op, self.runners, self.config, self.names = op, runners, config, names
        self.varying = {i: set(ds) for i, ds in config.varying_dims().items()}
        self.validated: set[Key] = set()  # cache keys whose tactic was checked

    def cache_key(self, inputs: Sequence[Any], bucket: tuple[int, ...]) -> Key:
        static = []
        for i, x in enumerate(inputs):
            if isinstance(x, torch.Tensor):
                dyn = {d % x.dim() for d in self.varying.get(i, ())}
                shape = tuple(-1 if d in dyn else s for d, s in enumerate(x.shape))
                static.append(("T", shape, str(x.dtype).removeprefix("torch."), x.device.type))
            elif x is None or isinstance(x, (int, float, str, bool)):
                static.append(x)
            else:
                static.append(freeze(x) if isinstance(x, (list, tuple)) else type(x).__name__)
        extras = []
        for r in self.runners:
            try:
                extras.append(freeze(r.cache_key_extras(inputs)))
            except TypeError as e:
                raise TypeError(f"{r!r}.cache_key_extras must return JSON values: {e}") from None
        return (self.op, self.names, tuple(static), tuple(extras), bucket)


class AutoTuner:
    """The process-wide tuner: one tactic cache, one stats record, one profiling lock."""

    _instance: AutoTuner | None = None
    _instance_lock = threading.Lock()
    sites: dict = {}  # site key -> TunedSite (tuner/site.py); their memos are dropped on any cache change

    def __init__(
        self,
        cache_dir: Path | str | None | object = _unset,
        tune: str | None = None,
        settings: ProfilerSettings | None = None,
        min_gain: float = 0.02,
    ) -> None:
        """``cache_dir``: default $FLASHTUNE_CACHE_DIR, else the user cache dir; None keeps the
        cache in memory. ``tune``: "auto" or "off", default $FLASHTUNE_TUNE, else "auto".
        ``min_gain``: a candidate replaces the default only if faster by this fraction."""
        if cache_dir is _unset:
            cache_dir = os.environ.get("FLASHTUNE_CACHE_DIR") or default_cache_dir()
        tune = tune or os.environ.get("FLASHTUNE_TUNE") or "auto"
        if tune not in TUNE_MODES:
            raise ValueError(f"flashtune: tune mode {tune!r} is not one of {TUNE_MODES} (check FLASHTUNE_TUNE)")
        self.tune_mode = tune
        self.settings = settings or ProfilerSettings()
        self.min_gain = min_gain
        self.stats = Stats()
        self.cache = TacticCache(cache_dir, environment(self.settings.mode), on_change=self._forget_memos)
        self._fast: dict[int, _Alias] = {}  # id(runners) -> alias: the hot path's first lookup
        self._contexts: dict[tuple, _OpContext] = {}
        self._profile_lock = threading.RLock()
        self._said: set[Key] = set()
        # Called as fn(op, bucket, entry) when a bucket starts tuning (entry None) and when its winner
        # is cached; e.g. ft.warmup's progress bar. A listener must not raise.
        self.listeners: list[Callable[[str, tuple, Entry | None], None]] = []

    def use_cache_dir(self, cache_dir: Path | str | None) -> None:
        """Switch to the tactic cache in ``cache_dir`` (None: memory only); no-op if already there."""
        new = Path(cache_dir).expanduser().resolve() if cache_dir is not None else None
        old = self.cache.directory.resolve() if self.cache.directory is not None else None
        if new == old:
            return
        self.cache = TacticCache(new, self.cache.env, on_change=self._forget_memos)
        self._forget_memos()

    @classmethod
    def get(cls) -> AutoTuner:
        """The process-wide tuner, made on first use."""
        inst = cls._instance
        if inst is None:
            with cls._instance_lock:
                if cls._instance is None:
                    cls._instance = cls()
                inst = cls._instance
        return inst

    @classmethod
    def reset(cls, tuner: AutoTuner | None = None) -> AutoTuner | None:
        """Replace the process-wide tuner (None: a fresh one is made on next use, re-reading the
        environment). Returns the old one."""
        with cls._instance_lock:
            old, cls._instance = cls._instance, tuner
        cls._clear_site_memos()
        return old

    @classmethod
    def _clear_site_memos(cls) -> None:
        for site in list(cls.sites.values()):
            site.memo.clear()

    # -- the hot path ----------------------------------------------------------------------------

    def choose_one(
        self,
        op: str,
        runners: Sequence[TunableRunner],
        config: TuningConfig,
        inputs: Sequence[Any],
        *,
        tune: bool | None = None,
    ) -> tuple[TunableRunner, Tactic]:
        """The (runner, tactic) to run ``inputs`` with. ``runners[0]`` with tactic -1 is the default.

        Cache hit: returned at once, nothing made or launched. Miss with tuning allowed
        (``ft.autotune()``, else ``tune``, else the tuner's mode): the bucket is profiled once and the
        winner cached. Miss otherwise, or while a CUDA graph is being captured: the default.
        Pass the same ``runners`` and ``config`` objects each call for the fastest path.
        """
        return self.choose_cached(op, runners, config, inputs, tune=tune)[0]

    def choose_cached(
        self,
        op: str,
        runners: Sequence[TunableRunner],
        config: TuningConfig,
        inputs: Sequence[Any],
        *,
        tune: bool | None = None,
    ) -> tuple[tuple[TunableRunner, Tactic], bool]:
        """``choose_one``, and whether the answer came from the cache (False for a fallback)."""
        alias = self._fast.get(id(runners))
        if alias is None or alias.config is not config or alias.ctx.op != op:
            alias = self._alias(op, runners, config)
        sig = _signature(inputs)
        hit = alias.memo.get(sig)
        if hit is not None:
            self.stats.hits += 1
            return hit, True
        return self._choose_slow(alias, sig, inputs, tune)

    # -- everything else -----------------------------------------------------------------------

    def _alias(self, op: str, runners: Sequence[TunableRunner], config: TuningConfig) -> _Alias:
        names = tuple(getattr(r, "name", None) for r in runners)
        ctx = self._contexts.get((op, names, id(config)))
        if ctx is None or ctx.config is not config:
            ctx = self._contexts[(op, names, id(config))] = _OpContext(op, runners, config)
        if len(self._fast) > 1024:  # callers passing fresh lists each call: keep the alias map bounded
            self._fast.clear()
        alias = self._fast[id(runners)] = _Alias(ctx, runners, config)
        return alias

    def _tuning_allowed(self, tune: bool | None) -> bool:
        forced = _override.get()
        if forced is not None:
            return forced
        if tune is not None:
            return tune
        return self.tune_mode == "auto"

    def _fallback(self, runners: Sequence[TunableRunner]) -> tuple[tuple[TunableRunner, Tactic], bool]:
        self.stats.misses += 1
        self.stats.fallbacks += 1
        return (runners[0], DEFAULT_TACTIC), False

    def _choose_slow(
        self, alias: _Alias, sig: tuple, inputs: Sequence[Any], tune: bool | None
    ) -> tuple[tuple[TunableRunner, Tactic], bool]:
        """The choice for a signature not memoized yet, and whether it came from the cache (and was
        memoized) rather than being the default's fallback."""
        ctx, runners = alias.ctx, alias.runners
        allowed = self._tuning_allowed(tune)
        if not allowed and sig in alias.missed:
            return self._fallback(runners)
        bucket = ctx.config.bucket_of(inputs)
        if 0 in bucket:  # an empty call: nothing to tune, the default handles it
            return (runners[0], DEFAULT_TACTIC), False
        key = ctx.cache_key(inputs, bucket)
        choice = self._lookup(ctx, key, inputs, bucket)
        if choice is None:
            capturing = (
                any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
                and torch.cuda.is_current_stream_capturing()
            )
            if not allowed or capturing:
                if not capturing:
                    _bounded_add(alias.missed, sig)
                if key not in self._said:
                    self._said.add(key)
                    why = "a CUDA graph is being captured" if capturing else "tuning is off"
                    log.info(
                        "flashtune: %s bucket %s not in the cache and %s; using the default %s",
                        ctx.op,
                        bucket,
                        why,
                        ctx.names[0],
                    )
                return self._fallback(runners)
            with self._profile_lock:
                choice = self._lookup(ctx, key, inputs, bucket)  # another thread may have tuned it
                if choice is None:
                    choice = self._tune(ctx, runners, key, inputs, bucket)
                else:
                    self.stats.hits += 1
        else:
            self.stats.hits += 1
            log.debug("flashtune: %s bucket %s from the cache: %s[%r]", ctx.op, bucket, ctx.names[choice[0]], choice[1])
        result = (runners[choice[0]], choice[1])
        if len(alias.memo) >= _MEMO_LIMIT:
            alias.memo.clear()
        alias.memo[sig] = result
        return result, True

    def _lookup(
        self, ctx: _OpContext, key: Key, inputs: Sequence[Any], bucket: tuple[int, ...]
    ) -> tuple[int, Tactic] | None:
        """The cached choice for ``key``, checked (once per process) to name a tactic its runner
        still offers; an entry that does not is dropped with a warning."""
        entry = self.cache.get(key)
        if entry is None:
            return None
        idx = ctx.names.index(entry.runner)
        if key not in ctx.validated:
            if not (idx == 0 and entry.tactic == DEFAULT_TACTIC):
                profile = BucketProfile(bucket, tuple(bucket_shapes(inputs, ctx.config, bucket)))
                try:
                    offered = {canonical_tactic(t) for t in ctx.runners[idx].get_valid_tactics(inputs, profile)}
                except Exception as e:  # a runner that cannot even list tactics cannot be trusted
                    offered, entry_err = set(), e
                else:
                    entry_err = None
                if entry.tactic not in offered:
                    log.warning(
                        "flashtune: dropping cached %s tactic %r of %s for bucket %s: not offered by the runner%s",
                        ctx.op,
                        entry.tactic,
                        entry.runner,
                        bucket,
                        f" ({entry_err})" if entry_err else "",
                    )
                    self.cache.entries.pop(key, None)
                    return None
            ctx.validated.add(key)
        return idx, entry.tactic

    def _tune(
        self,
        ctx: _OpContext,
        runners: Sequence[TunableRunner],
        key: Key,
        inputs: Sequence[Any],
        bucket: tuple[int, ...],
    ) -> tuple[int, Tactic]:
        """Profile every valid (runner, tactic) of this bucket, cache and return the winner."""
        start = time.perf_counter()
        self.stats.misses += 1
        for listener in list(self.listeners):
            listener(ctx.op, bucket, None)
        synth, shapes, made = synthesize(inputs, ctx.config, bucket)
        self.stats.synthesized += made
        profile = BucketProfile(bucket, shapes)
        ref = runners[0].forward(synth, DEFAULT_TACTIC)  # the default must work: its error is the op's
        candidates: list[tuple[int, Tactic]] = [(0, DEFAULT_TACTIC)]
        rejected: list[str] = []
        for i, runner in enumerate(runners):
            try:
                tactics = [canonical_tactic(t) for t in runner.get_valid_tactics(synth, profile)]
            except Exception as e:
                rejected.append(f"{runner.name}: get_valid_tactics raised {type(e).__name__}: {e}")
                continue
            for t in tactics:
                if (i, t) in candidates:
                    continue
                try:
                    why = mismatch(runner.forward(synth, t), ref, ctx.config.rtol)
                except Exception as e:
                    why = f"raised {type(e).__name__}: {e}"
                if why is None:
                    candidates.append((i, t))
                else:
                    rejected.append(f"{runner.name}[{t!r}]: {why}")
        if rejected:
            self.stats.rejected += len(rejected)
            log.info("flashtune: %s bucket %s: never choosing %s", ctx.op, bucket, "; ".join(rejected))
        if len(candidates) == 1:  # nothing to choose between: record the default untimed
            times = [Timing(0.0, 0.0, 0.0)]
        else:
            fns = [lambda r=runners[i], t=t: r.forward(synth, t) for i, t in candidates]
            device = next((x.device for x in synth if isinstance(x, torch.Tensor)), torch.device("cpu"))
            times = time_candidates(fns, device, self.settings)
            self.stats.profiles += len(candidates)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "flashtune: %s bucket %s medians: %s",
                    ctx.op,
                    bucket,
                    ", ".join(
                        f"{runners[i].name}[{t!r}] {tm.median * 1e6:.1f}us" for (i, t), tm in zip(candidates, times)
                    ),
                )
        # The default is replaced only by a candidate that beats it by more than min_gain and by
        # more than the measured noise; among those, the fastest median wins.
        winners = [i for i in range(1, len(candidates)) if times[i].clearly_faster_than(times[0], self.min_gain)]
        best = min(winners, key=lambda i: times[i].median, default=0)
        idx, tactic = candidates[best]
        entry = Entry(
            runners[idx].name, tactic, times[best].median, times[0].median, timed=len(candidates), rejected=rejected
        )
        self.cache.put(key, entry)
        ctx.validated.add(key)
        elapsed = time.perf_counter() - start
        self.stats.tuning_seconds += elapsed
        log.info(
            "flashtune: tuned %s bucket %s in %.2fs: %s[%r] %.1f us (default %.1f us, %d timed)",
            ctx.op,
            bucket,
            elapsed,
            entry.runner,
            tactic,
            entry.time_s * 1e6,
            entry.default_s * 1e6,
            len(candidates),
        )
        for listener in list(self.listeners):
            listener(ctx.op, bucket, entry)
        return idx, tactic

    def _forget_memos(self) -> None:
        for alias in list(self._fast.values()):
            alias.memo.clear()
            alias.missed.clear()
        for ctx in list(self._contexts.values()):
            ctx.validated.clear()
        if AutoTuner._instance is self:
            AutoTuner._clear_site_memos()

    # -- reporting -----------------------------------------------------------------------------

    def tactics(self) -> list[dict[str, Any]]:
        """One record per cached winner: op, shape key, bucket, kernel, tactic, times, speedup."""
        out = []
        for (op, runners, static, extras, bucket), e in list(self.cache.entries.items()):
            out.append(
                {
                    "op": op,
                    "shape_key": static,
                    "extras": extras,
                    "bucket": bucket,
                    "kernel": e.runner,
                    "tactic": e.tactic,
                    "time_s": e.time_s,
                    "default_s": e.default_s,
                    "speedup": e.speedup,
                    "candidates": list(runners),
                    "timed": e.timed,
                    "rejected": list(e.rejected),
                }
            )
        return out

    def stats_dict(self) -> dict[str, Any]:
        return asdict(self.stats)

    def reset_stats(self) -> None:
        """Zero every counter in place (sites hold a reference to this Stats)."""
        for f in fields(Stats):
            setattr(self.stats, f.name, 0.0 if f.type == "float" else 0)


def default_cache_dir() -> Path:
    """The platform's user cache dir for flashtune (e.g. ~/.cache/flashtune on Linux)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("flashtune"))
