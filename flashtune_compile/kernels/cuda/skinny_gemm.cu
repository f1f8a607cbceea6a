// Skinny-M linear for decode-sized batches: y[M, N] = x[M, K] @ w[N, K]^T (+ b[N]), 1 <= M <= 16.
//
// With M this small cuBLAS runs a tile GEMM that leaves most of the memory bandwidth unused. This
// kernel is a multi-row GEMV instead: every element of w is loaded from global memory exactly once
// and multiplied against all M rows of x, which stay hot in L1/L2 (x is tiny next to w).
//
// Design (guarantees in brackets):
//  * grid = (ceil(N / n_per_block), split_k); a block owns n_per_block rows of w and one K slice.
//  * Each thread keeps R rows of w x MT rows of x in fp32 accumulators (R * MT <= 64 registers;
//    MT = M rounded up to one of 1, 2, 3, 4, 6, 8, 12, 16; rows m >= M load nothing). The block's
//    rows are split into n_per_block / R row groups; the warps of a group split the K slice.
//  * Vector path [when w and x are 16-byte aligned and K, ldx are multiples of the vector width]:
//    coalesced 16-byte loads (a warp reads 512 contiguous bytes of a w row per load), w with
//    L1::no_allocate (it is streamed once), x through the read-only path. Otherwise (a misaligned
//    pointer, or K not a multiple of the width, which misaligns every other row of w) the scalar
//    path runs the same schedule with one masked element per load [any alignment, any K].
//  * Reduction: a reduce-scatter over warp shuffles (V/2 + V/4 + ... shuffles for V partial sums,
//    not 5 * V), then a fixed-order sum over the warps of a group through shared memory.
//  * split_k == 1: the epilogue adds the bias in fp32 and casts to T. split_k > 1: every block
//    writes its fp32 partials to workspace[split][M][N] (plain stores, every element written), and a
//    second tiny kernel sums the splits in a fixed order, adds the bias and casts
//    [deterministic: no atomics, no memset, bitwise reproducible run to run].
//  * Accumulation is fp32 with IEEE fmaf; the output is rounded once to T (round-to-nearest-even).
//
// Only CUDA headers: the torch binding lives in skinny_binding.cu, next to this file.

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace flashtune {
namespace skinny {

constexpr int kMaxM = 16;         // largest M supported
constexpr int kMaxWarps = 8;      // 256 threads
constexpr int kMaxAccum = 64;     // R * MT fp32 accumulators per thread, at most
constexpr int64_t kMaxK = int64_t(1) << 30;

// The launch configuration the tuner chooses: threads in {128, 256}, n_per_block in {1, 2, 4, 8},
// split_k in {1, 2, 4, 8}. Any valid tactic is correct for every M in [1, 16].
struct SkinnyTactic {
  int threads;
  int n_per_block;
  int split_k;
};

// ---------------------------------------------------------------------------------------------
// Per-dtype conversions. kVec elements make one 16-byte vector.

template <typename T> struct Traits;

template <> struct Traits<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
  __device__ __forceinline__ static void unpack(const uint4& v, float (&out)[4]) {
    out[0] = __uint_as_float(v.x);
    out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z);
    out[3] = __uint_as_float(v.w);
  }
};

template <> struct Traits<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static void unpack(const uint4& v, float (&out)[8]) {
    const unsigned int words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      h = *reinterpret_cast<const __half2*>(&words[i]);
      const float2 f = __half22float2(h);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};

template <> struct Traits<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static void unpack(const uint4& v, float (&out)[8]) {
    // bf16 is the high half of an fp32: widening is a shift / mask, exact.
    const unsigned int words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
};

// 16-byte loads. Not `volatile`, so the compiler may hoist and batch them.
__device__ __forceinline__ uint4 load_stream_16B(const void* p) {  // w: read once, skip L1
  uint4 r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
#else
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
#endif
  return r;
}

__device__ __forceinline__ uint4 load_ro_16B(const void* p) {  // x: re-read by every row group
  uint4 r;
  asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// Loads VEC elements at p as fp32 (VEC == 1: one scalar through the read-only path).
template <typename T, int VEC, bool kStream>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = Traits<T>::to_float(__ldg(p));
  } else {
    static_assert(VEC == Traits<T>::kVec, "vector loads are 16 bytes");
    Traits<T>::unpack(kStream ? load_stream_16B(p) : load_ro_16B(p), out);
  }
}

