"""Which dims of a node are dynamic, and the bounds Dynamo's ShapeEnv gives them.

A dim whose size is a SymInt with a non-constant sympy expression is dynamic; dims with the same
expression (every linear of a transformer sees the same token count ``s0``, or ``s0*s1`` once
flattened) form one axis. The axis' value range (``ShapeEnv.bound_sympy``, e.g. from
``mark_dynamic(min=, max=)``) bounds its bucket ladder. ``site_for`` makes a routed call's site
string from them. Nothing here adds a guard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sympy
import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..ops.site import SiteOptions, site_string
from ..ops.spec import OpSpec

Shape = Sequence[Any]  # ints and SymInts


def _expr(size: Any) -> sympy.Expr | None:
    """The sympy expression of a dynamic size, None for a static one."""
    if isinstance(size, torch.SymInt) and not is_concrete_int(size):
        return size.node.expr
    return None


def _bounds(size: torch.SymInt, max_tokens: int) -> tuple[int, int]:
    """(min, max) for the ladder: the symbol's value range, with max_tokens for an unbounded top."""
    node = size.node
    vr = node.shape_env.bound_sympy(node.expr)
    lo = max(1, int(vr.lower)) if isinstance(vr.lower, sympy.Integer) else 1  # not int_oo
    hi = min(int(vr.upper), max_tokens) if isinstance(vr.upper, sympy.Integer) else max_tokens
    return lo, max(lo, hi)


def dynamic_axes(shapes: Sequence[Shape | None], max_tokens: int) -> tuple:
    """Axes of the tuning inputs with these (fake) shapes: ``((positions, min, max), ...)`` where
    positions are the (input, dim) pairs sharing one sympy expression."""
    groups: dict[sympy.Expr, tuple[list, Any]] = {}
    for i, shape in enumerate(shapes):
        for d, size in enumerate(shape or ()):
            expr = _expr(size)
            if expr is not None:
                groups.setdefault(expr, ([], size))[0].append((i, d))
    return tuple((tuple(pos), *_bounds(size, max_tokens)) for pos, size in groups.values())


def site_for(op: OpSpec, values: Sequence[Any], options: SiteOptions) -> str:
    """The ``site`` argument of a routed call of ``op`` whose tensor arguments have these fake
    values (None for an absent optional one): its dynamic axes come from their SymInts."""
    shapes: list = [None] * op.num_inputs
    dtypes: list = [None] * len(shapes)
    for i, v in zip(op.tensor_args, values):
        if v is not None:
            shapes[i], dtypes[i] = tuple(v.shape), v.dtype
    shapes = op.tuning_shapes(shapes)
    return site_string(op, dynamic_axes(shapes, options.max_tokens), shapes, dtypes, options)
