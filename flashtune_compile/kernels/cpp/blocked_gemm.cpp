// y[M, N] = x[M, K] @ W^T + b on CPU, streaming a weight prepacked into blocks of NB columns.
//
// Packed layout: [ceil(N / NB), K, NB] in the weight's own dtype (fp32, bf16 or fp16), block j
// holding columns j*NB .. j*NB+NB-1 of W^T (rows of W), zero-padded past N. A thread reads its
// blocks front to back, one contiguous stream, in K chunks: while every row tile sums one chunk from
// cache, the tiles prefetch the next chunk into L2, so the memory never waits on the multiplies
// (M = 16: 1.2x over letting the hardware fetch it). Where one tile covers all M rows, the stream
// is read once and fetched just ahead: on AMD non-temporally, so it does not flush the last-level
// cache (fp32 block at T = 1: 1.10-1.17x), elsewhere well ahead into L2 (common.h). bf16/fp16 are widened to fp32 in registers and
// all sums are fp32. x is packed once per call into an x panel (pack_rows). A tile is MR rows of x
// times one block (NB = R vector widths): MR * R vector accumulators. Threads split the N blocks
// (and, with ksplit > 1, the K range of each block).
// Vectors are GCC vector extensions (common.h). This file also binds the library's Python module,
// rows_gemm.cpp's kernel (W read as it is) included. The functions are registered as torch ops in the namespace FT_NS (the build's own name, given as
// -DFT_NS=...): the light headers below compile in seconds, torch/extension.h (pybind) in ~25 s.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <torch/python.h>  // pybind11 and its tensor casters: the linears are called from Python directly

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

using namespace ft;

namespace {

constexpr int64_t CHUNK_BYTES = 32 * 1024;  // a K chunk of one block: fetched once, then read by every row tile
constexpr int64_t NT_AHEAD = 256;  // bytes ahead of a once-read stream fetched non-temporally (512 and more: slower)

// A step kernel sums steps of one block into a tile of MR rows, each row's steps read from an x
// panel (pack_rows): MR values per step, one after another, so every broadcast has a fixed offset
// from one pointer and tall tiles leave the general registers free. Fma<T>: a step is one k, x
// widened to fp32 once when packed, the weight widened in registers, one FMA per row. PairsBf16
// (CPUs with AVX512_BF16): a step is two k, the weight packed as (w[n][k], w[n][k+1]) pairs and x
// as the same pairs in 32 bits, one vdpbf16ps per row: half the instructions. Each step also
// prefetches pf + (step - s0) * pfs with locality LOC.
template <typename T>
struct Fma {
  using Elem = T;
  using XElem = float;
  static constexpr int KPS = 1;  // k per step
  // Step s of a row of K elements, as the x panel holds it.
  static XElem pack_x(const T* row, int64_t s, int64_t /*K*/) { return static_cast<float>(row[s]); }
  template <int MR, int R, int LOC>
  static void tile(const T* panel, const XElem* xt, int64_t s0, int64_t s1, float* acc, const char* pf, int64_t pfs) {
    constexpr int NB = R * VL;
    vf c[MR][R];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < R; ++r) c[m][r] = *reinterpret_cast<const vf_u*>(acc + m * NB + r * VL);
    for (int64_t k = s0; k < s1; ++k) {
      const T* p = panel + k * NB;
      __builtin_prefetch(pf + (k - s0) * pfs, 0, LOC);
      const float* xk = xt + k * MR;
      vf w[R];
      for (int r = 0; r < R; ++r) w[r] = load(p + r * VL);
      for (int m = 0; m < MR; ++m)
        for (int r = 0; r < R; ++r) c[m][r] += w[r] * xk[m];
    }
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < R; ++r) *reinterpret_cast<vf_u*>(acc + m * NB + r * VL) = c[m][r];
  }
};

#if FT_PAIRS
struct PairsBf16 {
  using Elem = c10::BFloat16;
  using XElem = uint32_t;  // (x[k], x[k + 1]) as bf16 bits, low half first
  static constexpr int KPS = 2;
  // Step s: the pair at k = 2s, the second half zero when K is odd and this is the last step.
  static XElem pack_x(const Elem* row, int64_t s, int64_t K) { return bf16_pair(row, s, K); }
  template <int MR, int R, int LOC>
  static void tile(const Elem* panel, const XElem* xt, int64_t s0, int64_t s1, float* acc, const char* pf, int64_t pfs) {
    constexpr int NB = R * 16;
    __m512 c[MR][R];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < R; ++r) c[m][r] = _mm512_loadu_ps(acc + m * NB + r * 16);
    for (int64_t s = s0; s < s1; ++s) {
      const Elem* p = panel + s * 2 * NB;
      __builtin_prefetch(pf + (s - s0) * pfs, 0, LOC);
      const XElem* xs = xt + s * MR;
      __m512bh w[R];
      for (int r = 0; r < R; ++r) w[r] = (__m512bh)_mm512_loadu_si512(p + r * 32);
      for (int m = 0; m < MR; ++m) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(xs[m]));
        for (int r = 0; r < R; ++r) c[m][r] = _mm512_dpbf16_ps(c[m][r], w[r], xb);
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + m * NB + r * 16, c[m][r]);
  }
};
#endif

