// Weight-only int8 / int4 Linear on AVX-512 CPUs without VNNI: float activations times integer
// weights widened to float in registers, each weight load shared by up to four token rows.
//
//   weight_only_float_int8: y[m, n] = sum_k w[n, k] * x[m, k] * s[n] + b[n]
//   weight_only_float_int4: y[m, n] = sum_g s[n, g] * (sum_{k in g} (u[n, k] - 8) * x[m, k]
//                                     - (c[n, g] - 8) * sum_{k in g} x[m, k]) + b[n]
//
// u: 4-bit codes offset into 0..15, two per byte (even k in the low nibble); c: offset + zero
// point per group. At one token a Linear is bound by reading its weight: these read 1 (int8) or
// 1/2 (int4) byte per weight against FP32's 4. AVX-512 only (Python checks the CPU first); on
// CPUs with VNNI the fixed-point ops of linear.cpp are faster and run instead.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common.h"

#if LOWBIT_X86
#define LOWBIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#endif

namespace lowbit {
namespace {

constexpr int64_t kOutGrain = 64;  // outputs per parallel task

// check_input, and a CPU these loops run on.
void check_rows(const at::Tensor& x, int64_t k, const char* op) {
  check_input(x, k, op);
#if LOWBIT_X86
  TORCH_CHECK(__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"), op,
              " needs AVX-512");
#else
  TORCH_CHECK(false, op, " needs an x86 CPU with AVX-512");
#endif
}

#if LOWBIT_X86
// acc[r][j] += w[n + j, c : c + 16] * x[r, c : c + 16]; Masked: only the lanes in `mask`.
template <int R, int NB, bool Masked>
LOWBIT_AVX512 inline void int8_step(const float* x, int64_t k, const int8_t* w, int64_t n,
                                    int64_t c, __mmask16 mask, __m512 (&acc)[R][NB]) {
  __m512 wv[NB];
  for (int j = 0; j < NB; ++j) {
    const int8_t* p = w + (n + j) * k + c;
    const __m128i b = Masked ? _mm_maskz_loadu_epi8(mask, p)
                             : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  }
  for (int r = 0; r < R; ++r) {
    const float* q = x + r * k + c;
    const __m512 xv = Masked ? _mm512_maskz_loadu_ps(mask, q) : _mm512_loadu_ps(q);
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_fmadd_ps(wv[j], xv, acc[r][j]);
  }
}

// Outputs [n0, n1) for R token rows, NB outputs at a time (R * NB accumulators).
template <int R, int NB>
LOWBIT_AVX512 void int8_outputs(const float* x, int64_t k, const int8_t* w, const float* scale,
                                const float* bias, int64_t n0, int64_t n1, float* y,
                                int64_t n_total) {
  const int64_t full = k - k % 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (k % 16)) - 1);
  for (int64_t n = n0; n + NB <= n1; n += NB) {
    __m512 acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < full; c += 16) int8_step<R, NB, false>(x, k, w, n, c, 0, acc);
    if (tail) int8_step<R, NB, true>(x, k, w, n, full, tail, acc);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NB; ++j)
        y[r * n_total + n + j] = _mm512_reduce_add_ps(acc[r][j]) * scale[n + j] + bias[n + j];
  }
}

// xe / xo: the even / odd elements of each row ([R, K/2]); xsum: [R, groups] sums of x per group.
template <int R, int NB>
LOWBIT_AVX512 void int4_outputs(const float* xe, const float* xo, const float* xsum,
                                int64_t half_k, const uint8_t* packed, const float* scale,
                                const float* center, int64_t groups, const float* bias,
                                int64_t n0, int64_t n1, float* y, int64_t n_total) {
  const int64_t group_bytes = half_k / groups;  // a multiple of 16 (checked by the caller)
  // u - 8 as floats, looked up by one permute instead of a convert and a subtract
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t n = n0; n + NB <= n1; n += NB) {
    __m512 acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 part[R][NB];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < NB; ++j) part[r][j] = _mm512_setzero_ps();
      for (int64_t c = g * group_bytes; c < (g + 1) * group_bytes; c += 16) {
        __m512 lo[NB], hi[NB];
        for (int j = 0; j < NB; ++j) {
          // one byte per lane; the permute reads only an index's low 4 bits: the low nibble
          const __m512i b = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (n + j) * half_k + c)));
          lo[j] = _mm512_permutexvar_ps(b, table);
          hi[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
        }
        for (int r = 0; r < R; ++r) {
          const __m512 ev = _mm512_loadu_ps(xe + r * half_k + c);
          const __m512 ov = _mm512_loadu_ps(xo + r * half_k + c);
          for (int j = 0; j < NB; ++j) {
            part[r][j] = _mm512_fmadd_ps(lo[j], ev, part[r][j]);
            part[r][j] = _mm512_fmadd_ps(hi[j], ov, part[r][j]);
          }
        }
      }
      for (int j = 0; j < NB; ++j) {
        const __m512 s = _mm512_set1_ps(scale[(n + j) * groups + g]);
        for (int r = 0; r < R; ++r) acc[r][j] = _mm512_fmadd_ps(part[r][j], s, acc[r][j]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < NB; ++j) {
        const float* s = scale + (n + j) * groups;
        const float* cn = center + (n + j) * groups;
        float centre_term = 0.f;
        for (int64_t g = 0; g < groups; ++g)
          centre_term += s[g] * (cn[g] - 8.f) * xsum[r * groups + g];
        y[r * n_total + n + j] = _mm512_reduce_add_ps(acc[r][j]) - centre_term + bias[n + j];
      }
    }
  }
}

