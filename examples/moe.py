"""Recipe: a Mixture-of-Experts model compiled with flashtune.

The experts are written the way gpt-fast writes Mixtral's: a router picks two experts per token,
their weights are gathered by id, and ``einsum`` does the products. The backend recognises the
experts by their data flow and replaces them with one tunable ``flashtune.moe`` op; the router and
everything else stay as written. Spellings around ``torch._grouped_mm`` (transformers 5,
torchtitan) are recognised the same way (docs/moe.md).

Small random weights; under a minute on a 2-core CPU.

Run: python examples/moe.py
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import flashtune_compile as ft


class Experts(nn.Module):
    """Top-2 routing over ``experts`` SwiGLU experts, gpt-fast style."""

    def __init__(self, dim: int = 128, inter: int = 256, experts: int = 8, top: int = 2) -> None:
        super().__init__()
        self.top = top
        self.gate = nn.Linear(dim, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, inter, dim) / dim**0.5)
        self.w3 = nn.Parameter(torch.randn(experts, inter, dim) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(experts, dim, inter) / inter**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x).softmax(-1).topk(self.top, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        w1, w3, w2 = self.w1[ids], self.w3[ids], self.w2[ids]
        hidden = F.silu(torch.einsum("ti,taoi -> tao", x, w1)) * torch.einsum("ti,taoi -> tao", x, w3)
        out = torch.einsum("tao,taio -> tai", hidden, w2)
        return torch.einsum("tai,ta -> ti", out, weights)


class MoEModel(nn.Module):
    """Two pre-norm MoE layers over token embeddings."""

    def __init__(self, vocab: int = 512, dim: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(nn.RMSNorm(dim) for _ in range(layers))
        self.moes = nn.ModuleList(Experts(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for norm, moe in zip(self.norms, self.moes):
            x = x + moe(norm(x))
        return self.head(x)


def main() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Runs eager and flashtune at several token counts; returns (eager outputs, flashtune outputs)."""
    torch.manual_seed(0)
    model = MoEModel().eval()
    compiled = torch.compile(model, backend="flashtune", dynamic=True)
    inputs = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)) for n in (1, 7, 64)]
    with torch.no_grad():
        eager = [model(t) for t in inputs]
        start = time.perf_counter()
        tuned = [compiled(t) for t in inputs]
        seconds = time.perf_counter() - start
    for t, a, b in zip(inputs, eager, tuned):
        err = ((a - b).abs().max() / a.abs().max()).item()
        print(f"{len(t):3d} tokens: largest difference from eager {err:.1e} of the largest output")
    print(f"compile and tuning: {seconds:.1f} s")
    moe = [w for w in ft.tactics() if w.get("op") == "moe"]
    print(f"moe buckets tuned: {len(moe)}; winners: {sorted({str(w['kernel']) for w in moe})}")
    return eager, tuned


if __name__ == "__main__":
    main()
