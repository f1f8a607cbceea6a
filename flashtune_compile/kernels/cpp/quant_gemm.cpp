// y[M, N] = x[M, K] @ W^T + b on CPU for a weight stored as integers with float scales per group:
// W[n][k] = s[g][n] * (q[n][k] - z[g][n]) with g = k / gs (one group per row: gs = K).
//
// Decode streams the weight, so fewer bytes per weight is the speed: the kernel streams a packed
// copy of q (int8, or int4 two per byte), widens it in registers to fp32, and sums x * q over each
// group in fp32 before one multiply by the group's scales. The zero points never touch the stream:
// sum_k x[k] * (q - z) * s = s * sum_k x[k] q - (z * s) * sum_k x[k], so the second term is a small
// [M, G] x [G, N] product added in the epilogue from per-group sums of x.
//
// Packed layouts (made by kernels/cpp/__init__.py's pack_quant, blocks of NB = R * VL columns):
//   q, int8: [blocks][K][NB] int8, zero past N.
//   q, int4: [blocks][K][NB / 2] uint8: byte p * VL + l of a step holds columns (2p) * VL + l (low
//            nibble) and (2p + 1) * VL + l (high nibble) as q + 8 (0..15); the + 8 is folded into zs.
//   scales:  [blocks][G][NB] fp32, zero past N.
//   zs:      [blocks][G][NB] fp32 holding z * s (int4: (z + 8) * s), or an empty tensor: no term.
// A thread streams its blocks front to back in K chunks. Where one row tile covers all M rows
// (decode), the tile widens the stream in registers and keeps MR * R vector sums per group, the
// stream fetched ahead (common.h: non-temporally on AMD, well ahead into L2 elsewhere). Where several tiles do, each chunk is widened
// and scaled once into an fp32 scratch in L1 and every tile sums from it with FMAs alone; for bf16
// activations on a CPU with AVX512_BF16, each chunk is instead widened exactly to bf16 pairs and
// every tile sums it with vdpbf16ps, the group's scales applied to the fp32 sums.
#include "common.h"

#include <ATen/Parallel.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

using namespace ft;

namespace {

constexpr int64_t CHUNK_BYTES = 32 * 1024;  // a K chunk of one block: fetched once, read by every row tile
constexpr int64_t NT_AHEAD = 2048;  // bytes ahead of a once-read stream fetched non-temporally (512, 1024: no faster)
constexpr int64_t DQ_BYTES = 16 * 1024;  // the fp32 scratch several row tiles sum from: half of L1
constexpr int64_t DQ_AHEAD = 1024;  // bytes of the packed stream fetched ahead while widening it

typedef int32_t vi32 __attribute__((vector_size(VL * 4)));
typedef uint32_t vu32_u __attribute__((vector_size(VL * 4), aligned(4)));

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

// The R weight vectors of one step, widened to fp32.
template <int BITS, int R>
inline void widen(const uint8_t* p, vf* w) {
  if constexpr (BITS == 8) {
    for (int r = 0; r < R; ++r)
      w[r] = __builtin_convertvector(widen_bytes<true>(p + r * VL), vf);
  } else {
    static_assert(R % 2 == 0, "int4 tiles hold vectors in pairs");
    for (int r = 0; r < R; r += 2) {
      const vi32 b = widen_bytes<false>(p + r / 2 * VL);
      w[r] = __builtin_convertvector(b & 15, vf);
      w[r + 1] = __builtin_convertvector(b >> 4, vf);
    }
  }
}

// Sums steps [k0, k1) of one block into acc [MR][NB] for MR rows of the x panel xt ([K][MR] fp32):
// per group, the plain sums of x * q in registers, then acc += sums * scales. Each step prefetches
// pf + (k - k0) * pfs with locality LOC.
template <int BITS, int MR, int R, int LOC>
void tile(const uint8_t* panel, int64_t step_bytes, const float* xt, int64_t k0, int64_t k1, int64_t gs,
          const float* scales, float* acc, const char* pf, int64_t pfs) {
  constexpr int NB = R * VL;
  for (int64_t a = k0; a < k1;) {
    const int64_t g = a / gs, b = std::min(k1, (g + 1) * gs);
    vf c[MR][R];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < R; ++r) c[m][r] = vf{};
    int64_t k = a;
    if constexpr (MR == 1) {  // one row: a second set of sums, so twice the FMA chains run at once
      vf d[R];
      for (int r = 0; r < R; ++r) d[r] = vf{};
      for (; k + 1 < b; k += 2) {
        __builtin_prefetch(pf + (k - k0) * pfs, 0, LOC);
        __builtin_prefetch(pf + (k + 1 - k0) * pfs, 0, LOC);
        vf w[R], v[R];
        widen<BITS, R>(panel + k * step_bytes, w);
        widen<BITS, R>(panel + (k + 1) * step_bytes, v);
        for (int r = 0; r < R; ++r) {
          c[0][r] += w[r] * xt[k];
          d[r] += v[r] * xt[k + 1];
        }
      }
      for (int r = 0; r < R; ++r) c[0][r] += d[r];
    }
    for (; k < b; ++k) {
      __builtin_prefetch(pf + (k - k0) * pfs, 0, LOC);
      vf w[R];
      widen<BITS, R>(panel + k * step_bytes, w);
      const float* xk = xt + k * MR;
      for (int m = 0; m < MR; ++m)
        for (int r = 0; r < R; ++r) c[m][r] += w[r] * xk[m];
    }
    const float* s = scales + g * NB;
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < R; ++r) {
        vf_u* out = reinterpret_cast<vf_u*>(acc + m * NB + r * VL);
        *out = *out + c[m][r] * load(s + r * VL);
      }
    a = b;
  }
}

