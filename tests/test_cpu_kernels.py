"""The CPU blocked kernels (``kernels/cpp``), the GEMM and the MoE layer: every tactic against a
float64 reference, in fp32, bf16 and fp16, for odd sizes, strided inputs and bias, experts with no
tokens and ids out of range; packed copies never stale; clear errors."""

import ast
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import flashtune_compile as ft
from flashtune_compile.kernels.cpp import load_blocked_gemm
from flashtune_compile.kernels.cpp.moe_runner import MAX_ROWS_PER_EXPERT, CpuBlockedMoeRunner
from flashtune_compile.kernels.cpp.runner import MAX_M, CpuBlockedLinearRunner, blocked_tactics
from flashtune_compile.kernels.moe import ACTIVATIONS
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


def _rows_tactics(kernel, dtype):
    pairs = (0, 1) if kernel.bf16_pairs and dtype == torch.bfloat16 else (0,)
    return [(mb, u, p) for mb, u in kernel.rows_tiles for p in pairs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 5, 9])
def test_rows_kernel_every_tactic_matches_float64(kernel, dtype, m):
    """The kernel that reads w as it is: every (rows per pass, unroll, pairs) for odd N and K, with
    and without bias, x and bias of any strides, and a w whose columns are not adjacent."""
    g = torch.Generator().manual_seed(10 + m)
    for n, k in [(77, 129), (3, 31), (40, 64), (5, 1)]:
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(2 * n, generator=g).to(dtype)[::2]  # a non-contiguous bias
        x = torch.randn(m, k + 3, generator=g).to(dtype)[:, 2 : k + 2]  # row stride k + 3
        wt = w.t().contiguous().t()  # the same values, column stride n
        for mb, u, pairs in _rows_tactics(kernel, dtype):
            for bias in (None, b):
                _check(kernel.rows_linear(x, w, bias, mb, u, pairs), x, w, bias)
            _check(kernel.rows_linear(x, wt, b, mb, u, pairs), x, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_kernel_edge_sizes_and_errors(kernel, dtype):
    g = torch.Generator().manual_seed(4)
    for m, n, k in [(0, 5, 8), (3, 0, 8), (2, 7, 0), (1, 1, 1000)]:
        w, x, b = torch.randn(n, k, generator=g).to(dtype), torch.randn(m, k, generator=g).to(dtype), None
        if n:
            b = torch.randn(n, generator=g).to(dtype)
        for mb, u, pairs in _rows_tactics(kernel, dtype):
            _check(kernel.rows_linear(x, w, b, mb, u, pairs), x, w, b)
    x, w = torch.randn(2, 8).to(dtype), torch.randn(4, 8).to(dtype)
    with pytest.raises(RuntimeError, match="no tile 3x3"):
        kernel.rows_linear(x, w, None, 3, 3)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        kernel.rows_linear(x, torch.randn(4, 9).to(dtype), None, 1, 2)
    with pytest.raises(RuntimeError, match="share one dtype"):
        kernel.rows_linear(x, w.double(), None, 1, 2)
    if dtype != torch.bfloat16 or not kernel.bf16_pairs:
        with pytest.raises(RuntimeError, match="pairs kernel needs bf16"):
            kernel.rows_linear(x, w, None, 1, 2, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_rounds_as_torch_rounds_and_keeps_nan_and_inf(kernel, dtype):
    """y = a + b, exact in fp32, must round to the output dtype exactly as torch's ``.to`` does
    (nearest, ties to even), in the vector stores and the tail; NaN and inf come through."""
    g = torch.Generator().manual_seed(3)
    bits = 8 if dtype == torch.bfloat16 else 11  # significand bits of the output dtype
    n = 100  # several full vectors and a tail
    a = (1 + torch.rand(n, generator=g)).to(dtype)
    b = (torch.rand(n, generator=g) * 2.0 ** -(bits + 1)).to(dtype)  # a + b needs < 24 bits
    a[:4] = torch.tensor([1.0, 1.0 + 2.0 ** (1 - bits), 1.0, 2.0 - 2.0 ** (1 - bits)])  # ties, both ways
    b[:4] = torch.tensor([2.0**-bits, 2.0**-bits, 0.0, 2.0**-bits])
    w = torch.stack([a, b], dim=1)  # [n, 2]
    x = torch.ones(3, 2, dtype=dtype)
    x[1, 0] = float("nan")
    x[2, 0] = float("inf")
    want = (a.float() + b.float()).to(dtype)
    outputs = {t: kernel.linear(x, kernel.pack(w, t[1], t[3]), None, n, *t) for t in _all_tactics(kernel, dtype)}
    outputs.update({("rows", *t): kernel.rows_linear(x, w, None, *t) for t in _rows_tactics(kernel, dtype)})
    for tactic, y in outputs.items():
        assert torch.equal(y[0], want), f"tactic {tactic} rounds differently from torch"
        assert y[1].isnan().all(), f"tactic {tactic} lost a NaN"
        assert (y[2] == float("inf")).all(), f"tactic {tactic} lost an inf"


def _mapping_of(address: int) -> dict[str, str] | None:
    """The /proc/self/smaps entry (its fields, and "range") of the mapping holding ``address``."""
    entry = None
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split()[0] if line.split() else ""
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                entry = {"range": head} if lo <= address < hi else None
            elif entry is not None and ":" in head:
                entry[head.rstrip(":")] = line.split(None, 1)[1].strip()
                if head == "VmFlags:":
                    return entry
    return entry


def _thp_setting(name: str) -> str | None:
    """The selected value of /sys/kernel/mm/transparent_hugepage/<name>; None where there is none."""
    try:
        with open(f"/sys/kernel/mm/transparent_hugepage/{name}", encoding="utf-8") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(_thp_setting("enabled") in (None, "never"), reason="this OS offers no transparent huge pages")
def test_large_packs_are_correct_on_huge_pages_and_freed(kernel):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(1000, 700, generator=g)  # 1024 x 700 fp32 packed: 2.7 MB, a 2 MB page and a 4 KB tail
    x = torch.randn(3, 700, generator=g)
    packed = kernel.pack(w, 4)
    _check(kernel.linear(x, packed, None, 1000, 1, 4), x, w, None)
    address = packed.data_ptr()
    assert address % (2 << 20) == 0, "a large pack must start on a 2 MB boundary"
    mapping = _mapping_of(address)
    assert mapping is not None and mapping.get("THPeligible") == "1", f"not advised onto huge pages: {mapping}"
    if _thp_setting("defrag") in ("always", "madvise", "defer+madvise"):  # the OS compacts memory to serve it
        assert mapping["AnonHugePages"] != "0 kB", f"on 4 KB pages: {mapping}"
    del packed
    gone = _mapping_of(address)
    assert gone is None or gone["range"] != mapping["range"], "the pack's mapping outlived the tensor"


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


# -- the MoE layer -------------------------------------------------------------------------------

MOE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative to max |ref|


def _moe_reference(x, weights, ids, gate, up, w2, activation):
    """Token by token, pick by pick, in float64, rounding to x's dtype where the op's semantics do
    (``kernels/moe.py``): [gate | up], the activation, h, the expert output."""
    dt, act = x.dtype, ACTIVATIONS[activation]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < gate.shape[0]:
                g = (gate[e].double() @ x[t].double()).to(dt).double()
                u = (up[e].double() @ x[t].double()).to(dt).double()
                h = (act(g).to(dt).double() * u).to(dt).double()
                out[t] += (w2[e].double() @ h).to(dt).double() * float(weights[t, j])
    return out


def _moe_close(got, ref, dtype):
    assert got.dtype == dtype and got.shape == ref.shape
    if ref.numel():
        err = (got.double() - ref).abs().max().item()
        assert err <= MOE_TOL[dtype] * max(ref.abs().max().item(), 1.0), f"error {err}"


def _moe_layer(e, h, i, dtype, split, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up, w2 = (torch.randn(*shape, generator=g).to(dtype) * 0.3 for shape in ((e, i, h), (e, i, h), (e, h, i)))
    if split:  # gpt-fast / torchtitan: separate gate (w1) and up (w3) parameters
        w1, w3 = nn.Parameter(gate.clone(), requires_grad=False), nn.Parameter(up.clone(), requires_grad=False)
    else:  # transformers: w1 holds [gate; up]
        w1, w3 = nn.Parameter(torch.cat([gate, up], dim=1), requires_grad=False), None
    return w1, nn.Parameter(w2, requires_grad=False), w3


def _moe_parts(w1, w3):
    """(gate, up) of a layer's weights, as the kernel must read them."""
    if w3 is not None:
        return w1.detach(), w3.detach()
    return w1.detach().chunk(2, dim=1)


def _profile(inputs):
    return BucketProfile((inputs[0].shape[0],), tuple(tuple(t.shape) if torch.is_tensor(t) else None for t in inputs))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,k", [(1, 2), (3, 2), (16, 2), (21, 3)])
def test_moe_every_tactic_matches_float64(kernel, dtype, tokens, k):
    """Odd H and I (I not a multiple of any block), expert 3 of 5 gets no token, one id out of range,
    T = 21 with k = 3 gives an expert more rows than the tallest tile; stacked and split gate/up,
    each activation, fp32 and bf16 routing weights, int32 and int64 ids."""
    e, h, i = 5, 33, 19
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, h, generator=g).to(dtype)
    ids = torch.stack([torch.tensor([0, 1, 2, 4])[torch.randperm(4, generator=g)[:k]] for _ in range(tokens)])
    if tokens >= 3:
        ids[1, 0] = e  # out of range: adds nothing
    if tokens > 16:
        ids[:, 0] = 2  # expert 2 gets every token: more rows than any tile
    weights = torch.softmax(torch.randn(tokens, k, generator=g), -1)
    runner = CpuBlockedMoeRunner()
    checked = 0
    for split in (False, True):
        w1, w2, w3 = _moe_layer(e, h, i, dtype, split)
        for activation in ACTIVATIONS:
            for wts, ids_ in ((weights, ids), (weights.to(dtype), ids.int())):
                inputs = (x, wts, ids_, w1, w2, activation, w3)
                ref = _moe_reference(x, wts, ids, *_moe_parts(w1, w3), w2.detach(), activation)
                for tactic in runner.get_valid_tactics(inputs, _profile(inputs)):
                    _moe_close(runner.forward(inputs, tactic), ref, dtype)
                    checked += 1
    assert checked >= 2 * 3 * 2 * (4 if kernel.bf16_pairs and dtype == torch.bfloat16 else 2)


def test_moe_strided_hidden_views_and_empty_batch(kernel):
    g = torch.Generator().manual_seed(3)
    runner = CpuBlockedMoeRunner()
    w1, w2, w3 = _moe_layer(4, 24, 16, torch.float32, split=False)
    w1t = nn.Parameter(w1.detach().transpose(1, 2).contiguous(), requires_grad=False)  # stored [E, H, 2I]
    weights, ids = torch.rand(5, 2, generator=g), torch.randint(0, 4, (5, 2), generator=g)
    rows = torch.randn(5, 40, generator=g)[:, 8:32]  # row stride 40
    cols = torch.randn(24, 5, generator=g).t()  # column stride 5
    ref = None
    for x in (rows, cols):
        ref = _moe_reference(x, weights, ids, *_moe_parts(w1, None), w2.detach(), "silu")
        for weight in (w1, w1t.transpose(1, 2)):  # a parameter, and a view of one computed in the graph
            inputs = (x, weights, ids, weight, w2, "silu", None)
            for tactic in runner.get_valid_tactics(inputs, _profile(inputs)):
                _moe_close(runner.forward(inputs, tactic), ref, torch.float32)
    empty = (torch.randn(0, 24), torch.rand(0, 2), torch.zeros(0, 2, dtype=torch.long), w1, w2, "silu", None)
    assert runner.forward(empty, (2, 0)).shape == (0, 24)


def test_moe_packed_weights_are_never_stale(tuner, kernel):
    """The gate/up copy is made from two parameters when they are separate: updating either one
    (in place or by ``.data``) remakes it; otherwise it is served from the cache."""
    runner = CpuBlockedMoeRunner()
    w1, w2, w3 = _moe_layer(4, 16, 8, torch.bfloat16, split=True)
    x = torch.randn(3, 16).to(torch.bfloat16)
    weights, ids = torch.rand(3, 2), torch.tensor([[0, 1], [1, 2], [3, 0]])
    copies = ft.AutoTuner.get().weights
    inputs = (x, weights, ids, w1, w2, "silu", w3)

    def check(tactic):
        ref = _moe_reference(x, weights, ids, w1.detach(), w3.detach(), w2.detach(), "silu")
        _moe_close(runner.forward(inputs, tactic), ref, torch.bfloat16)

    for tactic in runner.get_valid_tactics(inputs, _profile(inputs)):
        check(tactic)
        made = copies.made
        runner.forward(inputs, tactic)
        assert copies.made == made, "the packed copies were not served from the cache"
        for w in (w1, w3, w2):
            with torch.no_grad():
                w.mul_(2)
            check(tactic)
        w3.data = torch.randn(4, 8, 16).to(torch.bfloat16)
        check(tactic)


def test_moe_offered_only_where_it_applies(kernel):
    runner = CpuBlockedMoeRunner()
    w1, w2, _ = _moe_layer(4, 16, 8, torch.float32, split=False)
    x, weights, ids = torch.randn(4, 16), torch.rand(4, 2), torch.randint(0, 4, (4, 2))

    def offered(*inputs, tokens=4):
        shapes = tuple(tuple(t.shape) if torch.is_tensor(t) else None for t in inputs)
        shapes = ((tokens, 16), (tokens, 2), (tokens, 2), *shapes[3:])
        return runner.get_valid_tactics(inputs, BucketProfile((tokens,), shapes))

    assert offered(x, weights, ids, w1, w2, "silu", None)
    assert offered(x, weights, ids, w1, w2.detach().clone(), "silu", None) == [], "a weight computed in the graph"
    assert offered(x.double(), weights, ids, w1, w2, "silu", None) == [], "mixed dtypes"
    assert offered(x, weights.double(), ids, w1, w2, "silu", None) == [], "float64 routing weights"
    assert offered(x, weights, ids, w1, w2, "relu", None) == []
    assert offered(x, weights, ids, w1, w2, "silu", None, tokens=MAX_ROWS_PER_EXPERT * 4 // 2 + 1) == []
    if kernel.bf16_pairs:
        b1, b2, _ = _moe_layer(4, 16, 8, torch.bfloat16, split=False)
        assert {p for _, p in offered(x.bfloat16(), weights, ids, b1, b2, "silu", None)} == {0, 1}


def test_moe_bad_arguments_raise_clear_errors(kernel):
    gate, up, w2 = torch.randn(3, 8, 16), torch.randn(3, 8, 16), torch.randn(3, 16, 8)
    gu, down = kernel.pack_gate_up(gate, up, 2), kernel.pack(w2, 2)
    x, weights, ids = torch.randn(2, 16), torch.rand(2, 2), torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="act must be"):
        kernel.moe(x, weights, ids, gu, down, 8, 7, 2)
    with pytest.raises(RuntimeError, match="no tiles 3 vectors wide"):
        kernel.moe(x, weights, ids, gu, down, 8, 0, 3)
    with pytest.raises(RuntimeError, match="int64"):
        kernel.moe(x, weights, ids.int(), gu, down, 8, 0, 2)
    with pytest.raises(RuntimeError, match="share one dtype"):
        kernel.moe(x.bfloat16(), weights, ids, gu, down, 8, 0, 2)
    with pytest.raises(RuntimeError, match="packed2 does not match"):
        kernel.moe(x, weights, ids, gu, down, 9, 0, 2)
    with pytest.raises(RuntimeError, match="tile width"):
        kernel.moe(x, weights, ids, gu, down, 8, 0, 4)
