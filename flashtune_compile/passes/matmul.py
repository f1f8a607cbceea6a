"""Rewrite the matmul family in a Dynamo graph into ``torch.ops.flashtune.*`` calls.

Routed: ``F.linear`` (with or without bias, N-D input), ``nn.Linear`` modules (as call_module
nodes when Dynamo does not inline them), ``torch.mm``, ``torch.addmm``, ``torch.bmm``,
``torch.baddbmm``, and ``torch.matmul`` / ``@`` when it is an N-D @ 2-D product (-> mm) or a
3-D @ 3-D product with one batch size (-> bmm); the method forms of each too. A node stays as it
was when its op does not serve the operands (``OpSpec.serves``: dtype, device, layout, rank), when
an operand is not a plain tensor, or when it has arguments the op does not take (``out=``).
Matching changes nothing: the graph is edited only for a node that is routed. An N-D input of an
op that takes rows (linear, mm) is flattened to 2-D by a graph node and the result viewed back, so
the compiled graph's views cost nothing at run time (``_call_on_rows``).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from ..ops.matmul import ADDMM, BADDBMM, BMM, LINEAR, MM, PACKED_LINEAR
from ..ops.site import SiteOptions
from ..ops.spec import OpSpec
from .fx_nodes import _arg, _call, _fn, _same_size, _val, replace_with_call, routable
from .symbolic import site_for

log = logging.getLogger("flashtune")


@dataclass(frozen=True)
class _Param:
    """A parameter of a call_module node's module: it becomes a get_attr node only if the node
    is routed."""

    target: str
    value: Any  # its fake value


@dataclass
class Match:
    op: OpSpec
    tensors: list  # the op's tensor arguments: nodes, _Params, or None for an absent bias
    scalars: list  # beta, alpha for addmm/baddbmm


def _value(t: Any) -> Any:
    return t.value if isinstance(t, _Param) else _val(t)


def _scalar_ok(*xs: Any) -> bool:
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)


def _binary(op: OpSpec) -> Callable[[torch.fx.Node], Match | None]:
    def match(node: torch.fx.Node) -> Match | None:
        if set(node.kwargs) - {"input", "mat2", "other"} or len(node.args) + len(node.kwargs) != 2:
            return None
        return Match(op, [_arg(node, 0, "input"), _arg(node, 1, "mat2", node.kwargs.get("other"))], [])

    return match


def _scaled(op: OpSpec) -> Callable[[torch.fx.Node], Match | None]:
    def match(node: torch.fx.Node) -> Match | None:
        if set(node.kwargs) - {"input", "mat1", "mat2", "batch1", "batch2", "beta", "alpha"}:
            return None
        bias, a, b = (
            _arg(node, 0, "input"),
            _arg(node, 1, "mat1", node.kwargs.get("batch1")),
            _arg(node, 2, "mat2", node.kwargs.get("batch2")),
        )
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        return Match(op, [bias, a, b], [beta, alpha]) if _scalar_ok(beta, alpha) else None

    return match


def _linear(node: torch.fx.Node) -> Match | None:
    if set(node.kwargs) - {"input", "weight", "bias"}:
        return None
    return Match(LINEAR, [_arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")], [])


# ``w.T`` as Dynamo 2.14 records it (earlier versions: ``getattr(w, "T")``)
_NUMPY_T = tuple(op for op in (getattr(torch.ops.aten, "numpy_T", None),) if op is not None)
_NUMPY_T += tuple(op.default for op in _NUMPY_T)


def _swapped_2d(node: Any) -> Any:
    """``w`` when ``node`` is a 2-D ``w`` with its two dims swapped (``w.t()``, ``w.T``,
    ``w.transpose(0, 1)``, ``w.permute(1, 0)``, any dim spelling), else None."""
    if not isinstance(node, torch.fx.Node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    src = node.args[0]
    if not isinstance(_val(src), torch.Tensor) or _val(src).dim() != 2:
        return None
    rest = [*node.args[1:], *node.kwargs.values()]
    if _call(node, "t", torch.t):
        return src if not rest else None
    if _fn(node, getattr) and rest == ["T"] or _fn(node, *_NUMPY_T) and not rest:
        return src
    if _call(node, "transpose", torch.transpose):
        return src if len(rest) == 2 and {d % 2 for d in rest if isinstance(d, int)} == {0, 1} else None
    if _call(node, "permute", torch.permute):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return src if [d % 2 for d in dims if isinstance(d, int)] == [1, 0] and len(dims) == 2 else None
    return None


def _as_linear(m: Match) -> Match:
    """``a @ w.T`` (an N-D @ 2-D product whose right side is a transposed 2-D tensor) as
    ``linear(a, w)``: the linear op's weight tactics (packed, re-laid-out copies) then apply."""
    w = _swapped_2d(m.tensors[1])
    return Match(LINEAR, [m.tensors[0], w, None], []) if w is not None else m


