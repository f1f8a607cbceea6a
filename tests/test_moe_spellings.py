"""MoE layers written by hand (tests/moe_spellings.py) compile to one ``flashtune.moe`` when the
matcher recognises their data flow, and stay as they were (routed per node where a node can be),
still equal to eager, when a twist makes them compute something else. transformers' own two
patterns are tested in test_moe_models.py.

The ``torch._grouped_mm`` spellings run in bf16 only: that op has no fp32 meta function, so an fp32
block of those spellings cannot be compiled at all (Dynamo raises before any pass of ours runs)."""

import pytest
import torch
from moe_spellings import SPELLINGS
from test_moe import close

import flashtune_compile as ft
from flashtune_compile.ops.registry import op_name

E, K, H, I = 8, 2, 32, 16  # 8 experts: T = 1 and T = 3 leave some with no tokens
CASES = [
    ("hand_grouped_mm", torch.bfloat16),
    ("torchtitan", torch.bfloat16),
    ("gpt_fast", torch.float32),
    ("gpt_fast", torch.bfloat16),
]
# Blocks whose dispatch or combine the matcher does not know (a custom op, torchtitan's release):
# only their grouped experts become one ``flashtune.moe``; the rest stays as the model wrote it.
EXPERTS_ONLY = [("custom_combine", torch.bfloat16), ("torchtitan_release", torch.bfloat16)]


class Counting:
    """The flashtune backend, counting the flashtune ops of each compiled graph."""

    def __init__(self, inner="eager"):
        self.counts, self.targets, self.inner = [], [], inner

    def __call__(self, gm, example_inputs):
        fn = ft.backend(gm, example_inputs, options={"inner": self.inner, "ops": {"moe"}})
        names = {}
        for node in gm.graph.nodes:
            name = op_name(node)
            if name is not None:
                names[name] = names.get(name, 0) + 1
        self.counts.append(names)
        self.targets.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return fn


def _block(spelling, dtype, twist=None):
    """The spelling's block; skips (saying why) where torchtitan's release cannot be imported."""
    if spelling == "torchtitan_release":
        try:
            import torchtitan.models.common.moe  # noqa: F401
        except Exception as e:  # ImportError, or a torch too old or too new for it
            pytest.skip(f"torchtitan 0.3.0 does not import with this torch: {e!r}")
    return SPELLINGS[spelling](E, K, H, I, dtype, twist=twist)


