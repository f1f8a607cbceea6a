"""``experts_implementation="flashtune"`` for Hugging Face transformers (5.x) MoE models.

    import flashtune_compile.integrations.transformers as ft_hf
    ft_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="flashtune")
    model = torch.compile(model, backend="flashtune", fullgraph=True)   # or eager: still tuned

Each experts module then calls ``torch.ops.flashtune.moe`` directly (no pattern matching needed),
in eager mode and under ``torch.compile`` with ``fullgraph=True``. Where the fused op does not
apply, the module runs transformers' own ``grouped_mm`` forward, unchanged: experts with biases,
without a gate, with interleaved gate/up or a custom gate, with a post-expert norm, under expert
parallelism, with an activation other than SiLU/GELU, with weights of another dtype than the
hidden states, or when a gradient is needed (training).

Transformers' ``"eager"`` experts loop (a Python loop over ``nonzero()`` experts) graph-breaks in
Dynamo, so no backend can route it: use ``"flashtune"`` (or ``"grouped_mm"``/``"batched_mm"``,
which the backend's graph pass rewrites to the same op).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..ops.moe import MOE
from ..ops.site import SiteOptions, site_string

NAME = "flashtune"
OPTIONS = ("tune", "buckets", "max_tokens", "kernels", "moe_routing", "cache_dir")  # the backend's, for MoE


def register(options: Mapping[str, Any] | None = None) -> None:
    """Register ``"flashtune"`` as a transformers experts implementation. ``options`` takes the
    backend's tuning options named in ``OPTIONS``; others raise ValueError. Safe to call again (the
    last options win)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from ..backend import parse_options

    opts = dict(options or {})
    bad = sorted(set(opts) - set(OPTIONS))
    if bad:
        raise ValueError(f"flashtune transformers integration: unknown option(s) {bad}; valid: {sorted(OPTIONS)}")
    type(ALL_EXPERTS_FUNCTIONS).register(NAME, experts_forward(parse_options(opts).site_options()))


@functools.cache
def _site(options: SiteOptions, key: tuple) -> str:
    """The site string of an experts module: the token count is its one dynamic axis."""
    (e, n1, h), (_, h2, i), top_k, dtype, w_dtype, id_dtype = key
    shapes = [(0, h), (0, top_k), (0, top_k), (e, n1, h), (e, h2, i), None]
    dtypes = [dtype, w_dtype, id_dtype, dtype, dtype, None]
    return site_string(MOE, ((MOE.token_dims, 1, options.max_tokens),), shapes, dtypes, options)


def _activation(module: torch.nn.Module) -> str | None:
    from transformers.activations import GELUActivation, GELUTanh, SiLUActivation

    act = getattr(module, "act_fn", None)
    if isinstance(act, (SiLUActivation, torch.nn.SiLU)):
        return "silu"
    if isinstance(act, GELUActivation) and getattr(act, "act", None) is torch.nn.functional.gelu:
        return "gelu"
    if (
        isinstance(act, GELUTanh)
        and isinstance(getattr(act, "act", None), functools.partial)
        and act.act.func is torch.nn.functional.gelu
        and act.act.keywords == {"approximate": "tanh"}
    ):
        return "gelu_tanh"
    return None


def _fused_applies(
    module: torch.nn.Module, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> str | None:
    """The activation name when the fused op computes exactly what this module does (and serves
    these operands: ``MOE.serves``), else None."""
    from transformers.integrations.moe import _default_apply_gate

    if not (
        getattr(module, "has_gate", False)
        and not getattr(module, "has_bias", True)
        and getattr(module, "is_concatenated", False)
        and not getattr(module, "has_post_expert_norm", True)
        and not getattr(module, "_is_expert_parallel", True)
        and getattr(type(module), "_apply_gate", None) is _default_apply_gate
    ):
        return None
    if MOE.serves([hidden, weights, ids, module.gate_up_proj, module.down_proj], hidden.dtype) is not None:
        return None
    return _activation(module)


def experts_forward(options: SiteOptions) -> Callable[..., torch.Tensor]:
    """An experts forward for transformers' ``ExpertsInterface`` whose calls carry ``options``: the
    fused tunable op where it applies, transformers' grouped_mm forward otherwise."""

    @torch.compiler.assume_constant_result
    def site_key(key: tuple) -> str:
        return _site(options, key)

    def forward(
        self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return _forward(self, hidden_states, top_k_index, top_k_weights, site_key)

    return forward


def _forward(self, hidden_states, top_k_index, top_k_weights, site_key) -> torch.Tensor:
    activation = _fused_applies(self, hidden_states, top_k_weights, top_k_index)
    if activation is None:
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    w1, w2 = self.gate_up_proj, self.down_proj
    if self.is_transposed:  # stored [E, H, 2I] / [E, I, H]
        w1, w2 = w1.transpose(-2, -1), w2.transpose(-2, -1)
    key = (
        tuple(w1.shape),
        tuple(w2.shape),
        top_k_index.shape[-1],
        _name(hidden_states.dtype),
        _name(top_k_weights.dtype),
        _name(top_k_index.dtype),
    )
    return torch.ops.flashtune.moe(hidden_states, top_k_weights, top_k_index, w1, w2, activation, None, site_key(key))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
