"""A Conv2d behind a fixed zero padding (left, right, top, bottom), as 'SAME' padding needs.

The converted int8 convolution (`IntConv`) pads such a layer's input in its quantize step, with
the zero point, instead of padding a float tensor first.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class ZeroPaddedConv2d(nn.Conv2d):
    """`conv2d(F.pad(x, static_padding.padding))`: the layout of EfficientNet's
    `Conv2dStaticSamePadding`, for any asymmetric zero padding."""

    def __init__(
        self, *args: Any, pad: tuple[int, int, int, int] = (0, 0, 0, 0), **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(pad)

    @classmethod
    def wrap(cls, conv: nn.Conv2d, pad: tuple[int, int, int, int]) -> ZeroPaddedConv2d:
        """A ZeroPaddedConv2d with `conv`'s parameters (shared), padding its input by `pad`."""
        module = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, pad=pad,
        )  # fmt: skip
        module.weight = conv.weight
        module.bias = conv.bias
        return module.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.static_padding(x))