// The x panel of M rows (rows[0..M), K elements each) for tiles of MR rows: [ceil(M / MR)][steps][MR]
// of Kern::XElem, zero past row M. Large panels are packed by all threads.
template <class Kern, int MR>
void pack_rows(const typename Kern::Elem* const* rows, int64_t M, int64_t K, int64_t steps,
               typename Kern::XElem* out) {
  const int64_t tiles = ceil_div(M, MR);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, steps * MR));  // tiles per task
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int m = 0; m < MR; ++m) {
        typename Kern::XElem* o = out + t * steps * MR + m;
        const int64_t row = t * MR + m;
        if (row >= M) {
          for (int64_t s = 0; s < steps; ++s) o[s * MR] = 0;
          continue;
        }
        for (int64_t s = 0; s < steps; ++s) o[s * MR] = Kern::pack_x(rows[row], s, K);
      }
  });
}

template <class E>
std::unique_ptr<E[]> uninitialized(int64_t n) { return std::unique_ptr<E[]>(new E[n]); }

// One task: block j of a packed weight, steps [s0, s1), the M rows of the x panel xp (pack_rows);
// sums into acc [M_pad][NB] (M_pad: M rounded up to MR). `after`: the weights this thread reads
// next (nullptr: none known); prefetched during the last chunk by a tile read in several passes, and
// for a single pass it tells whether the stream runs on (then fetched non-temporally).
template <class Kern, int MR, int R>
void block_task(const typename Kern::Elem* packed, const typename Kern::XElem* xp, int64_t M, int64_t steps,
                int64_t j, int64_t s0, int64_t s1, float* acc, const typename Kern::Elem* after) {
  using T = typename Kern::Elem;
  constexpr int NB = R * VL, STEP = NB * Kern::KPS;  // elements of the panel per step
  const T* panel = packed + j * steps * STEP;
  const int64_t step_bytes = STEP * static_cast<int64_t>(sizeof(T));
  const int64_t chunk = std::max<int64_t>(32, CHUNK_BYTES / step_bytes);
  const int64_t passes = ceil_div(M, MR);
  const bool runs_on = after == panel + s1 * STEP;  // the thread's stream continues past this task
  for (int64_t cs = s0; cs < s1; cs += chunk) {
    const int64_t ce = std::min(s1, cs + chunk);
    if (passes == 1 && runs_on) {  // read once: fetched just ahead (common.h: stream_non_temporal)
      const char* from = reinterpret_cast<const char*>(panel + cs * STEP);
      if (stream_non_temporal())
        Kern::template tile<MR, R, NON_TEMPORAL>(panel, xp, cs, ce, acc, from + NT_AHEAD, step_bytes);
      else
        Kern::template tile<MR, R, TO_L2>(panel, xp, cs, ce, acc, from + STREAM_L2_AHEAD, step_bytes);
      continue;
    }
    // Several passes: the next chunk (or `after`) is prefetched into L2 while this chunk is summed,
    // each pass (row tile) asking for its share, one address per step. A single pass over a short
    // stream that then jumps (an MoE task) fetches nothing ahead (measured: slower with either
    // prefetch); its steps ask for the chunk at hand, already in cache.
    const T* upcoming = passes == 1 ? nullptr : ce < s1 ? panel + ce * STEP : after;
    const char* next = reinterpret_cast<const char*>(upcoming ? upcoming : panel + cs * STEP);
    const int64_t share = upcoming ? (chunk * step_bytes + passes - 1) / passes : 0;
    const int64_t pfs = (share + (ce - cs) - 1) / (ce - cs);
    for (int64_t t = 0; t < passes; ++t)
      Kern::template tile<MR, R, TO_L2>(panel, xp + t * MR * steps, cs, ce, acc + t * MR * NB, next + t * share, pfs);
  }
}

template <class T>
std::vector<const T*> row_pointers(const T* x, int64_t M, int64_t ldx) {
  std::vector<const T*> rows(M);
  for (int64_t m = 0; m < M; ++m) rows[m] = x + m * ldx;
  return rows;
}

