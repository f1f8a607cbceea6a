"""Quantized linears: the CPU kernel and every candidate against a float64 reference, each recognised
spelling routed to ``flashtune.linear_wq`` and matching eager, unsupported ones left alone, and
packed copies that follow the quantized weight."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flashtune_compile as ft
from flashtune_compile.kernels.cpp import blocked_gemm_or_none
from flashtune_compile.kernels.cpp.quant_runner import AMX_ROWS, CpuQuantLinearRunner
from flashtune_compile.kernels.cpp.rows_runner import CpuQuantRowsRunner
from flashtune_compile.kernels.quant import AtenQuantLinearRunner, dequantize
from flashtune_compile.ops.quantized import LINEAR_WQ
from flashtune_compile.tuner.cache import Entry
from flashtune_compile.tuner.runner import BucketProfile
from flashtune_compile.tuner.weights import WeightCache

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao (in the test extras) is not installed"
)


def _reference(x, q, s, z, b, gs):
    """The float64 product with the weight dequantized in float64."""
    w = dequantize(q, s.double(), z.double() if z is not None else None, gs, torch.float64)
    y = x.double() @ w.t()
    return y + b.double() if b is not None else y


def _quantized(n, k, gs, bits, zero, gen):
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = torch.randint(lo, hi, (n, k), dtype=torch.int8, generator=gen)
    g = max(1, -(-k // gs))
    s = torch.rand(n, g, generator=gen) * 0.02 + 0.001
    z = torch.randint(-4, 4, (n, g), generator=gen).float() if zero else None
    return q, s, z


def _close(y, ref, dtype, bf16_bound=5e-3):
    scale = max(ref.abs().max().item(), 1e-6) if ref.numel() else 1.0
    err = (y.double() - ref).abs().max().item() / scale if ref.numel() else 0.0
    assert err < (2e-5 if dtype == torch.float32 else bf16_bound), err  # bf16: the output's own rounding


# odd shapes: N not a multiple of any block, K not a multiple of the group, T = 0 and 1; for the
# AMX tile also rows past one and two tiles of 16, and K past one widened chunk (512)
SHAPES = [(1, 37, 70, 32), (0, 19, 64, 32), (3, 100, 65, 65), (5, 33, 129, 16), (9, 64, 100, 7), (17, 40, 96, 96)]
AMX_SHAPES = [(40, 50, 1100, 32), (33, 70, 600, 600)]


def _amx_takes(dtype, k, gs):
    return dtype == torch.bfloat16 and (gs % 2 == 0 or gs >= k)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_cpu_tile_and_split_matches_float64(bits, dtype):
    kernel = blocked_gemm_or_none()
    if kernel is None:
        pytest.skip("no C++ compiler: the CPU kernel family is absent")
    gen = torch.Generator().manual_seed(1)
    for m, n, k, gs in SHAPES + AMX_SHAPES:
        for zero in (False, True):
            q, s, z = _quantized(n, k, gs, bits, zero, gen)
            x = torch.randn(m, k, generator=gen).to(dtype)
            b = torch.randn(n, generator=gen).to(dtype)
            ref = _reference(x, q, s, z, b, gs)
            for mr, r in kernel.quant_tiles:
                amx = mr == AMX_ROWS
                if (m, n, k, gs) in AMX_SHAPES and not amx:
                    continue
                packed, sp, zs = kernel.pack_quant(q, s, z, bits, r)
                for ksplit in (1, 2, 3):
                    if amx and not _amx_takes(dtype, k, gs):
                        with pytest.raises(RuntimeError, match="AMX.*bf16 x and an even group size"):
                            kernel.quant_linear(x, packed, sp, zs, b, n, bits, gs, mr, r, ksplit)
                        continue
                    y = kernel.quant_linear(x, packed, sp, zs, b, n, bits, gs, mr, r, ksplit)
                    assert y.shape == (m, n) and y.dtype == dtype
                    _close(y, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_quant_rows_height_matches_float64(dtype):
    """The kernel that reads q as it is: every height at every M (0 to past the tallest), int4 values
    stored one per byte, zero points of integer and float dtypes, bf16 scales, a q whose rows lie
    apart (a column slice of a wider tensor), with and without a bias."""
    kernel = blocked_gemm_or_none()
    if kernel is None:
        pytest.skip("no C++ compiler: the CPU kernel family is absent")
    gen = torch.Generator().manual_seed(5)
    for m, n, k, gs in SHAPES + [(6, 21, 300, 300), (2, 48, 1030, 32)]:
        for bits, zero, sdtype in [(8, False, torch.float32), (4, True, torch.bfloat16), (8, True, torch.float32)]:
            q, s, z = _quantized(n, k, gs, bits, zero, gen)
            s = s.to(sdtype)
            zeros = [None] if z is None else [z, z.to(torch.int8), z.to(torch.int32)]
            wide = torch.randint(-8, 8, (n, k + 5), dtype=torch.int8, generator=gen)
            wide[:, :k] = q
            x = torch.randn(m, k, generator=gen).to(dtype)
            for zz in zeros:
                for b in (None, torch.randn(n, generator=gen).to(dtype)):
                    ref = _reference(x, q, s, zz, b, gs)
                    for mb in kernel.quant_rows_heights:
                        for qq in (q, wide[:, :k]):
                            y = kernel.quant_rows_linear(x, qq, s, zz, b, gs, mb)
                            assert y.shape == (m, n) and y.dtype == dtype
                            _close(y, ref, dtype, bf16_bound=5e-3 if dtype == torch.bfloat16 else 1e-3)


def test_quant_rows_names_a_malformed_call():
    kernel = blocked_gemm_or_none()
    if kernel is None:
        pytest.skip("no C++ compiler: the CPU kernel family is absent")
    x, q, s = torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 2)
    with pytest.raises(RuntimeError, match="q must be int8"):
        kernel.quant_rows_linear(x, q.float(), s, None, None, 32, 1)
    with pytest.raises(RuntimeError, match=r"scales must be \[N, ceil\(K / group_size\)\]"):
        kernel.quant_rows_linear(x, q, s, None, None, 16, 1)
    with pytest.raises(RuntimeError, match="zeros must be shaped as scales"):
        kernel.quant_rows_linear(x, q, s, torch.zeros(8, 1), None, 32, 1)
    with pytest.raises(RuntimeError, match="no height 3"):
        kernel.quant_rows_linear(x, q, s, None, None, 32, 3)


def test_the_quant_rows_runner_needs_no_copy_and_matches_float64(tuner):
    """Offered up to decode-sized M for weights that are not model state too (it keeps no copy),
    every tactic correct; nothing past M = 8, where the packed kernel takes over."""
    if blocked_gemm_or_none() is None:
        pytest.skip("no C++ compiler: the CPU kernel family is absent")
    gen = torch.Generator().manual_seed(6)
    runner = CpuQuantRowsRunner()
    q, s, z = _quantized(40, 96, 32, 4, True, gen)
    for m in (1, 3, 8, 9):
        inputs = (torch.randn(m, 96, generator=gen).to(torch.bfloat16), q, s, z, None, 32, 4)
        tactics = runner.get_valid_tactics(inputs, BucketProfile((m,), ((m, 96),)))
        assert bool(tactics) == (m <= 8), (m, tactics)
        assert all(runner.copy_kind(t) is None for t in tactics)
        for tactic in tactics:
            _close(runner(inputs, tactic), _reference(*inputs[:6]), torch.bfloat16)
    per_input_column = (torch.randn(1, 96), q, torch.ones(40, 5), None, None, 32, 8)  # G does not match K
    assert runner.get_valid_tactics(per_input_column, BucketProfile((1,), ((1, 96),))) == []


def test_the_amx_tile_is_offered_exactly_where_it_applies(tuner):
    kernel = blocked_gemm_or_none()
    if kernel is None or not any(mr == AMX_ROWS for mr, _ in kernel.quant_tiles):
        pytest.skip("this CPU (or its OS) gives no AMX tiles: the AMX tile is not built or not granted")
    gen = torch.Generator().manual_seed(4)
    runner = CpuQuantLinearRunner()
    for dtype, gs, m, offered in [
        (torch.bfloat16, 32, 16, True),
        (torch.bfloat16, 64, 2, True),  # from 2 rows: one AMX tile costs about what one row does
        (torch.bfloat16, 64, 1, False),
        (torch.bfloat16, 63, 16, False),  # odd groups: a pair of k would straddle two scales
        (torch.bfloat16, 128, 16, True),  # one group per row
        (torch.float32, 64, 16, False),  # AMX multiplies bf16 only
    ]:
        q, s, z = _quantized(48, 128, gs, 8, False, gen)
        WeightCache.mark_state([q, s])  # model state, as a quantized model's weights are
        inputs = (torch.randn(m, 128, generator=gen).to(dtype), q, s, z, None, gs, 8)
        tactics = runner.get_valid_tactics(inputs, BucketProfile((m,), ((m, 128),)))
        assert any(t[0] == AMX_ROWS for t in tactics) == offered, (dtype, gs, m, tactics)
        for tactic in tactics:
            _close(runner(inputs, tactic), _reference(*inputs[:6]), dtype)


def test_the_aten_formulations_match_float64():
    gen = torch.Generator().manual_seed(2)
    runner = AtenQuantLinearRunner()
    for m, n, k, gs in SHAPES:
        for zero in (False, True):
            for per_row in (False, True):
                q, s, z = _quantized(n, k, k if per_row else gs, 8, zero, gen)
                x = torch.randn(m, k, generator=gen)
                inputs = (x, q, s, z, None, k if per_row else gs, 8)
                ref = _reference(x, q, s, z, None, k if per_row else gs)
                tactics = runner.get_valid_tactics(inputs, BucketProfile((m,), ()))
                per_channel = s.shape[1] == 1 and not zero
                assert len(tactics) == (1 if not per_channel else 3 if k % 64 == 0 else 2)
                for tactic in tactics:
                    _close(runner(inputs, tactic), ref, torch.float32)


def test_int8pack_is_never_offered_where_aten_reads_past_the_row():
    # torch's CPU _weight_int8pack_mm returned garbage or crashed for bf16 x with K = 72 (AVX-512)
    gen = torch.Generator().manual_seed(7)
    runner = AtenQuantLinearRunner()
    q, s, _ = _quantized(48, 72, 72, 8, False, gen)
    x = torch.randn(10, 72, generator=gen).to(torch.bfloat16)
    inputs = (x, q, s, None, None, 72, 8)
    assert runner.get_valid_tactics(inputs, BucketProfile((10,), ())) == [-1, "scale_after"]
    with pytest.raises(ValueError, match="int8pack.*multiple of 64"):
        runner(inputs, "int8pack")
    # two bf16 roundings (the product, then the scaled product)
    _close(runner(inputs, "scale_after"), _reference(x, q, s, None, None, 72), torch.bfloat16, 1.5e-2)


def test_int4_values_out_of_range_are_refused_by_the_pack():
    kernel = blocked_gemm_or_none()
    if kernel is None:
        pytest.skip("no C++ compiler: the CPU kernel family is absent")
    q = torch.full((8, 32), 9, dtype=torch.int8)
    with pytest.raises(ValueError, match="-8..7"):
        kernel.pack_quant(q, torch.ones(8, 1), None, 4, 2)


def test_the_op_names_a_malformed_call():
    x, q = torch.randn(2, 64), torch.zeros(16, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"scales must be \[N, ceil\(K / group_size\)\] = \[16, 2\]"):
        LINEAR_WQ.check(x, q, torch.ones(16, 3), None, None, 32, 8)
    with pytest.raises(ValueError, match="bits must be"):
        LINEAR_WQ.check(x, q, torch.ones(16, 2), None, None, 32, 3)
    with pytest.raises(ValueError, match="zeros"):
        LINEAR_WQ.check(x, q, torch.ones(16, 2), torch.ones(16, 1), None, 32, 8)


# -- spellings ---------------------------------------------------------------------------------------


class PlainRow(nn.Module):
    """Weight-only int8 as plain PyTorch: int8 buffer, per-row scale (and zero point)."""

    def __init__(self, n=48, k=72, zero=False, dtype=torch.bfloat16):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.register_buffer("q", torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen))
        self.register_buffer("s", (torch.rand(n, 1, generator=gen) * 0.01).to(dtype))
        self.register_buffer("z", torch.randint(-3, 3, (n, 1), generator=gen).to(dtype) if zero else None)
        self.bias = nn.Parameter(torch.randn(n, generator=gen).to(dtype), requires_grad=False)
        self.dtype = dtype

    def forward(self, x):
        w = self.q.to(self.dtype)
        if self.z is not None:
            w = w - self.z
        return F.silu(F.linear(x, w * self.s, self.bias))


class PlainGroup(nn.Module):
    """Weight-only int8 per group of 32 columns: ``(q.view(N, G, gs).to(dt) * s3).reshape(N, K)``."""

    def __init__(self, n=40, k=96, gs=32, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.q = nn.Parameter(torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen), requires_grad=False)
        self.register_buffer("s", torch.rand(n, k // gs, 1, generator=gen) * 0.01)
        self.shape = (n, k // gs, gs)

    def forward(self, x):
        w = (self.q.view(*self.shape).to(x.dtype) * self.s).reshape(self.shape[0], -1)
        return F.linear(x, w)


class PerColumn(nn.Module):
    """Scales per input column (``s [1, K]``): not a layout linear_wq takes."""

    def __init__(self, n=24, k=32):
        super().__init__()
        self.register_buffer("q", torch.randint(-128, 128, (n, k), dtype=torch.int8))
        self.register_buffer("s", torch.rand(1, k) * 0.01)

    def forward(self, x):
        return F.linear(x, self.q.float() * self.s)


def _torchao_block(config, dtype=torch.bfloat16):
    from torchao.quantization import quantize_

    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 64, bias=False)).to(dtype)
    quantize_(m, config)
    return m


def _torchao_configs():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return {
        "int8_weight_only": Int8WeightOnlyConfig(),
        "int8_dynamic_activation": Int8DynamicActivationInt8WeightConfig(),
        "int4_weight_only_intx": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
    }


def _run(model, xs, inner="eager", ops=None):
    torch._dynamo.reset()
    ft.reset_stats()
    options = {"inner": inner, **({"ops": ops} if ops else {})}
    compiled = torch.compile(model, backend="flashtune", options=options, dynamic=True)
    with torch.no_grad():
        return [(compiled(x), model(x)) for x in xs], ft.stats()


def _xs(k, dtype, sizes=((1,), (3,), (2, 5))):
    gen = torch.Generator().manual_seed(6)
    return [torch.randn(*lead, k, generator=gen).to(dtype) for lead in sizes]


@needs_torchao
@pytest.mark.parametrize("name", ["int8_weight_only", "int8_dynamic_activation", "int4_weight_only_intx"])
def test_torchao_weights_are_routed_and_match_eager(tuner, name):
    model = _torchao_block(_torchao_configs()[name])
    pairs, stats = _run(model, _xs(64, torch.bfloat16))
    assert stats["routed_ops"] >= 2 and stats["routed_ops"] % 2 == 0  # both linears, each compiled graph
    for got, want in pairs:
        assert got.shape == want.shape and got.dtype == want.dtype
        # within the quantization's own error: bf16 rounding of the activations and sums
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@needs_torchao
def test_torchao_int8_under_inductor(tuner):
    model = _torchao_block(_torchao_configs()["int8_weight_only"])
    pairs, stats = _run(model, _xs(64, torch.bfloat16, ((1,), (4,))), inner="inductor")
    assert stats["routed_ops"] >= 2
    for got, want in pairs:
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "model",
    [PlainRow(), PlainRow(zero=True), PlainRow(dtype=torch.float32), PlainGroup()],
    ids=["row", "row_zero", "row_fp32", "group"],
)
def test_plain_spellings_are_routed_and_match_eager(tuner, model):
    k = model.q.shape[1]
    dtype = model.s.dtype
    pairs, stats = _run(model, _xs(k, dtype), ops={"quantized"})
    assert stats["routed_ops"] >= 1
    for got, want in pairs:
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_scales_per_input_column_are_left_alone(tuner):
    model = PerColumn()
    pairs, stats = _run(model, _xs(32, torch.float32), ops={"quantized"})
    assert stats["routed_ops"] == 0
    for got, want in pairs:
        torch.testing.assert_close(got, want)


@needs_torchao
def test_the_quantized_family_can_be_turned_off(tuner):
    model = _torchao_block(_torchao_configs()["int8_weight_only"])
    pairs, stats = _run(model, _xs(64, torch.bfloat16), ops={"linear"})
    assert stats["routed_ops"] == 0
    for got, want in pairs:
        torch.testing.assert_close(got, want)


# -- packed copies stay fresh ---------------------------------------------------------------------------


def _force_cpu_quant(tuner):
    """Make every cached linear_wq winner the CPU kernel (a packed copy), with ATen as its fallback."""
    for key, entry in tuner.cache.snapshot().items():
        forced = Entry("cpu_quant", (1, 4, 1), 1e-6, entry.default_s)
        forced.fallback_runner, forced.fallback_tactic, forced.fallback_s = "aten_linear_wq", -1, 2e-6
        tuner.cache.put(key, forced)


def test_packed_copies_follow_the_quantized_weight(tuner):
    if blocked_gemm_or_none() is None:
        pytest.skip("no C++ compiler: the CPU kernel family is absent")
    model = PlainRow(dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="flashtune", options={"inner": "eager", "kernels": {"aten", "cpu"}})
    x = torch.randn(1, 72)
    with torch.no_grad():
        compiled(x)  # tunes the bucket
        _force_cpu_quant(tuner)
        for _ in range(tuner.weights.promote_after + 2):
            torch.testing.assert_close(compiled(x), model(x))
        assert tuner.weights.made >= 1 and tuner.weights.nbytes > 0  # served from the packed copy
        model.q.copy_(torch.randint(-128, 128, model.q.shape, dtype=torch.int8))  # in place
        torch.testing.assert_close(compiled(x), model(x))
        model.s.mul_(3.0)  # the scales alone
        torch.testing.assert_close(compiled(x), model(x))
        model.q = torch.randint(-128, 128, model.q.shape, dtype=torch.int8)  # a new tensor
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model(x))


@needs_torchao
def test_a_replaced_torchao_weight_is_never_served_stale(tuner):
    if blocked_gemm_or_none() is None:
        pytest.skip("no C++ compiler: the CPU kernel family is absent")
    from torchao.quantization import quantize_

    configs = _torchao_configs()
    model = _torchao_block(configs["int8_weight_only"])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="flashtune", options={"inner": "eager", "kernels": {"aten", "cpu"}})
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        compiled(x)
        _force_cpu_quant(tuner)
        for _ in range(tuner.weights.promote_after + 2):
            compiled(x)
        assert tuner.weights.made >= 1
        fresh = nn.Sequential(nn.Linear(64, 96)).to(torch.bfloat16)
        quantize_(fresh, configs["int8_weight_only"])
        model[0].weight = fresh[0].weight  # the user loads new quantized weights
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model(x), atol=1e-2, rtol=1e-2)


def test_the_cpu_runner_offers_nothing_for_weights_that_are_not_model_state():
    q, s = torch.zeros(8, 16, dtype=torch.int8), torch.ones(8, 1)
    inputs = (torch.randn(1, 16), q, s, None, None, 16, 8)
    assert CpuQuantLinearRunner().get_valid_tactics(inputs, BucketProfile((1,), ((1, 16), (8, 16)))) == []


def test_the_package_imports_and_routes_without_torchao(tmp_path):
    """torchao is optional: with it unimportable, the backend still routes the plain spelling."""
    code = (
        "import sys; sys.modules['torchao'] = None\n"
        "import torch, flashtune_compile as ft\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.register_buffer('q', torch.randint(-128, 128, (48, 72), dtype=torch.int8))\n"
        "        self.register_buffer('s', torch.rand(48, 1) * 0.01)\n"
        "    def forward(self, x):\n"
        "        return torch.nn.functional.linear(x, self.q.float() * self.s)\n"
        "m = M()\n"
        "c = torch.compile(m, backend='flashtune', options={'inner': 'eager', 'ops': {'quantized'}})\n"
        "x = torch.randn(2, 72)\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(c(x), m(x), atol=1e-4, rtol=1e-4)\n"
        "assert ft.stats()['routed_ops'] == 1, ft.stats()\n"
        "assert 'torchao' not in {k for k, v in sys.modules.items() if v is not None}\n"
    )
    env = {**os.environ, "FLASHTUNE_CACHE_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
