// y[M, N] = x[M, K] @ W^T + b on CPU, reading W [N, K] as it is: no copy, no re-layout.
//
// Every output is the dot product of a row of x with a row of W, so a thread streams its share of
// W's rows front to back, one sequential stream (the rows of a row-major W are adjacent), and the
// few rows of x it multiplies stay in L1. A task takes one row of W against MB rows of x, with U
// independent fp32 accumulators per x row (enough chains to hide the multiply latency), adds them
// and reduces across the vector at the end of the row. bf16 on CPUs with AVX512_BF16 multiplies
// pairs of k with vdpbf16ps straight from W's own layout (a row-major bf16 row already holds k in
// pairs); everything else widens W in registers (fp16, bf16) and uses FMA against x in fp32.
// Measured on the AMD EPYC (Zen 4) this was written on, bf16 N x K = 8192 x 3072 at M = 1 with W
// on 2 MB pages: 56-59 GB/s, as fast as the blocked kernel on its prepacked copy (56 GB/s); on 4 KB
// pages about 6% slower. Meant for decode-sized M: each row of W is read once for all M rows, but
// the multiplies re-read x for every row of W, so past M = 8 the blocked kernel is the one to use.
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

using namespace ft;

namespace {

constexpr int64_t AHEAD = 2048;  // bytes ahead of the row stream, fetched into L2 (512 B: slower; 8 KB: no better)

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}

// FMA: x rows as fp32 (packed once per call into xs, MB rows per tile, K floats each), W widened.
template <typename T>
struct RowsFma {
  using XElem = float;
  static constexpr int KPV = VL;  // k per vector
  static XElem pack_x(const T* row, int64_t k) { return static_cast<float>(row[k]); }
  // s[m] = sum_k xs[m][k] * w[k] for m < MB.
  template <int MB, int U>
  static void dot(const T* w, const XElem* xs, int64_t ldxs, int64_t K, float* s) {
    vf acc[MB][U];  // every index below is a constant once unrolled, so these stay in registers
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
      for (int u = 0; u < U; ++u) acc[m][u] = vf{};
    const int64_t KU = K / (VL * U) * (VL * U);
    int64_t k = 0;
    for (; k < KU; k += VL * U) {
#pragma GCC unroll 16
      for (int u = 0; u < U; ++u) {
        __builtin_prefetch(reinterpret_cast<const char*>(w + k + u * VL) + AHEAD, 0, TO_L2);
        const vf wv = load(w + k + u * VL);
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) acc[m][u] += wv * load(xs + m * ldxs + k + u * VL);
      }
    }
    vf tail[MB];
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      tail[m] = acc[m][0];
#pragma GCC unroll 16
      for (int u = 1; u < U; ++u) tail[m] += acc[m][u];
    }
    for (; k + VL <= K; k += VL) {
      const vf wv = load(w + k);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) tail[m] += wv * load(xs + m * ldxs + k);
    }
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) s[m] = hsum(tail[m]);
    for (; k < K; ++k) {
      const float wk = static_cast<float>(w[k]);
      for (int m = 0; m < MB; ++m) s[m] += wk * xs[m * ldxs + k];
    }
  }
};

#if FT_PAIRS
// vdpbf16ps: x rows as bf16 bits, zero-padded to a multiple of 32 k; W read as it is, its tail
// (K not a multiple of 32) with a masked load, so nothing is read past a row.
struct RowsPairs {
  using XElem = uint16_t;
  static constexpr int KPV = 32;
  static XElem pack_x(const c10::BFloat16* row, int64_t k) { return row[k].x; }
  template <int MB, int U>
  static void dot(const c10::BFloat16* w, const XElem* xs, int64_t ldxs, int64_t K, float* s) {
    __m512 acc[MB][U];  // every index below is a constant once unrolled, so these stay in registers
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
      for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
    const int64_t KU = K / (32 * U) * (32 * U);
    int64_t k = 0;
    for (; k < KU; k += 32 * U) {
#pragma GCC unroll 16
      for (int u = 0; u < U; ++u) {
        __builtin_prefetch(reinterpret_cast<const char*>(w + k + u * 32) + AHEAD, 0, TO_L2);
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + u * 32);
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m)
          acc[m][u] = _mm512_dpbf16_ps(acc[m][u], wv, (__m512bh)_mm512_loadu_si512(xs + m * ldxs + k + u * 32));
      }
    }
    __m512 tail[MB];
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      tail[m] = acc[m][0];
#pragma GCC unroll 16
      for (int u = 1; u < U; ++u) tail[m] = _mm512_add_ps(tail[m], acc[m][u]);
    }
    for (; k < K; k += 32) {
      const int64_t left = std::min<int64_t>(32, K - k);
      const __mmask32 mask = left == 32 ? ~__mmask32(0) : __mmask32((uint32_t(1) << left) - 1);
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m)
        tail[m] = _mm512_dpbf16_ps(tail[m], wv, (__m512bh)_mm512_loadu_si512(xs + m * ldxs + k));
    }
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) s[m] = _mm512_reduce_add_ps(tail[m]);
  }
};
#endif

