"""Fused MoE in Triton: a grouped GEMM over expert-sorted rows, and its two tunable runners.

Rows (for the MoE, the flattened (token, k) pairs) are first *aligned* in plain torch, without
any host sync (so it can be captured in a CUDA graph): they are sorted by expert and every
expert's group is padded up to a multiple of BLOCK_M with a sentinel, into a buffer whose size
depends on the shapes only. Each BLOCK_M block of that buffer then belongs to one expert, and one
kernel computes every block against its expert's weight::

    C[r, :] = A[r // A_DIV, :] @ W[e]^T      (* topk_weight[r] when MUL_WEIGHT)

with ``W[e]`` addressed by strides as an [N, K] matrix, so both transformers' ``[E, N, K]``
expert weights and a ``[E, K, N]`` grouped_mm weight are read in place. fp32 accumulation,
masked edges for any N and K, grouped program ordering. A tactic is the tuple
``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..tuner.runner import DEFAULT_TACTIC, BucketProfile, TunableRunner
from .triton_runner import DTYPES, INTERPRETER_MAX_TACTICS, _interpreting

Tactic = tuple  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
INTERPRET = bool(triton.knobs.runtime.interpret)  # kernels run on the CPU through Triton's interpreter
DEFAULT_MOE_TACTIC: Tactic = (64, 64, 32, 8, 4, 3)
SMALLEST_TACTIC: Tactic = (16, 32, 32, 8, 4, 2)  # offered when no tile of the list fits a problem
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


# ----------------------------------------------------------------------------------------------
# Alignment (plain torch, no host sync)
# ----------------------------------------------------------------------------------------------


def padded_size(num_rows: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on the aligned length: every non-empty expert (at most
    min(E, S) of them) pads by at most block_m - 1."""
    bound = num_rows + min(num_experts, num_rows) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


