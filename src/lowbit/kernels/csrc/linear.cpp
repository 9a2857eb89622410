// Integer Linear kernels: lowbit's AVX-512 VNNI kernel, and the ops built on it and on torch's
// integer GEMMs. Each op is one call from Python.
//
// 1. Dynamic int8 Linear with one symmetric activation scale per token, each route one fused op:
//
//   s   = max|x_row| / qmax       (1 where that is not above the smallest normal float)
//   q   = round_half_even(x / s)  true float32 division, as lowbit.numerics.quantize
//   y   = (q @ w_q^T) * s * w_scale + bias
//
// Every op quantizes the rows in one pass (row max and codes), runs the integer product and
// rescales its output in place: one call from Python instead of six or seven eager ops, which is
// most of the cost of a one-token call. A row holding a NaN or an infinity gives a NaN row.
//
// Routes (lowbit/kernels/dynamic.py picks one per shape):
//   linear_vnni    lowbit's own AVX-512 VNNI kernel for a few rows (decoding): uint8 codes
//                  (q + 128) times the int8 weight packed by vnni_pack, 128 * column sums
//                  subtracted, so the int32 sums are exact.
//   linear_int_mm  torch._int_mm on int8 codes; w_t of 2N columns: two halves of the weight,
//                  summed (dynamic.int_mm_operand: exact on CPUs without VNNI).
//   linear_fbgemm  fbgemm's packed GEMM fed the codes as floats with scale 1, zero point 128,
//                  so its own quantization is exact; the weight scale is fused in its output.
//   linear_onednn  oneDNN's qlinear_pointwise on uint8 codes (zero point 128).
// The uint8 x int8 routes need VNNI (without it the CPU adds products in saturating int16);
// Python checks that before choosing them.
//
// 2. Weight-only int8 and int4 (weight_only_vnni_int8, weight_only_vnni_int4): the float input
// as a 24- / 23-bit fixed-point copy split into three 8-bit digits, so the products run on the
// VNNI kernel with exact int32 sums (see each op).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/quantized/PackedParams.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "common.h"

#if LOWBIT_X86
// One build runs on any x86-64 CPU; the elementwise loops get AVX-512 / AVX2 clones.
#define LOWBIT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LOWBIT_CLONES
#endif

namespace lowbit {
namespace {

constexpr int64_t kRowGrain = 16;  // rows per parallel task: one-token calls stay on this thread
constexpr int64_t kCols = 16;      // VNNI layout: outputs per 512-bit accumulator
constexpr int64_t kDepth = 4;      // VNNI layout: uint8 x int8 products per int32 lane

LOWBIT_CLONES float row_scale(const float* x, int64_t k, int64_t qmax) {
  float top = 0.f, probe = 0.f;
#pragma omp simd reduction(max : top) reduction(+ : probe)
  for (int64_t i = 0; i < k; ++i) {
    top = std::max(top, std::fabs(x[i]));
    probe += x[i] * 0.f;  // NaN once the row holds a NaN or an infinity
  }
  if (probe != 0.f) return std::numeric_limits<float>::quiet_NaN();
  const float s = top / static_cast<float>(qmax);
  return s > std::numeric_limits<float>::min() ? s : 1.f;
}

template <typename T>
LOWBIT_CLONES void row_codes(const float* x, int64_t k, float s, float offset, T* q) {
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) q[i] = static_cast<T>(std::nearbyint(x[i] / s) + offset);
}

// Codes [M, width] of `dtype` (width >= K; the columns past K hold `offset`) and scales [M].
template <typename T>
std::pair<at::Tensor, at::Tensor> quantize_rows(
    const at::Tensor& x, int64_t qmax, at::ScalarType dtype, float offset, int64_t width) {
  const int64_t m = x.size(0), k = x.size(1);
  auto q = at::empty({m, width}, x.options().dtype(dtype));
  auto scale = at::empty({m}, x.options());
  const float* xp = x.const_data_ptr<float>();
  T* qp = q.mutable_data_ptr<T>();
  float* sp = scale.mutable_data_ptr<float>();
  const T fill = static_cast<T>(offset);
  at::parallel_for(0, m, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float s = row_scale(xp + r * k, k, qmax);
      sp[r] = s;
      T* row = qp + r * width;
      if (std::isnan(s)) {
        std::fill(row, row + width, fill);
      } else {
        row_codes<T>(xp + r * k, k, s, offset, row);
        std::fill(row + k, row + width, fill);
      }
    }
  });
  return {q, scale};
}

