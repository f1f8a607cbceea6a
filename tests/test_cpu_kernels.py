"""The CPU blocked GEMM (``kernels/cpp``): every tactic against a float64 reference, in fp32, bf16
and fp16, for odd sizes, strided inputs and bias; packed copies never stale; clear errors."""

import ast
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import flashtune_compile as ft
from flashtune_compile.kernels.cpp import load_blocked_gemm
from flashtune_compile.kernels.cpp.runner import MAX_M, CpuBlockedLinearRunner, blocked_tactics
from flashtune_compile.tuner.runner import BucketProfile

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_EPS = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


@pytest.fixture(scope="module")
def kernel():
    return load_blocked_gemm()  # compiles once per machine (about 30 s), then loads from disk


def _check(got, x, w, b):
    """|got - ref| within fp32 summation error over K plus one rounding of the output dtype."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T + (b.double() if b is not None else 0)
    scale = xd.abs() @ wd.abs().T + (b.double().abs() if b is not None else 0)
    bound = scale * (x.shape[1] * 2.0**-23 + OUT_EPS[x.dtype]) + 1e-30
    assert got.dtype == x.dtype and got.shape == ref.shape
    excess = ((got.double() - ref).abs() - bound).max().item() if got.numel() else 0.0
    assert excess <= 0, f"error exceeds the bound by {excess}"


def _all_tactics(kernel, dtype=torch.float32):
    pairs = (0, 1) if kernel.bf16_pairs and dtype == torch.bfloat16 else (0,)
    return [(mr, r, s, p) for mr, r in kernel.tiles for s in (1, 2, 3) for p in pairs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 7, 16, 33])
def test_every_tactic_matches_float64(kernel, dtype, m):
    g = torch.Generator().manual_seed(m)
    n, k = 77, 129  # odd: a partial last block, a K not a multiple of anything
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    for mr, r, split, pairs in _all_tactics(kernel, dtype):
        packed = kernel.pack(w, r, pairs)
        for bias in (None, b):
            _check(kernel.linear(x, packed, bias, n, mr, r, split, pairs), x, w, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_and_edge_sizes(kernel, dtype):
    g = torch.Generator().manual_seed(1)
    runner = CpuBlockedLinearRunner()
    w = nn.Parameter(torch.randn(45, 33, generator=g).to(dtype))
    b = torch.randn(90, generator=g).to(dtype)[::2]  # a non-contiguous bias
    rows = torch.randn(7, 50, generator=g).to(dtype)[:, 3:36]  # row stride 50
    cols = torch.randn(33, 7, generator=g).to(dtype).t()  # column stride 7
    for x in (rows, cols):
        for tactic in [-1, *_all_tactics(kernel, dtype)]:
            _check(runner.forward((x, w, b), tactic), x, w.detach(), b)
    for m, n, k in [(0, 5, 8), (3, 1, 1), (2, 17, 0), (1, 1, 1000)]:
        w1 = nn.Parameter(torch.randn(n, k, generator=g).to(dtype))
        x1 = torch.randn(m, k, generator=g).to(dtype)
        for tactic in [(1, 2, 2, 0), *_all_tactics(kernel, dtype)[-1:]]:
            _check(runner.forward((x1, w1, None), tactic), x1, w1.detach(), None)


def test_packed_weight_is_never_stale(tuner, kernel):
    runner = CpuBlockedLinearRunner()
    w = nn.Parameter(torch.randn(40, 24).to(torch.bfloat16))
    x = torch.randn(3, 24).to(torch.bfloat16)
    copies = ft.AutoTuner.get().weights
    for tactic in blocked_tactics(3, 24, kernel.tiles, kernel.bf16_pairs):
        _check(runner.forward((x, w, None), tactic), x, w.detach(), None)
        made = copies.made
        runner.forward((x, w, None), tactic)
        assert copies.made == made, "the packed copy was not served from the cache"
        with torch.no_grad():
            w.mul_(2)
        _check(runner.forward((x, w, None), tactic), x, w.detach(), None)
        w.data = torch.randn(40, 24).to(torch.bfloat16)
        _check(runner.forward((x, w, None), tactic), x, w.detach(), None)


def test_offered_only_where_it_applies(kernel):
    runner = CpuBlockedLinearRunner()
    p = nn.Parameter(torch.randn(16, 8))
    x = torch.randn(4, 8)

    def offered(x, w, b=None, m=4):
        return runner.get_valid_tactics((x, w, b), BucketProfile((m,), ((m, 8), tuple(w.shape), None)))

    assert offered(x, p) and all(mr <= 4 and pairs == 0 for mr, _, _, pairs in offered(x, p))
    assert offered(x, p.t().t()), "a view of a parameter gets the packed kernel too"
    assert offered(x, p.detach().clone()) == [], "a weight computed in the graph cannot keep a packed copy"
    assert offered(x.double(), p.double()) == []
    assert offered(x.bfloat16(), p) == [], "mixed dtypes"
    assert offered(x, p, m=MAX_M + 1) == []
    assert {s for _, _, s, _ in blocked_tactics(1, 4096, kernel.tiles)} == {1, 2}
    assert {s for _, _, s, _ in blocked_tactics(16, 4096, kernel.tiles)} == {1}
    if kernel.bf16_pairs:
        assert {t[3] for t in offered(x.bfloat16(), nn.Parameter(p.detach().bfloat16()))} == {0, 1}


def test_bad_arguments_raise_clear_errors(kernel):
    w = torch.randn(16, 8)
    x = torch.randn(2, 8)
    packed = kernel.pack(w, 2)
    with pytest.raises(RuntimeError, match="tile width"):
        kernel.linear(x, packed, None, 16, 1, 4, 1)
    with pytest.raises(RuntimeError, match="share one dtype"):
        kernel.linear(x.bfloat16(), packed, None, 16, 1, 2, 1)
    with pytest.raises(RuntimeError, match="no tile 3x2"):
        kernel.linear(x, packed, None, 16, 3, 2, 1)
    with pytest.raises(RuntimeError, match="does not match M or N"):
        kernel.linear(x, packed, None, 99, 1, 2, 1)
    with pytest.raises(RuntimeError, match="bias"):
        kernel.linear(x, packed, torch.randn(15), 16, 1, 2, 1)
    with pytest.raises(RuntimeError, match="ksplit"):
        kernel.linear(x, packed, None, 16, 1, 2, 0)
    with pytest.raises(RuntimeError, match="pairs kernel needs bf16"):
        kernel.linear(x, packed, None, 16, 1, 2, 1, True)


def test_without_a_compiler_the_family_is_absent_with_one_log_line(tmp_path):
    """A machine whose C++ compiler is missing (here: CXX names none, in a fresh extensions dir) still
    compiles and tunes models: the blocked family offers nothing, and says why once."""
    script = """
import logging, torch, torch.nn as nn
import flashtune_compile as ft
logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
compiled = torch.compile(model, backend="flashtune", options={"inner": "eager", "kernels": {"aten", "cpu"}})
x = torch.randn(3, 16)
torch.testing.assert_close(compiled(x), model(x))
print("TIMED", sorted((r["kernel"], r["timed"]) for r in ft.tactics()))
"""
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
        "FLASHTUNE_CACHE_DIR": str(tmp_path / "cache"),
    }
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # each layer timed F.linear, addmm, mm_add, wt_contig and mkldnn_packed: no blocked tactic
    timed = ast.literal_eval(done.stdout.split("TIMED", 1)[1].strip())
    assert len(timed) == 2 and all(n == 5 and kernel != "cpu_blocked" for kernel, n in timed), timed
    lines = [line for line in done.stderr.splitlines() if "CPU blocked GEMM kernels are not available" in line]
    assert len(lines) == 1, done.stderr[-3000:]
