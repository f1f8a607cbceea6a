"""The Triton GEMM (kernels/triton_gemm.py) as a candidate for every op of the matmul family.

Offered for CUDA tensors of fp16, bf16 or fp32. For tests on machines without a GPU it is offered
for CPU tensors too when both ``TRITON_INTERPRET=1`` (set before the kernel is first imported)
and ``FLASHTUNE_TRITON_ON_CPU=1`` are set. Triton is imported on first use, not with the package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_MAX_TACTICS = 4  # interpreted kernels are for correctness, not speed


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and os.environ.get("FLASHTUNE_TRITON_ON_CPU") == "1"


def _operands(op: str, inputs: Sequence[Any]) -> tuple:
    """(a, b, bias, alpha, beta) for ``alpha * a @ b + beta * bias``."""
    if op == "linear":
        x, w, b = inputs
        return x, w.t(), b, 1.0, 1.0
    if op in ("mm", "bmm"):
        return inputs[0], inputs[1], None, 1.0, 0.0
    bias, a, b, beta, alpha = inputs  # addmm, baddbmm
    return a, b, bias, alpha, beta


def _mnk(op: str, shapes: Sequence[Any]) -> tuple[int, int, int]:
    if op == "linear":
        return shapes[0][0], shapes[1][0], shapes[0][1]
    a, b = (shapes[0], shapes[1]) if op in ("mm", "bmm") else (shapes[1], shapes[2])
    return a[-2], b[-1], a[-1]


class TritonGemmRunner(TunableRunner):
    """Triton GEMM for one op; tactics are tile/warp/stage/split-K tuples pruned per bucket."""

    name = "triton_gemm"

    def __init__(self, op: str) -> None:
        self.op = op

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        a = _operands(self.op, inputs)[0]
        if a.dtype not in DTYPES or not (a.is_cuda or (a.device.type == "cpu" and _interpreting())):
            return []
        from .triton_gemm import tactics_for

        m, n, k = _mnk(self.op, profile.shapes)
        smem = 227 * 1024
        if a.is_cuda:
            from triton.runtime import driver

            smem = driver.active.utils.get_device_properties(a.device.index or 0)["max_shared_mem"]
        tactics = tactics_for(m, n, k, a.element_size(), smem)
        return tactics[:INTERPRETER_MAX_TACTICS] if _interpreting() else tactics

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        from .triton_gemm import gemm

        if tactic == DEFAULT_TACTIC:
            tactic = (64, 64, 32, 8, 4, 3, 1)
        a, b, bias, alpha, beta = _operands(self.op, inputs)
        return gemm(a, b, bias, alpha, beta, tuple(tactic))
