// Binary and ternary kernels: products of +-1 (and 0) codes on bits.
//
// Bit layout: a row of K codes is ceil(K / 64) 64-bit words, code k in bit k % 64 of word k / 64,
// the bits past K zero. A binary code is one plane (bit 1: +1, bit 0: -1); a ternary code two
// planes, `sign` (bit 1: +1) and `nonzero` (bit 1: the code is not 0).
//
//   XNOR (binary x binary):    dot = K - 2 * popcount(a XOR w)
//   ternary x ternary:         dot = popcount(m) - 2 * popcount(m AND (a_sign XOR w_sign)),
//                              m = a_nonzero AND w_nonzero
//   binary / ternary weights x float or int8 inputs: sum of the inputs with the weight's sign
//                              (flipped by XOR of the sign bit, zeroed where the weight is 0)
//
// The popcount GEMMs take the weight in blocks of 32 rows, word-interleaved ([N / 32][W][32]):
// one input word is broadcast and XORed with 32 weight rows at once. Three builds of the inner
// loop, chosen at run time: AVX-512 VPOPCNTDQ, AVX2 (nibble-table popcount), plain C++.
// Integer results are exact; Python (lowbit/kernels/binary.py) has eager twins that compute
// the same integers.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace lowbit {
namespace {

constexpr int64_t kBlock = 32;  // weight rows per interleaved block
enum Isa : int64_t { kBest = 0, kAvx2 = 1, kScalar = 2, kAvx512 = 3 };

Isa resolve(int64_t isa) {
#if LOWBIT_X86
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512vpopcntdq");
  const bool avx2 = __builtin_cpu_supports("avx2");
#else
  const bool avx512 = false, avx2 = false;
#endif
  if (isa == kBest) return avx512 ? kAvx512 : (avx2 ? kAvx2 : kScalar);
  TORCH_CHECK(isa >= kBest && isa <= kAvx512, "binary kernels: isa must be 0-3, got ", isa);
  TORCH_CHECK(isa != kAvx512 || avx512, "this CPU has no AVX-512 VPOPCNTDQ");
  TORCH_CHECK(isa != kAvx2 || avx2, "this CPU has no AVX2");
  return static_cast<Isa>(isa);
}

// --- packing ----------------------------------------------------------------------------------

void sign_row_scalar(const float* x, const float* c, int64_t k, uint64_t* dst) {
  for (int64_t q = 0; q < (k + 63) / 64; ++q) dst[q] = 0;
  for (int64_t i = 0; i < k; ++i) {
    const float v = c ? x[i] - c[i] : x[i];
    dst[i >> 6] |= static_cast<uint64_t>(v >= 0.f) << (i & 63);
  }
}

#if LOWBIT_X86
// 16 comparisons per instruction, their mask stored as 16 bits (little-endian words).
__attribute__((target("avx512f"))) void sign_row_avx512(const float* x, const float* c,
                                                        int64_t k, uint64_t* dst) {
  auto* out = reinterpret_cast<uint16_t*>(dst);
  const int64_t chunks = (k + 15) / 16, words = (k + 63) / 64;
  for (int64_t q = 0; q < words * 4; ++q) out[q] = 0;
  for (int64_t i = 0; i < chunks; ++i) {
    const __mmask16 keep =
        i * 16 + 16 <= k ? __mmask16(0xFFFF) : __mmask16((1u << (k - i * 16)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(keep, x + i * 16);
    if (c) v = _mm512_sub_ps(v, _mm512_maskz_loadu_ps(keep, c + i * 16));
    out[i] = _mm512_mask_cmp_ps_mask(keep, v, _mm512_setzero_ps(), _CMP_GE_OQ);
  }
}
#endif

// Bits of (x - c >= 0) for k values (c may be null: 0), into words(k) words; NaN gives 0 (-1).
void sign_row(bool avx512, const float* x, const float* c, int64_t k, uint64_t* dst) {
#if LOWBIT_X86
  if (avx512) return sign_row_avx512(x, c, k, dst);
#endif
  sign_row_scalar(x, c, k, dst);
}

bool has_avx512f() {
#if LOWBIT_X86
  return __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

// Bits of (x - center >= 0) per row: [M, K] float -> [M, ceil(K / 64)] int64.
at::Tensor sign_bits(const at::Tensor& x, const at::Tensor& center) {
  check_input(x, -1, "sign_bits");
  const int64_t m = x.size(0), k = x.size(1), words = (k + 63) / 64;
  TORCH_CHECK(center.numel() == 0 || center.numel() == k, "sign_bits: center has ",
              center.numel(), " values, x ", k, " features");
  auto xc = x.contiguous();
  auto cc = center.contiguous().to(at::kFloat);
  auto out = at::empty({m, words}, x.options().dtype(at::kLong));
  const float* xp = xc.const_data_ptr<float>();
  const float* cp = center.numel() ? cc.const_data_ptr<float>() : nullptr;
  auto* op = reinterpret_cast<uint64_t*>(out.mutable_data_ptr<int64_t>());
  const bool avx512 = has_avx512f();
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) sign_row(avx512, xp + r * k, cp, k, op + r * words);
  });
  return out;
}

// Bit im2col of a zero-padded convolution input. x [B, C, H, W] float (read channels-last):
// channel bits (x - center >= 0) per pixel, padded pixels all ones (+1: the caller subtracts
// what the padding adds), then for every output position the kh * kw taps' channel words in a
// row: [B * Ho * Wo, kh * kw * ceil(C / 64)] int64, tap-major (the weight's [N, kh, kw, C]).
at::Tensor sign_bits_conv(const at::Tensor& x, const at::Tensor& center, int64_t kh, int64_t kw,
                          int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "sign_bits_conv: x must be a 4-D float32 CPU tensor");
  const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(center.numel() == c, "sign_bits_conv: center has ", center.numel(),
              " values, x ", c, " channels");
  const int64_t cw = (c + 63) / 64, hp = h + 2 * ph, wp = w + 2 * pw;
  const int64_t ho = (hp - dh * (kh - 1) - 1) / sh + 1, wo = (wp - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(ho > 0 && wo > 0, "sign_bits_conv: the input is smaller than the kernel");
  auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);  // a view when it already is
  auto cc = center.contiguous().to(at::kFloat);
  auto image = at::empty({b, hp, wp, cw}, x.options().dtype(at::kLong));
  auto* ip = reinterpret_cast<uint64_t*>(image.mutable_data_ptr<int64_t>());
  std::vector<uint64_t> ones(cw, ~uint64_t{0});
  if (c % 64) ones[cw - 1] = (uint64_t{1} << (c % 64)) - 1;
  const float* xp = xc.const_data_ptr<float>();
  const float* cp = cc.const_data_ptr<float>();
  const bool avx512 = has_avx512f();
  at::parallel_for(0, b * hp, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / hp, y = t % hp - ph;
      uint64_t* row = ip + t * wp * cw;
      for (int64_t xx = 0; xx < wp; ++xx) {
        const int64_t col = xx - pw;
        if (y < 0 || y >= h || col < 0 || col >= w)
          std::memcpy(row + xx * cw, ones.data(), cw * 8);
        else
          sign_row(avx512, xp + ((n * h + y) * w + col) * c, cp, c, row + xx * cw);
      }
    }
  });
  const int64_t taps = kh * kw, row_words = taps * cw;
  auto out = at::empty({b * ho * wo, row_words}, image.options());
  auto* op = reinterpret_cast<uint64_t*>(out.mutable_data_ptr<int64_t>());
  at::parallel_for(0, b * ho, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / ho, oy = t % ho;
      for (int64_t ox = 0; ox < wo; ++ox) {
        uint64_t* dst = op + (t * wo + ox) * row_words;
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kw; ++j) {
            const uint64_t* src = ip + ((n * hp + oy * sh + i * dh) * wp + ox * sw + j * dw) * cw;
            std::memcpy(dst + (i * kw + j) * cw, src, cw * 8);
          }
      }
    }
  });
  return out;
}

