// What the CPU kernel sources share: the vector width this build targets, vector types as GCC
// vector extensions (so -march=native picks AVX-512, AVX2 or SSE by itself), widening loads of
// fp32 / bf16 / fp16 and of bytes, prefetch localities, and the functions one source defines for
// another.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define FT_PAIRS 1  // vdpbf16ps: bf16 multiplied in pairs of k, summed in fp32
#include <immintrin.h>
#else
#define FT_PAIRS 0
#endif

namespace ft {

#if defined(__AVX512F__)
constexpr int VL = 16;
#elif defined(__AVX__)
constexpr int VL = 8;
#else
constexpr int VL = 4;
#endif

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// (row[2p], row[2p + 1]) as bf16 bits in 32, low half first, the second zero past K: one step of
// an x panel that vdpbf16ps multiplies in pairs of k.
inline uint32_t bf16_pair(const c10::BFloat16* row, int64_t p, int64_t K) {
  const uint32_t lo = row[2 * p].x, hi = 2 * p + 1 < K ? row[2 * p + 1].x : 0;
  return lo | (hi << 16);
}
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Prefetch localities (__builtin_prefetch): L2 (prefetcht1) for data summed soon, which must not
// evict what is being summed now; non-temporal (prefetchnta), just ahead of a stream read once. On
// the AMD EPYC (Zen 4) this was measured on, lines fetched so do not enter the last-level cache,
// which then keeps what the code between the linears uses: bench_cpu_block's fp32 block at T = 1
// spent 0.23 ms outside its linears, against 0.45 ms.
constexpr int TO_L2 = 2, NON_TEMPORAL = 0;

// How a stream read once (decode: one row tile) is fetched ahead. On AMD CPUs non-temporally, just
// ahead (above). Elsewhere into L2, STREAM_L2_AHEAD bytes ahead: on an Intel Xeon VM (AMX,
// AVX512_BF16) prefetchnta fills L1 alone and held a core to about 6 GB/s at any distance (256 B to
// 8 KB), while 8 KB ahead into L2 ran the int8 decode kernel 3.6x and the bf16 one 1.17x faster
// (4-16 KB: alike).
constexpr int64_t STREAM_L2_AHEAD = 8192;
inline bool stream_non_temporal() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
#else
  return false;
#endif
}

typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vf_u __attribute__((vector_size(VL * 4), aligned(4)));
typedef uint16_t vu16_u __attribute__((vector_size(VL * 2), aligned(2)));
typedef uint32_t vu32 __attribute__((vector_size(VL * 4)));
typedef uint16_t vu16 __attribute__((vector_size(VL * 2)));
typedef _Float16 vh_u __attribute__((vector_size(VL * 2), aligned(2)));
typedef _Float16 vh __attribute__((vector_size(VL * 2)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline vf load(const c10::BFloat16* p) {
  vu32 bits = __builtin_convertvector(*reinterpret_cast<const vu16_u*>(p), vu32) << 16;
  return reinterpret_cast<vf&>(bits);
}
inline vf load(const c10::Half* p) { return __builtin_convertvector(*reinterpret_cast<const vh_u*>(p), vf); }

typedef int32_t vi32 __attribute__((vector_size(VL * 4)));

// VL bytes at p widened to VL int32 lanes, signed or not: one vpmovsxbd / vpmovzxbd on AVX2 and
// AVX-512 (GCC's generic vector conversion of bytes assembles the lanes one by one: 7x slower).
template <bool SIGNED>
inline vi32 widen_bytes(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (vi32)(SIGNED ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (vi32)(SIGNED ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
#else
  vi32 v;
  for (int i = 0; i < VL; ++i) v[i] = SIGNED ? static_cast<int8_t>(p[i]) : p[i];
  return v;
#endif
}

// dst[0..n) = src[0..n) rounded to T as static_cast<T> rounds (nearest even; NaN stays NaN).
inline void store_row(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store_row(c10::BFloat16* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    const vf v = load(src + i);
    const vu32 bits = reinterpret_cast<const vu32&>(v);
    const vu32 nan = (vu32)(v != v);  // all ones where v is NaN
    const vu32 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const vu32 out = (rounded & ~nan) | (0x7FC0u & nan);
    *reinterpret_cast<vu16_u*>(dst + i) = __builtin_convertvector(out, vu16);
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}
inline void store_row(c10::Half* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + VL <= n; i += VL) *reinterpret_cast<vh_u*>(dst + i) = __builtin_convertvector(load(src + i), vh);
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

}  // namespace ft

// rows_gemm.cpp: y = x @ w.T + b reading w [N, K] as it is (row stride free, unit column stride);
// "" or a message naming the bad argument.
std::string rows_linear_out(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                            const at::Tensor& y, int64_t mb, int64_t u, bool pairs);
std::string rows_tiles();  // the built (rows per pass, unroll) pairs, "1x2 1x4 ..."
// rows_gemm.cpp: the same for an integer weight q [N, K] (int8 storage) with scales [N, G] and
// optional zeros [N, G] per group of gs along K, W = s * (q - z), read as they are; "" or a message.
std::string quant_rows_linear_out(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                                  const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& y, int64_t gs, int64_t mb);
std::string quant_rows_heights();  // the built rows-per-pass heights, "1 2 4"

// quant_gemm.cpp: y = x @ W^T + b for W = s * (q - z) per group of gs along K, from the packed q,
// scales and zs (the file's header gives the layouts); "" or a message naming the bad argument.
std::string quant_linear_out(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                             const at::Tensor& zs, const std::optional<at::Tensor>& bias, const at::Tensor& y,
                             int64_t bits, int64_t gs, int64_t mr, int64_t r, int64_t ksplit);
std::string quant_tiles();  // the built (MR rows, R vectors) tiles, "1x2 1x4 ..."
