"""Fused MoE in Triton: a grouped GEMM over expert-sorted rows, and the MoE and grouped GEMM on it.

Rows (for the MoE, the flattened (token, k) pairs) are first *aligned* (``triton_moe_align.py``):
sorted by expert, each expert's group padded to a multiple of BLOCK_M. One kernel then computes
every BLOCK_M block against its expert's weight::

    C[r, :] = A[r // A_DIV, :] @ W[e]^T      (* topk_weight[r] when MUL_WEIGHT)

with ``W[e]`` addressed by strides as an [N, K] matrix, so both transformers' ``[E, N, K]``
expert weights and a ``[E, K, N]`` grouped_mm weight are read in place. fp32 accumulation,
masked edges for any N and K, grouped program ordering. A tactic is the tuple
``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..tuner.runner import DEFAULT_TACTIC
from .triton_launch import launch
from .triton_moe_align import align_offsets, align_tokens

Tactic = tuple  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
INTERPRET = bool(triton.knobs.runtime.interpret)  # kernels run on the CPU through Triton's interpreter
DEFAULT_MOE_TACTIC: Tactic = (64, 64, 32, 8, 4, 3)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


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
    launch(
        _moe_gemm_kernel,
        grid,
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
