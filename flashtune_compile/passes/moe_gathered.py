"""MoE layers whose expert weights are gathered per id (the second family of ``moe_layers.py``):
``repeat_interleave`` of the rows and two ``bmm`` (transformers' ``batched_mm``), or ``w[ids]`` with
an ``einsum`` per GEMM and one with the routing weights over the picks (gpt-fast's Mixtral).
"""

from __future__ import annotations

from typing import Any

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
    _squeezed,
    _unsqueezed,
    _val,
)
from .moe_pieces import MoeLayer, _activated_products, _either_order, _gated, _sum_over_picks


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