template <class Kern, int MR, int R>
void run(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias, at::Tensor& y,
         int64_t ksplit) {
  using T = typename Kern::Elem;
  constexpr int NB = R * VL, STEP = NB * Kern::KPS;
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), nblk = packed.size(0), ldx = x.stride(0);
  const int64_t steps = ceil_div(K, Kern::KPS), m_pad = round_up(M, MR);
  const auto xp = uninitialized<typename Kern::XElem>(m_pad * steps);  // pack_rows writes it all
  pack_rows<Kern, MR>(row_pointers(x.data_ptr<T>(), M, ldx).data(), M, K, steps, xp.get());
  const T* wp = packed.data_ptr<T>();
  std::vector<float> b32(nblk * NB, 0.f);  // the bias in fp32, zero where there is none
  if (bias.has_value()) {
    const T* bp = bias->data_ptr<T>();
    for (int64_t n = 0; n < N; ++n) b32[n] = static_cast<float>(bp[n]);
  }
  T* yp = y.data_ptr<T>();
  const int64_t ldy = y.stride(0);
  // Block j's columns of y: bias plus the sums of its ksplit slices, stride_split apart.
  auto epilogue = [&](const float* acc_of_split, int64_t stride_split, int64_t j) {
    const int64_t n0 = j * NB, nn = std::min<int64_t>(NB, N - n0);
    float row[NB];
    for (int64_t m = 0; m < M; ++m) {
      for (int n = 0; n < NB; ++n) row[n] = b32[n0 + n] + acc_of_split[m * NB + n];
      for (int64_t s = 1; s < ksplit; ++s)
        for (int n = 0; n < NB; ++n) row[n] += acc_of_split[s * stride_split + m * NB + n];
      store_row(yp + m * ldy + n0, row, nn);
    }
  };
  if (ksplit <= 1) {
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> acc(m_pad * NB);
      for (int64_t j = b0; j < b1; ++j) {
        std::fill(acc.begin(), acc.end(), 0.f);
        block_task<Kern, MR, R>(wp, xp.get(), M, steps, j, 0, steps, acc.data(),
                                j + 1 < b1 ? wp + (j + 1) * steps * STEP : nullptr);
        epilogue(acc.data(), 0, j);
      }
    });
    return;
  }
  // Split K: task t = j * ksplit + s sums step range s of block j into its own slice; then one pass adds.
  const int64_t sstep = (steps + ksplit - 1) / ksplit, slice = m_pad * NB;
  std::vector<float> partial(nblk * ksplit * slice, 0.f);
  at::parallel_for(0, nblk * ksplit, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t / ksplit, s = t % ksplit;
      const int64_t s0 = std::min(steps, s * sstep), s1 = std::min(steps, s0 + sstep);
      block_task<Kern, MR, R>(wp, xp.get(), M, steps, j, s0, s1, partial.data() + t * slice,
                              t + 1 < t1 ? wp + (j * steps + s1) * STEP : nullptr);
    }
  });
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t j = b0; j < b1; ++j) epilogue(partial.data() + j * ksplit * slice, slice, j);
  });
}

using Fn = void (*)(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor&, int64_t);

// The tiles (MR rows, R vectors) that are built: MR * R accumulators fit the vector registers.
#define FT_TILES(X) X(1, 2) X(1, 4) X(2, 2) X(2, 4) X(4, 2) X(4, 4) X(8, 2)

template <class Kern>
Fn pick(int64_t mr, int64_t r) {
#define FT_CASE(A, B) \
  if (mr == A && r == B) return &run<Kern, A, B>;
  FT_TILES(FT_CASE)
#undef FT_CASE
  return nullptr;
}

}  // namespace

int64_t vector_width() { return VL; }

bool has_bf16_pairs() { return FT_PAIRS; }

namespace {

// Memory for a pack of `bytes`. From 2 MB up: a fresh anonymous mapping, 2 MB aligned and advised
// onto huge pages before its first touch, so that the OS can back it with 2 MB pages, which
// streaming reads take 10-40% faster than 4 KB ones here (fewer TLB walks); heap memory would keep
// the 4 KB pages it was first touched with. Its tail past the last whole 2 MB stays on 4 KB pages,
// so nothing is wasted. Smaller packs come from torch's allocator.
at::Tensor huge_page_tensor(int64_t bytes, at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr int64_t HUGE_PAGE = int64_t(2) << 20;
  if (bytes < HUGE_PAGE) return at::empty(sizes, options);
  const size_t len = round_up(bytes, 4096), span = len + HUGE_PAGE;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(raw != MAP_FAILED, "pack_blocked: out of memory for ", len, " bytes");
  char* base = static_cast<char*>(raw);
  char* data = base + (HUGE_PAGE - reinterpret_cast<uintptr_t>(base) % HUGE_PAGE) % HUGE_PAGE;
  if (data > base) munmap(base, data - base);  // trim to the aligned [data, data + len)
  if (base + span > data + len) munmap(data + len, base + span - (data + len));
#ifdef MADV_HUGEPAGE
  madvise(data, len, MADV_HUGEPAGE);  // advice only: ignored where huge pages are off
#endif
  return at::from_blob(data, sizes, [len](void* p) { munmap(p, len); }, options);
}

}  // namespace

