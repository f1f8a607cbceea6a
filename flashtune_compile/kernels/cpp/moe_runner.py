"""The CPU blocked kernel's MoE layer (``blocked_gemm.cpp``) as a tuner candidate for ``flashtune.moe``.

Inputs are the op's ``(hidden [T, H], topk_weights [T, k], topk_ids [T, k], w1, w2, activation, w3)``
on CPU, one dtype of fp32, bf16 or fp16 for the hidden states and the expert weights, each weight a
parameter or a view of one (their packed copies live in the tuner's never-stale weight cache). One
call does the whole layer: pairs grouped by expert on the host, then for each used expert the
gate/up GEMM with the gated activation fused, the down GEMM, and the routed sum over picks, every
weight streamed once per row tile in its own dtype with fp32 sums. A tactic is ``(r, pairs)``: tiles
``r`` vector widths wide (the tile height follows each expert's row count) and, for bf16 on CPUs
with AVX512_BF16, ``pairs`` = 1 for the vdpbf16ps kernel. Importing this module compiles nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...tuner.autotuner import AutoTuner
from ...tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic
from ...tuner.weights import WeightCache
from . import blocked_gemm_or_none, load_blocked_gemm
from .bound import BoundRunner

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
MAX_ROWS_PER_EXPERT = 256  # offered while T * k / E stays below this: past it, oneDNN's GEMMs


def applies(inputs: Sequence[Any]) -> bool:
    """Whether the kernel takes these inputs (device, dtypes, cacheable weights), any T."""
    hidden, weights, ids, w1, w2, activation, w3 = inputs
    if hidden.device.type != "cpu" or hidden.dtype not in SUPPORTED_DTYPES or activation not in ACTIVATION_CODES:
        return False
    experts = (w1, w2) if w3 is None else (w1, w2, w3)
    if any(w.dtype != hidden.dtype or w.device != hidden.device or not WeightCache.cacheable(w) for w in experts):
        return False
    return weights.dtype in SUPPORTED_DTYPES and not ids.is_floating_point() and not ids.is_complex()


def _bound(tactic: tuple[int, int]) -> Callable[..., torch.Tensor]:
    """``fn(*inputs)`` computing the layer by ``tactic``: the packed weights from the tuner's cache,
    then the kernel (the warm path, so nothing else)."""
    r, pairs = tactic
    kernel = load_blocked_gemm()
    weights_cache = AutoTuner.get().weights  # the tuner of the calling site
    kind = copy_kind(r, pairs)
    nb, kps = kernel.block_width(r), 2 if pairs else 1

    def make_gate_up(ws: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(ws) == 2:
            return kernel.pack_gate_up(ws[0], ws[1], r, bool(pairs))
        inter = ws[0].shape[1] // 2
        return kernel.pack_gate_up(ws[0][:, :inter], ws[0][:, inter:], r, bool(pairs))

    def make_down(w2: torch.Tensor) -> torch.Tensor:
        return kernel.pack(w2, r, bool(pairs))

    def fn(hidden, weights, ids, w1, w2, activation, w3):
        e, h, inter = w2.shape
        elem = w2.element_size()
        ipad = -(-inter // (nb // 2)) * (nb // 2)
        up_bytes = e * 2 * ipad * -(-h // kps) * kps * elem
        down_bytes = e * -(-h // nb) * nb * -(-inter // kps) * kps * elem
        gate_up = weights_cache.get((w1,) if w3 is None else (w1, w3), kind, make_gate_up, up_bytes)
        down = weights_cache.get(w2, kind, make_down, down_bytes)
        if hidden.stride(-1) != 1:
            hidden = hidden.contiguous()
        weights = weights.to(torch.float32).contiguous()
        ids = ids.to(torch.int64).contiguous()
        act = ACTIVATION_CODES[activation]
        return kernel.moe(hidden, weights, ids, gate_up, down, inter, act, r, bool(pairs))

    return fn


def copy_kind(r: int, pairs: bool | int) -> str:
    """The weight cache's kind for this kernel's packs (gate/up together, and down) in blocks of
    ``r`` vectors (``pairs``: k in pairs)."""
    return f"moe_blocked{r}{'p' if pairs else ''}"


class CpuBlockedMoeRunner(BoundRunner):
    """``flashtune.moe`` by the blocked CPU kernel in one call. Functional: never writes its inputs."""

    name = "cpu_blocked_moe"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        (tokens, top_k), experts = profile.shapes[2], profile.shapes[3][0]
        if tokens * top_k > MAX_ROWS_PER_EXPERT * experts or not applies(inputs):
            return []
        kernel = blocked_gemm_or_none()
        if kernel is None:
            return []
        widths = sorted({r for _, r in kernel.tiles})
        kinds = (0, 1) if kernel.bf16_pairs and inputs[0].dtype == torch.bfloat16 else (0,)
        return [(r, p) for r in widths for p in kinds]

    def resolve(self, tactic: Tactic, inputs: Sequence[Any] | None) -> tuple:
        if tactic == DEFAULT_TACTIC:
            return (2, 0)
        if not isinstance(tactic, (tuple, list)) or len(tactic) != 2:
            raise ValueError(f"cpu_blocked_moe tactic must be (r, pairs) or -1, got {tactic!r}")
        return (int(tactic[0]), int(tactic[1]))

    def bind(self, tactic: tuple) -> Callable[..., torch.Tensor]:
        return _bound(tactic)

    def copy_kind(self, tactic: Tactic) -> str | None:
        return copy_kind(*self.resolve(tactic, None))
