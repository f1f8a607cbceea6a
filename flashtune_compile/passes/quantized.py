"""Rewrite linears over quantized weights into ``torch.ops.flashtune.linear_wq``.

Recognised, as Dynamo records them (``F.linear`` / ``torch._C._nn.linear``, N-D inputs included):

- torchao's weight tensors, read through their inner tensors (``getattr`` nodes, which AOTAutograd
  and the eager runtime both resolve on the subclass), without importing torchao:
  ``Int8Tensor`` (``Int8WeightOnlyConfig``: int8, one scale per row or per group, symmetric) and
  ``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig``: int1..int8 values one per byte, scales
  and zero points per group). ``Int8Tensor`` with per-row int8 dynamic activation
  (``Int8DynamicActivationInt8WeightConfig``) too: its activation quantization stays in the graph
  as ATen ops (``_fake_quantize_rows``) and the product is ``linear_wq``.
- The plain PyTorch spelling of a dequantized weight: an int8 tensor cast to a float dtype, less
  an optional zero point, times a scale, per row (``q.to(dt) * s`` with ``s [N, 1]``) or per group
  (``(q.view(N, G, gs).to(dt) * s3).reshape(N, K)`` with ``s3 [N, G, 1]``). The dequantizing
  nodes are erased once nothing else reads them.

Anything else (other torchao layouts, per-tensor scales, scales per input column, activation
quantization of another kind) is left as it is. Matching changes nothing: the graph is edited only
for a node that is routed.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..ops.quantized import LINEAR_WQ
from ..ops.site import SiteOptions
from .fx_nodes import (
    _arg,
    _call,
    _cast_source,
    _fn,
    _method,
    _mul_operands,
    _val,
    erase_dead,
    replace_with_call,
    routable,
)
from .matmul import _call_on_rows
from .symbolic import site_for

log = logging.getLogger("flashtune")

_LINEARS = (F.linear, torch._C._nn.linear)


@dataclass
class QuantMatch:
    """A linear over a quantized weight: the op's tensor arguments as ``(node or (source node,
    attribute, fake value) or None)``, its ints, and how to rewrite the input first."""

    x: Any
    qweight: Any
    scales: Any
    zeros: Any
    bias: Any
    group_size: int
    bits: int
    act_rows: bool = False  # quantize x per row to int8 first (torchao's dynamic activation)
    dead: Any = None  # the dequantized weight's node, erased when nothing reads it any more


def _torchao(value: Any, name: str) -> bool:
    return type(value).__name__ == name and type(value).__module__.startswith("torchao")


def _groups(n: int, k: int, block: Any, scale: Any) -> int | None:
    """The group size of a torchao block_size ``(1, gs)`` whose scales are ``[N, ceil(K / gs)]``."""
    if block is None or len(block) != 2 or int(block[0]) != 1 or scale is None or scale.dim() != 2:
        return None
    gs = int(block[1])
    return gs if gs >= 1 and tuple(scale.shape) == (n, max(1, -(-k // gs))) else None


def _row_symmetric_int8(kwargs: Any) -> bool:
    """Whether torchao's activation quantization arguments say int8, per row, symmetric."""
    granularity = getattr(kwargs, "granularity", None)
    mapping = getattr(getattr(kwargs, "mapping_type", None), "name", None)
    per_row = type(granularity).__name__ == "PerRow"
    return per_row and mapping == "SYMMETRIC" and not getattr(kwargs, "reduce_range", False)


