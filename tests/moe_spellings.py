"""MoE layers as people write them by hand, for the data-flow matcher's tests and benchmarks.

Every block maps ``x [T, H]`` to ``[T, H]`` with a softmax top-k router and SiLU-gated experts;
they differ only in how the expert computation is spelled. ``twist`` makes a block that the
matcher must reject, because it computes something else than ``flashtune.moe``: ``"ungated"``
(no up projection multiplying the activated gate) or, for ``HandGroupedMM``, ``"other_offsets"``
(the down GEMM groups its rows by other offsets).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Router(nn.Module):
    def __init__(self, e, k, h, dtype):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(h, e, bias=False).to(dtype)

    def route(self, x):
        probs = self.gate(x).float().softmax(-1)
        weights, ids = probs.topk(self.k, dim=-1)
        return (weights / weights.sum(-1, keepdim=True)).to(x.dtype), ids


class HandGroupedMM(_Router):
    """Mixtral-style around ``torch._grouped_mm``: argsort of the flat ids, histc + cumsum
    offsets, a gather, [gate; up] weights passed as ``w.transpose(1, 2)``, chunked SiLU gate,
    scaling, index-put back to pair order, sum over the picks."""

    def __init__(self, e, k, h, i, dtype, twist=None):
        super().__init__(e, k, h, dtype)
        self.e, self.twist = e, twist
        g = torch.Generator().manual_seed(1)
        self.w13 = nn.Parameter((torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(dtype))
        self.w2 = nn.Parameter((torch.randn(e, h, i, generator=g) / i**0.5).to(dtype))

    def forward(self, x):
        t, h = x.shape
        weights, ids = self.route(x)
        flat = ids.view(-1)
        perm = flat.argsort()
        counts = torch.histc(flat.float(), bins=self.e, min=0, max=self.e - 1)
        offs = counts.cumsum(0).to(torch.int32)
        xs = x[perm // self.k]
        gu = torch._grouped_mm(xs, self.w13.transpose(1, 2), offs=offs)
        gate, up = gu.chunk(2, dim=-1)
        act = F.silu(gate) * up if self.twist != "ungated" else F.silu(gu[:, : gu.shape[1] // 2])
        offs2 = offs if self.twist != "other_offsets" else offs.flip(0).cumsum(0).to(torch.int32)
        y = torch._grouped_mm(act, self.w2.transpose(1, 2), offs=offs2)
        y = y * weights.view(-1)[perm].unsqueeze(-1)
        out = torch.empty_like(y)
        out[perm] = y
        return out.view(t, self.k, h).sum(1)


class TitanGroupedExperts(_Router):
    """torchtitan's routed experts: histc counts and an argsort of the flat ids, scores sorted
    with them, tokens gathered (``perm // k``), grouped GEMMs with separate gate (w1) and up (w3)
    weights and int32 offsets from ``cumsum(dtype=int32)``, scores applied to the expert output,
    and a ``scatter_add`` back onto the tokens."""

    def __init__(self, e, k, h, i, dtype, twist=None):
        super().__init__(e, k, h, dtype)
        self.e, self.twist = e, twist
        g = torch.Generator().manual_seed(2)
        self.w1 = nn.Parameter((torch.randn(e, i, h, generator=g) / h**0.5).to(dtype))
        self.w2 = nn.Parameter((torch.randn(e, h, i, generator=g) / i**0.5).to(dtype))
        self.w3 = nn.Parameter((torch.randn(e, i, h, generator=g) / h**0.5).to(dtype))

    def forward(self, x):
        t, h = x.shape
        scores, ids = self.route(x)
        counts = torch.histc(ids.view(-1).float(), bins=self.e, min=0, max=self.e)
        perm = torch.argsort(ids.view(-1), stable=True)
        sorted_scores = scores.view(-1)[perm]
        token_idx = perm // self.k
        routed = x[token_idx]
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        hidden = F.silu(torch._grouped_mm(routed, self.w1.transpose(-2, -1), offs=offsets))
        if self.twist != "ungated":
            hidden = hidden * torch._grouped_mm(routed, self.w3.transpose(-2, -1), offs=offsets)
        out = torch._grouped_mm(hidden, self.w2.transpose(-2, -1), offs=offsets)
        out = (out.float() * sorted_scores.reshape(-1, 1)).to(x.dtype)
        return torch.zeros_like(x).scatter_add(0, token_idx.reshape(-1, 1).expand(-1, h), out)


class GptFastMoE(_Router):
    """gpt-fast's Mixtral: expert weights gathered by id, ``einsum`` per pick, and an ``einsum``
    with the routing weights to sum over the picks."""

    def __init__(self, e, k, h, i, dtype, twist=None):
        super().__init__(e, k, h, dtype)
        self.twist = twist
        g = torch.Generator().manual_seed(3)
        self.w1 = nn.Parameter((torch.randn(e, i, h, generator=g) / h**0.5).to(dtype))
        self.w2 = nn.Parameter((torch.randn(e, h, i, generator=g) / i**0.5).to(dtype))
        self.w3 = nn.Parameter((torch.randn(e, i, h, generator=g) / h**0.5).to(dtype))

    def forward(self, x):
        weights, ids = self.route(x)
        w1, w3, w2 = self.w1[ids], self.w3[ids], self.w2[ids]
        x1 = F.silu(torch.einsum("ti,taoi -> tao", x, w1))
        x3 = torch.einsum("ti, taoi -> tao", x, w3)
        inner = x1 * x3 if self.twist != "ungated" else x1 + x3
        outs = torch.einsum("tao, taio -> tai", inner, w2)
        return torch.einsum("tai,ta -> ti", outs, weights)


SPELLINGS = {"hand_grouped_mm": HandGroupedMM, "torchtitan": TitanGroupedExperts, "gpt_fast": GptFastMoE}
