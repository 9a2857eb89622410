// XNOR and ternary Conv2d on bits. The input becomes a padded bit image once, the codes of
// x - center per pixel (binary: one plane, bit = x - c >= 0, padded pixels +1 in every channel:
// the caller takes out what the padding adds; ternary: sign and nonzero planes, padded pixels
// code 0, which adds nothing), and the popcount GEMM (popcount.h) reads each output position's
// kh * kw taps straight from that image, no im2col copy. NCHW inputs are coded without a
// channels-last copy: 64 channels x 64 pixels of comparison masks, transposed bitwise.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "popcount.h"

namespace lowbit {
namespace {

struct Geometry {
  int64_t b, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, cw, hp, wp, ho, wo;
};

Geometry geometry(const at::Tensor& x, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                  int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "binary conv: x must be a 4-D float32 CPU tensor");
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && ph >= 0 && pw >= 0 && dh > 0 && dw > 0,
              "binary conv: bad kernel / stride / padding / dilation");
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), kh, kw, sh, sw, ph, pw, dh, dw};
  g.cw = (g.c + 63) / 64;
  g.hp = g.h + 2 * ph;
  g.wp = g.w + 2 * pw;
  g.ho = (g.hp - dh * (kh - 1) - 1) / sh + 1;
  g.wo = (g.wp - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(g.ho > 0 && g.wo > 0, "binary conv: the input is smaller than the kernel");
  return g;
}

// Channel bits of up to 64 pixels of one NCHW image row, channel group `grp`: per channel a
// 64-bit comparison mask over the pixels, then that 64 x 64 bit matrix transposed into one
// word per pixel: bytes regrouped (VBMI permutes, an 8 x 8 transpose of 64-bit lanes), each
// 8 x 8 bit block transposed by one GF(2) affine product (GFNI).
#if LOWBIT_X86
#define LOWBIT_NCHW_BITS LOWBIT_AVX512_BITS ",avx512vbmi,gfni"

bool has_nchw_bits() {
  return bits::has_avx512_bits() && __builtin_cpu_supports("avx512vbmi") &&
         __builtin_cpu_supports("gfni");
}

// y[k] lane j = x[j] lane k for 8 registers of 8 64-bit lanes.
__attribute__((target(LOWBIT_NCHW_BITS))) inline void transpose8x8_epi64(__m512i* x) {
  __m512i u[8], v[8];
  for (int i = 0; i < 8; i += 2) {
    u[i] = _mm512_unpacklo_epi64(x[i], x[i + 1]);
    u[i + 1] = _mm512_unpackhi_epi64(x[i], x[i + 1]);
  }
  const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  for (int h = 0; h < 8; h += 4)
    for (int i = 0; i < 2; ++i) {
      v[h + i] = _mm512_permutex2var_epi64(u[h + i], lo, u[h + i + 2]);
      v[h + i + 2] = _mm512_permutex2var_epi64(u[h + i], hi, u[h + i + 2]);
    }
  const __m512i first = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
  const __m512i second = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 4; ++i) {
    x[i] = _mm512_permutex2var_epi64(v[i], first, v[i + 4]);
    x[i + 4] = _mm512_permutex2var_epi64(v[i], second, v[i + 4]);
  }
}

// The byte permutes of nchw_row_avx512: gather (lane pb byte j <- lane 7 - j byte pb) and
// spread (an 8 x 8 byte transpose: lane i byte j <- lane j byte i).
struct ByteOrders {
  alignas(64) uint8_t gather[64], spread[64];
  ByteOrders() {
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j) {
        gather[i * 8 + j] = static_cast<uint8_t>((7 - j) * 8 + i);
        spread[i * 8 + j] = static_cast<uint8_t>(j * 8 + i);
      }
  }
};

