"""Hand-written CUDA kernels, built on first use with ``torch.utils.cpp_extension.load_inline``.

Nothing is compiled or imported at package import: ``load_skinny_gemm()`` builds the extension the
first time it is called (thread-safe, memoized for the process). torch caches the build on disk
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under a name that hashes the
sources and flags, so each machine compiles a given version once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Any

SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "skinny_gemm.cu")

# IEEE arithmetic on purpose: no --use_fast_math.
EXTRA_CUDA_CFLAGS = ("-O3", "-std=c++17")

# The torch side: argument checks, allocation, stream, dtype dispatch. Appended to skinny_gemm.cu.
BINDING_SOURCE = r"""
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream, without the cuBLAS/cuSPARSE headers
#include <torch/extension.h>

namespace {

template <typename T>
cudaError_t skinny_launch_typed(const at::Tensor& x, const at::Tensor& w, const at::Tensor* b,
                                at::Tensor& y, float* ws, flashtune::skinny::SkinnyTactic t) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t ldx = M > 1 ? x.stride(0) : K;
  return flashtune::skinny::launch_skinny_gemm<T>(
      reinterpret_cast<const T*>(x.data_ptr()), ldx, reinterpret_cast<const T*>(w.data_ptr()),
      b ? reinterpret_cast<const T*>(b->data_ptr()) : nullptr, reinterpret_cast<T*>(y.data_ptr()),
      ws, M, N, K, t, at::cuda::getCurrentCUDAStream().stream());
}

}  // namespace

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                         int64_t threads, int64_t n_per_block, int64_t split_k) {
  TORCH_CHECK(x.is_cuda(), "skinny_linear: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(w.device() == x.device(), "skinny_linear: w is on ", w.device(), ", x on ", x.device());
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "skinny_linear: expected x [M, K] and w [N, K], got ",
              x.sizes(), " and ", w.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "skinny_linear: x is [", M, ", ", K, "] but w is ", w.sizes());
  TORCH_CHECK(M <= 16, "skinny_linear: M must be <= 16, got M = ", M);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "skinny_linear: dtype must be float16, bfloat16 or float32, got ", dtype);
  TORCH_CHECK(w.scalar_type() == dtype, "skinny_linear: w is ", w.scalar_type(), ", x is ", dtype);
  TORCH_CHECK(x.stride(1) == 1 || K <= 1, "skinny_linear: x needs unit stride along K, got strides ",
              x.strides());
  TORCH_CHECK(w.is_contiguous(), "skinny_linear: w must be contiguous [N, K], got strides ", w.strides());
  const at::Tensor* bias = nullptr;
  if (b.has_value() && b->defined()) {
    bias = &*b;
    TORCH_CHECK(bias->device() == x.device(), "skinny_linear: b is on ", bias->device(), ", x on ",
                x.device());
    TORCH_CHECK(bias->scalar_type() == dtype, "skinny_linear: b is ", bias->scalar_type(), ", x is ", dtype);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "skinny_linear: b must be [", N, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->stride(0) == 1 || N <= 1, "skinny_linear: b must be contiguous");
  }
  const flashtune::skinny::SkinnyTactic tactic{static_cast<int>(threads), static_cast<int>(n_per_block),
                                               static_cast<int>(split_k)};
  TORCH_CHECK(flashtune::skinny::skinny_tactic_is_valid(tactic),
              "skinny_linear: invalid tactic (threads=", threads, ", n_per_block=", n_per_block,
              ", split_k=", split_k, "); need threads in {128, 256}, n_per_block and split_k in {1, 2, 4, 8}");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  at::Tensor ws;
  if (split_k > 1) ws = at::empty({split_k, M, N}, x.options().dtype(at::kFloat));
  float* ws_ptr = split_k > 1 ? ws.data_ptr<float>() : nullptr;

  cudaError_t err;
  if (dtype == at::kHalf)
    err = skinny_launch_typed<__half>(x, w, bias, y, ws_ptr, tactic);
  else if (dtype == at::kBFloat16)
    err = skinny_launch_typed<__nv_bfloat16>(x, w, bias, y, ws_ptr, tactic);
  else
    err = skinny_launch_typed<float>(x, w, bias, y, ws_ptr, tactic);
  TORCH_CHECK(err == cudaSuccess, "skinny_linear: launch failed: ", cudaGetErrorString(err), " (M=", M,
              ", N=", N, ", K=", K, ", tactic=(", threads, ", ", n_per_block, ", ", split_k, "))");
  return y;
}
"""

CPP_SOURCE = (
    "at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,"
    " int64_t threads, int64_t n_per_block, int64_t split_k);"
)

log = logging.getLogger("flashtune")
_lock = threading.Lock()
_module: Any = None
_error: BaseException | None = None


def skinny_gemm_sources() -> tuple[str, str]:
    """(cpp_source, cuda_source) exactly as given to ``load_inline``."""
    with open(SOURCE_PATH, encoding="utf-8") as f:
        return CPP_SOURCE, f.read() + "\n" + BINDING_SOURCE


def extension_name(cpp_source: str, cuda_source: str) -> str:
    """``flashtune_skinny_gemm_<hash>``: a new name (a new build) whenever the sources or flags change."""
    digest = hashlib.sha256("\0".join([cpp_source, cuda_source, *EXTRA_CUDA_CFLAGS]).encode()).hexdigest()
    return f"flashtune_skinny_gemm_{digest[:12]}"


def load_skinny_gemm() -> Any:
    """The compiled extension (``.skinny_linear(x, w, b | None, threads, n_per_block, split_k)``).

    Builds on first call, at most once per process; a failed build is remembered and re-raised.
    RuntimeError when this torch has no CUDA or no GPU is visible."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(f"the CUDA skinny GEMM kernel failed to build earlier: {_error}") from _error
        import torch

        if torch.version.cuda is None or not torch.cuda.is_available():
            raise RuntimeError(
                "the CUDA skinny GEMM kernel needs a CUDA build of torch and an NVIDIA GPU "
                f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, "
                f"cuda available={torch.cuda.is_available()})"
            )
        from torch.utils.cpp_extension import load_inline

        cpp_source, cuda_source = skinny_gemm_sources()
        name = extension_name(cpp_source, cuda_source)
        log.info("compiling the CUDA skinny GEMM kernel (once per machine): %s", name)
        try:
            _module = load_inline(
                name=name,
                cpp_sources=[cpp_source],
                cuda_sources=[cuda_source],
                functions=["skinny_linear"],
                extra_cuda_cflags=list(EXTRA_CUDA_CFLAGS),
                verbose=False,
            )
        except Exception as e:  # a compiler or toolchain error: do not retry on every call
            _error = e
            raise RuntimeError(f"building the CUDA skinny GEMM kernel failed: {e}") from e
        return _module