// ---------------------------------------------------------------------------------------------
// Warp reduce-scatter of V partial sums (V a power of two). Afterwards lane L holds the warp total
// of value (L * V) / 32 + i in v[i], for i < max(1, V / 32).
template <int V, int CUR, int OFF>
__device__ __forceinline__ void warp_reduce_scatter(float (&v)[V], int lane) {
  if constexpr (OFF >= 1) {
    if constexpr (CUR > 1) {
      constexpr int H = CUR / 2;
      const bool upper = (lane & OFF) != 0;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const float send = upper ? v[i] : v[i + H];
        const float keep = upper ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
      }
      warp_reduce_scatter<V, H, OFF / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], OFF);
      warp_reduce_scatter<V, 1, OFF / 2>(v, lane);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Smallest power of two >= v (the reduce-scatter works on power-of-two lengths).
__host__ __device__ constexpr int pow2_ceil(int v) { return v <= 1 ? 1 : 2 * pow2_ceil((v + 1) / 2); }

// Main kernel. T: element type; MT: M rounded up to a tile in {1, 2, 3, 4, 6, 8, 12, 16} (rows
// m >= M load nothing and are never stored); R: rows of w per thread; kVector: 16-byte loads (host
// checked alignment) or one element per load. All loads of an iteration are issued branch-free
// (predicated) before the FMAs that consume them.
template <typename T, int MT, int R, bool kVector>
__global__ void __launch_bounds__(kMaxWarps * 32)
skinny_gemm_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ w,
                   const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ workspace,
                   int M, int N, int K, int n_per_block) {
  constexpr int VEC = kVector ? Traits<T>::kVec : 1;
  constexpr int V = pow2_ceil(R * MT);  // partial sums per thread, padded with zeros
  // K steps in flight per thread: 2 while registers allow (more rows already give more loads).
  constexpr int U = (R >= 4 || R * MT > 16) ? 1 : 2;
  static_assert(R * MT <= kMaxAccum, "too many accumulators");
  __shared__ float red[kMaxWarps * V];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  const int row_groups = n_per_block / R;               // host: R divides n_per_block
  const int warps_per_group = num_warps / row_groups;   // host: row_groups divides num_warps
  const int group = warp / warps_per_group;
  const int row0 = blockIdx.x * n_per_block + group * R;

  // This block's K slice: split boundaries are multiples of VEC, so vectors never straddle them.
  // K <= 2^30 (host check), so 32-bit indices along K cannot overflow.
  const int split_k = gridDim.y;
  const int chunk = ((K + split_k - 1) / split_k + VEC - 1) / VEC * VEC;
  const int k_lo = min(K, static_cast<int>(blockIdx.y) * chunk);
  const int k_hi = min(K, k_lo + chunk);

  // Rows past N are clamped to N - 1 (valid memory); their results are never stored.
  const T* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wrow[r] = w + static_cast<int64_t>(min(row0 + r, N - 1)) * K;

  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

  const int step = warps_per_group * 32 * VEC;
  const int ldx32 = static_cast<int>(ldx);  // host: (M - 1) * ldx + K < 2^31
  for (int k = k_lo + ((warp % warps_per_group) * 32 + lane) * VEC; k < k_hi; k += U * step) {
    float wf[U][R][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool live = u == 0 || k + u * step < k_hi;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (live) {
          load_vec<T, VEC, true>(wrow[r] + k + u * step, wf[u][r]);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) wf[u][r][j] = 0.f;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool live = u == 0 || k + u * step < k_hi;
      float xf[MT][VEC];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (live && m < M) {
          load_vec<T, VEC, false>(x + (m * ldx32 + k + u * step), xf[m]);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) xf[m][j] = 0.f;
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[r][m] = fmaf(wf[u][r][j], xf[m][j], acc[r][m]);
    }
  }

  // Warp reduce-scatter, then one copy of each warp total to shared memory.
  float v[V];
#pragma unroll
  for (int i = 0; i < V; ++i) v[i] = i < R * MT ? acc[i / MT][i % MT] : 0.f;
  warp_reduce_scatter<V, V, 16>(v, lane);
  constexpr int kPerLane = V >= 32 ? V / 32 : 1;
  constexpr int kLanesPerValue = V >= 32 ? 1 : 32 / V;
  if (lane % kLanesPerValue == 0) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) red[warp * V + (lane * V) / 32 + i] = v[i];
  }
  __syncthreads();

  // Epilogue: thread t owns output (m, n) with n fastest, so stores are coalesced along N.
  for (int t = threadIdx.x; t < n_per_block * M; t += blockDim.x) {
    const int j = t % n_per_block;
    const int m = t / n_per_block;
    const int n = blockIdx.x * n_per_block + j;
    if (n >= N) continue;
    const float* src = red + (j / R) * warps_per_group * V + (j % R) * MT + m;
    float sum = 0.f;
    for (int q = 0; q < warps_per_group; ++q) sum += src[q * V];  // fixed order
    if (workspace == nullptr) {
      if (bias != nullptr) sum += Traits<T>::to_float(bias[n]);
      y[static_cast<int64_t>(m) * N + n] = Traits<T>::from_float(sum);
    } else {
      workspace[(static_cast<int64_t>(blockIdx.y) * M + m) * N + n] = sum;
    }
  }
}

