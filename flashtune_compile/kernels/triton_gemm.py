"""One Triton GEMM for the whole matmul family: ``C[b] = alpha * A[b] @ B[b] + beta * bias[b]``.

Any strides (so ``w.T``, transposed and sliced operands need no copy), masked edges for any M, N,
K, fp32 accumulation, fused alpha/beta/bias epilogue, fp16 / bf16 / fp32 inputs (fp32 through
TF32 when ``torch.backends.cuda.matmul.allow_tf32`` allows it), an optional split-K that
accumulates partial products into an fp32 buffer with atomics. A tactic is the tuple
``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, SPLIT_K)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_launch import launch

Tactic = tuple  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, SPLIT_K)
INTERPRET = bool(triton.knobs.runtime.interpret)  # kernels run on the CPU through Triton's interpreter


@triton.jit
def _gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    M,
    N,
    K,
    s_ab,
    s_am,
    s_ak,
    s_bb,
    s_bk,
    s_bn,
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
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid, pid_k, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # Grouped ordering: GROUP_M row-blocks share their B tiles in L2.
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    a = a_ptr + batch * s_ab + rm[:, None] * s_am + rk[None, :] * s_ak
    b = b_ptr + batch * s_bb + rk[:, None] * s_bk + rn[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k_ok = (k - pid_k * BLOCK_K + rk) < K
        a_tile = tl.load(a, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        b_tile = tl.load(b, mask=k_ok[:, None] & (rn[None, :] < N), other=0.0)
        if UPCAST:  # only under TRITON_INTERPRET, whose bf16 tl.dot is wrong (triton 3.9)
            a_tile, b_tile = a_tile.to(tl.float32), b_tile.to(tl.float32)
        acc += tl.dot(a_tile, b_tile, input_precision=PRECISION)
        a += BLOCK_K * SPLIT_K * s_ak
        b += BLOCK_K * SPLIT_K * s_bk
    acc = acc * alpha
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_BIAS:
        if pid_k == 0:
            x = tl.load(bias_ptr + batch * s_xb + rm[:, None] * s_xm + rn[None, :] * s_xn, mask=mask, other=0.0)
            acc += beta * x.to(tl.float32)
    c = c_ptr + batch * s_cb + rm[:, None] * s_cm + rn[None, :] * s_cn
    if SPLIT_K == 1:
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(c, acc, mask=mask)


def _as3d(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides (batch, row, col) of a 2-D or 3-D tensor (batch stride 0 for 2-D)."""
    return (0, *t.stride()) if t.dim() == 2 else tuple(t.stride())


def gemm(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, alpha: float, beta: float, tactic: Tactic
) -> torch.Tensor:
    """``alpha * a @ b + beta * bias`` for a [(B,) M, K], b [(B,) K, N]; bias broadcastable to the
    output (ignored when beta == 0, as ATen does). Output contiguous, a's dtype."""
    bm, bn, bk, gm, warps, stages, split_k = tactic
    batch = a.shape[0] if a.dim() == 3 else 1
    m, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    shape = (batch, m, n) if a.dim() == 3 else (m, n)
    out_dtype = torch.float32 if split_k > 1 else a.dtype
    c = (torch.zeros if split_k > 1 else torch.empty)(shape, device=a.device, dtype=out_dtype)
    has_bias = bias is not None and beta != 0
    x = bias.expand(shape) if has_bias else c
    precision = "tf32" if a.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and a.is_cuda else "ieee"
    if m and n:
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split_k, batch)
        launch(
            _gemm_kernel,
            grid,
            a,
            b,
            c,
            x,
            m,
            n,
            k,
            *_as3d(a),
            *_as3d(b),
            *_as3d(c),
            *_as3d(x),
            float(alpha),
            float(beta),
            HAS_BIAS=has_bias,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=gm,
            SPLIT_K=split_k,
            PRECISION=precision,
            UPCAST=INTERPRET and a.dtype == torch.bfloat16,
            num_warps=warps,
            num_stages=stages,
        )
    return c.to(a.dtype) if split_k > 1 else c


# Tile shapes worth timing (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), from small-M
# (decode) to large square tiles; the pruner below picks those that fit a bucket.
# fmt: off
TILES = (  # grouped by BLOCK_M
    (16, 32, 64, 4, 4), (16, 64, 64, 4, 4), (16, 64, 128, 4, 3), (16, 128, 128, 4, 3), (16, 256, 64, 8, 3),
    (32, 64, 64, 4, 4), (32, 128, 64, 4, 4), (32, 64, 128, 4, 3),
    (64, 64, 64, 4, 4), (64, 128, 32, 4, 4), (64, 128, 64, 4, 3), (64, 256, 64, 8, 3),
    (128, 64, 64, 4, 4), (128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
)
# fmt: on
SPLITS = (2, 4, 8)


def tactics_for(m: int, n: int, k: int, elem_bytes: int, smem_bytes: int = 227 * 1024) -> list[Tactic]:
    """Tactics for an (M, N, K) bucket: no BLOCK_M beyond 2x the bucket's M (min 16), no tile wider
    than the problem, shared memory within ``smem_bytes``; split-K only for M <= 64 and K >= 1024
    with at least 4 K-tiles per split."""
    m_cap = max(16, 2 * triton.next_power_of_2(max(m, 1)))
    n_cap = max(32, triton.next_power_of_2(max(n, 1)))
    out = []
    for bm, bn, bk, warps, stages in TILES:
        if bm > m_cap or bn > n_cap or (bm * bk + bk * bn) * elem_bytes * stages > smem_bytes:
            continue
        out.append((bm, bn, bk, 8, warps, stages, 1))
        if m <= 64 and k >= 1024 and bm <= 32:
            out += [(bm, bn, bk, 8, warps, stages, s) for s in SPLITS if k // (s * bk) >= 4]
    return out
