"""backend="flashtune": routing the matmul family, options, symbolic buckets, recompiles."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flashtune_compile as ft
from flashtune_compile.ops import SiteSpec

EAGER = {"inner": "eager"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tol(dtype):
    return {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}


class Fn(nn.Module):
    """Wraps a function of (params..., inputs...) so parameters live on a module (as attributes
    p0, p1, ...: Dynamo 2.11 cannot trace unpacking an nn.ParameterList into a call)."""

    def __init__(self, fn, *params):
        super().__init__()
        self.fn, self.num_params = fn, len(params)
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", nn.Parameter(p, requires_grad=False))

    def forward(self, *xs):
        params = [getattr(self, f"p{i}") for i in range(self.num_params)]
        return self.fn(*params, *xs)


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


CASES = {
    "linear_bias_2d": (lambda w, b, x: F.linear(x, w, b), (r(24, 16), r(24)), (r(5, 16),)),
    "linear_nobias_3d": (lambda w, x: F.linear(x, w), (r(24, 16),), (r(2, 5, 16),)),
    "nn_linear_3d": (None, (), (r(3, 7, 16),)),
    "matmul_2d": (lambda w, x: x @ w, (r(16, 8),), (r(5, 16),)),
    "matmul_3d_2d": (lambda w, x: torch.matmul(x, w), (r(16, 8),), (r(2, 5, 16),)),
    "matmul_3d_3d": (lambda x, y: x.matmul(y), (), (r(3, 5, 16), r(3, 16, 4))),
    "mm_transposed_weight": (lambda w, x: torch.mm(x, w.t()), (r(8, 16),), (r(5, 16),)),
    "mm_noncontig_input": (lambda w, x: torch.mm(x[:, ::2], w), (r(8, 8),), (r(5, 16),)),
    "addmm_scaled": (lambda b, w, x: torch.addmm(b, x, w, beta=0.5, alpha=2.0), (r(8), r(16, 8)), (r(5, 16),)),
    "addmm_method_2d_bias": (lambda w, b, x: b.addmm(x, w), (r(16, 8),), (r(5, 8), r(5, 16))),
    "bmm": (lambda x, y: torch.bmm(x, y), (), (r(3, 5, 16), r(3, 16, 4))),
    "bmm_transposed": (lambda x, y: torch.bmm(x, y.transpose(1, 2)), (), (r(3, 5, 16), r(3, 4, 16))),
    "baddbmm": (
        lambda b, x, y: torch.baddbmm(b, x, y, beta=0.25, alpha=3.0),
        (r(1, 5, 4),),
        (r(3, 5, 16), r(3, 16, 4)),
    ),
}


def build(name, dtype):
    fn, params, inputs = CASES[name]
    params = [p.to(dtype) for p in params]
    inputs = [x.to(dtype) for x in inputs]
    model = nn.Linear(16, 24).to(dtype).requires_grad_(False) if fn is None else Fn(fn, *params)
    return model, inputs  # no parameter needs a gradient: the graph is not a training graph


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_equals_eager_and_is_routed(tuner, name, dtype):
    model, inputs = build(name, dtype)
    compiled = torch.compile(model, backend="flashtune", options=EAGER, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), **tol(dtype))
    assert ft.stats()["routed_ops"] == 1


def test_with_inductor_outputs_match_over_sizes_and_dont_recompile(tuner):
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).requires_grad_(False)  # inference
    compiled = torch.compile(model, backend="flashtune", dynamic=True, fullgraph=True)
    for n in (1, 2, 3, 9, 17, 40):
        x = r(n, 16)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    s = ft.stats()
    assert s["compiles"] == 2 and s["routed_ops"] == 4  # size 1 is specialized, then one dynamic graph


def test_sizes_1_to_4096_cause_no_recompiles_and_each_bucket_tunes_once(tuner):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8, bias=False))
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options=EAGER)
    compiled(r(1, 8)), compiled(r(2, 8))
    compiles = ft.stats()["compiles"]
    sizes = list(range(1, 4097, 37)) + [4096, 4095, 3, 1]
    for n in sizes:
        x = r(n, 8)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert ft.stats()["compiles"] == compiles == 2
    ladder = ft.DynamicDim(0, 0, min_size=2).ladder
    buckets = {ft.DynamicDim(0, 0, min_size=2).bucket(n) for n in sizes + [2] if n > 1}
    assert buckets <= set(ladder)
    # two static shapes (with and without bias) per bucket, plus the specialized size-1 graph's two
    assert ft.stats()["misses"] == 2 * len(buckets) + 2
    before = ft.stats()["misses"]
    for n in sizes:
        compiled(r(n, 8))
    assert ft.stats()["misses"] == before


def test_mark_dynamic_range_bounds_the_ladder(tuner):
    model = nn.Linear(8, 8)
    compiled = torch.compile(model, backend="flashtune", options=EAGER)
    x = r(40, 8)
    torch._dynamo.mark_dynamic(x, 0, min=4, max=300)
    compiled(x)
    (key,) = [k for k in ft.AutoTuner.get().sites if SiteSpec.decode(k).op == "linear"]
    spec = SiteSpec.decode(key)
    ((positions, lo, hi),) = spec.axes
    assert positions == ((0, 0),) and (lo, hi) == (4, 300)
    site = ft.AutoTuner.get().sites[key]
    assert site.config.dynamic[0].ladder == (4, 8, 16, 32, 64, 128, 256, 512)


@settings(max_examples=200, deadline=None)
@given(cache_dir=st.one_of(st.none(), st.text()), kernels=st.lists(st.text(min_size=1), max_size=3))
def test_a_site_string_survives_any_option_text_and_is_a_safe_string_literal(cache_dir, kernels):
    """Generated code carries each op's site as a string literal, which Inductor's C++ wrapper
    writes between double quotes unescaped: whatever text the options hold (a cache directory with
    quotes, backslashes or percent signs), the site string has no double quote or backslash and
    decodes to the same site."""
    from flashtune_compile.ops import SiteOptions

    spec = SiteSpec(
        "linear",
        ((((0, 0),), 1, 64),),
        ([[-1, 8], "float32"], None),
        SiteOptions(kernels=tuple(kernels), cache_dir=cache_dir),
    )
    text = spec.encode()
    assert '"' not in text and "\\" not in text
    decoded = SiteSpec.decode(text)
    assert decoded.options == spec.options and decoded.axes == spec.axes and decoded.op == "linear"


def test_a_site_string_from_before_the_safe_encoding_still_decodes():
    """Code compiled by an earlier version (cached by Inductor) names its sites in plain JSON."""
    old = '["linear",[[[[0,0]],1,64]],[[[-1,8],"float32"],null],"hybrid",null,["aten"],"zipf","/tmp/a\'b",false,null]'
    spec = SiteSpec.decode(old)
    assert spec.op == "linear" and spec.options.cache_dir == "/tmp/a'b" and spec.options.kernels == ("aten",)


def test_shared_symbol_is_one_axis_for_flattened_3d(tuner):
    model = Fn(lambda w, x: F.linear(x, w), r(8, 16))
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options=EAGER)
    x = r(3, 5, 16)
    torch.testing.assert_close(compiled(x), model(x))
    (key,) = list(ft.AutoTuner.get().sites)
    ((positions, lo, hi),) = SiteSpec.decode(key).axes
    assert positions == ((0, 0),) and lo >= 1  # M = s0 * s1 is one axis of the flattened input
    assert ft.tactics()[0]["bucket"] == (16,)  # 15 rows -> bucket 16


def test_nd_linear_input_reaches_the_op_as_rows_flattened_in_the_graph(tuner):
    """The pass flattens an N-D input to 2-D rows with a graph node and views the result back, so
    the op itself never flattens (Inductor makes graph views free)."""
    from flashtune_compile.ops import SiteOptions
    from flashtune_compile.passes.matmul import rewrite

    model = nn.Linear(16, 8)
    x = r(2, 3, 5, 16)
    gm = _traced(model, x)
    assert rewrite(gm, frozenset({"linear"}), SiteOptions(kernels=("aten",), max_tokens=64)) == 1
    (op,) = [n for n in gm.graph.nodes if str(n.target) == "flashtune.linear.default"]
    rows = op.args[0]
    assert rows.op == "call_method" and rows.target == "flatten" and rows.args[1:] == (0, -2)
    assert [u.target for u in op.users] == ["view"]
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_nd_linear_inputs_of_every_size_match_eager_with_gradients(tuner, inner):
    torch.manual_seed(0)
    model = Fn(lambda w, b, x: torch.tanh(F.linear(x, w, b)), r(8, 16), r(8))
    model.p0.requires_grad_(), model.p1.requires_grad_()
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options={"inner": inner})
    for shape in [(2, 3, 16), (4, 7, 16), (1, 1, 16), (2, 5, 3, 16), (3, 1, 2, 16)]:
        x = r(*shape).requires_grad_()
        got = compiled(x)
        got.square().sum().backward()
        grads = [x.grad, model.p0.grad, model.p1.grad]
        x2 = x.detach().clone().requires_grad_()
        model.p0.grad = model.p1.grad = None
        ref = model(x2)
        ref.square().sum().backward()
        torch.testing.assert_close(got, ref)
        for g, e in zip(grads, [x2.grad, model.p0.grad, model.p1.grad]):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
        model.p0.grad = model.p1.grad = None
    assert ft.stats()["routed_ops"] >= 2  # the 3-D and the 4-D graph


def test_tune_off_never_profiles(tuner):
    model = nn.Linear(16, 16)
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options={**EAGER, "tune": "off"})
    for n in (2, 3, 50):
        x = r(n, 16)
        torch.testing.assert_close(compiled(x), model(x))
    s = ft.stats()
    assert s["profiles"] == 0 and s["synthesized"] == 0 and s["fallbacks"] == 3 and s["routed_ops"] == 1
    with ft.autotune():  # the context manager wins over the option
        compiled(r(3, 16))
    assert ft.stats()["profiles"] > 0


def test_unsupported_dtype_stays_as_it_was(tuner):
    model = nn.Linear(8, 8).double()
    compiled = torch.compile(model, backend="flashtune", options=EAGER)
    x = r(4, 8).double()
    torch.testing.assert_close(compiled(x), model(x))
    assert ft.stats()["routed_ops"] == 0


def test_ops_option_limits_routing(tuner):
    model = Fn(lambda w, x, y: F.linear(x, w) + torch.bmm(y, y.transpose(1, 2)).sum(), r(8, 8))
    compiled = torch.compile(model, backend="flashtune", options={**EAGER, "ops": {"bmm"}})
    x, y = r(4, 8), r(2, 3, 4)
    torch.testing.assert_close(compiled(x, y), model(x, y))
    assert ft.stats()["routed_ops"] == 1


def _traced(model, x):
    """``model`` as symbolic_trace leaves it (nn.Linear as call_module nodes), with fake values."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    gm = torch.fx.symbolic_trace(model)
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(mode.from_tensor(x))
    return gm


