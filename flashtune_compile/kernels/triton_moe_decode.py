"""MoE experts at decode sizes in Triton: each (token, pick) pair reads only its expert's weights.

With a handful of (token, pick) pairs (decode: T * k <= 32), a product per pair is a vector times
a matrix: the cost is reading each picked expert's weights once, and the grouped GEMM's 16-row
tiles, sorting and padding are overhead. Here every pair is one row, the expert's output columns
are cut into narrow blocks and K into ``SPLIT_K`` chunks so every SM streams, and each chunk
writes an fp32 partial product to a workspace; a small kernel per product sums the chunks in a
fixed order and finishes it, rounding as ``kernels/moe.py`` does:

    h[p]   = round(act(round(x[t] @ gate[e]^T)) * round(x[t] @ up[e]^T))      (gate_up, then finish)
    out[t] = round(sum_j round(h[t, j] @ w2[e]^T) * weight[t, j])              (down, then combine)

A tactic is ``(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)``, one for both products.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_launch import launch

Tactic = tuple  # (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
MAX_PAIRS = 32  # the runner is offered for buckets with T * k up to this
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _pair_gemv_kernel(
    x_ptr,
    w_ptr,
    ids_ptr,
    p_ptr,
    N,
    K,
    E,
    A_DIV,
    k_per_split,
    s_xm,
    s_xk,
    s_we,
    s_wn,
    s_wk,
    s_ps,
    s_pm,
    s_pn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """p[split, pair, n] = sum over this split's K of x[pair // A_DIV, k] * W[ids[pair], n, k]."""
    pid_n, pair, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    expert = tl.load(ids_ptr + pair)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    out = p_ptr + pid_k * s_ps + pair * s_pm + rn * s_pn
    if (expert < 0) | (expert >= E):  # a pick outside the experts contributes nothing
        tl.store(out, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=n_ok)
        return
    rk = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    x = x_ptr + (pair // A_DIV).to(tl.int64) * s_xm + (k_start + rk) * s_xk
    w = w_ptr + expert.to(tl.int64) * s_we + rn[:, None] * s_wn + (k_start + rk)[None, :] * s_wk
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        k_ok = (k + rk) < k_end
        x_tile = tl.load(x, mask=k_ok, other=0.0).to(tl.float32)
        w_tile = tl.load(w, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w_tile * x_tile[None, :], axis=1)
        x += BLOCK_K * s_xk
        w += BLOCK_K * s_wk
    tl.store(out, acc, mask=n_ok)


@triton.jit
def _gated_kernel(
    p_ptr,
    h_ptr,
    INTER,
    s_ps,
    s_pm,
    s_hm,
    SPLIT_K: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """h[pair, i] = round(act(round(gate)) * round(up)) from the partial [gate | up] products."""
    pid, pair = tl.program_id(0), tl.program_id(1)
    ri = pid * BLOCK + tl.arange(0, BLOCK)
    ok = ri < INTER
    g = tl.zeros((BLOCK,), dtype=tl.float32)
    u = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        g += tl.load(p_ptr + s * s_ps + pair * s_pm + ri, mask=ok, other=0.0)
        u += tl.load(p_ptr + s * s_ps + pair * s_pm + INTER + ri, mask=ok, other=0.0)
    dt = h_ptr.dtype.element_ty
    g = g.to(dt).to(tl.float32)
    u = u.to(dt).to(tl.float32)
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    tl.store(h_ptr + pair * s_hm + ri, (a.to(dt).to(tl.float32) * u).to(dt), mask=ok)


@triton.jit
def _combine_kernel(
    p_ptr,
    tw_ptr,
    out_ptr,
    H,
    s_ps,
    s_pm,
    s_tw,
    s_om,
    TOP_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ROUND_PRODUCT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[t] = round(sum_j round(y[t, j]) * weight[t, j]), y summed over the splits; with
    ROUND_PRODUCT (weights of the activations' dtype) each weighted product is rounded too."""
    pid, t = tl.program_id(0), tl.program_id(1)
    rh = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rh < H
    dt = out_ptr.dtype.element_ty
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        y = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            y += tl.load(p_ptr + s * s_ps + (t * TOP_K + j) * s_pm + rh, mask=ok, other=0.0)
        weight = tl.load(tw_ptr + (t * TOP_K + j) * s_tw).to(tl.float32)
        product = y.to(dt).to(tl.float32) * weight
        if ROUND_PRODUCT:
            product = product.to(dt).to(tl.float32)
        total += product
    tl.store(out_ptr + t * s_om + rh, total.to(dt), mask=ok)


def _gemv_pairs(x, w, ids, n, k, a_div, tactic) -> torch.Tensor:
    """The fp32 partial products [splits, pairs, n] of every pair against its expert's W [E, n, k]."""
    bn, bk, split_k, warps, stages = tactic
    k_per_split = triton.cdiv(triton.cdiv(max(k, 1), split_k), bk) * bk
    splits = triton.cdiv(max(k, 1), k_per_split)
    pairs = ids.numel()
    p = torch.empty((splits, pairs, n), device=x.device, dtype=torch.float32)
    launch(
        _pair_gemv_kernel,
        (triton.cdiv(n, bn), pairs, splits),
        x,
        w,
        ids,
        p,
        n,
        k,
        w.shape[0],
        a_div,
        k_per_split,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        p.stride(0),
        p.stride(1),
        p.stride(2),
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=warps,
        num_stages=stages,
    )
    return p


def decode_moe(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    activation: str,
    tactic: Tactic,
) -> torch.Tensor:
    """``fused_moe``'s semantics (hidden [T, H], topk_weights and topk_ids [T, k], w1 [E, 2I, H]
    gate rows then up rows, w2 [E, H, I]; ids outside [0, E) contribute nothing) for a few pairs:
    returns [T, H] in hidden's dtype."""
    t, h = hidden.shape
    top_k = topk_ids.shape[1]
    two_i = w1.shape[1]
    inter = two_i // 2
    out = torch.empty(t, h, device=hidden.device, dtype=hidden.dtype)
    if t * top_k == 0 or h == 0:
        return out.zero_()
    ids = topk_ids.reshape(-1)
    if inter == 0:
        return out.zero_()
    p1 = _gemv_pairs(hidden, w1, ids, two_i, h, top_k, tactic)
    act = torch.empty(t * top_k, inter, device=hidden.device, dtype=hidden.dtype)
    block = 256
    launch(
        _gated_kernel,
        (triton.cdiv(inter, block), t * top_k),
        p1,
        act,
        inter,
        p1.stride(0),
        p1.stride(1),
        act.stride(0),
        SPLIT_K=p1.shape[0],
        ACT=ACTIVATIONS[activation],
        BLOCK=block,
        num_warps=4,
    )
    p2 = _gemv_pairs(act, w2, ids, h, inter, 1, tactic)
    weights = topk_weights.reshape(-1)
    launch(
        _combine_kernel,
        (triton.cdiv(h, block), t),
        p2,
        weights,
        out,
        h,
        p2.stride(0),
        p2.stride(1),
        weights.stride(0),
        out.stride(0),
        TOP_K=top_k,
        SPLIT_K=p2.shape[0],
        ROUND_PRODUCT=torch.result_type(hidden, topk_weights) != torch.float32,
        BLOCK=block,
        num_warps=4,
    )
    return out


# (BLOCK_N, BLOCK_K, num_warps, num_stages): narrow column blocks, long K tiles.
TILES = ((16, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (16, 256, 4, 3), (64, 128, 8, 3))
SPLITS = (1, 2, 4, 8)


def decode_tactics(pairs: int, two_i: int, h: int, inter: int, sms: int) -> list[Tactic]:
    """Tactics for ``pairs`` (token, pick) pairs: split-K only while both products' grids stay
    within eight programs per SM and each chunk keeps at least four K tiles."""
    out = []
    for bn, bk, warps, stages in TILES:
        if bn > max(16, triton.next_power_of_2(min(two_i, h))):
            continue
        programs = pairs * triton.cdiv(min(two_i, h), bn)
        for split in SPLITS:
            if split > 1 and (programs * split > 8 * sms or min(h, inter) < 4 * split * bk):
                continue
            out.append((bn, bk, split, warps, stages))
    return out


@functools.cache  # the warm path of a bucket whose default won: computed once per shape
def default_tactic(pairs: int, two_i: int, h: int, inter: int, sms: int) -> Tactic:
    """Tactic -1: 32-column blocks of 128-deep tiles, split until two programs per SM."""
    programs, split = pairs * triton.cdiv(min(two_i, h), 32), 1
    while split < SPLITS[-1] and programs * split < 2 * sms and min(h, inter) >= 8 * split * 128:
        split *= 2
    return (32, 128, split, 4, 3)