LOWBIT_CLONES void rescale_row(float* y, int64_t n, float s, const float* w_scale,
                               const float* bias) {
  if (w_scale != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = y[j] * s * w_scale[j] + bias[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = y[j] * s + bias[j];
  }
}

// y[r, :] = y[r, :] * s[r] (* w_scale) + bias, in place.
void rescale(at::Tensor& y, const at::Tensor& scale, const float* w_scale, const at::Tensor& bias) {
  const int64_t m = y.size(0), n = y.size(1);
  float* yp = y.mutable_data_ptr<float>();
  const float* sp = scale.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  at::parallel_for(0, m, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rescale_row(yp + r * n, n, sp[r], w_scale, bp);
  });
}

// --- lowbit's VNNI kernel --------------------------------------------------------------------

// [N, K] int8 -> [ceil(N/16), ceil(K/4), 16, 4] (zero padded), and 128 * each output's code sum
// (the uint8 codes carry an offset of 128 that this removes).
std::vector<at::Tensor> vnni_pack(const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar,
              "vnni_pack: expects a 2-D int8 weight, got ", codes.sizes(), " ",
              codes.scalar_type());
  const int64_t n = codes.size(0), k = codes.size(1);
  // 255 * 127 * K must fit in int32
  TORCH_CHECK(k <= 65536, "vnni_pack: K = ", k, " overflows int32 sums (at most 65536)");
  const int64_t blocks = (n + kCols - 1) / kCols, groups = (k + kDepth - 1) / kDepth;
  auto w = codes.contiguous();
  auto packed = at::zeros({blocks, groups, kCols, kDepth}, codes.options());
  const int8_t* src = w.const_data_ptr<int8_t>();
  int8_t* dst = packed.mutable_data_ptr<int8_t>();
  for (int64_t r = 0; r < n; ++r) {
    int8_t* block = dst + (r / kCols) * groups * kCols * kDepth + (r % kCols) * kDepth;
    for (int64_t c = 0; c < k; ++c)
      block[(c / kDepth) * kCols * kDepth + c % kDepth] = src[r * k + c];
  }
  auto offset = w.sum(1, false, at::kInt).mul_(128);
  return {packed, offset};
}

#if LOWBIT_X86
// out[r, b*16 : b*16+16] = sum over K of a[r, k] * w[b*16 + j, k], for R rows and the output
// blocks [b0, b1): four blocks at a time, so R * 4 independent accumulators hide the latency.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void vnni_blocks(
    const uint8_t* a, int64_t a_stride, const int8_t* w, int64_t groups, int64_t b0, int64_t b1,
    int32_t* out, int64_t out_stride) {
  constexpr int B = 4;
  const int64_t block_bytes = groups * kCols * kDepth;
  int64_t b = b0;
  for (; b < b1; b += B) {
    const int nb = static_cast<int>(std::min<int64_t>(B, b1 - b));
    __m512i acc[R][B];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < B; ++j) acc[r][j] = _mm512_setzero_si512();
    const int8_t* wb = w + b * block_bytes;
    if (nb == B) {
      for (int64_t g = 0; g < groups; ++g) {
        __m512i wv[B];
        for (int j = 0; j < B; ++j) wv[j] = _mm512_loadu_si512(wb + j * block_bytes + g * 64);
        for (int r = 0; r < R; ++r) {
          int32_t a4;
          std::memcpy(&a4, a + r * a_stride + g * kDepth, sizeof(a4));
          const __m512i av = _mm512_set1_epi32(a4);
          for (int j = 0; j < B; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, wv[j]);
        }
      }
    } else {
      for (int64_t g = 0; g < groups; ++g) {
        for (int r = 0; r < R; ++r) {
          int32_t a4;
          std::memcpy(&a4, a + r * a_stride + g * kDepth, sizeof(a4));
          const __m512i av = _mm512_set1_epi32(a4);
          for (int j = 0; j < nb; ++j)
            acc[r][j] = _mm512_dpbusd_epi32(
                acc[r][j], av, _mm512_loadu_si512(wb + j * block_bytes + g * 64));
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < nb; ++j)
        _mm512_storeu_si512(out + r * out_stride + (b + j) * kCols, acc[r][j]);
  }
}
#endif

#if LOWBIT_X86
// int32 [rows, blocks * 16] = uint8 rows q [rows, width] times the packed weight.
at::Tensor vnni_accumulate(const at::Tensor& q, const at::Tensor& packed) {
  const int64_t rows = q.size(0), width = q.size(1);
  const int64_t blocks = packed.size(0), groups = packed.size(1);
  auto acc = at::empty({rows, blocks * kCols}, q.options().dtype(at::kInt));
  const uint8_t* qp = q.const_data_ptr<uint8_t>();
  const int8_t* wp = packed.const_data_ptr<int8_t>();
  int32_t* ap = acc.mutable_data_ptr<int32_t>();
  const int64_t stride = blocks * kCols;
  // Parallel over output blocks. Within a task, four blocks at a time (their weights stay in
  // L2) go through every row, four rows at a time sharing each weight load.
  at::parallel_for(0, blocks, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t b0 = t0; b0 < t1; b0 += 4) {
      const int64_t b1 = std::min(b0 + 4, t1);
      over_row_chunks(rows, [&](int64_t r, auto chunk) {
        vnni_blocks<decltype(chunk)::value>(qp + r * width, width, wp, groups, b0, b1,
                                            ap + r * stride, stride);
      });
    }
  });
  return acc;
}
#endif

