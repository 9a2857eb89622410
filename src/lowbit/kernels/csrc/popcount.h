// The popcount GEMM shared by the binary / ternary Linear and convolution ops (binary.cpp,
// binary_conv.cpp).
//
// A row of K codes is ceil(K / 64) 64-bit words, code k in bit k % 64 of word k / 64, the bits
// past K zero. The weight comes in blocks of 32 rows, word-interleaved ([N / 32][W][32]): one
// input word is broadcast and XORed with 32 weight rows at once. Row r of A is read through two
// tables, word q at a[row_base[r] + word_off[q]]: a Linear's rows are r * W + q, a convolution
// reads its padded bit image in place (no im2col copy).
//
//   XNOR (binary x binary):    dot = K - 2 * popcount(a XOR w)
//   ternary x ternary:         dot = popcount(m) - 2 * popcount(m AND (a_sign XOR w_sign)),
//                              m = a_nonzero AND w_nonzero
//
// Three builds of the inner loop, chosen at run time: AVX-512 VPOPCNTDQ (4 rows x 32 columns
// of 64-bit accumulators in registers, the epilogue applied to them in registers), AVX2
// (nibble-table popcount) and plain C++ (both through a small buffer). Integer results are exact.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

#define LOWBIT_AVX512_BITS "avx512f,avx512dq,avx512bw,avx512vl,avx512vpopcntdq"

namespace lowbit {
namespace bits {

constexpr int64_t kBlock = 32;  // weight rows per interleaved block
enum Isa : int64_t { kBest = 0, kAvx2 = 1, kScalar = 2, kAvx512 = 3 };

inline bool has_avx512_bits() {
#if LOWBIT_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vpopcntdq");
#else
  return false;
#endif
}

inline Isa resolve(int64_t isa) {
#if LOWBIT_X86
  const bool avx512 = has_avx512_bits(), avx2 = __builtin_cpu_supports("avx2");
#else
  const bool avx512 = false, avx2 = false;
#endif
  if (isa == kBest) return avx512 ? kAvx512 : (avx2 ? kAvx2 : kScalar);
  TORCH_CHECK(isa >= kBest && isa <= kAvx512, "binary kernels: isa must be 0-3, got ", isa);
  TORCH_CHECK(isa != kAvx512 || avx512, "this CPU has no AVX-512 VPOPCNTDQ");
  TORCH_CHECK(isa != kAvx2 || avx2, "this CPU has no AVX2");
  return static_cast<Isa>(isa);
}

struct Operands {
  const uint64_t* a;         // sign bits of the rows
  const uint64_t* an;        // nonzero bits (ternary, same addressing), else null
  const uint64_t* w;         // [blocks, words, 32]
  const uint64_t* wn;        // same layout (ternary), else null
  int64_t words;             // words per row
  const int64_t* row_base;   // [M]
  const int64_t* word_off;   // [words]
};

// row_base r * words and word_off q: the tables of plain bit rows [M, words].
struct DenseRows {
  std::vector<int64_t> base, off;
  DenseRows(int64_t m, int64_t words) : base(m), off(words) {
    for (int64_t r = 0; r < m; ++r) base[r] = r * words;
    for (int64_t q = 0; q < words; ++q) off[q] = q;
  }
};

// --- the per-block kernels: raw sums, popcount(a ^ w) for XNOR, the dot itself for ternary ---

inline void block_scalar(const Operands& o, int64_t r0, int rows, int64_t blk, int64_t* sums) {
  const uint64_t* wb = o.w + blk * o.words * kBlock;
  const uint64_t* wnb = o.wn ? o.wn + blk * o.words * kBlock : nullptr;
  for (int r = 0; r < rows; ++r) {
    const uint64_t* a = o.a + o.row_base[r0 + r];
    const uint64_t* an = o.an ? o.an + o.row_base[r0 + r] : nullptr;
    int64_t* s = sums + r * kBlock;
    for (int j = 0; j < kBlock; ++j) s[j] = 0;
    for (int64_t q = 0; q < o.words; ++q) {
      const int64_t at = o.word_off[q];
      for (int j = 0; j < kBlock; ++j) {
        const uint64_t x = a[at] ^ wb[q * kBlock + j];
        if (an) {
          const uint64_t m = an[at] & wnb[q * kBlock + j];
          s[j] += __builtin_popcountll(m) - 2 * __builtin_popcountll(m & x);
        } else {
          s[j] += __builtin_popcountll(x);
        }
      }
    }
  }
}

#if LOWBIT_X86
__attribute__((target("avx2"))) inline __m256i popcount256(__m256i v) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                         2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low));
  const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
  return _mm256_sad_epu8(_mm256_add_epi8(lo, hi), _mm256_setzero_si256());
}

