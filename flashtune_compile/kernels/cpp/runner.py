"""The CPU blocked GEMM (``blocked_gemm.cpp``) as a tuner candidate for linear.

Inputs are linear's ``(x [M, K], w [N, K], b [N] | None)`` on CPU, one dtype of fp32, bf16 or
fp16, with ``w`` a parameter or a view of one (its packed copy lives in the tuner's never-stale
weight cache). A tactic is ``(mr, r, ksplit, pairs)``: tiles of ``mr`` rows of x by ``r`` vector
widths of columns, ``ksplit`` tasks along K per column block, and (bf16 on CPUs with AVX512_BF16)
``pairs`` = 1 for the kernel that multiplies k in pairs with vdpbf16ps. Every tactic is correct for every M, so a
tactic tuned at a bucket serves all M in it. Importing this module compiles nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...tuner.autotuner import AutoTuner
from ...tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic
from ...tuner.weights import WeightCache
from . import blocked_gemm_or_none, load_blocked_gemm
from .bound import BoundRunner

MAX_M = 64  # past this, oneDNN's cache-blocked GEMMs are the candidates that matter
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_K_FOR_SPLIT = 1024


def applies(x: Any, w: Any, b: Any) -> bool:
    """Whether the kernel takes these inputs (device, dtype, rank, a cacheable weight), any M."""
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or x.device.type != "cpu":
        return False
    if x.dtype not in SUPPORTED_DTYPES or w.dtype != x.dtype or w.device != x.device:
        return False
    if x.dim() != 2 or w.dim() != 2 or w.shape[1] != x.shape[1] or not WeightCache.cacheable(w):
        return False
    if b is not None:
        return isinstance(b, torch.Tensor) and b.dtype == x.dtype and b.dim() == 1 and b.shape[0] == w.shape[0]
    return True


def blocked_tactics(
    m: int, k: int, tiles: Sequence[tuple[int, int]], pairs: bool = False
) -> list[tuple[int, int, int, int]]:
    """The pruned tactic space at a bucket of ``m`` rows: row tiles no taller than the next power of
    two of ``m`` and, above 8 rows, the two tallest; split K (x2) only for m <= 4 and k >= 1024;
    with ``pairs`` (bf16 where the pairs kernel is built), each also as the pairs kernel."""
    cap = 1 << max(0, m - 1).bit_length()
    heights = sorted({mr for mr, _ in tiles if mr <= cap})
    heights = heights[-2:] if m > 8 else heights
    splits = (1, 2) if m <= 4 and k >= MIN_K_FOR_SPLIT else (1,)
    kinds = (0, 1) if pairs else (0,)
    return [(mr, r, s, p) for mr, r in tiles if mr in heights for s in splits for p in kinds]


def copy_kind(r: int, pairs: bool | int) -> str:
    """The weight cache's kind for a pack in blocks of ``r`` vectors (``pairs``: k in pairs)."""
    return f"blocked{r}{'p' if pairs else ''}"


def _bound(tactic: tuple[int, int, int, int]) -> Callable[..., torch.Tensor]:
    """``fn(x, w, b)`` computing the linear by ``tactic``: the packed weight from the tuner's cache,
    then the kernel (the warm path, so nothing else)."""
    mr, r, ksplit, pairs = tactic[0], tactic[1], tactic[2], bool(tactic[3])
    kernel = load_blocked_gemm()
    weights = AutoTuner.get().weights  # the tuner of the calling site
    kind = copy_kind(r, pairs)
    nb, kps = kernel.block_width(r), 2 if pairs else 1

    def make(w: torch.Tensor) -> torch.Tensor:
        return kernel.pack(w, r, pairs)

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        n, k = w.shape
        size = -(-n // nb) * nb * -(-k // kps) * kps * w.element_size()
        return kernel.linear(x, weights.get(w, kind, make, size), b, n, mr, r, ksplit, pairs)

    return fn


class CpuBlockedLinearRunner(BoundRunner):
    """``x @ w.T + b`` by the blocked CPU kernel: the weight streamed once per row tile in its own
    dtype, widened in registers, fp32 sums, the bias fused. Functional: never writes its inputs."""

    name = "cpu_blocked"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        x, w, b = inputs
        m, k = int(profile.shapes[0][0]), int(profile.shapes[1][1])
        if m > MAX_M or not applies(x, w, b):
            return []
        kernel = blocked_gemm_or_none()
        if kernel is None:
            return []
        return list(blocked_tactics(m, k, kernel.tiles, kernel.bf16_pairs and x.dtype == torch.bfloat16))

    def resolve(self, tactic: Tactic, inputs: Sequence[Any] | None) -> tuple:
        if tactic == DEFAULT_TACTIC:
            return (1, 4, 1, 0) if inputs is not None and inputs[0].shape[0] <= 1 else (4, 4, 1, 0)
        if not isinstance(tactic, (tuple, list)) or len(tactic) != 4:
            raise ValueError(f"cpu_blocked tactic must be (mr, r, ksplit, pairs) or -1, got {tactic!r}")
        return tuple(int(v) for v in tactic)

    def bind(self, tactic: tuple) -> Callable[..., torch.Tensor]:
        return _bound(tactic)

    def copy_kind(self, tactic: Tactic) -> str | None:
        r, pairs = self.resolve(tactic, None)[1::2] if tactic != DEFAULT_TACTIC else (4, 0)
        return copy_kind(r, pairs)