// masks[c] bit p (channel c of pixel p, 64 channels) -> one word per pixel, pixel p's at
// dst[p * cw], for the px pixels that exist.
__attribute__((target(LOWBIT_NCHW_BITS))) void transpose_masks(const uint64_t* masks,
                                                              int64_t px, int64_t cw,
                                                              uint64_t* dst) {
  // r[cb] lane pb byte j = byte pb of channel 8 cb + 7 - j's mask (reversed for the affine step)
  static const ByteOrders orders;
  const __m512i by_pixel = _mm512_load_si512(orders.gather);
  const __m512i by_channel = _mm512_load_si512(orders.spread);
  const __m512i identity = _mm512_set1_epi64(0x8040201008040201LL);
  __m512i r[8];
  for (int cb = 0; cb < 8; ++cb) {
    const __m512i z = _mm512_permutexvar_epi8(by_pixel, _mm512_load_si512(masks + 8 * cb));
    // lane pb byte i bit j: channel 8 cb + j at pixel 8 pb + i
    r[cb] = _mm512_gf2p8affine_epi64_epi8(identity, z, 0);
  }
  transpose8x8_epi64(r);  // r[pb] lane cb byte i: pixel 8 pb + i's channel byte cb
  const __m512i stride =
      _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(cw));
  for (int pb = 0; pb * 8 < px; ++pb) {
    const __m512i words = _mm512_permutexvar_epi8(by_channel, r[pb]);  // lane i: pixel 8 pb + i
    const int64_t left = px - pb * 8;
    const __mmask8 keep = left >= 8 ? __mmask8(0xFF) : __mmask8((1u << left) - 1);
    if (cw == 1)
      _mm512_mask_storeu_epi64(dst + pb * 8, keep, words);
    else
      _mm512_mask_i64scatter_epi64(dst + pb * 8 * cw, keep, stride, words, 8);
  }
}

// The code bits of up to 64 pixels of one NCHW image row (from x0), channel group `grp`, into
// the image row's words (and the nonzero plane's, ternary).
__attribute__((target(LOWBIT_NCHW_BITS))) void nchw_row_avx512(
    const float* x, const bits::Codes& cd, const Geometry& g, int64_t n, int64_t y, int64_t grp,
    int64_t x0, uint64_t* dst, uint64_t* dst_nz) {
  alignas(64) uint64_t masks[64] = {};
  alignas(64) uint64_t nz_masks[64] = {};
  const int64_t px = std::min<int64_t>(64, g.w - x0);
  const int64_t chans = std::min<int64_t>(64, g.c - grp * 64);
  for (int64_t cc = 0; cc < chans; ++cc) {
    const int64_t ch = grp * 64 + cc;
    const float* row = x + ((n * g.c + ch) * g.h + y) * g.w + x0;
    const __m512 cv = _mm512_set1_ps(cd.c[ch]);
    uint64_t mk = 0, nk = 0;
    for (int64_t part = 0; part * 16 < px; ++part) {
      const int64_t left = px - part * 16;
      const __mmask16 keep = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(keep, row + part * 16), cv);
      __mmask16 nz = 0;
      mk |= static_cast<uint64_t>(bits::code_masks(v, cd, keep, &nz)) << (part * 16);
      nk |= static_cast<uint64_t>(nz) << (part * 16);
    }
    masks[cc] = mk;
    nz_masks[cc] = nk;
  }
  transpose_masks(masks, px, g.cw, dst);
  if (cd.ternary) transpose_masks(nz_masks, px, g.cw, dst_nz);
}
#endif

// The padded code image of x (NCHW or channels-last float32): sign plane [B, Hp, Wp, cw] and,
// ternary, the nonzero plane (else an empty tensor). Padded pixels: +1 (binary), 0 (ternary).
struct Image {
  at::Tensor sign, nz;
};