// Split-K finish: y[m, n] = sum over splits (in order) of workspace[s, m, n] + bias[n], cast to T.
template <typename T>
__global__ void __launch_bounds__(256)
splitk_reduce_kernel(const float* __restrict__ workspace, const T* __restrict__ bias,
                     T* __restrict__ y, int64_t total, int N, int split_k) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  float sum = 0.f;
  for (int s = 0; s < split_k; ++s) sum += workspace[s * total + idx];
  if (bias != nullptr) sum += Traits<T>::to_float(bias[idx % N]);
  y[idx] = Traits<T>::from_float(sum);
}

// ---------------------------------------------------------------------------------------------
// Host side.

inline bool is_pow2_in(int v, int lo, int hi) { return v >= lo && v <= hi && (v & (v - 1)) == 0; }

// True when the tactic is one of threads {128, 256} x n_per_block {1, 2, 4, 8} x split_k {1, 2, 4, 8}.
inline bool skinny_tactic_is_valid(const SkinnyTactic& t) {
  return (t.threads == 128 || t.threads == 256) && is_pow2_in(t.n_per_block, 1, 8) &&
         is_pow2_in(t.split_k, 1, 8);
}

// fp32 workspace the caller must provide when split_k > 1 (0 bytes otherwise).
inline size_t skinny_gemm_workspace_bytes(int64_t M, int64_t N, int split_k) {
  return split_k > 1 ? static_cast<size_t>(split_k) * M * N * sizeof(float) : 0;
}

namespace detail {

template <typename T, int MT, int R, bool kVector>
cudaError_t launch_main(const T* x, int64_t ldx, const T* w, const T* bias, T* y, float* ws, int M,
                        int N, int K, const SkinnyTactic& t, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((static_cast<int64_t>(N) + t.n_per_block - 1) / t.n_per_block),
                  static_cast<unsigned>(t.split_k));
  skinny_gemm_kernel<T, MT, R, kVector><<<grid, t.threads, 0, stream>>>(
      x, ldx, w, bias, y, t.split_k > 1 ? ws : nullptr, M, N, K, t.n_per_block);
  return cudaGetLastError();
}

// Rows of w per thread (a power of two dividing n_per_block, so that the row groups divide the
// warps). Vector path: as many of the block's rows as the accumulator budget allows (each x load
// is reused R times). Scalar path: the fewest that give every warp a row (n_per_block / warps).
template <typename T, int MT, bool kVector>
cudaError_t dispatch_rows(const T* x, int64_t ldx, const T* w, const T* bias, T* y, float* ws, int M,
                          int N, int K, const SkinnyTactic& t, cudaStream_t stream) {
  int rows = t.n_per_block;
  if (kVector) {
    while (rows * MT > kMaxAccum) rows /= 2;
  } else {
    rows = t.n_per_block > t.threads / 32 ? t.n_per_block / (t.threads / 32) : 1;
  }
  switch (rows) {
    case 1: return launch_main<T, MT, 1, kVector>(x, ldx, w, bias, y, ws, M, N, K, t, stream);
    case 2: return launch_main<T, MT, 2, kVector>(x, ldx, w, bias, y, ws, M, N, K, t, stream);
    case 4:
      if constexpr (kVector && 4 * MT <= kMaxAccum)
        return launch_main<T, MT, 4, kVector>(x, ldx, w, bias, y, ws, M, N, K, t, stream);
      break;
    case 8:
      if constexpr (kVector && 8 * MT <= kMaxAccum)
        return launch_main<T, MT, 8, kVector>(x, ldx, w, bias, y, ws, M, N, K, t, stream);
      break;
    default:
      break;
  }
  return cudaErrorInvalidConfiguration;  // unreachable for a valid tactic
}