namespace {

// One block of the pack: rows j*nb .. j*nb+nb-1 of w [n, k] (row stride ld, unit column stride) as
// [steps][nb][kps], zero past n and k. E is the element's bits (2 or 4 bytes): a copy, no arithmetic.
template <typename E, int KPS>
void pack_block(const E* w, int64_t ld, int64_t n, int64_t k, int64_t nb, int64_t steps, int64_t j, E* out) {
  constexpr int64_t TILE = 64;  // steps per tile: a tile of the block (nb * TILE * KPS elements) stays in L1
  for (int64_t s0 = 0; s0 < steps; s0 += TILE) {
    const int64_t s1 = std::min(steps, s0 + TILE);
    for (int64_t r = 0; r < nb; ++r) {  // rows of w read front to back within the tile
      const int64_t row = j * nb + r;
      const E* src = w + row * ld;
      E* dst = out + r * KPS;
      for (int64_t s = s0; s < s1; ++s)
        for (int h = 0; h < KPS; ++h) {
          const int64_t col = s * KPS + h;
          dst[s * nb * KPS + h] = row < n && col < k ? src[col] : E(0);
        }
    }
  }
}

template <typename E>
void pack_all(const at::Tensor& we, int64_t nb, int64_t kps, int64_t blocks, int64_t steps, at::Tensor& packed) {
  const int64_t n = we.size(1), k = we.size(2), ld = we.stride(1), le = we.stride(0);
  const E* w = reinterpret_cast<const E*>(we.data_ptr());
  E* out = reinterpret_cast<E*>(packed.data_ptr());
  const int64_t block = steps * nb * kps;
  at::parallel_for(0, we.size(0) * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const E* src = w + (t / blocks) * le;
      if (kps == 2)
        pack_block<E, 2>(src, ld, n, k, nb, steps, t % blocks, out + t * block);
      else
        pack_block<E, 1>(src, ld, n, k, nb, steps, t % blocks, out + t * block);
    }
  });
}

}  // namespace

// w [N, K] (any strides) as packed [ceil(N / nb), ceil(K / kps), nb * kps] in w's dtype: block j,
// step s, column n, k of the step h hold w[j * nb + n][s * kps + h], zero past N and K (kps = 2 for
// the bf16 pairs kernel, else 1); w [E, N, K] (experts) as [E, ...] of those, on huge pages where
// the OS allows (huge_page_tensor). One pass, blocks split across threads, no temporary.
at::Tensor pack_blocked(const at::Tensor& w_in, int64_t nb, int64_t kps) {
  TORCH_CHECK((w_in.dim() == 2 || w_in.dim() == 3) && nb > 0 && (kps == 1 || kps == 2),
              "pack_blocked: expected w [N, K] or [E, N, K], nb > 0, kps 1 or 2");
  TORCH_CHECK(w_in.element_size() == 2 || w_in.element_size() == 4, "pack_blocked: 2- or 4-byte elements only");
  const at::Tensor w3 = w_in.dim() == 3 ? w_in : w_in.unsqueeze(0);
  const at::Tensor we = w3.size(2) > 1 && w3.stride(2) != 1 ? w3.contiguous() : w3;
  const int64_t e = we.size(0), n = we.size(1), k = we.size(2), blocks = ceil_div(n, nb), steps = ceil_div(k, kps);
  at::Tensor packed =
      huge_page_tensor(e * blocks * steps * nb * kps * we.element_size(), {e, blocks, steps, nb * kps}, we.options());
  if (packed.numel() > 0) {
    if (we.element_size() == 2)
      pack_all<uint16_t>(we, nb, kps, blocks, steps, packed);
    else
      pack_all<uint32_t>(we, nb, kps, blocks, steps, packed);
  }
  return w_in.dim() == 3 ? packed : packed.squeeze(0);
}

// An uninitialized contiguous tensor on huge pages where the OS allows (huge_page_tensor): for
// packs made in Python (quantized weights), so they stream as fast as pack_blocked's.
at::Tensor empty_huge(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const at::TensorOptions options = at::TensorOptions().dtype(dtype);
  return huge_page_tensor(numel * static_cast<int64_t>(options.dtype().itemsize()), sizes, options);
}

std::string tiles() {
  std::string s;
#define FT_NAME(A, B) s += std::to_string(A) + "x" + std::to_string(B) + " ";
  FT_TILES(FT_NAME)
#undef FT_NAME
  return s;
}