// Steps [k0, k1) of one block widened and scaled into out [k1 - k0][NB] fp32: s * q (the zero
// points stay in the epilogue's term, as in tile()).
template <int BITS, int R>
void dequantize(const uint8_t* panel, int64_t step_bytes, int64_t k0, int64_t k1, int64_t gs, const float* scales,
                float* out) {
  constexpr int NB = R * VL;
  for (int64_t k = k0; k < k1; ++k) {
    __builtin_prefetch(panel + k * step_bytes + DQ_AHEAD, 0, TO_L2);
    vf w[R];
    widen<BITS, R>(panel + k * step_bytes, w);
    const float* s = scales + (k / gs) * NB;
    for (int r = 0; r < R; ++r) *reinterpret_cast<vf_u*>(out + (k - k0) * NB + r * VL) = w[r] * load(s + r * VL);
  }
}

// acc [MR][NB] += the sums over `steps` steps of w [steps][NB] fp32 times MR rows of the x panel
// xt ([steps][MR] fp32, from the chunk's first step), two vectors of columns at a time: MR * 2 sums,
// two weight vectors and a broadcast stay in registers for MR up to 6 on AVX2 (16 registers), so a
// weight packed 4 vectors wide still gets tall tiles here.
template <int MR, int R>
void ftile(const float* w, const float* xt, int64_t steps, float* acc) {
  constexpr int NB = R * VL, H = R < 2 ? R : 2;
  for (int h = 0; h < R; h += H) {
    vf c[MR][H];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < H; ++r) c[m][r] = *reinterpret_cast<const vf_u*>(acc + m * NB + (h + r) * VL);
    for (int64_t k = 0; k < steps; ++k) {
      vf v[H];
      for (int r = 0; r < H; ++r) v[r] = load(w + k * NB + (h + r) * VL);
      const float* xk = xt + k * MR;
      for (int m = 0; m < MR; ++m)
        for (int r = 0; r < H; ++r) c[m][r] += v[r] * xk[m];
    }
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < H; ++r) *reinterpret_cast<vf_u*>(acc + m * NB + (h + r) * VL) = c[m][r];
  }
}

#if FT_PAIRS
// Steps [k0, k1) of one block widened to bf16 into out [ceil((k1 - k0) / 2)][NB] pairs (q[k][n],
// q[k + 1][n]) as 32 bits, low half first, the second half zero past k1: the layout vdpbf16ps
// multiplies. Exact: an int8 (or int4 + 8) value needs 8 of bf16's bits; the scales come after the
// sums, in fp32. k0 is even.
template <int BITS, int R>
void dequantize_pairs(const uint8_t* panel, int64_t step_bytes, int64_t k0, int64_t k1, uint32_t* out) {
  constexpr int NB = R * VL;
  for (int64_t k = k0; k < k1; k += 2) {
    __builtin_prefetch(panel + k * step_bytes + DQ_AHEAD, 0, TO_L2);
    vf w[R], v[R];
    widen<BITS, R>(panel + k * step_bytes, w);
    const bool two = k + 1 < k1;
    if (two) widen<BITS, R>(panel + (k + 1) * step_bytes, v);
    uint32_t* o = out + (k - k0) / 2 * NB;
    for (int r = 0; r < R; ++r) {
      vu32 pair = (vu32)w[r] >> 16;  // a vector cast keeps the bits
      if (two) pair |= (vu32)v[r] & 0xFFFF0000u;
      *reinterpret_cast<vu32_u*>(o + r * VL) = pair;
    }
  }
}

