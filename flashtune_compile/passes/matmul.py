"""Rewrite the matmul family in a Dynamo graph into ``torch.ops.flashtune.*`` calls.

Routed: ``F.linear`` (with or without bias, N-D input), ``nn.Linear`` modules (as call_module
nodes when Dynamo does not inline them), ``torch.mm``, ``torch.addmm``, ``torch.bmm``,
``torch.baddbmm``, and ``torch.matmul`` / ``@`` when it is an N-D @ 2-D product (-> mm) or a
3-D @ 3-D product with one batch size (-> bmm); the method forms of each too. A node stays as it
was when any operand is not a plain dense CPU/CUDA tensor of a supported dtype, when operands
disagree on dtype or device, or when it has arguments the op does not take (``out=``).
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

from ..ops.matmul import SUPPORTED_DTYPES
from ..ops.site import SiteSpec
from .symbolic import dynamic_axes, static_signature

log = logging.getLogger("flashtune")

# op -> the ``ops`` option family that enables it
FAMILY = {"linear": "linear", "mm": "mm", "addmm": "mm", "bmm": "bmm", "baddbmm": "bmm"}


@dataclass(frozen=True)
class RouteSettings:
    ops: frozenset
    kernels: tuple[str, ...]
    ladder: Any
    max_tokens: int
    tune: str | None
    routing: str = "zipf"  # synthetic MoE routing for profiling (tuner/routing.py)


@dataclass
class Match:
    op: str
    tensors: list  # the op's tensor arguments (nodes, or None for an absent bias)
    scalars: list  # beta, alpha for addmm/baddbmm


def _val(arg: Any) -> Any:
    """The fake value of a node (Dynamo: meta["example_value"]; FakeTensorProp: meta["val"])."""
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _scalar_ok(*xs: Any) -> bool:
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)


def _binary(op: str) -> Callable[[torch.fx.Node], Match | None]:
    def match(node: torch.fx.Node) -> Match | None:
        if set(node.kwargs) - {"input", "mat2", "other"} or len(node.args) + len(node.kwargs) != 2:
            return None
        return Match(op, [_arg(node, 0, "input"), _arg(node, 1, "mat2", node.kwargs.get("other"))], [])

    return match


def _scaled(op: str) -> Callable[[torch.fx.Node], Match | None]:
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
    return Match("linear", [_arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")], [])


def _matmul(node: torch.fx.Node) -> Match | None:
    m = _binary("mm")(node)
    if m is None:
        return None
    a, b = (_val(t) for t in m.tensors)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None
    if a.dim() >= 2 and b.dim() == 2:
        return m
    if a.dim() == 3 and b.dim() == 3 and _same_size(a.shape[0], b.shape[0]):
        return Match("bmm", m.tensors, [])
    return None


def _same_size(x: Any, y: Any) -> bool:
    if isinstance(x, torch.SymInt) or isinstance(y, torch.SymInt):
        return isinstance(x, torch.SymInt) and isinstance(y, torch.SymInt) and x.node.expr == y.node.expr
    return x == y


FUNCTIONS: dict[Any, Callable[[torch.fx.Node], Match | None]] = {
    F.linear: _linear,
    torch._C._nn.linear: _linear,
    torch.matmul: _matmul,
    operator.matmul: _matmul,
    torch.mm: _binary("mm"),
    torch.bmm: _binary("bmm"),
    torch.addmm: _scaled("addmm"),
    torch.baddbmm: _scaled("baddbmm"),
}
METHODS: dict[str, Callable[[torch.fx.Node], Match | None]] = {
    "matmul": _matmul,
    "__matmul__": _matmul,
    "mm": _binary("mm"),
    "bmm": _binary("bmm"),
    "addmm": _scaled("addmm"),
    "baddbmm": _scaled("baddbmm"),
}
_SHAPE_CHECK = {"mm": (None, 2), "addmm": (None, 2, 2), "bmm": (3, 3), "baddbmm": (None, 3, 3)}


def _match(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Match | None:
    if node.op == "call_function":
        fn = FUNCTIONS.get(node.target) if _hashable(node.target) else None
        return fn(node) if fn else None
    if node.op == "call_method":
        fn = METHODS.get(node.target)
        return fn(node) if fn else None
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        mod = gm.get_submodule(node.target)
        if type(mod) is torch.nn.Linear:
            graph = gm.graph
            with graph.inserting_before(node):
                w = graph.get_attr(f"{node.target}.weight")
                b = graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            for attr, param in ((w, mod.weight), (b, mod.bias)):
                if attr is not None:
                    attr.meta["val"] = _fake_like(node.args[0], param)
            return Match("linear", [node.args[0], w, b], [])
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


def _eligible(m: Match) -> str | None:
    """None if every operand is one the tunable op serves, else why not."""
    vals = [_val(t) for t in m.tensors]
    present = [v for v in vals if v is not None]
    if any(type(v) is not FakeTensor for v in present):
        return "an operand is not a plain tensor"
    if vals[0] is None and m.op != "linear":
        return "missing operand"
    if len({v.dtype for v in present}) != 1 or present[0].dtype not in SUPPORTED_DTYPES:
        return f"dtype {sorted({str(v.dtype) for v in present})} not served"
    if len({v.device for v in present}) != 1 or present[0].device.type not in ("cpu", "cuda"):
        return f"device {sorted({str(v.device) for v in present})} not served"
    if any(v.layout != torch.strided for v in present):
        return "non-strided layout"
    dims = _SHAPE_CHECK.get(m.op)
    if dims and any(want is not None and v.dim() != want for v, want in zip(vals, dims)):
        return "operand rank"
    if m.op == "linear" and (vals[1].dim() != 2 or vals[0].dim() < 2 or (vals[2] is not None and vals[2].dim() != 1)):
        return "operand rank"
    if m.op == "mm" and vals[0].dim() < 2:
        return "operand rank"
    return None


def _tuning_shapes(op: str, vals: list) -> list:
    """Shapes of the op's tuning inputs (N-D activations flattened to 2-D, as the op does)."""
    shapes = [tuple(v.shape) if v is not None else None for v in vals]
    if op in ("linear", "mm") and len(shapes[0]) != 2:
        lead = 1
        for s in shapes[0][:-1]:
            lead = lead * s
        shapes[0] = (lead, shapes[0][-1])
    return shapes


def site_for(m: Match, settings: RouteSettings) -> str:
    vals = [_val(t) for t in m.tensors]
    shapes = _tuning_shapes(m.op, vals)
    axes = dynamic_axes(shapes, settings.max_tokens)
    sig = static_signature(shapes, [v.dtype if v is not None else None for v in vals])
    ladder = settings.ladder if isinstance(settings.ladder, str) else list(settings.ladder)
    return SiteSpec(m.op, axes, sig, ladder, settings.tune, settings.kernels).encode()


def rewrite_matmuls(gm: torch.fx.GraphModule, settings: RouteSettings) -> int:
    """Replace every eligible matmul-family node by its flashtune op; returns how many."""
    routed = 0
    graph = gm.graph
    for node in list(graph.nodes):
        m = _match(gm, node)
        if m is None or FAMILY[m.op] not in settings.ops:
            continue
        why = _eligible(m)
        if why is not None:
            log.debug("flashtune: leaving %s (%s): %s", node.format_node(), m.op, why)
            continue
        target = getattr(torch.ops.flashtune, m.op).default
        with graph.inserting_before(node):
            new = graph.call_function(target, (*m.tensors, *map(float, m.scalars), site_for(m, settings)))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        routed += 1
    gm.recompile()  # no eliminate_dead_code(): it drops in-place methods whose result is unused
    return routed