template <bool Ternary>
__attribute__((target("avx2"))) void block_avx2(const Operands& o, int64_t r0, int rows,
                                                int64_t blk, int64_t* sums) {
  const uint64_t* wb = o.w + blk * o.words * kBlock;
  const uint64_t* wnb = Ternary ? o.wn + blk * o.words * kBlock : nullptr;
  for (int r = 0; r < rows; ++r) {
    const uint64_t* a = o.a + o.row_base[r0 + r];
    const uint64_t* an = Ternary ? o.an + o.row_base[r0 + r] : nullptr;
    __m256i acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_si256();
    for (int64_t q = 0; q < o.words; ++q) {
      const int64_t at = o.word_off[q];
      const __m256i av = _mm256_set1_epi64x(static_cast<int64_t>(a[at]));
      for (int j = 0; j < 8; ++j) {
        const __m256i x = _mm256_xor_si256(
            av, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + q * kBlock + 4 * j)));
        if (Ternary) {
          const __m256i am = _mm256_set1_epi64x(static_cast<int64_t>(an[at]));
          const __m256i m = _mm256_and_si256(
              am, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wnb + q * kBlock + 4 * j)));
          acc[j] = _mm256_add_epi64(acc[j], popcount256(m));
          acc[j] = _mm256_sub_epi64(
              acc[j], _mm256_slli_epi64(popcount256(_mm256_and_si256(m, x)), 1));
        } else {
          acc[j] = _mm256_add_epi64(acc[j], popcount256(x));
        }
      }
    }
    for (int j = 0; j < 8; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + r * kBlock + 4 * j), acc[j]);
  }
}

