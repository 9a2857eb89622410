// Binary and ternary kernels on bit rows: the popcount Linear ops and the sign-mask sums.
//
// Bit layout and the popcount GEMM: popcount.h. A binary code is one plane (bit 1: +1, bit 0:
// -1); a ternary code two planes, `sign` (bit 1: +1) and `nonzero` (bit 1: the code is not 0).
//   binary / ternary weights x float or int8 inputs: sum of the inputs with the weight's sign
//   (flipped by XOR of the sign bit, zeroed where the weight is 0)
// Integer results are exact; Python (lowbit/kernels/binary.py) has eager twins that compute
// the same integers. The convolution ops are in binary_conv.cpp.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common.h"
#include "popcount.h"

namespace lowbit {
namespace {

using bits::Isa;
using bits::kAvx512;
using bits::resolve;

// The code bits of each row of x [M, K] around `center` (per feature, or empty for 0):
// [M, ceil(K / 64)] int64 sign bits, and for ternary the nonzero bits (else an empty tensor).
std::tuple<at::Tensor, at::Tensor> code_bits(const at::Tensor& x, const at::Tensor& center,
                                             const bits::Codes& cd, int64_t isa,
                                             const char* op) {
  check_input(x, -1, op);
  resolve(isa);
  const int64_t m = x.size(0), k = x.size(1), words = (k + 63) / 64;
  TORCH_CHECK(center.numel() == 0 || center.numel() == k, op, ": center has ", center.numel(),
              " values, x ", k, " features");
  auto xc = x.contiguous();
  auto cc = center.contiguous().to(at::kFloat);
  auto sign = at::empty({m, words}, x.options().dtype(at::kLong));
  auto nz = at::empty({cd.ternary ? m : 0, words}, sign.options());
  const float* xp = xc.const_data_ptr<float>();
  const bits::Codes codes{center.numel() ? cc.const_data_ptr<float>() : nullptr, cd.t,
                          cd.ternary};
  auto* sp = reinterpret_cast<uint64_t*>(sign.mutable_data_ptr<int64_t>());
  auto* np = reinterpret_cast<uint64_t*>(nz.mutable_data_ptr<int64_t>());
  const bool avx512 = bits::pack_avx512(isa);
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      bits::code_row(avx512, xp + r * k, codes, k, sp + r * words,
                     cd.ternary ? np + r * words : nullptr);
  });
  return {sign, nz};
}

// Bits of (x - center >= 0) per row: [M, K] float -> [M, ceil(K / 64)] int64.
at::Tensor sign_bits(const at::Tensor& x, const at::Tensor& center) {
  return std::get<0>(code_bits(x, center, bits::Codes{nullptr, 0.f, false}, 0, "sign_bits"));
}

// Ternary code bits per row: sign (x - center > t) and nonzero (|x - center| > t).
std::tuple<at::Tensor, at::Tensor> ternary_bits(const at::Tensor& x, const at::Tensor& center,
                                                double threshold, int64_t isa) {
  TORCH_CHECK(threshold >= 0, "ternary_bits: threshold must be >= 0, got ", threshold);
  const bits::Codes cd{nullptr, static_cast<float>(threshold), true};
  return code_bits(x, center, cd, isa, "ternary_bits");
}

// The operands of a popcount GEMM on plain bit rows a [M, W] and a blocked weight w.
struct LinearOperands {
  at::Tensor ac, anc, wnc;
  bits::DenseRows rows;
  bits::Operands o;
  int64_t m;

