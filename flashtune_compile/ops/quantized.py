"""The tunable quantized linear: ``torch.ops.flashtune.linear_wq``.

``linear_wq(x [..., K], qweight [N, K] int8, scales [N, G], zeros [N, G] | None, bias [N] | None,
group_size, bits, site) -> [..., N]`` is ``F.linear(x, W, bias)`` for the weight ``W`` that
``kernels/quant.py`` defines: ``W[n, k] = scales[n, g] * (qweight[n, k] - zeros[n, g])`` with
``g = k // group_size`` (``G = ceil(K / group_size)``; ``G = 1`` is one scale per row), computed in
x's dtype. ``bits`` (8 or 4) says the range of the values: 4-bit values lie in -8..7, stored one per
byte; kernels may pack them two per byte. Scales are any floating dtype, zero points any real
dtype. The default candidate dequantizes then runs ``F.linear``; the others are checked against it.

Gradients: a call that needs one (for x or bias; a quantized weight has none) runs the default
formulation with autograd recording it; the graph pass routes only calls that need none.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..kernels.cpp.quant_runner import CpuQuantLinearRunner
from ..kernels.cpp.rows_runner import CpuQuantRowsRunner
from ..kernels.quant import AtenQuantLinearRunner, dequantize
from ..kernels.triton_wq import TritonQuantLinearRunner
from .registry import register
from .spec import Candidate, OpSpec

BITS = (4, 8)


def _fake(x, qweight, scales, zeros, bias, group_size, bits, site):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _reference(x, qweight, scales, zeros, bias, group_size, bits):
    return F.linear(x, dequantize(qweight, scales, zeros, group_size, x.dtype), bias)


def _check(x, qweight, scales, zeros, bias, group_size, bits) -> None:
    n, k = qweight.shape
    if bits not in BITS:
        raise ValueError(f"flashtune.linear_wq: bits must be one of {BITS}, got {bits!r}")
    if x.shape[-1] != k:
        raise ValueError(f"flashtune.linear_wq: x has {x.shape[-1]} columns, qweight [N, K] = {tuple(qweight.shape)}")
    groups = max(1, -(-k // group_size)) if group_size >= 1 else -1
    if group_size < 1 or tuple(scales.shape) != (n, groups):
        raise ValueError(
            f"flashtune.linear_wq: scales must be [N, ceil(K / group_size)] = [{n}, {groups}] for qweight "
            f"{tuple(qweight.shape)} and group_size {group_size}; got {tuple(scales.shape)}"
        )
    if zeros is not None and zeros.shape != scales.shape:
        raise ValueError(
            f"flashtune.linear_wq: zeros {tuple(zeros.shape)} must be shaped as scales {tuple(scales.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"flashtune.linear_wq: bias must be [N] = [{n}], got {tuple(bias.shape)}")


LINEAR_WQ = register(
    OpSpec(
        name="linear_wq",
        schema=(
            "linear_wq(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int group_size, "
            "int bits, str site) -> Tensor"
        ),
        family="quantized",
        fake=_fake,
        reference=_reference,
        flatten_rows=True,
        operands=(("op", 2, None), ("int8", 2, 2), ("float", 2, 2), ("real", 2, 2), ("op", 1, 1)),
        check=_check,
        state_args=(1, 2, 3),
        candidates=(
            Candidate("aten", AtenQuantLinearRunner),
            Candidate("triton", TritonQuantLinearRunner),
            Candidate("cpu", CpuQuantLinearRunner),
            Candidate("cpu", CpuQuantRowsRunner),
        ),
    )
)