// R rows x 32 columns in 4R registers; the epilogue takes each 8-column vector of sums as it
// leaves the registers (`epi.vec(row, col0, sums, keep)`, keep: the columns that exist).
// prefetch: the next weight block, fetched into L2 along this pass (or null; L2, not L1: with
// 64 rows of A and the current block, L1 is full).
template <int R, bool Ternary, typename Epi>
__attribute__((target(LOWBIT_AVX512_BITS))) void block_avx512(const Operands& o, int64_t r0,
                                                              int64_t blk, int64_t cols,
                                                              const uint64_t* prefetch,
                                                              const Epi& epi) {
  __m512i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
  const uint64_t* wb = o.w + blk * o.words * kBlock;
  const uint64_t* wnb = Ternary ? o.wn + blk * o.words * kBlock : nullptr;
  const uint64_t* a[R];
  const uint64_t* an[R];
  for (int r = 0; r < R; ++r) {
    a[r] = o.a + o.row_base[r0 + r];
    an[r] = Ternary ? o.an + o.row_base[r0 + r] : nullptr;
  }
  for (int64_t q = 0; q < o.words; ++q) {
    const int64_t at = o.word_off[q];
    if (prefetch)
      for (int j = 0; j < 4; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(prefetch + q * kBlock + 8 * j), _MM_HINT_T1);
    __m512i wv[4], wm[4];
    for (int j = 0; j < 4; ++j) {
      wv[j] = _mm512_loadu_si512(wb + q * kBlock + 8 * j);
      if (Ternary) wm[j] = _mm512_loadu_si512(wnb + q * kBlock + 8 * j);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi64(static_cast<int64_t>(a[r][at]));
      if (Ternary) {
        const __m512i am = _mm512_set1_epi64(static_cast<int64_t>(an[r][at]));
        for (int j = 0; j < 4; ++j) {
          const __m512i m = _mm512_and_si512(am, wm[j]);
          const __m512i d = _mm512_and_si512(m, _mm512_xor_si512(av, wv[j]));
          acc[r][j] = _mm512_add_epi64(acc[r][j], _mm512_popcnt_epi64(m));
          acc[r][j] = _mm512_sub_epi64(acc[r][j], _mm512_slli_epi64(_mm512_popcnt_epi64(d), 1));
        }
      } else {
        for (int j = 0; j < 4; ++j)
          acc[r][j] =
              _mm512_add_epi64(acc[r][j], _mm512_popcnt_epi64(_mm512_xor_si512(av, wv[j])));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const auto row = epi.row(r0 + r);
    for (int j = 0; j < 4 && 8 * j < cols; ++j) {
      const int64_t left = cols - 8 * j;
      const __mmask8 keep = left >= 8 ? __mmask8(0xFF) : __mmask8((1u << left) - 1);
      row.vec(blk * kBlock + 8 * j, acc[r][j], keep);
    }
  }
}

// One tile of rows times one weight block; with `prefetch`, its first pass fetches the next
// block (the next task when one tile holds every row: a Linear with up to 64 tokens).
template <bool Ternary, typename Epi>
void tile_avx512(const Operands& o, int64_t r0, int64_t rows, int64_t blk, int64_t cols,
                 bool prefetch, const Epi& epi) {
  const uint64_t* next = prefetch ? o.w + (blk + 1) * o.words * kBlock : nullptr;
  over_row_chunks(rows, [&](int64_t r, auto chunk) {
    block_avx512<decltype(chunk)::value, Ternary>(o, r0 + r, blk, cols, r == 0 ? next : nullptr,
                                                  epi);
  });
}
#endif

// The GEMM over all rows and weight blocks. Epi: `scalar(row, col0, sums, cols)` and, on x86,
// `row(r).vec(col0, __m512i sums, __mmask8 keep)` (AVX-512; row(r) once per row and block),
// both given the raw sums.
template <typename Epi>
void popcount_gemm(Isa isa, const Operands& o, int64_t m, int64_t n, const Epi& epi) {
  constexpr int64_t kRows = 64;  // rows per pass over one weight block (it stays in L1 / L2)
  const int64_t blocks = (n + kBlock - 1) / kBlock, tiles = (m + kRows - 1) / kRows;
  const bool ternary = o.an != nullptr;
  // tasks: (weight block, 64-row tile) pairs, block-major, so threads split the columns first
  at::parallel_for(0, blocks * tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> sums(kRows * kBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t / tiles, r0 = (t % tiles) * kRows;
      const int64_t cols = std::min(kBlock, n - blk * kBlock);
      const int rows = static_cast<int>(std::min(kRows, m - r0));
#if LOWBIT_X86
      if (isa == kAvx512) {
        const bool prefetch = tiles == 1 && blk + 1 < blocks;
        ternary ? tile_avx512<true>(o, r0, rows, blk, cols, prefetch, epi)
                : tile_avx512<false>(o, r0, rows, blk, cols, prefetch, epi);
        continue;
      }
      if (isa == kAvx2) {
        ternary ? block_avx2<true>(o, r0, rows, blk, sums.data())
                : block_avx2<false>(o, r0, rows, blk, sums.data());
      } else {
        block_scalar(o, r0, rows, blk, sums.data());
      }
#else
      block_scalar(o, r0, rows, blk, sums.data());
#endif
      for (int r = 0; r < rows; ++r) epi.scalar(r0 + r, blk * kBlock, sums.data() + r * kBlock, cols);
    }
  });
}

// --- epilogues -------------------------------------------------------------------------------

// int32 [M, n]: the dots themselves (XNOR: k - 2 * sums; ternary: the sums).
struct DotsEpi {
  int32_t* out;
  int64_t n, k;
  bool xnor;

  void scalar(int64_t r, int64_t j0, const int64_t* s, int64_t cols) const {
    for (int64_t j = 0; j < cols; ++j)
      out[r * n + j0 + j] = static_cast<int32_t>(xnor ? k - 2 * s[j] : s[j]);
  }
#if LOWBIT_X86
  struct Row {
    int32_t* out;
    int64_t k;
    bool xnor;
    __attribute__((target(LOWBIT_AVX512_BITS))) inline void vec(int64_t j0, __m512i s,
                                                                 __mmask8 keep) const {
      const __m512i d =
          xnor ? _mm512_sub_epi64(_mm512_set1_epi64(k), _mm512_slli_epi64(s, 1)) : s;
      _mm256_mask_storeu_epi32(out + j0, keep, _mm512_cvtepi64_epi32(d));
    }
  };
  Row row(int64_t r) const { return Row{out + r * n, k, xnor}; }
#endif
};

// float32 [M, n] = (dot - corr[u, j]) * scale[j] + offset[u, j], u the row's class: cls[r]
// (cls has a class for every row), else r % period; dot = k - 2 * sums (XNOR) or the sums
// themselves (ternary). A binary or ternary layer's output in one pass.
struct AffineEpi {
  float* out;
  int64_t n, k, period;
  const int32_t* cls;   // [M] or null
  const int32_t* corr;  // [U, n] or null
  const float* scale;   // [n]
  const float* offset;  // [U, n]
  bool xnor;

  int64_t klass(int64_t r) const { return cls ? cls[r] : (period == 1 ? 0 : r % period); }

  void scalar(int64_t r, int64_t j0, const int64_t* s, int64_t cols) const {
    const int64_t at = klass(r) * n + j0;
    float* dst = out + r * n + j0;
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t d = (xnor ? k - 2 * s[j] : s[j]) - (corr ? corr[at + j] : 0);
      dst[j] = static_cast<float>(d) * scale[j0 + j] + offset[at + j];
    }
  }
#if LOWBIT_X86
  struct Row {
    float* out;
    const int32_t* corr;
    const float* scale;
    const float* offset;
    int64_t k;
    bool xnor;
    __attribute__((target(LOWBIT_AVX512_BITS))) inline void vec(int64_t j0, __m512i s,
                                                                 __mmask8 keep) const {
      __m512i d = xnor ? _mm512_sub_epi64(_mm512_set1_epi64(k), _mm512_slli_epi64(s, 1)) : s;
      if (corr)
        d = _mm512_sub_epi64(d, _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(keep, corr + j0)));
      const __m256 y = _mm256_add_ps(
          _mm256_mul_ps(_mm512_cvtepi64_ps(d), _mm256_maskz_loadu_ps(keep, scale + j0)),
          _mm256_maskz_loadu_ps(keep, offset + j0));
      if (keep == 0xFF)
        _mm256_storeu_ps(out + j0, y);
      else
        _mm256_mask_storeu_ps(out + j0, keep, y);
    }
  };
  Row row(int64_t r) const {
    const int64_t at = klass(r) * n;
    return Row{out + r * n, corr ? corr + at : nullptr, scale, offset + at, k, xnor};
  }