// --- popcount GEMMs ---------------------------------------------------------------------------

// The rows r of one 32-row weight block: sums[r][j] = sum over words of the popcount terms.
// XNOR: popcount(a ^ w). Ternary: popcount(m) - 2 popcount(m & (a ^ w)), m = an & wn.
struct Operands {
  const uint64_t* a;   // [M, words] sign bits
  const uint64_t* an;  // [M, words] nonzero bits (ternary), else null
  const uint64_t* w;   // [blocks, words, 32]
  const uint64_t* wn;  // same layout (ternary), else null
  int64_t words;
};

void block_scalar(const Operands& o, int64_t r0, int rows, int64_t blk, int64_t* sums) {
  const uint64_t* wb = o.w + blk * o.words * kBlock;
  const uint64_t* wnb = o.wn ? o.wn + blk * o.words * kBlock : nullptr;
  for (int r = 0; r < rows; ++r) {
    const uint64_t* a = o.a + (r0 + r) * o.words;
    const uint64_t* an = o.an ? o.an + (r0 + r) * o.words : nullptr;
    int64_t* s = sums + r * kBlock;
    for (int j = 0; j < kBlock; ++j) s[j] = 0;
    for (int64_t q = 0; q < o.words; ++q)
      for (int j = 0; j < kBlock; ++j) {
        const uint64_t x = a[q] ^ wb[q * kBlock + j];
        if (an) {
          const uint64_t m = an[q] & wnb[q * kBlock + j];
          s[j] += __builtin_popcountll(m) - 2 * __builtin_popcountll(m & x);
        } else {
          s[j] += __builtin_popcountll(x);
        }
      }
  }
}

