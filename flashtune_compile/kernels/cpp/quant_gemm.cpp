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
//
// The 16-row tile (built where the compiler targets AMX, offered where the OS grants a process the
// tile registers) sums bf16 x with AMX: each K chunk of a block is widened to the same bf16 pairs,
// which are exactly the layout tdpbf16ps multiplies (rows of 16 pairs by 16 columns), and every
// 16-row tile of x multiplies them 16 x 16 x 32 per instruction. With one group per row the pairs
// are q exactly and the scales multiply the sums; with groups along K they are s * (q - z) rounded
// once to bf16, the weight the dequantize-then-matmul default multiplies.
#include "common.h"

#if FT_PAIRS && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FT_AMX 1  // the 16-row tile: bf16 x summed with AMX
#else
#define FT_AMX 0
#endif

#include <ATen/Parallel.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if FT_AMX
#include <sys/syscall.h>
#include <unistd.h>
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
// Bytes of the packed stream fetched ahead (into L2) while widening it: 1 KB on AMD; elsewhere as
// far as common.h's STREAM_L2_AHEAD (on the Intel Xeon VM the AMX tile ran 10-25% faster so).
inline int64_t dq_ahead() { return stream_non_temporal() ? 1024 : STREAM_L2_AHEAD; }

typedef uint32_t vu32_u __attribute__((vector_size(VL * 4), aligned(4)));

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
  const int64_t ahead = dq_ahead();
  for (int64_t k = k0; k < k1; ++k) {
    __builtin_prefetch(panel + k * step_bytes + ahead, 0, TO_L2);
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
// Steps [k0, k1) of one block widened to bf16 into out [ceil((k1 - k0) / 2)][NB] pairs (w[k][n],
// w[k + 1][n]) as 32 bits, low half first, the second half zero past k1: the layout vdpbf16ps and
// tdpbf16ps multiply. k0 is even. Without ``scales``, w = q exactly (an int8 value, or int4 + 8,
// needs 8 of bf16's bits; the scales come after the sums, in fp32). With them (groups along K, gs
// even), w = s * q - zs (zs may be null; int4: q + 8 and (z + 8) * s), the weight itself rounded
// once to bf16 (nearest even, as vcvtne2ps2bf16 rounds).
//
// Where the pairs go: TILED false, [pairs][NB]; TILED true (AMX), in tiles [pairs / 16][R][16][VL],
// each 16 pairs by 16 columns one contiguous KB (a tile load whose rows lie 256 bytes apart, as
// [pairs][NB] puts them at NB = 64, took 1.3x as long); k0 is then pair p0 of out.
template <int R, bool TILED>
inline uint32_t* pair_row(uint32_t* out, int64_t p, int r) {
  static_assert(!TILED || VL == 16, "AMX tiles are 16 fp32 columns wide");
  return TILED ? out + ((p >> 4) * R + r) * 256 + (p & 15) * 16 : out + p * R * VL + r * VL;
}

template <int BITS, int R, bool TILED = false>
void dequantize_pairs(const uint8_t* panel, int64_t step_bytes, int64_t k0, int64_t k1, uint32_t* out,
                      int64_t gs = 1, const float* scales = nullptr, const float* zs = nullptr, int64_t p0 = 0) {
  constexpr int NB = R * VL;
  // (w[n], v[n]) adjacent: vcvtne2ps2bf16 puts w's 16 values below v's
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const int64_t ahead = dq_ahead();
  for (int64_t k = k0; k < k1; k += 2) {
    __builtin_prefetch(panel + k * step_bytes + ahead, 0, TO_L2);
    vf w[R], v[R];
    widen<BITS, R>(panel + k * step_bytes, w);
    const bool two = k + 1 < k1;
    if (two) widen<BITS, R>(panel + (k + 1) * step_bytes, v);
    const int64_t p = p0 + (k - k0) / 2;
    if (scales == nullptr) {
      for (int r = 0; r < R; ++r) {
        vu32 pair = (vu32)w[r] >> 16;  // a vector cast keeps the bits
        if (two) pair |= (vu32)v[r] & 0xFFFF0000u;
        *reinterpret_cast<vu32_u*>(pair_row<R, TILED>(out, p, r)) = pair;
      }
      continue;
    }
    const float* s = scales + (k / gs) * NB;
    const float* z = zs ? zs + (k / gs) * NB : nullptr;
    for (int r = 0; r < R; ++r) {
      const vf sr = load(s + r * VL), zr = z ? load(z + r * VL) : vf{};
      const vf lo = w[r] * sr - zr, hi = two ? v[r] * sr - zr : vf{};
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo);
      _mm512_storeu_si512(pair_row<R, TILED>(out, p, r), _mm512_permutexvar_epi16(interleave, both));
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

constexpr int AMX_ROWS = 16;  // the AMX tile's rows: the tile height that means "sum with AMX"
// p rounded up to a multiple of 64 bytes (the buffer holds 64 bytes more): an AMX tile's rows must
// each lie in one cache line, or a tile load takes 6x as long (2.5 ns against 16 ns per tile,
// measured on an Intel Xeon VM).
template <typename T>
T* align64(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

#if FT_AMX
constexpr int64_t AMX_STEP = 32;     // k per tdpbf16ps (16 pairs)
constexpr int64_t AMX_PAIRS_BYTES = 32 * 1024;  // pairs widened per pass (8 to 64 KB: alike, within noise)

// Whether this process may use the AMX tile registers: Linux grants them to a process that asks.
bool amx_granted() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// All 8 tiles as 16 rows of 64 bytes: tmm0-3 fp32 sums (2 x 2 tiles of 16 x 16), tmm4-5 rows of x
// (16 x 32 bf16), tmm6-7 weight pairs (16 pairs x 16 columns).
inline void amx_configure() {
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } config{};
  config.palette = 1;
  for (int i = 0; i < 8; ++i) {
    config.colsb[i] = 64;
    config.rows[i] = 16;
  }
  _tile_loadconfig(&config);
}

// acc [tiles * 16][NB] (+)= the x panel's tiles (xa: [tiles][S][16][32] bf16 bits, each tile of
// 16 rows by 32 k one contiguous KB; S steps per row tile; from the chunk's first step) times the
// chunk's pairs w (dequantize_pairs' TILED layout: [steps][R][16 pairs][16 columns]) over `steps`
// steps of 32 k; ``add``: onto acc's sums, else over them. Two row tiles by two column tiles at a
// time; ``between()`` after each step's products (vector work there runs while the AMX unit
// multiplies).
template <int R, typename Between>
void amx_tiles(const uint32_t* w, const uint16_t* xa, int64_t S, int64_t tiles, int64_t steps, float* acc, bool add,
               Between&& between) {
  constexpr int NB = R * VL;
  static_assert(NB % 32 == 0, "the AMX tiles take columns 32 at a time");
  constexpr int64_t ldc = NB * 4, ldw = 64, lda = 64, tile = 16 * 32;
  for (int64_t t = 0; t < tiles; t += 2) {
    const bool two = t + 1 < tiles;
    const uint16_t* a = xa + t * S * tile;
    for (int c = 0; c < NB; c += 32) {
      float* o = acc + t * 16 * NB + c;
      if (add) {
        _tile_loadd(0, o, ldc);
        _tile_loadd(1, o + 16, ldc);
        if (two) {
          _tile_loadd(2, o + 16 * NB, ldc);
          _tile_loadd(3, o + 16 * NB + 16, ldc);
        }
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t s = 0; s < steps; ++s) {
        const uint32_t* b = w + (s * R + c / 16) * 256;  // column tiles c / 16 and the next
        _tile_loadd(4, a + s * tile, lda);
        _tile_loadd(6, b, ldw);
        _tile_loadd(7, b + 256, ldw);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
          _tile_loadd(5, a + (S + s) * tile, lda);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        between();
      }
      _tile_stored(0, o, ldc);
      _tile_stored(1, o + 16, ldc);
      if (two) {
        _tile_stored(2, o + 16 * NB, ldc);
        _tile_stored(3, o + 16 * NB + 16, ldc);
      }
    }
  }
}
#else
inline bool amx_granted() { return false; }
#endif

template <typename T, int BITS, int MR, int R>
void run(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zs,
         const std::optional<at::Tensor>& bias, at::Tensor& y, int64_t gs, int64_t ksplit) {
  constexpr int NB = R * VL;
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), nblk = packed.size(0), G = scales.size(1);
  const int64_t step_bytes = BITS == 8 ? NB : NB / 2, tiles = ceil_div(M, MR), ldx = x.stride(0);
  const T* xp = x.data_ptr<T>();
  // AMX (the 16-row tile, bf16 x only, quant_linear_out checks): x laid out as tiles of 16 rows by
  // 32 k, zero past M and K, summed with the chunk's pairs by tdpbf16ps (x's rows as they are, 4 KB
  // apart at K = 2048, put a tile's rows in one set of L1). With groups along K the pairs are the
  // weight itself (zero points included); with one group per row they are q, scaled after.
  constexpr bool AMX = FT_AMX && MR == AMX_ROWS;
  const int64_t S = AMX ? ceil_div(K, 32) : 0;  // steps of 32 k per row tile
  const bool folded = AMX && G > 1;
  // Several row tiles of bf16 x on a CPU with AVX512_BF16: each chunk is dequantized to bf16 pairs
  // and summed with vdpbf16ps (btile), x read as its own bf16 pairs (exact).
#if FT_PAIRS
  const bool pairs = !AMX && std::is_same_v<T, c10::BFloat16> && tiles > 1 && (gs % 2 == 0 || gs >= K);
#else
  const bool pairs = false;
#endif
  const int64_t P = ceil_div(K, 2);
  // The x panel [tiles][K][MR] in fp32 (zero past row M), or in pairs [tiles][P][MR] of bf16 bits,
  // or for AMX tiles of bf16 bits [tiles][S][MR][32]; and per-group sums of x when zs is given.
  const bool fp32_panel = !pairs && !AMX;
  const auto xt = std::unique_ptr<float[]>(new float[fp32_panel ? tiles * K * MR : 0]);
  const auto xq = std::unique_ptr<uint32_t[]>(new uint32_t[pairs ? tiles * P * MR : 0]);
  const auto xa_buffer = std::unique_ptr<uint16_t[]>(new uint16_t[AMX ? tiles * S * MR * 32 + 32 : 0]);
  uint16_t* const xa = align64(xa_buffer.get());
  const bool zero_term = zs.numel() > 0 && !folded;
  std::vector<float> xsum(zero_term ? M * G : 0, 0.f);
  at::parallel_for(0, tiles, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, K * MR)),
                   [&](int64_t t0, int64_t t1) {
                     for (int64_t t = t0; t < t1; ++t)
                       for (int m = 0; m < MR; ++m) {
                         const int64_t row = t * MR + m;
                         if (AMX) {
                           const c10::BFloat16* from = reinterpret_cast<const c10::BFloat16*>(xp) + row * ldx;
                           for (int64_t step = 0; step < S; ++step) {
                             uint16_t* to = xa + ((t * S + step) * MR + m) * 32;
                             const int64_t n = row < M ? std::clamp<int64_t>(K - step * 32, 0, 32) : 0;
                             std::memcpy(to, from + step * 32, n * sizeof(uint16_t));
                             std::memset(to + n, 0, (32 - n) * sizeof(uint16_t));
                           }
                         }
                         for (int64_t k = 0; k < K && (fp32_panel || zero_term); ++k) {
                           const float v = row < M ? static_cast<float>(xp[row * ldx + k]) : 0.f;
                           if (fp32_panel) xt[(t * K + k) * MR + m] = v;
                           if (zero_term && row < M) xsum[row * G + k / gs] += v;
                         }
                         if (pairs)
                           for (int64_t p = 0; p < P; ++p)
                             xq[(t * P + p) * MR + m] =
                                 row < M ? bf16_pair(reinterpret_cast<const c10::BFloat16*>(xp + row * ldx), p, K) : 0u;
                       }
                   });
  const float* sp = scales.data_ptr<float>();
  const float* zp = zs.numel() > 0 ? zs.data_ptr<float>() : nullptr;  // the epilogue reads it only for zero_term
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
#if FT_AMX
    if constexpr (AMX) {  // k0 is a multiple of AMX_STEP (kstep is)
      // Chunks of AMX_PAIRS_BYTES of pairs, two buffers: chunk i+1 is widened a few pairs after
      // each step of chunk i's tiles, so the vector units widen while the AMX unit multiplies
      // (widened apart, the widening was a fifth of the kernel's time at M = 128).
      constexpr int64_t chunk = AMX_PAIRS_BYTES / (NB * 2);  // k per pass, a multiple of 32
      const size_t one = chunk / 2 * NB + 16;
      if (scratch.size() < 2 * one) scratch.resize(2 * one);
      uint32_t* const raw = reinterpret_cast<uint32_t*>(scratch.data());
      uint32_t* const buf[2] = {align64(raw), align64(raw + one)};
      const uint8_t* panel = wp + j * K * step_bytes;
      const float* sc = sp + j * G * NB;
      const float* fs = folded ? sc : nullptr;
      const float* fz = folded && zp ? zp + j * G * NB : nullptr;
      // k [a, b) of the chunk from cs widened into out
      auto widen = [&](int64_t a, int64_t b, int64_t cs, uint32_t* out) {
        dequantize_pairs<BITS, R, true>(panel, step_bytes, a, b, out, gs, fs, fz, (a - cs) / 2);
      };
      // the chunk from cs made whole from k = from on: the rest widened, its last step zero past it
      auto finish = [&](int64_t cs, int64_t from, uint32_t* out) {
        const int64_t ce = std::min(k1, cs + chunk);
        if (from < ce) widen(from, ce, cs, out);
        for (int64_t p = ceil_div(ce - cs, 2); p < ceil_div(ce - cs, AMX_STEP) * 16; ++p)
          for (int r = 0; r < R; ++r) std::fill_n(pair_row<R, true>(out, p, r), VL, 0u);
      };
      finish(k0, k0, buf[0]);
      for (int64_t cs = k0, i = 0; cs < k1; cs += chunk, ++i) {
        const int64_t ce = std::min(k1, cs + chunk), steps = ceil_div(ce - cs, AMX_STEP);
        const int64_t ns = ce, ne = std::min(k1, ce + chunk);  // the next chunk
        uint32_t* const next = buf[(i + 1) & 1];
        const int64_t calls = ceil_div(tiles, 2) * (NB / 32) * steps;
        const int64_t per = round_up(ceil_div(ne - ns, calls), 2);
        int64_t at = ns;
        amx_tiles<R>(buf[i & 1], xa + cs / 32 * MR * 32, S, tiles, steps, acc, cs > k0, [&] {
          if (at < ne) {
            const int64_t b = std::min(ne, at + per);
            widen(at, b, ns, next);
            at = b;
          }
        });
        if (ns < ne) finish(ns, at, next);
      }
      if (!folded)  // one group per row: the sums of x * q times the row's scale
        for (int64_t m = 0; m < tiles * MR; ++m)
          for (int n = 0; n < NB; ++n) acc[m * NB + n] *= sc[n];
      return;
    }
#endif
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
  // A split starts on a pair (AMX: on a step of 32).
  const int64_t kstep = round_up(ceil_div(K, ksplit), AMX ? 32 : 2);
  // Split K: every task's sums kept for the epilogue. Else one task's sums at a time, in a buffer
  // of the thread's that stays in cache (a buffer of every block's sums, N * M floats, was
  // allocated and zeroed on each call: at M = 128, 0.5 ms of the block's 4 weights' 8.6 ms).
  std::vector<float> partial_buffer(ksplit > 1 ? nblk * ksplit * slice + 16 : 0, 0.f);
  float* const partial = align64(partial_buffer.data());
  at::parallel_for(0, nblk * ksplit, 1, [&](int64_t t0, int64_t t1) {
#if FT_AMX
    if (AMX) amx_configure();  // per thread, per call: the tile configuration is thread state
#endif
    thread_local std::vector<float> own;
    if (ksplit == 1 && own.size() < size_t(slice + 16)) own.resize(slice + 16);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t / ksplit, s = t % ksplit;
      float* acc = ksplit > 1 ? partial + t * slice : align64(own.data());
      if (ksplit == 1) std::fill(acc, acc + slice, 0.f);
      task(j, std::min(K, s * kstep), std::min(K, (s + 1) * kstep), acc);
      if (ksplit == 1) epilogue(acc, j);
    }
#if FT_AMX
    if (AMX) _tile_release();
#endif
  });
  if (ksplit > 1)
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t j = b0; j < b1; ++j) epilogue(partial + j * ksplit * slice, j);
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
#if FT_AMX
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    if (mr == AMX_ROWS && amx_granted()) {  // the AMX tiles: widths of 32 columns or more
      if (r * VL == 32) return &run<T, BITS, AMX_ROWS, 32 / VL>;
      if (r * VL == 64) return &run<T, BITS, AMX_ROWS, 64 / VL>;
    }
#endif
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
  if (FT_AMX && amx_granted())
    for (int nb : {32, 64}) s += std::to_string(AMX_ROWS) + "x" + std::to_string(nb / VL) + " ";
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
  if (mr == AMX_ROWS && (x.scalar_type() != at::kBFloat16 || (gs % 2 != 0 && gs < K)))
    return "quant_linear: the 16-row (AMX) tile takes bf16 x and an even group size or one group per row";
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
