"""Rewrite Mixture-of-Experts layers in a Dynamo graph into ``flashtune.moe``, and other grouped
GEMMs into ``flashtune.grouped_mm``.

Each layer ``moe_layers.match_layer`` recognises (by its data flow: see that module) becomes one
``flashtune.moe`` call when the op serves it (dtypes agree, no gradient is needed,
``OpSpec.serves``); the replaced nodes die and are removed. Where only the experts are recognised
(``moe_pieces.match_experts``: rows grouped by expert and their offsets, gate and up GEMMs, the
gated activation, the down GEMM), whatever dispatches and combines them (a custom op included)
stays as written and the experts become one ``flashtune.moe`` call on the grouped rows, one pick
per row. Any remaining ``torch._grouped_mm`` /
``F.grouped_mm`` / ``transformers::grouped_mm_fallback`` call becomes ``flashtune.grouped_mm``.
Anything else is left as it was, untouched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..ops.moe import GROUPED_MM, MOE
from ..ops.site import SiteOptions
from .fx_nodes import Node, _method, _val, erase_dead, replace_with_call, routable
from .moe_layers import match_layer
from .moe_pieces import GroupedExperts, MoeLayer, grouped_call, grouped_targets, match_experts
from .symbolic import site_for

log = logging.getLogger("flashtune")


def _weight_value(w: Any) -> Any:
    """The fake value of a matched [E, N, K] weight (see ``_weight``); None for no weight."""
    if w is None:
        return None
    return _val(w[1]).transpose(-2, -1) if isinstance(w, tuple) else _val(w)


def _weight_node(graph: torch.fx.Graph, before: Node, w: Any) -> Node | None:
    """A matched [E, N, K] weight as a node: the parameter, or a new transpose of the effective one."""
    if not isinstance(w, tuple):
        return w
    with graph.inserting_before(before):
        node = graph.call_method("transpose", (w[1], -2, -1))
    node.meta["example_value"] = _weight_value(w)
    return node


def _replace_moe(gm: torch.fx.GraphModule, out: Node, m: MoeLayer, options: SiteOptions) -> bool:
    """Replace the layer ending at ``out`` by one ``flashtune.moe`` call, if the op serves it."""
    graph = gm.graph
    weights = (m.w1, m.w2, m.w3)
    values = [_val(n) for n in (m.hidden, m.weights, m.ids)] + [_weight_value(w) for w in weights]
    why = routable(MOE, values, _val(out))
    if why is not None:
        log.debug("flashtune: leaving the MoE layer ending at %s: %s", out.format_node(), why)
        return False
    w1, w2, w3 = (_weight_node(graph, out, w) for w in weights)
    args = (m.hidden, m.weights, m.ids, w1, w2, m.activation, w3, site_for(MOE, values, options))
    with graph.inserting_before(out):
        new = graph.call_function(torch.ops.flashtune.moe.default, args)
    new.meta = dict(out.meta)
    out.replace_all_uses_with(new)
    erase_dead(graph, out, m.nodes)
    return True


def _inserted(graph: torch.fx.Graph, fake_mode: Any, kind: str, target: Any, args: tuple, **kwargs: Any) -> Node:
    """A new node at the graph's insertion point, with the fake value Dynamo would have recorded
    for it (computed from its arguments' under ``fake_mode``)."""
    node = graph.create_node(kind, target, args, kwargs)
    fake_args, fake_kwargs = torch.fx.map_arg((args, kwargs), _val)
    with fake_mode:
        if kind == "call_method":
            value = getattr(fake_args[0], target)(*fake_args[1:], **fake_kwargs)
        else:
            value = target(*fake_args, **fake_kwargs)
    node.meta["example_value"] = value
    return node


def _replace_experts(gm: torch.fx.GraphModule, down: Node, ex: GroupedExperts, options: SiteOptions) -> bool:
    """Replace the grouped experts block ending at the down GEMM ``down`` by ``flashtune.moe`` on the
    grouped rows, each row one token with one pick: its expert is the group its row falls in
    (``searchsorted(offs, row, right=True)``; rows past the last offset get expert ``E``, which
    contributes nothing, as no group covers them), its weight 1."""
    graph, rows = gm.graph, ex.rows
    rows_v = _val(rows)
    weights = (ex.w1, ex.w2, ex.w3)
    column = rows_v.new_empty((rows_v.shape[0], 1))
    values = [rows_v, column, column.long()] + [_weight_value(w) for w in weights]
    why = routable(MOE, values, _val(down))
    if why is not None:
        log.debug("flashtune: leaving the grouped experts ending at %s: %s", down.format_node(), why)
        return False
    w1, w2, w3 = (_weight_node(graph, down, w) for w in weights)
    fake = rows_v.fake_mode
    with graph.inserting_before(down):
        size = _inserted(graph, fake, "call_method", "size", (rows, 0))
        pos = _inserted(graph, fake, "call_function", torch.arange, (size,), device=rows_v.device)
        col = _inserted(graph, fake, "call_method", "unsqueeze", (pos, 1))
        ids = _inserted(graph, fake, "call_function", torch.searchsorted, (ex.offs, col), right=True)
        ones = _inserted(graph, fake, "call_function", torch.ones_like, (col,), dtype=rows_v.dtype)
    replaced = down.all_input_nodes
    site = site_for(MOE, values, options)
    replace_with_call(graph, down, torch.ops.flashtune.moe.default, (rows, ones, ids, w1, w2, ex.activation, w3, site))
    for node in replaced:
        erase_dead(graph, node, [])
    return True


def _output_of(out: Node) -> Node:
    """The node whose value the layer hands on: the ``sum``, or a ``.to`` of it to the hidden dtype."""
    users = list(out.users)
    if len(users) == 1 and _method(users[0], "to") and len(users[0].args) == 2 and not users[0].kwargs:
        return users[0]
    return out


def rewrite(gm: torch.fx.GraphModule, ops: frozenset, options: SiteOptions) -> int:
    """Route MoE layers to ``flashtune.moe`` and other grouped GEMMs to ``flashtune.grouped_mm``
    (when "moe" is in ``ops``); returns how many ops were routed."""
    if MOE.family not in ops:
        return 0
    graph, targets, routed = gm.graph, grouped_targets(), 0
    alive = set(graph.nodes)
    for node in list(graph.nodes):
        m = match_layer(node, targets) if node in alive else None
        if m is None:
            continue
        out = _output_of(node)
        if out is not node:
            m.nodes.insert(0, node)
        if _replace_moe(gm, out, m, options):
            routed += 1
            alive = set(graph.nodes)
    alive = set(graph.nodes)
    for node in list(graph.nodes):  # grouped experts blocks whose dispatch or combine was not recognised
        ex = match_experts(node, targets) if node in alive else None
        if ex is not None and _replace_experts(gm, node, ex, options):
            routed += 1
            alive = set(graph.nodes)
    for node in list(graph.nodes):
        call = grouped_call(node, targets)
        if call is None:
            continue
        values = [_val(t) for t in call]
        why = routable(GROUPED_MM, values, _val(node))
        if why is not None:
            log.debug("flashtune: leaving %s: %s", node.format_node(), why)
            continue
        replace_with_call(
            graph, node, torch.ops.flashtune.grouped_mm.default, (*call, site_for(GROUPED_MM, values, options))
        )
        routed += 1
    gm.recompile()
    return routed