#if LOWBIT_X86
template <int R, bool Ternary>
__attribute__((target("avx512f,avx512vpopcntdq"))) void block_avx512(
    const Operands& o, int64_t r0, int64_t blk, int64_t* sums) {
  __m512i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
  const uint64_t* wb = o.w + blk * o.words * kBlock;
  const uint64_t* wnb = Ternary ? o.wn + blk * o.words * kBlock : nullptr;
  for (int64_t q = 0; q < o.words; ++q) {
    __m512i wv[4], wm[4];
    for (int j = 0; j < 4; ++j) {
      wv[j] = _mm512_loadu_si512(wb + q * kBlock + 8 * j);
      if (Ternary) wm[j] = _mm512_loadu_si512(wnb + q * kBlock + 8 * j);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i av = _mm512_set1_epi64(static_cast<int64_t>(o.a[(r0 + r) * o.words + q]));
      if (Ternary) {
        const __m512i am =
            _mm512_set1_epi64(static_cast<int64_t>(o.an[(r0 + r) * o.words + q]));
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
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_si512(sums + r * kBlock + 8 * j, acc[r][j]);
}

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
    __m256i acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_si256();
    for (int64_t q = 0; q < o.words; ++q) {
      const __m256i av = _mm256_set1_epi64x(static_cast<int64_t>(o.a[(r0 + r) * o.words + q]));
      for (int j = 0; j < 8; ++j) {
        const __m256i x = _mm256_xor_si256(
            av, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + q * kBlock + 4 * j)));
        if (Ternary) {
          const __m256i am =
              _mm256_set1_epi64x(static_cast<int64_t>(o.an[(r0 + r) * o.words + q]));
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
#endif

// One weight block times rows [r0, r0 + rows): sums [rows][32], on the chosen instruction set.
void block_sums(Isa isa, const Operands& o, int64_t r0, int rows, int64_t blk, int64_t* sums) {
#if LOWBIT_X86
  const bool ternary = o.an != nullptr;
  if (isa == kAvx512) {
    int r = 0;
    for (; r + 4 <= rows; r += 4)
      ternary ? block_avx512<4, true>(o, r0 + r, blk, sums + r * kBlock)
              : block_avx512<4, false>(o, r0 + r, blk, sums + r * kBlock);
    for (; r < rows; ++r)
      ternary ? block_avx512<1, true>(o, r0 + r, blk, sums + r * kBlock)
              : block_avx512<1, false>(o, r0 + r, blk, sums + r * kBlock);
    return;
  }
  if (isa == kAvx2) {
    ternary ? block_avx2<true>(o, r0, rows, blk, sums) : block_avx2<false>(o, r0, rows, blk, sums);
    return;
  }
#endif
  block_scalar(o, r0, rows, blk, sums);
}

// The dot products of bit rows with the blocked weight (see the top of the file), handed over
// a row at a time: `store(row, col0, dots, cols)`. k: the number of real codes in a row (a convolution row pads each
// tap to whole words). XNOR: k - 2 * sums; ternary (nonzero planes given): the sums.
template <typename Store>
void popcount_gemm(const at::Tensor& a, const at::Tensor& a_nonzero, const at::Tensor& w,
                   const at::Tensor& w_nonzero, int64_t n, int64_t k, int64_t isa, Store store) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kLong && w.dim() == 3 &&
                  w.scalar_type() == at::kLong && w.size(2) == kBlock && w.is_contiguous(),
              "popcount_dots: a must be int64 [M, W], w int64 [N / 32, W, 32]");
  const int64_t m = a.size(0), words = a.size(1), blocks = w.size(0);
  TORCH_CHECK(w.size(1) == words && k <= words * 64 && n <= blocks * kBlock &&
                  n > (blocks - 1) * kBlock,
              "popcount_dots: shapes disagree (a ", a.sizes(), ", w ", w.sizes(), ", n ", n,
              ", k ", k, ")");
  const bool ternary = a_nonzero.defined() && a_nonzero.numel() > 0;
  TORCH_CHECK(!ternary || (a_nonzero.sizes() == a.sizes() && w_nonzero.sizes() == w.sizes()),
              "popcount_dots: the nonzero planes must match the sign planes");
  const Isa chosen = resolve(isa);
  auto ac = a.contiguous();
  auto anc = a_nonzero.contiguous();
  auto wnc = w_nonzero.contiguous();
  const Operands o{
      reinterpret_cast<const uint64_t*>(ac.const_data_ptr<int64_t>()),
      ternary ? reinterpret_cast<const uint64_t*>(anc.const_data_ptr<int64_t>()) : nullptr,
      reinterpret_cast<const uint64_t*>(w.const_data_ptr<int64_t>()),
      ternary ? reinterpret_cast<const uint64_t*>(wnc.const_data_ptr<int64_t>()) : nullptr,
      words};
  constexpr int64_t kRows = 64;  // rows per pass over one weight block (it stays in L1 / L2)
  const int64_t tiles = (m + kRows - 1) / kRows;
  // tasks: (weight block, 64-row tile) pairs, so a few weight blocks still spread over threads
  at::parallel_for(0, blocks * tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> sums(kRows * kBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t / tiles, r0 = (t % tiles) * kRows;
      const int64_t cols = std::min(kBlock, n - blk * kBlock);
      const int rows = static_cast<int>(std::min(kRows, m - r0));
      block_sums(chosen, o, r0, rows, blk, sums.data());
      for (int r = 0; r < rows; ++r) {
        int64_t* s = sums.data() + r * kBlock;
        if (!ternary)
          for (int64_t j = 0; j < cols; ++j) s[j] = k - 2 * s[j];
        store(r0 + r, blk * kBlock, s, cols);
      }
    }
  });
}

// int32 [M, n]: the dot products themselves.
at::Tensor popcount_dots(const at::Tensor& a, const at::Tensor& a_nonzero, const at::Tensor& w,
                         const at::Tensor& w_nonzero, int64_t n, int64_t k, int64_t isa) {
  auto out = at::empty({a.size(0), n}, a.options().dtype(at::kInt));
  int32_t* op = out.mutable_data_ptr<int32_t>();
  popcount_gemm(a, a_nonzero, w, w_nonzero, n, k, isa,
                [&](int64_t r, int64_t j0, const int64_t* dots, int64_t cols) {
                  for (int64_t j = 0; j < cols; ++j)
                    op[r * n + j0 + j] = static_cast<int32_t>(dots[j]);
                });
  return out;
}

// float32 [M, n] = (dot - corr[r % L, j]) * scale[j] + offset[r % L, j]: an XNOR layer's output
// in one pass (corr: int32 [L, n] or empty; offset: float [L, n]; L divides M).
at::Tensor popcount_affine(const at::Tensor& a, const at::Tensor& w, int64_t n, int64_t k,
                           const at::Tensor& corr, const at::Tensor& scale,
                           const at::Tensor& offset, int64_t isa) {
  const int64_t m = a.size(0), l = offset.size(0);
  TORCH_CHECK(offset.dim() == 2 && offset.size(1) == n && l > 0 && m % l == 0 &&
                  scale.numel() == n && (corr.numel() == 0 || corr.sizes() == offset.sizes()),
              "popcount_affine: offset must be [L, n] with L dividing the rows, scale [n], corr "
              "empty or [L, n]");
  auto oc = offset.contiguous().to(at::kFloat);
  auto sc = scale.contiguous().to(at::kFloat);
  auto cc = corr.contiguous().to(at::kInt);
  const float* offp = oc.const_data_ptr<float>();
  const float* sp = sc.const_data_ptr<float>();
  const int32_t* cp = corr.numel() ? cc.const_data_ptr<int32_t>() : nullptr;
  auto out = at::empty({m, n}, a.options().dtype(at::kFloat));
  float* op = out.mutable_data_ptr<float>();
  const auto none = at::empty({0}, a.options());
  popcount_gemm(a, none, w, none, n, k, isa,
                [&](int64_t r, int64_t j0, const int64_t* dots, int64_t cols) {
                  const int64_t at = (r % l) * n + j0;
                  float* dst = op + r * n + j0;
                  for (int64_t j = 0; j < cols; ++j) {
                    const int64_t d = cp ? dots[j] - cp[at + j] : dots[j];
                    dst[j] = static_cast<float>(d) * sp[j0 + j] + offp[at + j];
                  }
                });
  return out;
}

// --- sign-mask sums: binary / ternary weights times float or int8 inputs ------------------------

// out[r, j] = sum_k sign(w[j, k]) * x[r, k] (the code, +-1 or 0) for float or int8 x; w as bit
// rows [N, W] (sign, and nonzero for ternary weights). Float sums in float32, int8 in int32.
template <typename T, typename Acc>
void mask_rows(const T* x, int64_t k, const uint64_t* s, const uint64_t* nz, int64_t words,
               int64_t j0, int64_t j1, int64_t r0, int64_t r1, Acc* out, int64_t n) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = j0; j < j1; ++j) {
      Acc acc = 0;
      for (int64_t i = 0; i < k; ++i) {
        const uint64_t bit = uint64_t{1} << (i & 63);
        const bool keep = nz == nullptr || (nz[j * words + (i >> 6)] & bit);
        const bool plus = s[j * words + (i >> 6)] & bit;
        const Acc v = static_cast<Acc>(x[r * k + i]);
        acc += keep ? (plus ? v : -v) : Acc(0);
      }
      out[r * n + j] = acc;
    }
}

