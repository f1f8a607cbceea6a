"""ATen formulations of the matmul family that really differ in speed, one runner per op.

Each runner's tactic -1 is the plain ATen call (the always-valid default); its other tactics are
named formulations of the same product. All are correct for any strides. Shapes: linear
``(x [M, K], w [N, K], b [N] | None)``; mm ``(a [M, K], b [K, N])``; addmm ``(bias, a, b, beta,
alpha)``; bmm ``(a [B, M, K], b [B, K, N])``; baddbmm ``(bias, a, b, beta, alpha)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def _scaled_add(bias: torch.Tensor, prod: torch.Tensor, beta: Any, alpha: Any) -> torch.Tensor:
    """beta * bias + alpha * prod, with ATen's convention that beta == 0 ignores bias (even NaN)."""
    if alpha != 1:
        prod = prod.mul_(alpha)
    if beta == 0:
        return prod
    return prod.add_(bias, alpha=beta) if bias.shape == prod.shape else prod.add_(bias * beta if beta != 1 else bias)


class _NamedVariants(TunableRunner):
    """A runner whose tactics are -1 plus the names in VARIANTS."""

    VARIANTS: tuple[str, ...] = ()

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        return [DEFAULT_TACTIC, *self.VARIANTS]


class AtenLinearRunner(_NamedVariants):
    """Tactic -1 is ``F.linear`` (fused bias epilogue on cuBLAS, oneDNN on CPU). Without a bias
    all three formulations are the same ``mm``, so only -1 is offered: timing identical kernels
    would only let noise choose."""

    name = "aten_linear"
    VARIANTS = ("addmm", "mm_add")

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        return super().get_valid_tactics(inputs, profile) if inputs[2] is not None else [DEFAULT_TACTIC]

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        x, w, b = inputs
        return linear_variant(x, w, b, "linear" if tactic == DEFAULT_TACTIC else tactic)

    def unpacked(self, tactic: Tactic) -> Any:
        return F.linear if tactic == DEFAULT_TACTIC else None


class AtenMMRunner(_NamedVariants):
    """``torch.mm``: one formulation; faster ones come from other kernel families."""

    name = "aten_mm"

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        return torch.mm(inputs[0], inputs[1])

    def unpacked(self, tactic: Tactic) -> Any:
        return torch.mm


class _ScaledProductRunner(_NamedVariants):
    """``beta * bias + alpha * (a @ b)``: tactic -1 is the fused ATen op; the variant runs the
    product plain, then scales and adds."""

    fused: Any = None
    product: Any = None

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        bias, a, b, beta, alpha = inputs
        if tactic == DEFAULT_TACTIC:
            return type(self).fused(bias, a, b, beta=beta, alpha=alpha)
        if tactic == self.VARIANTS[0]:
            return _scaled_add(bias, type(self).product(a, b), beta, alpha)
        raise ValueError(f"unknown {self.name} tactic {tactic!r}")


class AtenAddmmRunner(_ScaledProductRunner):
    name, VARIANTS, fused, product = "aten_addmm", ("mm_add",), torch.addmm, torch.mm


class AtenBmmRunner(_NamedVariants):
    """Tactic -1 is ``torch.bmm``; "loop_mm" runs one ``mm`` per batch (wins for few, large batches)."""

    name = "aten_bmm"
    VARIANTS = ("loop_mm",)

    def unpacked(self, tactic: Tactic) -> Any:
        return torch.bmm if tactic == DEFAULT_TACTIC else None

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        a, b = inputs
        if tactic == DEFAULT_TACTIC:
            return torch.bmm(a, b)
        if tactic == "loop_mm":
            out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
            for i in range(a.shape[0]):
                torch.mm(a[i], b[i], out=out[i])
            return out
        raise ValueError(f"unknown bmm tactic {tactic!r}")


class AtenBaddbmmRunner(_ScaledProductRunner):
    name, VARIANTS, fused, product = "aten_baddbmm", ("bmm_add",), torch.baddbmm, torch.bmm
