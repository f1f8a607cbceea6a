"""ATen and CPU candidates for ``flashtune.grouped_mm``: ``torch._grouped_mm``'s grouped GEMM.

Inputs ``(x [S, K], w [E, K, N], offs [E] int32)``: rows ``offs[e-1] .. offs[e]-1`` of ``x`` use
``w[e]`` (``offs`` are cumulative row ends); rows no group covers are zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..tuner.autotuner import AutoTuner
from ..tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner
from ..tuner.weights import WeightCache, admitting
from .experts import expert_loop, fp32_copy, grouped_mm_available

# -- runners: flashtune.grouped_mm ------------------------------------------------------------
# inputs: (x [S, K], w [E, K, N], offs [E] int32 cumulative row ends); rows >= offs[-1] are zero.


def grouped_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, compute_dtype=None) -> torch.Tensor:
    ends = offs.tolist()
    counts = [b - a for a, b in zip([0, *ends[:-1]], ends)]
    xs = x if compute_dtype is None else x.to(compute_dtype)
    out = expert_loop(xs, counts, lambda e, rows: rows @ w[e], w.shape[2])
    return out.to(x.dtype)


class AtenGroupedMMRunner(TunableRunner):
    """``torch._grouped_mm`` (the default where available) or a loop of ``mm`` (``"loop"``)."""

    name = "aten_grouped_mm"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        x = inputs[0]
        if grouped_mm_available(x.device, x.dtype):
            return [DEFAULT_TACTIC, "loop"]
        return [DEFAULT_TACTIC]

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        x, w, offs = inputs
        if tactic == DEFAULT_TACTIC and grouped_mm_available(x.device, x.dtype):
            out = torch._grouped_mm(x, w, offs=offs)
            rows = torch.arange(x.shape[0], device=x.device)
            if x.shape[0]:
                out = torch.where((rows < offs[-1])[:, None], out, 0)  # rows no group covers: zero
            return out
        if tactic in (DEFAULT_TACTIC, "loop"):
            return grouped_loop(x, w, offs)
        raise ValueError(f"unknown aten_grouped_mm tactic {tactic!r}")


class CpuGroupedMMRunner(TunableRunner):
    """bf16/fp16 grouped GEMM on CPU in fp32 from a cached fp32 weight (parameters only)."""

    name = "cpu_grouped_mm"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        x, w, _ = inputs
        if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or not WeightCache.cacheable(w):
            return []
        return ["fp32_loop"]

    def copy_kind(self, tactic: Tactic) -> str | None:
        return "fp32"

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        if tactic != "fp32_loop":
            raise ValueError(f"unknown cpu_grouped_mm tactic {tactic!r}")
        return admitting(AutoTuner.get().weights, lambda: _fp32_loop(*inputs))

    def unpacked(self, tactic: Tactic) -> Any:
        return _fp32_loop if tactic == "fp32_loop" else None


def _fp32_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return grouped_loop(x, fp32_copy(w), offs, compute_dtype=torch.float32)