#if LOWBIT_X86
// The same for float32 x: 16 inputs per vector, their sign bits flipped where the weight is -1
// (XOR), zeroed where it is 0, added; two accumulators per row, R rows share each weight load.
// 16 inputs of one row, their sign flipped where the weight is -1, zeroed where it is 0.
__attribute__((target("avx512f"))) inline __m512 signed_inputs(const float* x, __mmask16 keep,
                                                               __m512i flip) {
  const __m512i xv = _mm512_castps_si512(_mm512_maskz_loadu_ps(keep, x));
  return _mm512_castsi512_ps(_mm512_xor_si512(xv, flip));
}

template <int R>
__attribute__((target("avx512f"))) void mask_rows_avx512(
    const float* x, int64_t k, const uint64_t* s, const uint64_t* nz, int64_t words, int64_t j0,
    int64_t j1, int64_t r0, float* out, int64_t n) {
  const __m512i top = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  const int64_t chunks = (k + 15) / 16;
  for (int64_t j = j0; j < j1; ++j) {
    const auto* s16 = reinterpret_cast<const uint16_t*>(s + j * words);
    const auto* n16 = nz ? reinterpret_cast<const uint16_t*>(nz + j * words) : nullptr;
    __m512 even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_ps();
    auto keep_of = [&](int64_t c) {
      const __mmask16 tail =
          c * 16 + 16 <= k ? __mmask16(0xFFFF) : __mmask16((1u << (k - c * 16)) - 1);
      return n16 ? static_cast<__mmask16>(n16[c] & tail) : tail;
    };
    int64_t c = 0;
    for (; c + 2 <= chunks; c += 2) {
      const __mmask16 k0 = keep_of(c), k1 = keep_of(c + 1);
      const __m512i f0 = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~s16[c]), top);
      const __m512i f1 = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~s16[c + 1]), top);
      for (int r = 0; r < R; ++r) {
        const float* row = x + (r0 + r) * k + c * 16;
        even[r] = _mm512_add_ps(even[r], signed_inputs(row, k0, f0));
        odd[r] = _mm512_add_ps(odd[r], signed_inputs(row + 16, k1, f1));
      }
    }
    if (c < chunks) {
      const __mmask16 k0 = keep_of(c);
      const __m512i f0 = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~s16[c]), top);
      for (int r = 0; r < R; ++r)
        even[r] = _mm512_add_ps(even[r], signed_inputs(x + (r0 + r) * k + c * 16, k0, f0));
    }
    for (int r = 0; r < R; ++r)
      out[(r0 + r) * n + j] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r]));
  }
}

