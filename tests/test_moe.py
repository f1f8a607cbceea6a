"""The MoE ops, their candidates, skewed routing synthesis, and the FX routing of MoE layers."""

from __future__ import annotations

import pytest
import torch

import flashtune_compile as ft
from flashtune_compile.kernels.moe import ACTIVATIONS
from flashtune_compile.ops import SiteOptions, SiteSpec, routing, runners_for
from flashtune_compile.tuner.runner import BucketProfile

H, I = 32, 16  # hidden, intermediate (tiny: the suite runs on 2 CPU cores)


def reference_moe(x, weights, ids, w1, w2, activation="silu"):
    """Token by token, pick by pick, in the op's documented dtypes."""
    act, (t_count, k), e_count = ACTIVATIONS[activation], ids.shape, w1.shape[0]
    rdtype = torch.result_type(x, weights)
    out = torch.zeros(t_count, x.shape[1], dtype=rdtype)
    for t in range(t_count):
        for j in range(k):
            e = int(ids[t, j])
            if 0 <= e < e_count:
                g = (x[t : t + 1] @ w1[e].t()).to(x.dtype)
                h = act(g[:, : w2.shape[2]]) * g[:, w2.shape[2] :]
                y = (h @ w2[e].t()).to(x.dtype)
                out[t] += (y[0] * weights[t, j]).to(rdtype)
    return out.to(x.dtype)


def moe_site(e, k, dtype, wdtype=None, kernels=("aten", "cpu"), routing_kind="zipf", tune=None):
    wd = str(wdtype or dtype).removeprefix("torch.")
    d = str(dtype).removeprefix("torch.")
    sig = [[[-1, H], d], [[-1, k], wd], [[-1, k], "int64"], [[e, 2 * I, H], d], [[e, H, I], d], None, None]
    options = SiteOptions(tune=tune, kernels=kernels, routing=routing_kind)
    return SiteSpec("moe", ((((0, 0), (1, 0), (2, 0)), 1, 4096),), sig, options).encode()


def make_layer(e, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.nn.Parameter((torch.randn(e, 2 * I, H, generator=g) * 0.2).to(dtype), requires_grad=False)
    w2 = torch.nn.Parameter((torch.randn(e, H, I, generator=g) * 0.2).to(dtype), requires_grad=False)
    return w1, w2


def close(a, b, dtype):
    if b.numel() == 0:
        return a.shape == b.shape
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    scale = max(float(b.float().abs().max()), 1.0)
    return float((a.float() - b.float()).abs().max()) <= tol * scale


# -- the op and its candidates ----------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["stacked", "split_gate_up"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,k", [(0, 2), (1, 2), (5, 2), (7, 4)])
def test_every_candidate_matches_the_reference(tuner, dtype, tokens, k, split):
    """Each runner and tactic; expert 3 of 4 gets no token; top-k = E in the last case; one id out
    of range is dropped. ``split``: the gate and up weights as two parameters (``w3``)."""
    e = 4
    w1, w2 = make_layer(e, dtype)
    gate = up = None
    if split:
        gate = torch.nn.Parameter(w1[:, :I].clone(), requires_grad=False)
        up = torch.nn.Parameter(w1[:, I:].clone(), requires_grad=False)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g).to(dtype)
    ids = (
        torch.stack([torch.randperm(e if k == e else 3, generator=g)[:k] for _ in range(tokens)])
        if tokens
        else torch.zeros(0, k, dtype=torch.long)
    )
    if tokens >= 5:
        ids[2, 0] = e  # out of range: contributes nothing
    weights = torch.softmax(torch.randn(tokens, k, generator=g), -1)
    ref = reference_moe(x, weights, ids, w1, w2)
    inputs = (x, weights, ids, gate, w2, "silu", up) if split else (x, weights, ids, w1, w2, "silu", None)
    shapes = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in inputs)
    tried = 0
    for runner in runners_for("moe", ["aten", "cpu"]):
        for tactic in runner.get_valid_tactics(inputs, BucketProfile((tokens,), shapes)):
            out = runner.forward(inputs, tactic)
            assert out.dtype == dtype and out.shape == (tokens, H)
            assert close(out, ref, dtype), (runner.name, tactic)
            tried += 1
    assert tried >= (3 if dtype == torch.bfloat16 else 2)
    if not split:
        out = torch.ops.flashtune.moe(x, weights, ids, w1, w2, "silu", None, moe_site(e, k, dtype, torch.float32))
        assert close(out, ref, dtype)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_gelu_activations_and_transposed_weights(tuner, activation):
    w1, w2 = make_layer(4, torch.float32)
    w1t = torch.nn.Parameter(w1.detach().transpose(-2, -1).contiguous(), requires_grad=False)
    x, ids = torch.randn(6, H), torch.randint(0, 4, (6, 2))
    weights = torch.rand(6, 2)
    ref = reference_moe(x, weights, ids, w1, w2, activation)
    out = torch.ops.flashtune.moe(
        x, weights, ids, w1t.transpose(-2, -1), w2, activation, None, moe_site(4, 2, torch.float32)
    )
    assert close(out, ref, torch.float32)


