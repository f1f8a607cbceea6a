"""ATen and CPU candidates for ``flashtune.moe``, one MoE layer's whole expert computation.

The MoE computation, with the semantics of transformers' experts forward: for token ``t`` and each
of its ``k`` picks ``e = ids[t, j]`` in ``[0, E)``::

    g = x[t] @ w1[e].T                       # [2I], rounded to x.dtype     (w1: [E, 2I, H])
    h = act(g[:I]) * g[I:]                   # [I]                           (w2: [E, H, I])
    y = h @ w2[e].T                          # [H], rounded to x.dtype
    out[t] += y * weights[t, j]              # in result_type(x, weights), cast to x.dtype at the end

Picks outside ``[0, E)`` contribute nothing. With separate gate and up weights (``w3`` given),
``w1 [E, I, H]`` is the gate and ``w3 [E, I, H]`` the up projection: ``g`` is then
``[x[t] @ w1[e].T, x[t] @ w3[e].T]``, each formulation running the two GEMMs side by side
(``gate_up``), with no stacked copy of the weights. Formulations (tactics):

- ``"loop"``: sort the (token, pick) pairs by expert, one ATen GEMM pair per expert that has
  tokens (one host sync to read the counts);
- ``"grouped"``: the same sort, then ``torch._grouped_mm`` (no host sync) where the build has it
  for this device and dtype;
- ``"bmm"``: gather each pair's expert weights and run two ``bmm`` (no sort; copies ``S`` weight
  matrices, so offered only while that is small: it wins only for a few tokens);
- ``"pairs"``: for at most ``PAIRS_MAX`` (token, pick) pairs, read the ids on the host and run
  each used expert on its rows (decode: no sort, gather or scatter);
- ``cpu_moe``: the loop from re-laid-out expert weights: fp32 copies for bf16/fp16 (CPUs without
  bf16 FMA run fp32 GEMMs several times faster) and oneDNN-packed per-expert weights.

The default (tactic -1) is ``"grouped"`` where available, else ``"loop"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..tuner.autotuner import AutoTuner
from ..tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner
from ..tuner.weights import WeightCache, admitting
from .cpu import _mkldnn_packs
from .experts import expert_loop, fp32_copy, grouped_mm_available, packed, packed_kind

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
}
BMM_MAX_BYTES = 64 * 2**20  # the "bmm" tactic's gathered weights stay below this


# -- shared pieces ----------------------------------------------------------------------------


def sort_pairs(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the flattened (token, pick) pairs by expert: ``(order, counts, valid_sorted)`` where
    ``order`` lists pair indices grouped by expert (invalid ids last), ``counts [E]`` the pairs per
    expert, and ``valid_sorted`` which sorted pairs have an id in ``[0, E)``."""
    flat = topk_ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    ids = torch.where(valid, flat, num_experts).long()
    order = torch.argsort(ids, stable=True)
    # scatter_add, not bincount: bincount reads the ids' max on the host (no CUDA graph could hold it)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device).scatter_add_(
        0, ids, torch.ones_like(ids)
    )
    return order, counts[:num_experts], valid[order]


