"""The Triton GEMMs as candidates for every op of the matmul family (each op says how its inputs
read as a GEMM: ``gemm_view.GemmView``): the tiled GEMM (kernels/triton_gemm.py) for any size,
and the decode-sized one (kernels/triton_skinny.py) for M <= 32.

Offered for CUDA tensors of fp16, bf16 or fp32. For tests on machines without a GPU it is offered
for CPU tensors too when both ``TRITON_INTERPRET=1`` (set before the kernel is first imported)
and ``FLASHTUNE_TRITON_ON_CPU=1`` are set. Triton is imported on first use, not with the package.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner
from . import sm_count
from .gemm_view import GemmView

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_MAX_TACTICS = 4  # interpreted kernels are for correctness, not speed


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and os.environ.get("FLASHTUNE_TRITON_ON_CPU") == "1"


def max_smem(a: torch.Tensor) -> int:
    """Shared memory per block on a's GPU (an H100's 227 KiB for a CPU tensor under the interpreter)."""
    if not a.is_cuda:
        return 227 * 1024
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(a.get_device())["max_shared_mem"]


class TritonRunner(TunableRunner):
    """A runner whose tactics are Triton kernels: a bucket compiles them all at once, in parallel
    (``triton_launch.precompile``), before timing any. Interpreted kernels need no compiling."""

    def precompile(self, inputs: Sequence[Any], tactics: Sequence[Tactic]) -> None:
        if tactics and os.environ.get("TRITON_INTERPRET", "0") != "1":
            from .triton_launch import precompile

            precompile(self.forward, inputs, tactics)


class ViewRunner(TritonRunner):
    """A Triton GEMM for any op whose inputs read as one GEMM (``view``, the op's ``GemmView``)."""

    def __init__(self, view: GemmView) -> None:
        self.view = view  # how the op's inputs read as one GEMM

    @classmethod
    def for_op(cls, op: Any) -> ViewRunner:
        return cls(op.gemm)

    def offered(self, inputs: Sequence[Any]) -> bool:
        """Whether A is a tensor these kernels take: fp16/bf16/fp32, on a GPU (or the interpreter)."""
        a = inputs[self.view.a]
        return a.dtype in DTYPES and (a.is_cuda or (a.device.type == "cpu" and _interpreting()))


class TritonGemmRunner(ViewRunner):
    """The tiled Triton GEMM; tactics are tile/warp/stage/split-K tuples pruned per bucket."""

    name = "triton_gemm"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        if not self.offered(inputs):
            return []
        from .triton_gemm import tactics_for

        a = inputs[self.view.a]
        m, n, k = self.view.mnk(profile.shapes)
        tactics = tactics_for(m, n, k, a.element_size(), max_smem(a))
        return tactics[:INTERPRETER_MAX_TACTICS] if _interpreting() else tactics

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        from .triton_gemm import gemm

        if tactic == DEFAULT_TACTIC:
            tactic = (64, 64, 32, 8, 4, 3, 1)
        a, b, bias, alpha, beta = self.view.operands(inputs)
        return gemm(a, b, bias, alpha, beta, tuple(tactic))


class TritonSkinnyRunner(ViewRunner):
    """The decode-sized Triton GEMM (``triton_skinny.py``: narrow column blocks, split-K with a
    deterministic sum) for any op whose inputs read as one GEMM, offered for buckets with
    M <= 32. A tactic is ``(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)``; every
    tactic is correct for every M (blocks of BLOCK_M rows)."""

    name = "triton_skinny"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        if not self.offered(inputs):
            return []
        from .triton_skinny import MAX_M, skinny_tactics

        a = inputs[self.view.a]
        m, n, k = self.view.mnk(profile.shapes)
        if m > MAX_M:
            return []
        tactics = skinny_tactics(m, n, k, sm_count(a))
        return tactics[:INTERPRETER_MAX_TACTICS] if _interpreting() else tactics

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        from .triton_skinny import default_tactic, skinny_gemm

        a, b, bias, alpha, beta = self.view.operands(inputs)
        if tactic == DEFAULT_TACTIC:
            tactic = default_tactic(a.shape[-2], b.shape[-1], a.shape[-1], sm_count(a))
        return skinny_gemm(a, b, bias, alpha, beta, tuple(tactic))


def _has_tma(a: torch.Tensor) -> bool:
    """TMA descriptors: a Hopper or newer GPU (or the interpreter, in tests)."""
    return _tma_capable(a.get_device()) if a.is_cuda else _interpreting()


@functools.cache
def _tma_capable(index: int) -> bool:
    return torch.version.cuda is not None and torch.cuda.get_device_capability(index)[0] >= 9


class TritonTmaRunner(ViewRunner):
    """The persistent TMA GEMM (``triton_tma.py``) for 2-D ops whose operands TMA can read (fp16 or
    bf16, A row-major, B K-major or row-major, 16-byte aligned), offered on Hopper or newer for
    buckets with M >= 64. A call whose operands TMA cannot read (a misaligned view, say) runs the
    tiled GEMM with the same tile, so every tactic is correct for every input."""

    name = "triton_tma"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        from .triton_tma import MIN_M, applies, tma_tactics

        a, b, _, _, _ = self.view.operands(inputs)
        if not self.offered(inputs) or not _has_tma(a) or not applies(a, b):
            return []
        m, n, k = self.view.mnk(profile.shapes)
        if m < MIN_M:
            return []
        tactics = tma_tactics(m, n, k, a.element_size(), max_smem(a))
        return tactics[:INTERPRETER_MAX_TACTICS] if _interpreting() else tactics

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        from .triton_gemm import gemm
        from .triton_tma import TILES, applies, tma_gemm

        a, b, bias, alpha, beta = self.view.operands(inputs)
        if tactic == DEFAULT_TACTIC:
            bm, bn, bk, warps, stages = TILES[0]
            tactic = (bm, bn, bk, 8, warps, stages)
        if not applies(a, b):
            return gemm(a, b, bias, alpha, beta, (*tactic[:6], 1))
        return tma_gemm(a, b, bias, alpha, beta, tuple(tactic), sm_count(a))