Image code_image(const at::Tensor& x, const at::Tensor& center, float threshold, bool ternary,
                 int64_t isa, const Geometry& g) {
  TORCH_CHECK(center.numel() == g.c, "binary conv: center has ", center.numel(),
              " values, x ", g.c, " channels");
  auto cc = center.contiguous().to(at::kFloat);
  const bool avx512 = bits::pack_avx512(isa);
#if LOWBIT_X86
  const bool nchw = x.is_contiguous() && avx512 && has_nchw_bits();
#else
  const bool nchw = false;
#endif
  auto xc = nchw ? x : x.contiguous(at::MemoryFormat::ChannelsLast);  // a view when it already is
  Image im{at::empty({g.b, g.hp, g.wp, g.cw}, x.options().dtype(at::kLong)), at::Tensor()};
  im.nz = ternary ? at::empty_like(im.sign) : at::empty({0}, im.sign.options());
  auto* ip = reinterpret_cast<uint64_t*>(im.sign.mutable_data_ptr<int64_t>());
  auto* np = reinterpret_cast<uint64_t*>(im.nz.mutable_data_ptr<int64_t>());
  std::vector<uint64_t> pad(g.cw, ternary ? 0 : ~uint64_t{0});
  if (!ternary && g.c % 64) pad[g.cw - 1] = (uint64_t{1} << (g.c % 64)) - 1;
  const float* xp = xc.const_data_ptr<float>();
  const bits::Codes cd{cc.const_data_ptr<float>(), threshold, ternary};
  at::parallel_for(0, g.b * g.hp, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / g.hp, y = t % g.hp - g.ph;
      uint64_t* row = ip + t * g.wp * g.cw;
      uint64_t* row_nz = ternary ? np + t * g.wp * g.cw : nullptr;
      const bool inside = y >= 0 && y < g.h;
      for (int64_t xx = 0; xx < g.wp; ++xx)
        if (!inside || xx < g.pw || xx >= g.pw + g.w) {
          std::memcpy(row + xx * g.cw, pad.data(), g.cw * 8);
          if (ternary) std::memset(row_nz + xx * g.cw, 0, g.cw * 8);
        }
      if (!inside) continue;
#if LOWBIT_X86
      if (nchw) {
        for (int64_t grp = 0; grp < g.cw; ++grp)
          for (int64_t x0 = 0; x0 < g.w; x0 += 64) {
            const int64_t at = (g.pw + x0) * g.cw + grp;
            nchw_row_avx512(xp, cd, g, n, y, grp, x0, row + at, ternary ? row_nz + at : nullptr);
          }
        continue;
      }
#endif
      for (int64_t col = 0; col < g.w; ++col) {
        const int64_t at = (col + g.pw) * g.cw;
        bits::code_row(avx512, xp + ((n * g.h + y) * g.w + col) * g.c, cd, g.c, row + at,
                       ternary ? row_nz + at : nullptr);
      }
    }
  });
  return im;
}

// Where each output position's taps are in the image: row r (image n, output oy, ox) starts at
// row_base[r], tap (i, j)'s channel word q at word_off[(i * kw + j) * cw + q].
struct ConvRows {
  std::vector<int64_t> base, off;
  explicit ConvRows(const Geometry& g) : base(g.b * g.ho * g.wo), off(g.kh * g.kw * g.cw) {
    int64_t r = 0;
    for (int64_t n = 0; n < g.b; ++n)
      for (int64_t oy = 0; oy < g.ho; ++oy)
        for (int64_t ox = 0; ox < g.wo; ++ox)
          base[r++] = ((n * g.hp + oy * g.sh) * g.wp + ox * g.sw) * g.cw;
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j)
        for (int64_t q = 0; q < g.cw; ++q)
          off[(i * g.kw + j) * g.cw + q] = ((i * g.dh) * g.wp + j * g.dw) * g.cw + q;
  }
};

// Bit im2col of a zero-padded convolution input: [B * Ho * Wo, kh * kw * cw] int64, tap-major
// (the weight's [N, kh, kw, C]), padded pixels all ones.
at::Tensor sign_bits_conv(const at::Tensor& x, const at::Tensor& center, int64_t kh, int64_t kw,
                          int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  const Geometry g = geometry(x, kh, kw, sh, sw, ph, pw, dh, dw);
  auto image = code_image(x, center, 0.f, false, 0, g).sign;
  const uint64_t* ip = reinterpret_cast<const uint64_t*>(image.const_data_ptr<int64_t>());
  const ConvRows rows(g);
  const int64_t m = g.b * g.ho * g.wo, row_words = g.kh * g.kw * g.cw;
  auto out = at::empty({m, row_words}, image.options());
  auto* op = reinterpret_cast<uint64_t*>(out.mutable_data_ptr<int64_t>());
  at::parallel_for(0, m, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t q = 0; q < row_words; ++q) op[r * row_words + q] = ip[rows.base[r] + rows.off[q]];
  });
  return out;
}

