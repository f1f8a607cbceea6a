"""CPU formulations of a linear layer that really differ there, from re-laid-out weights.

Measured on a 2-core AVX2 machine (no bf16 FMA): oneDNN-packed fp32 weights ran 1.3-1.8x faster
than ``F.linear``; for bf16, computing in fp32 from a cached fp32 copy of the weight ran 1.8-2.6x
faster, while ``mm`` against a transposed bf16 copy ran 60x slower (so it is never offered for
bf16). Copies live in the tuner's weight cache (``tuner/weights.py``: one per weight, within a
budget, never stale), and are offered only for weights that are ``nn.Parameter``s (a weight
computed inside the graph is new every call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..tuner.autotuner import AutoTuner
from ..tuner.runner import BucketProfile, Tactic
from ..tuner.weights import WeightCache
from .cpp.bound import BoundRunner

_packable: dict[torch.dtype, bool] = {}


def _mkldnn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack a weight of this dtype here (bf16 needs CPU support)."""
    if dtype not in _packable:
        try:
            torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype))
            _packable[dtype] = torch.backends.mkldnn.is_available()
        except (RuntimeError, AttributeError):
            _packable[dtype] = False
    return _packable[dtype]


def _t_contiguous(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()


def _mkldnn_pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous())


def _as_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float()


TACTICS = ("wt_contig", "fp32_compute", "mkldnn_packed")
COPY_KINDS = {"wt_contig": "t_contiguous", "fp32_compute": "fp32", "mkldnn_packed": "mkldnn_packed"}


def _bytes(t: torch.Tensor, elem: int | None = None) -> int:
    return t.numel() * (elem or t.element_size())


def _bound(tactic: str) -> Callable[..., torch.Tensor]:
    """``fn(x, w, b)`` computing the linear by ``tactic``: the weight's copy from the calling
    tuner's cache (checked fresh on every call), then one ATen or oneDNN call."""
    weights = AutoTuner.get().weights
    if tactic == "wt_contig":

        def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            wt = weights.get(w, "t_contiguous", _t_contiguous, _bytes(w))
            return torch.addmm(b, x, wt) if b is not None else torch.mm(x, wt)

    elif tactic == "fp32_compute":

        def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            w32 = weights.get(w, "fp32", _as_fp32, _bytes(w, 4))
            b32 = weights.get(b, "fp32", _as_fp32, _bytes(b, 4)) if b is not None else None
            return F.linear(x.float(), w32, b32).to(x.dtype)

    else:
        linear = torch.ops.mkldnn._linear_pointwise.default  # the overload resolved once, not per call

        def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            packed = weights.get(w, "mkldnn_packed", _mkldnn_pack, _bytes(w))
            return linear(x.contiguous(), packed, b, "none", [], "")

    return fn


class CpuLinearRunner(BoundRunner):
    """Linear ``(x [M, K], w [N, K], b [N] | None)`` on CPU from a re-laid-out weight. Each tactic
    runs as one bound function (``_bound``), which a warm call calls directly."""

    name = "cpu_linear"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        x, w, b = inputs
        if x.device.type != "cpu" or w.dim() != 2 or not WeightCache.cacheable(w):
            return []
        if x.dtype == torch.float32:
            tactics = ["wt_contig"]
        elif x.dtype in (torch.bfloat16, torch.float16):
            tactics = ["fp32_compute"]
        else:
            return []
        if _mkldnn_packs(x.dtype) and x.dtype != torch.float16:
            tactics.append("mkldnn_packed")
        return tactics

    def resolve(self, tactic: Tactic, inputs: Sequence[Any] | None) -> tuple:
        if tactic not in TACTICS:
            raise ValueError(f"unknown cpu_linear tactic {tactic!r}")
        return (tactic,)

    def copy_kind(self, tactic: Tactic) -> str | None:
        return COPY_KINDS.get(tactic)  # type: ignore[arg-type]

    def bind(self, tactic: tuple) -> Callable[..., torch.Tensor]:
        return _bound(tactic[0])
