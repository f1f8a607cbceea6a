"""The pieces an MoE layer is recognised by (``moe_layers.py``, ``moe_gathered.py``): the
functions a grouped GEMM may call, a gated activation, the sum over the picks, and ``MoeLayer``,
what a match reads out of the graph. These only read the graph.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .fx_nodes import (
    Node,
    _arg,
    _call,
    _fn,
    _getitem,
    _method,
    _mul_operands,
    _same_value,
    _strip_to,
    _transposed_param,
    _val,
)


def grouped_targets() -> set:
    """The functions a plain grouped GEMM call may target in a graph."""
    out: set = set()
    if hasattr(torch, "_grouped_mm"):
        out.add(torch._grouped_mm)
    if hasattr(F, "grouped_mm"):
        out.add(F.grouped_mm)
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        out |= {fallback, fallback.default}
    return out


# -- MoE pieces -------------------------------------------------------------------------------


def _activation(node: Any) -> tuple[str, Any] | None:
    """(activation name, its input) for F.silu / F.gelu calls."""
    if _fn(node, F.silu, torch.nn.functional.silu) and not node.kwargs.get("inplace", False) and len(node.args) == 1:
        return "silu", node.args[0]
    if _fn(node, F.gelu) and len(node.args) == 1:
        approx = node.kwargs.get("approximate", "none")
        if set(node.kwargs) <= {"approximate"} and approx in ("none", "tanh"):
            return ("gelu" if approx == "none" else "gelu_tanh"), node.args[0]
    return None


def _activated_products(node: Any) -> list[tuple[str, Any, Any]]:
    """(activation, its input, the other factor) for each way ``node`` reads as ``act(a) * b``."""
    ops = _mul_operands(node)
    out = []
    for a, b in (ops, ops[::-1]) if ops is not None else ():
        act = _activation(a)
        if act is not None:
            out.append((act[0], act[1], b))
    return out


def _gated(node: Any) -> tuple[str, Any] | None:
    """(activation, g) when ``node`` is ``act(g.chunk(2, -1)[0]) * g.chunk(2, -1)[1]``."""
    for name, a, b in _activated_products(node):
        gate, up = _getitem(a, 0), _getitem(b, 1)
        if gate is None or up is None or gate[0] is not up[0]:
            continue
        chunk = gate[0]
        if (
            _call(chunk, "chunk", torch.chunk)
            and _arg(chunk, 1, "chunks") == 2
            and _arg(chunk, 2, "dim", 0) in (-1, _val(chunk.args[0]).dim() - 1)
        ):
            return name, chunk.args[0]
    return None


def _split_gated(node: Any, targets: set) -> tuple | None:
    """(activation, x, w_gate, w_up, offs) when ``node`` is ``act(gm(x, w_gate)) * gm(x, w_up)``
    for two grouped GEMMs ``gm`` of the same rows ``x`` and offsets (gate and up kept apart)."""
    for name, a, b in _activated_products(node):
        gate, up = grouped_call(_strip_to(a), targets), grouped_call(_strip_to(b), targets)
        if gate is not None and up is not None and _same_value(gate[0], up[0]) and gate[2] is up[2]:
            return name, gate[0], gate[1], up[1], gate[2]
    return None


def _gate_and_up(h: Any, targets: set) -> tuple | None:
    """(activation, x, w1 effective, w3 effective or None, offs) of the first grouped GEMM(s) and
    gate feeding ``h``: stacked [gate; up] chunked in two, or separate gate and up GEMMs."""
    gated = _gated(_strip_to(h))
    if gated is not None:
        gemm1 = grouped_call(gated[1], targets)
        return (gated[0], gemm1[0], gemm1[1], None, gemm1[2]) if gemm1 is not None else None
    return _split_gated(_strip_to(h), targets)


def expert_weight(effective: Node) -> Any:
    """The [E, N, K] weight whose per-expert transpose a grouped GEMM multiplies by: the parameter
    itself (past casts that change nothing) when the graph transposes it, else a marker to
    transpose ``effective`` (``("transpose", effective)``)."""
    w = _transposed_param(effective)
    return _strip_to(w) if w is not None else ("transpose", effective)


class GroupedExperts(NamedTuple):
    """The expert computation on rows grouped by expert, as ``match_experts`` reads it."""

    rows: Node  # [R, H], grouped by expert
    offs: Node  # [E] cumulative row ends, as the grouped GEMMs take them
    w1: Any  # expert_weight: gate ([E, I, H]), or stacked [gate; up] ([E, 2I, H]) when w3 is None
    w2: Any  # [E, H, I]
    w3: Any  # the up weight when separate, else None
    activation: str
    experts: int  # E, as the down GEMM's weights have it


def match_experts(node: Any, targets: set) -> GroupedExperts | None:
    """The grouped experts block that ``node`` ends, if it is one: ``node`` is the down GEMM
    ``gm(act(gate) * up, w2, offs)`` with gate and up the grouped GEMMs of one set of rows on the
    same offsets (stacked and chunked in two, or separate), casts that change nothing skipped."""
    down = grouped_call(node, targets)
    if down is None:
        return None
    h, w2t, offs = down
    first = _gate_and_up(h, targets)
    if first is None or first[4] is not offs:
        return None
    activation, rows, w1t, w3t, _ = first
    w3 = expert_weight(w3t) if w3t is not None else None
    experts = _val(w2t).shape[0]
    return GroupedExperts(_strip_to(rows), offs, expert_weight(w1t), expert_weight(w2t), w3, activation, experts)


def grouped_call(node: Any, targets: set) -> tuple | None:
    """(x, w, offs) of a plain grouped GEMM call (no bias, output in the input's dtype)."""
    if not _fn(node, *targets):
        return None
    extra = {k: v for k, v in node.kwargs.items() if k not in ("input", "mat_a", "mat_b", "weight", "offs")}
    if any(v is not None for v in extra.values()) or len(node.args) > 3:
        return None
    x = _arg(node, 0, "input", node.kwargs.get("mat_a"))
    w = _arg(node, 1, "weight", node.kwargs.get("mat_b"))
    offs = _arg(node, 2, "offs")
    return (x, w, offs) if all(isinstance(t, Node) for t in (x, w, offs)) else None


def _sum_over_picks(node: Node) -> tuple | None:
    """(flat pair outputs, top_k) when ``node`` is ``pairs.view(T, k, H).sum(dim=1)``."""
    if (
        not _call(node, "sum", torch.sum)
        or _arg(node, 1, "dim") not in (1, (1,), [1])
        or node.kwargs.get("keepdim", False)
        or node.kwargs.get("dtype") is not None
    ):
        return None
    view = node.args[0]
    if not (_method(view, "view", "reshape") and _val(view).dim() == 3):
        return None
    return view.args[0], _val(view).shape[1]


def _either_order(operands: tuple, pick: Any) -> tuple | None:
    """(other, operand, pick(operand)) for the first of the two product operands that ``pick``
    accepts (returns non-None for), else None."""
    for other, operand in (operands, operands[::-1]):
        got = pick(operand)
        if got is not None:
            return other, operand, got
    return None


class MoeLayer:
    """The pieces of one matched MoE layer."""

    def __init__(self, hidden, weights, ids, w1, w2, activation, nodes, w3=None):
        self.hidden, self.weights, self.ids, self.w1, self.w2, self.w3 = hidden, weights, ids, w1, w2, w3
        self.activation, self.nodes = activation, nodes  # w3: the up weight when separate from w1 (gate)
