"""The tunable matmul family: ``torch.ops.flashtune.{linear, mm, addmm, bmm, baddbmm}``.

Each op takes the usual tensors plus ``site`` (see ``ops/site.py``). ``linear`` and ``mm`` accept N-D
activations (``[..., K]``) and flatten them to 2-D the way ``F.linear`` does.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..kernels.aten import AtenAddmmRunner, AtenBaddbmmRunner, AtenBmmRunner, AtenLinearRunner, AtenMMRunner
from ..kernels.cpu import CpuLinearRunner
from ..kernels.cuda.runner import CudaSkinnyLinearRunner
from ..kernels.triton_runner import TritonGemmRunner
from ..tuner.runner import TunableRunner
from .site import CANDIDATES, KERNEL_FAMILIES, SiteSpec, runners_for  # noqa: F401  (re-exported)
from .site import run as _run

MATMUL_OPS = ("linear", "mm", "addmm", "bmm", "baddbmm")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _candidates(op: str, kernels: frozenset) -> tuple[TunableRunner, ...]:
    """ATen's runner first (the default; its variants only with "aten"), then each allowed family.
    A runner that does not apply to a call's device or dtype offers no tactics and costs nothing."""
    aten = {
        "linear": AtenLinearRunner,
        "mm": AtenMMRunner,
        "addmm": AtenAddmmRunner,
        "bmm": AtenBmmRunner,
        "baddbmm": AtenBaddbmmRunner,
    }[op](variants="aten" in kernels)
    out: list[TunableRunner] = [aten]
    if "triton" in kernels:
        out.append(TritonGemmRunner(op))
    if op == "linear" and "cuda" in kernels:
        out.append(CudaSkinnyLinearRunner())
    if op == "linear" and "cpu" in kernels:
        out.append(CpuLinearRunner())
    return tuple(out)


for _op in MATMUL_OPS:
    CANDIDATES[_op] = partial(_candidates, _op)


def _run_rows(site: str, x: torch.Tensor, rest: tuple) -> torch.Tensor:
    """Run with ``x`` flattened to [rows, K] the way ``F.linear`` does, and the result unflattened."""
    if x.dim() == 2:
        return _run(site, (x, *rest))
    y = _run(site, (x.reshape(-1, x.shape[-1]), *rest))
    return y.view(*x.shape[:-1], y.shape[-1])


# -- implementations --------------------------------------------------------------------------


def linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, site: str) -> torch.Tensor:
    return _run_rows(site, x, (weight, bias))


def mm_impl(a: torch.Tensor, b: torch.Tensor, site: str) -> torch.Tensor:
    return _run_rows(site, a, (b,))


def addmm_impl(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float, site: str):
    return _run(site, (bias, a, b, beta, alpha))


def bmm_impl(a: torch.Tensor, b: torch.Tensor, site: str) -> torch.Tensor:
    return _run(site, (a, b))


def baddbmm_impl(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float, site: str):
    return _run(site, (bias, a, b, beta, alpha))


# -- registration -----------------------------------------------------------------------------

_lib = torch.library.Library("flashtune", "DEF")
_SCHEMAS = {
    "linear": ("linear(Tensor x, Tensor weight, Tensor? bias, str site) -> Tensor", linear_impl),
    "mm": ("mm(Tensor a, Tensor b, str site) -> Tensor", mm_impl),
    "addmm": ("addmm(Tensor bias, Tensor a, Tensor b, float beta, float alpha, str site) -> Tensor", addmm_impl),
    "bmm": ("bmm(Tensor a, Tensor b, str site) -> Tensor", bmm_impl),
    "baddbmm": ("baddbmm(Tensor bias, Tensor a, Tensor b, float beta, float alpha, str site) -> Tensor", baddbmm_impl),
}
for _name, (_schema, _impl) in _SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, _impl, "CompositeExplicitAutograd")


@torch.library.register_fake("flashtune::linear")
def _linear_fake(x, weight, bias, site):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("flashtune::mm")
def _mm_fake(a, b, site):
    return a.new_empty((*a.shape[:-1], b.shape[1]))


@torch.library.register_fake("flashtune::addmm")
def _addmm_fake(bias, a, b, beta, alpha, site):
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.register_fake("flashtune::bmm")
def _bmm_fake(a, b, site):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