def test_grouped_mm_op_matches_torch_grouped_mm(tuner):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, H, generator=g).to(torch.bfloat16)
    w = torch.nn.Parameter(torch.randn(3, H, 8, generator=g).to(torch.bfloat16), requires_grad=False)
    offs = torch.tensor([4, 4, 9], dtype=torch.int32)  # expert 1 empty; row 9 belongs to no expert
    ref = torch._grouped_mm(x, w, offs=offs)
    sig = [[[-1, H], "bfloat16"], [[3, H, 8], "bfloat16"], [[3], "int32"]]
    site = SiteSpec("grouped_mm", ((((0, 0),), 1, 4096),), sig, SiteOptions(kernels=("aten", "cpu"))).encode()
    inputs = (x, w, offs)
    for runner in runners_for("grouped_mm", ["aten", "cpu"]):
        for tactic in runner.get_valid_tactics(inputs, BucketProfile((10,), ((10, H), (3, H, 8), (3,)))):
            out = runner.forward(inputs, tactic)
            assert close(out[:9], ref[:9], torch.bfloat16), (runner.name, tactic)
            assert out[9].abs().max() == 0
    assert close(torch.ops.flashtune.grouped_mm(x, w, offs, site)[:9], ref[:9], torch.bfloat16)


def test_bad_inputs_get_clear_errors(tuner):
    w1, w2 = make_layer(4, torch.float32)
    x, ids, weights = torch.randn(3, H), torch.randint(0, 4, (3, 2)), torch.rand(3, 2)
    site = moe_site(4, 2, torch.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.flashtune.moe(x, weights, ids, w1, w2, "relu", None, site)
    with pytest.raises(ValueError, match="shapes disagree"):
        torch.ops.flashtune.moe(x, weights[:2], ids[:2], w1, w2, "silu", None, site)
    with pytest.raises(ValueError, match="must be integers"):
        torch.ops.flashtune.moe(x, weights, ids.float(), w1, w2, "silu", None, site)


def test_gradients_flow_through_the_reference_formulation(tuner):
    """A call that needs a gradient runs the (untuned) ATen loop with autograd recording it."""
    w1, w2 = (torch.nn.Parameter(w.detach().clone()) for w in make_layer(4, torch.float32))
    x = torch.randn(5, H, requires_grad=True)
    ids, weights = torch.randint(0, 4, (5, 2)), torch.rand(5, 2, requires_grad=True)
    torch.ops.flashtune.moe(
        x, weights, ids, w1, w2, "silu", None, moe_site(4, 2, torch.float32)
    ).square().sum().backward()
    got = [t.grad.clone() for t in (x, weights, w1, w2)]
    for t in (x, weights, w1, w2):
        t.grad = None
    reference_moe(x, weights, ids, w1, w2).square().sum().backward()
    for a, t in zip(got, (x, weights, w1, w2)):
        assert torch.allclose(a, t.grad, atol=1e-4, rtol=1e-4)
    assert ft.stats()["profiles"] == 0


def test_tuning_keys_hold_experts_topk_sizes_and_dtype(tuner):
    """One bucket tunes once; another intermediate size or top-k is another cache entry."""
    for k in (1, 2):
        w1, w2 = make_layer(4, torch.bfloat16)
        x, ids, weights = torch.randn(6, H).bfloat16(), torch.randint(0, 4, (6, k)), torch.rand(6, k)
        site = moe_site(4, k, torch.bfloat16, torch.float32)
        for _ in range(3):
            torch.ops.flashtune.moe(x, weights, ids, w1, w2, "silu", None, site)
    keys = {str(e["shape_key"]) for e in _moe_entries()}
    assert len(keys) == 2 and ft.stats()["misses"] == 2
    assert all("[4, 32, 32]" in k.replace("(", "[").replace(")", "]") for k in keys)  # E, 2I, H in the key


def _moe_entries():
    return [e for e in ft.tactics() if e["op"] == "moe"]


# -- routing synthesis ------------------------------------------------------------------------


def _counts(ids, e):
    return torch.bincount(ids.reshape(-1), minlength=e)


def test_zipf_routing_is_skewed_with_idle_experts_and_distinct_picks():
    gen = torch.Generator().manual_seed(0)
    ids = routing.topk_ids("zipf", 4, 8, 64, torch.int64, torch.device("cpu"), gen)
    assert all(len(set(row.tolist())) == 8 for row in ids)  # top-k picks are distinct
    counts = _counts(ids, 64)
    assert (counts == 0).sum() >= 20  # at 4 tokens most of 64 experts are idle
    big = routing.topk_ids("zipf", 4096, 2, 8, torch.int64, torch.device("cpu"), gen)
    c = _counts(big, 8).sort(descending=True).values.float()
    assert c[0] > 3 * c[-1]
    uniform = _counts(routing.topk_ids("uniform", 4096, 2, 8, torch.int64, torch.device("cpu"), gen), 8).float()
    assert uniform.max() < 1.2 * uniform.min()


def test_learned_routing_follows_what_was_observed():
    learned = routing.LearnedRouting()
    gen = torch.Generator().manual_seed(0)
    assert learned.counts(8, 2) is None
    learned.observe(torch.tensor([[2, 5]] * 50 + [[1, 2]] * 5), 8)
    ids = routing.topk_ids("learned", 1000, 2, 8, torch.int64, torch.device("cpu"), gen, learned)
    c = _counts(ids, 8)
    assert c[2] > 800 and c[5] > 700 and c[[0, 3, 4, 6, 7]].sum() < 100


def test_routing_synthesis_leaves_the_user_rng_alone(tuner):
    w1, w2 = make_layer(4, torch.float32)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    x, ids, weights = torch.ones(5, H), torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 2)
    torch.ops.flashtune.moe(x, weights, ids, w1, w2, "silu", None, moe_site(4, 2, torch.float32))
    assert ft.stats()["synthesized"] > 0
    assert torch.equal(torch.rand(3), expected)


def test_bad_routing_option_is_named():
    with pytest.raises(ValueError, match="moe_routing"):
        ft.backend(torch.fx.symbolic_trace(torch.nn.Identity()), [], options={"moe_routing": "zipfian"})
