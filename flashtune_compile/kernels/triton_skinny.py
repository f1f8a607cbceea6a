"""A Triton GEMM for decode-sized products (M <= 32): ``C[b] = alpha * A[b] @ B[b] + beta * bias[b]``,
the matmul family's semantics (``triton_gemm.gemm``), built to stream B at the memory's rate.

At M <= 32 a product reads its weight once and does almost no arithmetic per byte, so what
matters is keeping every SM streaming: the N columns are cut into narrow blocks and K into
``SPLIT_K`` chunks, so even a 4096 x 4096 weight gives hundreds of programs. Rows of A below 16
are multiplied by a broadcast and sum (``tl.dot`` needs 16); at 16 and above by ``tl.dot``. With
``SPLIT_K > 1`` each chunk writes its fp32 partial product to a workspace and a second small
kernel sums the chunks in a fixed order, applies alpha, the bias and the cast: deterministic,
unlike atomics. A tactic is ``(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_gemm import _as3d
from .triton_launch import launch

Tactic = tuple  # (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
INTERPRET = bool(triton.knobs.runtime.interpret)
MAX_M = 32  # the runner is offered for buckets up to this M


@triton.jit
def _skinny_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    M,
    N,
    K,
    k_per_split,
    s_ab,
    s_am,
    s_ak,
    s_bb,
    s_bk,
    s_bn,
    s_cs,
    s_cb,
    s_cm,
    s_cn,
    s_xb,
    s_xm,
    s_xn,
    alpha,
    beta,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid, pid_k, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    grid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // grid_n, pid % grid_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    a = a_ptr + batch.to(tl.int64) * s_ab + rm[:, None] * s_am + (k_start + rk)[None, :] * s_ak
    b = b_ptr + batch.to(tl.int64) * s_bb + (k_start + rk)[:, None] * s_bk + rn[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        k_ok = (k + rk) < k_end
        a_tile = tl.load(a, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        b_tile = tl.load(b, mask=k_ok[:, None] & (rn[None, :] < N), other=0.0)
        if USE_DOT:
            if UPCAST:  # only under TRITON_INTERPRET, whose bf16 tl.dot is wrong
                a_tile, b_tile = a_tile.to(tl.float32), b_tile.to(tl.float32)
            acc += tl.dot(a_tile, b_tile, input_precision=PRECISION)
        else:
            acc += tl.sum(a_tile.to(tl.float32)[:, :, None] * b_tile.to(tl.float32)[None, :, :], axis=1)
        a += BLOCK_K * s_ak
        b += BLOCK_K * s_bk
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        acc = acc * alpha
        if HAS_BIAS:
            x = tl.load(bias_ptr + batch * s_xb + rm[:, None] * s_xm + rn[None, :] * s_xn, mask=mask, other=0.0)
            acc += beta * x.to(tl.float32)
        c = c_ptr + batch * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:  # this chunk's partial product, fp32, into the workspace's slice pid_k
        c = c_ptr + pid_k * s_cs + batch * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn
        tl.store(c, acc, mask=mask)


@triton.jit
def _split_sum_kernel(
    p_ptr,
    c_ptr,
    bias_ptr,
    M,
    N,
    s_ps,
    s_pb,
    s_pm,
    s_pn,
    s_cb,
    s_cm,
    s_cn,
    s_xb,
    s_xm,
    s_xn,
    alpha,
    beta,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid, batch = tl.program_id(0), tl.program_id(1)
    grid_n = tl.cdiv(N, BLOCK_N)
    rm = (pid // grid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % grid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    p = p_ptr + batch * s_pb + rm[:, None] * s_pm + rn[None, :] * s_pn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # a fixed order: the same sum on every run
        acc += tl.load(p + s * s_ps, mask=mask, other=0.0)
    acc = acc * alpha
    if HAS_BIAS:
        x = tl.load(bias_ptr + batch * s_xb + rm[:, None] * s_xm + rn[None, :] * s_xn, mask=mask, other=0.0)
        acc += beta * x.to(tl.float32)
    tl.store(c_ptr + batch * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


def skinny_gemm(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, alpha: float, beta: float, tactic: Tactic
) -> torch.Tensor:
    """``alpha * a @ b + beta * bias`` for a [(B,) M, K], b [(B,) K, N] of any strides; bias
    broadcastable to the output (ignored when beta == 0). Any M (blocks of ``BLOCK_M`` rows);
    output contiguous, a's dtype."""
    bm, bn, bk, split_k, warps, stages = tactic
    batch = a.shape[0] if a.dim() == 3 else 1
    m, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    shape = (batch, m, n) if a.dim() == 3 else (m, n)
    c = torch.empty(shape, device=a.device, dtype=a.dtype)
    if not (m and n):
        return c
    has_bias = bias is not None and beta != 0
    x = bias.expand(shape) if has_bias else c
    precision = "tf32" if a.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and a.is_cuda else "ieee"
    # each split's chunk of K: a whole number of BLOCK_K, so no chunk starts mid-tile
    k_per_split = triton.cdiv(triton.cdiv(max(k, 1), split_k), bk) * bk
    splits = triton.cdiv(max(k, 1), k_per_split)  # chunks that are not empty
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    out = c if splits == 1 else torch.empty((splits, *shape), device=a.device, dtype=torch.float32)
    s_out = (0, *_as3d(c)) if splits == 1 else (out.stride(0), *_as3d(out[0]))
    launch(
        _skinny_kernel,
        (tiles, splits, batch),
        a,
        b,
        out,
        x,
        m,
        n,
        k,
        k_per_split,
        *_as3d(a),
        *_as3d(b),
        *s_out,
        *_as3d(x),
        float(alpha),
        float(beta),
        HAS_BIAS=has_bias,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        SPLIT_K=1 if splits == 1 else split_k,
        USE_DOT=bm >= 16,
        PRECISION=precision,
        UPCAST=INTERPRET and a.dtype == torch.bfloat16,
        num_warps=warps,
        num_stages=stages,
    )
    if splits > 1:
        sm, sn = min(bm, 16), 128
        launch(
            _split_sum_kernel,
            (triton.cdiv(m, sm) * triton.cdiv(n, sn), batch),
            out,
            c,
            x,
            m,
            n,
            out.stride(0),
            *_as3d(out[0]),
            *_as3d(c),
            *_as3d(x),
            float(alpha),
            float(beta),
            HAS_BIAS=has_bias,
            SPLIT_K=splits,
            BLOCK_M=sm,
            BLOCK_N=sn,
            num_warps=4,
        )
    return c


