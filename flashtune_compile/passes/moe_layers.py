"""How a Mixture-of-Experts layer is recognised in a Dynamo graph: by its data flow, not by one
spelling. ``match_layer(node)`` reads the layer that ``node`` ends, if any, as a ``MoeLayer``
(hidden rows, routing weights, ids, expert weights, activation); it only reads the graph.

Two families of data flow, each checked link by link (the same permutation, offsets, ids and rows
feed each step; ``histc`` has ``E`` bins; the activation is gated):

1. *Tokens sorted by expert*: ``sort`` or ``argsort`` of the flat top-k ids; counts by ``histc``
   (max ``E-1`` or ``E``) or ``bincount`` of the sorted or unsorted ids; ``cumsum`` offsets (cast to
   int32 before or after); a gather of the rows (``perm // k``); grouped GEMMs on those offsets,
   ``[gate; up]`` chunked in two or separate gate and up GEMMs; ``act(gate) * up``; the down GEMM;
   scaling by the sorted routing weights; back to token order by an inverse-permutation gather or
   ``out[perm] = y`` then ``view(T, k, H).sum(1)``, or by ``zeros_like(x).scatter_add`` /
   ``index_add`` (transformers 5's ``grouped_mm`` layer, blocks written by hand around
   ``torch._grouped_mm``, torchtitan's grouped experts).
2. *Expert weights gathered per id*: ``repeat_interleave`` of the rows and two ``bmm``
   (transformers' ``batched_mm``), or ``w[ids]`` with an ``einsum`` per GEMM and one with the
   routing weights over the picks (gpt-fast's Mixtral).
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .fx_nodes import (
    Node,
    _arg,
    _call,
    _flat,
    _fn,
    _getitem,
    _method,
    _mul_operands,
    _same_size,
    _squeezed,
    _strip_to,
    _transposed_param,
    _unsqueezed,
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
        if gate is not None and up is not None and gate[0] is up[0] and gate[2] is up[2]:
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


# -- the patterns ----------------------------------------------------------------------------


class MoeLayer:
    """The pieces of one matched MoE layer."""

    def __init__(self, hidden, weights, ids, w1, w2, activation, nodes, w3=None):
        self.hidden, self.weights, self.ids, self.w1, self.w2, self.w3 = hidden, weights, ids, w1, w2, w3
        self.activation, self.nodes = activation, nodes  # w3: the up weight when separate from w1 (gate)


def _match_sorted(out: Node, targets: set) -> MoeLayer | None:
    """Pairs sorted by expert, put back in (token, pick) order, summed over the picks."""
    found = _sum_over_picks(out)
    if found is None:
        return None
    pairs, top_k = found
    unsorted = _unpermuted(pairs)
    if unsorted is None:
        return None
    weighted, perm, back = unsorted
    ex = _sorted_experts(weighted, perm, targets)
    gathered = _getitem(ex.rows) if ex is not None else None
    if gathered is None or not (
        _fn(gathered[1], operator.floordiv)
        and gathered[1].args[0] is perm
        and _same_size(_val(gathered[1].args[1]), top_k)
    ):
        return None
    return ex.layer(gathered[0], [out, *back])


class _Experts(NamedTuple):
    """The expert computation on the (token, pick) pairs sorted by expert, as matched."""

    weights: Node  # the flat routing weights
    ids: Node  # the [T, k] expert ids
    rows: Node  # the sorted pairs' token rows: ``hidden[perm // k]``
    w1t: Node  # the gate GEMM's weight as the graph passes it ([E, H, N]), stacked [gate; up] without w3t
    w2t: Node
    w3t: Node | None  # the up GEMM's weight when separate
    activation: str

    def layer(self, hidden: Node, nodes: list) -> MoeLayer:
        w3 = _weight(self.w3t) if self.w3t is not None else None
        return MoeLayer(
            hidden, self.weights, self.ids, _weight(self.w1t), _weight(self.w2t), self.activation, nodes, w3
        )


def _sorted_experts(weighted: Node, perm: Node, targets: set) -> _Experts | None:
    """The experts' work on the pairs sorted by ``perm``, read back from ``weighted``, its output
    scaled by the sorted routing weights: ``perm`` sorts the flat ids, offsets count them per
    expert, grouped GEMMs on those offsets with a gated activation between them."""
    while _method(weighted, "to") and len(weighted.args) == 2 and not weighted.kwargs:
        weighted = weighted.args[0]  # a cast back to the hidden dtype after scaling in fp32
    ops = _mul_operands(weighted)
    if ops is None:
        return None

    def sorted_weights(node: Any) -> Any:  # ``flat_weights[perm]`` as a column
        col = _unsqueezed(node, -1)
        if col is None and _method(node, "reshape", "view") and list(node.args[1:]) == [-1, 1]:
            col = node.args[0]
        src = _getitem(col)
        return src if src is not None and src[1] is perm and _flat(src[0]) is not None else None

    found = _either_order(ops, sorted_weights)
    if found is None:
        return None
    y2, _, sw_src = found
    while _method(y2, "float") or (_method(y2, "to") and len(y2.args) == 2):
        y2 = y2.args[0]
    gemm2 = grouped_call(y2, targets)
    if gemm2 is None:
        return None
    h, w2t, offs = gemm2
    first = _gate_and_up(h, targets)
    if first is None or first[4] is not offs:
        return None
    activation, xg, w1t, w3t, _ = first
    sort = _sorting(perm)
    ids = _flat(sort.args[0]) if sort is not None else None
    if ids is None or not _counts_per_expert(offs, sort, ids, _val(w2t).shape[0]):
        return None
    return _Experts(_flat(sw_src[0]), ids, _strip_to(xg), w1t, w2t, w3t, activation)


def _unpermuted(pairs: Node) -> tuple | None:
    """(weighted sorted pairs, perm, the nodes doing it) when ``pairs`` puts the sorted pairs back
    in (token, pick) order: ``weighted[inv]`` with ``inv = empty_like(perm); inv[perm] = arange``
    (transformers), or ``out = empty_like(weighted); out[perm] = weighted`` (an index-put)."""
    gathered = _getitem(pairs)
    if gathered is not None:
        weighted, inv_perm = gathered
        if not _call(inv_perm, "empty_like", torch.empty_like):
            return None
        perm = inv_perm.args[0]
        puts = [u for u in inv_perm.users if _fn(u, operator.setitem)]
        if len(puts) != 1 or puts[0].args[1] is not perm or not _fn(puts[0].args[2], torch.arange):
            return None
        return weighted, perm, [inv_perm, puts[0], puts[0].args[2]]
    if not _call(pairs, "empty_like", torch.empty_like) or len(pairs.args) != 1 or pairs.kwargs:
        return None
    weighted = pairs.args[0]
    puts = [u for u in pairs.users if _fn(u, operator.setitem)]
    if len(puts) != 1 or len(pairs.users) != 2 or puts[0].args[0] is not pairs or puts[0].args[2] is not weighted:
        return None
    perm = puts[0].args[1]
    return (weighted, perm, [puts[0]]) if isinstance(perm, Node) else None


def _sorting(perm: Node) -> Node | None:
    """The node sorting the flat ids when ``perm`` is their ascending order: ``sort(ids)[1]`` or
    ``argsort(ids)`` (stable or not: ties are pairs of one expert, either order sums the same)."""
    if _getitem(perm, 1) is not None and _call(perm.args[0], "sort", torch.sort):
        node = perm.args[0]
    elif _call(perm, "argsort", torch.argsort):
        node = perm
    else:
        return None
    if len(node.args) > 1 or set(node.kwargs) - {"dim", "descending", "stable"}:
        return None
    if node.kwargs.get("descending", False) or node.kwargs.get("dim", -1) not in (-1, 0):
        return None
    return node


def _match_scattered(out: Node, targets: set) -> MoeLayer | None:
    """torchtitan's return to token order: ``zeros_like(x).scatter_add(0, idx.reshape(-1, 1)
    .expand(-1, H), y)`` (or ``index_add(0, idx, y)``) with ``idx = perm // k`` the token of each
    sorted pair and ``y`` the down GEMM's rows scaled by the sorted routing weights."""
    if _call(out, "scatter_add", torch.scatter_add) and len(out.args) == 4 and not out.kwargs:
        base, dim, index, src = out.args
        while _method(index, "expand", "reshape", "view") or _unsqueezed(index, -1) is not None:
            index = index.args[0]
    elif _call(out, "index_add", torch.index_add) and len(out.args) == 4 and not out.kwargs:
        base, dim, index, src = out.args
    else:
        return None
    if dim != 0 or not (_call(base, "zeros_like", torch.zeros_like) and len(base.args) == 1 and not base.kwargs):
        return None
    hidden = base.args[0]
    if not (_fn(index, operator.floordiv) and isinstance(index.args[0], Node)):
        return None
    perm, top_k = index.args
    ex = _sorted_experts(src, perm, targets)
    gathered = _getitem(ex.rows) if ex is not None else None
    if gathered is None or gathered[1] is not index or gathered[0] is not hidden:
        return None
    if not _same_size(_val(ex.ids).shape[-1], top_k):
        return None
    return ex.layer(hidden, [out])


