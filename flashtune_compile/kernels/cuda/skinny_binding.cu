// The torch binding of the skinny-M linear (skinny_gemm.cu): argument checks, allocation, stream,
// dtype dispatch. Host code, but compiled by nvcc appended to skinny_gemm.cu (it instantiates the
// kernel's launch template), through torch.utils.cpp_extension.load_inline (see __init__.py).
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

// Every failed check returns its message from skinny_linear_out: the binding never throws for bad
// arguments (a C++ exception crossing this extension's boundary crashed a process on the H200
// image, 2026-11-30), and the Python wrapper (__init__.py) raises the message as a RuntimeError.
#define FT_REQUIRE(cond, ...) \
  if (!(cond)) return c10::str("skinny_linear: ", __VA_ARGS__)

std::string skinny_linear_out(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                              at::Tensor& y, const std::optional<at::Tensor>& workspace, int64_t threads,
                              int64_t n_per_block, int64_t split_k) {
  FT_REQUIRE(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  FT_REQUIRE(w.device() == x.device(), "w is on ", w.device(), ", x on ", x.device());
  FT_REQUIRE(x.dim() == 2 && w.dim() == 2, "expected x [M, K] and w [N, K], got ", x.sizes(), " and ", w.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  FT_REQUIRE(w.size(1) == K, "x is [", M, ", ", K, "] but w is ", w.sizes());
  FT_REQUIRE(M <= 16, "M must be <= 16, got M = ", M);
  const auto dtype = x.scalar_type();
  FT_REQUIRE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
             "dtype must be float16, bfloat16 or float32, got ", dtype);
  FT_REQUIRE(w.scalar_type() == dtype, "w is ", w.scalar_type(), ", x is ", dtype);
  FT_REQUIRE(x.stride(1) == 1 || K <= 1, "x needs unit stride along K, got strides ", x.strides());
  FT_REQUIRE(w.is_contiguous(), "w must be contiguous [N, K], got strides ", w.strides());
  const at::Tensor* bias = nullptr;
  if (b.has_value() && b->defined()) {
    bias = &*b;
    FT_REQUIRE(bias->device() == x.device(), "b is on ", bias->device(), ", x on ", x.device());
    FT_REQUIRE(bias->scalar_type() == dtype, "b is ", bias->scalar_type(), ", x is ", dtype);
    FT_REQUIRE(bias->dim() == 1 && bias->size(0) == N, "b must be [", N, "], got ", bias->sizes());
    FT_REQUIRE(bias->stride(0) == 1 || N <= 1, "b must be contiguous");
  }
  const flashtune::skinny::SkinnyTactic tactic{static_cast<int>(threads), static_cast<int>(n_per_block),
                                               static_cast<int>(split_k)};
  FT_REQUIRE(flashtune::skinny::skinny_tactic_is_valid(tactic), "invalid tactic (threads=", threads,
             ", n_per_block=", n_per_block, ", split_k=", split_k,
             "); need threads in {128, 256}, n_per_block and split_k in {1, 2, 4, 8}");
  FT_REQUIRE(y.device() == x.device() && y.scalar_type() == dtype && y.dim() == 2 && y.size(0) == M &&
                 y.size(1) == N && y.is_contiguous(),
             "y must be a contiguous [", M, ", ", N, "] ", dtype, " tensor on ", x.device(), ", got ", y.sizes(),
             " ", y.scalar_type());
  if (M == 0 || N == 0) return "";
  float* ws_ptr = nullptr;
  if (split_k > 1) {
    FT_REQUIRE(workspace.has_value() && workspace->defined() && workspace->device() == x.device() &&
                   workspace->scalar_type() == at::kFloat && workspace->is_contiguous() &&
                   workspace->numel() >= split_k * M * N,
               "split_k = ", split_k, " needs a contiguous float32 workspace of ", split_k * M * N,
               " elements on ", x.device());
    ws_ptr = workspace->data_ptr<float>();
  }

  const c10::cuda::CUDAGuard guard(x.device());
  cudaError_t err;
  if (dtype == at::kHalf)
    err = skinny_launch_typed<__half>(x, w, bias, y, ws_ptr, tactic);
  else if (dtype == at::kBFloat16)
    err = skinny_launch_typed<__nv_bfloat16>(x, w, bias, y, ws_ptr, tactic);
  else
    err = skinny_launch_typed<float>(x, w, bias, y, ws_ptr, tactic);
  FT_REQUIRE(err == cudaSuccess, "launch failed: ", cudaGetErrorString(err), " (M=", M, ", N=", N, ", K=", K,
             ", tactic=(", threads, ", ", n_per_block, ", ", split_k, "))");
  return "";
}

#undef FT_REQUIRE