#endif

at::Tensor weight_only_float_int8(const at::Tensor& x, const at::Tensor& w,
                                  const at::Tensor& scale, const at::Tensor& bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "weight_only_float_int8: w must be a contiguous 2-D int8 tensor");
  const int64_t n = w.size(0), k = w.size(1);
  check_rows(x, k, "weight_only_float_int8");
  auto xc = x.contiguous();
  const int64_t m = xc.size(0);
  auto y = at::empty({m, n}, x.options());
#if LOWBIT_X86
  const float* xp = xc.const_data_ptr<float>();
  const int8_t* wp = w.const_data_ptr<int8_t>();
  const float* sp = scale.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, n, kOutGrain, [&](int64_t n0, int64_t n1) {
    over_row_chunks(m, [&](int64_t r, auto rows) {
      constexpr int R = decltype(rows)::value;
      constexpr int NB = R == 1 ? 8 : 4;  // R * NB accumulators stay in registers
      const int64_t split = n0 + (n1 - n0) / NB * NB;
      int8_outputs<R, NB>(xp + r * k, k, wp, sp, bp, n0, split, yp + r * n, n);
      int8_outputs<R, 1>(xp + r * k, k, wp, sp, bp, split, n1, yp + r * n, n);
    });
  });
#endif
  return y;
}

at::Tensor weight_only_float_int4(const at::Tensor& x, const at::Tensor& packed,
                                  const at::Tensor& scale, const at::Tensor& center,
                                  const at::Tensor& bias) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "weight_only_float_int4: packed must be a contiguous 2-D uint8 tensor");
  const int64_t n = packed.size(0), half_k = packed.size(1), groups = scale.size(1);
  TORCH_CHECK(groups > 0 && half_k % groups == 0 && (half_k / groups) % 16 == 0,
              "weight_only_float_int4: groups of ", 2 * half_k / std::max<int64_t>(groups, 1),
              " weights; the kernel needs a multiple of 32");
  check_rows(x, 2 * half_k, "weight_only_float_int4");
  const int64_t m = x.size(0);
  auto pairs = x.reshape({m, half_k, 2});
  auto xe = pairs.select(2, 0).contiguous(), xo = pairs.select(2, 1).contiguous();
  auto xsum = x.reshape({m, groups, -1}).sum(-1).contiguous();
  TORCH_CHECK(scale.is_contiguous() && center.is_contiguous() && center.sizes() == scale.sizes(),
              "weight_only_float_int4: scale and center must be contiguous [N, groups]");
  auto y = at::empty({m, n}, x.options());
#if LOWBIT_X86
  const float* ep = xe.const_data_ptr<float>();
  const float* op = xo.const_data_ptr<float>();
  const float* xs = xsum.const_data_ptr<float>();
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const float* sp = scale.const_data_ptr<float>();
  const float* cp = center.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, n, kOutGrain, [&](int64_t n0, int64_t n1) {
    over_row_chunks(m, [&](int64_t r, auto rows) {
      constexpr int R = decltype(rows)::value;
      constexpr int NB = R <= 2 ? 4 : 2;  // R * NB * 2 accumulators stay in registers
      const int64_t split = n0 + (n1 - n0) / NB * NB;
      const float* e = ep + r * half_k;
      const float* o = op + r * half_k;
      const float* s = xs + r * groups;
      int4_outputs<R, NB>(e, o, s, half_k, pp, sp, cp, groups, bp, n0, split, yp + r * n, n);
      int4_outputs<R, 1>(e, o, s, half_k, pp, sp, cp, groups, bp, split, n1, yp + r * n, n);
    });
  });
#endif
  return y;
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def("weight_only_float_int8(Tensor x, Tensor w, Tensor scale, Tensor bias) -> Tensor",
        &lowbit::weight_only_float_int8);
  m.def(
      "weight_only_float_int4(Tensor x, Tensor packed, Tensor scale, Tensor center, "
      "Tensor bias) -> Tensor",
      &lowbit::weight_only_float_int4);
}
