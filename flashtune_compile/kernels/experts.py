"""Per-expert pieces shared by the MoE and grouped-GEMM kernels: whether ``torch._grouped_mm``
runs here, a loop of one GEMM per expert, and cached re-laid-out copies of expert weights (keyed by
the ``nn.Parameter`` a weight is, or is a view of, in the tuner's weight cache, so they are never
stale).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..tuner.autotuner import AutoTuner
from ..tuner.weights import WeightCache
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


def fp32_copy(w: torch.Tensor) -> torch.Tensor | None:
    """A cached fp32 copy of a parameter or of a view of one (same layout as ``w``); None otherwise."""
    if not WeightCache.cacheable(w):
        return None
    return AutoTuner.get().weights.get(w, "fp32", _as_fp32)


def packed(w: torch.Tensor, fp32: bool) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``mm(e, x) = x @ w[e].T`` from oneDNN-packed per-expert weights (fp32 copies if ``fp32``),
    packed on first use of each expert and cached against the parameter ``w`` is or views."""
    copies = AutoTuner.get().weights
    kind = f"mkldnn_packed{'_fp32' if fp32 else ''}"

    def make(e: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def pack(v: torch.Tensor) -> torch.Tensor:
            return _mkldnn_pack(v[e].float() if fp32 else v[e])

        return pack

    def mm(e: int, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), copies.get(w, f"{kind}[{e}]", make(e)), None, "none", [], ""
        )

    return mm
