"""Weights stored as integers with float scales: what such a weight is, and ATen's ways to multiply by it.

A quantized weight ``W [N, K]`` is held as ``q [N, K]`` (int8 values; ``bits`` says their range:
8 for -128..127, 4 for -8..7), ``scales [N, G]`` and optional ``zeros [N, G]``, one group of
``group_size`` columns per scale (``G = ceil(K / group_size)``; one group per row is per-channel):

    W[n, k] = scales[n, k // group_size] * (q[n, k] - zeros[n, k // group_size])

This is torchao's weight-only int8 and intx layouts, and what the plain PyTorch spelling
``q.to(dtype) * s`` computes. The runners here take ``linear_wq``'s tuning inputs ``(x [M, K], q,
scales, zeros | None, bias [N] | None, group_size, bits)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """``W [N, K]`` in ``dtype`` (see the module docstring), computed in fp32 (float64 for a float64
    ``dtype``) and rounded once."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    n, k = q.shape
    groups = scales.shape[-1]
    w = q.to(work)
    if groups > 1 and groups * group_size == k:  # whole groups: broadcast over a [N, G, gs] view
        w = w.view(n, groups, group_size)
        if zeros is not None:
            w = w - zeros.to(work).unsqueeze(-1)
        return (w * scales.to(work).unsqueeze(-1)).view(n, k).to(dtype)

    def per_column(t: torch.Tensor) -> torch.Tensor:
        t = t.to(work)
        return t if t.shape[-1] == 1 else t.repeat_interleave(group_size, dim=-1)[..., :k]

    if zeros is not None:
        w = w - per_column(zeros)
    return (w * per_column(scales)).to(dtype)


def per_channel(inputs: Sequence[Any]) -> bool:
    """Whether the call's weight has one scale per row and no zero points."""
    x, q, scales, zeros = inputs[:4]
    return zeros is None and scales.shape[-1] == 1


# ATen's CPU int8pack kernel reads K in vector-wide blocks past the row's end: with AVX-512, K not
# a multiple of 16 gave garbage or a crash (torch 2.13), so the tactic needs whole blocks of 64.
INT8PACK_K = 64


def int8pack_applies(inputs: Sequence[Any]) -> bool:
    """Whether ``torch._weight_int8pack_mm`` can take this call safely (K a multiple of 64)."""
    return inputs[1].shape[-1] % INT8PACK_K == 0


class AtenQuantLinearRunner(TunableRunner):
    """Tactic -1 (the default): dequantize, then ``F.linear``. Per-channel weights without zero
    points also offer "scale_after" (``F.linear`` on ``q`` cast, then the scales: torchao's eager
    int8 formulation) and "int8pack" (``torch._weight_int8pack_mm``, ATen's int8 weight kernel)."""

    name = "aten_linear_wq"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        if not per_channel(inputs):
            return [DEFAULT_TACTIC]
        return [DEFAULT_TACTIC, "scale_after"] + (["int8pack"] if int8pack_applies(inputs) else [])

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        x, q, scales, zeros, bias, group_size, bits = inputs
        if tactic == DEFAULT_TACTIC:
            return F.linear(x, dequantize(q, scales, zeros, group_size, x.dtype), bias)
        if not per_channel(inputs):
            raise ValueError(f"{self.name} tactic {tactic!r} needs one scale per row and no zero points")
        s = scales.view(-1).to(x.dtype)
        if tactic == "scale_after":
            y = F.linear(x, q.to(x.dtype)).mul_(s)
        elif tactic == "int8pack":
            if not int8pack_applies(inputs):
                raise ValueError(f"{self.name} tactic 'int8pack' needs K a multiple of {INT8PACK_K}")
            y = torch._weight_int8pack_mm(x.contiguous(), q.contiguous(), s.contiguous())
        else:
            raise ValueError(f"unknown {self.name} tactic {tactic!r}")
        return y.add_(bias) if bias is not None else y