int64_t vnni_width(const at::Tensor& x, const at::Tensor& packed, const char* op) {
  const int64_t width = packed.size(1) * kDepth;
  check_input(x, -1, op);
  TORCH_CHECK(width - x.size(1) >= 0 && width - x.size(1) < kDepth, op, ": x has ", x.size(1),
              " features, the packed weight ", width - kDepth + 1, "-", width);
  return width;
}

at::Tensor linear_vnni(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& offset,
                       const at::Tensor& w_scale, const at::Tensor& bias, int64_t qmax) {
#if LOWBIT_X86
  const int64_t width = vnni_width(x, packed, "linear_vnni");
  const int64_t m = x.size(0), n = w_scale.size(0);
  auto [q, scale] = quantize_rows<uint8_t>(x.contiguous(), qmax, at::kByte, 128.f, width);
  auto acc = vnni_accumulate(q, packed);
  const int64_t stride = acc.size(1);
  auto y = at::empty({m, n}, x.options());
  float* yp = y.mutable_data_ptr<float>();
  const int32_t* ap = acc.const_data_ptr<int32_t>();
  const int32_t* op = offset.const_data_ptr<int32_t>();
  const float* sp = scale.const_data_ptr<float>();
  const float* ws = w_scale.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  at::parallel_for(0, m, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int32_t* row = ap + r * stride;
      float* out = yp + r * n;
      for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(row[j] - op[j]);
      rescale_row(out, n, sp[r], ws, bp);
    }
  });
  return y;
#else
  TORCH_CHECK(false, "linear_vnni: this build has no x86 VNNI kernel");
#endif
}

// round(x / s) within [-limit, limit] (0 for a NaN scale): the weight-only ops' fixed-point
// copy of x. The clamp matters: max|x| / s can round up to limit + 1, since s itself is rounded.
inline int32_t fixed_point(float x, float s, int32_t limit) {
  if (std::isnan(s)) return 0;
  return static_cast<int32_t>(std::clamp(std::nearbyint(x / s), -float(limit), float(limit)));
}

