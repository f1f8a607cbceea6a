"""Every matmul candidate against ATen: Triton (interpreted on CPU), CPU layouts, the weight cache."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashtune_compile as ft
from flashtune_compile.kernels.cpp import load_blocked_gemm
from flashtune_compile.kernels.cpp.rows_runner import rows_tactics
from flashtune_compile.kernels.cpp.runner import blocked_tactics
from flashtune_compile.kernels.cpu import CpuLinearRunner
from flashtune_compile.kernels.triton_runner import TritonGemmRunner
from flashtune_compile.ops import OPS, runners_for
from flashtune_compile.ops.matmul import MATMUL_OPS
from flashtune_compile.tuner.check import mismatch
from flashtune_compile.tuner.runner import BucketProfile

needs_interpreter = pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setenv("FLASHTUNE_TRITON_ON_CPU", "1")


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(op, m, n, k, dtype, transposed=False, bias=True):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)

    def r(*s):
        return torch.randn(*s, generator=g).to(dtype=dtype, device=dev())

    if op == "linear":  # weights and biases are parameters, as in a model
        w = nn.Parameter(r(k, n).t() if transposed else r(n, k), requires_grad=False)
        return (r(m, k), w, nn.Parameter(r(n), requires_grad=False) if bias else None)
    if op == "mm":
        return (r(k, m).t() if transposed else r(m, k), r(k, n))
    if op == "addmm":
        return (r(m, n) if transposed else r(n), r(m, k), r(k, n), 0.5, 2.0)
    if op == "bmm":
        return (r(3, m, k), r(3, n, k).transpose(1, 2) if transposed else r(3, k, n))
    return (r(1, m, n), r(3, m, k), r(3, k, n), 0.25, 3.0)  # baddbmm


def reference(op, inputs):
    """ATen's answer in float64, cast back: the default runner's own result in higher precision."""
    up = [x.double() if isinstance(x, torch.Tensor) else x for x in inputs]
    out = runners_for(op, ["aten"])[0].forward(up, -1)
    return out.to(inputs[1].dtype)


def profile_for(inputs, op):
    shapes = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs)
    m = shapes[1][-2] if op in ("addmm", "baddbmm") else shapes[0][-2]
    return BucketProfile((m,), shapes)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("op", MATMUL_OPS)
@pytest.mark.parametrize("m, n, k, transposed", [(1, 7, 9, False), (5, 33, 40, True), (17, 24, 1030, False)])
def test_triton_gemm_matches_aten(triton_on_cpu, op, dtype, m, n, k, transposed):
    inputs = make_inputs(op, m, n, k, dtype, transposed)
    runner = TritonGemmRunner(OPS[op].gemm)  # the op's GEMM view, as its candidate list builds it
    tactics = runner.get_valid_tactics(inputs, profile_for(inputs, op))
    if k >= 1024 and op in ("linear", "mm", "addmm"):
        tactics.append((16, 32, 64, 8, 4, 3, 4))  # split-K 4 over K=1030: a partial last tile
    assert tactics
    ref = reference(op, inputs)
    for tactic in tactics:
        out = runner.forward(inputs, tactic)
        assert mismatch(out, ref) is None, (tactic, mismatch(out, ref))


@needs_interpreter
def test_triton_linear_without_bias_and_beta_zero_ignores_nan(triton_on_cpu):
    x, w, _ = make_inputs("linear", 5, 8, 16, torch.float32, bias=False)
    out = TritonGemmRunner(OPS["linear"].gemm).forward((x, w, None), (16, 32, 32, 8, 4, 3, 1))
    torch.testing.assert_close(out, F.linear(x, w))
    bias = torch.full((8,), float("nan"), device=dev())
    out = TritonGemmRunner(OPS["addmm"].gemm).forward((bias, x, w.t(), 0.0, 1.0), (16, 32, 32, 8, 4, 3, 1))
    torch.testing.assert_close(out, torch.addmm(bias, x, w.t(), beta=0.0))


def test_triton_tactics_are_pruned_per_bucket():
    from flashtune_compile.kernels.triton_gemm import tactics_for

    decode, prefill = tactics_for(1, 4096, 4096, 2), tactics_for(4096, 4096, 4096, 2)
    assert all(t[0] <= 16 for t in decode) and any(t[6] > 1 for t in decode)  # small tiles, split-K
    assert all(t[6] == 1 for t in prefill) and max(t[0] for t in prefill) == 256
    assert all((t[0] * t[2] + t[2] * t[1]) * 2 * t[5] <= 100 * 1024 for t in tactics_for(64, 4096, 4096, 2, 100 * 1024))
    assert not any(t[6] > 1 for t in tactics_for(8, 4096, 512, 2))  # K too short to split


def test_triton_not_offered_on_cpu_without_the_test_hook():
    inputs = make_inputs("linear", 4, 8, 16, torch.float32)
    if torch.cuda.is_available():
        pytest.skip("CUDA tensors are always eligible")
    assert TritonGemmRunner(OPS["linear"].gemm).get_valid_tactics(inputs, profile_for(inputs, "linear")) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_linear_variants_match_aten(dtype, bias):
    x = torch.randn(9, 48, dtype=dtype)[:, :40]  # non-contiguous rows
    w = nn.Parameter(torch.randn(24, 40, dtype=dtype), requires_grad=False)
    b = nn.Parameter(torch.randn(24, dtype=dtype), requires_grad=False) if bias else None
    runner = CpuLinearRunner()
    profile = BucketProfile((16,), ((16, 40), (24, 40), (24,)))
    tactics = runner.get_valid_tactics((x, w, b), profile)
    # a weight computed in the graph is a new tensor each call: no copy could be reused
    assert runner.get_valid_tactics((x, w.detach() * 1, b), profile) == []
    assert tactics and ("wt_contig" in tactics) == (dtype == torch.float32)
    assert "wt_contig" not in tactics or dtype == torch.float32  # 60x slower for bf16: never offered
    ref = F.linear(x.double(), w.double(), b.double() if bias else None).to(dtype)
    for tactic in tactics:
        assert mismatch(runner.forward((x, w, b), tactic), ref) is None, tactic


def test_weight_copies_are_reused_and_never_stale():
    runner, x = CpuLinearRunner(), torch.randn(4, 16)
    w = nn.Parameter(torch.randn(8, 16), requires_grad=False)
    copies = ft.AutoTuner.get().weights
    made = copies.made
    y1 = runner.forward((x, w, None), "wt_contig")
    runner.forward((x, w, None), "wt_contig")
    assert copies.made == made + 1  # one copy, reused
    assert ft.stats()["weight_cache_bytes"] >= 8 * 16 * 4
    with torch.no_grad():
        w.mul_(2)  # in place: the version counter moves
    y2 = runner.forward((x, w, None), "wt_contig")
    torch.testing.assert_close(y2, 2 * y1)
    assert copies.made == made + 2
    with torch.no_grad():
        w.data = torch.randn(8, 16)  # new storage behind the same Parameter
    torch.testing.assert_close(runner.forward((x, w, None), "wt_contig"), F.linear(x, w))


@pytest.mark.parametrize("op", MATMUL_OPS)
def test_every_cpu_candidate_of_every_op_matches_aten(op):
    inputs = make_inputs(op, 6, 10, 12, torch.float32)
    ref = reference(op, inputs)
    checked = 0
    for runner in runners_for(op, ["aten", "cpu", "cuda", "triton"]):
        for tactic in runner.get_valid_tactics(inputs, profile_for(inputs, op)):
            assert mismatch(runner.forward(inputs, tactic), ref) is None, (runner.name, tactic)
            checked += 1
    assert checked >= (1 if op == "mm" else 2)  # mm has only torch.mm on CPU


def test_backend_tunes_cpu_candidates_end_to_end(tuner):
    torch._dynamo.reset()
    model = nn.Linear(32, 24)
    compiled = torch.compile(model, backend="flashtune", options={"inner": "eager", "kernels": {"aten", "cpu"}})
    x = torch.randn(5, 32)
    torch.testing.assert_close(compiled(x), model(x))
    (rec,) = ft.tactics()
    assert rec["candidates"] == ["aten_linear", "cpu_linear", "cpu_blocked", "cpu_rows"]
    kernel = load_blocked_gemm()
    blocked = blocked_tactics(5, 32, kernel.tiles)  # a static shape: its bucket is M = 5
    rows = rows_tactics(5, kernel.rows_tiles)  # fp32: no vdpbf16ps tactics
    assert len(blocked) >= 4 and len(rows) >= 1
    # F.linear, addmm, mm_add, wt_contig, mkldnn_packed + the blocked tiles + the rows passes
    assert rec["timed"] == 5 + len(blocked) + len(rows)


@needs_interpreter
def test_backend_tunes_triton_end_to_end(tuner, triton_on_cpu):
    torch._dynamo.reset()
    model = nn.Linear(16, 8).to(dev())
    compiled = torch.compile(model, backend="flashtune", options={"inner": "eager", "kernels": {"triton"}})
    x = torch.randn(3, 16, device=dev())
    torch.testing.assert_close(compiled(x), model(x), rtol=2e-3, atol=2e-3)  # a GPU's fp32 dot may use tf32
    (rec,) = ft.tactics()
    assert rec["candidates"] == ["aten_linear_default", "triton_gemm", "triton_skinny", "triton_tma"]
    assert rec["timed"] >= 3  # the TMA GEMM is not offered for fp32 at M = 3


@needs_interpreter
def test_compile_only_launches_nothing_and_precompile_builds_every_tactic(triton_on_cpu):
    """Inside compile_only() a Triton launch only compiles (on a GPU: JITFunction.warmup), so a
    split-K GEMM's zero-filled output stays zero; precompile runs forward once per tactic in a
    thread pool that way, and the real launch afterwards computes the product."""
    from flashtune_compile.kernels.triton_launch import compile_only, precompile

    x, w, _ = make_inputs("linear", 4, 16, 1024, torch.float32, bias=False)
    runner = TritonGemmRunner.for_op(OPS["linear"])
    split = (16, 32, 64, 8, 4, 4, 2)  # split-K: the output starts as zeros and kernels add to it
    with compile_only():
        assert runner.forward((x, w, None), split).abs().max() == 0
    seen = []
    precompile(
        lambda inputs, t: seen.append(t) or runner.forward(inputs, t), (x, w, None), [split, (16, 32, 64, 8, 4, 4, 4)]
    )
    assert sorted(seen) == [split, (16, 32, 64, 8, 4, 4, 4)]
    torch.testing.assert_close(runner.forward((x, w, None), split), x @ w.t(), rtol=1e-4, atol=1e-4)


def test_tuning_precompiles_each_runners_tactics_before_running_any(tuner, caplog):
    from helpers import MMChunked, MMDefault, mm_config

    events = []

    class Recording(MMChunked):
        def precompile(self, inputs, tactics):
            events.append(("precompile", tuple(tactics)))

        def forward(self, inputs, tactic=-1):
            events.append(("forward", tactic))
            return super().forward(inputs, tactic)

    class Failing(MMChunked):
        name = "mm_failing_precompile"

        def precompile(self, inputs, tactics):
            raise RuntimeError("no compiler here")

    runners, cfg = (MMDefault(), Recording(), Failing()), mm_config()
    tuner.choose_one("mm", runners, cfg, (torch.randn(8, 16), torch.randn(16, 16)))
    assert events[0] == ("precompile", (1, 2, 4)) and all(e[0] == "forward" for e in events[1:])
    assert "mm_failing_precompile: precompiling 3 tactic(s) failed: RuntimeError: no compiler here" in caplog.text
    assert runners[2].calls  # a failed precompile costs time only: its tactics were still checked and timed


@pytest.mark.parametrize("op", MATMUL_OPS)
def test_a_runners_unpacked_function_computes_its_forward(op):
    """What a warm call runs directly (``unpacked``) is the same function as ``forward`` (once
    ``forward`` made the weight copy the tactic reads, if any: the warm path never makes one)."""
    inputs = make_inputs(op, 5, 7, 9, torch.float32)
    offered: dict[str, int] = {}
    for runner in runners_for(op, ["aten", "cpu", "cuda", "triton"]):
        for tactic in runner.get_valid_tactics(inputs, profile_for(inputs, op)):
            fn = runner.unpacked(tactic)
            if fn is not None:
                offered[runner.name] = offered.get(runner.name, 0) + 1
                want = runner.forward(inputs, tactic)
                torch.testing.assert_close(fn(*inputs), want)
    aten = {"linear": "aten_linear", "mm": "aten_mm", "bmm": "aten_bmm"}
    assert offered.pop(aten.get(op, ""), 0) == (1 if op in aten else 0)  # the plain ATen call
    kernel = load_blocked_gemm()
    blocked, rows = blocked_tactics(5, 9, kernel.tiles), rows_tactics(5, kernel.rows_tiles)
    cpu = CpuLinearRunner().get_valid_tactics(inputs, profile_for(inputs, op)) if op == "linear" else []
    # every tactic of the CPU runners
    want = {"cpu_blocked": len(blocked), "cpu_linear": len(cpu), "cpu_rows": len(rows)}
    assert offered == (want if op == "linear" else {})


@needs_interpreter
def test_warm_triton_launches_reuse_one_launcher_per_specialization(tuner, triton_on_cpu, monkeypatch):
    """A tuned Triton tactic's warm calls find their launcher by the launch's specialization (dtypes,
    alignment, int divisibility, constexprs): calls of other sizes in the bucket add none, an
    operand at a misaligned address gets its own (Triton compiles another kernel for it), and
    every result equals ATen's."""
    from flashtune_compile.kernels import triton_gemm, triton_launch

    monkeypatch.setattr(triton_launch, "_bound", {})  # this test's launches only
    runner = TritonGemmRunner(OPS["linear"].gemm)
    x, w, b = make_inputs("linear", 5, 24, 40, torch.float32)
    tactic = runner.get_valid_tactics((x, w, b), profile_for((x, w, b), "linear"))[0]
    mine = lambda: {k for k in triton_launch.bound_launchers() if k[0] is triton_gemm._gemm_kernel}  # noqa: E731
    before = mine()
    torch.testing.assert_close(runner.forward((x, w, b), tactic), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    first = mine() - before
    assert len(first) == 1
    for m in (3, 7):  # M = 3 and 7 specialize as M = 5 does (none divisible by 16)
        xm = torch.randn(m, 40)
        torch.testing.assert_close(runner.forward((xm, w, b), tactic), F.linear(xm, w, b), rtol=1e-4, atol=1e-4)
    assert mine() - before == first
    shifted = torch.randn(5 * 40 + 1)[1:].view(5, 40)  # 4 bytes past a 16-byte boundary
    assert shifted.data_ptr() % 16
    torch.testing.assert_close(runner.forward((shifted, w, b), tactic), F.linear(shifted, w, b), rtol=1e-4, atol=1e-4)
    assert len(mine() - before) == 2


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "m, n, k, tactic",
    [
        (1, 7, 9, (1, 16, 64, 1, 2, 3)),  # everything masked: one partial tile
        (3, 33, 130, (4, 16, 64, 2, 4, 3)),  # two chunks of K, the second 2 long
        (3, 33, 130, (4, 16, 64, 4, 4, 3)),  # four asked, three non-empty chunks of 64, 64, 2
        (5, 17, 1030, (8, 16, 64, 16, 4, 3)),  # 16 chunks, the last partial
        (16, 40, 300, (16, 32, 64, 4, 4, 3)),  # tl.dot, split 4 over a partial tile
        (20, 24, 200, (16, 32, 64, 2, 4, 3)),  # two blocks of rows, the second 4 rows long
    ],
)
def test_triton_skinny_matches_float64_at_split_boundaries(dtype, m, n, k, tactic):
    from flashtune_compile.kernels.triton_skinny import skinny_gemm

    g = torch.Generator().manual_seed(m * 100 + k)
    a = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)  # read as b = w.T, linear's layout
    bias = torch.randn(n, generator=g).to(dtype)
    ref = (0.5 * a.double() @ w.double().T + 2.0 * bias.double()).to(dtype)
    out = skinny_gemm(a, w.t(), bias, 0.5, 2.0, tactic)
    assert out.dtype == dtype and out.shape == (m, n)
    assert mismatch(out, ref) is None, mismatch(out, ref)