def test_call_module_linear_nodes_are_routed(tuner):
    """Graphs with nn.Linear as call_module nodes (symbolic_trace; older Dynamo) are routed too."""
    from flashtune_compile.ops import SiteOptions
    from flashtune_compile.passes.matmul import rewrite

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4, bias=False))
    gm = _traced(model, r(5, 8))
    assert [n.op for n in gm.graph.nodes].count("call_module") == 3
    assert rewrite(gm, frozenset({"linear"}), SiteOptions(kernels=("aten",), max_tokens=64)) == 2
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_function"].count("flashtune.linear.default") == 2
    x = r(5, 8)
    torch.testing.assert_close(gm(x), model(x))


def test_a_call_module_linear_left_alone_leaves_the_graph_as_it_was(tuner):
    """Matching has no side effects: a call_module linear the op does not serve (float64 here) adds
    no get_attr node for its parameters, and the graph's code is unchanged."""
    from flashtune_compile.ops import SiteOptions
    from flashtune_compile.passes.matmul import rewrite

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    gm = _traced(model, r(5, 8).double())
    nodes, code = [n.format_node() for n in gm.graph.nodes], gm.code
    assert rewrite(gm, frozenset({"linear"}), SiteOptions()) == 0
    assert [n.format_node() for n in gm.graph.nodes] == nodes and gm.code == code
    assert "get_attr" not in {n.op for n in gm.graph.nodes}


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_training_gradients_match_eager(tuner, inner):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    ref = [p.detach().clone() for p in model.parameters()]
    compiled = torch.compile(model, backend="flashtune", options={"inner": inner})
    x = r(6, 8, dtype=torch.float32).requires_grad_()
    compiled(x).square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad(), x.grad.zero_()
    for p, p0 in zip(model.parameters(), ref):
        assert torch.equal(p, p0)
    model(x).square().sum().backward()
    for g, e in zip(got, [p.grad for p in model.parameters()] + [x.grad]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    stats = ft.stats()  # a training graph: calls tuned no faster than ATen are handed back to it
    assert stats["routed_ops"] + stats["handed_back"] == 2


@pytest.mark.parametrize(
    "options, message",
    [
        ({"innr": "eager"}, "unknown option.*'innr'.*valid options"),
        ({"inner": "tvm"}, "'inner' must be one of"),
        ({"tune": "sometimes"}, "'tune' must be one of"),
        ({"ops": {"linear", "conv"}}, "unknown \\['conv'\\]; valid"),
        ({"kernels": "cudnn"}, "unknown \\['cudnn'\\]"),
        ({"buckets": "fib"}, "'buckets' must be one of"),
        ({"buckets": [8, 4]}, "strictly increasing"),
        ({"max_tokens": 0}, "positive int"),
    ],
)
def test_bad_options_are_named(options, message):
    model = nn.Linear(4, 4)
    with pytest.raises(Exception, match=message):
        torch.compile(model, backend="flashtune", options=options)(r(2, 4))


def test_backend_is_an_entry_point_usable_without_import(tmp_path):
    code = textwrap.dedent("""
        import json, sys, torch
        f = torch.compile(torch.nn.Linear(4, 4).requires_grad_(False), backend="flashtune", options={"inner": "eager"})
        f(torch.randn(3, 4))
        import flashtune_compile as ft
        print(json.dumps([ft.stats()["routed_ops"], "flashtune_compile" in sys.modules]))
        """)
    env = {**os.environ, "FLASHTUNE_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1, True]
    assert ft.backend is __import__("torch")._dynamo.lookup_backend("flashtune")


def _decoder():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from decoder import Decoder, DecoderConfig

    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab=128, dim=64, n_layers=2, n_heads=4, ffn_dim=96)).eval()


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_transformer_compiles_fullgraph_routes_every_linear(tuner, inner):
    model = _decoder()
    compiled = torch.compile(model, backend="flashtune", dynamic=True, fullgraph=True, options={"inner": inner})
    with torch.no_grad():
        for t in (3, 7, 12):
            tokens = torch.randint(0, 128, (2, t))
            torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-4, atol=1e-4)
    s = ft.stats()
    assert s["routed_ops"] == 11 * s["compiles"] and s["compiles"] >= 1  # 5 linears x 2 layers + lm_head
    kinds = {rec["shape_key"][1][1] for rec in ft.tactics()}
    assert kinds == {(192, 64), (64, 64), (96, 64), (64, 96), (128, 64)}


