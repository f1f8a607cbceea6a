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


class Counting:
    """The flashtune backend, counting the flashtune ops of each compiled graph."""

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


def _run(spelling, dtype, tokens, twist=None, inner="eager"):
    """Compile the block, check compiled == eager at each token count; the ops of each graph."""
    torch._dynamo.reset()
    block = SPELLINGS[spelling](E, K, H, I, dtype, twist=twist)
    spy = Counting(inner)
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
