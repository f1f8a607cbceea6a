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

    def stacked_experts(self, e, h, i, dtype, seed):
        """Stacked [gate; up] weights ``w13 [E, 2I, H]`` and down weights ``w2 [E, H, I]``, seeded."""
        g = torch.Generator().manual_seed(seed)
        self.w13 = nn.Parameter((torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(dtype))
        self.w2 = nn.Parameter((torch.randn(e, h, i, generator=g) / i**0.5).to(dtype))


class HandGroupedMM(_Router):
    """Mixtral-style around ``torch._grouped_mm``: argsort of the flat ids, histc + cumsum
    offsets, a gather, [gate; up] weights passed as ``w.transpose(1, 2)``, chunked SiLU gate,
    scaling, index-put back to pair order, sum over the picks."""

    def __init__(self, e, k, h, i, dtype, twist=None):
        super().__init__(e, k, h, dtype)
        self.e, self.twist = e, twist
        self.stacked_experts(e, h, i, dtype, seed=1)

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


@torch.library.custom_op("moe_spellings::combine", mutates_args=())
def combine(y: torch.Tensor, token: torch.Tensor, scores: torch.Tensor, tokens: int) -> torch.Tensor:
    """A combine op of our own, as a code base might write one: each grouped row scaled by its
    score (in fp32) and added onto its token."""
    out = torch.zeros(tokens, y.shape[1], dtype=torch.float32, device=y.device)
    out.index_add_(0, token, y.float() * scores.float().unsqueeze(1))
    return out.to(y.dtype)


@combine.register_fake
def _(y, token, scores, tokens):
    return y.new_empty((tokens, y.shape[1]))


class CustomCombine(_Router):
    """Invented: counts from ``one_hot``, ``sort`` for the order, ``index_select`` to group the
    tokens, stacked [gate; up] weights cast with ``.to(dtype)`` before the transpose, tanh-GELU,
    and the combine done by a custom op the matcher cannot know (``moe_spellings::combine``)."""

    def __init__(self, e, k, h, i, dtype, twist=None):
        super().__init__(e, k, h, dtype)
        self.e, self.twist = e, twist
        self.stacked_experts(e, h, i, dtype, seed=4)

    def forward(self, x):
        t, h = x.shape
        scores, ids = self.route(x)
        flat = ids.reshape(-1)
        _, perm = torch.sort(flat, stable=True)
        offs = F.one_hot(flat, self.e).sum(0).cumsum(0).int()
        token = perm // self.k
        rows = x.index_select(0, token)
        gu = torch._grouped_mm(rows, self.w13.to(x.dtype).transpose(1, 2), offs=offs)
        gate, up = gu.chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh")
        h_ = act * up if self.twist != "ungated" else act
        y = torch._grouped_mm(h_, self.w2.to(x.dtype).transpose(1, 2), offs=offs)
        return torch.ops.moe_spellings.combine(y, token, scores.reshape(-1)[perm], t)


class TorchtitanRelease(nn.Module):
    """torchtitan 0.3.0's own MoE layer as a user builds it (``make_moe_config``, softmax top-k
    router, grouped experts with separate w1 / w3, ``comm_backend="standard"`` dispatch, combine by
    ``torch.ops.torchtitan.deterministic_scatter_add``), called on ``x [T, H]``. Raises ImportError
    where torchtitan is not installed. Weights are N(0, ``std``), as torchtitan initialises them."""

    def __init__(self, e, k, h, i, dtype, twist=None, std=0.02):
        super().__init__()
        from torchtitan.models.common.config_utils import (
            make_moe_config,
            make_router_config,
            make_token_dispatcher_config,
        )
        from torchtitan.models.common.moe import GroupedExperts, RoutedExperts

        def init(t):
            return nn.init.normal_(t, std=std)

        router = make_router_config(
            dim=h, num_experts=e, gate_param_init={"weight": init}, top_k=k, score_func="softmax"
        )
        experts = RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(
                dim=h,
                hidden_dim=i,
                num_experts=e,
                param_init={"w1_EFD": init, "w2_EDF": init, "w3_EFD": init},
            ),
            token_dispatcher=make_token_dispatcher_config(num_experts=e, top_k=k, comm_backend="standard"),
        )
        cfg = make_moe_config(num_experts=e, router=router, routed_experts=experts, load_balance_coeff=None)
        self.moe = cfg.build()
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():
            for p in self.moe.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
        self.moe.to(dtype)

    def forward(self, x):
        return self.moe(x.unsqueeze(0)).squeeze(0)


SPELLINGS = {
    "hand_grouped_mm": HandGroupedMM,
    "torchtitan": TitanGroupedExperts,
    "gpt_fast": GptFastMoE,
    "custom_combine": CustomCombine,
    "torchtitan_release": TorchtitanRelease,
}