def test_warm_calls_profile_and_synthesize_nothing(tuner):
    model = _decoder()
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options=EAGER)
    with torch.no_grad():
        for t in (3, 5, 9):
            compiled(torch.randint(0, 128, (1, t)))
        before = ft.stats()
        for t in (3, 4, 5, 6, 7, 8, 9):  # all in buckets tuned above (4, 8, 16)
            compiled(torch.randint(0, 128, (1, t)))
    after = ft.stats()
    assert (after["profiles"], after["synthesized"], after["misses"]) == (
        before["profiles"],
        before["synthesized"],
        before["misses"],
    )
    assert after["hits"] > before["hits"]


def test_a_new_tuner_starts_with_none_of_the_old_ones_state(tuner):
    """Sites, runner sets, weight copies, profiling generators and learned MoE routing all belong to
    the tuner: AutoTuner.reset leaves the next one with none of them, and it works from scratch."""
    from test_moe import H, make_layer, moe_site

    from flashtune_compile.ops import routing
    from flashtune_compile.tuner.synth import new_generator
    from flashtune_compile.tuner.weights import admitting

    model = nn.Linear(16, 16)
    for p in model.parameters():
        p.requires_grad_(False)
    compiled = torch.compile(model, backend="flashtune", options=EAGER)
    compiled(r(3, 16))
    w1, w2 = make_layer(4, torch.float32)
    ids = torch.tensor([[1, 3]] * 5)
    torch.ops.flashtune.moe(
        torch.randn(5, H),
        torch.rand(5, 2),
        ids,
        w1,
        w2,
        "silu",
        None,
        moe_site(4, 2, torch.float32, routing_kind="learned"),
    )
    cpu = torch.device("cpu")
    old = ft.AutoTuner.get()
    # tuning trials drop their copies; a warm site's copy is made the way a runner asks for one
    admitting(old.weights, lambda: old.weights.get(model.weight, "transposed", lambda w: w.t().contiguous(), 1024))
    assert len(old.sites) == 2 and old.runner_sets and old.weights.nbytes > 0
    assert routing.learned_routing(old).counts(4, 2).tolist() == [0, 5, 0, 5]
    fresh_draw = torch.randn(8, generator=new_generator(cpu))
    assert not torch.equal(torch.randn(8, generator=old.generator(cpu)), fresh_draw)  # used by profiling

    new = ft.AutoTuner(settings=old.settings)
    ft.AutoTuner.reset(new)
    assert not new.sites and not new.runner_sets and new.weights.nbytes == 0 and ft.stats()["weight_cache_bytes"] == 0
    assert routing.learned_routing().counts(4, 2) is None
    assert torch.equal(torch.randn(8, generator=new.generator(cpu)), fresh_draw)
    x = r(3, 16)
    torch.testing.assert_close(compiled(x), model(x))  # the compiled graph's site is rebuilt in the new tuner
    assert len(new.sites) == 1 and ft.stats()["misses"] == 0 and ft.stats()["hits"] == 1  # its winner is on disk