#endif
};

// --- packing: the codes of (x - c) as bits ---------------------------------------------------
//
// Binary (Codes::ternary false): sign bit = (x - c >= 0). Ternary: sign bit = (x - c > t),
// nonzero bit = (|x - c| > t), so the code is +1, -1 or 0 (|x - c| <= t). NaN gives -1 / 0.
// The same float32 comparisons as the eager twin (numerics.centred_codes).
struct Codes {
  const float* c;  // per-feature centres, or null (0)
  float t;         // ternary threshold
  bool ternary;
};

inline void code_row_scalar(const float* x, const Codes& cd, int64_t k, uint64_t* sign,
                            uint64_t* nz) {
  for (int64_t q = 0; q < (k + 63) / 64; ++q) {
    sign[q] = 0;
    if (cd.ternary) nz[q] = 0;
  }
  for (int64_t i = 0; i < k; ++i) {
    const float v = cd.c ? x[i] - cd.c[i] : x[i];
    const uint64_t bit = uint64_t{1} << (i & 63);
    if (!cd.ternary) {
      sign[i >> 6] |= v >= 0.f ? bit : 0;
      continue;
    }
    sign[i >> 6] |= v > cd.t ? bit : 0;
    nz[i >> 6] |= std::fabs(v) > cd.t ? bit : 0;
  }
}

#if LOWBIT_X86
// 16 values of (x - c) compared at once: the sign mask, and for ternary the nonzero one.
__attribute__((target("avx512f"))) inline __mmask16 code_masks(__m512 v, const Codes& cd,
                                                               __mmask16 keep, __mmask16* nz) {
  if (!cd.ternary) return _mm512_mask_cmp_ps_mask(keep, v, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 t = _mm512_set1_ps(cd.t);
  *nz = _mm512_mask_cmp_ps_mask(keep, _mm512_abs_ps(v), t, _CMP_GT_OQ);
  return _mm512_mask_cmp_ps_mask(keep, v, t, _CMP_GT_OQ);
}

// 16 comparisons per instruction, their masks stored as 16 bits (little-endian words).
__attribute__((target("avx512f"))) inline void code_row_avx512(const float* x, const Codes& cd,
                                                               int64_t k, uint64_t* sign,
                                                               uint64_t* nz) {
  auto* out = reinterpret_cast<uint16_t*>(sign);
  auto* out_nz = reinterpret_cast<uint16_t*>(nz);
  const int64_t chunks = (k + 15) / 16, words = (k + 63) / 64;
  for (int64_t q = 0; q < words * 4; ++q) {
    out[q] = 0;
    if (cd.ternary) out_nz[q] = 0;
  }
  for (int64_t i = 0; i < chunks; ++i) {
    const __mmask16 keep =
        i * 16 + 16 <= k ? __mmask16(0xFFFF) : __mmask16((1u << (k - i * 16)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(keep, x + i * 16);
    if (cd.c) v = _mm512_sub_ps(v, _mm512_maskz_loadu_ps(keep, cd.c + i * 16));
    __mmask16 m = 0;
    out[i] = code_masks(v, cd, keep, &m);
    if (cd.ternary) out_nz[i] = m;
  }
}
#endif

// The code bits of k values into words(k) words of `sign` (and of `nz`, ternary).
inline void code_row(bool avx512, const float* x, const Codes& cd, int64_t k, uint64_t* sign,
                     uint64_t* nz) {
#if LOWBIT_X86
  if (avx512) return code_row_avx512(x, cd, k, sign, nz);
#endif
  code_row_scalar(x, cd, k, sign, nz);
}

inline bool has_avx512f() {
#if LOWBIT_X86
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

// Whether packing runs AVX-512 for an `isa` argument (0 best, 3 AVX-512; with 1 and 2, the AVX2
// and plain C++ GEMMs, it packs in plain C++, so that the tests reach every path).
inline bool pack_avx512(int64_t isa) { return (isa == kBest || isa == kAvx512) && has_avx512f(); }

}  // namespace bits
}  // namespace lowbit
