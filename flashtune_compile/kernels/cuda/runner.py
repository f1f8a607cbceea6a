"""The hand-written skinny-M CUDA linear (``skinny_gemm.cu``) as a tuner candidate.

Inputs are linear's ``(x [M, K], w [N, K], b [N] | None)``. The runner applies to CUDA (not ROCm)
fp16/bf16/fp32 tensors of one dtype and device, w contiguous, x with unit stride along K, and a
bucket with M <= 16. A tactic is ``(threads, n_per_block, split_k)``; every tactic is correct for
every M <= 16, so a tactic tuned at a bucket is reused for all smaller M. Importing this module
compiles nothing: the extension is built on the first ``forward``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flashtune_compile.tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner

from .. import sm_count
from . import load_skinny_gemm

MAX_M = 16
THREADS = (128, 256)
N_PER_BLOCK = (1, 2, 4, 8)
SPLIT_K = (1, 2, 4, 8)
MIN_K_FOR_SPLIT = 2048  # below this, one block per row group already finishes quickly
MIN_K_PER_SPLIT = 256  # never give a split fewer K elements than this
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _blocks(n: int, n_per_block: int) -> int:
    return -(-n // n_per_block)


def skinny_tactics(n: int, k: int, sms: int) -> list[tuple[int, int, int]]:
    """The pruned tactic space for w [n, k] on a GPU with ``sms`` multiprocessors.

    n_per_block is kept at most n (no block of mostly clamped rows). split_k > 1 only when
    k >= 2048, each split keeps >= 256 elements of K, and the unsplit grid would not already fill
    the GPU twice over (ceil(n / n_per_block) < 2 * sms): there split-K only adds a reduce pass."""
    out = []
    for threads in THREADS:
        for npb in N_PER_BLOCK:
            if npb > 1 and npb > n:
                continue
            for split in SPLIT_K:
                if split > 1 and (k < MIN_K_FOR_SPLIT or k // split < MIN_K_PER_SPLIT or _blocks(n, npb) >= 2 * sms):
                    continue
                out.append((threads, npb, split))
    return out


def default_tactic(n: int, k: int, sms: int) -> tuple[int, int, int]:
    """Tactic -1: 256 threads, the most rows per block that still gives >= 2 blocks per SM, and
    split-K only while the grid has fewer blocks than SMs."""
    npb = next((p for p in (4, 2) if _blocks(n, p) >= 2 * sms), 1)
    split = 1
    while (
        split < SPLIT_K[-1]
        and k >= MIN_K_FOR_SPLIT
        and _blocks(n, npb) * split < sms
        and k // (2 * split) >= MIN_K_PER_SPLIT
    ):
        split *= 2
    return (256, npb, split)


def applies(x: Any, w: Any, b: Any) -> bool:
    """Whether the kernel accepts these inputs' metadata (device, dtype, layout), any M."""
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        return False
    if torch.version.cuda is None or not x.is_cuda or x.dtype not in SUPPORTED_DTYPES:
        return False
    if x.dim() != 2 or w.dim() != 2 or w.dtype != x.dtype or w.device != x.device:
        return False
    if not w.is_contiguous() or x.stride(-1) != 1 or w.shape[1] != x.shape[1]:
        return False
    if b is not None:
        if not isinstance(b, torch.Tensor) or b.dtype != x.dtype or b.device != x.device:
            return False
        if b.dim() != 1 or b.shape[0] != w.shape[0] or not b.is_contiguous():
            return False
    return True


def _as_tactic(tactic: Tactic) -> tuple[int, int, int]:
    if not isinstance(tactic, (tuple, list)) or len(tactic) != 3:
        raise ValueError(f"cuda_skinny tactic must be (threads, n_per_block, split_k) or -1, got {tactic!r}")
    threads, npb, split = (int(v) for v in tactic)
    if threads not in THREADS or npb not in N_PER_BLOCK or split not in SPLIT_K:
        raise ValueError(f"invalid cuda_skinny tactic {tactic!r}")
    return threads, npb, split


class CudaSkinnyLinearRunner(TunableRunner):
    """``x @ w.T + b`` by the skinny-M CUDA kernel (w streamed once with 16-byte loads, fp32
    accumulation, optional deterministic split-K). Functional: never writes its inputs."""

    name = "cuda_skinny"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        x, w, b = inputs
        if not applies(x, w, b):
            return []
        m = int(profile.shapes[0][0])
        n, k = (int(v) for v in profile.shapes[1])
        if m > MAX_M:
            return []
        return list(skinny_tactics(n, k, sm_count(x)))

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        x, w, b = inputs
        if tactic == DEFAULT_TACTIC:
            threads, npb, split = default_tactic(w.shape[0], w.shape[1], sm_count(x))
        else:
            threads, npb, split = _as_tactic(tactic)
        return load_skinny_gemm().skinny_linear(x, w, b, threads, npb, split)