def _mm(node: torch.fx.Node) -> Match | None:
    m = _binary(MM)(node)
    return _as_linear(m) if m is not None else None


def _matmul(node: torch.fx.Node) -> Match | None:
    m = _binary(MM)(node)
    if m is None:
        return None
    a, b = (_val(t) for t in m.tensors)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None
    if a.dim() >= 2 and b.dim() == 2:
        return _as_linear(m)
    if a.dim() == 3 and b.dim() == 3 and _same_size(a.shape[0], b.shape[0]):
        return Match(BMM, m.tensors, [])
    return None


FUNCTIONS: dict[Any, Callable[[torch.fx.Node], Match | None]] = {
    F.linear: _linear,
    torch._C._nn.linear: _linear,
    torch.matmul: _matmul,
    operator.matmul: _matmul,
    torch.mm: _mm,
    torch.bmm: _binary(BMM),
    torch.addmm: _scaled(ADDMM),
    torch.baddbmm: _scaled(BADDBMM),
}
METHODS: dict[str, Callable[[torch.fx.Node], Match | None]] = {
    "matmul": _matmul,
    "__matmul__": _matmul,
    "mm": _mm,
    "bmm": _binary(BMM),
    "addmm": _scaled(ADDMM),
    "baddbmm": _scaled(BADDBMM),
}


