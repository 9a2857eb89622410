"""Static int8 Conv2d through oneDNN: `torch.ops.onednn.qconv_pointwise`, the kernel inductor's x86
lowering (PT2E + X86InductorQuantizer) calls, here called directly from eager PyTorch.

    u   = clamp(round_half_even(x / s_x) + z_x, lo, hi) + offset     uint8, channels_last
    y   = conv(u - (z_x + offset), w_q) * (s_x * s_w) + bias          float32 (no requantization)

`offset` is 128 for signed activation codes (int8 codes shifted into uint8 with the zero point,
the difference u - zero point is unchanged) and 0 for unsigned ones. The float32 output is the
exact int32 accumulator rescaled, so the result equals the simulation up to float rounding. The
quantize step (and an asymmetric 'SAME' padding in front of it, padded with the zero point) is
one compiled pass over the input when `torch.compile` works, else eager ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.kernels import dynamic
from lowbit.kernels.compile import Compiled

# Without VNNI, oneDNN's int8 convolution adds pairs of uint8 x int8 products in saturating int16:
# exact only for weight codes within this bound (255 * 64 * 2 < 2^15), e.g. reduce_range's 7 bits.
UNSATURATED_WEIGHT = 64


def onednn_conv_available() -> bool:
    """True where PyTorch has oneDNN and its quantized convolution ops (x86 CPU builds)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.onednn, "qconv_pointwise")
        and hasattr(torch.ops.onednn, "qconv_prepack")
    )


def onednn_conv_exact(weight_qmin: int, weight_qmax: int) -> bool:
    """True when oneDNN's int8 convolution sums exactly for weight codes in [qmin, qmax] here:
    on VNNI (or AMX) CPUs always, elsewhere only within +-`UNSATURATED_WEIGHT`."""
    return dynamic.u8_gemm_safe() or max(-weight_qmin, weight_qmax) <= UNSATURATED_WEIGHT


def quantize_to_uint8(
    x: Tensor, scale: Tensor, zero_point: int, lo: int, hi: int, pad: list[int]
) -> Tensor:
    """uint8 codes of `x` (codes already shifted by the offset: zero_point, lo, hi too), padded
    with the zero point by `pad` (F.pad order), in channels_last."""
    q = torch.clamp(torch.round(x / scale) + zero_point, lo, hi)
    if any(pad):
        q = F.pad(q, pad, value=float(zero_point))
    return q.to(torch.uint8).contiguous(memory_format=torch.channels_last)


_compiled_quantize = Compiled(quantize_to_uint8)


class PackedConv2d:
    """A Conv2d's int8 weight prepacked for oneDNN, and the call that runs it."""

    def __init__(
        self,
        codes: Tensor,
        w_scale: Tensor,
        bias: Tensor | None,
        x_scale: float,
        x_zero_point: int,
        stride: tuple[int, ...],
        padding: tuple[int, ...],
        dilation: tuple[int, ...],
        groups: int,
    ) -> None:
        out_channels = codes.shape[0]
        self.w_scale = w_scale.float().reshape(-1).expand(out_channels).contiguous()
        self.w_zero_point = torch.zeros(out_channels, dtype=torch.long)
        self.bias = None if bias is None else bias.float().contiguous()
        self.x_scale = float(x_scale)
        self.x_zero_point = int(x_zero_point)
        self.stride, self.padding = list(stride), list(padding)
        self.dilation, self.groups = list(dilation), int(groups)
        self.packed = torch.ops.onednn.qconv_prepack(
            codes.to(torch.int8).contiguous(),
            self.w_scale,
            self.x_scale,
            self.x_zero_point,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            None,
        )

    def __call__(self, u: Tensor) -> Tensor:
        return torch.ops.onednn.qconv_pointwise(
            u,
            self.x_scale,
            self.x_zero_point,
            self.packed,
            self.w_scale,
            self.w_zero_point,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )


def qconv2d(
    x: Tensor,
    conv: PackedConv2d,
    x_scale: Tensor,
    lo: int,
    hi: int,
    pad: list[int],
    *,
    fused: bool = True,
) -> Tensor:
    """Quantize float `x` [N, C, H, W] (codes lo..hi, already offset into 0..255, zero point
    `conv.x_zero_point`), pad it by `pad`, and convolve: float32 output, channels_last."""
    args = (x.float(), x_scale, conv.x_zero_point, lo, hi, pad)
    u = _compiled_quantize(*args) if fused else quantize_to_uint8(*args)
    return conv(u)
