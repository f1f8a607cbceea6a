"""Decoder models at real sizes for benchmarks, in one readable file (gpt-fast's style): a Llama
(RMSNorm, RoPE, grouped-query attention over a static KV cache, SwiGLU MLP) and its Mixtral-style
MoE variant, with random weights built on the meta device and materialized once, so building a
16 GB model takes 16 GB.

``SHAPES`` names the configurations; ``build(name)`` returns the model. ``Decoder.forward(idx, pos,
caches)`` computes the logits of the last position of ``idx`` after writing its keys and values at
``pos`` into ``caches`` (one (k, v) pair of [1, kv_heads, max_seq, head_dim] per layer, made by
``new_caches``): a prefill passes the prompt, a decode step one token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    layers: int
    dim: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False  # the output projection is the token embedding (Llama-3.2-3B)
    experts: int = 0  # > 0: every MLP is a Mixtral-style MoE of this many experts
    top_k: int = 2
    max_seq: int = 128

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


SHAPES = {
    "llama3b": Shape(28, 3072, 8192, 24, 8, 128256, tied=True),  # Llama-3.2-3B: 3.2B parameters
    "llama8b": Shape(32, 4096, 14336, 32, 8, 128256),  # Llama-3-8B: 8.0B parameters
    "mixtral": Shape(2, 4096, 14336, 32, 8, 32000, experts=8),  # Mixtral-8x7B's layers, 2 of 32
    "tiny": Shape(2, 128, 256, 4, 2, 512, tied=True),  # for the test suite's run of the benchmark
    "tiny_moe": Shape(2, 128, 256, 4, 2, 512, experts=4),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [B, T, H, D]`` at the positions ``cos``/``sin [T, D/2]`` describe."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 1] * c + pairs[..., 0] * s], -1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        self.wq = nn.Linear(s.dim, s.heads * s.head_dim, bias=False)
        self.wk = nn.Linear(s.dim, s.kv_heads * s.head_dim, bias=False)
        self.wv = nn.Linear(s.dim, s.kv_heads * s.head_dim, bias=False)
        self.wo = nn.Linear(s.heads * s.head_dim, s.dim, bias=False)

    def forward(self, x, cos, sin, pos, mask, cache_k, cache_v):
        b, t, _ = x.shape
        s = self.s
        q = rope(self.wq(x).view(b, t, s.heads, s.head_dim), cos, sin).transpose(1, 2)
        k = rope(self.wk(x).view(b, t, s.kv_heads, s.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        cache_k.index_copy_(2, pos, k)
        cache_v.index_copy_(2, pos, v)
        rep = s.heads // s.kv_heads
        keys, values = cache_k.repeat_interleave(rep, dim=1), cache_v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, s.dim))


class MLP(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.w1 = nn.Linear(s.dim, s.ffn, bias=False)  # gate
        self.w3 = nn.Linear(s.dim, s.ffn, bias=False)  # up
        self.w2 = nn.Linear(s.ffn, s.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Mixtral's sparse MLP written around ``torch._grouped_mm``: a softmax top-k router, the
    (token, pick) pairs sorted by expert, [gate; up] and down grouped GEMMs, scaled, summed back."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        self.gate = nn.Linear(s.dim, s.experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(s.experts, 2 * s.ffn, s.dim))
        self.w2 = nn.Parameter(torch.empty(s.experts, s.dim, s.ffn))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.gate(x).float().softmax(-1)
        weights, ids = probs.topk(self.s.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        flat = ids.view(-1)
        perm = flat.argsort()
        counts = torch.histc(flat.float(), bins=self.s.experts, min=0, max=self.s.experts - 1)
        offs = counts.cumsum(0).to(torch.int32)
        xs = x[perm // self.s.top_k]
        gate, up = torch._grouped_mm(xs, self.w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offs)
        y = y * weights.view(-1)[perm].unsqueeze(-1)
        out = torch.empty_like(y)
        out[perm] = y
        return out.view(-1, self.s.top_k, shape[-1]).sum(1).view(shape)


class Block(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(s.dim), RMSNorm(s.dim)
        self.attention = Attention(s)
        self.feed_forward = MoE(s) if s.experts else MLP(s)

    def forward(self, x, cos, sin, pos, mask, cache_k, cache_v):
        x = x + self.attention(self.attention_norm(x), cos, sin, pos, mask, cache_k, cache_v)
        return x + self.feed_forward(self.ffn_norm(x))


class Decoder(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        self.tok_embeddings = nn.Embedding(s.vocab, s.dim)
        self.layers = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.norm = RMSNorm(s.dim)
        self.output = nn.Linear(s.dim, s.vocab, bias=False)
        if s.tied:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, idx: torch.Tensor, pos: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
        x = self.tok_embeddings(idx)
        cos, sin, mask = self.cos[pos], self.sin[pos], self.causal[pos]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, pos, mask, caches[2 * i], caches[2 * i + 1])
        return self.output(self.norm(x[:, -1:]))

    def new_caches(self) -> list[torch.Tensor]:
        s, dtype = self.s, self.tok_embeddings.weight.dtype
        return [torch.zeros(1, s.kv_heads, s.max_seq, s.head_dim, dtype=dtype) for _ in range(2 * s.layers)]


def build(name: str, dtype: torch.dtype = torch.bfloat16, layers: int | None = None, seed: int = 0) -> Decoder:
    """The model ``name`` of ``SHAPES`` (``layers`` overrides its depth) with random weights in
    ``dtype``: built on the meta device, then each parameter materialized and filled in place, so
    the process never holds more than one copy. Inference only: no parameter requires grad."""
    s = SHAPES[name] if layers is None else replace(SHAPES[name], layers=layers)
    with torch.device("meta"):
        model = Decoder(s).to(dtype)  # free on the meta device: only the cpu copy below is allocated
    model = model.to_empty(device="cpu")
    if s.tied:
        model.output.weight = model.tok_embeddings.weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                fan_in = p.shape[-1]
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
    half = s.head_dim // 2
    freqs = 1.0 / (500000.0 ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(s.max_seq, dtype=torch.float32), freqs)
    model.register_buffer("cos", angles.cos(), persistent=False)
    model.register_buffer("sin", angles.sin(), persistent=False)
    model.register_buffer("causal", torch.ones(s.max_seq, s.max_seq, dtype=torch.bool).tril(), persistent=False)
    return model.requires_grad_(False).eval()


def parameters_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameters (a tied weight counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