// acc [MR][NB] += scales [NB] * the sums over `pairs` steps of q [pairs][NB] (bf16 pairs from
// dequantize_pairs) times the x panel's pairs xp ([pairs][MR], bf16 bits as 32): one vdpbf16ps per
// row (products exact, sums in fp32), two vectors of columns at a time (four, for 6 x 4 tiles,
// measured no faster at M = 16 and 128). The steps lie in one group.
template <int MR, int R>
void btile(const uint32_t* w, const uint32_t* xp, int64_t pairs, const float* scales, float* acc) {
  constexpr int NB = R * VL, H = R < 2 ? R : 2;
  for (int h = 0; h < R; h += H) {
    __m512 c[MR][H];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < H; ++r) c[m][r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      __m512bh v[H];
      for (int r = 0; r < H; ++r) v[r] = (__m512bh)_mm512_loadu_si512(w + p * NB + (h + r) * VL);
      const uint32_t* xk = xp + p * MR;
      for (int m = 0; m < MR; ++m) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(xk[m]));
        for (int r = 0; r < H; ++r) c[m][r] = _mm512_dpbf16_ps(c[m][r], v[r], xb);
      }
    }
    for (int r = 0; r < H; ++r) {
      const __m512 s = _mm512_loadu_ps(scales + (h + r) * VL);
      for (int m = 0; m < MR; ++m) {
        float* out = acc + m * NB + (h + r) * VL;
        _mm512_storeu_ps(out, _mm512_fmadd_ps(c[m][r], s, _mm512_loadu_ps(out)));
      }
    }
  }
}
#endif

template <typename T, int BITS, int MR, int R>
void run(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zs,
         const std::optional<at::Tensor>& bias, at::Tensor& y, int64_t gs, int64_t ksplit) {
  constexpr int NB = R * VL;
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), nblk = packed.size(0), G = scales.size(1);
  const int64_t step_bytes = BITS == 8 ? NB : NB / 2, tiles = ceil_div(M, MR), ldx = x.stride(0);
  const T* xp = x.data_ptr<T>();
  // Several row tiles of bf16 x on a CPU with AVX512_BF16: each chunk is dequantized to bf16 pairs
  // and summed with vdpbf16ps (btile), x read as its own bf16 pairs (exact).
#if FT_PAIRS
  const bool pairs = std::is_same_v<T, c10::BFloat16> && tiles > 1 && (gs % 2 == 0 || gs >= K);
#else
  const bool pairs = false;
