"""The tunable matmul family: ``torch.ops.flashtune.{linear, mm, addmm, bmm, baddbmm}``, and
``packed_linear``, a linear whose weight exists only as the CPU kernel's pack (``ft.freeze``).

Each op takes the usual tensors (and ``beta``, ``alpha``) plus ``site`` (``ops/site.py``) and
computes what its ATen namesake does; ``linear`` and ``mm`` accept N-D activations (``[..., K]``)
and flatten them to 2-D rows the way ``F.linear`` does. Gradients are plain ATen.
``packed_linear(x, packed, bias, n, pairs, site)`` is ``F.linear(x, w, bias)`` for the ``w [n, K]``
that ``packed`` holds in the blocked layout (``kernels/cpp``; ``pairs``: k interleaved in pairs).
"""

from __future__ import annotations

from typing import Any

import torch

from ..kernels.aten import AtenAddmmRunner, AtenBaddbmmRunner, AtenBmmRunner, AtenLinearRunner, AtenMMRunner
from ..kernels.cpp import unpack
from ..kernels.cpp.packed_runner import AtenPackedLinearRunner, CpuPackedLinearRunner
from ..kernels.cpp.rows_runner import CpuRowsLinearRunner
from ..kernels.cpp.runner import CpuBlockedLinearRunner
from ..kernels.cpu import CpuLinearRunner
from ..kernels.cuda.runner import CudaSkinnyLinearRunner
from ..kernels.gemm_view import GemmView
from ..kernels.triton_runner import TritonGemmRunner, TritonSkinnyRunner, TritonTmaRunner
from .registry import register
from .spec import Candidate, OpSpec

# -- fake implementations (output metadata) -------------------------------------------------------


def _linear_fake(x, weight, bias, site):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _mm_fake(a, b, site):
    return a.new_empty((*a.shape[:-1], b.shape[1]))


def _bmm_fake(a, b, site):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


def _scaled_fake(bias, a, b, beta, alpha, site):  # addmm, baddbmm
    return a.new_empty((*a.shape[:-1], b.shape[-1]))


# -- backward formulas (ctx.saved_tensors: the tensor arguments; ctx.scalars: beta, alpha) ---------


def _linear_bwd(ctx: Any, grad: torch.Tensor):
    x, w = ctx.saved_tensors[:2]
    g2, x2 = grad.flatten(0, -2), x.flatten(0, -2)  # not reshape(-1, n): ambiguous when n == 0
    gx = grad @ w if ctx.needs_input_grad[0] else None
    gw = g2.t() @ x2 if ctx.needs_input_grad[1] else None
    gb = g2.sum(0) if ctx.needs_input_grad[2] else None
    return gx, gw, gb, None


def _mm_bwd(ctx: Any, grad: torch.Tensor):
    a, b = ctx.saved_tensors
    ga = grad @ b.t() if ctx.needs_input_grad[0] else None
    gb = a.flatten(0, -2).t() @ grad.flatten(0, -2) if ctx.needs_input_grad[1] else None
    return ga, gb, None


def _bmm_bwd(ctx: Any, grad: torch.Tensor):
    a, b = ctx.saved_tensors
    ga = torch.bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
    gb = torch.bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
    return ga, gb, None


def _scaled_bwd(ctx: Any, grad: torch.Tensor):  # addmm, baddbmm: beta * bias + alpha * (a @ b)
    bias, a, b = ctx.saved_tensors
    beta, alpha = ctx.scalars
    gbias = (grad * beta).sum_to_size(bias.shape) if ctx.needs_input_grad[0] else None
    ga = (grad @ b.transpose(-2, -1)) * alpha if ctx.needs_input_grad[1] else None
    gb = (a.transpose(-2, -1) @ grad) * alpha if ctx.needs_input_grad[2] else None
    return gbias, ga, gb, None, None, None


# -- the ops ------------------------------------------------------------------------------------

