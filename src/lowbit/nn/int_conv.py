"""`IntConv`: convolutions with integer weights; oneDNN's int8 convolution where it applies."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lowbit import kernels
from lowbit.nn.int_base import IntFallback
from lowbit.nn.padded_conv import ZeroPaddedConv2d
from lowbit.spec import PerChannel, PerTensor


class IntConv(IntFallback):
    """Conv1d/2d/3d and ConvTranspose (and subclasses) with integer weights.

    A Conv2d (or EfficientNet's `Conv2dStaticSamePadding`) with static per-tensor 8-bit inputs
    and symmetric int8 weights per output channel runs oneDNN's int8 convolution
    (kernel "onednn_qconv", float32 output in channels_last); the rest dequantize the weight.
    """

    kind = "IntConv"
    input_scale: Tensor
    input_zero_point: Tensor

    def __init__(
        self, module: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor]
    ) -> None:
        super().__init__(module, record, tensors)
        self._pads = self._conv_pads()
        self._packed: kernels.conv.PackedConv2d | None = None
        self._packed_from: tuple[Any, ...] = ()
        if self._pads is not None and self._qconv_ok():
            self.kernel = "onednn_qconv"

    def _conv_pads(self) -> tuple[tuple[int, int], list[int]] | None:
        """(conv padding, explicit F.pad of the input) when the layer is a plain zero-padded
        Conv2d, or a static 'SAME' one: EfficientNet's `Conv2dStaticSamePadding` or lowbit's
        `ZeroPaddedConv2d` (its symmetric part moves into the conv)."""
        m = self.module
        if not isinstance(m, nn.Conv2d) or m.padding_mode != "zeros":
            return None
        if not isinstance(m.padding, tuple) or len(m.padding) != 2:
            return None
        ph, pw = int(m.padding[0]), int(m.padding[1])
        if type(m).forward is nn.Conv2d.forward:
            return (ph, pw), [0, 0, 0, 0]
        static = getattr(m, "static_padding", None)
        padded = isinstance(m, ZeroPaddedConv2d) or type(m).__name__ == "Conv2dStaticSamePadding"
        if not padded or static is None:
            return None
        if isinstance(static, nn.ZeroPad2d):
            left, right, top, bottom = (int(p) for p in static.padding)
        elif not any(True for _ in static.parameters()) and type(static).__name__ == "Identity":
            left = right = top = bottom = 0
        else:
            return None
        sh, sw = min(top, bottom), min(left, right)
        return (ph + sh, pw + sw), [left - sw, right - sw, top - sh, bottom - sh]

    def _qconv_ok(self) -> bool:
        w, x = self.weight_spec, self.input_spec
        return (
            kernels.onednn_conv_available()
            and w.scheme in ("uniform", "binary", "ternary")
            and w.qmin >= -128
            and w.qmax <= 127
            and kernels.conv.onednn_conv_exact(w.qmin, w.qmax)
            and w.granularity in (PerTensor(), PerChannel(0))
            and not bool(self.weight_zero_point.any())
            and x is not None
            and self.input_mode == "static"
            and x.scheme == "uniform"
            and x.rounding == "nearest"
            and isinstance(x.granularity, PerTensor)
            and x.bits <= 8
            and 0 <= x.qmax - x.qmin <= 255
        )

    def _offset(self) -> int:
        x = self.input_spec
        assert x is not None
        return 128 if x.signed else 0

    def _pack(self) -> kernels.conv.PackedConv2d:
        m = self.module
        bias = getattr(m, "bias", None)
        key = (self.qweight, self.weight_scale, self.input_scale, self.input_zero_point, bias)
        if self._packed is not None and all(
            a is b for a, b in zip(key, self._packed_from, strict=True)
        ):
            return self._packed
        assert self._pads is not None and isinstance(m, nn.Conv2d)
        self._packed = kernels.conv.PackedConv2d(
            self.weight_codes(),
            self.weight_scale,
            None if bias is None else bias.detach(),
            float(self.input_scale),
            int(self.input_zero_point) + self._offset(),
            tuple(int(s) for s in m.stride),
            self._pads[0],
            tuple(int(d) for d in m.dilation),
            m.groups,
        )
        self._packed_from = key
        return self._packed

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        usable = (
            self.kernel == "onednn_qconv"
            and isinstance(x, Tensor)
            and x.device.type == "cpu"
            and x.is_floating_point()
            and x.dim() == 4
            and x.shape[0] > 0
            and not args
            and not kwargs
        )
        if not usable:
            return super().forward(x, *args, **kwargs)
        spec = self.input_spec
        assert spec is not None and self._pads is not None
        offset = self._offset()
        conv = self._pack()
        y = kernels.qconv2d(
            x, conv, self.input_scale, spec.qmin + offset, spec.qmax + offset, self._pads[1]
        )
        return self._fake_quant("output", y.to(x.dtype))