// Weight-only int8 through the same kernel: each float row x becomes a 24-bit fixed-point copy,
// x_int = round(x / s) with s = max|x_row| / (2^23 - 1) (float32's own precision relative to
// the row's largest element), written as three uint8 digit rows of X = x_int + 2^23 =
// d2 * 2^16 + d1 * 2^8 + d0. Then sum_k w_k x_int_k = sum_d 2^(8d) (d_row . w) - 2^23 * colsum(w)
// exactly (int64), and y = that * s * w_scale + bias. Three uint8 x int8 products per weight
// cost less than widening each int8 weight to float (docs/kernels.md).
at::Tensor weight_only_vnni_int8(const at::Tensor& x, const at::Tensor& packed,
                                 const at::Tensor& offset, const at::Tensor& w_scale,
                                 const at::Tensor& bias) {
#if LOWBIT_X86
  const int64_t width = vnni_width(x, packed, "weight_only_vnni_int8");
  constexpr int32_t kFixed = (1 << 23) - 1;
  const int64_t m = x.size(0), k = x.size(1), n = w_scale.size(0);
  auto xc = x.contiguous();
  auto digits = at::empty({m, 3, width}, x.options().dtype(at::kByte));
  auto scale = at::empty({m}, x.options());
  const float* xp = xc.const_data_ptr<float>();
  uint8_t* dp = digits.mutable_data_ptr<uint8_t>();
  float* sp = scale.mutable_data_ptr<float>();
  at::parallel_for(0, m, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float s = row_scale(xp + r * k, k, kFixed);
      sp[r] = s;
      uint8_t* d = dp + r * 3 * width;
      for (int64_t i = 0; i < width; ++i) {
        const int32_t big = (i < k ? fixed_point(xp[r * k + i], s, kFixed) : 0) + (1 << 23);
        d[i] = static_cast<uint8_t>(big);
        d[width + i] = static_cast<uint8_t>(big >> 8);
        d[2 * width + i] = static_cast<uint8_t>(big >> 16);
      }
    }
  });
  auto acc = vnni_accumulate(digits.view({3 * m, width}), packed);
  const int64_t stride = acc.size(1);
  auto y = at::empty({m, n}, x.options());
  float* yp = y.mutable_data_ptr<float>();
  const int32_t* ap = acc.const_data_ptr<int32_t>();
  const int32_t* op = offset.const_data_ptr<int32_t>();  // 128 * colsum
  const float* ws = w_scale.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  at::parallel_for(0, m, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int32_t* a0 = ap + 3 * r * stride;
      const int32_t* a1 = a0 + stride;
      const int32_t* a2 = a1 + stride;
      const double s = sp[r];
      for (int64_t j = 0; j < n; ++j) {
        const int64_t dot = (static_cast<int64_t>(a2[j]) << 16) +
                            (static_cast<int64_t>(a1[j]) << 8) + a0[j] -
                            (static_cast<int64_t>(op[j]) << 16);
        yp[r * n + j] = static_cast<float>(static_cast<double>(dot) * s) * ws[j] + bp[j];
      }
    }
  });
  return y;
#else
  TORCH_CHECK(false, "weight_only_vnni_int8: this build has no x86 VNNI kernel");
#endif
}

