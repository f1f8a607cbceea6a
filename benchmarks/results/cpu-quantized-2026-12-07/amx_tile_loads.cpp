// Reproduce: g++ -O3 -march=native -o tl amx_tile_loads.cpp && ./tl A_KB B_KB [zero] [B_row_stride]
// e.g. ./tl 16 16; ./tl 1024 32; ./tl 1024 1024; ./tl 1024 32 0 256  (see ../cpu-quantized-xeon-2026-12-07.md)
// Microbenchmark, one thread, a CPU with AMX (Linux grants the tile registers on request): the AMX
// tile's inner step as quant_gemm.cpp runs it (2 x 2 tiles of fp32 sums, 2 x tiles, 2 weight
// tiles, 4 tdpbf16ps per step), reading x tiles from a ring of A_KB and weight tiles from a ring of
// B_KB (1 KB per tile), so each operand comes from L1, L2 or beyond as its ring's size says. Prints
// ns per tdpbf16ps. B_row_stride 256: weight tiles whose 16 rows lie 256 bytes apart (pairs laid
// out [pairs][64 columns]), against 64 (each tile one contiguous KB).
#include <immintrin.h>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <sys/syscall.h>
#include <unistd.h>
struct alignas(64) Cfg { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
int main(int argc, char** argv) {
  syscall(SYS_arch_prctl, 0x1023, 18);
  Cfg c{}; c.palette = 1; for (int i = 0; i < 8; ++i) { c.colsb[i] = 64; c.rows[i] = 16; }
  _tile_loadconfig(&c);
  long akb = atol(argv[1]), bkb = atol(argv[2]); int zero = argc > 3 ? atoi(argv[3]) : 0; long bs = argc > 4 ? atol(argv[4]) : 64;
  // A: ring of tiles akb KB; B: ring of bkb KB
  long na = akb, nb = bkb; // tiles count (1KB each)
  uint16_t* A = (uint16_t*)aligned_alloc(64, na * 1024);
  uint16_t* B = (uint16_t*)aligned_alloc(64, nb * 1024);
  float* C = (float*)aligned_alloc(64, 4096 * 4);
  for (long i = 0; i < na * 512; ++i) A[i] = zero ? 0 : (0x3f80 + (rand() & 0x7f)) ^ ((rand()&1)<<15);
  for (long i = 0; i < nb * 512; ++i) B[i] = zero ? 0 : (0x3f80 + (rand() & 0x7f)) ^ ((rand()&1)<<15);
  long iters = 2000000;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  auto t0 = std::chrono::steady_clock::now();
  auto boff = [&](long i) { long g = bs / 64; return (i / g) * 16 * bs + (i % g) * 64; };
  long ia = 0, ib = 0;
  for (long i = 0; i < iters; ++i) {
    _tile_loadd(4, A + ia * 512, 64);
    _tile_loadd(6, (char*)B + boff(ib), bs);
    _tile_loadd(7, (char*)B + boff(ib + 1), bs);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, A + (ia + 1) * 512, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    ia += 2; if (ia + 2 > na) ia = 0;
    ib += 2; if (ib + 2 > nb) ib = 0;
  }
  auto t1 = std::chrono::steady_clock::now();
  _tile_stored(0, C, 64);
  double ns = std::chrono::duration<double, std::nano>(t1 - t0).count() / (iters * 4);
  printf("A %ld KB B %ld KB zero %d: %.2f ns per dp (%f)\n", akb, bkb, zero, ns, C[0]);
}
