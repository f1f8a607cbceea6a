"""ATen and CPU candidates for the MoE ops (``flashtune.moe`` and ``flashtune.grouped_mm``).

The MoE computation, with the semantics of transformers' experts forward: for token ``t`` and each
of its ``k`` picks ``e = ids[t, j]`` in ``[0, E)``::

    g = x[t] @ w1[e].T                       # [2I], rounded to x.dtype     (w1: [E, 2I, H])
    h = act(g[:I]) * g[I:]                   # [I]                           (w2: [E, H, I])
    y = h @ w2[e].T                          # [H], rounded to x.dtype
    out[t] += y * weights[t, j]              # in result_type(x, weights), cast to x.dtype at the end

Picks outside ``[0, E)`` contribute nothing. Formulations (tactics):

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

from ..tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner
from .cpu import _mkldnn_pack, _mkldnn_packs
from .weight_cache import CACHE

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
}
BMM_MAX_BYTES = 64 * 2**20  # the "bmm" tactic's gathered weights stay below this


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs here: CPU builds have it for every float dtype; CUDA
    needs bf16 on sm80+."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


# -- shared pieces ----------------------------------------------------------------------------


def sort_pairs(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the flattened (token, pick) pairs by expert: ``(order, counts, valid_sorted)`` where
    ``order`` lists pair indices grouped by expert (invalid ids last), ``counts [E]`` the pairs per
    expert, and ``valid_sorted`` which sorted pairs have an id in ``[0, E)``."""
    flat = topk_ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    ids = torch.where(valid, flat, num_experts).long()
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts + 1)[:num_experts]
    return order, counts, valid[order]


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