// A binary or ternary Conv2d's output, float32 [B * Ho * Wo, n] (channels-last rows):
// (dot - corr[u, j]) * scale[j] + offset[u, j], u = cls[position] (the class of an output
// position: which padded taps it sees), corr empty for none. XNOR (wn empty): the codes of
// x - center >= 0, dot over the real C * kh * kw codes with padding +1; ternary (wn the
// weight's nonzero plane): the codes of x - center around +-threshold, padding code 0.
at::Tensor bits_conv(const at::Tensor& x, const at::Tensor& center, double threshold,
                     const at::Tensor& w, const at::Tensor& wn, int64_t n, int64_t kh, int64_t kw,
                     int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                     const at::Tensor& scale, const at::Tensor& corr, const at::Tensor& offset,
                     const at::Tensor& cls, int64_t isa) {
  const Geometry g = geometry(x, kh, kw, sh, sw, ph, pw, dh, dw);
  const int64_t words = g.kh * g.kw * g.cw, period = g.ho * g.wo;
  const bool ternary = wn.numel() > 0;
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kLong && w.size(1) == words &&
                  w.size(2) == bits::kBlock && w.is_contiguous() &&
                  n <= w.size(0) * bits::kBlock && n > (w.size(0) - 1) * bits::kBlock &&
                  (!ternary || (wn.sizes() == w.sizes() && wn.scalar_type() == at::kLong &&
                                wn.is_contiguous())),
              "bits_conv: w (and wn) must be int64 [N / 32, kh * kw * ceil(C / 64), 32], got ",
              w.sizes());
  TORCH_CHECK(offset.dim() == 2 && offset.size(1) == n &&
                  (corr.numel() == 0 || corr.sizes() == offset.sizes()) && scale.numel() == n &&
                  cls.numel() == period,
              "bits_conv: offset must be [U, n], corr empty or [U, n], scale [n], cls [Ho * Wo]");
  TORCH_CHECK(!ternary || threshold >= 0, "bits_conv: threshold must be >= 0, got ", threshold);
  auto cc = cls.contiguous().to(at::kInt);
  TORCH_CHECK(period == 0 || (cc.min().item<int32_t>() >= 0 &&
                              cc.max().item<int32_t>() < offset.size(0)),
              "bits_conv: cls must index the rows of offset");
  const bits::Isa chosen = bits::resolve(isa);
  const Image image = code_image(x, center, static_cast<float>(threshold), ternary, isa, g);
  const ConvRows rows(g);
  auto oc = offset.contiguous().to(at::kFloat);
  auto sc = scale.contiguous().to(at::kFloat);
  auto kc = corr.contiguous().to(at::kInt);
  const int64_t m = g.b * period;
  std::vector<int32_t> classes(m);  // each row's class (no division per row in the epilogue)
  const int32_t* cp = cc.const_data_ptr<int32_t>();
  for (int64_t r = 0; r < m; ++r) classes[r] = cp[r % period];
  auto out = at::empty({m, n}, x.options());
  auto ptr = [](const at::Tensor& t) {
    return reinterpret_cast<const uint64_t*>(t.const_data_ptr<int64_t>());
  };
  const bits::Operands o{ptr(image.sign),
                         ternary ? ptr(image.nz) : nullptr,
                         ptr(w),
                         ternary ? ptr(wn) : nullptr,
                         words,
                         rows.base.data(),
                         rows.off.data()};
  const bits::AffineEpi epi{out.mutable_data_ptr<float>(),
                            n,
                            g.c * g.kh * g.kw,
                            period,
                            classes.data(),
                            corr.numel() ? kc.const_data_ptr<int32_t>() : nullptr,
                            sc.const_data_ptr<float>(),
                            oc.const_data_ptr<float>(),
                            !ternary};
  bits::popcount_gemm(chosen, o, m, n, epi);
  return out;
}

}  // namespace
}  // namespace lowbit

TORCH_LIBRARY_FRAGMENT(lowbit, m) {
  m.def(
      "sign_bits_conv(Tensor x, Tensor center, int kh, int kw, int sh, int sw, int ph, int pw, "
      "int dh, int dw) -> Tensor",
      &lowbit::sign_bits_conv);
  m.def(
      "bits_conv(Tensor x, Tensor center, float threshold, Tensor w, Tensor wn, int n, int kh, "
      "int kw, int sh, int sw, int ph, int pw, int dh, int dw, Tensor scale, Tensor corr, "
      "Tensor offset, Tensor cls, int isa) -> Tensor",
      &lowbit::bits_conv);
}
