"""Training graphs keep a routed matmul only where tuning finds it faster than ATen.

In a graph compiled for training (grad mode, parameters that require a gradient), a routed op
whose tuned winner is ATen's own default gains nothing and costs what an opaque op costs there:
Inductor cannot fuse around it, and each call pays the op's dispatch. So, once the matmul pass has
routed a training graph, ``settle`` tunes each routed matmul call whose shapes are static right
away (cache first: a cached winner costs nothing), on random activations and the graph's own
weights, with the weights' copies timed made again per call (``TuningConfig.weights_change``). A
call whose winner is the default is handed back to its ATen namesake (``F.linear``, ``torch.mm``,
``torch.addmm``, ``torch.bmm``, ``torch.baddbmm``), so that part of the graph is exactly what
Inductor compiles without flashtune. A call with a symbolic size (``dynamic=True``) stays routed:
its buckets are tuned as they come, and its backward runs ATen's formulas either way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..ops.matmul import ADDMM, BADDBMM, BMM, LINEAR, MM
from ..ops.site import site_of
from ..tuner.runner import DEFAULT_TACTIC
from .fx_nodes import _val, attr

log = logging.getLogger("flashtune")

# op -> (its ATen namesake, the names its trailing scalar arguments take there)
ATEN = {
    LINEAR.overload: (F.linear, ()),
    MM.overload: (torch.mm, ()),
    BMM.overload: (torch.bmm, ()),
    ADDMM.overload: (torch.addmm, ("beta", "alpha")),
    BADDBMM.overload: (torch.baddbmm, ("beta", "alpha")),
}


def _static(value: Any) -> bool:
    return not isinstance(value, torch.Tensor) or all(isinstance(s, int) for s in value.shape)


def _like(fake: torch.Tensor) -> torch.Tensor:
    """A real tensor of ``fake``'s shape and dtype (and strides, where they do not overlap), with
    values of about unit size."""
    expanded = any(st == 0 and size > 1 for size, st in zip(fake.shape, fake.stride()))  # overlapping
    stride = fake.stride() if not expanded else torch.empty(fake.shape, device="meta").stride()
    out = torch.empty_strided(fake.shape, stride, dtype=fake.dtype, device=fake.device)
    return out.normal_() if out.is_floating_point() else out.zero_()


def settle(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> int:
    """Tune this training graph's routed matmul calls of static shapes and hand each whose winner is
    ATen's default back to its ATen namesake; how many were handed back. Weights (parameters, as
    graph inputs or attributes) are tuned as themselves, so tactics reading their copies are
    offered; activations are random."""
    real: dict[torch.fx.Node, Any] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    real.update(zip(placeholders, example_inputs))
    handed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in ATEN:
            continue
        *args, site = node.args
        if not all(_static(_val(a)) for a in args):
            continue
        tuned = site_of(site)
        try:
            inputs = [_input(gm, a, real) for a in args]
            with torch.no_grad():
                runner, tactic = tuned.choose(inputs)
        except Exception as e:  # the call stays routed: its bucket is tuned on its first run instead
            log.warning("flashtune: tuning %s while compiling failed (%s: %s)", node.format_node(), type(e).__name__, e)
            continue
        if runner is not tuned.runners[0] or tactic != DEFAULT_TACTIC:
            continue
        fn, scalar_names = ATEN[node.target]
        tensors = args[: len(args) - len(scalar_names)]
        node.target, node.args = fn, tuple(tensors)
        node.kwargs = dict(zip(scalar_names, args[len(tensors) :]))
        handed += 1
    if handed:
        gm.recompile()
    return handed


def _input(gm: torch.fx.GraphModule, arg: Any, real: dict) -> Any:
    """A tuning input for ``arg``: the graph's own weight where ``arg`` is one (a parameter input
    or attribute), else a random tensor like its fake value (non-tensors as they are)."""
    if not isinstance(arg, torch.fx.Node):
        return arg
    value = real.get(arg)
    if value is None and arg.op == "get_attr":
        value = attr(gm, arg.target)
    if isinstance(value, torch.nn.Parameter):
        return value
    fake = _val(arg)
    return _like(fake) if isinstance(fake, torch.Tensor) else fake