def _run(spelling, dtype, tokens, twist=None, inner="eager", spy=None):
    """Compile the block, check compiled == eager at each token count; the ops of each graph."""
    torch._dynamo.reset()
    block = _block(spelling, dtype, twist)
    spy = spy or Counting(inner)
    compiled = torch.compile(block, backend=spy, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in tokens:
            x = torch.randn(t, H, generator=g).to(dtype)
            ref, out = block(x), compiled(x)
            assert out.shape == ref.shape and close(out, ref, dtype), (spelling, t)
    return spy.counts


@pytest.mark.parametrize("tokens", [(1,), (3, 16)], ids=["T1", "T3,16"])
@pytest.mark.parametrize("spelling,dtype", CASES, ids=[f"{s}-{str(d)[6:]}" for s, d in CASES])
def test_each_spelling_becomes_one_moe_op(tuner, spelling, dtype, tokens):
    counts = _run(spelling, dtype, tokens)
    assert counts and all(c == {"moe": 1} for c in counts), counts
    assert ft.stats()["misses"] >= 1  # the fused op ran and tuned its buckets


@pytest.mark.parametrize("spelling", ["torchtitan", "gpt_fast"])
def test_separate_gate_and_up_weights_under_inner_inductor(tuner, spelling):
    """The separate up weight reaches Inductor's call of the op as an optional tensor argument."""
    dtype = torch.bfloat16 if spelling == "torchtitan" else torch.float32
    counts = _run(spelling, dtype, (3, 16), inner="inductor")
    assert counts and all(c == {"moe": 1} for c in counts), counts


TWISTS = [
    ("hand_grouped_mm", "other_offsets", {"grouped_mm": 2}),  # the down GEMM groups rows differently
    ("hand_grouped_mm", "ungated", {"grouped_mm": 2}),  # silu(gate) without the up half
    ("torchtitan", "ungated", {"grouped_mm": 2}),
    ("gpt_fast", "ungated", {}),  # silu(gate) + up: einsums stay as they are
]


@pytest.mark.parametrize("spelling,twist,left", TWISTS, ids=[f"{s}-{t}" for s, t, _ in TWISTS])
def test_a_twisted_block_is_left_per_node_and_still_equals_eager(tuner, spelling, twist, left):
    dtype = torch.float32 if spelling == "gpt_fast" else torch.bfloat16
    counts = _run(spelling, dtype, (3, 16), twist=twist)
    assert counts and all(c == left for c in counts), counts


COMBINES = {"custom_combine": "moe_spellings.combine", "torchtitan_release": "torchtitan.deterministic_scatter_add"}


@pytest.mark.parametrize("tokens", [(1,), (3, 16)], ids=["T1", "T3,16"])
@pytest.mark.parametrize("spelling,dtype", EXPERTS_ONLY, ids=[s for s, _ in EXPERTS_ONLY])
def test_experts_become_one_moe_op_whatever_dispatches_and_combines_them(tuner, spelling, dtype, tokens):
    spy = Counting()
    counts = _run(spelling, dtype, tokens, spy=spy)
    assert counts and all(c == {"moe": 1} for c in counts), counts
    assert all(any(t.startswith(COMBINES[spelling]) for t in seen) for seen in spy.targets)  # combine kept
    assert not any("_grouped_mm" in t for seen in spy.targets for t in seen)  # no GEMM left unfused
    assert ft.stats()["misses"] >= 1


def test_experts_with_a_custom_combine_under_inner_inductor(tuner):
    """Inductor compiles the rows' expert ids (searchsorted of the offsets) around the fused op."""
    counts = _run("custom_combine", torch.bfloat16, (3, 16), inner="inductor")
    assert counts and all(c == {"moe": 1} for c in counts), counts


def test_experts_with_a_custom_combine_but_no_up_projection_stay_as_they_are(tuner):
    counts = _run("custom_combine", torch.bfloat16, (3, 16), twist="ungated")
    assert counts and all(c == {"grouped_mm": 2} for c in counts), counts


class _GroupedExpertsOnly(torch.nn.Module):
    """Only the experts, on rows and offsets given: the down GEMM's rows past the last offset
    are rows no expert covers."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w1 = torch.nn.Parameter(torch.randn(E, I, H, generator=g).bfloat16() / H**0.5)
        self.w3 = torch.nn.Parameter(torch.randn(E, I, H, generator=g).bfloat16() / H**0.5)
        self.w2 = torch.nn.Parameter(torch.randn(E, H, I, generator=g).bfloat16() / I**0.5)

    def forward(self, rows, offs):
        gate = torch._grouped_mm(rows, self.w1.transpose(-2, -1), offs=offs)
        up = torch._grouped_mm(rows, self.w3.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(torch.nn.functional.silu(gate) * up, self.w2.transpose(-2, -1), offs=offs)


def test_rows_no_expert_covers_come_out_zero(tuner):
    """``torch._grouped_mm`` leaves such rows unwritten (whatever the memory held); the fused op
    writes zeros, and every covered row equals eager's."""
    torch._dynamo.reset()
    block, spy = _GroupedExpertsOnly(), Counting()
    compiled = torch.compile(block, backend=spy, fullgraph=True)
    g = torch.Generator().manual_seed(8)
    rows = torch.randn(12, H, generator=g).bfloat16()
    offs = torch.tensor([1, 1, 3, 4, 4, 6, 8, 9], dtype=torch.int32)  # rows 9..11: no expert
    with torch.no_grad():
        ref, out = block(rows, offs), compiled(rows, offs)
    assert spy.counts == [{"moe": 1}]
    assert close(out[:9], ref[:9], torch.bfloat16)
    assert torch.equal(out[9:], torch.zeros_like(out[9:]))