@needs_interpreter
@pytest.mark.parametrize("op", MATMUL_OPS)
def test_triton_skinny_serves_every_matmul_op(triton_on_cpu, op):
    """Each op's GEMM view: transposed operands, batches, alpha/beta and bias; every offered
    tactic and the default equal the float64 reference."""
    from flashtune_compile.kernels.triton_runner import TritonSkinnyRunner

    inputs = make_inputs(op, 6, 40, 520, torch.bfloat16, transposed=True)
    runner = TritonSkinnyRunner(OPS[op].gemm)
    tactics = runner.get_valid_tactics(inputs, profile_for(inputs, op))
    assert tactics and all(t[0] == 8 for t in tactics)  # BLOCK_M: the bucket's M, rounded up
    ref = reference(op, inputs)
    for tactic in [*tactics, -1]:
        out = runner.forward(inputs, tactic)
        assert mismatch(out, ref) is None, (tactic, mismatch(out, ref))
    big = make_inputs(op, 40, 8, 16, torch.float32)
    assert runner.get_valid_tactics(big, profile_for(big, op)) == []  # M > 32: not offered


def test_triton_skinny_tactics_fill_the_gpu_and_fit_registers():
    from flashtune_compile.kernels.triton_skinny import MAX_SUM_VALUES, default_tactic, skinny_tactics

    tactics = skinny_tactics(1, 4096, 4096, 132)
    assert tactics and all(t[0] == 1 for t in tactics)
    for bm, bn, bk, split, warps, _ in tactics:
        assert bm * bn * bk <= MAX_SUM_VALUES * 32 * warps
        assert split == 1 or (-(-4096 // bn) * split <= 8 * 132 and 4096 >= 4 * split * bk)
    assert any(t[3] > 1 for t in tactics)  # a 4096 x 4096 weight gets split-K tactics
    assert {t[0] for t in skinny_tactics(16, 4096, 4096, 132)} == {16}
    bm, bn, bk, split, _, _ = default_tactic(1, 4096, 4096, 132)
    assert -(-4096 // bn) * split >= 2 * 132 or split == 16


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("op", ["linear", "mm", "addmm"])
def test_triton_tma_matches_aten_through_descriptors(triton_on_cpu, op, dtype):
    """The persistent TMA GEMM through each 2-D op's view (B K-major for linear, row-major for mm):
    fewer programs than tiles (each walks several), partial edge tiles, the bias epilogue; and an
    operand TMA cannot read (misaligned) runs the tiled GEMM instead, still right."""
    from flashtune_compile.kernels.triton_runner import TritonTmaRunner
    from flashtune_compile.kernels.triton_tma import tma_gemm

    inputs = make_inputs(op, 72, 40, 136, dtype)
    runner = TritonTmaRunner(OPS[op].gemm)
    tactics = runner.get_valid_tactics(inputs, profile_for(inputs, op))
    assert tactics
    ref = reference(op, inputs)
    for tactic in [tactics[0], -1]:
        assert mismatch(runner.forward(inputs, tactic), ref) is None
    a, b, bias, alpha, beta = OPS[op].gemm.operands(inputs)
    small = (64, 64, 64, 8, 4, 3)  # 2 x 1 tiles over one program
    assert mismatch(tma_gemm(a, b, bias, alpha, beta, small, programs=1), ref) is None
    shifted = torch.randn(72 * 136 + 1).to(dtype)[1:].view(72, 136)
    moved = (shifted, *inputs[1:]) if op != "addmm" else (inputs[0], shifted, *inputs[2:])
    assert runner.get_valid_tactics(moved, profile_for(moved, op)) == []  # not offered for it
    assert mismatch(runner.forward(moved, tactics[0]), reference(op, moved)) is None  # but right if reached
    few = make_inputs(op, 8, 40, 136, dtype)
    assert runner.get_valid_tactics(few, profile_for(few, op)) == []  # decode sizes: not offered