def combine(
    y_sorted: torch.Tensor,
    order: torch.Tensor,
    weights: torch.Tensor,
    valid_sorted: torch.Tensor,
    tokens: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Scale each sorted pair's output by its routing weight, put pairs back in (token, pick)
    order and sum over the picks; invalid pairs add zero (their rows may hold garbage)."""
    top_k, hidden = weights.shape[-1], y_sorted.shape[-1]
    w = weights.reshape(-1)[order]
    scaled = torch.where(valid_sorted[:, None], y_sorted * w[:, None], 0)
    pairs = torch.empty_like(scaled)
    pairs[order] = scaled
    return pairs.view(tokens, top_k, hidden).sum(dim=1).to(out_dtype)


def _slices(w: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
    return lambda e, x: F.linear(x, w[e])


def gate_up(mm: Callable[[torch.Tensor], torch.Tensor], w1: torch.Tensor, w3: torch.Tensor | None) -> torch.Tensor:
    """[gate | up] rows: ``mm(w1)`` with stacked weights, else ``mm(w1)`` and ``mm(w3)`` side by side."""
    return mm(w1) if w3 is None else torch.cat([mm(w1), mm(w3)], dim=-1)


def _gate_up_mm(mm1: Callable, mm3: Callable | None) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Per expert, [gate | up] rows: ``mm1`` alone for stacked weights, else ``mm1`` and ``mm3``
    (the separate up weight) side by side."""
    return mm1 if mm3 is None else lambda e, x: torch.cat([mm1(e, x), mm3(e, x)], dim=-1)


def gate(act: Callable, g: torch.Tensor) -> torch.Tensor:
    gate_part, up = g.chunk(2, dim=-1)
    return act(gate_part) * up


def moe_loop(hidden, weights, ids, w1, w2, activation, w3=None, compute_dtype=None, mm1=None, mm2=None, mm3=None):
    """The loop formulation, computing in ``compute_dtype`` (default: the inputs' dtype) with
    ``mm1``/``mm2``/``mm3`` (default: ``F.linear`` against each expert's slice of ``w1``/``w2``/``w3``)."""
    tokens, top_k = ids.shape
    order, counts, valid = sort_pairs(ids, w1.shape[0])
    xs = hidden[order // top_k]
    if compute_dtype is not None:
        xs = xs.to(compute_dtype)
    act = ACTIVATIONS[activation]
    n = counts.tolist()
    mm_up = (mm3 or _slices(w3)) if w3 is not None else None
    h = expert_loop(xs, n, _gate_up_mm(mm1 or _slices(w1), mm_up), w2.shape[2], partial(gate, act))
    y = expert_loop(h, n, mm2 or _slices(w2), w2.shape[1])
    y = y.to(hidden.dtype)
    return combine(y, order, weights, valid, tokens, hidden.dtype)


def moe_grouped(hidden, weights, ids, w1, w2, activation, w3=None):
    tokens, top_k = ids.shape
    order, counts, valid = sort_pairs(ids, w1.shape[0])
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = hidden[order // top_k]
    g = gate_up(lambda w: torch._grouped_mm(xs, w.transpose(-2, -1), offs=offs), w1, w3)
    h = gate(ACTIVATIONS[activation], g)
    y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
    return combine(y, order, weights, valid, tokens, hidden.dtype)


def moe_bmm(hidden, weights, ids, w1, w2, activation, w3=None):
    tokens, top_k = ids.shape
    num_experts = w1.shape[0]
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    e = torch.where(valid, flat, 0).long()
    x = hidden.repeat_interleave(top_k, dim=0)
    g = gate_up(lambda w: torch.bmm(w[e], x.unsqueeze(-1)).squeeze(-1), w1, w3)
    h = gate(ACTIVATIONS[activation], g)
    y = torch.bmm(w2[e], h.unsqueeze(-1)).squeeze(-1)
    order = torch.arange(flat.numel(), device=flat.device)
    return combine(y, order, weights, valid, tokens, hidden.dtype)


def moe_pairs(hidden, weights, ids, w1, w2, activation, w3=None, mm1=None, mm2=None, mm3=None):
    """For a few (token, pick) pairs: read the ids on the host and run each used expert on its
    rows directly (no sort, gather or scatter of the whole batch). ``mm1``/``mm2``/``mm3`` as in
    ``moe_loop``."""
    mm_up = (mm3 or _slices(w3)) if w3 is not None else None
    mm_gate_up, mm2 = _gate_up_mm(mm1 or _slices(w1), mm_up), mm2 or _slices(w2)
    tokens, top_k = ids.shape
    num_experts = w1.shape[0]
    act = ACTIVATIONS[activation]
    out = torch.zeros(hidden.shape, dtype=torch.result_type(hidden, weights), device=hidden.device)
    flat_w = weights.reshape(-1)
    rows: dict[int, list[int]] = {}
    for pair, e in enumerate(ids.reshape(-1).tolist()):
        if 0 <= e < num_experts:
            rows.setdefault(e, []).append(pair)
    for e, pairs in rows.items():
        if len(pairs) == 1:
            p = pairs[0]
            x, w, at = hidden[p // top_k : p // top_k + 1], flat_w[p : p + 1], None
        else:
            at = torch.tensor([p // top_k for p in pairs], device=hidden.device)
            x, w = hidden[at], flat_w[torch.tensor(pairs, device=hidden.device)]
        y = mm2(e, gate(act, mm_gate_up(e, x))) * w[:, None]
        if at is None:
            out[pairs[0] // top_k] += y[0]
        else:
            out.index_add_(0, at, y.to(out.dtype))
    return out.to(hidden.dtype)


PAIRS_MAX = 16  # the "pairs" tactic is offered up to this many (token, pick) pairs


def _bmm_bytes(shapes: Sequence[Any], elem_bytes: int) -> int:
    (tokens, _), (_, top_k), (_, n1, hdim), (_, _, inter) = shapes[0], shapes[2], shapes[3], shapes[4]
    n1 = n1 * 2 if len(shapes) > 6 and shapes[6] is not None else n1  # separate gate and up
    return tokens * top_k * (n1 * hdim + hdim * inter) * elem_bytes


# -- runners: flashtune.moe -------------------------------------------------------------------
# inputs: (hidden [T, H], topk_weights [T, k], topk_ids [T, k], w1 [E, 2I, H], w2 [E, H, I], activation,
#          w3 None | [E, I, H] with w1 then [E, I, H])


class AtenMoeRunner(TunableRunner):
    """The MoE layer from ATen ops: ``"loop"``, ``"grouped"`` or ``"bmm"`` (see the module doc)."""

    name = "aten_moe"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        hidden = inputs[0]
        tactics: list[Tactic] = [DEFAULT_TACTIC]
        if grouped_mm_available(hidden.device, hidden.dtype):
            tactics.append("loop")  # the default is "grouped" here
        if _bmm_bytes(profile.shapes, hidden.element_size()) <= BMM_MAX_BYTES:
            tactics.append("bmm")
        if profile.shapes[2][0] * profile.shapes[2][1] <= PAIRS_MAX:
            tactics.append("pairs")
        return tactics

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        hidden = inputs[0]
        if tactic == DEFAULT_TACTIC:
            tactic = "grouped" if grouped_mm_available(hidden.device, hidden.dtype) else "loop"
        fn = {"loop": moe_loop, "grouped": moe_grouped, "bmm": moe_bmm, "pairs": moe_pairs}.get(tactic)
        if fn is None:
            raise ValueError(f"unknown aten_moe tactic {tactic!r}")
        return fn(*inputs)


class CpuMoeRunner(TunableRunner):
    """The loop on CPU from re-laid-out expert weights (parameters only): ``"fp32_loop"`` (bf16/fp16
    computed in fp32 from cached fp32 copies: CPUs without bf16 FMA run fp32 GEMMs several times
    faster), ``"mkldnn_packed"`` (oneDNN-packed per-expert weights in their own dtype: fp32, and
    bf16 where oneDNN packs it, which halves the bytes read against fp32 copies and ran 2x faster
    than ``F.linear`` at M <= 16 on a CPU with avx512_bf16) and ``"fp32_packed"`` (bf16/fp16:
    packed fp32 copies); ``"packed_pairs"``: the ``"pairs"`` formulation (a few pairs) from the
    packed weights in their own dtype."""

    name = "cpu_moe"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        hidden, _, _, w1, w2, _, w3 = inputs
        weights = (w1, w2) if w3 is None else (w1, w2, w3)
        if hidden.device.type != "cpu" or not all(WeightCache.cacheable(w) for w in weights):
            return []
        tactics: list[Tactic] = []
        if hidden.dtype in (torch.bfloat16, torch.float16):
            tactics += ["fp32_loop", "fp32_packed"] if _mkldnn_packs(torch.float32) else ["fp32_loop"]
        if hidden.dtype in (torch.float32, torch.bfloat16) and _mkldnn_packs(hidden.dtype):
            tactics.append("mkldnn_packed")
            if profile.shapes[2][0] * profile.shapes[2][1] <= PAIRS_MAX:
                tactics.append("packed_pairs")
        return tactics

    def copy_kind(self, tactic: Tactic) -> str | None:
        if tactic == "fp32_loop":
            return "fp32"
        return (
            packed_kind(tactic == "fp32_packed") if tactic in ("mkldnn_packed", "fp32_packed", "packed_pairs") else None
        )

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        return admitting(AutoTuner.get().weights, lambda: self._run(tactic, *inputs))

    def unpacked(self, tactic: Tactic) -> Callable[..., Any] | None:
        return partial(self._run, tactic)

    def _run(self, tactic: Tactic, *inputs: Any) -> torch.Tensor:
        hidden, weights, ids, w1, w2, activation, w3 = inputs
        if tactic == "fp32_loop":
            w3_32 = fp32_copy(w3) if w3 is not None else None
            return moe_loop(
                hidden, weights, ids, fp32_copy(w1), fp32_copy(w2), activation, w3_32, compute_dtype=torch.float32
            )
        if tactic in ("mkldnn_packed", "fp32_packed"):
            fp32 = tactic == "fp32_packed"
            return moe_loop(
                hidden,
                weights,
                ids,
                w1,
                w2,
                activation,
                w3,
                compute_dtype=torch.float32 if fp32 else None,
                mm1=packed(w1, fp32),
                mm2=packed(w2, fp32),
                mm3=packed(w3, fp32) if w3 is not None else None,
            )
        if tactic == "packed_pairs":
            mm3 = packed(w3, False) if w3 is not None else None
            return moe_pairs(hidden, weights, ids, w1, w2, activation, w3, packed(w1, False), packed(w2, False), mm3)
        raise ValueError(f"unknown cpu_moe tactic {tactic!r}")