def _einsum(node: Any, template: str) -> tuple | None:
    """The two operands of ``node`` when it is ``einsum(eq, a, b)`` with ``eq`` the ``template``
    up to the names of its letters and spaces, or the template with its operands swapped."""
    if not _fn(node, torch.einsum, torch.functional.einsum) or node.kwargs or len(node.args) < 2:
        return None
    eq, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(eq, str) or len(operands) != 2 or "->" not in eq:
        return None
    ins, out = eq.replace(" ", "").split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    if _canonical(f"{parts[0]},{parts[1]}->{out}") == template:
        return operands[0], operands[1]
    if _canonical(f"{parts[1]},{parts[0]}->{out}") == template:
        return operands[1], operands[0]
    return None


def _canonical(eq: str) -> str:
    """``eq`` with its letters renamed a, b, c... in order of first appearance."""
    names: dict[str, str] = {}
    return "".join(names.setdefault(c, chr(ord("a") + len(names))) if c.isalpha() else c for c in eq)


PICK_GEMM = _canonical("ti,taoi->tao")  # x [T, H] by each pick's gathered weight [T, k, N, H]
PICK_DOWN = _canonical("tao,taio->tai")  # h [T, k, I] by each pick's gathered weight [T, k, H, I]
PICK_SUM = _canonical("tai,ta->ti")  # pick outputs [T, k, H] weighted and summed over k


