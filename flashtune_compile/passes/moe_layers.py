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

Family 1 is matched here, family 2 in ``moe_gathered.py``; the pieces both read (gated activation,
sum over the picks, ``MoeLayer``) are in ``moe_pieces.py``.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch

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
    _unsqueezed,
    _val,
)
from .moe_gathered import _match_batched, _match_einsum
from .moe_pieces import GroupedExperts, MoeLayer, _either_order, _sum_over_picks, match_experts

# -- tokens sorted by expert ------------------------------------------------------------------


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
    gathered = _getitem(ex.block.rows) if ex is not None else None
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
    block: GroupedExperts  # its rows are the sorted pairs' token rows: ``hidden[perm // k]``

    def layer(self, hidden: Node, nodes: list) -> MoeLayer:
        b = self.block
        return MoeLayer(hidden, self.weights, self.ids, b.w1, b.w2, b.activation, nodes, b.w3)


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
    block = match_experts(y2, targets)
    if block is None:
        return None
    sort = _sorting(perm)
    ids = _flat(sort.args[0]) if sort is not None else None
    if ids is None or not _counts_per_expert(block.offs, sort, ids, block.experts):
        return None
    return _Experts(_flat(sw_src[0]), ids, block)


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
    gathered = _getitem(ex.block.rows) if ex is not None else None
    if gathered is None or gathered[1] is not index or gathered[0] is not hidden:
        return None
    if not _same_size(_val(ex.ids).shape[-1], top_k):
        return None
    return ex.layer(hidden, [out])


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
