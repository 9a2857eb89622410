"""`IntConv`: convolutions with integer weights; oneDNN's int8 convolution where it applies."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lowbit import kernels
from lowbit.nn.int_base import IntFallback, Kernel
from lowbit.nn.packs import cached
from lowbit.spec import PerChannel, PerTensor


class IntConv(IntFallback):
    """Conv1d/2d/3d and ConvTranspose (and subclasses) with integer weights.

    A Conv2d with zero padding, or one whose forward zero-pads its input by a fixed amount first
    (a 'SAME' padding: EfficientNet's `Conv2dStaticSamePadding`, lowbit's `ZeroPaddedConv2d`),
    with static per-tensor 8-bit inputs and symmetric int8 weights per output channel runs
    oneDNN's int8 convolution on the CPU (kernel "onednn_qconv", float32 output in
    channels_last); the rest dequantize the weight.
    """

    kind = "IntConv"
    input_scale: Tensor
    input_zero_point: Tensor

    def __init__(
        self, module: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor]
    ) -> None:
        super().__init__(module, record, tensors)
        self._pads = self._conv_pads() if self._qconv_ok() else None
        self._kernels = self._choose_kernels()

    def _choose_kernels(self) -> tuple[Kernel, Kernel]:
        """oneDNN's int8 convolution is a CPU kernel: elsewhere the weight is dequantized."""
        return ("onednn_qconv" if self._pads is not None else "dequantize"), "dequantize"

    def _qconv_ok(self) -> bool:
        w, x = self.weight_spec, self.input_spec
        return (
            isinstance(self.module, nn.Conv2d)
            and kernels.onednn_conv_available()
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

    def _conv_pads(self) -> tuple[tuple[int, int], list[int]] | None:
        """(conv padding, explicit F.pad of the input) when the layer is a zero-padded Conv2d
        whose forward is its convolution, or a fixed zero padding (its `static_padding`) and then
        its convolution: the symmetric part of that padding moves into the conv."""
        m = self.module
        if not isinstance(m, nn.Conv2d) or m.padding_mode != "zeros":
            return None
        if not isinstance(m.padding, tuple) or len(m.padding) != 2:
            return None
        ph, pw = int(m.padding[0]), int(m.padding[1])
        if type(m).forward is nn.Conv2d.forward:
            return (ph, pw), [0, 0, 0, 0]
        pad = _static_pad(getattr(m, "static_padding", None))
        if pad is None or not self._pads_then_convolves(pad):
            return None
        left, right, top, bottom = pad
        sh, sw = min(top, bottom), min(left, right)
        return (ph + sh, pw + sw), [left - sw, right - sw, top - sh, bottom - sh]

    def _pads_then_convolves(self, pad: list[int]) -> bool:
        """Whether the layer's own forward computes conv2d(F.pad(x, pad)): checked on a small
        random input, since a subclass may do anything else in its forward."""
        m = self.module
        assert isinstance(m, nn.Conv2d)
        spans = zip(m.kernel_size, m.dilation, m.stride, strict=True)
        size = [(k - 1) * d + s + 1 for k, d, s in spans]  # an output of at least 2 x 2
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, m.in_channels, *size, generator=generator)
        w = self.dequantized_weight()  # on the device of the weight's buffers
        x = x.to(w.device)
        try:  # a forward that fails on the probe is not this one: it keeps its own (and error)
            with torch.no_grad():
                got = functional_call(m, {"weight": w}, (x,), strict=False)
                want = F.conv2d(F.pad(x, pad), w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        except Exception:  # any error of the layer's own code answers "no"
            return False
        return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)

    def _offset(self) -> int:
        x = self.input_spec
        assert x is not None
        return 128 if x.signed else 0

    def _pack_sources(self) -> tuple[Tensor | None, ...]:
        return (*super()._pack_sources(), getattr(self.module, "bias", None))

    def _pack(self) -> kernels.conv.PackedConv2d:
        m = self.module
        bias = getattr(m, "bias", None)
        assert self._pads is not None and isinstance(m, nn.Conv2d)
        return kernels.conv.PackedConv2d(
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

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """The kernel `self.kernel` names; an empty input has nothing to compute and an input
        the layer's float forward would refuse (not float, not 3-D or 4-D, extra arguments)
        gets its error."""
        empty_or_odd = not (
            isinstance(x, Tensor) and x.is_floating_point() and x.numel() and x.dim() in (3, 4)
        )
        if self.kernel == "dequantize" or empty_or_odd or args or kwargs:
            return super().forward(x, *args, **kwargs)
        spec = self.input_spec
        assert spec is not None and self._pads is not None
        offset = self._offset()
        conv = cached(self.current_packs(), "qconv", self._pack)
        batch = x if x.dim() == 4 else x.unsqueeze(0)  # an unbatched [C, H, W] input
        y = kernels.qconv2d(
            batch, conv, self.input_scale, spec.qmin + offset, spec.qmax + offset, self._pads[1]
        )
        y = y if x.dim() == 4 else y.squeeze(0)
        return self._fake_quant("output", y.to(x.dtype))


def _static_pad(padding: Any) -> list[int] | None:
    """(left, right, top, bottom) of a fixed zero padding module: a ZeroPad2d, or a module
    without state that returns its input as it is (an identity); None for anything else."""
    if isinstance(padding, nn.ZeroPad2d):
        return [int(p) for p in padding.padding]
    if not isinstance(padding, nn.Module) or any(True for _ in padding.state_dict()):
        return None
    probe = torch.zeros(1, 1, 1, 1)
    try:  # a padding that cannot run on a 1 x 1 input (ReflectionPad2d(1)) is not an identity
        same = padding(probe) is probe
    except Exception:  # any error of the module's own code answers "no"
        return None
    return [0, 0, 0, 0] if same else None
