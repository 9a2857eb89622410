"""Weight-only int8 / int4 Linear for a few tokens (the LLM decode case): compiled GEMV.

At M = 1 a Linear is bound by reading its weight. PyTorch's `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` measured slower than FP32 `F.linear` there (0.26x and 0.12x at
4096 x 4096, one thread), so for M <= `GEMV_MAX_TOKENS` lowbit writes the product as a reduction
that inductor compiles into one loop reading the int8 (or packed 4-bit) weight once:

    int8: y[m, n] = sum_k w[n, k] * x[m, k] * s[n] + b[n]
    int4: y[m, n] = sum_g s[n, g] * sum_{k in g} (u[n, k] - c[n, g]) * x[m, k] + b[n]

with u the 4-bit codes offset into 0..15 and packed two per byte (even k in the low nibble), and
c = offset + zero point per group, one token at a time, compiled with static shapes (one
compile per layer shape). Larger M, or compiling off, use the aten kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels.compile import Compiled, compile_enabled

GEMV_MAX_TOKENS = 4


def _gemv_int8_row(x: Tensor, w: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return (w.to(torch.float32) * x).sum(-1) * scale + bias


def _gemv_int4_row(
    x: Tensor, packed: Tensor, scale: Tensor, center: Tensor, bias: Tensor
) -> Tensor:
    # One token x [K]: sum_g s_g * (sum_k (u_k - 8) x_k - (c_g - 8) * sum_k x_k). The first term
    # is one vectorised loop over the packed bytes (written with the "- 8": without it inductor's
    # uint8 -> float loop measured 20x slower); the centre term is a small [N, groups] product.
    n, groups = scale.shape
    pg = packed.reshape(n, groups, -1)
    xg = x.reshape(groups, -1, 2)
    lo = (pg & 15).to(torch.float32) - 8
    hi = (pg >> 4).to(torch.float32) - 8
    main = ((lo * xg[..., 0] + hi * xg[..., 1]) * scale.unsqueeze(-1)).sum((-1, -2))
    xsum = x.reshape(groups, -1).sum(-1)
    return main - (scale * (center - 8) * xsum).sum(-1) + bias


# Static shapes: with dynamic ones inductor's loops measured 10-30x slower here. One compile per
# layer shape (one token at a time, so M does not multiply them).
_int8 = Compiled(_gemv_int8_row, dynamic=False)
_int4 = Compiled(_gemv_int4_row, dynamic=False)


def gemv_applies(x: Tensor) -> bool:
    """True when the compiled GEMV should run for this (2-D, CPU, float) input."""
    return x.device.type == "cpu" and 0 < x.shape[0] <= GEMV_MAX_TOKENS and compile_enabled()


def gemv_int8(x: Tensor, w: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """x [M, K] float32 times int8 codes w [N, K] with scale [N], plus bias [N]."""
    return torch.stack([_int8(row, w, scale, bias) for row in x])


def pack_int4_rows(u: Tensor) -> Tensor:
    """Codes 0..15 [N, K] (K even) to [N, K / 2] uint8, even k in the low nibble."""
    u = u.to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def gemv_int4(x: Tensor, packed: Tensor, scale: Tensor, center: Tensor, bias: Tensor) -> Tensor:
    """x [M, K] float32 times packed 4-bit codes [N, K / 2]; scale, center [N, groups]."""
    return torch.stack([_int4(row, packed, scale, center, bias) for row in x])
