"""Call sites of the tunable ops: what the graph pass bakes into each call, and its candidates.

Every ``flashtune`` op takes ``site``, a JSON string naming the op, which dims of its tuning
inputs are dynamic (with the bounds of their bucket ladder), its static signature, the tuning
mode, the kernel families allowed and (for MoE) the routing to profile with. At run time the op
looks its site up (built once per process), asks it for a (runner, tactic) and runs it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..tuner import routing as _routing
from ..tuner.autotuner import AutoTuner
from ..tuner.buckets import DynamicDim, TuningConfig
from ..tuner.runner import TunableRunner
from ..tuner.site import TunedSite
from ..tuner.synth import private_generator

KERNEL_FAMILIES = ("aten", "triton", "cuda", "cpu")

# op -> fn(kernel families) -> candidate runners, ATen's (the default) first; filled by each op module
CANDIDATES: dict[str, Callable[[frozenset], tuple[TunableRunner, ...]]] = {}
# op -> (index of topk_ids, index of topk_weights) among its inputs, for ops tuned on synthetic routing
ROUTED_INPUTS: dict[str, tuple[int, int]] = {}
# op -> fn(spec, inputs) run on a site's first call of each size (TunedSite.on_new)
ON_NEW_SIZE: dict[str, Callable[[SiteSpec, Sequence[Any]], None]] = {}
_runner_sets: dict[tuple, tuple[TunableRunner, ...]] = {}


def runners_for(op: str, kernels: Sequence[str]) -> tuple[TunableRunner, ...]:
    """The candidate runners of ``op`` restricted to ``kernels`` (same tuple object each time)."""
    key = (op, frozenset(kernels))
    found = _runner_sets.get(key)
    if found is None:
        found = _runner_sets[key] = CANDIDATES[op](key[1])
    return found


@dataclass(frozen=True)
class SiteSpec:
    """What the graph pass knows of one call site, serialized into the op's ``site`` argument.

    ``axes``: per dynamic axis, the (input, dim) positions it occupies in the op's tuning inputs
    and the (min, max) sizes bounding its bucket ladder. ``sig``: the static signature (shapes with
    -1 for dynamic dims, dtypes), which keeps sites of different shapes apart. ``routing``: the
    synthetic routing MoE ops are profiled with (``tuner.routing``).
    """

    op: str
    axes: tuple[tuple[tuple[tuple[int, int], ...], int, int], ...]
    sig: tuple
    ladder: Any = "hybrid"
    tune: str | None = None
    kernels: tuple[str, ...] = ("aten",)
    routing: str = "zipf"

    def encode(self) -> str:
        return json.dumps(
            [self.op, self.axes, self.sig, self.ladder, self.tune, list(self.kernels), self.routing],
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str) -> SiteSpec:
        op, axes, sig, ladder, tune, kernels, routing = json.loads(text)
        axes = tuple((tuple((int(i), int(d)) for i, d in dims), int(lo), int(hi)) for dims, lo, hi in axes)
        return cls(op, axes, sig, ladder if isinstance(ladder, str) else tuple(ladder), tune, tuple(kernels), routing)

    def build(self) -> TunedSite:
        dyn = tuple(
            DynamicDim(
                input_idx=tuple(i for i, _ in dims),
                dim_idx=tuple(d for _, d in dims),
                buckets=self.ladder,
                min_size=lo,
                max_size=hi,
            )
            for dims, lo, hi in self.axes
        )
        inits = {}
        if self.op in ROUTED_INPUTS:
            ids_at, weights_at = ROUTED_INPUTS[self.op]
            num_experts = self.sig[3][0][0]  # w1 [E, 2I, H]
            inits = _routing.initializers(
                self.routing, num_experts, ids_at, weights_at, lambda: private_generator(torch.device("cpu"))
            )
        tune = None if self.tune is None else self.tune == "auto"
        hook = ON_NEW_SIZE.get(self.op)
        return TunedSite(
            self.op,
            runners_for(self.op, self.kernels),
            TuningConfig(dynamic=dyn, initializers=inits),
            tune,
            functools.partial(hook, self) if hook else None,
        )


_sites = AutoTuner.sites


def site_of(site: str) -> TunedSite:
    """The process's TunedSite for this ``site`` string, built on first use."""
    return _sites.get(site) or TunedSite.lookup(site, lambda: SiteSpec.decode(site).build())


def run(site: str, inputs: tuple) -> Any:
    """Run ``inputs`` with the tactic this site chooses for them (cache first, tuning a new bucket)."""
    runner, tactic = site_of(site).choose(inputs)
    return runner.forward(inputs, tactic)
