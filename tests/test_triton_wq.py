"""The Triton weight-only quantized GEMM (kernels/triton_wq.py) against a float64 reference.

On machines without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton), so every shape here is tiny.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed: the Triton kernel family is absent")

from flashtune_compile.kernels.quant import dequantize  # noqa: E402
from flashtune_compile.kernels.triton_wq import (  # noqa: E402
    TritonQuantLinearRunner,
    default_tactic,
    wq_gemm,
    wq_tactics,
)
from flashtune_compile.tuner.runner import DEFAULT_TACTIC, BucketProfile  # noqa: E402

# odd shapes (M, N, K, group_size): N not a multiple of any block, K not a multiple of the group or
# of BLOCK_K, M = 0, one group per row (65 / 65, 48 / 48), decode and tl.dot row blocks
SHAPES = [(1, 37, 70, 32), (0, 19, 64, 32), (3, 40, 65, 65), (5, 33, 96, 16), (17, 24, 48, 48)]
# beyond the offered ones: split-K on both paths (3 chunks: not a power of two), BLOCK_K 16 and 32
# (the scales per K block or gathered per element, by the group size)
EXTRA = [(2, 16, 16, 3, 4, 3), (16, 16, 32, 2, 4, 3)]


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setenv("FLASHTUNE_TRITON_ON_CPU", "1")


def _reference(x, q, s, z, b, gs):
    """The float64 product with the weight dequantized in float64."""
    w = dequantize(q, s.double(), z.double() if z is not None else None, gs, torch.float64)
    y = x.double() @ w.t()
    return y + b.double() if b is not None else y


def _quantized(n, k, gs, bits, zero, gen, scale_dtype=torch.float32, zero_dtype=torch.float32):
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = torch.randint(lo, hi, (n, k), dtype=torch.int8, generator=gen)
    g = max(1, -(-k // gs))
    s = (torch.rand(n, g, generator=gen) * 0.02 + 0.001).to(scale_dtype)
    z = torch.randint(0 if zero_dtype == torch.uint8 else -4, 4, (n, g), generator=gen).to(zero_dtype) if zero else None
    return q, s, z


def _close(y, ref, dtype):
    assert y.shape == ref.shape and y.dtype == dtype
    if not ref.numel():
        return
    err = (y.double().cpu() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    assert err < (1e-4 if dtype == torch.float32 else 1.5e-2), err


def _inputs(m, n, k, gs, bits, zero, dtype, gen, bias=True):
    q, s, z = _quantized(n, k, gs, bits, zero, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    ref = _reference(x, q, s, z, b, gs)
    d = dev()
    moved = [t.to(d) if t is not None else None for t in (x, q, s, z, b)]
    return (*moved, gs, bits), ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_tactic_matches_float64(triton_on_cpu, shape, dtype):
    m, n, k, gs = shape
    gen = torch.Generator().manual_seed(m * 1000 + n)
    runner = TritonQuantLinearRunner()
    # bits 8 without zero points and a bias; bits 4 with zero points and none
    for bits, zero, bias in ((8, False, True), (4, True, False)):
        inputs, ref = _inputs(m, n, k, gs, bits, zero, dtype, gen, bias)
        profile = BucketProfile((m,), tuple(None if t is None else tuple(t.shape) for t in inputs[:5]) + (None, None))
        tactics = runner.get_valid_tactics(inputs, profile)
        assert tactics and all(isinstance(t, tuple) for t in tactics)
        assert json.loads(json.dumps(tactics)) == [list(t) for t in tactics]
        for tactic in [DEFAULT_TACTIC, *tactics, *EXTRA]:
            _close(runner.forward(inputs, tactic), ref, dtype)


def test_fp16_strided_operands_and_other_dtypes(triton_on_cpu):
    """fp16 x read through a stride, q a column slice, fp16 scales, uint8 zero points."""
    gen = torch.Generator().manual_seed(7)
    m, n, k, gs = 4, 21, 40, 16
    q, s, z = _quantized(n, k + 8, gs, 8, True, gen, torch.float16, torch.uint8)
    q = q[:, 3 : 3 + k]
    s, z = s[:, :3].contiguous(), z[:, :3].contiguous()
    x = torch.randn(k, m, generator=gen).half().t()  # column-major
    b = torch.randn(n, generator=gen).half()
    ref = _reference(x, q, s, z, b, gs)
    d = dev()
    inputs = (x.to(d), q.to(d), s.to(d), z.to(d), b.to(d), gs, 8)
    runner = TritonQuantLinearRunner()
    for tactic in (DEFAULT_TACTIC, (4, 16, 32, 1, 4, 3), (16, 32, 16, 2, 4, 3)):
        _close(runner.forward(inputs, tactic), ref, torch.float16)


def test_empty_k_returns_the_bias_and_split_k_is_deterministic(triton_on_cpu):
    d = dev()
    b = torch.randn(7, device=d)
    x, q, s = torch.empty(3, 0, device=d), torch.empty(7, 0, dtype=torch.int8, device=d), torch.ones(7, 1, device=d)
    assert torch.equal(wq_gemm(x, q, s, None, b, 32, (4, 16, 32, 1, 4, 3)), b.expand(3, 7))
    assert torch.equal(wq_gemm(x, q, s, None, None, 32, (4, 16, 32, 1, 4, 3)), torch.zeros(3, 7, device=d))
    gen = torch.Generator().manual_seed(3)
    inputs, ref = _inputs(2, 19, 80, 32, 8, True, torch.float32, gen)
    tactic = (2, 16, 16, 4, 4, 3)
    y = wq_gemm(*inputs[:6], tactic)
    _close(y, ref, torch.float32)
    assert torch.equal(y, wq_gemm(*inputs[:6], tactic))


def test_not_offered_without_opt_in_or_for_other_inputs(monkeypatch, triton_on_cpu):
    runner = TritonQuantLinearRunner()
    gen = torch.Generator().manual_seed(4)
    inputs, _ = _inputs(2, 8, 16, 16, 8, False, torch.float32, gen)
    profile = BucketProfile((2,), ((2, 16), (8, 16), (8, 1), None, (8,), None, None))
    assert runner.get_valid_tactics(inputs, profile)
    x, q, s, z, b, gs, bits = inputs
    assert runner.get_valid_tactics((x.double(), q, s, z, b.double(), gs, bits), profile) == []
    assert runner.get_valid_tactics((x, q.to(torch.int16), s, z, b, gs, bits), profile) == []
    assert runner.get_valid_tactics((x, q, s, z, b, gs, 3), profile) == []
    assert runner.get_valid_tactics((x, q, s[:, :0], z, b, gs, bits), profile) == []
    if not torch.cuda.is_available():
        monkeypatch.delenv("FLASHTUNE_TRITON_ON_CPU")
        assert runner.get_valid_tactics(inputs, profile) == []


def test_tactic_space_for_gpu_sized_buckets():
    """Pure Python: decode buckets split K, larger ones tile; the default is sensible for each."""
    for m in (1, 4, 8, 16, 32, 33, 64, 256, 4096):
        for elem in (2, 4):
            tactics = wq_tactics(m, 4096, 4096, elem, 132)
            assert tactics and len(set(tactics)) == len(tactics)
            assert all(len(t) == 6 and all(isinstance(v, int) for v in t) for t in tactics)
            default = default_tactic(m, 4096, 4096, elem, 132)
            assert default[0] == (1 << (m - 1).bit_length() if m <= 32 else 64 if m <= 64 else 128)
            if m <= 32:
                assert any(t[3] > 1 for t in tactics) and default[3] > 1
    assert wq_tactics(1, 8, 8, 2, 132) == [(1, 16, 32, 1, 2, 3)]  # tiny: the tiles that fit
    assert wq_tactics(64, 4096, 4096, 4, 132, 16 * 1024)  # never empty


def test_module_imports_without_triton():
    """The package and this module import without importing Triton (it is imported on first launch)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys, flashtune_compile.kernels.triton_wq; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
