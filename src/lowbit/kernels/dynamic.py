"""Dynamic int8 Linear with one symmetric activation scale per token (per row of the input).

    s   = max|x_row| / qmax            (1 where that is zero or denormal, as `numerics.qparams`)
    q   = clamp(round_half_even(x / s), qmin, qmax)           int8
    acc = q @ w_q^T                                           int32, `torch._int_mm` (oneDNN VNNI)
    y   = acc * (s * w_scale) + bias                          float32

The codes are those of `numerics.quantize` with the per-token qparams of `numerics.tensor_qparams`
(same float32 operations), so the result equals the simulation up to float rounding of the
final rescale. `dynamic_int8_linear` runs all of it as one `torch.compile`d graph (the quantize
step is one pass over `x`: row max, then divide-round-clamp-cast fused; the rescale is one pass over
the accumulator) when compiling works, else as a few eager ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.kernels.compile import Compiled

_TINY = torch.finfo(torch.float32).tiny


def quantize_per_token(x: Tensor, qmin: int = -127, qmax: int = 127) -> tuple[Tensor, Tensor]:
    """Int8 codes of a 2-D float32 `x` with one symmetric scale per row, and the [M, 1] scales."""
    top = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True)
    scale = top / qmax
    scale = torch.where(scale > _TINY, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x / scale), qmin, qmax).to(torch.int8)
    return q, scale


def _eager(x: Tensor, w_t: Tensor, w_scale: Tensor, bias: Tensor, qmin: int, qmax: int) -> Tensor:
    q, scale = quantize_per_token(x, qmin, qmax)
    acc = torch._int_mm(q, w_t)
    return torch.addcmul(bias, acc.float().mul_(scale), w_scale)


def _fusable(x: Tensor, w_t: Tensor, w_scale: Tensor, bias: Tensor, qmin: int, qmax: int) -> Tensor:
    # The same arithmetic written for inductor: it fuses the row max with the quantization and
    # the rescale into single loops around the int8 GEMM.
    top = x.abs().amax(-1, keepdim=True)
    scale = top / qmax
    scale = torch.where(scale > _TINY, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x / scale), qmin, qmax).to(torch.int8)
    acc = torch._int_mm(q, w_t)
    return acc.float() * (scale * w_scale) + bias


_compiled = Compiled(_fusable)
# Below this many tokens the compiled graph's call overhead costs more than the passes it saves
# (measured: M=1 eager 0.038 ms vs compiled 0.081 ms at 768x768), and decoding one token at a
# time never pays a compile.
FUSE_MIN_TOKENS = 32


def dynamic_int8_linear(
    x: Tensor,
    w_t: Tensor,
    w_scale: Tensor,
    bias: Tensor,
    qmin: int = -127,
    qmax: int = 127,
    *,
    fused: bool = True,
) -> Tensor:
    """y = per-token-int8(x) @ w^T * scales + bias for 2-D float32 `x` [M, K] on the CPU.

    w_t: the int8 weight codes transposed, [K, N] (a transposed view of the [N, K] codes is what
    oneDNN wants); w_scale: [N] float32 (per output channel, or one value expanded); bias: [N].
    The compiled graph runs for `FUSE_MIN_TOKENS` rows and more; fused=False forces the eager
    ops (tests compare both).
    """
    if x.shape[0] == 0 or x.shape[1] == 0:
        return bias.expand(x.shape[0], w_t.shape[1]).clone()
    if fused and x.device.type == "cpu" and x.shape[0] >= FUSE_MIN_TOKENS:
        return _compiled(x, w_t, w_scale, bias, qmin, qmax)
    return _eager(x, w_t, w_scale, bias, qmin, qmax)
