"""MoE layers written by hand (tests/moe_spellings.py) compile to one ``flashtune.moe`` when the
matcher recognises their data flow, and stay routed per node, still equal to eager, when a twist
makes them compute something else."""

import pytest
import torch
from moe_spellings import SPELLINGS, HandGroupedMM, TitanGroupedExperts
from test_moe import close

import flashtune_compile as ft
from flashtune_compile.ops.registry import op_name

E, K, H, I = 4, 2, 32, 16


class Counting:
    """The flashtune backend (inner eager), counting the flashtune ops of each compiled graph."""

    def __init__(self, inner="eager"):
        self.counts, self.inner = [], inner

    def __call__(self, gm, example_inputs):
        fn = ft.backend(gm, example_inputs, options={"inner": self.inner, "ops": {"moe"}})
        names = {}
        for node in gm.graph.nodes:
            name = op_name(node)
            if name is not None:
                names[name] = names.get(name, 0) + 1
        self.counts.append(names)
        return fn


def _run(block, tokens, dtype, inner="eager"):
    torch._dynamo.reset()
    spy = Counting(inner)
    compiled = torch.compile(block, backend=spy, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in tokens:
            x = torch.randn(t, H, generator=g).to(dtype)
            ref, out = block(x), compiled(x)
            assert out.shape == ref.shape and close(out, ref, dtype), t
    return spy.counts


@pytest.mark.parametrize("tokens", [(1,), (3, 16)])
def test_hand_written_grouped_mm_block_becomes_one_moe_op(tuner, tokens):
    """bf16 only: ``torch._grouped_mm`` has no fp32 meta function here, so an fp32 block of this
    spelling cannot be compiled at all (Dynamo raises before any pass of ours runs)."""
    counts = _run(HandGroupedMM(E, K, H, I, torch.bfloat16), tokens, torch.bfloat16)
    assert counts and all(c == {"moe": 1} for c in counts), counts


def test_experts_with_no_tokens(tuner):
    block = HandGroupedMM(8, K, H, I, torch.bfloat16)  # 3 tokens x 2 picks leave >= 2 of 8 idle
    counts = _run(block, (3,), torch.bfloat16)
    assert counts == [{"moe": 1}]


@pytest.mark.parametrize("twist", ["other_offsets", "ungated"])
def test_a_twisted_grouped_mm_block_is_left_per_node_and_still_equals_eager(tuner, twist):
    counts = _run(HandGroupedMM(E, K, H, I, torch.bfloat16, twist=twist), (3, 16), torch.bfloat16)
    assert counts and all("moe" not in c and c.get("grouped_mm") == 2 for c in counts), counts


@pytest.mark.parametrize("tokens", [(1,), (3, 16)])
def test_torchtitan_grouped_experts_become_one_moe_op(tuner, tokens):
    """Separate gate (w1) and up (w3) weights, histc with max=E, int32 cumsum, scores applied to
    the expert output in fp32, scatter_add back onto the tokens. bf16: see above."""
    counts = _run(TitanGroupedExperts(E, K, H, I, torch.bfloat16), tokens, torch.bfloat16)
    assert counts and all(c == {"moe": 1} for c in counts), counts


def test_torchtitan_block_under_inner_inductor(tuner):
    """The separate up weight reaches Inductor's call of the op as an optional tensor argument."""
    counts = _run(TitanGroupedExperts(E, K, H, I, torch.bfloat16), (3, 16), torch.bfloat16, inner="inductor")
    assert counts and all(c == {"moe": 1} for c in counts), counts


def test_torchtitan_ungated_is_left_per_node(tuner):
    counts = _run(TitanGroupedExperts(E, K, H, I, torch.bfloat16, twist="ungated"), (3, 16), torch.bfloat16)
    assert counts and all(c == {"grouped_mm": 2} for c in counts), counts


def test_gpt_fast_einsum_spelling_compiles_and_equals_eager(tuner):
    """Not yet fused: gpt-fast's einsums over gathered expert weights are left as they are."""
    counts = _run(SPELLINGS["gpt_fast"](E, K, H, I, torch.bfloat16), (3, 16), torch.bfloat16)
    assert counts and all(c == {} for c in counts), counts
