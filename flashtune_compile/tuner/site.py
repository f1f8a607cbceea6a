"""A tuned call site: an op call whose static metadata is fixed, such as a node of a compiled graph.

Its hits cost reading the dynamic sizes and one dict lookup keyed by them: Dynamo's guards already
fix every static shape, dtype and device of a compiled graph's nodes, so nothing else can change
between calls. The first call of each new size goes through ``AutoTuner.choose_cached``
(cache-first, tuning a never-seen bucket), and a cached answer is remembered per size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .autotuner import AutoTuner
from .buckets import TuningConfig
from .runner import Tactic, TunableRunner


class TunedSite:
    """``choose(inputs)`` for one site. Requires every call to have the same static metadata
    (shapes outside the dynamic dims, dtypes, devices); runners must be correct for any strides."""

    __slots__ = ("op", "runners", "config", "tune", "on_new", "_readers", "memo", "_stats")

    def __init__(
        self,
        op: str,
        runners: Sequence[TunableRunner],
        config: TuningConfig,
        tune: bool | None = None,
        on_new: Callable[[Sequence[Any]], None] | None = None,
    ) -> None:
        """``on_new(inputs)`` runs on each call of a size not answered from the memo, before the
        tuner is asked (e.g. input checks that a site's fixed static shapes make once-per-size)."""
        self.op, self.runners, self.config, self.tune, self.on_new = op, tuple(runners), config, tune, on_new
        self._readers = tuple((spec.input_idx[0], spec.dim_idx[0]) for spec in config.dynamic)
        self.memo: dict[Any, tuple[TunableRunner, Tactic]] = {}
        self._stats = AutoTuner.get().stats

    @staticmethod
    def lookup(key: str, build: Callable[[], TunedSite]) -> TunedSite:
        """The process's site for ``key``, built on first use."""
        site = AutoTuner.sites.get(key)
        if site is None:
            site = AutoTuner.sites[key] = build()
        return site

    def choose(self, inputs: Sequence[Any]) -> tuple[TunableRunner, Tactic]:
        readers = self._readers
        if len(readers) == 1:
            i, d = readers[0]
            sizes: Any = inputs[i].shape[d]
        else:
            sizes = tuple([inputs[i].shape[d] for i, d in readers])
        hit = self.memo.get(sizes)
        if hit is not None:
            self._stats.hits += 1  # a memo entry implies this tuner's stats: a new tuner clears memos
            return hit
        if self.on_new is not None:
            self.on_new(inputs)
        tuner = AutoTuner.get()
        self._stats = tuner.stats
        result, cached = tuner.choose_cached(self.op, self.runners, self.config, inputs, tune=self.tune)
        if cached:
            if len(self.memo) >= 8192:
                self.memo.clear()
            self.memo[sizes] = result
        return result
