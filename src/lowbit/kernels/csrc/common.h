// What lowbit's C++ kernels share: the x86 switch, the input check, the row chunking.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_X86 1
#include <immintrin.h>
#else
#define LOWBIT_X86 0
#endif

namespace lowbit {

// x: 2-D float32 on the CPU with k features (k < 0: the caller checks them against its weight).
inline void check_input(const at::Tensor& x, int64_t k, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), op,
              ": x must be a 2-D float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type(),
              " on ", x.device());
  TORCH_CHECK(k < 0 || x.size(1) == k, op, ": x has ", x.size(1), " features, the weight ", k);
}

// Runs `rows(r0, R)` over `m` token rows four at a time, then the 1-3 left (R a compile-time
// constant, so each chunk size gets its own register-blocked kernel).
template <typename F>
void over_row_chunks(int64_t m, F rows) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) rows(r, std::integral_constant<int, 4>{});
  if (m - r == 3) rows(r, std::integral_constant<int, 3>{});
  if (m - r == 2) rows(r, std::integral_constant<int, 2>{});
  if (m - r == 1) rows(r, std::integral_constant<int, 1>{});
}

}  // namespace lowbit