template <class Kern, typename T, int MB, int U>
void run(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& y) {
  using X = typename Kern::XElem;
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldw = w.stride(0), ldx = x.stride(0);
  const int64_t ldy = y.stride(0), tiles = ceil_div(M, MB), ldxs = round_up(std::max<int64_t>(K, 1), Kern::KPV);
  // The x panel: tile t holds rows t*MB .. t*MB+MB-1 (zero past M), each ldxs long (zero past K).
  std::unique_ptr<X[]> xs(new X[tiles * MB * ldxs]());
  const T* xp = x.data_ptr<T>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xs[m * ldxs + k] = Kern::pack_x(xp + m * ldx, k);
  const T* wp = w.data_ptr<T>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  const int64_t bstride = bias.has_value() ? bias->stride(0) : 0;
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float s[MB];
    for (int64_t n = n0; n < n1; ++n) {
      const float b = bp != nullptr ? static_cast<float>(bp[n * bstride]) : 0.f;
      for (int64_t t = 0; t < tiles; ++t) {
        Kern::template dot<MB, U>(wp + n * ldw, xs.get() + t * MB * ldxs, ldxs, K, s);
        for (int m = 0; m < MB && t * MB + m < M; ++m) yp[(t * MB + m) * ldy + n] = static_cast<T>(s[m] + b);
      }
    }
  });
}

using Fn = void (*)(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor&);

// The (MB rows of x per pass, U accumulators per row) that are built: MB * U accumulators fit.
#define FT_ROWS_TILES(X) X(1, 2) X(1, 4) X(2, 2) X(2, 4) X(4, 1) X(4, 2) X(8, 1)

template <class Kern, typename T>
Fn pick(int64_t mb, int64_t u) {
#define FT_CASE(A, B) \
  if (mb == A && u == B) return &run<Kern, T, A, B>;
  FT_ROWS_TILES(FT_CASE)
#undef FT_CASE
  return nullptr;
}

}  // namespace

std::string rows_tiles() {
  std::string s;
#define FT_NAME(A, B) s += std::to_string(A) + "x" + std::to_string(B) + " ";
  FT_ROWS_TILES(FT_NAME)
#undef FT_NAME
  return s;
}

std::string rows_linear_out(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                            const at::Tensor& y_out, int64_t mb, int64_t u, bool pairs) {
  at::Tensor y = y_out;  // written in place: the caller allocated it
  if (x.dim() != 2 || w.dim() != 2 || y.dim() != 2) return "rows_linear: expected x [M, K], w [N, K], y [M, N]";
  if (x.scalar_type() != w.scalar_type() || y.scalar_type() != x.scalar_type())
    return "rows_linear: x, w and y must share one dtype";
  if (x.device().type() != at::kCPU || w.device().type() != at::kCPU || y.device().type() != at::kCPU)
    return "rows_linear: CPU tensors only";
  if (x.size(1) != w.size(1) || y.size(0) != x.size(0) || y.size(1) != w.size(0))
    return "rows_linear: shapes disagree";
  if (bias.has_value() && (bias->scalar_type() != x.scalar_type() || bias->dim() != 1 || bias->numel() != w.size(0)))
    return "rows_linear: bias must be [N] of x's dtype";
  if (pairs && (!FT_PAIRS || x.scalar_type() != at::kBFloat16))
    return "rows_linear: the pairs kernel needs bf16 and a CPU with AVX512_BF16";
  Fn f = nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: f = pick<RowsFma<float>, float>(mb, u); break;
#if FT_PAIRS
    case at::kBFloat16:
      f = pairs ? pick<RowsPairs, c10::BFloat16>(mb, u) : pick<RowsFma<c10::BFloat16>, c10::BFloat16>(mb, u);
      break;
#else
    case at::kBFloat16: f = pick<RowsFma<c10::BFloat16>, c10::BFloat16>(mb, u); break;
#endif
    case at::kHalf: f = pick<RowsFma<c10::Half>, c10::Half>(mb, u); break;
    default: return "rows_linear: dtype must be float32, bfloat16 or float16";
  }
  if (f == nullptr) return "rows_linear: no tile " + std::to_string(mb) + "x" + std::to_string(u) + " (built: " + rows_tiles() + ")";
  if (y.numel() == 0) return "";
  if ((x.size(1) > 1 && x.stride(1) != 1) || (w.size(1) > 1 && w.stride(1) != 1) || (y.size(1) > 1 && y.stride(1) != 1))
    return "rows_linear: x, w and y need unit column stride";
  if (x.size(1) == 0) {
    y.zero_();
    if (bias.has_value()) y.add_(*bias);
  } else {
    f(x, w, bias, y);
  }
  return "";
}

