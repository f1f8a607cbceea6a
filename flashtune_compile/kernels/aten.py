"""ATen formulations of a linear layer ``y = x @ w.T + b`` that really differ in speed.

``F.linear`` picks its own path (fused bias epilogue on cuBLAS, oneDNN on CPU); ``addmm`` fuses the
bias into the GEMM; ``mm`` then ``add`` runs the GEMM plain and adds the bias after. Inputs are
``(x, w, b)`` with ``x`` of shape [M, K], ``w`` [N, K] and ``b`` [N] or None.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner


def linear_variant(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, variant: str) -> torch.Tensor:
    """``x @ w.T + b`` by the named ATen formulation ("linear", "addmm" or "mm_add")."""
    if variant == "linear":
        return F.linear(x, w, b)
    if variant == "addmm":
        return torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t())
    if variant == "mm_add":
        y = torch.mm(x, w.t())
        return y.add_(b) if b is not None else y
    raise ValueError(f"unknown ATen linear variant {variant!r}")


class AtenLinearRunner(TunableRunner):
    """The default runner of a linear op: tactic -1 is ``F.linear``; the others are named variants."""

    name = "aten_linear"
    VARIANTS = ("addmm", "mm_add")

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        return [DEFAULT_TACTIC, *self.VARIANTS]

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        x, w, b = inputs
        return linear_variant(x, w, b, "linear" if tactic == DEFAULT_TACTIC else tactic)