// y = x @ W^T + b into y [M, N] (row stride free, unit column stride); x [M, K] with unit column
// stride; packed = pack_blocked(w, r * vector_width(), pairs ? 2 : 1) from the same dtype.
// Returns "" or a message naming the bad argument. Called by blocked_linear (below), Python's entry.
std::string blocked_linear_out(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                               const at::Tensor& y_out, int64_t mr, int64_t r, int64_t ksplit, bool pairs) {
  at::Tensor y = y_out;  // written in place: the caller allocated it
  if (x.dim() != 2 || packed.dim() != 3 || y.dim() != 2) return "blocked_linear: expected x [M, K], packed [B, S, NB], y [M, N]";
  if (x.scalar_type() != packed.scalar_type() || y.scalar_type() != x.scalar_type())
    return "blocked_linear: x, packed and y must share one dtype";
  if (x.device().type() != at::kCPU || packed.device().type() != at::kCPU || y.device().type() != at::kCPU)
    return "blocked_linear: CPU tensors only";
  if (x.stride(1) != 1 || y.stride(1) != 1 || !packed.is_contiguous()) return "blocked_linear: x and y need unit column stride, packed must be contiguous";
  if (pairs && (!FT_PAIRS || x.scalar_type() != at::kBFloat16)) return "blocked_linear: the pairs kernel needs bf16 and a CPU with AVX512_BF16";
  const int64_t kps = pairs ? 2 : 1, nb = r * VL;
  if (packed.size(1) != (x.size(1) + kps - 1) / kps || packed.size(2) != nb * kps) return "blocked_linear: packed does not match K or the tile width";
  if (y.size(0) != x.size(0) || y.size(1) > packed.size(0) * nb || y.size(1) <= (packed.size(0) - 1) * nb)
    return "blocked_linear: y does not match M or N";
  if (bias.has_value() && (bias->scalar_type() != x.scalar_type() || !bias->is_contiguous() || bias->numel() != y.size(1)))
    return "blocked_linear: bias must be contiguous [N] of x's dtype";
  if (ksplit < 1 || ksplit > 64) return "blocked_linear: ksplit must be in 1..64";
  Fn f = nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: f = pick<Fma<float>>(mr, r); break;
#if FT_PAIRS
    case at::kBFloat16: f = pairs ? pick<PairsBf16>(mr, r) : pick<Fma<c10::BFloat16>>(mr, r); break;
#else
    case at::kBFloat16: f = pick<Fma<c10::BFloat16>>(mr, r); break;
#endif
    case at::kHalf: f = pick<Fma<c10::Half>>(mr, r); break;
    default: return "blocked_linear: dtype must be float32, bfloat16 or float16";
  }
  if (f == nullptr) return "blocked_linear: no tile " + std::to_string(mr) + "x" + std::to_string(r) + " (built: " + tiles() + ")";
  if (x.size(0) > 0 && y.size(1) > 0) f(x, packed, bias, y, ksplit);
  return "";
}

// y = x @ W^T + b for x and bias of any strides, with y allocated here: the warm path's one call
// from Python, a pybind11 function (no dispatcher, no argument parsing by schema), run without the
// GIL. Throws std::runtime_error, which Python sees as RuntimeError, with blocked_linear_out's message.
at::Tensor blocked_linear(const at::Tensor& x_in, const at::Tensor& packed, const std::optional<at::Tensor>& bias_in,
                          int64_t n, int64_t mr, int64_t r, int64_t ksplit, bool pairs) {
  if (n < 0) throw std::runtime_error("blocked_linear: n must be >= 0");
  const at::Tensor x = x_in.dim() == 2 && x_in.stride(1) != 1 ? x_in.contiguous() : x_in;
  std::optional<at::Tensor> bias = bias_in;
  if (bias.has_value() && !bias->is_contiguous()) bias = bias->contiguous();
  at::Tensor y = x.dim() == 2 ? at::empty({x.size(0), n}, x.options()) : at::empty({0, 0}, x.options());
  const std::string error = blocked_linear_out(x, packed, bias, y, mr, r, ksplit, pairs);
  if (!error.empty()) throw std::runtime_error(error);
  return y;
}