def _match_einsum(out: Node) -> MoeLayer | None:
    """gpt-fast's Mixtral: expert weights gathered by id (``w[ids]``), an ``einsum`` per GEMM,
    ``act(x @ w1) * (x @ w3)``, and an ``einsum`` with the routing weights summing the picks."""
    found = _einsum(out, PICK_SUM)
    if found is None:
        return None
    outs, weights = found
    down = _einsum(outs, PICK_DOWN)
    if down is None:
        return None
    inner, w2g = down
    picked2 = _getitem(w2g)
    if picked2 is None:
        return None
    w2, ids = picked2
    for name, a, b in _activated_products(inner):
        gate, up = _einsum(a, PICK_GEMM), _einsum(b, PICK_GEMM)
        if gate is None or up is None or gate[0] is not up[0]:
            continue
        picked1, picked3 = _getitem(gate[1]), _getitem(up[1])
        if picked1 is None or picked3 is None or picked1[1] is not ids or picked3[1] is not ids:
            continue
        if not all(_val(w).dim() == 3 for w in (picked1[0], picked3[0], w2)) or _val(ids).dim() != 2:
            return None
        return MoeLayer(gate[0], weights, ids, picked1[0], w2, name, [out], picked3[0])
    return None


def _counts_per_expert(offs: Node, sort: Node, ids: Node, num_experts: int) -> bool:
    """``offs`` is the int32 ``cumsum`` of ``histc(ids, bins=E, min=0, max=E-1 or E)`` or of the
    bincount form, over the sorted or the unsorted flat ``ids`` (a cast of the sum may follow)."""
    while _method(offs, "to", "int") and not offs.kwargs and _val(offs).dtype == torch.int32:
        offs = offs.args[0]
    if not (
        _call(offs, "cumsum", torch.cumsum)
        and _arg(offs, 1, "dim") == 0
        and offs.kwargs.get("dtype") in (None, torch.int32, torch.int64)
    ):
        return False
    counts = offs.args[0]
    if _fn(counts, torch.histc):
        src = counts.args[0]
        ok = (
            _arg(counts, 1, "bins") == num_experts
            and _arg(counts, 2, "min") == 0
            and _arg(counts, 3, "max") in (num_experts - 1, num_experts)
        )
    elif _fn(counts, torch.bincount):
        src = counts.args[0]
        ok = _arg(counts, 2, "minlength", 0) == num_experts and counts.kwargs.get("weights") is None
    else:
        return False
    while _method(src, "float", "int", "long") or (_method(src, "to") and len(src.args) == 2):
        src = src.args[0]
    sorted_ids = _getitem(src, 0) is not None and src.args[0] is sort
    return ok and (sorted_ids or src is sort.args[0] or _flat(src) is ids)