def _expert_loop(
    xs: torch.Tensor,
    counts: list[int],
    mm: Callable[[int, torch.Tensor], torch.Tensor],
    out_cols: int,
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``fn(mm(e, rows of e))`` for every expert with rows, into one [rows, out_cols] tensor (rows
    after the counted ones are zero); ``mm(e, x)`` is ``x @ w[e].T``."""
    out = xs.new_zeros((xs.shape[0], out_cols))
    start = 0
    for e, n in enumerate(counts):
        if n:
            y = mm(e, xs[start : start + n])
            out[start : start + n] = fn(y) if fn is not None else y
            start += n
    return out


def _slices(w: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
    return lambda e, x: F.linear(x, w[e])


def gate(act: Callable, g: torch.Tensor) -> torch.Tensor:
    gate_part, up = g.chunk(2, dim=-1)
    return act(gate_part) * up


def moe_loop(hidden, weights, ids, w1, w2, activation, compute_dtype=None, mm1=None, mm2=None):
    """The loop formulation, computing in ``compute_dtype`` (default: the inputs' dtype) with
    ``mm1``/``mm2`` (default: ``F.linear`` against each expert's slice of ``w1``/``w2``)."""
    tokens, top_k = ids.shape
    order, counts, valid = sort_pairs(ids, w1.shape[0])
    xs = hidden[order // top_k]
    if compute_dtype is not None:
        xs = xs.to(compute_dtype)
    act = ACTIVATIONS[activation]
    n = counts.tolist()
    h = _expert_loop(xs, n, mm1 or _slices(w1), w2.shape[2], partial(gate, act))
    y = _expert_loop(h, n, mm2 or _slices(w2), w2.shape[1])
    y = y.to(hidden.dtype)
    return combine(y, order, weights, valid, tokens, hidden.dtype)


def moe_grouped(hidden, weights, ids, w1, w2, activation):
    tokens, top_k = ids.shape
    order, counts, valid = sort_pairs(ids, w1.shape[0])
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = hidden[order // top_k]
    g = torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offs)
    h = gate(ACTIVATIONS[activation], g)
    y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
    return combine(y, order, weights, valid, tokens, hidden.dtype)


def moe_bmm(hidden, weights, ids, w1, w2, activation):
    tokens, top_k = ids.shape
    num_experts = w1.shape[0]
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    e = torch.where(valid, flat, 0).long()
    x = hidden.repeat_interleave(top_k, dim=0)
    g = torch.bmm(w1[e], x.unsqueeze(-1)).squeeze(-1)
    h = gate(ACTIVATIONS[activation], g)
    y = torch.bmm(w2[e], h.unsqueeze(-1)).squeeze(-1)
    order = torch.arange(flat.numel(), device=flat.device)
    return combine(y, order, weights, valid, tokens, hidden.dtype)


def moe_pairs(hidden, weights, ids, w1, w2, activation):
    """For a few (token, pick) pairs: read the ids on the host and run each used expert on its
    rows directly (no sort, gather or scatter of the whole batch)."""
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
        y = F.linear(gate(act, F.linear(x, w1[e])), w2[e]) * w[:, None]
        if at is None:
            out[pairs[0] // top_k] += y[0]
        else:
            out.index_add_(0, at, y.to(out.dtype))
    return out.to(hidden.dtype)


PAIRS_MAX = 16  # the "pairs" tactic is offered up to this many (token, pick) pairs


def _bmm_bytes(shapes: Sequence[Any], elem_bytes: int) -> int:
    (tokens, _), (_, top_k), (_, n1, hdim), (_, _, inter) = shapes[0], shapes[2], shapes[3], shapes[4]
    return tokens * top_k * (n1 * hdim + hdim * inter) * elem_bytes


def _as_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float()


def _parameter_of(w: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """(parameter, transposed) when ``w`` is a parameter or its ``transpose(-2, -1)`` view: what
    cached copies can be keyed on (a view is a new object every call)."""
    if CACHE.cacheable(w):
        return w, False
    base = w._base
    if (
        base is not None
        and CACHE.cacheable(base)
        and base.dim() == 3
        and w.dim() == 3
        and w.shape == base.transpose(-2, -1).shape
        and w.stride() == base.transpose(-2, -1).stride()
        and w.storage_offset() == base.storage_offset()
    ):
        return base, True
    return None


def _fp32_copy(w: torch.Tensor) -> torch.Tensor | None:
    """A cached fp32 copy of a parameter, or of a parameter's transpose(-2, -1) view."""
    found = _parameter_of(w)
    if found is None:
        return None
    copy = CACHE.get(found[0], "fp32", _as_fp32)
    return copy.transpose(-2, -1) if found[1] else copy


def _packed(w: torch.Tensor, fp32: bool) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``mm(e, x) = x @ w[e].T`` from oneDNN-packed per-expert weights (fp32 copies if ``fp32``),
    packed on first use of each expert and cached against the parameter ``w`` stems from."""
    param, transposed = _parameter_of(w)
    kind = f"mkldnn_packed{'_fp32' if fp32 else ''}{'_t' if transposed else ''}"

    def make(e: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def pack(p: torch.Tensor) -> torch.Tensor:
            m = p[e].t() if transposed else p[e]
            return _mkldnn_pack(m.float() if fp32 else m)

        return pack

    def mm(e: int, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), CACHE.get(param, f"{kind}[{e}]", make(e)), None, "none", [], ""
        )

    return mm


# -- runners: flashtune.moe -------------------------------------------------------------------
# inputs: (hidden [T, H], topk_weights [T, k], topk_ids [T, k], w1 [E, 2I, H], w2 [E, H, I], activation)


class AtenMoeRunner(TunableRunner):
    """The MoE layer from ATen ops: ``"loop"``, ``"grouped"`` or ``"bmm"`` (see the module doc)."""

    name = "aten_moe"

    def __init__(self, variants: bool = True) -> None:
        self.variants = variants

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        if not self.variants:
            return [DEFAULT_TACTIC]
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
    faster), ``"mkldnn_packed"`` (fp32: oneDNN-packed per-expert weights) and ``"fp32_packed"``
    (bf16/fp16: packed fp32 copies)."""

    name = "cpu_moe"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        hidden, _, _, w1, w2, _ = inputs
        if hidden.device.type != "cpu" or _parameter_of(w1) is None or _parameter_of(w2) is None:
            return []
        packs = _mkldnn_packs(torch.float32)
        if hidden.dtype == torch.float32:
            return ["mkldnn_packed"] if packs else []
        if hidden.dtype in (torch.bfloat16, torch.float16):
            return ["fp32_loop", "fp32_packed"] if packs else ["fp32_loop"]
        return []

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        hidden, weights, ids, w1, w2, activation = inputs
        if tactic == "fp32_loop":
            return moe_loop(
                hidden, weights, ids, _fp32_copy(w1), _fp32_copy(w2), activation, compute_dtype=torch.float32
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
                compute_dtype=torch.float32 if fp32 else None,
                mm1=_packed(w1, fp32),
                mm2=_packed(w2, fp32),
            )
        raise ValueError(f"unknown cpu_moe tactic {tactic!r}")


# -- runners: flashtune.grouped_mm ------------------------------------------------------------
# inputs: (x [S, K], w [E, K, N], offs [E] int32 cumulative row ends); rows >= offs[-1] are zero.


def grouped_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, compute_dtype=None) -> torch.Tensor:
    ends = offs.tolist()
    counts = [b - a for a, b in zip([0, *ends[:-1]], ends)]
    xs = x if compute_dtype is None else x.to(compute_dtype)
    out = _expert_loop(xs, counts, lambda e, rows: rows @ w[e], w.shape[2])
    return out.to(x.dtype)


class AtenGroupedMMRunner(TunableRunner):
    """``torch._grouped_mm`` (the default where available) or a loop of ``mm`` (``"loop"``)."""

    name = "aten_grouped_mm"

    def __init__(self, variants: bool = True) -> None:
        self.variants = variants

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        x = inputs[0]
        if self.variants and grouped_mm_available(x.device, x.dtype):
            return [DEFAULT_TACTIC, "loop"]
        return [DEFAULT_TACTIC]

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        x, w, offs = inputs
        if tactic == DEFAULT_TACTIC and grouped_mm_available(x.device, x.dtype):
            out = torch._grouped_mm(x, w, offs=offs)
            rows = torch.arange(x.shape[0], device=x.device)
            if x.shape[0]:
                out = torch.where((rows < offs[-1])[:, None], out, 0)  # rows no group covers: zero
            return out
        if tactic in (DEFAULT_TACTIC, "loop"):
            return grouped_loop(x, w, offs)
        raise ValueError(f"unknown aten_grouped_mm tactic {tactic!r}")


class CpuGroupedMMRunner(TunableRunner):
    """bf16/fp16 grouped GEMM on CPU in fp32 from a cached fp32 weight (parameters only)."""

    name = "cpu_grouped_mm"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        x, w, _ = inputs
        if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or _fp32_copy(w) is None:
            return []
        return ["fp32_loop"]

    def forward(self, inputs: Sequence[Any], tactic: Tactic = DEFAULT_TACTIC) -> torch.Tensor:
        if tactic != "fp32_loop":
            raise ValueError(f"unknown cpu_grouped_mm tactic {tactic!r}")
        x, w, offs = inputs
        return grouped_loop(x, _fp32_copy(w), offs, compute_dtype=torch.float32)