def _entries(directory):
    """The (weight shape, bucket) of every entry in the one tactic document in ``directory``."""
    (doc,) = directory.glob("tactics-*.json")
    return sorted((tuple(e["static"][1][1]), tuple(e["bucket"])) for e in json.loads(doc.read_text())["entries"])


def test_cache_dir_option_persists_winners_there(tuner, cache_dir, tmp_path):
    model = nn.Linear(8, 8)
    compiled = torch.compile(model, backend="flashtune", options={**EAGER, "cache_dir": str(tmp_path / "mine")})
    compiled(r(3, 8))
    assert _entries(tmp_path / "mine") == [((8, 8), ())]
    assert not cache_dir.exists() and tuner.cache.entries == {}  # the default cache got nothing
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="flashtune", options={**EAGER, "cache_dir": None})
    compiled(r(3, 8))  # memory-only: the entry tuned above is not known here
    assert ft.stats()["misses"] == 2 and tuner.cache.directory == cache_dir  # the default cache is unchanged
    assert [rec["cache_dir"] for rec in ft.tactics()] == [str((tmp_path / "mine").resolve()), None]


def test_two_models_with_two_cache_dirs_keep_their_winners_apart(tuner, cache_dir, tmp_path):
    """Compiling model B with its own cache_dir must not send model A's later winners there."""
    a, b = nn.Linear(8, 8), nn.Linear(8, 16)
    opts = {**EAGER, "buckets": "pow2"}
    model_a = torch.compile(a, backend="flashtune", dynamic=True, options={**opts, "cache_dir": str(tmp_path / "a")})
    model_a(r(3, 8))
    model_b = torch.compile(b, backend="flashtune", dynamic=True, options={**opts, "cache_dir": str(tmp_path / "b")})
    model_b(r(3, 8))
    model_a(r(20, 8))  # a new bucket of model A, tuned after model B was compiled
    model_b(r(20, 8))
    assert _entries(tmp_path / "a") == [((8, 8), (4,)), ((8, 8), (32,))]
    assert _entries(tmp_path / "b") == [((16, 8), (4,)), ((16, 8), (32,))]
    assert not cache_dir.exists()
    x = r(5, 8)
    torch.testing.assert_close(model_a(x), a(x))
    # A fresh tuner (as a new process would have) finds model A's winners in A's directory.
    ft.AutoTuner.reset(ft.AutoTuner(settings=tuner.settings))
    torch._dynamo.reset()
    model_a = torch.compile(a, backend="flashtune", dynamic=True, options={**opts, "cache_dir": str(tmp_path / "a")})
    model_a(r(3, 8)), model_a(r(20, 8))
    assert ft.stats()["profiles"] == 0 and ft.stats()["hits"] == 2


