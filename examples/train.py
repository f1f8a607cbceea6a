"""Recipe: a training loop (forward, backward, optimizer step) compiled with flashtune.

Only the model is compiled; the loss, ``backward()`` and the AdamW step are written as usual. A
graph compiled in grad mode is tuned while it compiles: each routed matmul is timed with any
weight copy made again per call (the optimizer changes the weights every step), and a call whose
winner is ATen's default goes back to ATen, so that part of the graph is what Inductor compiles
(docs/training.md). bf16 mixed precision: wrap the forward in ``torch.autocast``, as below.

A small GPT-style model with random weights and random token batches; under a minute on a 2-core
CPU.

Run: python examples/train.py
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import flashtune_compile as ft


class Layer(nn.Module):
    """Pre-norm causal self-attention and a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, w)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token embeddings, pre-norm layers, an output projection tied to the embedding."""

    def __init__(self, vocab: int = 512, width: int = 128, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Layer(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return F.linear(self.norm(x), self.embed.weight)  # tied output projection


def train(model: nn.Module, forward, batches: list[torch.Tensor], autocast: bool) -> list[float]:
    """One AdamW step per batch (next-token loss); the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for tokens in batches:
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            logits = forward(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(steps: int = 8, autocast: bool = False) -> tuple[list[float], list[float]]:
    """Trains two copies of one model, eager and compiled with flashtune, on the same batches;
    returns (eager losses, flashtune losses)."""
    torch.manual_seed(0)
    model = TinyGPT()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (4, 65), generator=gen) for _ in range(steps)]
    eager_model, tuned_model = copy.deepcopy(model), copy.deepcopy(model)
    eager = train(eager_model, eager_model, batches, autocast)
    compiled = torch.compile(tuned_model, backend="flashtune")
    start = time.perf_counter()
    tuned = train(tuned_model, compiled, batches, autocast)
    seconds = time.perf_counter() - start
    worst = max(abs(a - b) / abs(a) for a, b in zip(eager, tuned))
    print(f"eager losses:     {[round(v, 4) for v in eager]}")
    print(f"flashtune losses: {[round(v, 4) for v in tuned]} (largest relative difference {worst:.1e})")
    print(f"{steps} steps with flashtune (compile and tuning included): {seconds:.1f} s")
    stats = ft.stats()
    print(f"matmuls routed to flashtune: {stats['routed_ops']}, handed back to ATen: {stats['handed_back']}")
    return eager, tuned


if __name__ == "__main__":
    main()
