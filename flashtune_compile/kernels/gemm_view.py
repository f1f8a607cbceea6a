"""How an op's inputs read as one GEMM, ``alpha * A @ B + beta * bias``: what lets one generic
GEMM runner (e.g. the Triton GEMM) serve every op of the matmul family.

Example: ``linear(x [M, K], w [N, K], b [N])`` is ``GemmView(a=0, b=1, b_transposed=True, bias=2)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GemmView:
    """Input positions: ``a`` is ``[(B,) M, K]``; ``b`` is ``[(B,) K, N]``, or ``[N, K]`` when
    ``b_transposed``; ``bias`` (optional) broadcasts to the output; ``alpha`` / ``beta`` name the
    inputs holding those scalars (None: 1.0)."""

    a: int
    b: int
    b_transposed: bool = False
    bias: int | None = None
    alpha: int | None = None
    beta: int | None = None

    def operands(self, inputs: Sequence[Any]) -> tuple[Any, Any, Any, float, float]:
        """``(A, B, bias, alpha, beta)`` of a call; B as ``[(B,) K, N]`` (a view, no copy)."""
        b = inputs[self.b].t() if self.b_transposed else inputs[self.b]
        bias = inputs[self.bias] if self.bias is not None else None
        alpha = inputs[self.alpha] if self.alpha is not None else 1.0
        beta = inputs[self.beta] if self.beta is not None else 1.0
        return inputs[self.a], b, bias, alpha, beta

    def mnk(self, shapes: Sequence[Any]) -> tuple[int, int, int]:
        """``(M, N, K)`` of a call with these input shapes."""
        a, b = shapes[self.a], shapes[self.b]
        return a[-2], (b[-2] if self.b_transposed else b[-1]), a[-1]