def _match(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | None:
    """The routable call ``node`` is, if any. Reads the graph only."""
    if node.op == "call_function":
        fn = FUNCTIONS.get(node.target) if _hashable(node.target) else None
        return fn(node) if fn else None
    if node.op == "call_method":
        fn = METHODS.get(node.target)
        return fn(node) if fn else None
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        mod = gm.get_submodule(node.target)
        if type(mod) is torch.nn.Linear:
            w = _Param(f"{node.target}.weight", _fake_like(node.args[0], mod.weight))
            b = _Param(f"{node.target}.bias", _fake_like(node.args[0], mod.bias)) if mod.bias is not None else None
            return Match(LINEAR, [node.args[0], w, b], [])
    return None


def _hashable(x: Any) -> bool:
    try:
        hash(x)
        return True
    except TypeError:
        return False


def _fake_like(anchor: Any, param: torch.Tensor) -> Any:
    fake = _val(anchor)
    return fake.fake_mode.from_tensor(param) if isinstance(fake, FakeTensor) else None


def _node(graph: torch.fx.Graph, before: torch.fx.Node, t: Any) -> Any:
    """A matched tensor argument as a graph node: a _Param becomes a get_attr node."""
    if not isinstance(t, _Param):
        return t
    with graph.inserting_before(before):
        attr = graph.get_attr(t.target)
    attr.meta["val"] = t.value
    return attr


def _call_on_rows(
    graph: torch.fx.Graph, node: torch.fx.Node, op: OpSpec, args: tuple, values: list, options: SiteOptions
) -> None:
    """Replace ``node`` (x = args[0], N-D) by ``op`` on x flattened to 2-D rows, its result viewed back to
    x's leading dims. Same values as the op flattening inside; as graph nodes the two views cost
    nothing under Inductor (it emits them as ``reinterpret_tensor``), instead of two dispatcher
    calls per run (about 1.5 us per op, ``bench_backend_overhead.py --input-dims 3``)."""
    x, xv, out = args[0], values[0], _val(node)
    keys = [k for k in ("example_value", "val") if k in node.meta]  # where this graph keeps fake values

    def made(new: torch.fx.Node, fake: Any) -> torch.fx.Node:
        new.meta.update({k: v for k, v in node.meta.items() if k not in keys})  # stack trace, module stack
        new.meta.update(dict.fromkeys(keys, fake))
        return new

    with graph.inserting_before(node):
        rows = made(graph.call_method("flatten", (x, 0, -2)), xv.flatten(0, -2))
        lead = [
            made(graph.call_method("size", (x, d)), size) if isinstance(size, torch.SymInt) else int(size)
            for d, size in enumerate(xv.shape[:-1])
        ]
        site = site_for(op, [_val(rows), *values[1:]], options)
        flat = made(graph.call_function(op.overload, (rows, *args[1:], site)), out.flatten(0, -2))
        last = out.shape[-1]
        if isinstance(last, torch.SymInt):  # a dynamic output width: read it off the 2-D result
            last = made(graph.call_method("size", (flat, 1)), last)
        view = graph.call_method("view", (flat, *lead, last))
    view.meta = dict(node.meta)
    node.replace_all_uses_with(view)
    graph.erase_node(node)


def _resite_packed(node: torch.fx.Node, options: SiteOptions) -> bool:
    """Give a ``packed_linear`` call (a frozen linear's, ``freeze.py``) the site this compile's
    options and the graph's symbolic sizes make, in place of its eager-mode one. True if it was one."""
    packet = torch.ops.flashtune.packed_linear
    if node.op != "call_function" or node.target not in (packet, PACKED_LINEAR.overload) or node.kwargs:
        return False
    x, packed, bias, n, pairs, _ = node.args
    node.target = PACKED_LINEAR.overload
    node.args = (x, packed, bias, n, pairs, site_for(PACKED_LINEAR, [_val(x), _val(packed), _val(bias)], options))
    return True


def _autocast_dtype(op: OpSpec, values: list, out: Any) -> torch.dtype | None:
    """The dtype autocast computes this call in, when it is one: the result is floating and of
    another dtype than its floating operands (ATen's matmul family keeps its operands' dtype, so
    only ``torch.autocast`` makes them differ, or mixes them). Routed, such a call casts its operands to it first,
    as autocast does; their gradients flow back through the casts in the operands' own dtypes."""
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return None
    dtypes = {v.dtype for v, (kind, _, _) in zip(values, op.operands) if v is not None and kind == "op"}
    if not dtypes or dtypes == {out.dtype} or not all(d.is_floating_point for d in dtypes):
        return None
    return out.dtype


def _cast_value(v: Any, dtype: torch.dtype | None) -> Any:
    if not isinstance(v, FakeTensor) or dtype is None or v.dtype == dtype:
        return v
    with v.fake_mode:
        return v.to(dtype)


def _cast_node(graph: torch.fx.Graph, before: torch.fx.Node, arg: Any, dtype: torch.dtype | None) -> Any:
    """``arg.to(dtype)`` as a node before ``before`` where ``arg`` has another floating dtype."""
    value = _val(arg)
    if dtype is None or not isinstance(value, FakeTensor) or value.dtype == dtype:
        return arg
    with graph.inserting_before(before):
        new = graph.call_method("to", (arg, dtype))
    fake = _cast_value(value, dtype)
    new.meta.update({k: fake for k in ("example_value", "val") if k in arg.meta} or {"val": fake})
    return new


def rewrite(gm: torch.fx.GraphModule, ops: frozenset, options: SiteOptions) -> int:
    """Replace every eligible matmul-family node whose family is in ``ops`` by its flashtune op, and
    give frozen linears' calls this compile's site; returns how many."""
    routed = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if _resite_packed(node, options):
            routed += 1
            continue
        m = _match(gm, node)
        if m is None or m.op.family not in ops:
            continue
        values = [_value(t) for t in m.tensors]
        cast = _autocast_dtype(m.op, values, _val(node))
        if cast is not None:
            values = [_cast_value(v, cast) for v in values]
        why = routable(m.op, values, _val(node))
        if why is not None:
            log.debug("flashtune: leaving %s (%s): %s", node.format_node(), m.op.name, why)
            continue
        args = (*[_cast_node(graph, node, _node(graph, node, t), cast) for t in m.tensors], *map(float, m.scalars))
        if m.op.flatten_rows and values[0].dim() > 2 and isinstance(_val(node), torch.Tensor):
            _call_on_rows(graph, node, m.op, args, values, options)
        else:
            replace_with_call(graph, node, m.op.overload, (*args, site_for(m.op, values, options)))
        routed += 1
    gm.recompile()  # no eliminate_dead_code(): it drops in-place methods whose result is unused
    return routed