@torch.library.register_fake("flashtune::baddbmm")
def _baddbmm_fake(bias, a, b, beta, alpha, site):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


# -- autograd ---------------------------------------------------------------------------------
# The Autograd-key kernel decides per call: when a gradient is needed, an autograd.Function whose
# forward redispatches below autograd (so tracing reaches the fake impl) and whose backward is
# plain ATen (traced and compiled like any other backward); when none is needed, real tensors go
# straight to the implementation, and anything else (fake/functional tensors, an active dispatch
# mode) is redispatched below autograd. torch.library.register_autograd would do the same through
# a generic wrapper that costs ~20 us per call even under no_grad.


def _save_inputs(ctx: Any, inputs: tuple) -> None:
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
    ctx.scalars = [x for x in inputs if not isinstance(x, (torch.Tensor, str)) and x is not None]
    ctx.has_bias = len(inputs) > 2 and inputs[2] is not None


def _linear_bwd(ctx, grad):
    saved = ctx.saved_tensors
    x, w = saved[0], saved[1]
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    gx = grad @ w if ctx.needs_input_grad[0] else None
    gw = g2.t() @ x2 if ctx.needs_input_grad[1] else None
    gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return gx, gw, gb, None


def _mm_bwd(ctx, grad):
    a, b = ctx.saved_tensors
    ga = grad @ b.t() if ctx.needs_input_grad[0] else None
    gb = a.reshape(-1, a.shape[-1]).t() @ grad.reshape(-1, grad.shape[-1]) if ctx.needs_input_grad[1] else None
    return ga, gb, None


def _addmm_bwd(ctx, grad):
    bias, a, b = ctx.saved_tensors
    beta, alpha = ctx.scalars
    gbias = (grad * beta).sum_to_size(bias.shape) if ctx.needs_input_grad[0] else None
    ga = (grad @ b.t()) * alpha if ctx.needs_input_grad[1] else None
    gb = (a.t() @ grad) * alpha if ctx.needs_input_grad[2] else None
    return gbias, ga, gb, None, None, None


def _bmm_bwd(ctx, grad):
    a, b = ctx.saved_tensors
    ga = torch.bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
    gb = torch.bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
    return ga, gb, None


def _baddbmm_bwd(ctx, grad):
    bias, a, b = ctx.saved_tensors
    beta, alpha = ctx.scalars
    gbias = (grad * beta).sum_to_size(bias.shape) if ctx.needs_input_grad[0] else None
    ga = torch.bmm(grad, b.transpose(1, 2)) * alpha if ctx.needs_input_grad[1] else None
    gb = torch.bmm(a.transpose(1, 2), grad) * alpha if ctx.needs_input_grad[2] else None
    return gbias, ga, gb, None, None, None


# Argument types that let a call skip the dispatcher: plain tensors and the op's scalars.
_DIRECT_TYPES = frozenset({torch.Tensor, torch.nn.Parameter, str, float, int, type(None)})
_dispatch_depth = torch._C._len_torch_dispatch_stack
_grad_enabled = torch.is_grad_enabled


def _autograd_kernel(name: str, impl: Any, backward: Any) -> Any:
    overload = getattr(torch.ops.flashtune, name).default

    def forward(ctx, *args):
        _save_inputs(ctx, args)
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args)

    function = type(
        f"flashtune_{name}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )

    def kernel(*args):
        if _grad_enabled():
            for t in args:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    return function.apply(*args)
        if _dispatch_depth() == 0:
            for t in args:
                if type(t) not in _DIRECT_TYPES:
                    break
            else:
                return impl(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args)

    return kernel


# overload -> the same kernel as a plain Python callable: graphs that are run as they are (inner
# compiler "eager") call it directly and skip the dispatcher's cost for a Python op (~8 us).
DIRECT: dict[Any, Any] = {}
for _name, _bwd in (
    ("linear", _linear_bwd),
    ("mm", _mm_bwd),
    ("addmm", _addmm_bwd),
    ("bmm", _bmm_bwd),
    ("baddbmm", _baddbmm_bwd),
):
    _kernel = _autograd_kernel(_name, _SCHEMAS[_name][1], _bwd)
    _lib.impl(_name, _kernel, "Autograd")
    DIRECT[getattr(torch.ops.flashtune, _name).default] = _kernel
