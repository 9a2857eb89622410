"""Weight-only int8 / int4 Linear: lowbit's C++ kernels, for one token (LLM decoding) and more.

    int8: y[m, n] = sum_k w[n, k] * x[m, k] * s[n] + b[n]
    int4: y[m, n] = sum_g s[n, g] * sum_{k in g} (u[n, k] - c[n, g]) * x[m, k] + b[n]

with u the 4-bit codes offset into 0..15 and c = offset + zero point per group. At M = 1 a
Linear should be bound by reading its weight. PyTorch's `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` measured far slower than FP32 `F.linear` (4096 x 4096, one thread:
0.26x and 0.12x at M = 1, 0.03x and 0.02x at M = 64), so lowbit runs its own kernels for every
M:

- CPUs with VNNI (`kernels/csrc/linear.cpp`): x becomes a fixed-point copy with one scale per
  row (24 bits for int8, 23 for int4, relative to the row's largest element: float32's own
  precision) split into three 8-bit digits, and the products run on the dynamic Linear's VNNI
  kernel with exact int32 sums; the only difference from float math is that rounding of x.
  Measured at 4096 x 4096, 1 thread, against FP32: M = 1 int8 5.6x, int4 8.9x; M = 64 1.7x /
  1.9x; M = 256 1.3x / 1.5x.
- other AVX-512 CPUs (`kernels/csrc/float_linear.cpp`): loops that widen each weight to float in
  registers, four token rows per weight load (int4: two per byte, even k in the low nibble,
  `pack_int4_rows`). M = 1: int8 4.1x, int4 3.6x FP32; M = 64: 1.3x / 0.9x; M = 256: 0.9x / 0.7x.

CPUs without AVX-512, or no C++ kernels (compiling off, no compiler, inside a graph the user
compiles) use the aten kernels. The packed layouts are caches of the module, never saved.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from lowbit.kernels import dynamic, native


@functools.cache
def _avx512() -> bool:
    return "AVX512" in torch.backends.cpu.get_cpu_capability()


def _ops() -> Any:
    ops = native.ops()
    assert ops is not None, "call applies first"
    return ops


def applies(x: Tensor) -> bool:
    """True when the C++ kernels should run for this (2-D, CPU, float) input."""
    return x.device.type == "cpu" and x.shape[0] > 0 and _avx512() and native.ops() is not None


def vnni_pack(w: Tensor) -> list[Tensor]:
    """The VNNI layout of int8 codes w [N, K] for `linear_int8`; [] where the CPU has no VNNI or
    K is too large for int32 sums."""
    if not dynamic.vnni_kernel_cpu():
        return []
    try:
        return list(_ops().vnni_pack(w))
    except RuntimeError:  # K > 65536
        return []


def linear_int8(x: Tensor, w: Tensor, scale: Tensor, bias: Tensor, packed: list[Tensor]) -> Tensor:
    """x [M, K] float32 times int8 codes w [N, K] with scale [N], plus bias [N]; packed: from
    `vnni_pack` (24-bit fixed-point x through the VNNI kernel), or [] (AVX-512 floats)."""
    if packed:
        return _ops().weight_only_vnni_int8(x, packed[0], packed[1], scale, bias)
    return _ops().weight_only_float_int8(x, w, scale, bias)


def pack_int4_rows(u: Tensor) -> Tensor:
    """Codes 0..15 [N, K] (K even) to [N, K / 2] uint8, even k in the low nibble."""
    u = u.to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def vnni_pack_int4(rows: Tensor, scale: Tensor, center: Tensor) -> list[Tensor]:
    """`pack_int4_rows` codes [N, K / 2] and scale, center [N, groups] in the layout of the VNNI
    int4 kernel: [N / 16, K / 8, 16, 4] bytes (byte t of output j in octet o: u[8o + t] in the
    low nibble, u[8o + 4 + t] in the high one) and [N / 16, groups, 16] floats; [] where the CPU
    has no VNNI or the shape does not fit (N % 16, groups of a multiple of 8 weights)."""
    n, k = rows.shape[0], 2 * rows.shape[1]
    groups = scale.shape[1]
    if not dynamic.vnni_kernel_cpu() or n % 16 or k % 8 or (k // 8) % groups:
        return []
    q = torch.stack([rows & 15, rows >> 4], -1).reshape(n // 16, 16, k // 8, 2, 4)  # u[n, k]
    packed = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()

    def per_block(t: Tensor) -> Tensor:
        return t.float().reshape(n // 16, 16, groups).permute(0, 2, 1).contiguous()

    return [packed, per_block(scale), per_block(center)]


def linear_int4(
    x: Tensor,
    packed: Tensor,
    scale: Tensor,
    center: Tensor,
    bias: Tensor,
    vnni: list[Tensor],
) -> Tensor:
    """x [M, K] float32 times packed 4-bit codes [N, K / 2] (`pack_int4_rows`); scale, center
    [N, groups], groups of a multiple of 32 weights; vnni: from `vnni_pack_int4` (23-bit
    fixed-point x through VNNI), or [] (AVX-512 floats)."""
    if vnni:
        return _ops().weight_only_vnni_int4(x, vnni[0], vnni[1], vnni[2], bias)
    return _ops().weight_only_float_int4(x, packed, scale, center, bias)