// Integer weights read as they are: q [N, K] (int8 storage; int4 values are stored one per byte)
// with scales [N, G] and optional zeros [N, G] of any real or integer dtype, W[n][k] = s[n][g] *
// (q[n][k] - z[n][g]), g = k / gs. For a row n of q and a row of x,
//   y = sum_g s_g * (sum_{k in g} q[k] x[k]) - sum_g s_g z_g X_g,
// X_g the group sums of x, made once per call. Each group's vector sums are scaled by s_g into one
// running vector, so a row costs one horizontal add however many groups it has. Nothing is packed:
// a torchao int8 model decodes from its own weights, in its own memory.

namespace {

constexpr int QU = 4;  // vectors of q per step: one 64-byte cache line of int8 with AVX-512

// Row ``row`` of the 2-D tensor t (any real or integer dtype, any strides) as floats.
void row_floats(const at::Tensor& t, int64_t row, float* out) {
  const int64_t n = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  AT_DISPATCH_ALL_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "quant_rows", [&] {
    const scalar_t* p = t.data_ptr<scalar_t>() + row * s0;
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i * s1]);
  });
}

inline vf widen_q(const uint8_t* p) { return __builtin_convertvector(widen_bytes<true>(p), vf); }

template <typename T, int MB>
void quant_rows_run(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                    const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
                    int64_t gs) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = scales.size(1);
  const int64_t ldx = x.stride(0), cx = x.stride(1), ldq = q.stride(0), ldy = y.stride(0);
  const int64_t tiles = ceil_div(M, MB), ldxs = round_up(K, VL);
  // x as fp32: tile t holds rows t*MB .. t*MB+MB-1 (zero past M), each ldxs long (zero past K).
  std::unique_ptr<float[]> xs(new float[tiles * MB * ldxs]());
  const T* xp = x.data_ptr<T>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xs[m * ldxs + k] = static_cast<float>(xp[m * ldx + k * cx]);
  std::unique_ptr<float[]> xg;  // [tiles * MB][G] group sums of x, for the zero points' term
  if (zeros.has_value()) {
    xg.reset(new float[tiles * MB * G]());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t k = g * gs; k < std::min(K, g * gs + gs); ++k) xg[m * G + g] += xs[m * ldxs + k];
  }
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr<int8_t>());
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  const int64_t bstride = bias.has_value() ? bias->stride(0) : 0;
  T* yp = y.data_ptr<T>();
  const int64_t ahead = stream_non_temporal() ? AHEAD : STREAM_L2_AHEAD;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> sg(G), zg(zeros.has_value() ? G : 0);
    for (int64_t n = n0; n < n1; ++n) {
      row_floats(scales, n, sg.data());
      if (zeros.has_value()) row_floats(*zeros, n, zg.data());
      const uint8_t* row = qp + n * ldq;
      const float b = bp != nullptr ? static_cast<float>(bp[n * bstride]) : 0.f;
      for (int64_t t = 0; t < tiles; ++t) {
        const float* xt = xs.get() + t * MB * ldxs;
        vf tot[MB];
        float tail[MB];
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) tot[m] = vf{}, tail[m] = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
          __builtin_prefetch(row + k0 + ahead, 0, TO_L2);
          vf acc[MB][QU];  // every index below is a constant once unrolled, so these stay in registers
#pragma GCC unroll 16
          for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
            for (int u = 0; u < QU; ++u) acc[m][u] = vf{};
          int64_t k = k0;
          for (; k + QU * VL <= k1; k += QU * VL) {
            __builtin_prefetch(row + k + ahead, 0, TO_L2);
#pragma GCC unroll 16
            for (int u = 0; u < QU; ++u) {
              const vf w = widen_q(row + k + u * VL);
#pragma GCC unroll 16
              for (int m = 0; m < MB; ++m) acc[m][u] += w * load(xt + m * ldxs + k + u * VL);
            }
          }
          for (; k + VL <= k1; k += VL) {
            const vf w = widen_q(row + k);
#pragma GCC unroll 16
            for (int m = 0; m < MB; ++m) acc[m][0] += w * load(xt + m * ldxs + k);
          }
          float rest[MB] = {};
          for (; k < k1; ++k) {
            const float w = static_cast<float>(static_cast<int8_t>(row[k]));
            for (int m = 0; m < MB; ++m) rest[m] += w * xt[m * ldxs + k];
          }
          const float s = sg[g];
#pragma GCC unroll 16
          for (int m = 0; m < MB; ++m) {
            vf sum = acc[m][0];
#pragma GCC unroll 16
            for (int u = 1; u < QU; ++u) sum += acc[m][u];
            tot[m] += sum * s;
            tail[m] += rest[m] * s;
          }
        }
        for (int m = 0; m < MB && t * MB + m < M; ++m) {
          float v = hsum(tot[m]) + tail[m] + b;
          if (zeros.has_value())
            for (int64_t g = 0; g < G; ++g) v -= sg[g] * zg[g] * xg[(t * MB + m) * G + g];
          yp[(t * MB + m) * ldy + n] = static_cast<T>(v);
        }
      }
    }
  });
}

using QuantFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, at::Tensor&, int64_t);

#define FT_QUANT_ROWS_HEIGHTS(X) X(1) X(2) X(4)

template <typename T>
QuantFn pick_quant(int64_t mb) {
#define FT_CASE(A) \
  if (mb == A) return &quant_rows_run<T, A>;
  FT_QUANT_ROWS_HEIGHTS(FT_CASE)
#undef FT_CASE
  return nullptr;
}

}  // namespace

std::string quant_rows_heights() {
  std::string s;
#define FT_NAME(A) s += std::to_string(A) + " ";
  FT_QUANT_ROWS_HEIGHTS(FT_NAME)
#undef FT_NAME
  return s;
}

std::string quant_rows_linear_out(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                                  const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& y_out, int64_t gs, int64_t mb) {
  at::Tensor y = y_out;  // written in place: the caller allocated it
  if (x.dim() != 2 || q.dim() != 2 || scales.dim() != 2 || y.dim() != 2)
    return "quant_rows_linear: expected x [M, K], q [N, K], scales [N, G], y [M, N]";
  if (q.scalar_type() != at::kChar) return "quant_rows_linear: q must be int8";
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  if (q.size(1) != K || y.size(0) != M || y.size(1) != N) return "quant_rows_linear: shapes disagree";
  if (gs < 1 || scales.size(0) != N || scales.size(1) != ceil_div(std::max<int64_t>(K, 1), gs))
    return "quant_rows_linear: scales must be [N, ceil(K / group_size)]";
  if (!at::isFloatingType(scales.scalar_type())) return "quant_rows_linear: scales must be floating point";
  if (zeros.has_value() && zeros->sizes() != scales.sizes()) return "quant_rows_linear: zeros must be shaped as scales";
  if (zeros.has_value() && (zeros->is_complex() || zeros->scalar_type() == at::kBool))
    return "quant_rows_linear: zeros must be real numbers";
  if (y.scalar_type() != x.scalar_type()) return "quant_rows_linear: x and y must share one dtype";
  if (bias.has_value() && (bias->scalar_type() != x.scalar_type() || bias->dim() != 1 || bias->numel() != N))
    return "quant_rows_linear: bias must be [N] of x's dtype";
  for (const at::Tensor* t : {&x, &q, &scales, static_cast<const at::Tensor*>(&y)})
    if (t->device().type() != at::kCPU) return "quant_rows_linear: CPU tensors only";
  if (K > 1 && q.stride(1) != 1) return "quant_rows_linear: q needs unit column stride";
  QuantFn f = nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: f = pick_quant<float>(mb); break;
    case at::kBFloat16: f = pick_quant<c10::BFloat16>(mb); break;
    case at::kHalf: f = pick_quant<c10::Half>(mb); break;
    default: return "quant_rows_linear: dtype must be float32, bfloat16 or float16";
  }
  if (f == nullptr) return "quant_rows_linear: no height " + std::to_string(mb) + " (built: " + quant_rows_heights() + ")";
  if (M == 0 || N == 0) return "";
  if (K == 0) {  // an empty sum: the bias alone
    if (bias.has_value()) y.copy_(bias->unsqueeze(0).expand_as(y));
    else y.zero_();
    return "";
  }
  f(x, q, scales, zeros, bias, y, gs);
  return "";
}