// -- one MoE layer ------------------------------------------------------------------------------
namespace {

enum Activation : int64_t { SILU = 0, GELU = 1, GELU_TANH = 2 };

inline float activate(float v, int64_t act) {
  switch (act) {
    case SILU: return v / (1.f + std::exp(-v));
    case GELU: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    default: return 0.5f * v * (1.f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
  }
}

template <class T>
inline T round_to(float v) { return static_cast<T>(v); }

template <class Kern>
struct Tile {
  int64_t mr;
  void (*task)(const typename Kern::Elem*, const typename Kern::XElem*, int64_t, int64_t, int64_t, int64_t, int64_t,
               float*, const typename Kern::Elem*);  // block_task
  void (*pack)(const typename Kern::Elem* const*, int64_t, int64_t, int64_t, typename Kern::XElem*);  // pack_rows
};

// The built tiles R vectors wide, shortest first.
template <class Kern>
std::vector<Tile<Kern>> tiles_of_width(int64_t r) {
  std::vector<Tile<Kern>> v;
#define FT_TASK(A, B) \
  if (r == B) v.push_back({A, &block_task<Kern, A, B>, &pack_rows<Kern, A>});
  FT_TILES(FT_TASK)
#undef FT_TASK
  return v;
}

// For M rows: the shortest tile that covers them in one pass, else the tallest.
template <class Kern>
const Tile<Kern>& tile_for(const std::vector<Tile<Kern>>& tiles, int64_t M) {
  for (const auto& t : tiles)
    if (t.mr >= M) return t;
  return tiles.back();
}

// The layer (semantics in kernels/moe.py): pairs grouped by expert on the host; pass 1, tasks
// (gate/up block, expert) sum [gate | up] of the expert's rows and write h = act(gate) * up;
// pass 2, tasks (down block, expert) write y; pass 3, per token, the routed sum over its picks.
// Tasks are ordered block-major so each thread gets a share of every expert.
template <class Kern>
void moe_run(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& packed1,
             const at::Tensor& packed2, at::Tensor& out, int64_t inter, int64_t act, int64_t r) {
  using T = typename Kern::Elem;
  const int64_t NB = r * VL, half = NB / 2;
  const int64_t tokens = ids.size(0), top_k = ids.size(1), E = packed1.size(0), H = x.size(1);
  const int64_t B1 = packed1.size(1), S1 = packed1.size(2), B2 = packed2.size(1), S2 = packed2.size(2);
  const int64_t ipad = B1 * half, ldx = x.stride(0), ldo = out.stride(0);
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* rw = weights.data_ptr<float>();
  const T* xp = x.data_ptr<T>();
  const T* w1 = packed1.data_ptr<T>();
  const T* w2 = packed2.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t panel1 = B1 * S1 * packed1.size(3), panel2 = B2 * S2 * packed2.size(3);  // elements per expert

  // Group the (token, pick) pairs by expert: expert e holds positions start[e] .. start[e + 1).
  std::vector<int64_t> start(E + 1, 0), slot(tokens * top_k, -1);
  for (int64_t p = 0; p < tokens * top_k; ++p)
    if (id[p] >= 0 && id[p] < E) ++start[id[p] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const int64_t S = start[E];
  std::vector<const T*> xrows(S), hrows(S);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < tokens * top_k; ++p)
      if (id[p] >= 0 && id[p] < E) {
        slot[p] = fill[id[p]]++;
        xrows[slot[p]] = xp + (p / top_k) * ldx;
      }
  }
  std::vector<T> h(S * ipad), y(S * H);
  for (int64_t s = 0; s < S; ++s) hrows[s] = h.data() + s * ipad;
  std::vector<int64_t> used;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) used.push_back(e);
  const int64_t U = used.size();
  const auto tiles = tiles_of_width<Kern>(r);

  // Every task (block j of `packed`, used expert e), block-major: the expert's rows of block j summed
  // into acc, then epilogue(j, first row s0, rows M, acc). Each expert's rows are packed first, as an
  // x panel for the tile its row count gets.
  auto expert_blocks = [&](const T* packed, int64_t panel, int64_t blocks, const T* const* rows, int64_t K,
                           int64_t steps, auto epilogue) {
    const int64_t block_elems = panel / blocks;
    std::vector<const Tile<Kern>*> tile(U);
    std::vector<int64_t> off(U + 1, 0);  // expert u's x panel: xpanel[off[u] .. off[u + 1])
    for (int64_t u = 0; u < U; ++u) {
      const int64_t M = start[used[u] + 1] - start[used[u]];
      tile[u] = &tile_for(tiles, M);
      off[u + 1] = off[u] + round_up(M, tile[u]->mr) * steps;
    }
    const auto xpanel = uninitialized<typename Kern::XElem>(off[U]);  // pack_rows writes it all
    at::parallel_for(0, U, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t e = used[u];
        tile[u]->pack(rows + start[e], start[e + 1] - start[e], K, steps, xpanel.get() + off[u]);
      }
    });
    at::parallel_for(0, blocks * U, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> acc;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j = t / U, u = t % U, e = used[u], s0 = start[e], M = start[e + 1] - s0;
        acc.assign(round_up(M, tile[u]->mr) * NB, 0.f);
        const T* after = nullptr;  // task t + 1's weights, where this thread runs it
        if (t + 1 < t1) after = packed + used[(t + 1) % U] * panel + (t + 1) / U * block_elems;
        tile[u]->task(packed + e * panel, xpanel.get() + off[u], M, steps, j, 0, steps, acc.data(), after);
        epilogue(j, s0, M, acc.data());
      }
    });
  };
  expert_blocks(w1, panel1, B1, xrows.data(), H, S1, [&](int64_t j, int64_t s0, int64_t M, const float* acc) {
    for (int64_t m = 0; m < M; ++m)  // block j holds gate columns j*half.. then the same up columns
      for (int64_t n = 0; n < half; ++n) {
        const float g = static_cast<float>(round_to<T>(acc[m * NB + n]));
        const float u = static_cast<float>(round_to<T>(acc[m * NB + half + n]));
        const float a = static_cast<float>(round_to<T>(activate(g, act)));
        h[(s0 + m) * ipad + j * half + n] = round_to<T>(a * u);
      }
  });
  expert_blocks(w2, panel2, B2, hrows.data(), inter, S2, [&](int64_t j, int64_t s0, int64_t M, const float* acc) {
    const int64_t n0 = j * NB, nn = std::min<int64_t>(NB, H - n0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < nn; ++n) y[(s0 + m) * H + n0 + n] = round_to<T>(acc[m * NB + n]);
  });
  at::parallel_for(0, tokens, 1, [&](int64_t a, int64_t b) {
    std::vector<float> sum(H);
    for (int64_t t = a; t < b; ++t) {
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t s = slot[t * top_k + k];
        if (s < 0) continue;
        const float w = rw[t * top_k + k];
        const T* yr = y.data() + s * H;
        for (int64_t n = 0; n < H; ++n) sum[n] += static_cast<float>(yr[n]) * w;
      }
      for (int64_t n = 0; n < H; ++n) op[t * ldo + n] = round_to<T>(sum[n]);
    }
  });
}

}  // namespace

