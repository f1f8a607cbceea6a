"""The tunable MoE ops: ``torch.ops.flashtune.grouped_mm`` and ``torch.ops.flashtune.moe``.

``grouped_mm(x [S, K], w [E, K, N], offs [E] int32, site) -> [S, N]``: rows of ``x`` grouped by
expert, ``offs`` the cumulative row ends, as ``torch._grouped_mm`` takes them; rows no group
covers are zero.

``moe(hidden [T, H], topk_weights [T, k], topk_ids [T, k], w1 [E, 2I, H], w2 [E, H, I],
activation, site) -> [T, H]``: one layer's whole expert computation, with the semantics in
``kernels/moe.py`` (transformers' layout: ``w1`` holds [gate; up]). ``activation`` is ``"silu"``,
``"gelu"`` or ``"gelu_tanh"``. Tuned per bucket of the token count ``T``; the cache key holds
``E``, ``k``, ``H``, ``I`` and the dtypes, and profiling synthesizes skewed routing
(``tuner/routing.py``).

Gradients: when one is needed the call runs the ATen loop formulation with autograd recording
it (correct, untuned). The graph pass and the transformers integration route only calls that
need no gradient, so compiled training graphs never trace these ops.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..kernels.moe import (
    ACTIVATIONS,
    AtenGroupedMMRunner,
    AtenMoeRunner,
    CpuGroupedMMRunner,
    CpuMoeRunner,
    grouped_loop,
    moe_loop,
)
from ..tuner import routing
from ..tuner.runner import TunableRunner
from .site import CANDIDATES, ON_NEW_SIZE, ROUTED_INPUTS, SiteSpec, run

MOE_OPS = ("grouped_mm", "moe")


def _candidates(aten: type, triton_name: str, cpu: type, kernels: frozenset) -> tuple[TunableRunner, ...]:
    """ATen's runner first (its variants only with "aten"), then each allowed family."""
    out: list[TunableRunner] = [aten(variants="aten" in kernels)]
    if "triton" in kernels:
        from ..kernels import triton_moe  # imports triton: only when asked for

        out.append(getattr(triton_moe, triton_name)())
    if "cpu" in kernels:
        out.append(cpu())
    return tuple(out)


CANDIDATES["moe"] = partial(_candidates, AtenMoeRunner, "TritonMoeRunner", CpuMoeRunner)
CANDIDATES["grouped_mm"] = partial(_candidates, AtenGroupedMMRunner, "TritonGroupedMMRunner", CpuGroupedMMRunner)
ROUTED_INPUTS["moe"] = (2, 1)  # topk_ids, topk_weights


def _check_moe(hidden, topk_weights, topk_ids, w1, w2, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"flashtune.moe: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if hidden.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"flashtune.moe: expected hidden [T, H], w1 [E, 2I, H], w2 [E, H, I]; got "
            f"{tuple(hidden.shape)}, {tuple(w1.shape)}, {tuple(w2.shape)}"
        )
    t, h = hidden.shape
    e, two_i, h1 = w1.shape
    if (
        h1 != h
        or tuple(w2.shape) != (e, h, two_i // 2)
        or two_i % 2
        or topk_ids.shape != topk_weights.shape
        or topk_ids.dim() != 2
        or topk_ids.shape[0] != t
    ):
        raise ValueError(
            f"flashtune.moe: shapes disagree: hidden {tuple(hidden.shape)}, topk_weights "
            f"{tuple(topk_weights.shape)}, topk_ids {tuple(topk_ids.shape)}, w1 {tuple(w1.shape)}, "
            f"w2 {tuple(w2.shape)}"
        )
    if topk_ids.is_floating_point() or topk_ids.is_complex():
        raise ValueError(f"flashtune.moe: topk_ids must be integers, got {topk_ids.dtype}")


# -- implementations --------------------------------------------------------------------------


def _first_call_of_size(spec: SiteSpec, inputs: tuple) -> None:
    """Once per size of a site (its static shapes are fixed): check the inputs, and let calls that
    reach the tuner teach "learned" routing."""
    _check_moe(*inputs)
    if spec.routing == "learned":
        routing.observe(inputs[2], inputs[3].shape[0])


ON_NEW_SIZE["moe"] = _first_call_of_size


def moe_impl(hidden, topk_weights, topk_ids, w1, w2, activation: str, site: str) -> torch.Tensor:
    return run(site, (hidden, topk_weights, topk_ids, w1, w2, activation))


def grouped_mm_impl(x, w, offs, site: str) -> torch.Tensor:
    return run(site, (x, w, offs))


_lib = torch.library.Library("flashtune", "FRAGMENT")
_lib.define("grouped_mm(Tensor x, Tensor w, Tensor offs, str site) -> Tensor")
_lib.define(
    "moe(Tensor hidden, Tensor topk_weights, Tensor topk_ids, Tensor w1, Tensor w2, str activation, str site) -> Tensor"
)
_lib.impl("grouped_mm", grouped_mm_impl, "CompositeExplicitAutograd")
_lib.impl("moe", moe_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("flashtune::grouped_mm")
def _grouped_mm_fake(x, w, offs, site):
    torch._check(
        x.dim() == 2 and w.dim() == 3 and offs.dim() == 1,
        lambda: "flashtune.grouped_mm: expected x [S, K], w [E, K, N], offs [E]",
    )
    return x.new_empty((x.shape[0], w.shape[2]))


@torch.library.register_fake("flashtune::moe")
def _moe_fake(hidden, topk_weights, topk_ids, w1, w2, activation, site):
    _check_moe(hidden, topk_weights, topk_ids, w1, w2, activation)
    return hidden.new_empty(hidden.shape)


# -- autograd ---------------------------------------------------------------------------------


def _moe_reference(hidden, topk_weights, topk_ids, w1, w2, activation, site):
    return moe_loop(hidden, topk_weights, topk_ids, w1, w2, activation)


def _grouped_reference(x, w, offs, site):
    return grouped_loop(x, w, offs)


_dispatch_depth = torch._C._len_torch_dispatch_stack
_grad_enabled = torch.is_grad_enabled
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter, str})


def _autograd_kernel(name: str, impl: Any, reference: Any) -> Any:
    overload = getattr(torch.ops.flashtune, name).default

    def kernel(*args):
        plain = _dispatch_depth() == 0 and all(type(a) in _PLAIN for a in args)
        if _grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            if not plain:
                raise NotImplementedError(
                    f"flashtune.{name} has no autograd formula under tracing; the flashtune backend routes MoE "
                    "only where no gradient is needed (run the model under torch.no_grad() or inference_mode())"
                )
            return reference(*args)  # ATen ops, recorded by autograd
        if plain:
            return impl(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args)

    return kernel


DIRECT: dict[Any, Any] = {}
for _name, _impl, _ref in (("grouped_mm", grouped_mm_impl, _grouped_reference), ("moe", moe_impl, _moe_reference)):
    _kernel = _autograd_kernel(_name, _impl, _ref)
    _lib.impl(_name, _kernel, "Autograd")
    DIRECT[getattr(torch.ops.flashtune, _name).default] = _kernel