#if LOWBIT_X86
// Weight-only int4 through VNNI, for one token row and the output blocks [b0, b1), B at a time.
// w: [blocks, K / 8, 16, 4] bytes, byte t of output j in octet o holding u[k = 8o + t] in its
// low nibble and u[8o + 4 + t] in its high one (u in 0..15, unsigned: the uint8 operand).
// e: the row's three balanced digits [3, K] (int8, the signed operand); xsum: [groups] sums of
// the row's fixed-point values per group; scale, center: [blocks, groups, 16].
template <int B>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int4_blocks(
    const int8_t* e, int64_t k, const float* xsum, const uint8_t* w, const float* scale,
    const float* center, int64_t groups, int64_t b0, int64_t b1, float* out) {
  const int64_t octets = k / 8, group_octets = octets / groups;
  const int64_t block_bytes = octets * 64;
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t b = b0; b + B <= b1; b += B) {
    __m512 total[B];
    for (int j = 0; j < B; ++j) total[j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512i acc[3][B];
      for (int d = 0; d < 3; ++d)
        for (int j = 0; j < B; ++j) acc[d][j] = _mm512_setzero_si512();
      for (int64_t o = g * group_octets; o < (g + 1) * group_octets; ++o) {
        __m512i lo[B], hi[B];
        for (int j = 0; j < B; ++j) {
          const __m512i v = _mm512_loadu_si512(w + (b + j) * block_bytes + o * 64);
          lo[j] = _mm512_and_si512(v, low);
          hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        for (int d = 0; d < 3; ++d) {
          int32_t q0, q1;
          std::memcpy(&q0, e + d * k + o * 8, 4);
          std::memcpy(&q1, e + d * k + o * 8 + 4, 4);
          const __m512i e0 = _mm512_set1_epi32(q0), e1 = _mm512_set1_epi32(q1);
          for (int j = 0; j < B; ++j) {
            acc[d][j] = _mm512_dpbusd_epi32(acc[d][j], lo[j], e0);
            acc[d][j] = _mm512_dpbusd_epi32(acc[d][j], hi[j], e1);
          }
        }
      }
      const __m512 xs = _mm512_set1_ps(xsum[g]);
      for (int j = 0; j < B; ++j) {
        // sum_k u x = digits recombined; minus center * sum_k x; times the group's scale
        __m512 dot = _mm512_cvtepi32_ps(acc[0][j]);
        dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[1][j]), _mm512_set1_ps(256.f), dot);
        dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[2][j]), _mm512_set1_ps(65536.f), dot);
        const int64_t at = ((b + j) * groups + g) * kCols;
        dot = _mm512_fnmadd_ps(_mm512_loadu_ps(center + at), xs, dot);
        total[j] = _mm512_fmadd_ps(_mm512_loadu_ps(scale + at), dot, total[j]);
      }
    }
    for (int j = 0; j < B; ++j) _mm512_storeu_ps(out + (b + j) * kCols, total[j]);
  }
}
#endif

// Weight-only int4 (one token row at a time): x as a 23-bit fixed-point copy, x_int =
// round(x / s) with s = max|x_row| / (2^22 - 1), written as three balanced int8 digits
// (x_int = e2 * 2^16 + e1 * 2^8 + e0, each in [-128, 127]) so no offset is needed; the int32
// sums per group are exact and recombined in float. y = sum_g scale * (sum u x_int -
// center * sum x_int) * s + bias.
at::Tensor weight_only_vnni_int4(const at::Tensor& x, const at::Tensor& packed,
                                 const at::Tensor& scale, const at::Tensor& center,
                                 const at::Tensor& bias) {
#if LOWBIT_X86
  check_input(x, packed.size(1) * 8, "weight_only_vnni_int4");
  const int64_t m = x.size(0), k = x.size(1), blocks = packed.size(0), groups = scale.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(2) == kCols && packed.size(3) == 4,
              "weight_only_vnni_int4: packed must be contiguous uint8 [N / 16, K / 8, 16, 4]");
  TORCH_CHECK(groups > 0 && (k / 8) % groups == 0 && scale.size(0) == blocks &&
                  scale.sizes() == center.sizes() && scale.is_contiguous() &&
                  center.is_contiguous(),
              "weight_only_vnni_int4: scale and center must be contiguous [N / 16, groups, 16], "
              "groups of a multiple of 8 weights");
  constexpr int32_t kFixed = (1 << 22) - 1;  // keeps the top digit within [-128, 127]
  auto xc = x.contiguous();
  auto y = at::empty({m, blocks * kCols}, x.options());
  const float* xp = xc.const_data_ptr<float>();
  const uint8_t* wp = packed.const_data_ptr<uint8_t>();
  const float* sp = scale.const_data_ptr<float>();
  const float* cp = center.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  std::vector<int8_t> digits(3 * k);
  std::vector<float> xsum(groups);
  const int64_t group_len = k / groups;
  for (int64_t r = 0; r < m; ++r) {
    const float* row = xp + r * k;
    const float s = row_scale(row, k, kFixed);
    for (int64_t g = 0; g < groups; ++g) {
      int64_t sum = 0;
      for (int64_t i = g * group_len; i < (g + 1) * group_len; ++i) {
        int32_t rest = fixed_point(row[i], s, kFixed);
        sum += rest;
        for (int d = 0; d < 3; ++d) {
          const int32_t digit = ((rest + 128) & 255) - 128;
          digits[d * k + i] = static_cast<int8_t>(digit);
          rest = (rest - digit) / 256;
        }
      }
      xsum[g] = static_cast<float>(sum);
    }
    float* out = yp + r * blocks * kCols;
    at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
      const int64_t split = b0 + (b1 - b0) / 4 * 4;
      int4_blocks<4>(digits.data(), k, xsum.data(), wp, sp, cp, groups, b0, split, out);
      int4_blocks<1>(digits.data(), k, xsum.data(), wp, sp, cp, groups, split, b1, out);
    });
    for (int64_t j = 0; j < blocks * kCols; ++j) out[j] = out[j] * s + bp[j];
  }
  return y;
