"""FX routing of the MoE layers transformers 5 models emit, and the transformers integration.

Tiny Mixtral-, Qwen2-MoE- and DeepSeek-V3-like blocks from transformers itself: their graphs are the
patterns users' models produce.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_moe import H, I, close

import flashtune_compile as ft
from flashtune_compile.ops import routing
from flashtune_compile.ops.registry import op_name

pytest.importorskip(
    "transformers", minversion="5.23", reason="the graph patterns come from transformers >= 5.23 models"
)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles the same transformers forwards anew (no recompile-limit carry-over)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- FX routing of the patterns real models emit ----------------------------------------------


class Spy:
    """The flashtune backend, counting the flashtune ops each compiled graph holds."""

    def __init__(self, **options):
        self.options, self.counts, self.leftover = {"inner": "eager", **options}, [], set()

    def __call__(self, gm, example_inputs):
        fn = ft.backend(gm, example_inputs, options=self.options)
        names = {}
        for node in gm.graph.nodes:
            name = op_name(node)
            if name in ("moe", "grouped_mm", "linear", "bmm"):
                names[name] = names.get(name, 0) + 1
        self.counts.append(names)
        self.leftover |= {str(n.target) for n in gm.graph.nodes if n.op != "placeholder"} & {
            str(torch.sort),
            str(torch.histc),
            str(torch.bmm),
            str(torch.repeat_interleave),
            "repeat_interleave",
            str(torch.arange),
            str(torch.empty_like),
        }
        return fn


def _config(kind, impl, e=4, k=2, **kw):
    from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig

    if kind == "mixtral":
        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=e, num_experts_per_tok=k, **kw)
    elif kind == "qwen":
        cfg = Qwen2MoeConfig(
            hidden_size=H,
            moe_intermediate_size=I,
            shared_expert_intermediate_size=24,
            num_experts=e,
            num_experts_per_tok=k,
            norm_topk_prob=False,
            **kw,
        )
    else:
        groups = {"n_group": 2, "topk_group": 1, "n_shared_experts": 1, "routed_scaling_factor": 2.5}
        sizes = {"hidden_size": H, "moe_intermediate_size": I, "intermediate_size": 48, "n_routed_experts": e}
        cfg = DeepseekV3Config(**sizes, **groups, num_experts_per_tok=k, norm_topk_prob=True, **kw)
    cfg._experts_implementation = impl
    return cfg


def _block(kind, impl, dtype, e=4, k=2):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cls = {"mixtral": MixtralSparseMoeBlock, "qwen": Qwen2MoeSparseMoeBlock, "deepseek": DeepseekV3MoE}[kind]
    torch.manual_seed(0)
    block = cls(_config(kind, impl, e, k))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if kind == "deepseek":
        block.gate.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, e))
    return block.to(dtype).eval()


def _router_untouched(dtype):
    """In bf16 a tuned router linear (e.g. computed in fp32) may round differently and flip a
    near-tie in top-k, which changes the output by a whole expert: route only the MoE layer."""
    return {"ops": {"moe"}} if dtype != torch.float32 else {}


def _compare(block, dtype, tokens, spy, dynamic=True):
    compiled = torch.compile(block, backend=spy, fullgraph=True, dynamic=dynamic)
    with torch.no_grad():
        for t in tokens:
            x = torch.randn(1, t, H).to(dtype)
            ref, out = block(x), compiled(x)
            ref = ref[0] if isinstance(ref, tuple) else ref
            out = out[0] if isinstance(out, tuple) else out
            assert out.shape == ref.shape and close(out, ref, dtype), t


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixtral_block_is_routed_to_one_moe_op(tuner, impl, dtype):
    spy = Spy(**_router_untouched(dtype))
    _compare(_block("mixtral", impl, dtype), dtype, [1, 5, 9, 16], spy)
    assert spy.counts and all(c.get("moe") == 1 and "grouped_mm" not in c and "bmm" not in c for c in spy.counts)
    assert not spy.leftover  # the sort, histc, gathers and bmm of the replaced layer are gone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["qwen", "deepseek"])
def test_qwen_and_deepseek_blocks_with_shared_experts(tuner, kind, dtype):
    """Qwen-MoE: no renormalization, a gated shared expert beside; DeepSeek-V3: sigmoid scores
    with a correction bias, grouped top-k, shared experts, routed scaling."""
    spy = Spy(**_router_untouched(dtype))
    _compare(_block(kind, "grouped_mm", dtype, e=8, k=2), dtype, [1, 3, 11], spy)
    assert spy.counts and all(c.get("moe") == 1 for c in spy.counts)
    if dtype == torch.float32:
        assert all(c.get("linear", 0) >= 3 for c in spy.counts)


def test_top_k_equal_to_experts_and_zero_tokens(tuner):
    spy = Spy()
    _compare(_block("mixtral", "grouped_mm", torch.float32, e=4, k=4), torch.float32, [0, 3], spy, dynamic=False)
    assert spy.counts and all(c.get("moe") == 1 for c in spy.counts)


def test_inductor_inner_compiler(tuner):
    spy = Spy(inner="inductor")
    _compare(_block("mixtral", "grouped_mm", torch.float32), torch.float32, [2, 7], spy)
    assert all(c.get("moe") == 1 for c in spy.counts)


class GroupedCalls(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.w = torch.nn.Parameter(torch.randn(3, H, 8).bfloat16() * 0.3, requires_grad=False)

    def forward(self, x, offs):
        return self.fn(x, self.w, offs) * 2


@pytest.mark.parametrize("which", ["_grouped_mm", "F.grouped_mm", "transformers_fallback"])
def test_plain_grouped_mm_calls_are_routed(tuner, which):
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    fn = {
        "_grouped_mm": lambda x, w, o: torch._grouped_mm(x, w, offs=o),
        "F.grouped_mm": lambda x, w, o: F.grouped_mm(x, w, offs=o),
        "transformers_fallback": lambda x, w, o: torch.ops.transformers.grouped_mm_fallback(x, w, o),
    }[which]
    if which == "F.grouped_mm" and not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no F.grouped_mm")
    mod, spy = GroupedCalls(fn), Spy()
    compiled = torch.compile(mod, backend=spy, fullgraph=True)
    x = torch.randn(9, H).bfloat16()
    offs = torch.tensor([2, 2, 9], dtype=torch.int32)
    with torch.no_grad():
        assert close(compiled(x, offs), mod(x, offs), torch.bfloat16)
    assert spy.counts == [{"grouped_mm": 1}]


def test_training_graphs_leave_moe_alone(tuner):
    """With a gradient needed the layer is not routed (no autograd formula) and still trains."""
    block = _block("mixtral", "grouped_mm", torch.float32)
    for p in block.parameters():
        p.requires_grad_(True)
    spy, x = Spy(), torch.randn(1, 5, H)
    out = torch.compile(block, backend=spy, fullgraph=True)(x)
    out.sum().backward()
    got = block.experts.down_proj.grad.clone()
    block.zero_grad()
    block(x).sum().backward()
    assert torch.allclose(got, block.experts.down_proj.grad, atol=1e-5)
    assert all("moe" not in c for c in spy.counts)


def test_learned_routing_option_records_real_routing(tuner):
    spy = Spy(moe_routing="learned")
    _compare(_block("mixtral", "grouped_mm", torch.float32), torch.float32, [4, 8], spy)
    seen = routing.learned_routing().counts(4, 2)
    assert seen is not None and seen.sum() == (4 + 8) * 2


# -- the transformers integration -------------------------------------------------------------


def _causal_lm(impl):
    from transformers import MixtralConfig, MixtralForCausalLM

    sizes = {"vocab_size": 64, "hidden_size": H, "intermediate_size": I, "num_hidden_layers": 2}
    cfg = MixtralConfig(
        **sizes, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
    )
    torch.manual_seed(0)
    return MixtralForCausalLM._from_config(copy.deepcopy(cfg), experts_implementation=impl).eval()


def test_transformers_integration_calls_the_fused_op_fullgraph(tuner):
    from flashtune_compile.integrations import transformers as ft_hf

    ft_hf.register()
    model, ref = _causal_lm("flashtune"), _causal_lm("grouped_mm")
    ref.load_state_dict(model.state_dict())
    assert model.config._experts_implementation == "flashtune"
    spy = Spy()
    compiled = torch.compile(model, backend=spy, fullgraph=True, dynamic=True)
    with torch.no_grad():
        ids = torch.randint(0, 64, (1, 6))
        assert close(model(ids).logits, ref(ids).logits, torch.float32)  # eager: the op, tuned
        assert ft.stats()["misses"] > 0
        for t in (6, 9):
            ids = torch.randint(0, 64, (1, t))
            assert close(compiled(ids).logits, ref(ids).logits, torch.float32)
    assert spy.counts and all(c.get("moe") == 2 for c in spy.counts)


def test_transformers_integration_falls_back_for_training(tuner):
    from flashtune_compile.integrations import transformers as ft_hf

    ft_hf.register()
    model, ref = _causal_lm("flashtune").train(), _causal_lm("grouped_mm").train()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (1, 5))
    model(ids).logits.sum().backward()
    ref(ids).logits.sum().backward()
    w, w_ref = model.model.layers[0].mlp.experts.gate_up_proj, ref.model.layers[0].mlp.experts.gate_up_proj
    assert torch.allclose(w.grad, w_ref.grad, atol=1e-5)
    assert ft.stats()["misses"] == 0 and ft.stats()["hits"] == 0  # never reached the tuned op


def test_transformers_integration_rejects_unknown_options():
    from flashtune_compile.integrations import transformers as ft_hf

    with pytest.raises(ValueError, match="inner"):
        ft_hf.register({"inner": "eager"})


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_experts_module_with_symbolic_top_k_is_routed(tuner, impl):
    """A standalone experts module under dynamic=True sees top-k as a symbol (``perm // s1``)."""
    experts = _block("mixtral", impl, torch.float32).experts
    spy = Spy()
    compiled = torch.compile(experts, backend=spy, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t, k in ((3, 2), (5, 2), (6, 3)):
            x, ids = torch.randn(t, H, generator=g), torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(t)])
            weights = torch.rand(t, k, generator=g)
            assert close(compiled(x, ids, weights), experts(x, ids, weights), torch.float32)
    assert spy.counts and all(c.get("moe") == 1 for c in spy.counts)


def test_a_layer_left_alone_is_left_exactly_as_captured(tuner):
    """Matching has no side effects: when the fused op does not serve a matched layer (here a
    gradient is needed), the MoE pass changes nothing in the graph."""
    from flashtune_compile.ops import SiteOptions
    from flashtune_compile.passes import moe

    block = _block("mixtral", "grouped_mm", torch.float32)
    for p in block.parameters():
        p.requires_grad_(True)
    seen = []

    def backend(gm, example_inputs):
        before = [n.format_node() for n in gm.graph.nodes]
        routed = moe.rewrite(gm, frozenset({"moe"}), SiteOptions())
        seen.append((routed, before, [n.format_node() for n in gm.graph.nodes]))
        return gm.forward

    torch.compile(block, backend=backend, fullgraph=True)(torch.randn(1, 5, H))
    ((routed, before, after),) = seen
    assert routed == 0 and after == before
    with torch.no_grad():  # the same layer, served: routed (so the pattern did match above)
        torch._dynamo.reset()
        torch.compile(block, backend=backend, fullgraph=True)(torch.randn(1, 5, H))
    assert seen[1][0] == 1
