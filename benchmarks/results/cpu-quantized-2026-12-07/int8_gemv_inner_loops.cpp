// Reproduce: g++ -O3 -march=native -o mb int8_gemv_inner_loops.cpp && ./mb 1   (./mb 2000: streamed, 262 MB)
// On a CPU with AVX512_VNNI (AMD EPYC Zen 4, 2026-12-07): see ../cpu-quantized-zen4-2026-12-07.md.
// Microbenchmark: one-row int8 GEMV inner loops on a cache-resident weight block, one thread.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <vector>
constexpr int K = 2048, NB = 64;  // one block: K steps x 64 columns (128 KB int8)
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// (a) today's path: per step, 4 x (vpmovsxbd 16 bytes, cvt, fma), two sets of sums
__attribute__((noinline)) void fp32_path(const int8_t* w, const float* x, float* out) {
  __m512 c[4], d[4];
  for (int r = 0; r < 4; ++r) c[r] = d[r] = _mm512_setzero_ps();
  for (int k = 0; k < K; k += 2) {
    const __m512 xa = _mm512_set1_ps(x[k]), xb = _mm512_set1_ps(x[k + 1]);
    for (int r = 0; r < 4; ++r) {
      c[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k * NB + r * 16)))), xa, c[r]);
      d[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + (k + 1) * NB + r * 16)))), xb, d[r]);
    }
  }
  for (int r = 0; r < 4; ++r) _mm512_storeu_ps(out + r * 16, _mm512_add_ps(c[r], d[r]));
}

// (b) k-pair interleaved int8 [K/2][NB][2], x as int16 pairs with one power-of-two scale per 64 k:
// per pair step 2 x (vpmovsxbw 32 bytes -> 16 lanes of (q[k], q[k+1]) int16, vpdpwssd)
__attribute__((noinline)) void vnni_path(const int8_t* w, const uint32_t* xp, const float* xs, float* out) {
  __m512 f[4];
  for (int r = 0; r < 4; ++r) f[r] = _mm512_setzero_ps();
  for (int b = 0; b < K / 2; b += 32) {
    __m512i c[4];
    for (int r = 0; r < 4; ++r) c[r] = _mm512_setzero_si512();
    for (int p = b; p < b + 32; ++p) {
      const __m512i xv = _mm512_set1_epi32((int)xp[p]);
      for (int r = 0; r < 4; ++r)
        c[r] = _mm512_dpwssd_epi32(c[r], _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + p * 2 * NB + r * 32))), xv);
    }
    const __m512 s = _mm512_set1_ps(xs[b / 32]);
    for (int r = 0; r < 4; ++r) f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c[r]), s, f[r]);
  }
  for (int r = 0; r < 4; ++r) _mm512_storeu_ps(out + r * 16, f[r]);
}

int main(int argc, char** argv) {
  const int blocks = argc > 1 ? atoi(argv[1]) : 1;  // 1: cache-resident; many: streamed from memory
  std::vector<int8_t> w((size_t)blocks * K * NB);
  for (auto& v : w) v = (int8_t)(rand() % 255 - 127);
  std::vector<float> x(K), xs(K / 64, 1.f / 32768), out(NB * 2);
  std::vector<uint32_t> xp(K / 2);
  for (int k = 0; k < K; ++k) x[k] = (rand() % 2000 - 1000) / 1000.f;
  for (int p = 0; p < K / 2; ++p) xp[p] = (uint16_t)(int16_t)(x[2 * p] * 32767) | ((uint32_t)(uint16_t)(int16_t)(x[2 * p + 1] * 32767) << 16);
  for (int rep = 0; rep < 2; ++rep) {
    for (int which = 0; which < 2; ++which) {
      const int iters = blocks == 1 ? 20000 : 20;
      double best = 1e9;
      for (int t = 0; t < 5; ++t) {
        const double a = now();
        for (int i = 0; i < iters; ++i)
          for (int j = 0; j < blocks; ++j) {
            const int8_t* wb = w.data() + (size_t)j * K * NB;
            if (which == 0) fp32_path(wb, x.data(), out.data());
            else vnni_path(wb, xp.data(), xs.data(), out.data() + NB);
          }
        best = std::min(best, now() - a);
      }
      printf("%s blocks=%d: %.1f GB/s\n", which ? "vnni int16" : "fp32 cvt  ", blocks, (double)iters * blocks * K * NB / best / 1e9);
    }
  }
}
