"""Per-expert pieces shared by the MoE and grouped-GEMM kernels: whether ``torch._grouped_mm``
runs here, a loop of one GEMM per expert, and cached re-laid-out copies of expert weights (keyed by
the ``nn.Parameter`` a weight is, or is a view of, in the tuner's weight cache, so they are never
stale).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..tuner.autotuner import AutoTuner
from .cpu import _as_fp32, _mkldnn_pack


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs here: CPU builds have it for every float dtype; CUDA
    needs bf16 on sm80+."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


def expert_loop(
    xs: torch.Tensor,
    counts: list[int],
    mm: Callable[[int, torch.Tensor], torch.Tensor],
    out_cols: int,
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``fn(mm(e, rows of e))`` for every expert with rows, into one [rows, out_cols] tensor (rows
    after the counted ones are zero); ``mm(e, x)`` is ``x @ w[e].T``."""
    out = xs.new_zeros((xs.shape[0], out_cols))
    start = 0
    for e, n in enumerate(counts):
        if n:
            y = mm(e, xs[start : start + n])
            out[start : start + n] = fn(y) if fn is not None else y
            start += n
    return out


def fp32_copy(w: torch.Tensor) -> torch.Tensor:
    """The cached fp32 copy of a parameter or of a view of one (same layout as ``w``), made on first
    use; CopyMissing / CopyDenied as ``WeightCache.get`` raises them."""
    return AutoTuner.get().weights.get(w, "fp32", _as_fp32, w.numel() * 4)


def packed(w: torch.Tensor, fp32: bool) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``mm(e, x) = x @ w[e].T`` from oneDNN-packed per-expert weights (of fp32 copies if ``fp32``):
    every expert packed on first use, as one copy cached against the parameter ``w`` is or views.
    CopyMissing / CopyDenied as ``WeightCache.get`` raises them, on that first use."""
    kind = packed_kind(fp32)

    def make(v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_mkldnn_pack(v[e].float() if fp32 else v[e]) for e in range(v.shape[0]))

    experts = AutoTuner.get().weights.get(w, kind, make, w.numel() * (4 if fp32 else w.element_size()))

    def mm(e: int, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), experts[e], None, "none", [], "")

    return mm


def packed_kind(fp32: bool) -> str:
    """The weight cache's kind for ``packed``'s copies."""
    return "mkldnn_packed_fp32" if fp32 else "mkldnn_packed"
