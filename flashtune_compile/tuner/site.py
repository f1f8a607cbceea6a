"""A tuned call site: an op call whose static metadata is fixed, such as a node of a compiled graph.

Its hits (``run``) cost reading the dynamic sizes, one dict lookup keyed by them and the call: Dynamo's guards already
fix every static shape, dtype and device of a compiled graph's nodes, so nothing else can change
between calls. The first call of each new size goes through ``AutoTuner.choose_cached``
(cache-first, tuning a never-seen bucket), and a cached answer is remembered per size. A choice
that reads a weight copy runs behind ``WithFallback``: for a weight whose copy the weight cache
refuses, the bucket's fastest tactic that needs none runs instead. A site belongs to one tuner
(``AutoTuner.sites``), which drops its memo whenever a cache changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .buckets import TuningConfig
from .keys import bounded_put
from .runner import Tactic, TunableRunner
from .weights import CopyDenied, CopyMissing, WeightCache

if TYPE_CHECKING:
    from .autotuner import AutoTuner
    from .cache import TacticCache


class TunedSite:
    """``run(inputs)`` (and ``choose(inputs)``) for one site. Requires every call to have the same
    static metadata (shapes outside the dynamic dims, dtypes, devices); runners must be correct for
    any strides."""

    __slots__ = (
        "op",
        "runners",
        "config",
        "tune",
        "on_new",
        "tuner",
        "cache",
        "distributed",
        "_readers",
        "memo",
        "_stats",
    )

    def __init__(
        self,
        tuner: AutoTuner,
        op: str,
        runners: Sequence[TunableRunner],
        config: TuningConfig,
        tune: bool | None = None,
        on_new: Callable[[Sequence[Any]], None] | None = None,
        cache: TacticCache | None = None,
        distributed: str | None = None,
    ) -> None:
        """``on_new(inputs)`` runs on each call of a size not answered from the memo, before the
        tuner is asked (e.g. input checks that a site's fixed static shapes make once-per-size).
        ``cache``: the tactic cache to choose from (default: the tuner's). ``distributed``: the
        strategy across ranks (None: ``$FLASHTUNE_DISTRIBUTED``)."""
        self.tuner, self.op, self.runners, self.config, self.tune = tuner, op, tuple(runners), config, tune
        self.on_new, self.cache = on_new, cache if cache is not None else tuner.cache
        self.distributed = distributed
        self._readers = tuple((spec.input_idx[0], spec.dim_idx[0]) for spec in config.dynamic)
        # sizes -> the cached choice (runner, tactic), and how a warm call runs it: fn(inputs, tactic)
        # (fn = runner.forward), or fn(*inputs) when ``unpacked`` (fn = runner.unpacked(tactic))
        self.memo: dict[Any, tuple[TunableRunner, Tactic, Callable[..., Any], bool]] = {}
        self._stats = tuner.stats

    def run(self, inputs: Sequence[Any]) -> Any:
        """The op's result for ``inputs`` by the chosen (runner, tactic). The warm path: read the
        dynamic sizes, one dict lookup, the kernel call."""
        readers = self._readers  # self._sizes(inputs), inlined: this is the warm path
        if not readers:
            sizes: Any = ()
        elif len(readers) == 1:
            i, d = readers[0]
            sizes = inputs[i].shape[d]
        else:
            sizes = tuple([inputs[i].shape[d] for i, d in readers])
        hit = self.memo.get(sizes)
        if hit is not None:
            self._stats.hits += 1
            _, tactic, fn, unpacked = hit
            return fn(*inputs) if unpacked else fn(inputs, tactic)
        runner, tactic = self._choose_new(inputs, sizes)
        hit = self.memo.get(sizes)
        if hit is not None and hit[0] is runner and hit[1] == tactic:
            _, tactic, fn, unpacked = hit
            return fn(*inputs) if unpacked else fn(inputs, tactic)
        return runner(inputs, tactic)

    def choose(self, inputs: Sequence[Any]) -> tuple[TunableRunner, Tactic]:
        """The (runner, tactic) for ``inputs``: from the memo, else the tuner (cache first)."""
        sizes = self._sizes(inputs)
        hit = self.memo.get(sizes)
        if hit is not None:
            self._stats.hits += 1
            return hit[0], hit[1]
        return self._choose_new(inputs, sizes)

    def _sizes(self, inputs: Sequence[Any]) -> Any:
        """The dynamic sizes of ``inputs``: one int for one axis, else a tuple."""
        readers = self._readers
        if not readers:
            return ()
        if len(readers) == 1:
            i, d = readers[0]
            return inputs[i].shape[d]
        return tuple([inputs[i].shape[d] for i, d in readers])

    def _choose_new(self, inputs: Sequence[Any], sizes: Any) -> tuple[TunableRunner, Tactic]:
        if self.on_new is not None:
            self.on_new(inputs)
        result, cached = self.tuner.choose_cached(
            self.op, self.runners, self.config, inputs, tune=self.tune, cache=self.cache, distributed=self.distributed
        )
        if cached:
            runner, tactic = result
            direct = runner.unpacked(tactic)
            call = (direct, True) if direct is not None else (runner.forward, False)
            if runner.copy_kind(tactic) is not None:
                primary = direct if direct is not None else _forward_of(runner, tactic)
                other, other_tactic, gain = self.tuner.fallback_of(
                    self.op, self.runners, self.config, inputs, self.cache
                )
                fallback = other.unpacked(other_tactic) or _forward_of(other, other_tactic)
                wait = not self.config.weights_change  # training: the copy was timed re-made per call
                call = (WithFallback(self.tuner.weights, primary, fallback, gain, wait), True)
            bounded_put(self.memo, sizes, (runner, tactic, *call))
        return result


def _forward_of(runner: TunableRunner, tactic: Tactic) -> Callable[..., Any]:
    return lambda *inputs: runner.forward(inputs, tactic)


class WithFallback:
    """A warm call of a tactic that reads weight copies: ``primary(*inputs)`` where they are held;
    else each missing copy is asked for in turn (priced at ``gain`` seconds per call:
    ``WeightCache.admit``) and, until they are made or when one is refused, ``fallback(*inputs)``,
    a tactic that needs none. A call waits once: the first copy waits for a few calls, and the
    call's further copies (an MoE layer's down weights after its gate/up) are decided at once.
    Without ``wait`` (weights that change every call, whose tuning timed the copy made again each
    call), every copy is decided at once."""

    __slots__ = ("store", "primary", "fallback", "gain", "wait")

    def __init__(
        self,
        store: WeightCache,
        primary: Callable[..., Any],
        fallback: Callable[..., Any],
        gain: float,
        wait: bool = True,
    ) -> None:
        self.store, self.primary, self.fallback, self.gain, self.wait = store, primary, fallback, gain, wait

    def __call__(self, *inputs: Any) -> Any:
        try:
            return self.primary(*inputs)
        except CopyDenied:
            pass
        except CopyMissing as miss:
            request, wait = miss.request, self.wait
            while self.store.admit(request, self.gain, wait):
                try:
                    return self.primary(*inputs)
                except CopyDenied:
                    break
                except CopyMissing as again:  # a second copy (a bias, an MoE layer's down weights)
                    request, wait = again.request, False
        self.store.fallback_calls += 1
        return self.fallback(*inputs)
