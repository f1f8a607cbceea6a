"""A runner whose tactics each run as one bound function, the warm path of the CPU kernels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...tuner.autotuner import AutoTuner
from ...tuner.runner import DEFAULT_TACTIC, Tactic, TunableRunner
from ...tuner.weights import admitting


class BoundRunner(TunableRunner):
    """Each tactic runs as ``fn(*inputs)`` from ``bind(tactic)``, made once per tactic and per tuner
    (the packed weights it reads live in that tuner's weight cache); a warm call calls it directly
    (``unpacked``), ``forward`` admits the copies it needs first. Subclasses implement ``resolve``
    (a tactic in its canonical form) and ``bind``, and ``copy_kind`` if a tactic reads a copy."""

    def __init__(self) -> None:
        self._fns: dict[tuple, tuple[Any, Callable[..., torch.Tensor]]] = {}

    def resolve(self, tactic: Tactic, inputs: Sequence[Any] | None) -> tuple:
        """``tactic`` as the tuple ``bind`` takes (``inputs`` given only for the default, -1);
        ValueError naming a malformed one."""
        raise NotImplementedError

    def bind(self, tactic: tuple) -> Callable[..., torch.Tensor]:
        raise NotImplementedError

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        fn = self._fn(self.resolve(tactic, inputs))
        if self.copy_kind(tactic) is None:
            return fn(*inputs)
        return admitting(AutoTuner.get().weights, lambda: fn(*inputs))

    def unpacked(self, tactic: Tactic) -> Callable[..., Any] | None:
        return None if tactic == DEFAULT_TACTIC else self._fn(self.resolve(tactic, None))

    def _fn(self, tactic: tuple) -> Callable[..., torch.Tensor]:
        weights = AutoTuner.get().weights
        found = self._fns.get(tactic)
        if found is None or found[0] is not weights:
            found = self._fns[tactic] = (weights, self.bind(tactic))
        return found[1]
