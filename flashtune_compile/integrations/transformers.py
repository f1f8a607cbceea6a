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
from collections.abc import Mapping
from typing import Any

import torch

from ..ops.site import SiteSpec

NAME = "flashtune"
_settings: dict[str, Any] = {}


def register(options: Mapping[str, Any] | None = None) -> None:
    """Register ``"flashtune"`` as a transformers experts implementation. ``options`` takes the
    backend's tuning options (``tune``, ``buckets``, ``max_tokens``, ``kernels``,
    ``moe_routing``); others raise ValueError. Safe to call again (the last options win)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from ..backend import parse_options

    opts = dict(options or {})
    allowed = {"tune", "buckets", "max_tokens", "kernels", "moe_routing"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise ValueError(f"flashtune transformers integration: unknown option(s) {bad}; valid: {sorted(allowed)}")
    parsed = parse_options(opts)
    _settings.clear()
    _settings.update(
        ladder=parsed.buckets if isinstance(parsed.buckets, str) else list(parsed.buckets),
        max_tokens=parsed.max_tokens,
        tune=parsed.tune,
        kernels=tuple(sorted(parsed.kernels)),
        routing=parsed.moe_routing,
    )
    _site.cache_clear()
    type(ALL_EXPERTS_FUNCTIONS).register(NAME, flashtune_experts_forward)


@torch.compiler.assume_constant_result
def _site_key(key: tuple) -> str:
    return _site(key)


@functools.cache
def _site(key: tuple) -> str:
    """The site string of an experts module: T is the one dynamic axis (hidden, weights, ids)."""
    (e, n1, h), (_, h2, i), top_k, dtype, w_dtype, id_dtype = key
    max_tokens = _settings.get("max_tokens", 8192)
    sig = (
        ((-1, h), dtype),
        ((-1, top_k), w_dtype),
        ((-1, top_k), id_dtype),
        ((e, n1, h), dtype),
        ((e, h2, i), dtype),
        None,
    )
    spec = SiteSpec(
        "moe",
        ((((0, 0), (1, 0), (2, 0)), 1, max_tokens),),
        sig,
        _settings.get("ladder", "hybrid"),
        _settings.get("tune"),
        _settings.get("kernels", ("aten", "cpu", "cuda", "triton")),
        _settings.get("routing", "zipf"),
    )
    return spec.encode()


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


def _fused_applies(module: torch.nn.Module, hidden: torch.Tensor) -> str | None:
    """The activation name when the fused op computes exactly what this module does, else None."""
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
    w1, w2 = module.gate_up_proj, module.down_proj
    if not (hidden.dtype == w1.dtype == w2.dtype and hidden.dim() == 2 and w1.dim() == 3 and w2.dim() == 3):
        return None
    if torch.is_grad_enabled() and (hidden.requires_grad or w1.requires_grad or w2.requires_grad):
        return None
    return _activation(module)


def flashtune_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """An experts forward for transformers' ``ExpertsInterface``: the fused tunable op where it
    applies, transformers' grouped_mm forward otherwise."""
    activation = _fused_applies(self, hidden_states)
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
    return torch.ops.flashtune.moe(hidden_states, top_k_weights, top_k_index, w1, w2, activation, _site_key(key))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
