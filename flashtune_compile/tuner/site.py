"""A tuned call site: an op call whose static metadata is fixed, such as a node of a compiled graph.

Its hits cost reading the dynamic sizes and one dict lookup keyed by them: Dynamo's guards already
fix every static shape, dtype and device of a compiled graph's nodes, so nothing else can change
between calls. The first call of each new size goes through ``AutoTuner.choose_cached``
(cache-first, tuning a never-seen bucket), and a cached answer is remembered per size. A site
belongs to one tuner (``AutoTuner.sites``), which drops its memo whenever a cache changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .buckets import TuningConfig
from .keys import bounded_put
from .runner import Tactic, TunableRunner

if TYPE_CHECKING:
    from .autotuner import AutoTuner
    from .cache import TacticCache


class TunedSite:
    """``choose(inputs)`` for one site. Requires every call to have the same static metadata
    (shapes outside the dynamic dims, dtypes, devices); runners must be correct for any strides."""

    __slots__ = ("op", "runners", "config", "tune", "on_new", "tuner", "cache", "_readers", "memo", "_stats")

    def __init__(
        self,
        tuner: AutoTuner,
        op: str,
        runners: Sequence[TunableRunner],
        config: TuningConfig,
        tune: bool | None = None,
        on_new: Callable[[Sequence[Any]], None] | None = None,
        cache: TacticCache | None = None,
    ) -> None:
        """``on_new(inputs)`` runs on each call of a size not answered from the memo, before the
        tuner is asked (e.g. input checks that a site's fixed static shapes make once-per-size).
        ``cache``: the tactic cache to choose from (default: the tuner's)."""
        self.tuner, self.op, self.runners, self.config, self.tune = tuner, op, tuple(runners), config, tune
        self.on_new, self.cache = on_new, cache if cache is not None else tuner.cache
        self._readers = tuple((spec.input_idx[0], spec.dim_idx[0]) for spec in config.dynamic)
        self.memo: dict[Any, tuple[TunableRunner, Tactic]] = {}
        self._stats = tuner.stats

    def choose(self, inputs: Sequence[Any]) -> tuple[TunableRunner, Tactic]:
        readers = self._readers
        if len(readers) == 1:
            i, d = readers[0]
            sizes: Any = inputs[i].shape[d]
        else:
            sizes = tuple([inputs[i].shape[d] for i, d in readers])
        hit = self.memo.get(sizes)
        if hit is not None:
            self._stats.hits += 1
            return hit
        if self.on_new is not None:
            self.on_new(inputs)
        result, cached = self.tuner.choose_cached(
            self.op, self.runners, self.config, inputs, tune=self.tune, cache=self.cache
        )
        if cached:
            bounded_put(self.memo, sizes, result)
        return result
