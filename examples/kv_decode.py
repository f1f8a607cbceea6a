"""Recipe: a hand-written KV-cache decode loop, the way gpt-fast-style code runs it.

The model keeps its keys and values in preallocated buffers. Two compiled functions, both
``fullgraph=True``: ``prefill`` with a dynamic prompt length (one graph for every length) and
``decode_one`` with static shapes (one token at one position per call, the position a tensor so
that every step reuses one graph). flashtune routes every linear of both graphs; the decode
step's buckets are tuned on its first call, prefill's per bucket of the prompt length.

Small random weights; under a minute on a 2-core CPU.

Run: python examples/kv_decode.py
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import flashtune_compile as ft


class Layer(nn.Module):
    """Pre-norm attention with a KV cache, then a SwiGLU MLP."""

    def __init__(self, dim: int, heads: int, ffn: int, max_len: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w13 = nn.Linear(dim, 2 * ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)
        self.register_buffer("k_cache", torch.zeros(1, heads, max_len, self.head_dim), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, heads, max_len, self.head_dim), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.wqkv(self.norm1(x)).view(1, t, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        x = x + self.wo(y.transpose(1, 2).reshape(1, t, -1))
        gate, up = self.w13(self.norm2(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


class TinyLM(nn.Module):
    def __init__(self, vocab=1024, dim=256, heads=4, ffn=704, layers=2, max_len=128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Layer(dim, heads, ffn, max_len) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril(), persistent=False)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits for ``tokens [1, T]`` at positions ``pos [T]``, reading and extending the caches."""
        mask = self.causal[pos].view(1, 1, len(pos), -1)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, pos, mask)
        return self.head(self.norm(x))

    def reset(self) -> None:
        for layer in self.layers:
            layer.k_cache.zero_()
            layer.v_cache.zero_()


def prefill_step(model: TinyLM, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits for the prompt (any length)."""
    return model(tokens, pos)


def decode_step(model: TinyLM, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits for one token at one position."""
    return model(token, pos)


def greedy(model: TinyLM, prefill, decode_one, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """``new_tokens`` greedy tokens after ``prompt [1, T]``: one prefill call, then one decode call
    per token."""
    model.reset()
    with torch.no_grad():
        t = prompt.shape[1]
        logits = prefill(model, prompt, torch.arange(t))
        token = logits[:, -1].argmax(-1, keepdim=True)
        out = [int(token)]
        for i in range(new_tokens - 1):
            logits = decode_one(model, token, torch.tensor([t + i]))
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(token))
    return out


def compiled_steps():
    """(prefill, decode_one) compiled with flashtune: prefill dynamic in the prompt length, decode
    static."""
    prefill = torch.compile(prefill_step, backend="flashtune", fullgraph=True, dynamic=True)
    decode_one = torch.compile(decode_step, backend="flashtune", fullgraph=True, dynamic=False)
    return prefill, decode_one


def main(new_tokens: int = 32) -> tuple[list[int], list[int]]:
    """Decodes with eager and with flashtune; returns (eager tokens, flashtune tokens)."""
    torch.manual_seed(0)
    model = TinyLM().eval()
    prompt = torch.randint(0, 1024, (1, 9), generator=torch.Generator().manual_seed(1))
    eager = greedy(model, prefill_step, decode_step, prompt, new_tokens)
    prefill, decode_one = compiled_steps()
    start = time.perf_counter()
    tuned = greedy(model, prefill, decode_one, prompt, new_tokens)
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = greedy(model, prefill, decode_one, prompt, new_tokens)
    warm = time.perf_counter() - start
    print(f"eager tokens:     {eager}")
    print(f"flashtune tokens: {tuned} ({'equal' if tuned == eager == again else 'DIFFERENT'})")
    print(f"first run (compile + tune): {first:.1f} s; second: {warm * 1e3 / new_tokens:.2f} ms per token")
    stats = ft.stats()
    print(f"ops routed to flashtune: {stats['routed_ops']}; buckets tuned: {stats['misses']}")
    return eager, tuned


if __name__ == "__main__":
    main()
