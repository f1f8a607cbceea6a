"""Real runners for tuner tests: a chunked matmul family, and a wrong and a raising candidate."""

from __future__ import annotations

import time
from collections import Counter

import torch

import flashtune_compile as ft


class MMDefault(ft.TunableRunner):
    """torch.mm: the default."""

    name = "mm"

    def __init__(self) -> None:
        self.calls: Counter = Counter()

    def forward(self, inputs, tactic=-1):
        self.calls[tactic] += 1
        x, w = inputs[0], inputs[1]
        return torch.mm(x, w)


class MMChunked(ft.TunableRunner):
    """x @ w computed over row blocks of ``tactic`` rows (a real, correct kernel with a tactic)."""

    name = "mm_chunked"

    def __init__(self, tactics=(1, 2, 4)) -> None:
        self.tactics = list(tactics)
        self.calls: Counter = Counter()
        self.profiled_rows: set[int] = set()

    def get_valid_tactics(self, inputs, profile):
        self.profiled_rows.add(profile.bucket[0])
        return [t for t in self.tactics if t <= max(profile.bucket[0], 1)]

    def forward(self, inputs, tactic=-1):
        self.calls[tactic] += 1
        x, w = inputs[0], inputs[1]
        step = x.shape[0] if tactic == -1 else tactic
        return torch.cat([x[i : i + step] @ w for i in range(0, x.shape[0], max(step, 1))]) if x.shape[0] else x @ w


class MMWrong(ft.TunableRunner):
    """Fast and wrong: the product of the first rows only, scaled. Must never be chosen."""

    name = "mm_wrong"

    def forward(self, inputs, tactic=-1):
        x, w = inputs[0], inputs[1]
        out = torch.mm(x[:1], w).expand(x.shape[0], -1)
        return out * 1.01


class MMRaising(ft.TunableRunner):
    """Raises for every tactic (a kernel that does not support the shape)."""

    name = "mm_raising"

    def get_valid_tactics(self, inputs, profile):
        return [0, 1]

    def forward(self, inputs, tactic=-1):
        raise RuntimeError("unsupported shape for this kernel")


class MMSlow(ft.TunableRunner):
    """Correct but slow: must lose to the default (or win over a slower one)."""

    name = "mm_slow"

    def __init__(self, seconds: float = 2e-4) -> None:
        self.seconds = seconds

    def forward(self, inputs, tactic=-1):
        time.sleep(self.seconds)
        return torch.mm(inputs[0], inputs[1])


def mm_config(**kw) -> ft.TuningConfig:
    return ft.TuningConfig(dynamic=(ft.DynamicDim(input_idx=0, dim_idx=0, **kw),))