def _align(key: torch.Tensor, num_experts: int, block_m: int, presorted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """key[r] in [0, E] (E = no expert) for every row r; ``presorted``: key is non-decreasing."""
    s, e_count, dev = key.numel(), num_experts, key.device
    p = padded_size(s, e_count, block_m)
    key = key.long()
    if presorted:
        order = torch.arange(s, device=dev)
        skey = key
    else:
        order = torch.argsort(key, stable=True)
        skey = key[order]
    counts = torch.zeros(e_count + 1, device=dev, dtype=torch.long).scatter_add_(0, key, torch.ones_like(key))
    group_start = torch.cumsum(counts, 0) - counts  # unpadded start of each group in sorted order
    padded = (counts[:e_count] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = torch.cat([padded_end - padded, padded_end.new_full((1,), p)])  # slot E: the dump
    pos = torch.arange(s, device=dev)
    dest = padded_start[skey] + (pos - group_start[skey])
    dest = torch.where(skey < e_count, dest, p)  # rows without an expert land in a dropped slot
    sorted_rows = torch.full((p + 1,), s, device=dev, dtype=torch.int32)
    sorted_rows.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, p, block_m, device=dev, dtype=torch.long)
    block_expert = torch.searchsorted(padded_end, starts, right=True)  # first expert ending past the start
    block_expert = torch.where(block_expert < e_count, block_expert, -1).to(torch.int32)
    return sorted_rows[:p], block_expert


def align_tokens(expert_of_row: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort rows 0..S-1 by expert (stable) and pad every expert's group to a multiple of block_m
    with the sentinel S. Returns ``(sorted_rows int32 [P], block_expert int32 [P // block_m])``
    with P = ``padded_size(S, E, block_m)``; unused tail blocks have expert -1. Rows whose expert
    is outside [0, E) are dropped."""
    key = expert_of_row.reshape(-1).long()
    key = torch.where((key >= 0) & (key < num_experts), key, num_experts)
    return _align(key, num_experts, block_m, presorted=False)


def align_offsets(offs: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``align_tokens`` for rows already grouped by expert as in ``torch._grouped_mm``:
    rows offs[e-1] .. offs[e]-1 belong to expert e, rows >= offs[-1] to none."""
    rows = torch.arange(num_rows, device=offs.device, dtype=offs.dtype)
    key = torch.searchsorted(offs, rows, right=True)  # == E for rows past offs[-1]
    return _align(key, offs.numel(), block_m, presorted=True)


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    w_ptr,
    c_ptr,
    tw_ptr,
    rows_ptr,
    block_expert_ptr,
    N,
    K,
    S,
    A_DIV,
    NUM_BLOCKS,
    s_am,
    s_ak,
    s_we,
    s_wn,
    s_wk,
    s_cm,
    s_cn,
    s_tw,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    # Grouped ordering: GROUP_M row-blocks (mostly of one expert) share their weight tiles in L2.
    grid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = min(NUM_BLOCKS - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m

    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:  # unused tail block: nothing to compute or write
        return
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < S
    a_rows = (rows // A_DIV).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a = a_ptr + a_rows[:, None] * s_am + rk[None, :] * s_ak
    w = w_ptr + expert.to(tl.int64) * s_we + rk[:, None] * s_wk + rn[None, :] * s_wn  # W[e]^T tile [K, N]
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + rk) < K
        a_tile = tl.load(a, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_tile = tl.load(w, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # only under TRITON_INTERPRET, whose low-precision tl.dot is wrong (triton 3.9)
            a_tile, w_tile = a_tile.to(tl.float32), w_tile.to(tl.float32)
        acc += tl.dot(a_tile, w_tile, input_precision=PRECISION)
        a += BLOCK_K * s_ak
        w += BLOCK_K * s_wk
    if MUL_WEIGHT:
        # As the eager model: the product is first rounded to the activation dtype, then scaled.
        tw = tl.load(tw_ptr + rows.to(tl.int64) * s_tw, mask=row_ok, other=0.0)
        acc = acc.to(a_ptr.dtype.element_ty).to(tl.float32) * tw.to(tl.float32)[:, None]
    c = c_ptr + rows.to(tl.int64)[:, None] * s_cm + rn[None, :] * s_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _precision(x: torch.Tensor) -> str:
    return "tf32" if x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def moe_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    w_strides: tuple[int, int, int],
    n: int,
    k: int,
    out: torch.Tensor,
    sorted_rows: torch.Tensor,
    block_expert: torch.Tensor,
    a_div: int,
    tactic: Tactic,
    topk_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the grouped GEMM into ``out`` (rows never touched are left as they are).

    ``w_strides`` = (expert, n, k) strides addressing ``W[e]`` as an [N, K] matrix; ``out`` has
    one row per entry index (the sentinel is ``out.shape[0]``); ``topk_weights`` (1-D, one per
    out row) switches on MUL_WEIGHT."""
    bm, bn, bk, gm, warps, stages = tactic
    num_blocks = block_expert.numel()
    if num_blocks == 0 or n == 0 or out.shape[0] == 0:
        return out
    tw = topk_weights if topk_weights is not None else out
    s_tw = topk_weights.stride(0) if topk_weights is not None else 0
    grid = (num_blocks * triton.cdiv(n, bn),)
    _moe_gemm_kernel[grid](
        a,
        w,
        out,
        tw,
        sorted_rows,
        block_expert,
        n,
        k,
        out.shape[0],
        a_div,
        num_blocks,
        a.stride(0),
        a.stride(1),
        *w_strides,
        out.stride(0),
        out.stride(1),
        s_tw,
        MUL_WEIGHT=topk_weights is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=gm,
        PRECISION=_precision(a),
        UPCAST=INTERPRET and a.dtype != torch.float32,
        num_warps=warps,
        num_stages=stages,
    )
    return out


# ----------------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------------


def _act(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r} (expected one of {ACTIVATIONS})")


def _tactic(tactic: Any) -> Tactic:
    return DEFAULT_MOE_TACTIC if tactic == DEFAULT_TACTIC else tuple(tactic)


def fused_moe(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    activation: str = "silu",
    tactic: Any = DEFAULT_TACTIC,
) -> torch.Tensor:
    """The experts forward of transformers' grouped_mm MoE: hidden [T, H], topk_weights and
    topk_ids [T, k], w1 [E, 2I, H] (gate rows then up rows), w2 [E, H, I]. Returns [T, H] in
    hidden's dtype; ids outside [0, E) contribute nothing."""
    tactic = _tactic(tactic)
    t, h = hidden.shape
    top_k = topk_ids.shape[1]
    e, two_i, _ = w1.shape
    inter = two_i // 2
    out_dtype = torch.result_type(hidden, topk_weights)
    s = t * top_k
    if s == 0 or e == 0:
        return torch.zeros(t, h, device=hidden.device, dtype=hidden.dtype)
    sorted_rows, block_expert = align_tokens(topk_ids, e, tactic[0])
    c1 = torch.zeros(s, two_i, device=hidden.device, dtype=hidden.dtype)
    moe_gemm(
        hidden, w1, (w1.stride(0), w1.stride(1), w1.stride(2)), two_i, h, c1, sorted_rows, block_expert, top_k, tactic
    )
    act = _act(c1[:, :inter], activation) * c1[:, inter:]
    c2 = torch.zeros(s, h, device=hidden.device, dtype=out_dtype)
    moe_gemm(
        act,
        w2,
        (w2.stride(0), w2.stride(1), w2.stride(2)),
        h,
        inter,
        c2,
        sorted_rows,
        block_expert,
        1,
        tactic,
        topk_weights.reshape(-1),
    )
    return c2.view(t, top_k, h).sum(1).to(hidden.dtype)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, tactic: Any = DEFAULT_TACTIC) -> torch.Tensor:
    """``torch._grouped_mm(x, w, offs)`` for x [S, K], w [E, K, N], offs int32 [E] (cumulative
    group ends): rows offs[e-1] .. offs[e]-1 use w[e]; rows >= offs[-1] are zero. Output x's dtype."""
    tactic = _tactic(tactic)
    s, k = x.shape
    n = w.shape[2]
    out = torch.zeros(s, n, device=x.device, dtype=x.dtype)
    if s == 0 or n == 0 or w.shape[0] == 0:
        return out
    sorted_rows, block_expert = align_offsets(offs, s, tactic[0])
    return moe_gemm(x, w, (w.stride(0), w.stride(2), w.stride(1)), n, k, out, sorted_rows, block_expert, 1, tactic)


# ----------------------------------------------------------------------------------------------
# Tactics
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), from decode-sized row blocks to large tiles.
TILES = (
    (16, 32, 64, 4, 4),
    (16, 64, 32, 4, 4),
    (16, 64, 64, 4, 4),
    (16, 64, 128, 4, 3),
    (16, 128, 64, 4, 4),
    (16, 128, 128, 4, 3),
    (16, 256, 64, 8, 3),
    (32, 64, 32, 4, 4),
    (32, 64, 64, 4, 4),
    (32, 64, 128, 4, 3),
    (32, 128, 64, 4, 4),
    (32, 128, 128, 8, 3),
    (32, 256, 64, 8, 3),
    (64, 64, 32, 4, 4),
    (64, 64, 64, 4, 3),
    (64, 128, 32, 4, 4),
    (64, 128, 64, 4, 3),
    (64, 128, 64, 8, 4),
    (64, 256, 32, 8, 4),
    (64, 256, 64, 8, 3),
    (128, 64, 32, 4, 4),
    (128, 64, 64, 4, 3),
    (128, 128, 32, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 128, 128, 8, 2),
    (128, 256, 64, 8, 3),
)
# Tiles also offered without grouped ordering (GROUP_M = 1), where many row blocks compete.
UNGROUPED = {(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)}


def tactics_for(m: int, n: int, k: int, elem_bytes: int, smem_bytes: int = 227 * 1024) -> list[Tactic]:
    """Tactics for a grouped GEMM with about ``m`` rows per expert: BLOCK_M within the next power
    of two of m (min 16) and at least a quarter of it (capped at 64), no tile wider than N or
    deeper than K (min 32), shared memory within ``smem_bytes``; never empty."""
    m_cap = max(16, triton.next_power_of_2(max(m, 1)))
    m_low = max(16, min(64, m_cap // 4))
    n_cap = max(32, triton.next_power_of_2(max(n, 1)))
    k_cap = max(32, triton.next_power_of_2(max(k, 1)))
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


def _smem(x: torch.Tensor) -> int:
    if x.is_cuda:
        from triton.runtime import driver

        return driver.active.utils.get_device_properties(x.device.index or 0)["max_shared_mem"]
    return 227 * 1024


def _offered(x: torch.Tensor) -> bool:
    return x.dtype in DTYPES and (x.is_cuda or (x.device.type == "cpu" and _interpreting()))


# ----------------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------------


class TritonMoeRunner(TunableRunner):
    """Fused MoE experts (two grouped GEMMs with the routed weight fused into the second).
    Inputs ``(hidden, topk_weights, topk_ids, w1, w2, activation)``."""

    name = "triton_moe"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        hidden, topk_weights, topk_ids, w1, w2, activation = inputs
        if not _offered(hidden) or activation not in ACTIVATIONS:
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
        rows_per_expert = triton.cdiv(t * top_k, max(e, 1))
        tactics = tactics_for(rows_per_expert, max(two_i, h), max(h, inter), hidden.element_size(), _smem(hidden))
        return tactics[:INTERPRETER_MAX_TACTICS] if _interpreting() else tactics

    def forward(self, inputs: Sequence[Any], tactic: Any = DEFAULT_TACTIC) -> torch.Tensor:
        return fused_moe(*inputs, tactic=tactic)


class TritonGroupedMMRunner(TunableRunner):
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
        tactics = tactics_for(triton.cdiv(s, max(e, 1)), n, k, x.element_size(), _smem(x))
        return tactics[:INTERPRETER_MAX_TACTICS] if _interpreting() else tactics

    def forward(self, inputs: Sequence[Any], tactic: Any = DEFAULT_TACTIC) -> torch.Tensor:
        x, w, offs = inputs
        return grouped_mm(x, w, offs, tactic)