  LinearOperands(const at::Tensor& a, const at::Tensor& a_nonzero, const at::Tensor& w,
                 const at::Tensor& w_nonzero, int64_t n, int64_t k)
      : rows(a.dim() == 2 ? a.size(0) : 0, a.dim() == 2 ? a.size(1) : 0) {
    TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kLong && w.dim() == 3 &&
                    w.scalar_type() == at::kLong && w.size(2) == bits::kBlock &&
                    w.is_contiguous(),
                "popcount_dots: a must be int64 [M, W], w int64 [N / 32, W, 32]");
    m = a.size(0);
    const int64_t words = a.size(1), blocks = w.size(0);
    TORCH_CHECK(w.size(1) == words && k <= words * 64 && n <= blocks * bits::kBlock &&
                    n > (blocks - 1) * bits::kBlock,
                "popcount_dots: shapes disagree (a ", a.sizes(), ", w ", w.sizes(), ", n ", n,
                ", k ", k, ")");
    const bool ternary = a_nonzero.defined() && a_nonzero.numel() > 0;
    TORCH_CHECK(!ternary || (a_nonzero.sizes() == a.sizes() && w_nonzero.sizes() == w.sizes()),
                "popcount_dots: the nonzero planes must match the sign planes");
    ac = a.contiguous();
    anc = a_nonzero.contiguous();
    wnc = w_nonzero.contiguous();
    auto ptr = [](const at::Tensor& t) {
      return reinterpret_cast<const uint64_t*>(t.const_data_ptr<int64_t>());
    };
    o = bits::Operands{ptr(ac),          ternary ? ptr(anc) : nullptr, ptr(w),
                       ternary ? ptr(wnc) : nullptr, words, rows.base.data(), rows.off.data()};
  }
};

// int32 [M, n]: the dot products themselves. k: the number of real codes in a row.
at::Tensor popcount_dots(const at::Tensor& a, const at::Tensor& a_nonzero, const at::Tensor& w,
                         const at::Tensor& w_nonzero, int64_t n, int64_t k, int64_t isa) {
  const Isa chosen = resolve(isa);
  LinearOperands ops(a, a_nonzero, w, w_nonzero, n, k);
  auto out = at::empty({ops.m, n}, a.options().dtype(at::kInt));
  const bits::DotsEpi epi{out.mutable_data_ptr<int32_t>(), n, k, ops.o.an == nullptr};
  bits::popcount_gemm(chosen, ops.o, ops.m, n, epi);
  return out;
}

// float32 [M, n] = (dot - corr[r % L, j]) * scale[j] + offset[r % L, j]: an XNOR layer's output
// in one pass (corr: int32 [L, n] or empty; offset: float [L, n]; L divides M), or with the
// nonzero planes given (else empty), a ternary one.
at::Tensor popcount_affine(const at::Tensor& a, const at::Tensor& a_nonzero, const at::Tensor& w,
                           const at::Tensor& w_nonzero, int64_t n, int64_t k,
                           const at::Tensor& corr, const at::Tensor& scale,
                           const at::Tensor& offset, int64_t isa) {
  const int64_t l = offset.size(0);
  TORCH_CHECK(offset.dim() == 2 && offset.size(1) == n && l > 0 && a.size(0) % l == 0 &&
                  scale.numel() == n && (corr.numel() == 0 || corr.sizes() == offset.sizes()),
              "popcount_affine: offset must be [L, n] with L dividing the rows, scale [n], corr "
              "empty or [L, n]");
  const Isa chosen = resolve(isa);
  LinearOperands ops(a, a_nonzero, w, w_nonzero, n, k);
  auto oc = offset.contiguous().to(at::kFloat);
  auto sc = scale.contiguous().to(at::kFloat);
  auto cc = corr.contiguous().to(at::kInt);
  auto out = at::empty({ops.m, n}, a.options().dtype(at::kFloat));
  const bits::AffineEpi epi{out.mutable_data_ptr<float>(),
                            n,
                            k,
                            l,
                            nullptr,
                            corr.numel() ? cc.const_data_ptr<int32_t>() : nullptr,
                            sc.const_data_ptr<float>(),
                            oc.const_data_ptr<float>(),
                            ops.o.an == nullptr};
  bits::popcount_gemm(chosen, ops.o, ops.m, n, epi);
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
  m.def("ternary_bits(Tensor x, Tensor center, float threshold, int isa) -> (Tensor, Tensor)",
        &lowbit::ternary_bits);
  m.def(
      "popcount_dots(Tensor a, Tensor a_nonzero, Tensor w, Tensor w_nonzero, int n, int k, "
      "int isa) -> Tensor",
      &lowbit::popcount_dots);
  m.def(
      "popcount_affine(Tensor a, Tensor a_nonzero, Tensor w, Tensor w_nonzero, int n, int k, "
      "Tensor corr, Tensor scale, Tensor offset, int isa) -> Tensor",
      &lowbit::popcount_affine);
  m.def("sign_mask_sums(Tensor x, Tensor sign, Tensor nonzero, int isa) -> Tensor",
        &lowbit::sign_mask_sums);
}