class InPlaceUnusedResult(torch.nn.Module):
    """An in-place method whose result is unused (DeepSeek-V3's router does this with scatter_)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        mask = torch.zeros(x.shape[0], 4)
        mask.scatter_(1, torch.zeros(x.shape[0], 1, dtype=torch.long), 1.0)
        return self.lin(x) * mask


def test_in_place_methods_with_unused_results_survive_routing(tuner):
    mod, x = InPlaceUnusedResult().requires_grad_(False), torch.randn(3, 8)
    out = torch.compile(mod, backend="flashtune", options={"inner": "eager"})(x)
    # close, not equal: the linear is tuned, and a CPU kernel that wins sums in another order
    torch.testing.assert_close(out, mod(x))
    assert ft.stats()["routed_ops"] == 1


def test_inductor_code_calls_the_ops_implementation_not_the_dispatcher(tuner):
    from torch._inductor.utils import run_and_get_code

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    compiled = torch.compile(model, backend="flashtune")
    x = r(4, 16)
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(compiled, x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    assert code.count("extern_kernels.flashtune_linear(") == 2 and "torch.ops.flashtune.linear.default(" not in code


@pytest.mark.parametrize("grad", [False, True])
def test_inner_eager_nodes_skip_the_autograd_kernel_only_under_no_grad(tuner, grad):
    """Dynamo guards on grad mode: a graph compiled under no_grad calls run(site, inputs) directly;
    one compiled with grad enabled keeps the Autograd-key kernel, so training still works."""
    from flashtune_compile.ops.registry import DIRECT, op_name
    from flashtune_compile.ops.site import run

    targets = []

    def spy(gm, example_inputs):
        fn = ft.backend(gm, example_inputs, options=EAGER)
        targets.extend(n.target for n in gm.graph.nodes if op_name(n))
        return fn

    model = nn.Linear(16, 8)
    x = r(4, 16, dtype=torch.float32).requires_grad_(grad)
    with torch.set_grad_enabled(grad):  # dynamic sizes: a training graph's call stays routed
        out = torch.compile(model, backend=spy, dynamic=True)(x)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    expected = DIRECT[torch.ops.flashtune.linear.default] if grad else run
    assert targets == [expected]
    if grad:
        out.sum().backward()
        assert x.grad is not None and model.weight.grad is not None
