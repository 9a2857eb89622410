// Per-core peak rates of the instructions the binary and int8 kernels are built on (issue 20):
// how many binary MACs a second XOR + VPOPCNTQ + VPADDQ reach against int8 MACs of VNNI's
// VPDPBUSD and AMX's TDPBUSD, on this CPU, in this process's CPU time.
//
//   g++ -O2 -o /tmp/peak_rates benchmarks/peak_rates.cpp && /tmp/peak_rates
//
// Each loop keeps 12 independent accumulators (more than latency x throughput), so it measures
// throughput. AMX needs Linux's permission for the tile data (arch_prctl ARCH_REQ_XCOMP_PERM);
// a CPU or kernel without it prints so and skips that line.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <ctime>

static double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx512f,avx512vpopcntdq"), noinline)) int64_t xnor_loop(int64_t n) {
  __m512i acc[12], w[12];  // a weight register per accumulator: no common subexpression
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi64(i), w[i] = _mm512_set1_epi64(i * 977);
  for (int64_t k = 0; k < n; ++k) {
    __m512i a = _mm512_set1_epi64(k);
    asm volatile("" : "+v"(a));
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i)
      acc[i] = _mm512_add_epi64(acc[i], _mm512_popcnt_epi64(_mm512_xor_si512(a, w[i])));
  }
  int64_t s = 0;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_epi64(acc[i]);
  return s;
}

__attribute__((target("avx512f,avx512bw,avx512vnni"), noinline)) int64_t vnni_loop(int64_t n) {
  __m512i acc[12], w[12];
  __m512i a = _mm512_set1_epi8(5);
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi32(i), w[i] = _mm512_set1_epi8(i);
  for (int64_t k = 0; k < n; ++k) {
    asm volatile("" : "+v"(a));
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, w[i]);
  }
  int64_t s = 0;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_epi32(acc[i]);
  return s;
}

struct TileConfig {
  uint8_t palette, start;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// 2 x 2 tiles of 16 x 16 int32 sums, each TDPBUSD 16 x 64 by 64 x 16 int8 (16,384 MACs).
__attribute__((target("amx-tile,amx-int8"), noinline)) int64_t amx_loop(int64_t n) {
  static TileConfig config{};
  static int8_t data[16 * 64];
  static int32_t out[256];
  config.palette = 1;
  for (int i = 0; i < 8; ++i) config.colsb[i] = 64, config.rows[i] = 16;
  for (int i = 0; i < 16 * 64; ++i) data[i] = static_cast<int8_t>(i % 7);
  _tile_loadconfig(&config);
  _tile_loadd(4, data, 64);
  _tile_loadd(5, data, 64);
  _tile_loadd(6, data, 64);
  _tile_loadd(7, data, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < n; ++k) {
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  return out[0];
}

int main() {
  const int64_t n = 20000000;
  int64_t sink = 0;
  for (int round = 0; round < 3; ++round) {
    double t = cpu_seconds();
    if (__builtin_cpu_supports("avx512vpopcntdq")) {
      sink += xnor_loop(n);
      const double s = cpu_seconds() - t;
      std::printf("XOR+VPOPCNTQ+VPADDQ: %.2f G vectors/s = %.0f G binary MACs/s\n",
                  12.0 * n / s / 1e9, 12.0 * n * 512 / s / 1e9);
    }
    if (__builtin_cpu_supports("avx512vnni")) {
      t = cpu_seconds();
      sink += vnni_loop(n);
      const double s = cpu_seconds() - t;
      std::printf("VPDPBUSD: %.2f G/s = %.0f G int8 MACs/s\n", 12.0 * n / s / 1e9,
                  12.0 * n * 64 / s / 1e9);
    }
    if (__builtin_cpu_supports("amx-int8") && syscall(SYS_arch_prctl, 0x1023, 18) == 0) {
      t = cpu_seconds();
      sink += amx_loop(n / 10);
      const double s = cpu_seconds() - t;
      std::printf("TDPBUSD: %.3f G/s = %.0f G int8 MACs/s\n", 0.4 * n / s / 1e9,
                  0.4 * n * 16384 / s / 1e9);
    } else {
      std::printf("no AMX-INT8 here (or no permission for its tile data)\n");
    }
  }
  return static_cast<int>(sink & 1) * 0;
}