#endif
  const int64_t P = ceil_div(K, 2);
  // The x panel [tiles][K][MR] in fp32 (zero past row M), or in pairs [tiles][P][MR] of bf16 bits,
  // and per-group sums of x when zs is given.
  const auto xt = std::unique_ptr<float[]>(new float[pairs ? 0 : tiles * K * MR]);
  const auto xq = std::unique_ptr<uint32_t[]>(new uint32_t[pairs ? tiles * P * MR : 0]);
  const bool zero_term = zs.numel() > 0;
  std::vector<float> xsum(zero_term ? M * G : 0, 0.f);
  at::parallel_for(0, tiles, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, K * MR)),
                   [&](int64_t t0, int64_t t1) {
                     for (int64_t t = t0; t < t1; ++t)
                       for (int m = 0; m < MR; ++m) {
                         const int64_t row = t * MR + m;
                         for (int64_t k = 0; k < K; ++k) {
                           const float v = row < M ? static_cast<float>(xp[row * ldx + k]) : 0.f;
                           if (!pairs) xt[(t * K + k) * MR + m] = v;
                           if (zero_term && row < M) xsum[row * G + k / gs] += v;
                         }
                         if (pairs)
                           for (int64_t p = 0; p < P; ++p)
                             xq[(t * P + p) * MR + m] =
                                 row < M ? bf16_pair(reinterpret_cast<const c10::BFloat16*>(xp + row * ldx), p, K) : 0u;
                       }
                   });
  const float* sp = scales.data_ptr<float>();
  const float* zp = zero_term ? zs.data_ptr<float>() : nullptr;
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(packed.data_ptr());
  std::vector<float> b32(nblk * NB, 0.f);
  if (bias.has_value()) {
    const T* bp = bias->data_ptr<T>();
    for (int64_t n = 0; n < N; ++n) b32[n] = static_cast<float>(bp[n]);
  }
  T* yp = y.data_ptr<T>();
  const int64_t ldy = y.stride(0), m_pad = tiles * MR, slice = m_pad * NB;
  const int64_t chunk = std::max<int64_t>(32, CHUNK_BYTES / step_bytes);
  // One task: block j, steps [k0, k1), summed into acc [m_pad][NB].
  const int64_t dq = std::max<int64_t>(8, DQ_BYTES / (NB * int64_t(sizeof(float))));  // steps per scratch
  auto task = [&](int64_t j, int64_t k0, int64_t k1, float* acc) {
    thread_local std::vector<float> scratch;
    if (tiles > 1 && scratch.size() < size_t(dq * NB)) scratch.resize(dq * NB);
    if (pairs) {  // k0 is even (kstep and chunks are); the scratch holds 2 * dq steps as bf16 pairs
#if FT_PAIRS
      uint32_t* sp2 = reinterpret_cast<uint32_t*>(scratch.data());
      const uint8_t* panel = wp + j * K * step_bytes;
      const float* sc = sp + j * G * NB;
      for (int64_t ds = k0; ds < k1;) {  // a scratch never crosses a group (gs is even, or K)
        const int64_t de = std::min({k1, ds + 2 * dq, (ds / gs + 1) * gs});
        dequantize_pairs<BITS, R>(panel, step_bytes, ds, de, sp2);
        for (int64_t t = 0; t < tiles; ++t)
          btile<MR, R>(sp2, xq.get() + (t * P + ds / 2) * MR, ceil_div(de - ds, 2), sc + (ds / gs) * NB,
                       acc + t * MR * NB);
        ds = de;
      }
#endif
      return;
    }
    const uint8_t* panel = wp + j * K * step_bytes;
    const float* sc = sp + j * G * NB;
    for (int64_t cs = k0; cs < k1; cs += chunk) {
      const int64_t ce = std::min(k1, cs + chunk);
      if (tiles == 1) {  // read once: fetched just ahead (common.h: stream_non_temporal)
        const char* from = reinterpret_cast<const char*>(panel + cs * step_bytes);
        if (stream_non_temporal())
          tile<BITS, MR, R, NON_TEMPORAL>(panel, step_bytes, xt.get(), cs, ce, gs, sc, acc, from + NT_AHEAD, step_bytes);
        else
          tile<BITS, MR, R, TO_L2>(panel, step_bytes, xt.get(), cs, ce, gs, sc, acc, from + STREAM_L2_AHEAD, step_bytes);
        continue;
      }
      // Several row tiles: the chunk is widened and scaled once, DQ_BYTES at a time, into an fp32
      // scratch that stays in L1, and every row tile sums from there with FMAs alone (widening per
      // tile cost a third of the instructions at M = 16).
      for (int64_t ds = cs; ds < ce; ds += dq) {
        const int64_t de = std::min(ce, ds + dq);
        dequantize<BITS, R>(panel, step_bytes, ds, de, gs, sc, scratch.data());
        for (int64_t t = 0; t < tiles; ++t)
          ftile<MR, R>(scratch.data(), xt.get() + t * K * MR + ds * MR, de - ds, acc + t * MR * NB);
      }
    }
  };
  // Block j's columns of y: bias, the ksplit partial sums, less the zero-point term.
  auto epilogue = [&](const float* acc, int64_t j) {
    const int64_t n0 = j * NB, nn = std::min<int64_t>(NB, N - n0);
    float row[NB];
    for (int64_t m = 0; m < M; ++m) {
      for (int n = 0; n < NB; ++n) row[n] = b32[n0 + n] + acc[m * NB + n];
      for (int64_t s = 1; s < ksplit; ++s)
        for (int n = 0; n < NB; ++n) row[n] += acc[s * slice + m * NB + n];
      if (zero_term)
        for (int64_t g = 0; g < G; ++g) {
          const float xs = xsum[m * G + g];
          const float* z = zp + (j * G + g) * NB;
          for (int n = 0; n < NB; ++n) row[n] -= z[n] * xs;
        }
      store_row(yp + m * ldy + n0, row, nn);
    }
  };
  const int64_t kstep = round_up(ceil_div(K, ksplit), 2);  // even: a split starts on a pair
  std::vector<float> partial(nblk * ksplit * slice, 0.f);
  at::parallel_for(0, nblk * ksplit, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t / ksplit, s = t % ksplit;
      task(j, std::min(K, s * kstep), std::min(K, (s + 1) * kstep), partial.data() + t * slice);
      if (ksplit == 1) epilogue(partial.data() + t * slice, j);
    }
  });
  if (ksplit > 1)
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t j = b0; j < b1; ++j) epilogue(partial.data() + j * ksplit * slice, j);
    });
}

