"""Synthetic MoE routing for profiling: which experts each token picks, and with what weights.

Trained routers are skewed: a few experts take most tokens, and at small token counts many
experts get none. Kernel choice depends on that (a uniform spread makes every expert's GEMM the
same size; a skewed one has one big GEMM and many tiny or empty ones), so profiling with uniform
routing, as vLLM's offline configs and Inductor do, can pick the wrong tile. Distributions:

- ``"zipf"`` (default): expert popularity ``p(rank) ∝ rank ** -1.2`` over a fixed shuffle of the
  experts;
- ``"uniform"``: every expert equally likely;
- ``"learned"``: the expert frequencies seen in real calls of this layer shape (recorded by
  ``RoutedInputs.observe``, which an MoE op does on each new size at a site tuned with learned
  routing, for instance every token count of a warmup), smoothed so no expert has probability
  zero; ``"zipf"`` until something was seen. The counts belong to the tuner (``AutoTuner.state``),
  so a new tuner starts with none.

Each token picks ``k`` distinct experts without replacement, as top-k does. Draws come from the
tuner's private generator, so profiling never shifts the user's random stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..tuner.autotuner import AutoTuner

ROUTINGS = ("zipf", "uniform", "learned")
ZIPF_EXPONENT = 1.2


class LearnedRouting:
    """Expert pick counts seen in real calls, per (num_experts, top_k). Thread-safe."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], torch.Tensor] = {}  # -> counts (CPU, float64)
        self._lock = threading.Lock()

    def observe(self, topk_ids: torch.Tensor, num_experts: int) -> None:
        """Add the expert picks of one real call (``topk_ids [T, k]``)."""
        if topk_ids.numel() == 0:
            return
        ids = topk_ids.reshape(-1).long()
        ids = ids[(ids >= 0) & (ids < num_experts)]
        counts = torch.bincount(ids, minlength=num_experts).to("cpu", torch.float64)
        key = (num_experts, topk_ids.shape[-1])
        with self._lock:
            self._seen[key] = self._seen[key] + counts if key in self._seen else counts

    def counts(self, num_experts: int, top_k: int) -> torch.Tensor | None:
        """The pick counts seen for this layer shape, or None if nothing was observed."""
        with self._lock:
            found = self._seen.get((num_experts, top_k))
            return None if found is None else found.clone()


def learned_routing(tuner: AutoTuner | None = None) -> LearnedRouting:
    """The learned routing counts of ``tuner`` (default: the process-wide one)."""
    return (tuner or AutoTuner.get()).state("moe.learned_routing", LearnedRouting)


def popularity(
    kind: str, num_experts: int, top_k: int, generator: torch.Generator, learned: LearnedRouting | None = None
) -> torch.Tensor:
    """Per-expert selection weights (float64, positive, CPU) for a routing distribution."""
    if kind not in ROUTINGS:
        raise ValueError(f"flashtune: unknown MoE routing {kind!r}; valid: {list(ROUTINGS)}")
    if kind == "learned":
        counts = (learned or learned_routing()).counts(num_experts, top_k)
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
    learned: LearnedRouting | None = None,
) -> torch.Tensor:
    """``[tokens, top_k]`` distinct expert ids per row, drawn from the ``kind`` distribution."""
    if tokens == 0:
        return torch.empty((0, top_k), dtype=dtype, device=device)
    p = popularity(kind, num_experts, top_k, generator, learned)
    picks = torch.multinomial(p.expand(tokens, num_experts), top_k, replacement=False, generator=generator)
    return picks.to(device=device, dtype=dtype)


def topk_weights(
    tokens: int, top_k: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """``[tokens, top_k]`` positive weights summing to 1 per row, like a renormalized softmax."""
    logits = torch.randn((tokens, top_k), dtype=torch.float32, generator=generator)
    return torch.softmax(logits, dim=-1).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class RoutedInputs:
    """Where an MoE op's tuning inputs hold its routing: ``ids`` ([T, k] expert ids), ``weights``
    ([T, k] routing weights), and the (input, dim) whose size is the number of experts."""

    ids: int
    weights: int
    experts: tuple[int, int]

    def initializers(self, kind: str, sig: Sequence[Any], tuner: AutoTuner) -> dict[int, Callable]:
        """``TuningConfig.initializers`` synthesizing ``kind`` routing for a site with static
        signature ``sig`` (``ops/site.py``), from ``tuner``'s generator and learned counts."""
        num_experts = sig[self.experts[0]][0][self.experts[1]]
        learned = learned_routing(tuner)

        def ids(shape, dtype, device):
            gen = tuner.generator(torch.device("cpu"))
            return topk_ids(kind, shape[0], shape[1], num_experts, dtype, device, gen, learned)

        def weights(shape, dtype, device):
            return topk_weights(shape[0], shape[1], dtype, device, tuner.generator(torch.device("cpu")))

        return {self.ids: ids, self.weights: weights}

    def observe(self, tuner: AutoTuner, inputs: Sequence[Any]) -> None:
        """Teach ``tuner``'s learned routing the expert picks of a real call."""
        learned_routing(tuner).observe(inputs[self.ids], inputs[self.experts[0]].shape[self.experts[1]])