template <typename T, bool kVector>
cudaError_t dispatch_m(const T* x, int64_t ldx, const T* w, const T* bias, T* y, float* ws, int M,
                       int N, int K, const SkinnyTactic& t, cudaStream_t stream) {
  switch (M) {
    case 1: return dispatch_rows<T, 1, kVector>(x, ldx, w, bias, y, ws, M, N, K, t, stream);
    case 2: return dispatch_rows<T, 2, kVector>(x, ldx, w, bias, y, ws, M, N, K, t, stream);
    case 3: return dispatch_rows<T, 3, kVector>(x, ldx, w, bias, y, ws, M, N, K, t, stream);
    case 4: return dispatch_rows<T, 4, kVector>(x, ldx, w, bias, y, ws, M, N, K, t, stream);
    case 5:
    case 6: return dispatch_rows<T, 6, kVector>(x, ldx, w, bias, y, ws, M, N, K, t, stream);
    case 7:
    case 8: return dispatch_rows<T, 8, kVector>(x, ldx, w, bias, y, ws, M, N, K, t, stream);
    case 9: case 10: case 11:
    case 12: return dispatch_rows<T, 12, kVector>(x, ldx, w, bias, y, ws, M, N, K, t, stream);
    default: return dispatch_rows<T, 16, kVector>(x, ldx, w, bias, y, ws, M, N, K, t, stream);
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace detail

// y[M, N] (contiguous) = x[M, K] (row stride ldx, unit column stride) @ w[N, K]^T (contiguous)
// + bias[N] (nullptr: none). Limits: M <= 16, N < 2^31, K <= 2^30, (M - 1) * ldx + K < 2^31. workspace: skinny_gemm_workspace_bytes(M, N, split_k) bytes of any
// alignment-4 device memory when split_k > 1, else ignored. Returns cudaErrorInvalidValue (and
// launches nothing) for an invalid tactic or size; otherwise cudaGetLastError() after the launch(es).
template <typename T>
cudaError_t launch_skinny_gemm(const T* x, int64_t ldx, const T* w, const T* bias, T* y,
                               float* workspace, int64_t M, int64_t N, int64_t K,
                               SkinnyTactic tactic, cudaStream_t stream) {
  if (!skinny_tactic_is_valid(tactic)) return cudaErrorInvalidValue;
  if (M < 0 || M > kMaxM || N < 0 || N > INT32_MAX || K < 0 || K > kMaxK || ldx < 0 ||
      (M > 1 && (M - 1) * ldx + K > INT32_MAX))  // x offsets are 32-bit in the kernel
    return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;  // nothing to write
  if (x == nullptr || w == nullptr || y == nullptr || (tactic.split_k > 1 && workspace == nullptr))
    return cudaErrorInvalidValue;

  constexpr int kVec = Traits<T>::kVec;
  const bool vector_ok = detail::aligned16(x) && detail::aligned16(w) && K % kVec == 0 &&
                         (M == 1 || ldx % kVec == 0);
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const cudaError_t err =
      vector_ok ? detail::dispatch_m<T, true>(x, ldx, w, bias, y, workspace, m, n, k, tactic, stream)
                : detail::dispatch_m<T, false>(x, ldx, w, bias, y, workspace, m, n, k, tactic, stream);
  if (err != cudaSuccess) return err;
  if (tactic.split_k > 1) {
    const int64_t total = M * N;
    const unsigned blocks = static_cast<unsigned>((total + 255) / 256);
    splitk_reduce_kernel<T><<<blocks, 256, 0, stream>>>(workspace, bias, y, total, n, tactic.split_k);
  }
  return cudaGetLastError();
}

// The instantiations the binding uses.
template cudaError_t launch_skinny_gemm<float>(const float*, int64_t, const float*, const float*,
                                               float*, float*, int64_t, int64_t, int64_t,
                                               SkinnyTactic, cudaStream_t);
template cudaError_t launch_skinny_gemm<__half>(const __half*, int64_t, const __half*, const __half*,
                                                __half*, float*, int64_t, int64_t, int64_t,
                                                SkinnyTactic, cudaStream_t);
template cudaError_t launch_skinny_gemm<__nv_bfloat16>(const __nv_bfloat16*, int64_t,
                                                       const __nv_bfloat16*, const __nv_bfloat16*,
                                                       __nv_bfloat16*, float*, int64_t, int64_t,
                                                       int64_t, SkinnyTactic, cudaStream_t);

}  // namespace skinny
}  // namespace flashtune
