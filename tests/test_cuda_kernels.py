"""The hand-written CUDA skinny-M linear: it compiles with nvcc (runs wherever nvcc is), its runner
declines what it cannot run, and on a GPU every tactic matches a float64 reference."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flashtune_compile.kernels.cuda import EXTRA_CUDA_CFLAGS, SOURCE_PATH, load_skinny_gemm, skinny_gemm_sources
from flashtune_compile.kernels.cuda.runner import (
    N_PER_BLOCK,
    SPLIT_K,
    THREADS,
    CudaSkinnyLinearRunner,
    default_tactic,
    skinny_tactics,
)
from flashtune_compile.tuner.runner import BucketProfile

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none on this machine)")


def _torch_nvcc_flags():
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what load_inline adds: no implicit half ops

    return list(COMMON_NVCC_FLAGS)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_source_compiles_with_nvcc(tmp_path, arch):
    out = tmp_path / "x.o"
    cmd = [NVCC, *EXTRA_CUDA_CFLAGS, f"-arch={arch}", *_torch_nvcc_flags(), "-c", SOURCE_PATH, "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr.lower(), proc.stderr
    assert out.stat().st_size > 0


def _torch_compile_cmd(compiler, source, extra):
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    incs = [*include_paths(), sysconfig.get_paths()["include"]]
    return [
        compiler,
        *extra,
        "-DTORCH_EXTENSION_NAME=skinny_check",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        *[a for i in incs for a in ("-isystem", i)],
        str(source),
    ]


def test_binding_declaration_parses_with_torch_headers(tmp_path):
    """The C++ half of load_inline (declaration + pybind11 module) against this torch's headers."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    cpp, _ = skinny_gemm_sources()
    main = tmp_path / "main.cpp"
    main.write_text(
        "\n".join(
            [
                "#include <torch/extension.h>",
                cpp,
                "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {",
                'm.def("skinny_linear_out", torch::wrap_pybind_function(skinny_linear_out));',
                "}",
            ]
        )
    )
    proc = subprocess.run(
        _torch_compile_cmd(cxx, main, ["-fsyntax-only", "-std=c++20"]), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@needs_nvcc
def test_binding_and_kernel_compile_as_load_inline_would(tmp_path):
    """The CUDA half (kernel + torch binding); needs a CUDA build of torch for its c10/cuda headers."""
    from torch.utils.cpp_extension import include_paths

    if torch.version.cuda is None or not any(
        os.path.exists(os.path.join(p, "c10/cuda/impl/cuda_cmake_macros.h")) for p in include_paths()
    ):
        pytest.skip("needs a CUDA build of torch (its c10/cuda headers); this torch is CPU-only")
    _, cu = skinny_gemm_sources()
    src = tmp_path / "cuda.cu"
    src.write_text("\n".join(["#include <torch/types.h>", "#include <cuda.h>", "#include <cuda_runtime.h>", cu]))
    extra = [
        *EXTRA_CUDA_CFLAGS,  # the build's own flags, its C++ standard the one this torch needs
        "-arch=sm_80",
        "--compiler-options",
        "-fPIC",
        *_torch_nvcc_flags(),
        "-c",
        "-o",
        str(tmp_path / "cuda.o"),
    ]
    proc = subprocess.run(_torch_compile_cmd(NVCC, src, extra), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_runner_declines_cpu_tensors_and_import_builds_nothing():
    x, w, b = torch.randn(4, 64), torch.randn(32, 64), torch.randn(32)
    profile = BucketProfile(bucket=(4,), shapes=((4, 64), (32, 64), (32,)))
    assert CudaSkinnyLinearRunner().get_valid_tactics((x, w, b), profile) == []
    assert CudaSkinnyLinearRunner().name == "cuda_skinny"
    assert not any(name.startswith("flashtune_skinny_gemm_") for name in sys.modules)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_load_without_cuda_raises_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a CUDA build of torch and an NVIDIA GPU"):
        load_skinny_gemm()


def test_tactic_space_is_pruned_and_default_is_in_range():
    for n, k in [(1, 64), (64, 96), (129, 1000), (256, 4096), (4096, 4096), (128256, 4096), (512, 16384)]:
        tactics = skinny_tactics(n, k, sms=132)
        assert tactics and len(set(tactics)) == len(tactics)
        for threads, npb, split in tactics + [default_tactic(n, k, sms=132)]:
            assert threads in THREADS and npb in N_PER_BLOCK and split in SPLIT_K
            assert npb == 1 or npb <= n
            assert split == 1 or (k >= 2048 and k // split >= 256)
    assert all(split == 1 for _, _, split in skinny_tactics(4096, 1024, sms=132))
    assert {split for _, _, split in skinny_tactics(256, 8192, sms=132)} == set(SPLIT_K)
    assert {split for _, _, split in skinny_tactics(128256, 4096, sms=132)} == {1}


# ---------------------------------------------------------------------------------------------- GPU

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # relative to max |ref|


def _profile(m, w, b):
    return BucketProfile(bucket=(m,), shapes=((m, w.shape[1]), tuple(w.shape), None if b is None else tuple(b.shape)))


def _poison_allocator(numel, dtype):
    """Leave NaN in the caching allocator's free blocks so an output element left unwritten shows."""
    for n in (numel, 8 * numel):
        torch.full((n,), float("nan"), dtype=dtype, device="cuda")


def _check(y, x, w, b):
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == ref.shape and y.dtype == x.dtype and y.device == x.device
    assert not torch.isnan(y).any(), "an output element was not written"
    scale = max(ref.abs().max().item(), 1e-6)
    err = (y.double() - ref).abs().max().item()
    assert err <= TOL[x.dtype] * scale, (err, scale)


def _inputs(m, n, k, dtype, bias, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) / k**0.5
    b = torch.randn(n, device="cuda", dtype=dtype, generator=g) if bias else None
    return x, w, b


@needs_gpu
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k", [(64, 96), (129, 1000), (256, 4096)])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_every_tactic_matches_float64_reference(m, n, k, dtype, bias):
    runner = CudaSkinnyLinearRunner()
    x, w, b = _inputs(m, n, k, dtype, bias)
    before = [t.clone() for t in (x, w, b) if t is not None]
    tactics = runner.get_valid_tactics((x, w, b), _profile(m, w, b))
    assert tactics
    for tactic in [-1, *tactics]:
        _poison_allocator(m * n, dtype)
        _check(runner.forward((x, w, b), tactic), x, w, b)
    assert all(torch.equal(t0, t1) for t0, t1 in zip(before, [t for t in (x, w, b) if t is not None]))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_tactic_tuned_at_the_bucket_serves_every_smaller_m(dtype):
    runner = CudaSkinnyLinearRunner()
    x16, w, b = _inputs(16, 200, 2560, dtype, bias=True, seed=1)
    for tactic in runner.get_valid_tactics((x16, w, b), _profile(16, w, b)):
        for m in range(1, 17):
            x = x16[:m]
            _poison_allocator(m * 200, dtype)
            _check(runner.forward((x, w, b), tactic), x, w, b)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k,offset", [(1000, 0), (1000, 1), (1001, 0), (100, 3), (4096, 1)])
def test_strided_misaligned_and_odd_k_inputs(dtype, k, offset):
    """x rows with a wider row stride, x and w at misaligned addresses, K not a multiple of 8."""
    runner = CudaSkinnyLinearRunner()
    m, n = 5, 77
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(m, k + 24, device="cuda", dtype=dtype, generator=g)[:, offset : offset + k]
    w = torch.randn(n * k + offset, device="cuda", dtype=dtype, generator=g)[offset:].view(n, k) / k**0.5
    b = torch.randn(n, device="cuda", dtype=dtype, generator=g)
    assert x.stride() == (k + 24, 1) and w.is_contiguous()
    for tactic in [-1, *runner.get_valid_tactics((x, w, b), _profile(m, w, b))]:
        _poison_allocator(m * n, dtype)
        _check(runner.forward((x, w, b), tactic), x, w, b)


@needs_gpu
def test_bad_arguments_raise_clear_errors():
    mod = load_skinny_gemm()
    x, w, b = _inputs(4, 64, 128, torch.float16, bias=True)
    with pytest.raises(RuntimeError, match="invalid tactic"):
        mod.skinny_linear(x, w, b, 64, 1, 1)
    with pytest.raises(RuntimeError, match="M must be <= 16"):
        mod.skinny_linear(torch.randn(17, 128, device="cuda", dtype=torch.float16), w, b, 128, 1, 1)
    with pytest.raises(RuntimeError, match="w is"):
        mod.skinny_linear(x, w.float(), None, 128, 1, 1)
    with pytest.raises(ValueError, match="invalid cuda_skinny tactic"):
        CudaSkinnyLinearRunner().forward((x, w, b), (128, 3, 1))
    w_strided = w.t().contiguous().t()  # same shape, not contiguous
    assert CudaSkinnyLinearRunner().get_valid_tactics((x, w_strided, b), _profile(4, w, b)) == []
    y = mod.skinny_linear(x[:0], w, None, 128, 1, 1)
    assert y.shape == (0, 64)
