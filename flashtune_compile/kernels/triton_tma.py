"""A persistent Triton GEMM that reads its operands through TMA tensor descriptors (Hopper):
``C = alpha * A @ B + beta * bias`` for 2-D A [M, K] and B [K, N], the matmul family's semantics.

One program per SM walks the output tiles (grouped ordering, so neighbouring programs share
operand tiles in L2); each tile's A and B blocks are copied by the TMA unit (``TensorDescriptor``:
bounds handled by the hardware, zero padding past the edges), accumulated in fp32, and finished
by an epilogue applying alpha and the bias. B is read in whichever of its two layouts has unit
stride: a linear's weight [N, K] (``B_KMAJOR``) or a row-major [K, N]. TMA needs the innermost
stride 1 and the others 16-byte multiples (``applies``); elsewhere the tiled GEMM serves. A
tactic is ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .triton_launch import launch

Tactic = tuple  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
INTERPRET = bool(triton.knobs.runtime.interpret)
MIN_M = 64  # offered for buckets from this M: decode sizes have their own kernel


@triton.jit
def _tma_kernel(
    a_desc,
    b_desc,
    c_ptr,
    bias_ptr,
    M,
    N,
    K,
    s_cm,
    s_cn,
    s_xm,
    s_xn,
    alpha,
    beta,
    NUM_PROGRAMS,
    HAS_BIAS: tl.constexpr,
    B_KMAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
):
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    tiles = grid_m * grid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS):
        group = tile // (GROUP_M * grid_n)
        first_m = group * GROUP_M
        size_m = min(grid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % (GROUP_M * grid_n)) % size_m
        pid_n = (tile % (GROUP_M * grid_n)) // size_m
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            if B_KMAJOR:
                b = b_desc.load([off_n, ki * BLOCK_K]).T
            else:
                b = b_desc.load([ki * BLOCK_K, off_n])
            if UPCAST:  # only under TRITON_INTERPRET, whose low-precision tl.dot is wrong
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        acc = acc * alpha
        if HAS_BIAS:
            x = tl.load(bias_ptr + rm[:, None] * s_xm + rn[None, :] * s_xn, mask=mask, other=0.0)
            acc += beta * x.to(tl.float32)
        tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _tma_ready(t: torch.Tensor) -> bool:
    """A 2-D tensor TMA can read: unit innermost stride, 16-byte aligned base and outer stride."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a [M, K] @ b [K, N]`` can be read by descriptors: both 2-D, of a 16- or 32-bit
    float dtype, A row-major and B either K-major ([N, K] rows, a linear's weight) or row-major."""
    if a.dim() != 2 or b.dim() != 2 or a.dtype != b.dtype or a.dtype not in (torch.float16, torch.bfloat16):
        return False
    return _tma_ready(a) and (_tma_ready(b.t()) or _tma_ready(b))


def tma_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    alpha: float,
    beta: float,
    tactic: Tactic,
    programs: int,
) -> torch.Tensor:
    """``alpha * a @ b + beta * bias`` (bias broadcastable to [M, N], ignored when beta == 0) with at
    most ``programs`` persistent programs (the SM count); requires ``applies(a, b)``. Output
    contiguous, a's dtype."""
    bm, bn, bk, gm, warps, stages = tactic
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty((m, n), device=a.device, dtype=a.dtype)
    if not (m and n):
        return c
    if not k:
        return c.zero_() if bias is None or beta == 0 else c.copy_(beta * bias.expand(m, n))
    has_bias = bias is not None and beta != 0
    x = bias.expand(m, n) if has_bias else c
    b_kmajor = _tma_ready(b.t())
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(b.t(), [bn, bk]) if b_kmajor else TensorDescriptor.from_tensor(b, [bk, bn])
    grid = min(programs, triton.cdiv(m, bm) * triton.cdiv(n, bn))
    launch(
        _tma_kernel,
        (grid,),
        a_desc,
        b_desc,
        c,
        x,
        m,
        n,
        k,
        c.stride(0),
        c.stride(1),
        x.stride(0),
        x.stride(1),
        float(alpha),
        float(beta),
        grid,
        HAS_BIAS=has_bias,
        B_KMAJOR=b_kmajor,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=gm,
        UPCAST=INTERPRET,
        num_warps=warps,
        num_stages=stages,
    )
    return c


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): Hopper's large tiles, a few stages deep.
# fmt: off
TILES = (
    (128, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 128, 8, 3),
)
# fmt: on


def tma_tactics(m: int, n: int, k: int, elem_bytes: int, smem_bytes: int = 227 * 1024) -> list[Tactic]:
    """Tactics for an (M >= MIN_M, N, K) bucket: no tile taller than 2x M or wider than N (min 64),
    the stages' operand tiles within ``smem_bytes``; GROUP_M 8."""
    m_cap = max(64, 2 * triton.next_power_of_2(max(m, 1)))
    n_cap = max(64, triton.next_power_of_2(max(n, 1)))
    return [
        (bm, bn, bk, 8, warps, stages)
        for bm, bn, bk, warps, stages in TILES
        if bm <= m_cap and bn <= n_cap and (bm * bk + bk * bn) * elem_bytes * stages <= smem_bytes
    ]