# (BLOCK_N, BLOCK_K, num_warps, num_stages) per path: narrow column blocks, long K tiles.
# fmt: off
SUM_TILES = (
    (16, 64, 2, 3), (16, 64, 4, 3), (16, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3),
    (16, 256, 4, 3), (16, 128, 8, 3), (32, 64, 8, 3), (32, 128, 8, 3),
)
DOT_TILES = ((32, 64, 4, 4), (32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3), (32, 256, 4, 3))
# fmt: on
SPLITS = (1, 2, 4, 8, 16)
MAX_SUM_VALUES = 64  # BLOCK_M * BLOCK_N * BLOCK_K per thread on the broadcast path: kept in registers


def skinny_tactics(m: int, n: int, k: int, sms: int) -> list[Tactic]:
    """Tactics for an (M <= MAX_M, N, K) bucket on a GPU with ``sms`` multiprocessors. BLOCK_M is
    M's power of two (16 or more takes ``tl.dot``); split-K only while the grid stays within eight
    programs per SM (more loads in flight, up to there) and each chunk keeps at least four K tiles;
    the broadcast path only where its product fits in registers."""
    bm = triton.next_power_of_2(max(1, m))
    tiles = DOT_TILES if bm >= 16 else SUM_TILES
    out = []
    for bn, bk, warps, stages in tiles:
        if bn > max(16, triton.next_power_of_2(n)) or (bm < 16 and bm * bn * bk > MAX_SUM_VALUES * 32 * warps):
            continue
        blocks = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        for split in SPLITS:
            if split > 1 and (blocks * split > 8 * sms or k < 4 * split * bk):
                continue
            out.append((bm, bn, bk, split, warps, stages))
    return out


@functools.cache  # the warm path of a bucket whose default won: computed once per shape
def default_tactic(m: int, n: int, k: int, sms: int) -> Tactic:
    """Tactic -1: the second tile, split until the grid has two programs per SM (or K runs short)."""
    bm = triton.next_power_of_2(max(1, m))
    bn, bk, warps, stages = (DOT_TILES if bm >= 16 else SUM_TILES)[1]
    blocks = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    while split < SPLITS[-1] and blocks * split < 2 * sms and k >= 8 * split * bk:
        split *= 2
    return (bm, bn, bk, split, warps, stages)
