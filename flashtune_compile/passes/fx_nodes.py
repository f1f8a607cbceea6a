"""Small predicates over FX nodes that graph patterns are written with: "is this a call of f",
"what does this node flatten / transpose / unsqueeze", whether a dead node may be erased, whether
an op serves a matched call, and replacing a node by a call of an op."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ..ops.spec import OpSpec

Node = torch.fx.Node


def _val(arg: Any) -> Any:
    """The fake value of a node (Dynamo: meta["example_value"]; FakeTensorProp: meta["val"]); any
    other argument as it is."""
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def attr(gm: torch.fx.GraphModule, target: str) -> Any:
    """The object a ``get_attr`` node's dotted ``target`` names on ``gm`` (None if absent)."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _same_size(x: Any, y: Any) -> bool:
    """Whether two sizes are the same: equal ints, or SymInts of one sympy expression."""
    if isinstance(x, torch.SymInt) or isinstance(y, torch.SymInt):
        return isinstance(x, torch.SymInt) and isinstance(y, torch.SymInt) and x.node.expr == y.node.expr
    return x == y


def routable(op: OpSpec, values: list, out: Any) -> str | None:
    """None if ``op`` serves a call whose tensor arguments have these fake values (None for an
    absent optional one) and whose result is ``out``, else why not. Changes nothing."""
    if any(v is not None and type(v) is not FakeTensor for v in values):
        return "an operand is not a plain tensor"
    return op.serves(values, out.dtype if isinstance(out, torch.Tensor) else None)


def replace_with_call(graph: torch.fx.Graph, node: Node, target: Any, args: tuple) -> Node:
    """Insert ``target(*args)`` before ``node``, hand it ``node``'s users and metadata, erase ``node``."""
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _fn(node: Any, *targets: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _method(node: Any, *names: str) -> bool:
    return isinstance(node, Node) and node.op == "call_method" and node.target in names


def _call(node: Any, name: str, *fns: Any) -> bool:
    """A call of tensor method ``name`` or of one of the functions ``fns``."""
    return _method(node, name) or _fn(node, *fns)


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _getitem(node: Any, index: Any = None) -> Any:
    """(source, index) of ``source[index]``; None if ``node`` is not an indexing."""
    if _fn(node, operator.getitem) and (index is None or node.args[1] == index):
        return node.args[0], node.args[1]
    return None


_CASTS = {"bfloat16": torch.bfloat16, "half": torch.float16, "float": torch.float32, "double": torch.float64}


def _cast_source(node: Any) -> Any:
    """The tensor ``node`` casts to another dtype by ``.to(dtype)``, ``.type_as(t)`` or ``.bfloat16()``
    (whether or not the dtype changes), else None."""
    if _method(node, "to") and len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], torch.dtype):
        return node.args[0]
    if _method(node, "type_as") and len(node.args) == 2 and not node.kwargs:
        return node.args[0]
    if _method(node, *_CASTS) and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    return None


def _strip_to(node: Any) -> Any:
    """Skip casts (``.to(dtype)``, ``.type_as``, ``.bfloat16()``, ...) that do not change the dtype."""
    while (src := _cast_source(node)) is not None:
        if not (isinstance(_val(src), torch.Tensor) and _val(src).dtype == _val(node).dtype):
            break
        node = src
    return node


def _same_value(a: Any, b: Any) -> bool:
    """Whether nodes ``a`` and ``b`` hold the same value: one node up to casts that change nothing, or
    one cast of one tensor written twice (``x.bfloat16()`` in two places)."""
    a, b = _strip_to(a), _strip_to(b)
    if a is b:
        return True
    sa, sb = _cast_source(a), _cast_source(b)
    return (
        sa is not None
        and sa is sb
        and (a.op, a.target, a.args[1:], a.kwargs) == (b.op, b.target, b.args[1:], b.kwargs)
        and _val(a).dtype == _val(b).dtype
    )


def _flat(node: Any) -> Any:
    """The tensor ``node`` flattens with ``reshape(-1)`` / ``view(-1)``, else None."""
    if _call(node, "reshape", torch.reshape) or _method(node, "view"):
        shape = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else node.args[1]
        if list(shape) == [-1]:
            return node.args[0]
    return None


def _is_dims(node: Node, first: int, second: int) -> bool:
    dims = tuple(node.args[1:3])
    rank = _val(node.args[0]).dim()
    return tuple(d % rank for d in dims) in ((first % rank, second % rank), (second % rank, first % rank))


def _transposed_param(node: Any) -> Any:
    """``w`` when ``node`` is ``w.transpose(-2, -1)`` of a 3-D ``w``, else None."""
    if _call(node, "transpose", torch.transpose) and _val(node.args[0]).dim() == 3 and _is_dims(node, -2, -1):
        return node.args[0]
    return None


def _unsqueezed(node: Any, dim: int) -> Any:
    if _call(node, "unsqueeze", torch.unsqueeze) and _arg(node, 1, "dim") in (dim, _val(node).dim() + dim):
        return node.args[0]
    return None


def _squeezed(node: Any, dim: int) -> Any:
    if _call(node, "squeeze", torch.squeeze) and _arg(node, 1, "dim") in (dim, _val(node.args[0]).dim() + dim):
        return node.args[0]
    return None


def _mul_operands(node: Any) -> tuple | None:
    if _fn(node, operator.mul, torch.mul) or _method(node, "mul"):
        if len(node.args) == 2 and not node.kwargs:
            return node.args[0], node.args[1]
    return None


_PURE_OPERATORS = {
    operator.getitem,
    operator.floordiv,
    operator.mul,
    operator.add,
    operator.sub,
    operator.truediv,
    operator.neg,
}


def _pure(node: Node) -> bool:
    """Whether erasing ``node`` when nothing reads it changes nothing: no in-place method or
    function (``x.scatter_(...)``, ``operator.setitem``, ``out=``), no side effect."""
    if "out" in node.kwargs:
        return False
    if node.op == "call_method":
        return not node.target.endswith("_")
    if node.op != "call_function":
        return False
    if node.target in _PURE_OPERATORS:
        return True
    name = getattr(node.target, "__name__", "")
    return getattr(node.target, "__module__", "") != "_operator" and not name.endswith("_") and not node.is_impure()


def erase_dead(graph: torch.fx.Graph, out: Node, matched: list) -> None:
    """Erase what a replaced region computed and nothing reads any more: pure ancestors of ``out``
    left without users, and the in-place ``buffer[index] = value`` nodes among ``matched`` (with the
    buffer they write, once nothing else reads it). Nothing impure is erased."""
    region: set = set()
    stack = [out, *(n for n in matched if _fn(n, operator.setitem))]
    while stack:
        node = stack.pop()
        if node in region or not isinstance(node, Node):
            continue
        region.add(node)
        stack.extend(node.all_input_nodes)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node not in region or node.users or node.op in ("placeholder", "output", "get_attr"):
                continue
            scatter = _fn(node, operator.setitem) and node in matched and all(u is node for u in node.args[0].users)
            if scatter or _pure(node):
                graph.erase_node(node)
                region.discard(node)
                changed = True
