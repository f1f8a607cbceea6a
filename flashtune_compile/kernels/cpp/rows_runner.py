"""The CPU kernels that read a weight as it is (``rows_gemm.cpp``), as candidates of ``flashtune.linear``,
of ``flashtune.linear_wq`` (an int8 weight with its scales) and, for decode-sized calls, of
``flashtune.moe``.

Inputs are linear's ``(x [M, K], w [N, K], b [N] | None)`` on CPU, one dtype of fp32, bf16 or
fp16, any weight (a parameter, a view, a tensor computed in the graph), any strides (a weight
whose columns are not adjacent is made contiguous per call: correct, not fast). No copy of the
weight is kept, so it costs no memory and no budget: at decode sizes it streams a row-major bf16
weight as fast as the blocked kernel streams its packed copy. A tactic
is ``(mb, u, pairs)``: ``mb`` rows of x per pass over a row of w, ``u`` accumulators per row, and
(bf16 on CPUs with AVX512_BF16) ``pairs`` = 1 for vdpbf16ps. Every tactic is correct for every M.
For ``linear_wq`` (``CpuQuantRowsRunner``) the rows are torchao's own int8 values with their
scales and zero points: a decode call streams the quantized weight where it lies, so a quantized
model keeps the memory it was quantized to, where the blocked kernel (``quant_runner.py``) would
keep a packed copy beside it. Importing this module compiles nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner
from ..moe import ACTIVATIONS, PAIRS_MAX, moe_pairs
from . import blocked_gemm_or_none, load_blocked_gemm, quant_runner
from .bound import BoundRunner

MAX_M = 8  # past this the multiplies re-read x for every row of w: the blocked kernel's ground
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def applies(x: Any, w: Any, b: Any) -> bool:
    """Whether the kernel takes these inputs (device, dtype, rank), any M and strides."""
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or x.device.type != "cpu":
        return False
    if x.dtype not in SUPPORTED_DTYPES or w.dtype != x.dtype or w.device != x.device:
        return False
    if x.dim() != 2 or w.dim() != 2 or w.shape[1] != x.shape[1]:
        return False
    if b is not None:
        return isinstance(b, torch.Tensor) and b.dtype == x.dtype and b.dim() == 1 and b.shape[0] == w.shape[0]
    return True


def rows_tactics(m: int, tiles: Sequence[tuple[int, int]], pairs: bool = False) -> list[tuple[int, int, int]]:
    """The pruned tactic space at a bucket of ``m`` rows: passes of ``mb`` rows, the smallest built
    height that covers m (the tallest past it), every unroll built for it; with ``pairs``, each
    also as the vdpbf16ps kernel."""
    heights = sorted({mb for mb, _ in tiles})
    mb = next((h for h in heights if h >= m), heights[-1])
    kinds = (1, 0) if pairs else (0,)
    return [(mb, u, p) for h, u in tiles if h == mb for p in kinds]


def _bound(tactic: tuple[int, int, int]) -> Callable[..., torch.Tensor]:
    """``fn(x, w, b)`` computing the linear by ``tactic``: one call of the kernel."""
    mb, u, pairs = tactic[0], tactic[1], bool(tactic[2])
    linear = load_blocked_gemm().rows_linear

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return linear(x, w, b, mb, u, pairs)

    return fn


class CpuRowsLinearRunner(BoundRunner):
    """``x @ w.T + b`` by the CPU kernel that streams w's rows as they are: fp32 sums, the bias
    fused, no copy. Functional: never writes its inputs."""

    name = "cpu_rows"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        x, w, b = inputs
        m = int(profile.shapes[0][0])
        if m > MAX_M or not applies(x, w, b):
            return []
        kernel = blocked_gemm_or_none()
        if kernel is None:
            return []
        return list(rows_tactics(m, kernel.rows_tiles, kernel.bf16_pairs and x.dtype == torch.bfloat16))

    def resolve(self, tactic: Tactic, inputs: Sequence[Any] | None) -> tuple:
        if tactic == DEFAULT_TACTIC:
            return (1, 2, 0)
        if not isinstance(tactic, (tuple, list)) or len(tactic) != 3:
            raise ValueError(f"cpu_rows tactic must be (mb, u, pairs) or -1, got {tactic!r}")
        return tuple(int(v) for v in tactic)

    def bind(self, tactic: tuple) -> Callable[..., torch.Tensor]:
        return _bound(tactic)


class CpuQuantRowsRunner(BoundRunner):
    """``x @ W.T + b`` for ``W = s * (q - z)`` (``kernels/quant.py``) by the CPU kernel that streams
    the int8 rows of q as they are, fp32 sums scaled per group, the zero points and bias in the
    epilogue: no copy. A tactic is ``(mb,)``, the rows of x per pass over a row of q (every tactic
    is correct for every M). Functional: never writes its inputs."""

    name = "cpu_quant_rows"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        m = int(profile.shapes[0][0])
        if m > MAX_M or not quant_runner.takes(inputs):
            return []
        kernel = blocked_gemm_or_none()
        if kernel is None:
            return []
        heights = kernel.quant_rows_heights
        return [(next((h for h in heights if h >= m), heights[-1]),)]

    def resolve(self, tactic: Tactic, inputs: Sequence[Any] | None) -> tuple:
        if tactic == DEFAULT_TACTIC:
            return (1,)
        if not isinstance(tactic, (tuple, list)) or len(tactic) != 1:
            raise ValueError(f"cpu_quant_rows tactic must be (mb,) or -1, got {tactic!r}")
        return (int(tactic[0]),)

    def bind(self, tactic: tuple) -> Callable[..., torch.Tensor]:
        mb = tactic[0]
        linear = load_blocked_gemm().quant_rows_linear

        def fn(x, q, scales, zeros, bias, group_size, bits):
            return linear(x, q, scales, zeros, bias, group_size, mb)

        return fn


class CpuRowsMoeRunner(TunableRunner):
    """``flashtune.moe`` for a few (token, pick) pairs, as decode makes, by the rows kernel: the ids
    read on the host and each used expert's gate/up and down products streamed from its weights as
    they are (``moe_pairs``), so no expert weight is copied. A tactic is ``(u, pairs)`` as for the
    linear (the rows per pass follow each expert's row count)."""

    name = "cpu_rows_moe"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        hidden, _, _, w1, w2, activation, w3 = inputs
        tokens, top_k = profile.shapes[2]
        experts = (w1, w2) if w3 is None else (w1, w2, w3)
        if tokens * top_k > PAIRS_MAX or hidden.device.type != "cpu" or hidden.dtype not in SUPPORTED_DTYPES:
            return []
        if activation not in ACTIVATIONS or any(w.dtype != hidden.dtype or w.device != hidden.device for w in experts):
            return []
        kernel = blocked_gemm_or_none()
        if kernel is None:
            return []
        kinds = (1, 0) if kernel.bf16_pairs and hidden.dtype == torch.bfloat16 else (0,)
        return [(u, p) for u in sorted({u for mb, u in kernel.rows_tiles if mb == 1}) for p in kinds]

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        u, pairs = (2, 0) if tactic == DEFAULT_TACTIC else (int(tactic[0]), int(tactic[1]))
        kernel = load_blocked_gemm()
        linear, tiles = kernel.rows_linear, kernel.rows_tiles
        heights = sorted({mb for mb, _ in tiles})

        def products(w: torch.Tensor | None) -> Any:
            if w is None:
                return None

            def mm(e: int, x: torch.Tensor) -> torch.Tensor:
                mb = next((h for h in heights if h >= x.shape[0]), heights[-1])
                unroll = u if (mb, u) in tiles else max(v for h, v in tiles if h == mb)
                return linear(x, w[e], None, mb, unroll, bool(pairs))

            return mm

        hidden, weights, ids, w1, w2, activation, w3 = inputs
        return moe_pairs(hidden, weights, ids, w1, w2, activation, w3, products(w1), products(w2), products(w3))