def _from_torchao(x: Any, w: Any, bias: Any) -> QuantMatch | None:
    value = _val(w)
    if _torchao(value, "Int8Tensor"):
        q, s = value.qdata, value.scale
        gs = _groups(q.shape[0], q.shape[1], getattr(value, "block_size", None), s)
        act = getattr(value, "act_quant_kwargs", None)
        if gs is None or (act is not None and not _row_symmetric_int8(act)):
            return None
        if any(getattr(value, a, None) is not None for a in ("act_pre_scale", "act_quant_scale")):
            return None  # activation pre-scaling or static activation scales: not this spelling
        # torchao's per-row weight-only product ignores the (symmetric, zero) zero points; its
        # per-group one dequantizes with them
        z = getattr(value, "zero_point", None) if gs < q.shape[1] and act is None else None
        zeros = (w, "zero_point", z) if z is not None else None
        return QuantMatch(x, (w, "qdata", q), (w, "scale", s), zeros, bias, gs, 8, act_rows=act is not None)
    if _torchao(value, "IntxUnpackedToInt8Tensor"):
        q, s, z = value.qdata, value.scale, value.zero_point
        gs = _groups(q.shape[0], q.shape[1], getattr(value, "block_size", None), s)
        target = getattr(value, "target_dtype", None)
        bits = {getattr(torch, f"int{b}", None): b for b in range(1, 9)}.get(target)
        if gs is None or bits is None or getattr(value, "activation_quantization", None) is not None:
            return None
        if z is not None and tuple(z.shape) != tuple(s.shape):
            return None
        zeros = (w, "zero_point", z) if z is not None else None
        return QuantMatch(x, (w, "qdata", q), (w, "scale", s), zeros, bias, gs, 4 if bits <= 4 else 8)
    return None


def _int8_cast(node: Any) -> Any:
    """The int8 tensor ``node`` casts to a floating dtype, else None."""
    src = _cast_source(node)
    value, out = _val(src), _val(node)
    if isinstance(value, torch.Tensor) and value.dtype == torch.int8 and out.is_floating_point():
        return src
    return None


def _sub_operands(node: Any) -> tuple | None:
    if (_fn(node, operator.sub, torch.sub) or _method(node, "sub")) and len(node.args) == 2 and not node.kwargs:
        return node.args[0], node.args[1]
    return None


def _dequantized(node: Any, shape: tuple) -> tuple | None:
    """``(q, scales, zeros)`` when ``node`` is ``(int8 q cast) [- z] * s`` (either order) with ``q``,
    ``s`` and ``z`` nodes; ``s`` (and ``z``) broadcast over the last dim only: shaped ``shape``."""
    pair = _mul_operands(node)
    if pair is None:
        return None
    for a, s in (pair, pair[::-1]):
        sv = _val(s)
        if not (isinstance(sv, torch.Tensor) and sv.is_floating_point() and tuple(sv.shape) == shape):
            continue
        zeros, body = None, a
        sub = _sub_operands(a)
        if sub is not None and isinstance(_val(sub[1]), torch.Tensor) and tuple(_val(sub[1]).shape) == shape:
            body, zeros = sub
        q = _int8_cast(body)
        if q is not None and isinstance(s, torch.fx.Node) and (zeros is None or isinstance(zeros, torch.fx.Node)):
            return q, s, zeros
    return None


def _viewed(node: Any) -> tuple | None:
    """``(source, shape args)`` of ``source.view(...)`` / ``.reshape(...)``, else None."""
    if (_call(node, "reshape", torch.reshape) or _method(node, "view")) and len(node.args) >= 2 and not node.kwargs:
        return node.args[0], node.args[1:]
    return None


def _from_plain(x: Any, w: Any, bias: Any) -> QuantMatch | None:
    wv = _val(w)
    if not isinstance(wv, torch.Tensor) or wv.dim() != 2:
        return None
    n, k = wv.shape
    found = _dequantized(w, (n, 1))
    if found is not None and _val(found[0]).shape == wv.shape:
        q, s, z = found
        return QuantMatch(x, q, s, z, bias, int(k), 8, dead=w)
    viewed = _viewed(w)  # per group: [N, G, gs] products viewed back to [N, K]
    if viewed is None or not isinstance(_val(viewed[0]), torch.Tensor) or _val(viewed[0]).dim() != 3:
        return None
    n3, groups, gs = _val(viewed[0]).shape
    found = _dequantized(viewed[0], (n, groups, 1))
    if found is None or n3 != n or groups * gs != k:
        return None
    q3, s3, z3 = found
    source = _viewed(q3)  # q.view(N, G, gs): the 2-D q itself
    q = source[0] if source is not None and tuple(_val(source[0]).shape) == (n, k) else (q3, "flatten", None)
    zeros = (z3, "flatten", None) if z3 is not None else None
    return QuantMatch(x, q, (s3, "flatten", None), zeros, bias, int(gs), 8, dead=w)