// int8 x: 16 inputs widened to int32 per vector, added where the weight is +1 and subtracted
// where it is -1 (two accumulators: plus and minus), exact.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void mask_rows_int8_avx512(
    const int8_t* x, int64_t k, const uint64_t* s, const uint64_t* nz, int64_t words, int64_t j0,
    int64_t j1, int64_t r0, int32_t* out, int64_t n) {
  const int64_t chunks = (k + 15) / 16;
  for (int64_t j = j0; j < j1; ++j) {
    const auto* s16 = reinterpret_cast<const uint16_t*>(s + j * words);
    const auto* n16 = nz ? reinterpret_cast<const uint16_t*>(nz + j * words) : nullptr;
    __m512i plus[R], minus[R];
    for (int r = 0; r < R; ++r) plus[r] = minus[r] = _mm512_setzero_si512();
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask16 tail =
          c * 16 + 16 <= k ? __mmask16(0xFFFF) : __mmask16((1u << (k - c * 16)) - 1);
      const __mmask16 keep = n16 ? static_cast<__mmask16>(n16[c] & tail) : tail;
      const __mmask16 up = keep & s16[c], down = keep & static_cast<__mmask16>(~s16[c]);
      for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_cvtepi8_epi32(
            _mm_maskz_loadu_epi8(tail, x + (r0 + r) * k + c * 16));
        plus[r] = _mm512_mask_add_epi32(plus[r], up, plus[r], v);
        minus[r] = _mm512_mask_add_epi32(minus[r], down, minus[r], v);
      }
    }
    for (int r = 0; r < R; ++r)
      out[(r0 + r) * n + j] = _mm512_reduce_add_epi32(_mm512_sub_epi32(plus[r], minus[r]));
  }
}
#endif

