"""``ft.freeze``: linears store their weight once, packed, and compute what they did; tied and shared
weights keep their layout; nothing reads the pack as a weight; state_dict and unfreeze give the
original values back."""

import logging

import pytest
import torch
import torch.nn as nn

import flashtune_compile as ft
from flashtune_compile.freeze import FrozenLinear
from flashtune_compile.kernels.cpp import load_blocked_gemm


class Tiny(nn.Module):
    """An embedding tied to the output projection, two linears (one with a bias) and a linear that
    two modules share: what freeze must freeze, and what it must leave alone."""

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(50, 32, dtype=dtype)
        self.up = nn.Linear(32, 96, dtype=dtype)
        self.down = nn.Linear(96, 32, bias=False, dtype=dtype)
        self.shared_a = nn.Linear(32, 32, bias=False, dtype=dtype)
        self.shared_b = nn.Linear(32, 32, bias=False, dtype=dtype)
        self.shared_b.weight = self.shared_a.weight
        self.out = nn.Linear(32, 50, bias=False, dtype=dtype)
        self.out.weight = self.embed.weight
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)

    def forward(self, idx):
        h = self.embed(idx)
        h = h + self.down(torch.relu(self.up(h)))
        h = self.shared_b(self.shared_a(h))
        return self.out(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_freeze_keeps_what_the_model_computes_and_leaves_tied_weights(tuner, dtype):
    model = Tiny(dtype).requires_grad_(False)
    idx = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        want = model(idx)
    weights = {n: model.get_submodule(n).weight.clone() for n in ("up", "down")}
    pairs = dtype == torch.bfloat16 and load_blocked_gemm().bf16_pairs  # the vdpbf16ps layout where the CPU has it
    report = ft.freeze(model, layout=(2, int(pairs)) if dtype == torch.bfloat16 else (4, 0))
    assert report.frozen == 2 and {type(model.up), type(model.down)} == {FrozenLinear}
    kept = dict(report.kept)
    assert set(kept) == {"shared_a", "shared_b", "out"} and all("tied" in why for why in kept.values())
    assert report.freed_bytes == sum(w.numel() * w.element_size() for w in weights.values())
    names = {n for n, _ in model.named_parameters()}
    assert "up.weight" not in names and "down.weight" not in names and "up.bias" in names
    with torch.no_grad():
        got = model(idx)  # eager: the frozen linears run packed_linear, tuned like any op
    torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)
    with pytest.raises(AttributeError):
        print(model.up.weight)  # nothing reads the pack as if it were the weight
    assert not hasattr(model.down, "weight") and "frozen packed by flashtune" in repr(model.up)
    state = model.state_dict()  # the weights unpacked, exactly
    assert torch.equal(state["up.weight"], weights["up"]) and torch.equal(state["down.weight"], weights["down"])
    assert ft.unfreeze(model) == 2 and type(model.up) is nn.Linear
    assert torch.equal(model.up.weight, weights["up"]) and isinstance(model.down.weight, nn.Parameter)


def test_frozen_model_compiles_and_loads_state(tuner):
    torch._dynamo.reset()
    model = Tiny(torch.float32).requires_grad_(False)
    ft.freeze(model)
    idx = torch.randint(0, 50, (2, 7))
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options={"inner": "eager"})
    with torch.no_grad():
        want = model(idx)
        torch.testing.assert_close(compiled(idx), want)
        torch.testing.assert_close(compiled(idx[:, :3]), model(idx[:, :3]))
    assert ft.stats()["routed_ops"] >= 5  # two packed_linear calls given the compile's site, three linears
    state = model.state_dict()
    state["up.weight"] = state["up.weight"] * 2
    model.load_state_dict(state)  # packs what it loads
    with torch.no_grad():
        assert not torch.allclose(model(idx), want)
    assert torch.equal(model.state_dict()["up.weight"], state["up.weight"])
    bad = dict(state, **{"down.weight": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match="size mismatch for down.weight"):
        model.load_state_dict(bad)


def test_frozen_weights_refuse_moves_and_report_what_stays_referenced(tuner, caplog):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).requires_grad_(False)
    held = model[2].weight  # a reference outside the model: its memory cannot be freed
    caplog.set_level(logging.WARNING, logger="flashtune")
    report = ft.freeze(model, layout=(2, 0))
    assert report.frozen == 2 and report.freed_bytes == 16 * 16 * 4
    assert "still referenced outside the model" in caplog.text
    model.eval().cpu().float()  # no-ops are fine
    with pytest.raises(RuntimeError, match="ft.unfreeze"):
        model.half()
    with pytest.raises(ValueError, match="layout"):
        ft.freeze(nn.Linear(4, 4), layout=(3, 0))
    del held
