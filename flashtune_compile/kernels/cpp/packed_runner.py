"""Candidates of ``flashtune.packed_linear``: a linear whose weight exists only in the blocked
kernel's packed layout (``ft.freeze`` replaced the parameter by it), with inputs ``(x [M, K],
packed [B, S, NB * kps], bias [N] | None, n, pairs)``.

- ``aten_packed_linear``, the default: the weight unpacked (a copy, every call) and ``F.linear``.
  Slow, always right: the reference every other candidate is checked against.
- ``cpu_packed``: the blocked kernel on the pack as it is (``blocked_gemm.cpp``); a tactic is
  ``(mr, ksplit)``, the block width and pairs being the pack's. Correct for every M.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ...tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner
from . import blocked_gemm_or_none, load_blocked_gemm, unpack
from .bound import BoundRunner
from .runner import MIN_K_FOR_SPLIT


class AtenPackedLinearRunner(TunableRunner):
    """``F.linear`` on the weight unpacked from its pack (see the module docstring)."""

    name = "aten_packed_linear"

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        x, packed, b, n, pairs = inputs
        return F.linear(x, unpack(packed, n, x.shape[1], pairs), b)


def _heights(kernel: Any, r: int) -> list[int]:
    return sorted(mr for mr, width in kernel.tiles if width == r)


def block_vectors(kernel: Any, packed: torch.Tensor, pairs: bool | int) -> int:
    """The ``r`` (vectors per block) ``packed`` was packed with on this machine."""
    return packed.shape[2] // ((2 if pairs else 1) * kernel.vector_width)


class CpuPackedLinearRunner(BoundRunner):
    """``x @ w.T + b`` by the blocked kernel straight from the pack: no copy at all."""

    name = "cpu_packed"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        x, packed, b, n, pairs = inputs
        kernel = blocked_gemm_or_none()
        if kernel is None or x.device.type != "cpu" or packed.device.type != "cpu" or x.dtype != packed.dtype:
            return []
        heights = _heights(kernel, block_vectors(kernel, packed, pairs))
        if not heights or (pairs and not kernel.bf16_pairs):
            return []
        m, k = int(profile.shapes[0][0]), int(profile.shapes[0][1])
        cap = 1 << max(0, m - 1).bit_length()
        tall = [h for h in heights if h <= cap] or heights[:1]
        tall = tall[-2:] if m > 8 else tall
        splits = (1, 2) if m <= 4 and k >= MIN_K_FOR_SPLIT else (1,)
        return [(mr, s) for mr in tall for s in splits]

    def resolve(self, tactic: Tactic, inputs: Sequence[Any] | None) -> tuple:
        if tactic == DEFAULT_TACTIC:
            return (1, 1) if inputs is not None and inputs[0].shape[0] <= 1 else (2, 1)
        if not isinstance(tactic, (tuple, list)) or len(tactic) != 2:
            raise ValueError(f"cpu_packed tactic must be (mr, ksplit) or -1, got {tactic!r}")
        return (int(tactic[0]), int(tactic[1]))

    def bind(self, tactic: tuple) -> Callable[..., torch.Tensor]:
        mr, ksplit = tactic
        kernel = load_blocked_gemm()
        linear, vw = kernel.linear, kernel.vector_width

        def fn(x: torch.Tensor, packed: torch.Tensor, b: torch.Tensor | None, n: int, pairs: int) -> torch.Tensor:
            r = packed.shape[2] // ((2 if pairs else 1) * vw)
            return linear(x, packed, b, n, mr, r, ksplit, bool(pairs))

        return fn