// One MoE layer into out [T, H]: x [T, H] (unit column stride), weights [T, k] fp32 and ids [T, k]
// int64 (contiguous; ids outside [0, E) add nothing), packed1 = pack_blocked of [E, 2 * I_pad, H]
// whose block j holds the gate rows j*NB/2 .. then the same up rows (I_pad: I rounded up to NB/2,
// zero rows past I), packed2 = pack_blocked of w2 [E, H, I]; act 0 silu, 1 gelu, 2 gelu_tanh.
// Returns "" or a message naming the bad argument.
std::string blocked_moe_out(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& ids,
                            const at::Tensor& packed1, const at::Tensor& packed2, const at::Tensor& out_,
                            int64_t inter, int64_t act, int64_t r, bool pairs) {
  at::Tensor out = out_;  // written in place: the caller allocated it
  if (x.dim() != 2 || ids.dim() != 2 || weights.sizes() != ids.sizes() || ids.size(0) != x.size(0) ||
      out.sizes() != x.sizes())
    return "blocked_moe: expected x [T, H], weights and ids [T, k], out [T, H]";
  if (ids.scalar_type() != at::kLong || weights.scalar_type() != at::kFloat || !ids.is_contiguous() ||
      !weights.is_contiguous())
    return "blocked_moe: ids must be contiguous int64 and weights contiguous float32";
  if (x.scalar_type() != packed1.scalar_type() || x.scalar_type() != packed2.scalar_type() ||
      out.scalar_type() != x.scalar_type())
    return "blocked_moe: x, the packed weights and out must share one dtype";
  if (x.stride(1) != 1 || out.stride(1) != 1 || !packed1.is_contiguous() || !packed2.is_contiguous())
    return "blocked_moe: x and out need unit column stride, the packed weights must be contiguous";
  if (pairs && (!FT_PAIRS || x.scalar_type() != at::kBFloat16))
    return "blocked_moe: the pairs kernel needs bf16 and a CPU with AVX512_BF16";
  if (act < 0 || act > 2) return "blocked_moe: act must be 0 (silu), 1 (gelu) or 2 (gelu_tanh)";
  if (tiles_of_width<Fma<float>>(r).empty()) return "blocked_moe: no tiles " + std::to_string(r) + " vectors wide (built: " + tiles() + ")";
  const int64_t kps = pairs ? 2 : 1, nb = r * VL, H = x.size(1);
  if (packed1.dim() != 4 || packed2.dim() != 4 || packed1.size(0) != packed2.size(0))
    return "blocked_moe: packed weights must be [E, blocks, steps, width] with one E";
  if (packed1.size(2) != (H + kps - 1) / kps || packed1.size(3) != nb * kps || packed2.size(3) != nb * kps)
    return "blocked_moe: packed1 does not match H or the tile width";
  if (inter < 1 || inter > packed1.size(1) * nb / 2 || packed2.size(2) != (inter + kps - 1) / kps ||
      packed2.size(1) != (H + nb - 1) / nb)
    return "blocked_moe: packed2 does not match H or I";
  if (x.size(0) == 0 || H == 0) return "";
  switch (x.scalar_type()) {
    case at::kFloat: moe_run<Fma<float>>(x, weights, ids, packed1, packed2, out, inter, act, r); break;
#if FT_PAIRS
    case at::kBFloat16:
      if (pairs) moe_run<PairsBf16>(x, weights, ids, packed1, packed2, out, inter, act, r);
      else moe_run<Fma<c10::BFloat16>>(x, weights, ids, packed1, packed2, out, inter, act, r);
      break;
#else
    case at::kBFloat16: moe_run<Fma<c10::BFloat16>>(x, weights, ids, packed1, packed2, out, inter, act, r); break;
#endif
    case at::kHalf: moe_run<Fma<c10::Half>>(x, weights, ids, packed1, packed2, out, inter, act, r); break;
    default: return "blocked_moe: dtype must be float32, bfloat16 or float16";
  }
  return "";
}

