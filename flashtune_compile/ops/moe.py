"""The tunable MoE ops: ``torch.ops.flashtune.grouped_mm`` and ``torch.ops.flashtune.moe``.

``grouped_mm(x [S, K], w [E, K, N], offs [E] int32, site) -> [S, N]``: rows of ``x`` grouped by
expert, ``offs`` the cumulative row ends, as ``torch._grouped_mm`` takes them; rows no group
covers are zero.

``moe(hidden [T, H], topk_weights [T, k], topk_ids [T, k], w1 [E, 2I, H], w2 [E, H, I],
activation, w3, site) -> [T, H]``: one layer's whole expert computation, with the semantics in
``kernels/moe.py`` (transformers' layout: ``w1`` holds [gate; up]). With ``w3`` given (not None),
the gate and up projections are separate parameters, as torchtitan and gpt-fast keep them:
``w1 [E, I, H]`` is the gate and ``w3 [E, I, H]`` the up projection, and the layer is the same as
with ``cat([w1, w3], dim=1)`` as ``w1`` (computed without that copy). ``activation`` is ``"silu"``,
``"gelu"`` or ``"gelu_tanh"``. Tuned per bucket of the token count ``T``; the cache key holds
``E``, ``k``, ``H``, ``I`` and the dtypes, and profiling synthesizes skewed routing
(``ops/routing.py``).

Gradients: when one is needed the call runs the ATen loop formulation with autograd recording
it (correct, untuned). The graph pass and the transformers integration route only calls that
need no gradient, so compiled training graphs never trace these ops.

``grouped_mm`` has no ``routing``: its tuning inputs are grouped rows and offsets, synthesized like
any other integer input (drawn from the real offsets' values).
"""

from __future__ import annotations

import torch

from ..kernels.cpp.moe_runner import CpuBlockedMoeRunner
from ..kernels.cpp.rows_runner import CpuRowsMoeRunner
from ..kernels.grouped_mm import AtenGroupedMMRunner, CpuGroupedMMRunner, grouped_loop
from ..kernels.moe import ACTIVATIONS, AtenMoeRunner, CpuMoeRunner, moe_loop
from ..kernels.triton_moe_runner import TritonGroupedMMRunner, TritonMoeDecodeRunner, TritonMoeRunner
from .registry import register
from .routing import RoutedInputs
from .spec import Candidate, OpSpec


def _check_moe(hidden, topk_weights, topk_ids, w1, w2, activation, w3=None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"flashtune.moe: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if hidden.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"flashtune.moe: expected hidden [T, H], w1 [E, 2I, H], w2 [E, H, I]; got "
            f"{tuple(hidden.shape)}, {tuple(w1.shape)}, {tuple(w2.shape)}"
        )
    if w3 is not None and (w3.shape != w1.shape or w3.dtype != w1.dtype or w3.device != w1.device):
        raise ValueError(
            f"flashtune.moe: w3 (up) must match w1 (gate): got {tuple(w3.shape)} {w3.dtype} on {w3.device} and "
            f"{tuple(w1.shape)} {w1.dtype} on {w1.device}"
        )
    t, h = hidden.shape
    e, rows, h1 = w1.shape
    two_i = 2 * rows if w3 is not None else rows  # gate and up rows together
    if (
        h1 != h
        or tuple(w2.shape) != (e, h, two_i // 2)
        or two_i % 2
        or topk_ids.shape != topk_weights.shape
        or topk_ids.dim() != 2
        or topk_ids.shape[0] != t
    ):
        raise ValueError(
            f"flashtune.moe: shapes disagree: hidden {tuple(hidden.shape)}, topk_weights "
            f"{tuple(topk_weights.shape)}, topk_ids {tuple(topk_ids.shape)}, w1 {tuple(w1.shape)}, "
            f"w2 {tuple(w2.shape)}" + (f", w3 {tuple(w3.shape)}" if w3 is not None else "")
        )
    if topk_ids.is_floating_point() or topk_ids.is_complex():
        raise ValueError(f"flashtune.moe: topk_ids must be integers, got {topk_ids.dtype}")


def _moe_fake(hidden, topk_weights, topk_ids, w1, w2, activation, w3, site):
    _check_moe(hidden, topk_weights, topk_ids, w1, w2, activation, w3)
    return hidden.new_empty(hidden.shape)


def _grouped_mm_fake(x, w, offs, site):
    torch._check(
        x.dim() == 2 and w.dim() == 3 and offs.dim() == 1,
        lambda: "flashtune.grouped_mm: expected x [S, K], w [E, K, N], offs [E]",
    )
    return x.new_empty((x.shape[0], w.shape[2]))


MOE = register(
    OpSpec(
        name="moe",
        schema="moe(Tensor hidden, Tensor topk_weights, Tensor topk_ids, Tensor w1, Tensor w2, str activation, "
        "Tensor? w3, str site) -> Tensor",
        family="moe",
        fake=_moe_fake,
        reference=moe_loop,
        operands=(("op", 2, 2), ("float", 2, 2), ("int", 2, 2), ("op", 3, 3), ("op", 3, 3), ("op", 3, 3)),
        token_dims=((0, 0), (1, 0), (2, 0)),
        routing=RoutedInputs(ids=2, weights=1, experts=(3, 0)),  # w1 [E, 2I, H]
        check=_check_moe,
        candidates=(
            Candidate("aten", AtenMoeRunner),
            Candidate("triton", TritonMoeRunner),
            Candidate("triton", TritonMoeDecodeRunner),
            Candidate("cpu", CpuMoeRunner),
            Candidate("cpu", CpuBlockedMoeRunner),
            Candidate("cpu", CpuRowsMoeRunner),
        ),
    )
)
GROUPED_MM = register(
    OpSpec(
        name="grouped_mm",
        schema="grouped_mm(Tensor x, Tensor w, Tensor offs, str site) -> Tensor",
        family="moe",
        fake=_grouped_mm_fake,
        reference=grouped_loop,
        operands=(("op", 2, 2), ("op", 3, 3), ("int32", 1, 1)),
        candidates=(
            Candidate("aten", AtenGroupedMMRunner),
            Candidate("triton", TritonGroupedMMRunner),
            Candidate("cpu", CpuGroupedMMRunner),
        ),
    )
)
MOE_OPS = (MOE.name, GROUPED_MM.name)