def _match(node: torch.fx.Node) -> QuantMatch | None:
    if node.op != "call_function" or node.target not in _LINEARS or set(node.kwargs) - {"input", "weight", "bias"}:
        return None
    x, w, bias = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    if not isinstance(w, torch.fx.Node):
        return None
    return _from_torchao(x, w, bias) or _from_plain(x, w, bias)


def _fake(arg: Any) -> Any:
    if not isinstance(arg, tuple):
        return _val(arg)
    source, attr, value = arg
    return value if attr != "flatten" else _val(source).flatten(1)


def _emit(graph: torch.fx.Graph, before: torch.fx.Node, arg: Any) -> Any:
    """A matched argument as a node: ``getattr(source, attr)`` or ``source.flatten(1)`` for a tuple."""
    if not isinstance(arg, tuple):
        return arg
    source, attr, _ = arg
    with graph.inserting_before(before):
        if attr == "flatten":
            new = graph.call_method("flatten", (source, 1))
        else:
            new = graph.call_function(getattr, (source, attr))
    new.meta["example_value"] = _fake(arg)
    return new


def _fake_quantize_rows(graph: torch.fx.Graph, before: torch.fx.Node, x: torch.fx.Node) -> torch.fx.Node:
    """A node computing ``quantize_rows(x)`` before ``before``."""
    with graph.inserting_before(before):
        node = graph.call_function(quantize_rows, (x,))
    node.meta["example_value"] = _val(x).new_empty(_val(x).shape)
    return node


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as torchao's per-row symmetric int8 dynamic activation sees it: scale = max |x| / 127.5
    per row (in x's dtype, at least fp32's eps), ``round(x / scale)`` clamped to -128..127, times the
    scale again, rounded to x's dtype."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps).float()
    return (torch.round(x.float() / scale).clamp(-128, 127) * scale).to(x.dtype)


def rewrite(gm: torch.fx.GraphModule, ops: frozenset, options: SiteOptions) -> int:
    """Replace every recognised linear over a quantized weight by ``linear_wq`` when the
    ``quantized`` family is in ``ops``; returns how many."""
    if LINEAR_WQ.family not in ops:
        return 0
    routed = 0
    graph = gm.graph
    for node in list(graph.nodes):
        m = _match(node)
        if m is None:
            continue
        tensors = (m.x, m.qweight, m.scales, m.zeros, m.bias)
        values = [_fake(t) if t is not None else None for t in tensors]
        why = routable(LINEAR_WQ, values, _val(node))
        if why is None:
            try:
                LINEAR_WQ.check(*values, m.group_size, m.bits)
            except ValueError as e:
                why = str(e)
        if why is not None:
            log.debug("flashtune: leaving %s (linear_wq): %s", node.format_node(), why)
            continue
        args = [_emit(graph, node, t) for t in tensors]
        if m.act_rows:
            args[0] = _fake_quantize_rows(graph, node, args[0])
        args = (*args, m.group_size, m.bits)
        if values[0].dim() > 2:
            _call_on_rows(graph, node, LINEAR_WQ, args, values, options)
        else:
            replace_with_call(graph, node, LINEAR_WQ.overload, (*args, site_for(LINEAR_WQ, values, options)))
        if m.dead is not None and not m.dead.users:
            erase_dead(graph, m.dead, [])
        routed += 1
    gm.recompile()
    return routed
