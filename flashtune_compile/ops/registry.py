"""Registered ops: ``register(spec)`` turns an ``OpSpec`` into ``torch.ops.flashtune.<name>``.

Each registered op gets, from its spec alone: its schema; its implementation (run the site's
choice on the tuning inputs); its fake implementation, so Dynamo, AOTAutograd and Inductor treat it
as an ordinary opaque op; and an Autograd-key kernel. That kernel decides per call: when a
gradient is needed, the spec's ``backward`` through an ``autograd.Function`` whose forward
redispatches below autograd (so tracing reaches the fake implementation), or the spec's
differentiable ``reference``; when none is needed, real tensors go straight to the implementation,
and anything else (fake or functional tensors, an active dispatch mode) is redispatched below
autograd. (``torch.library.register_autograd`` would do the same through a generic wrapper that
costs ~20 us per call even under no_grad.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .spec import OpSpec

OPS: dict[str, OpSpec] = {}  # name -> spec, in registration order
DIRECT: dict[Any, Callable[..., Any]] = {}  # overload -> its Autograd-key kernel as a plain callable
NO_GRAD: dict[Any, Callable[..., Any]] = {}  # overload -> the half of that kernel for calls needing no gradient
IMPLS: dict[str, Callable[..., Any]] = {}  # name -> its implementation (below autograd: what Inductor calls)
_lib = torch.library.Library("flashtune", "DEF")

# Argument types that let a call skip the dispatcher: plain tensors and the ops' scalars.
_DIRECT_TYPES = frozenset({torch.Tensor, torch.nn.Parameter, str, float, int, type(None)})
_dispatch_depth = torch._C._len_torch_dispatch_stack
_grad_enabled = torch.is_grad_enabled


def op_name(node: Any) -> str | None:
    """The flashtune op an FX node calls: the op itself, or any of the callables the backend points
    nodes at (``DIRECT``, ``NO_GRAD``, ``IMPLS``, or ``site.run`` with the site first); else None."""
    from .site import SiteSpec, run

    target = getattr(node, "target", None)
    if target is run:
        return SiteSpec.decode(node.args[0]).op
    for name, spec in OPS.items():
        overload = spec.overload
        if target is overload or target is DIRECT[overload] or target is NO_GRAD[overload] or target is IMPLS[name]:
            return name
    return None


def op_families() -> tuple[str, ...]:
    """The values the backend's ``ops`` option takes: the families of the registered ops."""
    return tuple(dict.fromkeys(spec.family for spec in OPS.values()))


def register(spec: OpSpec) -> OpSpec:
    """Define ``torch.ops.flashtune.<spec.name>`` from ``spec`` (once per process); returns ``spec``."""
    from .site import run  # site.py reads OPS: imported here, at registration time

    if spec.name in OPS:
        raise ValueError(f"flashtune op {spec.name!r} is registered already")
    if spec.flatten_rows:

        def impl(*args: Any) -> Any:
            x = args[0]
            if x.dim() == 2:
                return run(args[-1], args[:-1])
            y = run(args[-1], (x.flatten(0, -2), *args[1:-1]))
            return y.view(*x.shape[:-1], y.shape[-1])
    else:

        def impl(*args: Any) -> Any:
            return run(args[-1], args[:-1])

    _lib.define(spec.schema)
    _lib.impl(spec.name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"flashtune::{spec.name}", spec.fake, lib=_lib)
    overload = spec.overload
    kernel = _autograd_kernel(spec, overload, impl)
    _lib.impl(spec.name, kernel, "Autograd")
    DIRECT[overload] = kernel
    IMPLS[spec.name] = impl
    OPS[spec.name] = spec
    return spec


def _with_grad(spec: OpSpec, overload: Any) -> Callable[..., Any]:
    """What a call that needs a gradient runs: see the module docstring."""
    if spec.backward is not None:

        def forward(ctx: Any, *args: Any) -> Any:
            ctx.save_for_backward(*[t for t in args if isinstance(t, torch.Tensor)])
            ctx.scalars = [x for x in args if not isinstance(x, (torch.Tensor, str)) and x is not None]
            with torch._C._AutoDispatchBelowAutograd():
                return overload(*args)

        members = {"forward": staticmethod(forward), "backward": staticmethod(spec.backward)}
        return type(f"flashtune_{spec.name}", (torch.autograd.Function,), members).apply

    def reference(*args: Any) -> Any:
        if _dispatch_depth() != 0 or any(type(a) not in _DIRECT_TYPES for a in args):
            raise NotImplementedError(
                f"flashtune.{spec.name} has no autograd formula under tracing; the flashtune backend routes it only "
                "where no gradient is needed (run the model under torch.no_grad() or inference_mode())"
            )
        return spec.reference(*args[:-1])  # ATen ops, recorded by autograd

    return reference


def _autograd_kernel(spec: OpSpec, overload: Any, impl: Callable[..., Any]) -> Callable[..., Any]:
    with_grad = _with_grad(spec, overload)
    without_grad = _no_grad_kernel(overload, impl)

    def kernel(*args: Any) -> Any:
        if _grad_enabled():
            for t in args:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    return with_grad(*args)
        return without_grad(*args)

    NO_GRAD[overload] = without_grad
    return kernel


def _no_grad_kernel(overload: Any, impl: Callable[..., Any]) -> Callable[..., Any]:
    """A call that needs no gradient: real tensors go straight to the implementation; fake or
    functional tensors, or an active dispatch mode, are redispatched below autograd."""

    def kernel(*args: Any) -> Any:
        if _dispatch_depth() == 0:
            for t in args:
                if type(t) not in _DIRECT_TYPES:
                    break
            else:
                return impl(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args)

    return kernel