def _weight(effective: Node) -> Any:
    """The [E, N, K] weight whose per-expert transpose the grouped GEMM multiplies by: the
    parameter itself when the graph transposes it, else a marker to transpose ``effective``."""
    w = _transposed_param(effective)
    return w if w is not None else ("transpose", effective)


def _match_batched(out: Node) -> MoeLayer | None:
    found = _sum_over_picks(out)
    if found is None:
        return None
    weighted, top_k = found
    ops = _mul_operands(weighted)
    if ops is None:
        return None
    found = _either_order(ops, lambda s: _flat(_unsqueezed(s, -1)))
    if found is None:
        return None
    y2, sw, weights = found
    step2 = _batched_linear(y2)
    if step2 is None:
        return None
    w2, ids, h = step2
    gated = _gated(h)
    if gated is None:
        return None
    activation, g = gated
    step1 = _batched_linear(g)
    if step1 is None or step1[1] is not ids:
        return None
    w1, _, x_rep = step1
    if not (
        _call(x_rep, "repeat_interleave", torch.repeat_interleave)
        and _same_size(_val(_arg(x_rep, 1, "repeats")), top_k)
        and _arg(x_rep, 2, "dim") == 0
    ):
        return None
    flat_ids = _flat(ids)
    if flat_ids is None:
        return None
    return MoeLayer(x_rep.args[0], weights, flat_ids, w1, w2, activation, [out, weighted, sw, y2, h, g, x_rep])


def _batched_linear(node: Any) -> tuple | None:
    """(w, ids, x) when ``node`` is ``bmm(w[ids], x.unsqueeze(-1)).squeeze(-1)``."""
    bmm = _squeezed(node, -1)
    if not (_fn(bmm, torch.bmm) or _method(bmm, "bmm")) or len(bmm.args) != 2:
        return None
    picked, col = bmm.args
    sel = _getitem(picked)
    x = _unsqueezed(col, -1)
    if sel is None or x is None or not isinstance(sel[1], Node) or _val(sel[0]).dim() != 3:
        return None
    return sel[0], sel[1], x


def match_layer(node: Node, targets: set) -> MoeLayer | None:
    """The MoE layer ``node`` ends (its sum over the picks, or its scatter onto the tokens), if any."""
    if not (
        _call(node, "sum", torch.sum)
        or _call(node, "scatter_add", torch.scatter_add)
        or _call(node, "index_add", torch.index_add)
        or _fn(node, torch.einsum, torch.functional.einsum)
    ):
        return None
    return (
        _match_sorted(node, targets) or _match_batched(node) or _match_scattered(node, targets) or _match_einsum(node)
    )
