"""Call sites of the tunable ops: what a graph pass bakes into each call, and how it runs.

Every ``flashtune`` op takes ``site``, a string (JSON, made safe as a C++ literal) naming the op,
which dims of its tuning inputs are dynamic (with the bounds of their bucket ladder), its static
signature, and the options it was compiled with (tuning mode, ladder, kernel families, MoE
routing, tactic cache). At run time the op looks its site up in the process tuner (built there on
first use from the op's spec), asks it for a (runner, tactic) and runs it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..kernels import FAMILIES
from ..tuner.autotuner import AutoTuner
from ..tuner.buckets import DynamicDim, TuningConfig
from ..tuner.runner import DefaultOnly, TunableRunner
from ..tuner.site import TunedSite
from .registry import OPS
from .spec import OpSpec

DEFAULT_CACHE = ""  # a site's cache_dir: "" is the tuner's default cache, None the in-memory one
Axes = tuple[tuple[tuple[tuple[int, int], ...], int, int], ...]  # ((positions, min, max), ...)


@dataclass(frozen=True)
class SiteOptions:
    """The compile options a site carries (see the backend's options). ``max_tokens`` bounds the
    dynamic axes when a site is made; the axes then hold it, so it is not encoded again."""

    ladder: Any = "hybrid"
    max_tokens: int = 8192
    tune: str | None = None
    kernels: tuple[str, ...] = FAMILIES
    routing: str = "zipf"
    cache_dir: str | None = DEFAULT_CACHE
    cuda_graph: bool = False  # the inner compiler replays CUDA graphs: time candidates as graph replays
    distributed: str | None = None  # strategy across ranks (tuner/distributed.py); None: $FLASHTUNE_DISTRIBUTED
    training: bool = False  # a training graph: its weights change between calls (TuningConfig.weights_change)


@dataclass(frozen=True)
class SiteSpec:
    """One call site, serialized into the op's ``site`` argument.

    ``axes``: per dynamic axis, the (input, dim) positions it occupies in the op's tuning inputs
    and the (min, max) sizes bounding its bucket ladder. ``sig``: the static signature (shapes with
    -1 for dynamic dims, dtypes), which keeps sites of different shapes apart.
    """

    op: str
    axes: Axes
    sig: tuple
    options: SiteOptions = SiteOptions()

    def encode(self) -> str:
        o = self.options
        fields = [self.op, self.axes, self.sig, o.ladder, o.tune, o.kernels, o.routing, o.cache_dir, o.cuda_graph]
        fields.append(o.distributed)
        if o.training:  # sites of inference graphs read as before the option existed
            fields.append(True)
        return _literal_safe(json.dumps(fields, separators=(",", ":")))  # tuples become lists

    @classmethod
    def decode(cls, text: str) -> SiteSpec:
        # plain JSON (with double quotes): a site that code compiled by an earlier version names
        fields = json.loads(text if '"' in text else _from_literal_safe(text))
        op, axes, sig, ladder, tune, kernels, routing, cache_dir, cuda_graph = fields[:9]
        distributed = fields[9] if len(fields) > 9 else None  # sites written before the option existed
        training = bool(fields[10]) if len(fields) > 10 else False
        axes = tuple((tuple((int(i), int(d)) for i, d in dims), int(lo), int(hi)) for dims, lo, hi in axes)
        ladder = ladder if isinstance(ladder, str) else tuple(ladder)
        options = SiteOptions(
            ladder=ladder,
            tune=tune,
            kernels=tuple(kernels),
            routing=routing,
            cache_dir=cache_dir,
            cuda_graph=cuda_graph,
            distributed=distributed,
            training=training,
        )
        return cls(op, axes, sig, options)

    def build(self, tuner: AutoTuner) -> TunedSite:
        """The site, as ``tuner`` runs it: the op's candidates allowed here, its bucket axes, its
        routing synthesis and once-per-size checks, and the cache its options name."""
        spec, o = OPS[self.op], self.options
        dyn = tuple(
            DynamicDim(tuple(i for i, _ in dims), tuple(d for _, d in dims), o.ladder, max_size=hi, min_size=lo)
            for dims, lo, hi in self.axes
        )
        inits = spec.routing.initializers(o.routing, self.sig, tuner) if spec.routing is not None else {}
        learn = spec.routing is not None and o.routing == "learned"
        on_new = None
        if spec.check is not None or learn:

            def on_new(inputs: Sequence[Any]) -> None:
                if spec.check is not None:
                    spec.check(*inputs)
                if learn:
                    spec.routing.observe(tuner, inputs)

        directory = tuner.cache.directory if o.cache_dir == DEFAULT_CACHE else o.cache_dir
        cache = tuner.cache_for(directory, o.cuda_graph)
        tune = None if o.tune is None else o.tune == "auto"
        runners = runners_for(self.op, o.kernels, tuner)
        config = TuningConfig(dynamic=dyn, initializers=inits, weights_change=o.training)
        return TunedSite(tuner, self.op, runners, config, tune, on_new, cache, o.distributed)


# A site string reaches generated code as a string literal, which Inductor's C++ wrapper
# (``cpp_wrapper``) writes between double quotes without escaping anything: so the JSON's double
# quotes become single quotes, and the characters that would then be ambiguous or break a C++
# literal (a single quote, a backslash, and % itself) are written as %27, %5C and %25.
_SAFE = {"%": "%25", "\\": "%5C", "'": "%27", '"': "'"}
_UNSAFE = {v: k for k, v in _SAFE.items()}


def _literal_safe(text: str) -> str:
    """``text`` with no double quote or backslash; ``_from_literal_safe`` gives it back."""
    return re.sub(r"[%\\'\"]", lambda m: _SAFE[m.group()], text)


def _from_literal_safe(text: str) -> str:
    return re.sub(r"%25|%5C|%27|'", lambda m: _UNSAFE[m.group()], text)


def site_string(spec: OpSpec, axes: Axes, shapes: Sequence[Any], dtypes: Sequence[Any], options: SiteOptions) -> str:
    """The ``site`` argument of a call of ``spec`` whose tuning inputs have these shapes (ints, or
    SymInts for dims in ``axes``; None for non-tensors) and dtypes, with these dynamic ``axes``."""
    dynamic = {pos for positions, _, _ in axes for pos in positions}
    sig = []
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        if shape is None:
            sig.append(None)
        else:
            dims = [-1 if (i, d) in dynamic else int(s) for d, s in enumerate(shape)]
            sig.append([dims, str(dtype).removeprefix("torch.")])
    return SiteSpec(spec.name, axes, tuple(sig), options).encode()


def runners_for(op: str, kernels: Sequence[str], tuner: AutoTuner | None = None) -> tuple[TunableRunner, ...]:
    """The candidate runners of ``op`` whose family is in ``kernels``, its ATen default first (that
    one's own variants only with "aten"). One tuple per tuner and family set, built on first use."""
    tuner = tuner or AutoTuner.get()
    key = (op, frozenset(kernels))
    found = tuner.runner_sets.get(key)
    if found is None:
        spec = OPS[op]
        default, *others = spec.candidates
        first = default.runner.for_op(spec)
        runners = [first if default.family in key[1] else DefaultOnly(first)]
        runners += [c.runner.for_op(spec) for c in others if c.family in key[1]]
        found = tuner.runner_sets[key] = tuple(runners)
    return found


def site_of(site: str) -> TunedSite:
    """The process tuner's TunedSite for this ``site`` string, built on first use."""
    tuner = AutoTuner.get()
    found = tuner.sites.get(site)
    if found is None:
        found = tuner.sites[site] = SiteSpec.decode(site).build(tuner)
    return found


def run(site: str, inputs: Sequence[Any]) -> Any:
    """Run ``inputs`` with the tactic this site chooses for them (cache first, tuning a new bucket).
    The warm path: one dict lookup for the site, one size read and one dict lookup for the choice."""
    tuner = AutoTuner._instance
    found = tuner.sites.get(site) if tuner is not None else None
    return (found or site_of(site)).run(inputs)