TORCH_LIBRARY(FT_NS, m) {
  m.def("blocked_moe_out", &blocked_moe_out);
  m.def("pack_blocked", &pack_blocked);
  m.def("vector_width", &vector_width);
  m.def("tiles", &tiles);
  m.def("has_bf16_pairs", &has_bf16_pairs);
  m.def("rows_tiles", &rows_tiles);
  m.def("quant_tiles", &quant_tiles);
  m.def("quant_rows_heights", &quant_rows_heights);
  m.def("empty_huge", &empty_huge);
}

// y = x @ w.T + b reading w [N, K] as it is (rows_gemm.cpp), with x and bias of any strides and y
// allocated here; like blocked_linear, the warm path's one call, run without the GIL. A w whose
// columns are not adjacent (a transposed view) is made contiguous first: correct, not fast.
at::Tensor rows_linear(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias,
                       int64_t mb, int64_t u, bool pairs) {
  const at::Tensor x = x_in.dim() == 2 && x_in.stride(1) != 1 ? x_in.contiguous() : x_in;
  const at::Tensor w = w_in.dim() == 2 && w_in.size(1) > 1 && w_in.stride(1) != 1 ? w_in.contiguous() : w_in;
  at::Tensor y = x.dim() == 2 && w.dim() == 2 ? at::empty({x.size(0), w.size(0)}, x.options()) : at::empty({0, 0}, x.options());
  const std::string error = rows_linear_out(x, w, bias, y, mb, u, pairs);
  if (!error.empty()) throw std::runtime_error(error);
  return y;
}

// y = x @ W^T + b for a weight of integers with scales per group (quant_gemm.cpp), x and bias of
// any strides, y [M, n] allocated here; the warm path's one call, run without the GIL.
at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales,
                        const at::Tensor& zs, const std::optional<at::Tensor>& bias_in, int64_t n, int64_t bits,
                        int64_t gs, int64_t mr, int64_t r, int64_t ksplit) {
  if (n < 0) throw std::runtime_error("quant_linear: n must be >= 0");
  const at::Tensor x = x_in.dim() == 2 && x_in.stride(1) != 1 ? x_in.contiguous() : x_in;
  std::optional<at::Tensor> bias = bias_in;
  if (bias.has_value() && !bias->is_contiguous()) bias = bias->contiguous();
  at::Tensor y = x.dim() == 2 ? at::empty({x.size(0), n}, x.options()) : at::empty({0, 0}, x.options());
  const std::string error = quant_linear_out(x, packed, scales, zs, bias, y, bits, gs, mr, r, ksplit);
  if (!error.empty()) throw std::runtime_error(error);
  return y;
}

// y = x @ W^T + b for an integer weight read as it is (rows_gemm.cpp): q [N, K] int8, scales and
// optional zeros [N, G]; x, q and bias of any strides (a q whose columns are not adjacent is made
// contiguous first: correct, not fast), y [M, N] allocated here; run without the GIL.
at::Tensor quant_rows_linear(const at::Tensor& x_in, const at::Tensor& q_in, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                             int64_t gs, int64_t mb) {
  const at::Tensor x = x_in.dim() == 2 && x_in.stride(1) != 1 ? x_in.contiguous() : x_in;
  const at::Tensor q = q_in.dim() == 2 && q_in.size(1) > 1 && q_in.stride(1) != 1 ? q_in.contiguous() : q_in;
  at::Tensor y = x.dim() == 2 && q.dim() == 2 ? at::empty({x.size(0), q.size(0)}, x.options()) : at::empty({0, 0}, x.options());
  const std::string error = quant_rows_linear_out(x, q, scales, zeros, bias, y, gs, mb);
  if (!error.empty()) throw std::runtime_error(error);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_rows_linear", &quant_rows_linear, py::arg("x"), py::arg("q"), py::arg("scales"), py::arg("zeros"),
        py::arg("bias"), py::arg("gs"), py::arg("mb"), py::call_guard<py::gil_scoped_release>());
  m.def("quant_linear", &quant_linear, py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("zs"),
        py::arg("bias"), py::arg("n"), py::arg("bits"), py::arg("gs"), py::arg("mr"), py::arg("r"),
        py::arg("ksplit") = 1, py::call_guard<py::gil_scoped_release>());
  m.def("rows_linear", &rows_linear, py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("mb"), py::arg("u"),
        py::arg("pairs") = false, py::call_guard<py::gil_scoped_release>());
  m.def("blocked_linear", &blocked_linear, py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("n"),
        py::arg("mr"), py::arg("r"), py::arg("ksplit") = 1, py::arg("pairs") = false,
        py::call_guard<py::gil_scoped_release>());
}