#else
  TORCH_CHECK(false, "weight_only_vnni_int4: this build has no x86 VNNI kernel");
#endif
}

// --- routes through torch's kernels ------------------------------------------------------------

at::Tensor linear_int_mm(const at::Tensor& x, const at::Tensor& w_t, const at::Tensor& w_scale,
                         const at::Tensor& bias, int64_t qmax) {
  check_input(x, w_t.size(0), "linear_int_mm");
  auto [q, scale] = quantize_rows<int8_t>(x.contiguous(), qmax, at::kChar, 0.f, x.size(1));
  auto acc = at::_int_mm(q, w_t);
  const int64_t n = w_scale.size(0);
  if (acc.size(1) != n) acc = acc.narrow(1, 0, n) + acc.narrow(1, n, n);  // the two halves
  auto y = acc.to(at::kFloat);
  rescale(y, scale, w_scale.const_data_ptr<float>(), bias);
  return y;
}

at::Tensor linear_fbgemm(const at::Tensor& x,
                         const c10::intrusive_ptr<LinearPackedParamsBase>& packed,
                         const at::Tensor& bias, int64_t qmax) {
  check_input(x, -1, "linear_fbgemm");
  auto [q, scale] = quantize_rows<float>(x.contiguous(), qmax, at::kFloat, 0.f, x.size(1));
  auto y = packed->apply_with_input_q_dq_qweight_dq_output_fp32(q, 1.0, 128);
  rescale(y, scale, nullptr, bias);
  return y;
}

at::Tensor linear_onednn(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                         const at::Tensor& w_zero, const at::Tensor& bias, int64_t qmax) {
  using Args = c10::List<std::optional<at::Scalar>>;
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("onednn::qlinear_pointwise", "")
          .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor,
                            std::optional<at::Tensor>, double, int64_t,
                            std::optional<at::ScalarType>, c10::string_view, Args,
                            c10::string_view)>();
  check_input(x, -1, "linear_onednn");
  auto [q, scale] = quantize_rows<uint8_t>(x.contiguous(), qmax, at::kByte, 128.f, x.size(1));
  auto y = op.call(q, 1.0, 128, packed, w_scale, w_zero, std::nullopt, 1.0, 0, at::kFloat, "none",
                   Args(), "");
  rescale(y, scale, nullptr, bias);
  return y;
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY(lowbit, m) {
  m.def("vnni_pack(Tensor codes) -> Tensor[]", &lowbit::vnni_pack);
  m.def(
      "linear_vnni(Tensor x, Tensor packed, Tensor offset, Tensor w_scale, Tensor bias, int qmax)"
      " -> Tensor",
      &lowbit::linear_vnni);
  m.def(
      "weight_only_vnni_int8(Tensor x, Tensor packed, Tensor offset, Tensor w_scale, Tensor bias)"
      " -> Tensor",
      &lowbit::weight_only_vnni_int8);
  m.def(
      "weight_only_vnni_int4(Tensor x, Tensor packed, Tensor scale, Tensor center, Tensor bias)"
      " -> Tensor",
      &lowbit::weight_only_vnni_int4);
  m.def("linear_int_mm(Tensor x, Tensor w_t, Tensor w_scale, Tensor bias, int qmax) -> Tensor",
        &lowbit::linear_int_mm);
  m.def(
      "linear_fbgemm(Tensor x, __torch__.torch.classes.quantized.LinearPackedParamsBase packed,"
      " Tensor bias, int qmax) -> Tensor",
      &lowbit::linear_fbgemm);
  m.def(
      "linear_onednn(Tensor x, Tensor packed, Tensor w_scale, Tensor w_zero, Tensor bias, "
      "int qmax) -> Tensor",
      &lowbit::linear_onednn);
}
