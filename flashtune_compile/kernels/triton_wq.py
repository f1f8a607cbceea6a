"""A Triton weight-only quantized GEMM for ``flashtune.linear_wq``: ``y = x @ W^T + bias`` with
``W[n, k] = scales[n, k // group_size] * (q[n, k] - zeros[n, k // group_size])`` (``kernels/quant.py``).

Layout: x [M, K] (fp16, bf16 or fp32, any strides), q [N, K] int8 read as it is stored (4-bit values
one per byte: no packed copy, nothing in the weight cache), scales and zeros [N, G] of any float
(zeros: any real) dtype, bias [N] in x's dtype; y [M, N] contiguous, x's dtype.

Strategy: each program owns a BLOCK_M x BLOCK_N tile of y and one chunk of K. Per BLOCK_K step it
loads the int8 tile of q as [BLOCK_K, BLOCK_N], dequantizes it in registers exactly as
``quant.dequantize`` does (fp32 ``(q - zero) * scale``, rounded once to x's dtype, so the weight
equals the reference's bit for bit) and multiplies: by ``tl.dot`` for BLOCK_M >= 16, by a broadcast
and sum below (``tl.dot`` needs 16 rows), fp32 sums either way. The scales are read per row once
(one group per row), per K block (every block lies in one group: ``group_size % BLOCK_K == 0``), or
else gathered per element. Decode-sized M (<= 32) takes narrow column blocks and ``SPLIT_K`` chunks
of K so a large weight gives every SM work; each chunk writes its fp32 partial sums to a workspace
and a second kernel adds the chunks in a fixed order, the bias and the cast: deterministic, no
atomics. Larger M takes square-ish tiles in grouped order (row blocks sharing weight tiles in L2).

A tactic is ``(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)``; every tactic is correct
for every shape (masked edges for any M, N, K and group size). Importing this module does not
import Triton; the first launch does (``_kernels``), so ``TRITON_INTERPRET`` is read then.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import torch

from ..tuner.buckets import next_pow2
from ..tuner.runner import DEFAULT_TACTIC, BucketProfile
from ..tuner.runner import Tactic as AnyTactic
from . import sm_count
from .triton_runner import DTYPES, INTERPRETER_MAX_TACTICS, TritonRunner, _interpreting, max_smem

Tactic = tuple  # (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
MAX_DECODE_M = 32  # buckets up to this M get the decode tiles and split-K
GROUP_M = 8  # row blocks per group in the tiled order
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ZERO_DTYPES = (*SCALE_DTYPES, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)

# Set by ``_kernels()`` on first use: the kernels below read ``tl`` as a module global (as Triton's
# compiler and interpreter both require), and the package imports without Triton.
triton: Any = None
tl: Any = None


def _wq_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    group_size,
    k_per_split,
    s_xm,
    s_xk,
    s_qn,
    s_qk,
    s_sn,
    s_sg,
    s_zn,
    s_zg,
    s_b,
    s_ys,
    s_ym,
    s_yn,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCALES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PARTIAL: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """y tile (pid) over K chunk pid_k: finished (bias, cast), or with PARTIAL fp32 partial sums
    into the workspace's slice pid_k. SCALES: 0 gathered per element, 1 per K block, 2 per row."""
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    x = x_ptr + rm[:, None] * s_xm + (k_start + rk)[None, :] * s_xk
    q = q_ptr + rn[None, :].to(tl.int64) * s_qn + (k_start + rk)[:, None] * s_qk  # [BLOCK_K, BLOCK_N]
    s_row = s_ptr + rn * s_sn
    z_row = z_ptr + rn * s_zn
    if SCALES == 2:  # one group per row: read once
        scale = tl.load(s_row, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_ZEROS:
            zero = tl.load(z_row, mask=n_ok, other=0).to(tl.float32)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        kk = k + rk
        k_ok = kk < k_end
        x_tile = tl.load(x, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & n_ok[None, :]
        w = tl.load(q, mask=w_ok, other=0).to(tl.float32)
        if SCALES == 0:  # groups change within the block: gather each element's
            g = (kk // group_size)[:, None]
            scale = tl.load(s_row[None, :] + g * s_sg, mask=w_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(z_row[None, :] + g * s_zg, mask=w_ok, other=0).to(tl.float32)
        elif SCALES == 1:  # the whole block lies in group k // group_size
            g = k // group_size
            scale = tl.load(s_row + g * s_sg, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_ZEROS:
                zero = tl.load(z_row + g * s_zg, mask=n_ok, other=0).to(tl.float32)[None, :]
        if HAS_ZEROS:
            w = w - zero
        w = (w * scale).to(x_ptr.dtype.element_ty)  # the reference's weight, rounded once
        if USE_DOT:
            if UPCAST:  # only under TRITON_INTERPRET, whose bf16 tl.dot is wrong
                x_tile, w = x_tile.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(x_tile, w, input_precision=PRECISION)
        else:
            acc += tl.sum(x_tile.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        x += BLOCK_K * s_xk
        q += BLOCK_K * s_qk
    mask = m_ok[:, None] & n_ok[None, :]
    y = y_ptr + pid_k * s_ys + rm[:, None] * s_ym + rn[None, :] * s_yn
    if not PARTIAL:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn * s_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y, acc, mask=mask)


def _wq_sum_kernel(
    p_ptr,
    b_ptr,
    y_ptr,
    total,
    N,
    s_ps,
    s_b,
    HAS_BIAS: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y (contiguous [M, N], flat) = the sum of the SPLITS partial products (contiguous), in split
    order, plus bias, cast to y's dtype."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):  # a fixed order: the same sum on every run
        acc += tl.load(p_ptr + s * s_ps + i, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + (i % N) * s_b, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=ok)


_lock = threading.Lock()
_jitted: tuple | None = None


def _kernels() -> tuple[Any, Any, Any, bool]:
    """(the GEMM kernel, the split-sum kernel, ``triton_launch.launch``, whether Triton interprets
    them), jitted once per process; imports Triton (and ``triton_launch``, which patches older
    Tritons' interpreter) on the first call."""
    global _jitted, triton, tl
    if _jitted is not None:
        return _jitted
    with _lock:
        if _jitted is None:
            import triton
            import triton.language as tl

            from .triton_launch import launch

            interpret = bool(triton.knobs.runtime.interpret)
            _jitted = (triton.jit(_wq_kernel), triton.jit(_wq_sum_kernel), launch, interpret)
        return _jitted


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def wq_gemm(
    x: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    tactic: Tactic,
) -> torch.Tensor:
    """``x @ W^T + bias`` for x [M, K], q [N, K] int8, scales / zeros [N, G] (G = ceil(K / group_size),
    G = 1: one group per row), bias [N] or None, all on one device, any strides. Returns a new
    contiguous [M, N] tensor of x's dtype (fp32 sums; fp32 x through TF32 only where
    ``torch.backends.cuda.matmul.allow_tf32`` allows it on a GPU): empty for M = 0 or N = 0, the
    bias (or zeros) for K = 0. Deterministic: split-K sums its chunks in a fixed order."""
    bm, bn, bk, split_k, warps, stages = (int(v) for v in tactic)
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if not (m and n):
        return y
    if k == 0:
        return y.copy_(bias) if bias is not None else y.zero_()
    kernel, sum_kernel, launch, interpret = _kernels()
    groups = scales.shape[1]
    mode = 2 if groups == 1 else 1 if group_size % bk == 0 else 0
    precision = "tf32" if x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    # each split's chunk of K: a whole number of BLOCK_K, so no chunk starts mid-tile (nor mid-group in mode 1)
    k_per_split = _cdiv(_cdiv(k, max(1, split_k)), bk) * bk
    splits = _cdiv(k, k_per_split)  # chunks that are not empty
    out = y if splits == 1 else torch.empty((splits, m, n), device=x.device, dtype=torch.float32)
    z = zeros if zeros is not None else scales
    b = bias if bias is not None else y
    launch(
        kernel,
        (_cdiv(m, bm) * _cdiv(n, bn), splits),
        x,
        q,
        scales,
        z,
        b,
        out,
        m,
        n,
        k,
        group_size,
        k_per_split,
        *x.stride(),
        *q.stride(),
        *scales.stride(),
        *z.stride(),
        b.stride(-1),
        out.stride(0) if splits > 1 else 0,
        out.stride(-2),
        out.stride(-1),
        HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None,
        SCALES=mode,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=GROUP_M,
        PARTIAL=splits > 1,
        USE_DOT=bm >= 16,
        PRECISION=precision,
        UPCAST=interpret and x.dtype == torch.bfloat16,
        num_warps=warps,
        num_stages=stages,
    )
    if splits > 1:
        block = 1024
        launch(
            sum_kernel,
            (_cdiv(m * n, block),),
            out,
            b,
            y,
            m * n,
            n,
            out.stride(0),
            b.stride(-1),
            HAS_BIAS=bias is not None,
            SPLITS=splits,
            BLOCK=block,
            num_warps=4,
        )
    return y


# Decode tiles (M <= MAX_DECODE_M): narrow column blocks, long K tiles.
# (BLOCK_N, BLOCK_K, num_warps, num_stages) for BLOCK_M < 16 (broadcast and sum) and BLOCK_M 16 / 32 (tl.dot).
# fmt: off
SUM_TILES = (
    (32, 128, 4, 3), (16, 128, 4, 3), (16, 64, 4, 3), (16, 64, 2, 3), (32, 64, 4, 3), (64, 64, 4, 3),
    (64, 32, 4, 3), (32, 32, 4, 3), (16, 32, 2, 3), (16, 256, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3),
)
DOT_TILES = ((32, 64, 4, 4), (32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3), (64, 32, 4, 4))
# Tiles for larger M: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
TILES = (
    (32, 64, 64, 4, 4), (32, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 32, 4, 4), (64, 128, 64, 4, 3),
    (64, 256, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
)
# fmt: on
DECODE_SPLITS = (1, 2, 4, 8, 16)
TILED_SPLITS = (2, 4)  # for 32 < M <= 64 with a long K
MAX_SUM_VALUES = 64  # BLOCK_M * BLOCK_N * BLOCK_K per thread on the broadcast path: kept in registers


def _fits_registers(bm: int, bn: int, bk: int, warps: int) -> bool:
    return bm >= 16 or bm * bn * bk <= MAX_SUM_VALUES * 32 * warps


def _smem(bm: int, bn: int, bk: int, stages: int, elem_bytes: int) -> int:
    """Shared memory a tile may take (an upper estimate): staged x and int8 q tiles, plus the
    dequantized weight tile, per stage."""
    return (bm * bk * elem_bytes + bk * bn * (1 + elem_bytes)) * stages


def wq_tactics(m: int, n: int, k: int, elem_bytes: int, sms: int, smem_bytes: int = 227 * 1024) -> list[Tactic]:
    """Tactics for an (M, N, K) bucket of x's element size on a GPU with ``sms`` multiprocessors
    and ``smem_bytes`` of shared memory per block; never empty. M <= MAX_DECODE_M: BLOCK_M is M's
    power of two, the decode tiles (the broadcast path only where its product fits in registers),
    split-K while the grid stays within eight programs per SM and each chunk keeps four K tiles.
    Larger M: BLOCK_M from a quarter of M's power of two (32 at least, 64 at most) up to it, tiles no
    wider than N's power of two or deeper than K's (min 32), within shared memory; split-K (2, 4)
    for M <= 64 with 4 K tiles per chunk."""
    n_cap = max(16, next_pow2(max(n, 1)))
    k_cap = max(32, next_pow2(max(k, 1)))
    out: list[Tactic] = []
    if m <= MAX_DECODE_M:
        bm = next_pow2(max(1, m))
        for bn, bk, warps, stages in DOT_TILES if bm >= 16 else SUM_TILES:
            if bn > n_cap or bk > k_cap or not _fits_registers(bm, bn, bk, warps):
                continue
            if _smem(bm, bn, bk, stages, elem_bytes) > smem_bytes:
                continue
            blocks = _cdiv(m, bm) * _cdiv(n, bn)
            for split in DECODE_SPLITS:
                if split > 1 and (blocks * split > 8 * sms or k < 4 * split * bk):
                    continue
                out.append((bm, bn, bk, split, warps, stages))
    else:
        m_cap = next_pow2(m)
        m_low = max(32, min(64, m_cap // 4))
        for bm, bn, bk, warps, stages in TILES:
            if not m_low <= bm <= m_cap or bn > max(32, n_cap) or bk > k_cap:
                continue
            if _smem(bm, bn, bk, stages, elem_bytes) > smem_bytes:
                continue
            out.append((bm, bn, bk, 1, warps, stages))
            if m <= 64 and bm <= 32:
                out += [(bm, bn, bk, s, warps, stages) for s in TILED_SPLITS if k >= 4 * s * bk]
    return out or [default_tactic(m, n, k, elem_bytes, sms)]


@functools.cache  # the warm path of a bucket whose default won: computed once per shape
def default_tactic(m: int, n: int, k: int, elem_bytes: int, sms: int) -> Tactic:
    """Tactic -1, valid for every shape and GPU. M <= MAX_DECODE_M: the first decode tile that fits
    in registers, split until the grid has two programs per SM (or K runs short); larger M: a 64- or
    128-row tile of 32-deep K blocks (two stages for fp32, in little shared memory)."""
    if m <= MAX_DECODE_M:
        bm = next_pow2(max(1, m))
        tiles = DOT_TILES[1:] if bm >= 16 else SUM_TILES
        bn, bk, warps, stages = next(t for t in tiles if _fits_registers(bm, t[0], t[1], t[2]))
        blocks = _cdiv(m, bm) * _cdiv(n, bn)
        split = 1
        while split < DECODE_SPLITS[-1] and blocks * split < 2 * sms and k >= 8 * split * bk:
            split *= 2
        return (bm, bn, bk, split, warps, stages)
    stages = 3 if elem_bytes <= 2 else 2
    return (64, 128, 32, 1, 4, stages) if m <= 64 else (128, 128, 32, 1, 8, stages)


def applies(inputs: Sequence[Any]) -> bool:
    """Whether the kernel takes these ``linear_wq`` inputs: x 2-D fp16 / bf16 / fp32 on a GPU (or
    the CPU under the interpreter, ``triton_runner._interpreting``), q 2-D int8 [N, K], scales
    [N, ceil(K / group_size)] of a float dtype, zeros shaped as scales of a real dtype, bias [N] of
    x's dtype, all on x's device; bits 4 or 8 (stored one per byte either way)."""
    x, q, scales, zeros, bias, group_size, bits = inputs
    if not isinstance(x, torch.Tensor) or x.dtype not in DTYPES or x.dim() != 2:
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and _interpreting())):
        return False
    if bits not in (4, 8) or not isinstance(group_size, int) or group_size < 1:
        return False
    if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] != x.shape[1]:
        return False
    n, k = q.shape
    if scales.dtype not in SCALE_DTYPES or tuple(scales.shape) != (n, max(1, _cdiv(k, group_size))):
        return False
    if zeros is not None and (zeros.dtype not in ZERO_DTYPES or zeros.shape != scales.shape):
        return False
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (n,)):
        return False
    return all(t.device == x.device for t in (q, scales, zeros, bias) if t is not None)


class TritonQuantLinearRunner(TritonRunner):
    """``linear_wq`` by the Triton weight-only quantized GEMM (``wq_gemm``): the int8 weight read as
    stored, dequantized in registers, fp32 sums; split-K with a deterministic sum at decode sizes.
    A tactic is ``(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)``; every tactic and
    the default are correct for every M. Needs no weight copy. Functional: never writes its inputs."""

    name = "triton_wq"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[AnyTactic]:
        if not applies(inputs):
            return []
        (m, k), (n, _) = profile.shapes[0], profile.shapes[1]
        x = inputs[0]
        tactics = wq_tactics(int(m), int(n), int(k), x.element_size(), sm_count(x), max_smem(x))
        return tactics[:INTERPRETER_MAX_TACTICS] if _interpreting() else tactics

    def forward(self, inputs: Sequence[Any], tactic: AnyTactic = DEFAULT_TACTIC) -> torch.Tensor:
        x, q, scales, zeros, bias, group_size, bits = inputs
        if tactic == DEFAULT_TACTIC:
            tactic = default_tactic(x.shape[0], q.shape[0], x.shape[1], x.element_size(), sm_count(x))
        elif not isinstance(tactic, (tuple, list)) or len(tactic) != 6:
            raise ValueError(f"{self.name} tactic must be (BM, BN, BK, SPLIT_K, warps, stages) or -1, got {tactic!r}")
        return wq_gemm(x, q, scales, zeros, bias, group_size, tuple(tactic))
