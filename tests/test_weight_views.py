"""Weight tactics for views of parameters computed in the graph (``w.t()``, ``w.T.T``, ``e[1]``,
``e.transpose(1, 2)``, ``w.expand(...)[i]``): offered, keyed by the parameter plus the view, and
never stale after ``w.mul_(2)`` or ``w.data = ...``."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashtune_compile as ft
from flashtune_compile.kernels.cpu import CpuLinearRunner
from flashtune_compile.kernels.grouped_mm import CpuGroupedMMRunner, grouped_loop
from flashtune_compile.tuner.runner import BucketProfile

VIEWS = {
    "t().t()": lambda p: p["w"].t().t(),
    "T.T": lambda p: p["w"].T.T,
    "select": lambda p: p["e"][1],
    "transpose+select": lambda p: p["e"].transpose(1, 2)[2].t(),
    "expand+select": lambda p: p["w"].expand(3, 12, 16)[1],
    "slice": lambda p: p["big"][4:16, 2:18],
}


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return {
        "w": nn.Parameter(torch.randn(12, 16, generator=g).to(dtype)),
        "e": nn.Parameter(torch.randn(4, 12, 16, generator=g).to(dtype)),
        "big": nn.Parameter(torch.randn(20, 20, generator=g).to(dtype)),
    }


def _ref(x, w):
    return F.linear(x.double(), w.double()).to(x.dtype)


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_weight_tactic_serves_a_view_and_follows_updates(tuner, view, dtype):
    params = _params(dtype)
    owner = next(p for p in params.values() if VIEWS[view](params)._base is p)
    x = torch.randn(5, 16).to(dtype)
    runner = CpuLinearRunner()
    w = VIEWS[view](params)
    tactics = runner.get_valid_tactics((x, w, None), BucketProfile((5,), ((5, 16), tuple(w.shape), None)))
    assert tactics, "no weight tactic offered for a view of a parameter"
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    copies = ft.AutoTuner.get().weights
    for tactic in tactics:
        torch.testing.assert_close(runner.forward((x, VIEWS[view](params), None), tactic), _ref(x, w), **tol)
        made = copies.made
        runner.forward((x, VIEWS[view](params), None), tactic)  # a new view object: served from the cache
        assert copies.made == made, tactic
        with torch.no_grad():
            owner.mul_(2)
        torch.testing.assert_close(
            runner.forward((x, VIEWS[view](params), None), tactic), _ref(x, VIEWS[view](params)), **tol
        )
        with torch.no_grad():
            owner.data = torch.randn(owner.shape).to(dtype)
        torch.testing.assert_close(
            runner.forward((x, VIEWS[view](params), None), tactic), _ref(x, VIEWS[view](params)), **tol
        )
        w = VIEWS[view](params)


def test_grouped_mm_weight_tactic_serves_a_transposed_expert_view(tuner):
    e = nn.Parameter(torch.randn(3, 24, 16).bfloat16())  # [E, N, K]; the GEMM reads it as [E, K, N]
    x = torch.randn(7, 16).bfloat16()
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)
    runner = CpuGroupedMMRunner()
    inputs = (x, e.transpose(1, 2), offs)
    assert runner.get_valid_tactics(inputs, BucketProfile((7,), ((7, 16), (3, 16, 24), (3,)))) == ["fp32_loop"]
    for _ in range(2):
        ref = grouped_loop(x.double(), e.transpose(1, 2).double(), offs).bfloat16()
        torch.testing.assert_close(runner.forward((x, e.transpose(1, 2), offs), "fp32_loop"), ref, rtol=2e-2, atol=2e-2)
        with torch.no_grad():
            e.mul_(2)


class ViewWeights(nn.Module):
    """Weights used through views computed in the forward."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(24, 32) / 6)
        self.w2 = nn.Parameter(torch.randn(32, 32) / 6)
        self.e = nn.Parameter(torch.randn(3, 32, 24) / 6)

    def forward(self, x):
        h = x @ self.w.t()  # [T, 24]
        h = h @ self.e[1].T  # [T, 32]
        return F.linear(h, self.w2.T.T) + torch.mm(x, self.w2.transpose(0, 1))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_compiled_views_are_routed_as_linears_with_weight_tactics_and_stay_fresh(tuner, inner):
    torch._dynamo.reset()
    model = ViewWeights()
    compiled = torch.compile(
        model, backend="flashtune", dynamic=False, options={"inner": inner, "kernels": {"aten", "cpu"}}
    )
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
        records = ft.tactics()
        assert {r["op"] for r in records} == {"linear"}  # every product above reads as x @ W.T
        with_copies = [r for r in records if "cpu_linear" in r["candidates"] and r["timed"] >= 3]
        # Inner Inductor hands the op ``e[1]`` as an alias with neither ``_base`` nor the
        # parameter's version counter, so no copy of it could be kept fresh: it gets none.
        assert len(with_copies) == (3 if inner == "eager" else 2), records
        model.w.mul_(2)
        model.e.data = torch.randn(3, 32, 24) / 6
        model.w2.mul_(-1)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
