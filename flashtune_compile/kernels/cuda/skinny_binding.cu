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