using Fn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const std::optional<at::Tensor>&, at::Tensor&, int64_t, int64_t);

// The tiles (MR rows, R vectors) that are built: R even, for int4's pairs of vectors; each width
// has tall tiles (ftile sums two vectors at a time), so that a weight packed at one width serves
// every M well. At M = 16 and 128 on AVX2, 6 x 2 and 6 x 4 were the fastest; 1 x 8 was no faster at
// M = 1 than 1 x 4 with its two sets of sums.
#define FT_QUANT_TILES(X) X(1, 2) X(1, 4) X(2, 2) X(2, 4) X(4, 2) X(4, 4) X(6, 2) X(6, 4) X(8, 2) X(8, 4)

template <typename T, int BITS>
Fn pick(int64_t mr, int64_t r) {
#define FT_CASE(A, B) \
  if (mr == A && r == B) return &run<T, BITS, A, B>;
  FT_QUANT_TILES(FT_CASE)
#undef FT_CASE
  return nullptr;
}

template <typename T>
Fn pick_bits(int64_t bits, int64_t mr, int64_t r) {
  return bits == 8 ? pick<T, 8>(mr, r) : bits == 4 ? pick<T, 4>(mr, r) : nullptr;
}

}  // namespace

std::string quant_tiles() {
  std::string s;
#define FT_NAME(A, B) s += std::to_string(A) + "x" + std::to_string(B) + " ";
  FT_QUANT_TILES(FT_NAME)
#undef FT_NAME
  return s;
}

std::string quant_linear_out(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                             const at::Tensor& zs, const std::optional<at::Tensor>& bias, const at::Tensor& y_out,
                             int64_t bits, int64_t gs, int64_t mr, int64_t r, int64_t ksplit) {
  at::Tensor y = y_out;  // written in place: the caller allocated it
  if (x.dim() != 2 || packed.dim() != 3 || scales.dim() != 3 || y.dim() != 2)
    return "quant_linear: expected x [M, K], packed [B, K, W], scales [B, G, NB], y [M, N]";
  if (bits != 8 && bits != 4) return "quant_linear: bits must be 8 or 4";
  const int64_t nb = r * VL, K = x.size(1), B = packed.size(0);
  if (packed.scalar_type() != (bits == 8 ? at::kChar : at::kByte) || !packed.is_contiguous() ||
      packed.size(1) != K || packed.size(2) != (bits == 8 ? nb : nb / 2))
    return "quant_linear: packed does not match K, bits or the tile width";
  if (gs < 1 || scales.scalar_type() != at::kFloat || !scales.is_contiguous() || scales.size(0) != B ||
      scales.size(1) != ceil_div(std::max<int64_t>(K, 1), gs) || scales.size(2) != nb)
    return "quant_linear: scales must be contiguous fp32 [blocks, ceil(K / gs), NB]";
  if (zs.numel() > 0 && (zs.scalar_type() != at::kFloat || !zs.is_contiguous() || zs.sizes() != scales.sizes()))
    return "quant_linear: zs must be empty or contiguous fp32 shaped as scales";
  if (y.scalar_type() != x.scalar_type() || x.stride(1) != 1 || y.stride(1) != 1)
    return "quant_linear: x and y must share one dtype and have unit column stride";
  if (y.size(0) != x.size(0) || y.size(1) > B * nb || y.size(1) <= (B - 1) * nb) return "quant_linear: y does not match M or N";
  if (bias.has_value() && (bias->scalar_type() != x.scalar_type() || !bias->is_contiguous() || bias->numel() != y.size(1)))
    return "quant_linear: bias must be contiguous [N] of x's dtype";
  if (ksplit < 1 || ksplit > 64) return "quant_linear: ksplit must be in 1..64";
  Fn f = nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: f = pick_bits<float>(bits, mr, r); break;
    case at::kBFloat16: f = pick_bits<c10::BFloat16>(bits, mr, r); break;
    case at::kHalf: f = pick_bits<c10::Half>(bits, mr, r); break;
    default: return "quant_linear: dtype must be float32, bfloat16 or float16";
  }
  if (f == nullptr) return "quant_linear: no tile " + std::to_string(mr) + "x" + std::to_string(r) + " (built: " + quant_tiles() + ")";
  if (x.size(0) == 0 || y.size(1) == 0) return "";
  if (K == 0) {  // an empty sum: the bias alone
    if (bias.has_value()) y.copy_(bias->unsqueeze(0).expand_as(y));
    else y.zero_();
    return "";
  }
  f(x, packed, scales, zs, bias, y, gs, ksplit);
  return "";
}