TRITON = Candidate("triton", TritonGemmRunner)  # one GEMM kernel for the whole family
TRITON_SKINNY = Candidate("triton", TritonSkinnyRunner)  # and one for its decode sizes
TRITON_TMA = Candidate("triton", TritonTmaRunner)  # and, on Hopper, a persistent TMA one for 2-D products
# Operand rules (dtype kind, min rank, max rank): a matrix, N-D rows of a matrix, a batch of matrices.
MAT, ROWS, BATCH = ("op", 2, 2), ("op", 2, None), ("op", 3, 3)

LINEAR = register(
    OpSpec(
        name="linear",
        schema="linear(Tensor x, Tensor weight, Tensor? bias, str site) -> Tensor",
        family="linear",
        fake=_linear_fake,
        backward=_linear_bwd,
        flatten_rows=True,
        operands=(ROWS, MAT, ("op", 1, 1)),
        gemm=GemmView(a=0, b=1, b_transposed=True, bias=2),
        candidates=(
            Candidate("aten", AtenLinearRunner),
            TRITON,
            TRITON_SKINNY,
            TRITON_TMA,
            Candidate("cuda", CudaSkinnyLinearRunner),
            Candidate("cpu", CpuLinearRunner),
            Candidate("cpu", CpuBlockedLinearRunner),
            Candidate("cpu", CpuRowsLinearRunner),
        ),
    )
)
MM = register(
    OpSpec(
        name="mm",
        schema="mm(Tensor a, Tensor b, str site) -> Tensor",
        family="mm",
        fake=_mm_fake,
        backward=_mm_bwd,
        flatten_rows=True,
        operands=(ROWS, MAT),
        gemm=GemmView(a=0, b=1),
        candidates=(Candidate("aten", AtenMMRunner), TRITON, TRITON_SKINNY, TRITON_TMA),
    )
)


def _scaled(name: str, family: str, operand: tuple, aten: type) -> OpSpec:
    """``beta * bias + alpha * (a @ b)`` over matrices (addmm) or batches of them (baddbmm): the
    bias broadcasts to the output; the token count is the rows of ``a``."""
    rank = operand[1]
    return OpSpec(
        name=name,
        schema=f"{name}(Tensor bias, Tensor a, Tensor b, float beta, float alpha, str site) -> Tensor",
        family=family,
        fake=_scaled_fake,
        backward=_scaled_bwd,
        operands=(("op", 0, rank), operand, operand),
        token_dims=((1, rank - 2),),
        gemm=GemmView(a=1, b=2, bias=0, alpha=4, beta=3),
        candidates=(Candidate("aten", aten), TRITON, TRITON_SKINNY, TRITON_TMA),
    )


ADDMM = register(_scaled("addmm", "mm", MAT, AtenAddmmRunner))
BMM = register(
    OpSpec(
        name="bmm",
        schema="bmm(Tensor a, Tensor b, str site) -> Tensor",
        family="bmm",
        fake=_bmm_fake,
        backward=_bmm_bwd,
        operands=(BATCH, BATCH),
        token_dims=((0, 1),),
        gemm=GemmView(a=0, b=1),
        candidates=(Candidate("aten", AtenBmmRunner), TRITON, TRITON_SKINNY),
    )
)
BADDBMM = register(_scaled("baddbmm", "bmm", BATCH, AtenBaddbmmRunner))


def _packed_linear_fake(x, packed, bias, n, pairs, site):
    return x.new_empty((*x.shape[:-1], n))


def _packed_linear_reference(x, packed, bias, n, pairs):
    return torch.nn.functional.linear(x, unpack(packed, n, x.shape[-1], pairs), bias)


PACKED_LINEAR = register(
    OpSpec(
        name="packed_linear",
        schema="packed_linear(Tensor x, Tensor packed, Tensor? bias, int n, int pairs, str site) -> Tensor",
        family="linear",
        fake=_packed_linear_fake,
        reference=_packed_linear_reference,  # a frozen weight needs no gradient; x may
        flatten_rows=True,
        operands=(ROWS, BATCH, ("op", 1, 1)),
        candidates=(Candidate("aten", AtenPackedLinearRunner), Candidate("cpu", CpuPackedLinearRunner)),
    )
)
MATMUL_OPS = tuple(spec.name for spec in (LINEAR, MM, ADDMM, BMM, BADDBMM))
