"""Training through the backend: every routed op's gradients while an optimizer changes the weights
(fp32 and bf16 autocast), weight copies made again after each step, and tuning that charges a copy
tactic its re-pack where the weights change between calls."""

import copy
import time

import pytest
import torch
import torch.nn as nn
from helpers import MMSlow

import flashtune_compile as ft
from flashtune_compile.kernels.cpp import load_blocked_gemm
from flashtune_compile.tuner.cache import Entry
from flashtune_compile.tuner.weights import admitting


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class EveryOp(nn.Module):
    """One call of each routed matmul op (linear, mm, addmm, bmm, baddbmm), all with parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.w = nn.Parameter(torch.randn(16, 16) / 4)
        self.b = nn.Parameter(torch.randn(16) / 4)
        self.w2 = nn.Parameter(torch.randn(16, 8) / 4)
        self.heads = nn.Parameter(torch.randn(2, 4, 4) / 2)
        self.bias3 = nn.Parameter(torch.randn(2, 1, 4) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [2, 5, 12]
        h = torch.tanh(self.fc(x)).flatten(0, 1)  # linear, 3-D input
        h = torch.tanh(torch.mm(h, self.w))  # mm
        h = torch.addmm(self.b[:8], h, self.w2)  # addmm  [10, 8]
        h = h.view(x.shape[0], x.shape[1], 8)[..., :4]  # [2, 5, 4]
        g = torch.bmm(h, self.heads)  # bmm
        return torch.baddbmm(self.bias3, torch.tanh(g), self.heads).square().mean()  # baddbmm


def _train(model, steps, batches, precision):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    grads = []
    for x in batches[:steps]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(x)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_every_routed_ops_gradients_match_eager_while_the_weights_change(tuner, inner, precision):
    """Three AdamW steps with dynamic sizes (so every op stays routed, its buckets tuned as they
    come): each step's gradients match eager's, so the ops saw each step's weights. Under bf16
    autocast the ops are routed too (their operands cast as autocast casts them)."""
    torch.manual_seed(0)
    model = EveryOp()
    twin = EveryOp()
    twin.load_state_dict(model.state_dict())
    batches = [torch.randn(2, 5 + i, 12) for i in range(3)]
    compiled = torch.compile(twin, backend="flashtune", dynamic=True, options={"inner": inner})
    want = _train(model, 3, batches, precision)
    got = _train(compiled, 3, batches, precision)
    assert ft.stats()["routed_ops"] == 5  # linear, mm, addmm, bmm, baddbmm
    for step, (g, w) in enumerate(zip(got, want)):
        for name, a, b in zip(dict(model.named_parameters()), g, w):
            # bf16: the tactics round differently (addmm or mm + add), and the steps compound it
            tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=5e-2 * b.abs().max())
            torch.testing.assert_close(a, b, **tol, msg=lambda m, s=step, n=name: f"step {s}, grad of {n}: {m}")


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_a_weight_copy_tactic_is_made_again_after_every_optimizer_step(tuner, inner):
    """Force the blocked kernel (it reads a packed copy of each weight) for the training graph's
    linears: every step's output matches eager on that step's weights, and each step packs each
    weight again at once (in training no call waits for its weight's calls: the step changes it)."""
    load_blocked_gemm()
    torch.manual_seed(0)
    model, twin = Mlp(), Mlp()
    twin.load_state_dict(model.state_dict())
    options = {"inner": inner, "kernels": {"aten", "cpu"}}
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    x = torch.randn(4, 64)
    torch.compile(copy.deepcopy(twin), backend="flashtune", options=options)(x)  # tunes while compiling
    keys = list(tuner.cache.snapshot())
    assert keys and all("weights change" in key[3] for key in keys)  # a training graph's buckets
    for key, entry in tuner.cache.snapshot().items():
        forced = Entry("cpu_blocked", (1, 2, 1, 0), 1e-6, entry.default_s)
        forced.fallback_runner, forced.fallback_tactic, forced.fallback_s = "cpu_rows", (1, 2, 0), 2e-6
        tuner.cache.put(key, forced)
    torch._dynamo.reset()
    ft.reset_stats()
    compiled = torch.compile(twin, backend="flashtune", options=options)
    store = tuner.weights
    for step in range(4):
        made = store.made
        out = compiled(x)
        model.load_state_dict(twin.state_dict())  # eager on this step's weights
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")
        assert store.made - made == 2, "each step packs the two changed weights again"
        out.square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert store.fallback_calls == 0
    assert ft.stats()["routed_ops"] == 2  # the forced winner is no default: both stay routed


def test_a_training_graph_hands_calls_tuned_no_faster_than_aten_back_to_aten(tuner, caplog):
    """With ATen's kernels alone and no bias (a linear's only tactic is then ATen's default), a
    training graph routes nothing: its calls run as Inductor would run them, and its gradients are
    eager's. The same model compiled for inference keeps its calls routed."""
    torch.manual_seed(0)
    model, twin = Mlp(), Mlp()
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(twin, backend="flashtune", options={"inner": "eager", "kernels": {"aten"}})
    x = torch.randn(4, 64)
    compiled(x).square().sum().backward()
    model(x).square().sum().backward()
    for a, b in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert ft.stats()["routed_ops"] == 0 and ft.stats()["handed_back"] == 2
    assert "2 handed back to ATen" in caplog.text
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(twin, backend="flashtune", options={"inner": "eager", "kernels": {"aten"}})(x)
    assert ft.stats()["routed_ops"] == 2


class SlowToCopy(ft.TunableRunner):
    """A candidate reading a copy of the weight (made through the tuner's store) that takes
    ``make_s`` to make and ``seconds`` per call once made."""

    name = "slow_to_copy"

    def __init__(self, store, seconds: float, make_s: float) -> None:
        self.store, self.seconds, self.make_s = store, seconds, make_s

    def copy_kind(self, tactic):
        return "slow_copy"

    def make(self, w):
        time.sleep(self.make_s)
        return w.t().contiguous()

    def forward(self, inputs, tactic=-1):
        x, w = inputs
        copy = admitting(self.store, lambda: self.store.get(w, "slow_copy", self.make, w.numel() * 4))
        time.sleep(self.seconds)
        return torch.mm(x, copy.t())


def test_where_weights_change_a_copy_tactic_is_timed_with_its_repack(tuner):
    """A copy tactic 5x faster than the default once made, but slow to make: in inference it wins;
    where the weights change between calls (a training graph's buckets) it is timed making its copy
    each call, and loses."""
    w = nn.Parameter(torch.randn(16, 16))
    x = torch.randn(4, 16)
    default, copying = MMSlow(seconds=1e-2), SlowToCopy(tuner.weights, seconds=2e-3, make_s=3e-2)
    dyn = (ft.DynamicDim(input_idx=0, dim_idx=0),)
    runner, _ = tuner.choose_one("infer", (default, copying), ft.TuningConfig(dynamic=dyn), (x, w))
    assert runner is copying
    runner, _ = tuner.choose_one("train", (default, copying), ft.TuningConfig(dynamic=dyn, weights_change=True), (x, w))
    assert runner is default
    (entry,) = [r for r in ft.tactics() if r["op"] == "train"]
    assert entry["timed"] == 2


def test_the_autocast_cast_is_part_of_the_routed_graph_and_its_gradient_reaches_fp32_weights(tuner):
    """Under bf16 autocast an fp32 model's linear is routed in bf16 (dynamic sizes: it stays routed
    whatever tuning finds); its fp32 weight gets an fp32 gradient equal to eager autocast's."""
    torch.manual_seed(0)
    model = nn.Linear(32, 8)
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options={"inner": "eager"})
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
    assert out.dtype == torch.bfloat16 and ft.stats()["routed_ops"] == 1
    out.float().square().sum().backward()
    got = model.weight.grad.clone()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
    want.float().square().sum().backward()
    torch.testing.assert_close(out, want)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, model.weight.grad)
