"""The fused-MoE Triton kernel (``triton_moe.py``) as candidates for ``flashtune.moe`` and
``flashtune.grouped_mm``: their tactics, pruned per bucket, and their runners.

Offered for CUDA tensors (and, in tests, CPU tensors under the interpreter: ``triton_runner.py``).
Importing this module does not import Triton; running a tactic does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..tuner.buckets import next_pow2
from ..tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic
from . import sm_count
from .triton_runner import DTYPES, INTERPRETER_MAX_TACTICS, TritonRunner, _interpreting, max_smem

SMALLEST_TACTIC: Tactic = (16, 32, 32, 8, 4, 2)  # offered when no tile of the list fits a problem
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


# ----------------------------------------------------------------------------------------------
# Tactics
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), from decode-sized row blocks to large tiles.
# fmt: off
TILES = (  # grouped by BLOCK_M
    (16, 32, 64, 4, 4), (16, 64, 32, 4, 4), (16, 64, 64, 4, 4), (16, 64, 128, 4, 3), (16, 128, 64, 4, 4),
    (16, 128, 128, 4, 3), (16, 256, 64, 8, 3),
    (32, 64, 32, 4, 4), (32, 64, 64, 4, 4), (32, 64, 128, 4, 3), (32, 128, 64, 4, 4), (32, 128, 128, 8, 3),
    (32, 256, 64, 8, 3),
    (64, 64, 32, 4, 4), (64, 64, 64, 4, 3), (64, 128, 32, 4, 4), (64, 128, 64, 4, 3), (64, 128, 64, 8, 4),
    (64, 256, 32, 8, 4), (64, 256, 64, 8, 3),
    (128, 64, 32, 4, 4), (128, 64, 64, 4, 3), (128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 128, 128, 8, 2),
    (128, 256, 64, 8, 3),
)
# fmt: on
# Tiles also offered without grouped ordering (GROUP_M = 1), where many row blocks compete.
UNGROUPED = {(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)}


def tactics_for(m: int, n: int, k: int, elem_bytes: int, smem_bytes: int = 227 * 1024) -> list[Tactic]:
    """Tactics for a grouped GEMM with about ``m`` rows per expert: BLOCK_M within the next power
    of two of m (min 16) and at least a quarter of it (capped at 64), no tile wider than N or
    deeper than K (min 32), shared memory within ``smem_bytes``; never empty."""
    m_cap = max(16, next_pow2(max(m, 1)))
    m_low = max(16, min(64, m_cap // 4))
    n_cap = max(32, next_pow2(max(n, 1)))
    k_cap = max(32, next_pow2(max(k, 1)))
    out = []
    for bm, bn, bk, warps, stages in TILES:
        if not m_low <= bm <= m_cap or bn > n_cap or bk > k_cap:
            continue
        if (bm * bk + bk * bn) * elem_bytes * stages > smem_bytes:
            continue
        out.append((bm, bn, bk, 8, warps, stages))
        if (bm, bn, bk, warps, stages) in UNGROUPED:
            out.append((bm, bn, bk, 1, warps, stages))
    return out or [SMALLEST_TACTIC]


def _offered(x: torch.Tensor) -> bool:
    return x.dtype in DTYPES and (x.is_cuda or (x.device.type == "cpu" and _interpreting()))


# ----------------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------------


class TritonMoeRunner(TritonRunner):
    """Fused MoE experts (two grouped GEMMs with the routed weight fused into the second).
    Inputs ``(hidden, topk_weights, topk_ids, w1, w2, activation, w3)``; stacked [gate; up] ``w1``
    only (``w3`` None): separate gate and up weights are not offered to it."""

    name = "triton_moe"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        hidden, topk_weights, topk_ids, w1, w2, activation, w3 = inputs
        if not _offered(hidden) or activation not in ACTIVATIONS or w3 is not None:
            return []
        if w1.dtype != hidden.dtype or w2.dtype != hidden.dtype or not topk_weights.is_floating_point():
            return []
        if topk_ids.is_floating_point() or topk_ids.is_complex():
            return []
        if any(x.device != hidden.device for x in (topk_weights, topk_ids, w1, w2)):
            return []
        shapes = profile.shapes
        t, h = shapes[0]
        top_k = shapes[2][1]
        e, two_i, h1 = shapes[3]
        e2, h2, inter = shapes[4]
        if two_i % 2 or inter != two_i // 2 or h1 != h or h2 != h or e2 != e:
            return []
        rows_per_expert = -(-t * top_k // max(e, 1))
        tactics = tactics_for(rows_per_expert, max(two_i, h), max(h, inter), hidden.element_size(), max_smem(hidden))
        return tactics[:INTERPRETER_MAX_TACTICS] if _interpreting() else tactics

    def forward(self, inputs: Sequence[Any], tactic: Any = DEFAULT_TACTIC) -> torch.Tensor:
        from .triton_moe import fused_moe  # imports triton: only when a tactic runs

        return fused_moe(*inputs[:6], tactic=tactic)


class TritonGroupedMMRunner(TritonRunner):
    """``torch._grouped_mm`` for x [S, K], w [E, K, N], offs int32 [E]. Inputs ``(x, w, offs)``."""

    name = "triton_grouped_mm"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        x, w, offs = inputs
        if not _offered(x) or w.dtype != x.dtype or x.dim() != 2 or w.dim() != 3 or offs is None:
            return []
        if offs.dtype != torch.int32 or w.device != x.device or offs.device != x.device:
            return []
        (s, k), (e, k2, n) = profile.shapes[0], profile.shapes[1]
        if k2 != k:
            return []
        tactics = tactics_for(-(-s // max(e, 1)), n, k, x.element_size(), max_smem(x))
        return tactics[:INTERPRETER_MAX_TACTICS] if _interpreting() else tactics

    def forward(self, inputs: Sequence[Any], tactic: Any = DEFAULT_TACTIC) -> torch.Tensor:
        from .triton_moe import grouped_mm

        x, w, offs = inputs
        return grouped_mm(x, w, offs, tactic)


class TritonMoeDecodeRunner(TritonRunner):
    """MoE experts at decode sizes (``triton_moe_decode.py``): each (token, pick) pair reads only its
    expert's weights, split-K so every SM streams. Inputs as ``TritonMoeRunner``'s; offered for
    buckets with T * k <= 32 pairs. A tactic is ``(BLOCK_N, BLOCK_K, SPLIT_K, num_warps,
    num_stages)``; every tactic is correct for any number of pairs."""

    name = "triton_moe_decode"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        from .triton_moe_decode import MAX_PAIRS, decode_tactics

        if not TritonMoeRunner.get_valid_tactics(self, inputs, profile):  # the same inputs apply
            return []
        t, h = profile.shapes[0]
        pairs = t * profile.shapes[2][1]
        if pairs > MAX_PAIRS:
            return []
        two_i = profile.shapes[3][1]
        tactics = decode_tactics(pairs, two_i, h, two_i // 2, sm_count(inputs[0]))
        return tactics[:INTERPRETER_MAX_TACTICS] if _interpreting() else tactics

    def forward(self, inputs: Sequence[Any], tactic: Any = DEFAULT_TACTIC) -> torch.Tensor:
        from .triton_moe_decode import decode_moe, default_tactic

        hidden, topk_weights, topk_ids, w1, w2, activation = inputs[:6]
        if tactic == DEFAULT_TACTIC:
            two_i = w1.shape[1]
            tactic = default_tactic(topk_ids.numel(), two_i, hidden.shape[1], two_i // 2, sm_count(hidden))
        return decode_moe(hidden, topk_weights, topk_ids, w1, w2, activation, tuple(tactic))
