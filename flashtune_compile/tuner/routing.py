"""Synthetic MoE routing for profiling: which experts each token picks, and with what weights.

Trained routers are skewed: a few experts take most tokens, and at small token counts many
experts get none. Kernel choice depends on that (a uniform spread makes every expert's GEMM the
same size; a skewed one has one big GEMM and many tiny or empty ones), so profiling with uniform
routing, as vLLM's offline configs and Inductor do, can pick the wrong tile. Distributions:

- ``"zipf"`` (default): expert popularity ``p(rank) ∝ rank ** -1.2`` over a fixed shuffle of the
  experts;
- ``"uniform"``: every expert equally likely;
- ``"learned"``: the expert frequencies seen in real calls of this layer shape (recorded with
  ``observe``, which MoE ops do on each call that reaches the tuner, for instance every token
  count of a warmup), smoothed so no expert has probability zero; ``"zipf"`` until something was
  seen.

Each token picks ``k`` distinct experts without replacement, as top-k does. Draws come from a
private generator, so profiling never shifts the user's random stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

ROUTINGS = ("zipf", "uniform", "learned")
ZIPF_EXPONENT = 1.2

_seen: dict[tuple[int, int], torch.Tensor] = {}  # (num_experts, top_k) -> expert pick counts (CPU, float64)
_lock = threading.Lock()


def observe(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Add the expert picks of one real call (``topk_ids [T, k]``) to the learned frequencies."""
    if topk_ids.numel() == 0:
        return
    ids = topk_ids.reshape(-1).long()
    ids = ids[(ids >= 0) & (ids < num_experts)]
    counts = torch.bincount(ids, minlength=num_experts).to("cpu", torch.float64)
    key = (num_experts, topk_ids.shape[-1])
    with _lock:
        if key in _seen:
            _seen[key] += counts
        else:
            _seen[key] = counts


def learned(num_experts: int, top_k: int) -> torch.Tensor | None:
    """The learned pick counts for this layer shape, or None if nothing was observed."""
    with _lock:
        counts = _seen.get((num_experts, top_k))
        return None if counts is None else counts.clone()


def forget() -> None:
    """Drop every learned frequency."""
    with _lock:
        _seen.clear()


def popularity(kind: str, num_experts: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Per-expert selection weights (float64, positive, CPU) for a routing distribution."""
    if kind not in ROUTINGS:
        raise ValueError(f"flashtune: unknown MoE routing {kind!r}; valid: {list(ROUTINGS)}")
    if kind == "learned":
        counts = learned(num_experts, top_k)
        if counts is not None and counts.sum() > 0:
            return counts + 0.5 * counts.sum() / (num_experts * 100)  # rarely-seen experts stay possible
        kind = "zipf"
    if kind == "uniform":
        return torch.ones(num_experts, dtype=torch.float64)
    ranks = torch.randperm(num_experts, generator=generator).to(torch.float64) + 1
    return ranks**-ZIPF_EXPONENT


def topk_ids(
    kind: str,
    tokens: int,
    top_k: int,
    num_experts: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> torch.Tensor:
    """``[tokens, top_k]`` distinct expert ids per row, drawn from the ``kind`` distribution."""
    if tokens == 0:
        return torch.empty((0, top_k), dtype=dtype, device=device)
    p = popularity(kind, num_experts, top_k, generator)
    picks = torch.multinomial(p.expand(tokens, num_experts), top_k, replacement=False, generator=generator)
    return picks.to(device=device, dtype=dtype)


def topk_weights(
    tokens: int, top_k: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """``[tokens, top_k]`` positive weights summing to 1 per row, like a renormalized softmax."""
    logits = torch.randn((tokens, top_k), dtype=torch.float32, generator=generator)
    return torch.softmax(logits, dim=-1).to(device=device, dtype=dtype)


def initializers(
    kind: str, num_experts: int, ids_index: int, weights_index: int, generator: Callable[[], torch.Generator]
) -> dict[int, Callable]:
    """``TuningConfig.initializers`` that synthesize routing for the inputs at these positions."""

    def ids(shape, dtype, device):
        return topk_ids(kind, shape[0], shape[1], num_experts, dtype, device, generator())

    def weights(shape, dtype, device):
        return topk_weights(shape[0], shape[1], dtype, device, generator())

    return {ids_index: ids, weights_index: weights}
