"""Cache-first choice of (runner, tactic) for one op call, and the process state the tuner owns.

``choose_one`` costs one signature (each tensor's shape, stride, dtype and device) and one dict
lookup when the call's exact signature was seen before: no tensor is made, no kernel launched.
The first call of a new signature maps it to its bucket and looks the bucket up in the tactic
cache; only a bucket the cache has never seen is profiled (``tune.py``), and only when tuning is
allowed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import distributed as teams
from .buckets import TuningConfig
from .cache import Entry, Key, TacticCache, default_cache_dir, environment, resolve_dir
from .keys import Alias, OpContext, bounded_put, signature
from .memory import max_bytes_from_env
from .profiler import ProfilerSettings
from .runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner, canonical_tactic
from .synth import bucket_shapes, new_generator
from .tune import tune_bucket
from .weights import WeightCache

log = logging.getLogger("flashtune")

TUNE_MODES = ("auto", "off")
_override: ContextVar[bool | None] = ContextVar("flashtune_autotune", default=None)
Runners = Sequence[TunableRunner]  # runners[0] with tactic -1 is the default
Inputs = Sequence[Any]
Choice = tuple[TunableRunner, Tactic]
_ALIAS_LIMIT = 1024  # callers passing fresh runner lists each call: keep the alias maps bounded
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
    handed_back: int = 0  # training graphs' routed calls tuned no faster than ATen, left to ATen
    compiles: int = 0  # graphs the backend compiled


@contextlib.contextmanager
def autotune(enabled: bool = True) -> Iterator[None]:
    """A context manager inside which unseen buckets are tuned, whatever the tune mode says.

    Applies to the current thread (and its asyncio tasks).

    Args:
        enabled: True tunes unseen buckets inside; False never tunes them (they run the default).

    Raises:
        Nothing.

    Example::

        with ft.autotune():
            model(x)        # profiles the buckets of x's sizes once
    """
    token = _override.set(bool(enabled))
    try:
        yield
    finally:
        _override.reset(token)


class AutoTuner:
    """The process-wide tuner. It owns everything flashtune keeps between calls, so a new tuner
    (``AutoTuner.reset``) starts clean: the tactic caches (its default one and any a model names
    with ``cache_dir``), the stats, compiled call sites, candidate runner sets, re-laid-out weight
    copies, profiling generators, and what ops learn from real calls (``state``).
    ``AutoTuner.get()`` is the process's tuner; ``choose_one(op, runners, config, inputs)`` returns
    the (runner, tactic) for the inputs' bucket, tuning it first if it is unseen and tuning is on.

    Args:
        cache_dir: the default tactic cache's directory (default $FLASHTUNE_CACHE_DIR, else the
            user cache dir); None keeps it in memory.
        tune: "auto" or "off" (default $FLASHTUNE_TUNE, else "auto").
        settings: the timer's ``ProfilerSettings``.
        min_gain: a candidate replaces the default only if faster by this fraction.
        copy_min_gain: a candidate reading a weight copy wins only if faster than the best without
            one by this fraction (a copy costs the weight's memory again).

    Raises:
        ValueError: ``tune`` (or $FLASHTUNE_TUNE) is not "auto" or "off".

    Example: a process whose tactics live in memory only::

        old = ft.AutoTuner.reset(ft.AutoTuner(cache_dir=None))
    """

    _instance: AutoTuner | None = None
    _instance_lock = threading.Lock()

    def __init__(
        self,
        cache_dir: Path | str | None | object = _unset,
        tune: str | None = None,
        settings: ProfilerSettings | None = None,
        min_gain: float = 0.02,
        copy_min_gain: float = 0.2,
    ) -> None:
        """``cache_dir``: default $FLASHTUNE_CACHE_DIR, else the user cache dir; None keeps the
        cache in memory. ``tune``: "auto" or "off", default $FLASHTUNE_TUNE, else "auto".
        ``min_gain``: a candidate replaces the default only if faster by this fraction.
        ``copy_min_gain``: a candidate reading a weight copy wins only if faster than the best
        without one by this fraction (a copy costs the weight's memory again)."""
        if cache_dir is _unset:
            cache_dir = os.environ.get("FLASHTUNE_CACHE_DIR") or default_cache_dir()
        tune = tune or os.environ.get("FLASHTUNE_TUNE") or "auto"
        if tune not in TUNE_MODES:
            raise ValueError(f"flashtune: tune mode {tune!r} is not one of {TUNE_MODES} (check FLASHTUNE_TUNE)")
        self.tune_mode = tune
        self.settings = settings or ProfilerSettings()
        self.min_gain = min_gain
        self.copy_min_gain = copy_min_gain
        self.stats = Stats()
        self.cache = TacticCache(cache_dir, environment(self.settings.mode), on_change=self._forget_memos)
        self.caches: dict[tuple[Path | None, bool], TacticCache] = {(resolve_dir(cache_dir), False): self.cache}
        self.sites: dict[str, Any] = {}  # site string -> TunedSite (tuner/site.py)
        self.runner_sets: dict[tuple, tuple[TunableRunner, ...]] = {}  # (op, kernels) -> its runners
        self.weights = WeightCache(max_bytes_from_env())  # copies runners keep (tuner/weights.py)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._state: dict[str, Any] = {}
        self._fast: dict[int, Alias] = {}  # id(runners) -> alias: the hot path's first lookup
        self._contexts: dict[tuple, OpContext] = {}
        self._validated: set[tuple[int, Key]] = set()  # (id(cache), key): entries checked to be offered
        self._profile_lock = threading.RLock()
        self._said: set[Key] = set()
        # (id(cache), key) -> (the choice the ranks of a lockstep team agreed for it, None: the default):
        # served without asking the cache again, so no later change to one rank's cache splits them
        self._agreed: dict[tuple[int, Key], tuple[tuple[int, Tactic] | None]] = {}
        # Called as fn(op, bucket, entry) when a bucket starts tuning (entry None) and when its winner
        # is cached; e.g. ft.warmup's progress bar. A listener must not raise.
        self.listeners: list[Callable[[str, tuple, Entry | None], None]] = []

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
        """Replace the process-wide tuner, and with it all its state (None: a fresh one is made on
        next use, re-reading the environment). Returns the old one."""
        with cls._instance_lock:
            old, cls._instance = cls._instance, tuner
        return old

    # -- state -------------------------------------------------------------------------------------

    def cache_for(self, directory: Path | str | None, cuda_graph: bool = False) -> TacticCache:
        """The tactic cache kept in ``directory`` (None: the in-memory one), made on first use; one
        object per directory and timing, this tuner's default cache included. ``cuda_graph``: for
        deployments that replay CUDA graphs, whose candidates are timed as graph replays; its
        environment (and so its file) differs, so eager-timed and graph-timed winners never mix."""
        key = (resolve_dir(directory), cuda_graph)
        found = self.caches.get(key)
        if found is None:
            env = environment(self.settings_for(cuda_graph).mode)
            found = self.caches[key] = TacticCache(key[0], env, on_change=self._forget_memos)
        return found

    def settings_for(self, cuda_graph: bool) -> ProfilerSettings:
        """This tuner's profiler settings, timing CUDA graph replays or not."""
        return replace(self.settings, cuda_graph=cuda_graph)

    def generator(self, device: torch.device) -> torch.Generator:
        """This tuner's generator for ``device``, seeded once: profiling never draws from the user's."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = new_generator(device)
        return gen

    def state(self, name: str, make: Callable[[], Any]) -> Any:
        """This tuner's object called ``name``, made by ``make()`` on first use: where ops keep what
        they learn from real calls (e.g. MoE routing frequencies)."""
        found = self._state.get(name)
        if found is None:
            found = self._state[name] = make()
        return found

    # -- the hot path ----------------------------------------------------------------------------

    def choose_one(
        self,
        op: str,
        runners: Runners,
        config: TuningConfig,
        inputs: Inputs,
        *,
        tune: bool | None = None,
        distributed: str | None = None,
    ) -> Choice:
        """The (runner, tactic) to run ``inputs`` with. ``runners[0]`` with tactic -1 is the default.

        Cache hit: returned at once, nothing made or launched. Miss with tuning allowed
        (``ft.autotune()``, else ``tune``, else the tuner's mode): the bucket is profiled once and the
        winner cached. Miss otherwise, or while a CUDA graph is being captured: the default.
        Pass the same ``runners`` and ``config`` objects each call for the fastest path.
        ``distributed``: the strategy across ranks (``tuner/distributed.py``; None: ``$FLASHTUNE_DISTRIBUTED``).
        """
        return self.choose_cached(op, runners, config, inputs, tune=tune, distributed=distributed)[0]

    def choose_cached(
        self,
        op: str,
        runners: Runners,
        config: TuningConfig,
        inputs: Inputs,
        *,
        tune: bool | None = None,
        cache: TacticCache | None = None,
        distributed: str | None = None,
    ) -> tuple[Choice, bool]:
        """``choose_one`` against ``cache`` (default: this tuner's), and whether the answer came
        from the cache (False for a fallback)."""
        cache = self.cache if cache is None else cache
        alias = self._fast.get(id(runners))
        if alias is None or alias.config is not config or alias.ctx.op != op or alias.cache is not cache:
            alias = self._alias(op, runners, config, cache)
        sig = signature(inputs)
        hit = alias.memo.get(sig)
        if hit is not None:
            self.stats.hits += 1
            return hit, True
        return self._choose_slow(alias, sig, inputs, tune, distributed)

    # -- everything else -----------------------------------------------------------------------

    def _alias(self, op: str, runners: Sequence[TunableRunner], config: TuningConfig, cache: TacticCache) -> Alias:
        names = tuple(getattr(r, "name", None) for r in runners)
        ctx = self._contexts.get((op, names, id(config)))
        if ctx is None or ctx.config is not config:
            if len(self._contexts) >= _ALIAS_LIMIT:
                self._contexts.clear()
            ctx = self._contexts[(op, names, id(config))] = OpContext(op, runners, config)
        if len(self._fast) >= _ALIAS_LIMIT:
            self._fast.clear()
        alias = self._fast[id(runners)] = Alias(ctx, runners, config, cache)
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
        self, alias: Alias, sig: tuple, inputs: Sequence[Any], tune: bool | None, distributed: str | None = None
    ) -> tuple[tuple[TunableRunner, Tactic], bool]:
        """The choice for a signature not memoized yet, and whether it came from the cache (and was
        memoized) rather than being the default's fallback."""
        ctx, runners = alias.ctx, alias.runners
        allowed = self._tuning_allowed(tune)
        if not allowed and sig in alias.missed:  # only ever filled outside lockstep
            return self._fallback(runners)
        bucket = ctx.config.bucket_of(inputs)
        if 0 in bucket:  # an empty call: nothing to tune, the default handles it (on every rank)
            return (runners[0], DEFAULT_TACTIC), False
        key = ctx.cache_key(inputs, bucket)
        if teams.resolve(distributed) == "lockstep":
            choice = self._agreed_choice(alias, key, inputs, bucket, allowed)
        else:
            choice = self._cached_choice(alias, sig, key, inputs, bucket, allowed)
        if choice is None:
            return self._fallback(runners)
        result = (runners[choice[0]], choice[1])
        bounded_put(alias.memo, sig, result)
        return result, True

    def _cached_choice(
        self, alias: Alias, sig: tuple, key: Key, inputs: Sequence[Any], bucket: tuple[int, ...], allowed: bool
    ) -> tuple[int, Tactic] | None:
        """This process's choice for ``key``: from the cache, else tuned here when allowed; None:
        the default (tuning is off, or a CUDA graph is being captured), said once per key."""
        ctx, runners, cache = alias.ctx, alias.runners, alias.cache
        choice = self._lookup(ctx, cache, key, inputs, bucket)
        if choice is not None:
            self.stats.hits += 1
            log.debug("flashtune: %s bucket %s from the cache: %s[%r]", ctx.op, bucket, ctx.names[choice[0]], choice[1])
            return choice
        capturing = (
            any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs) and torch.cuda.is_current_stream_capturing()
        )
        if not allowed or capturing:
            if not capturing:
                bounded_put(alias.missed, sig)
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
            return None
        with self._profile_lock:
            choice = self._lookup(ctx, cache, key, inputs, bucket)  # another thread may have tuned it
            if choice is None:
                return self._tune(ctx, runners, cache, key, inputs, bucket)
            self.stats.hits += 1
            return choice

    def _agreed_choice(
        self, alias: Alias, key: Key, inputs: Sequence[Any], bucket: tuple[int, ...], allowed: bool
    ) -> tuple[int, Tactic] | None:
        """The choice the ranks of the lockstep team agreed for ``key``, settled the first time this
        process needs it (``distributed.settle``) and served from then on, whatever this rank's
        cache later holds; None: every rank runs the default, uncached."""
        ctx, runners, cache = alias.ctx, alias.runners, alias.cache
        found = self._agreed.get((id(cache), key))
        if found is not None:
            self.stats.hits += found[0] is not None
            return found[0]
        with self._profile_lock:
            choice = self._lookup(ctx, cache, key, inputs, bucket)
            held = cache.get(key) if choice is not None else None
            team = teams.team()
            what = f"settling {ctx.op} bucket {list(bucket)}"

            def offers(e: Entry) -> bool:
                return self._offers(ctx, inputs, bucket, ctx.names.index(e.runner), e.tactic)[0]

            decision = teams.settle(team, what, key, held, allowed, offers)
            if decision == "tune":
                choice = self._tune(ctx, runners, cache, key, inputs, bucket, team)
            elif decision == "default":
                log.info(
                    "flashtune: %s bucket %s: tuning is off on some rank; every rank uses the default", ctx.op, bucket
                )
                choice = None
            else:
                if held is None or (held.runner, held.tactic) != (decision.runner, decision.tactic):
                    cache.put(key, replace(decision))
                self._validated.add((id(cache), key))
                self.stats.hits += 1
                choice = (ctx.names.index(decision.runner), decision.tactic)
            self._agreed[(id(cache), key)] = (choice,)
        return choice

    def _offers(
        self, ctx: OpContext, inputs: Sequence[Any], bucket: tuple[int, ...], idx: int, tactic: Tactic
    ) -> tuple[bool, Exception | None]:
        """Whether runner ``idx`` offers ``tactic`` for this bucket (the default always is), and the
        error of a runner that could not even list its tactics."""
        if idx == 0 and tactic == DEFAULT_TACTIC:
            return True, None
        profile = BucketProfile(bucket, tuple(bucket_shapes(inputs, ctx.config, bucket)))
        try:
            return tactic in {canonical_tactic(t) for t in ctx.runners[idx].get_valid_tactics(inputs, profile)}, None
        except Exception as e:  # a runner that cannot even list tactics cannot be trusted
            return False, e

    def _lookup(
        self, ctx: OpContext, cache: TacticCache, key: Key, inputs: Sequence[Any], bucket: tuple[int, ...]
    ) -> tuple[int, Tactic] | None:
        """The cached choice for ``key``, checked (once per process) to name a tactic its runner
        still offers; an entry that does not is dropped from the cache, on disk too, with a warning."""
        entry = cache.get(key)
        if entry is None:
            return None
        idx = ctx.names.index(entry.runner)
        if (id(cache), key) not in self._validated:
            offered, error = self._offers(ctx, inputs, bucket, idx, entry.tactic)
            if not offered:
                log.warning(
                    "flashtune: dropping cached %s tactic %r of %s for bucket %s: not offered by the runner%s",
                    ctx.op,
                    entry.tactic,
                    entry.runner,
                    bucket,
                    f" ({error})" if error else "",
                )
                cache.drop(key)
                return None
            self._validated.add((id(cache), key))
        return idx, entry.tactic

    def _tune(
        self,
        ctx: OpContext,
        runners: Sequence[TunableRunner],
        cache: TacticCache,
        key: Key,
        inputs: Sequence[Any],
        bucket: tuple[int, ...],
        team: teams.Team | None = None,
    ) -> tuple[int, Tactic]:
        """Profile this bucket (``tune.tune_bucket``; with a lockstep ``team``, together with its
        ranks), cache its winner and return it."""
        start = time.perf_counter()
        self.stats.misses += 1
        for listener in list(self.listeners):
            listener(ctx.op, bucket, None)
        settings = self.settings_for(cache.env.get("timing", "").endswith("+cuda_graph"))
        # Outside the caller's dispatch modes: profiling is not part of their computation, and a
        # Python mode (AOTAutograd runs a compiled graph's first call under one) slows every ATen
        # call several-fold, unevenly across candidates, which would decide the pick.
        # every bucket of a weight reads one kind of copy; across a lockstep team what each rank holds
        # may differ, and its candidate list must not, so there the weight cache alone enforces it
        layout = None if team is not None else self._layout(ctx, cache, key) or self.weights.held_kind(inputs)
        with _disable_current_modes():
            tuned = tune_bucket(
                ctx,
                runners,
                inputs,
                bucket,
                settings,
                self.min_gain,
                self.generator,
                team,
                self.weights,
                layout,
                self.copy_min_gain,
            )
        kind = runners[tuned.runner].copy_kind(tuned.tactic)
        if kind is not None:
            self.weights.chose(inputs, kind)
        self.stats.synthesized += tuned.synthesized
        self.stats.profiles += tuned.timed
        self.stats.rejected += len(tuned.entry.rejected)
        elapsed = time.perf_counter() - start
        tuned.entry.tune_s = elapsed
        cache.put(key, tuned.entry)
        self._validated.add((id(cache), key))
        self.stats.tuning_seconds += elapsed
        e = tuned.entry
        log.info(
            "flashtune: tuned %s bucket %s in %.2fs: %s[%r] %.1f us (default %.1f us, %d timed)",
            ctx.op,
            bucket,
            elapsed,
            e.runner,
            e.tactic,
            e.time_s * 1e6,
            e.default_s * 1e6,
            e.timed,
        )
        for listener in list(self.listeners):
            listener(ctx.op, bucket, e)
        return tuned.runner, tuned.tactic

    def _layout(self, ctx: OpContext, cache: TacticCache, key: Key) -> str | None:
        """The kind of weight copy this key's shape uses in its other buckets (the first cached
        winner that reads one), so that every bucket of a weight reads one copy of it."""
        for other, e in cache.snapshot().items():
            if other[:4] == key[:4] and other != key and e.runner in ctx.names:
                kind = ctx.runners[ctx.names.index(e.runner)].copy_kind(e.tactic)
                if kind is not None:
                    return kind
        return None

    def fallback_of(
        self, op: str, runners: Runners, config: TuningConfig, inputs: Inputs, cache: TacticCache | None = None
    ) -> tuple[TunableRunner, Tactic, float]:
        """For a call whose cached choice reads a weight copy: the bucket's fastest tactic that
        needs none (the default where the cache names none, or names one no longer offered), and
        the seconds per call the chosen tactic saves over it."""
        cache = self.cache if cache is None else cache
        ctx = self._alias(op, runners, config, cache).ctx
        bucket = ctx.config.bucket_of(inputs)
        entry = cache.get(ctx.cache_key(inputs, bucket))
        if entry is None:
            return runners[0], DEFAULT_TACTIC, 0.0
        if entry.fallback_runner in ctx.names:
            idx = ctx.names.index(entry.fallback_runner)
            if self._offers(ctx, inputs, bucket, idx, entry.fallback_tactic)[0]:
                return runners[idx], entry.fallback_tactic, max(0.0, entry.fallback_s - entry.time_s)
        return runners[0], DEFAULT_TACTIC, max(0.0, entry.default_s - entry.time_s)

    def _forget_memos(self) -> None:
        """Called on any change to one of this tuner's caches: every memoized answer is dropped."""
        for alias in list(self._fast.values()):
            alias.memo.clear()
            alias.missed.clear()
        self._validated.clear()
        for site in list(self.sites.values()):
            site.memo.clear()

    # -- reporting -----------------------------------------------------------------------------

    def tactics(self) -> list[dict[str, Any]]:
        """One record per cached winner (on disk too), of every cache this tuner uses: op, shape
        key, bucket, kernel, tactic, times, speedup, and the cache's directory (None: in memory);
        for a winner that reads a weight copy, the ``fallback`` kernel and tactic that run where
        the copy is refused (``tuner/weights.py``)."""
        out = []
        for cache in list(self.caches.values()):
            directory = str(cache.directory) if cache.directory is not None else None
            for (op, runners, static, extras, bucket), e in cache.snapshot().items():
                record = dict(op=op, shape_key=static, extras=extras, bucket=bucket, kernel=e.runner, tactic=e.tactic)
                record.update(time_s=e.time_s, default_s=e.default_s, speedup=e.speedup, candidates=list(runners))
                record.update(timed=e.timed, rejected=list(e.rejected), tune_s=e.tune_s, cache_dir=directory)
                if e.fallback_runner:  # the winner reads a weight copy: what runs where it is refused
                    record.update(
                        fallback=e.fallback_runner, fallback_tactic=e.fallback_tactic, fallback_s=e.fallback_s
                    )
                record.update(timing=cache.env.get("timing"))
                out.append(record)
        return out

    def stats_dict(self) -> dict[str, Any]:
        return asdict(self.stats)

    def reset_stats(self) -> None:
        """Zero every counter in place (sites hold a reference to this Stats)."""
        for f in fields(Stats):
            setattr(self.stats, f.name, 0.0 if f.type == "float" else 0)