at::Tensor sign_mask_sums(const at::Tensor& x, const at::Tensor& sign, const at::Tensor& nonzero,
                          int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kChar),
              "sign_mask_sums: x must be a 2-D float32 or int8 CPU tensor");
  TORCH_CHECK(sign.dim() == 2 && sign.scalar_type() == at::kLong &&
                  sign.size(1) == (x.size(1) + 63) / 64,
              "sign_mask_sums: sign must be int64 [N, ceil(K / 64)], got ", sign.sizes());
  TORCH_CHECK(nonzero.numel() == 0 || nonzero.sizes() == sign.sizes(),
              "sign_mask_sums: nonzero must match sign");
  const Isa chosen = resolve(isa);
  const int64_t m = x.size(0), k = x.size(1), n = sign.size(0), words = sign.size(1);
  auto xc = x.contiguous();
  auto sc = sign.contiguous();
  auto nc = nonzero.contiguous();
  const auto* s = reinterpret_cast<const uint64_t*>(sc.const_data_ptr<int64_t>());
  const auto* nz =
      nonzero.numel() ? reinterpret_cast<const uint64_t*>(nc.const_data_ptr<int64_t>()) : nullptr;
  const bool is_float = x.scalar_type() == at::kFloat;
  auto out = at::empty({m, n}, x.options().dtype(is_float ? at::kFloat : at::kInt));
  at::parallel_for(0, n, 16, [&](int64_t j0, int64_t j1) {
    if (!is_float) {
      const int8_t* xp = xc.const_data_ptr<int8_t>();
      int32_t* op = out.mutable_data_ptr<int32_t>();
#if LOWBIT_X86
      if (chosen == kAvx512) {
        over_row_chunks(m, [&](int64_t r, auto chunk) {
          mask_rows_int8_avx512<decltype(chunk)::value>(xp, k, s, nz, words, j0, j1, r, op, n);
        });
        return;
      }
#endif
      mask_rows<int8_t, int32_t>(xp, k, s, nz, words, j0, j1, 0, m, op, n);
      return;
    }
    const float* xp = xc.const_data_ptr<float>();
    float* op = out.mutable_data_ptr<float>();
#if LOWBIT_X86
    if (chosen == kAvx512) {
      over_row_chunks(m, [&](int64_t r, auto chunk) {
        mask_rows_avx512<decltype(chunk)::value>(xp, k, s, nz, words, j0, j1, r, op, n);
      });
      return;
    }
#endif
    mask_rows<float, float>(xp, k, s, nz, words, j0, j1, 0, m, op, n);
  });
  return out;
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("sign_bits(Tensor x, Tensor center) -> Tensor", &lowbit::sign_bits);
  m.def(
      "sign_bits_conv(Tensor x, Tensor center, int kh, int kw, int sh, int sw, int ph, int pw, "
      "int dh, int dw) -> Tensor",
      &lowbit::sign_bits_conv);
  m.def(
      "popcount_dots(Tensor a, Tensor a_nonzero, Tensor w, Tensor w_nonzero, int n, int k, "
      "int isa) -> Tensor",
      &lowbit::popcount_dots);
  m.def(
      "popcount_affine(Tensor a, Tensor w, int n, int k, Tensor corr, Tensor scale, "
      "Tensor offset, int isa) -> Tensor",
      &lowbit::popcount_affine);
  m.def("sign_mask_sums(Tensor x, Tensor sign, Tensor nonzero, int isa) -> Tensor",
        &lowbit::sign_mask_sums);
}
