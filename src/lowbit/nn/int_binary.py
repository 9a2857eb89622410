"""Converted binary and ternary layers that compute on bits (`lowbit.kernels.binary`).

Kernels (`module.kernel`):
- "xnor": binary weights x centred binary inputs (`binary(xnor=True)`). The input becomes bits of
  x >= c (c the per-channel centre), the products popcounts: y = beta * alpha_n * dot + alpha_n *
  (sign(w_n) . c) + bias, dot = K - 2 * popcount(a XOR w), exactly the simulation's
  (c + beta * sign(x - c)) @ (alpha * sign(w)) with its integer part computed on bits. A Conv2d
  (zero padding, one group) runs a bit im2col: padded taps count as +1 and their share is taken
  back out, so zero padding of the centred input is exact as well.
- "bwn": binary weights x float inputs (or int8 ones: exact int32 sums), by whichever measured
  faster here: lowbit's int8 kernels on the unpacked signs (the weight-only VNNI kernel for
  float inputs, `torch._int_mm` for int8 ones; an int8 copy of the codes is cached in memory,
  the file keeps 1 bit) or, where those do not run, the inputs added with the weight's sign
  straight from its bits (`kernels.binary.sign_mask_sums`).
- "ternary": ternary weights on two bit-planes (sign, nonzero) x float or int8 inputs as "bwn";
  x centred ternary inputs (per-tensor ternary activation specs: c + s * t, t = 0 where
  |x - c| <= s / 2) by popcounts on the planes, y = s * alpha_n * dot + alpha_n * (w_n . c) +
  bias as for "xnor" (Linear and Conv2d: zero padding is code 0 and adds nothing, the centre's
  share at the border taken from a table of position classes).
- "dequantize": anything else (other devices, grouped or strided-padding convolutions), with the
  same centred binarization in float.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit import numerics
from lowbit.kernels import binary, dynamic, weight_only
from lowbit.nn.binary_act import CenteredSign, channel_axis
from lowbit.nn.int_base import IntFallback, Kernel, need
from lowbit.nn.packs import cached
from lowbit.nn.records import spec_from_dict
from lowbit.spec import PerChannel, PerTensor, QuantSpec

Packed = dict[str, Any]


def bits_kernel(
    weight: QuantSpec, input_spec: QuantSpec | None, input_mode: str | None, centred: bool
) -> Kernel | None:
    """The bit kernel for these specs ("xnor", "bwn", "ternary"), None where none applies."""
    if weight.scheme not in ("binary", "ternary") or weight.granularity not in (
        PerTensor(),
        PerChannel(0),
    ):
        return None
    name: Kernel = "bwn" if weight.scheme == "binary" else "ternary"
    if input_spec is None:
        return name
    if centred:  # binary x binary, ternary x ternary
        if input_spec.scheme != weight.scheme:
            return None
        return "xnor" if weight.scheme == "binary" else "ternary"
    return name if _int8_input(input_spec, input_mode) else None


def _int8_input(spec: QuantSpec, mode: str | None) -> bool:
    """Symmetric signed 8-bit per-tensor inputs: int8 codes, zero point 0."""
    return (
        spec.scheme == "uniform"
        and spec.signed
        and spec.symmetric
        and spec.bits <= 8
        and spec.granularity == PerTensor()
        and mode in ("static", "dynamic")
    )


class _BitsBase(IntFallback):
    """Shared: centred activations, the weight's bit-planes, the per-output weight scale."""

    input_scale: Tensor
    input_center: Tensor

    def __init__(
        self, module: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor]
    ) -> None:
        super().__init__(module, record, tensors)
        self._axes: dict[str, tuple[int, int | None]] = {}
        for role in ("input", "output"):
            rec = record.get(role)
            if rec is not None and rec.get("center"):
                self.register_buffer(f"{role}_center", need(tensors, f"{role}_center").float())
                dims = rec.get("dims")
                self._axes[role] = int(rec.get("axis", -1)), None if dims is None else int(dims)

    def _centred(self, role: str) -> bool:
        return role in self._axes

    def _fake_quant(self, role: str, x: Tensor) -> Tensor:
        if not self._centred(role) or x.numel() == 0:
            return super()._fake_quant(role, x)
        center, scale = getattr(self, f"{role}_center"), getattr(self, f"{role}_scale")
        axis = channel_axis(x, *self._axes[role])
        spec = self.input_spec if role == "input" else self.output_spec
        ternary = spec is not None and spec.scheme == "ternary"
        return numerics.centered_sign(x, center, scale, axis, ternary)

    def _threshold(self) -> float:
        """A centred ternary input's zero band |x - c| <= scale / 2, as a float32 value."""
        return float(self.input_scale.float() * 0.5)

    def _pack_sources(self) -> tuple[Tensor | None, ...]:
        return (*super()._pack_sources(), getattr(self.module, "bias", None))

    def _rows(self) -> tuple[Tensor, Tensor | None]:
        """The weight's sign and nonzero bit rows [N, words(K)], K in the weight's order."""
        codes = self.weight_codes().reshape(self.weight_shape[0], -1)
        nonzero = binary.pack_bits(codes != 0) if self.weight_spec.scheme == "ternary" else None
        return binary.pack_bits(codes > 0), nonzero

    def _alpha(self) -> Tensor:
        return self.weight_scale.float().expand(self.weight_shape[0]).contiguous()

    def _bias(self) -> Tensor:
        bias = getattr(self.module, "bias", None)
        n = self.weight_shape[0]
        return torch.zeros(n) if bias is None else bias.detach().float()

    def _int8_codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """int8 input codes and the input scale (static, or from x itself)."""
        spec = self.input_spec
        assert spec is not None
        scale, zero_point = self._qparams("input", x)
        return numerics.quantize(x, scale, zero_point, spec).to(torch.int8), scale.float()


class IntBinaryLinear(_BitsBase):
    """A Linear with binary or ternary weights on bits; see the module docstring."""

    kind = "IntBinaryLinear"

    def __init__(
        self, module: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor]
    ) -> None:
        super().__init__(module, record, tensors)
        chosen = bits_kernel(
            self.weight_spec, self.input_spec, self.input_mode, self._centred("input")
        )
        if type(module).forward is not nn.Linear.forward:
            chosen = None  # a subclass computes something else in its forward
        self._kernels = (chosen or "dequantize", "dequantize")
        self.out_features, self.in_features = self.weight_shape

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        kernel = self.kernel
        if kernel == "dequantize" or args or kwargs or not isinstance(x, Tensor):
            return super().forward(x, *args, **kwargs)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x: {self.kind} expects {self.in_features} features in the last dimension, "
                f"got shape {tuple(x.shape)}"
            )
        rows = x.reshape(-1, self.in_features).float()
        packs = self.current_packs()
        if kernel == "xnor":
            y = self._xnor(rows, packs)
        elif self._centred("input"):
            y = self._ternary_centred(rows, packs)
        else:
            y = self._sign_sums(rows, packs)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return self._fake_quant("output", y).to(x.dtype)

    def _xnor(self, rows: Tensor, packs: Packed) -> Tensor:
        weight = cached(packs, "blocked", lambda: binary.block_rows(self._rows()[0]))
        scale, offset = cached(packs, "xnor_affine", self._xnor_affine)
        bits = binary.sign_bits(rows, self.input_center)
        n, k = self.out_features, self.in_features
        return binary.popcount_affine(bits, weight, n, k, scale, offset)

    def _ternary_centred(self, rows: Tensor, packs: Packed) -> Tensor:
        """Centred ternary inputs x ternary weights: the planes of the input's codes, then
        popcounts and the rescale in one pass, as `_xnor`."""
        blocked = cached(packs, "planes", self._blocked_planes)
        scale, offset = cached(packs, "xnor_affine", self._xnor_affine)
        sign, nonzero = binary.ternary_bits(rows, self.input_center, self._threshold())
        n, k = self.out_features, self.in_features
        return binary.popcount_affine(
            sign, blocked[0], n, k, scale, offset, nonzero=(nonzero, blocked[1])
        )

    def _blocked_planes(self) -> tuple[Tensor, Tensor]:
        sign, nonzero = self._rows()
        assert nonzero is not None
        return binary.block_rows(sign), binary.block_rows(nonzero)

    def _xnor_affine(self) -> tuple[Tensor, Tensor]:
        """beta * alpha per output, and the centre's share plus the bias."""
        scale = self.input_scale.float() * self._alpha()
        offset = self.dequantized_weight() @ self.input_center + self._bias()
        return scale, offset.unsqueeze(0)

    def _sign_sums(self, rows: Tensor, packs: Packed) -> Tensor:
        """Float or int8 inputs: lowbit's int8 kernels on the unpacked codes where they run
        (measured faster than the sign-mask sums on bits at 1 and 64 rows, docs/kernels.md),
        else the sign-mask sums."""
        sign, nonzero = cached(packs, "rows", self._rows)
        alpha, bias = cached(packs, "alpha_bias", lambda: (self._alpha(), self._bias()))
        codes8 = cached(packs, "codes8", lambda: self.weight_codes().to(torch.int8))
        if self.input_spec is None:
            if weight_only.applies(rows):
                vnni = cached(packs, "vnni", lambda: weight_only.vnni_pack(codes8))
                if vnni:
                    return weight_only.linear_int8(rows.contiguous(), codes8, alpha, bias, vnni)
            return torch.addcmul(bias, binary.sign_mask_sums(rows, sign, nonzero), alpha)
        codes, scale = self._int8_codes(rows)
        try:
            operand = cached(packs, "int_mm", lambda: dynamic.int_mm_operand(codes8))
            sums = dynamic.int_mm(codes, operand, self.out_features)
        except RuntimeError:  # a shape torch._int_mm refuses: the exact sums on bits
            sums = binary.sign_mask_sums(codes, sign, nonzero)
        return torch.addcmul(bias, sums.float(), alpha * scale)


class IntBinaryConv(_BitsBase):
    """A convolution with binary / ternary weights and binary / ternary inputs: an XNOR Conv2d
    (zero padding, one group, centred binary inputs) or a centred ternary x ternary one runs on
    bits, any other dequantizes (with the same centred inputs)."""

    kind = "IntBinaryConv"

    def __init__(
        self, module: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor]
    ) -> None:
        super().__init__(module, record, tensors)
        self._kernels = (self._conv_kernel() or "dequantize", "dequantize")

    def _conv_kernel(self) -> Kernel | None:
        """ "xnor" (centred binary inputs x binary weights) or "ternary" (centred ternary inputs
        x ternary weights) for a plain zero-padded Conv2d of one group, else None."""
        m = self.module
        plain = (
            isinstance(m, nn.Conv2d)
            and type(m).forward is nn.Conv2d.forward
            and m.padding_mode == "zeros"
            and isinstance(m.padding, tuple)
            and m.groups == 1
        )
        centred = self._centred("input")
        kernel = bits_kernel(self.weight_spec, self.input_spec, self.input_mode, centred)
        return kernel if plain and centred else None

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        plain = isinstance(x, Tensor) and x.dim() in (3, 4) and x.numel() and not (args or kwargs)
        if self.kernel == "dequantize" or not plain:
            return super().forward(x, *args, **kwargs)
        batch = x if x.dim() == 4 else x.unsqueeze(0)
        y = self._xnor(batch.float()) if self.kernel == "xnor" else self._ternary(batch.float())
        y = y if x.dim() == 4 else y.squeeze(0)
        return self._fake_quant("output", y).to(x.dtype)

    def _geometry(self) -> tuple[tuple[int, int], ...]:
        m = self.module
        assert isinstance(m, nn.Conv2d)
        pairs = (m.kernel_size, m.stride, m.padding, m.dilation)
        return tuple((int(p[0]), int(p[1])) for p in pairs)

    def _xnor(self, x: Tensor) -> Tensor:
        packs = self.current_packs()
        n = self.weight_shape[0]
        weight = cached(packs, "blocked", self._weight_bits)
        h, w = x.shape[-2:]
        scale, *maps = cached(packs, f"maps_{h}x{w}", lambda: self._maps(h, w))
        corr, offset, cls = maps
        y = binary.xnor_conv(
            x, self.input_center, weight, n, self._geometry(), scale, (corr, offset, cls)
        )
        wo = self._out_width(w)
        return y.reshape(x.shape[0], cls.numel() // wo, wo, n).permute(0, 3, 1, 2)

    def _ternary(self, x: Tensor) -> Tensor:
        """Centred ternary inputs x ternary weights: the kernel codes x into two padded
        bit-planes and runs the popcounts with the rescale, as `_xnor`."""
        packs = self.current_packs()
        n = self.weight_shape[0]
        planes = cached(packs, "planes", self._weight_planes)
        h, w = x.shape[-2:]
        scale, _, offset, cls = cached(packs, f"maps_{h}x{w}", lambda: self._maps(h, w))
        y = binary.ternary_conv(
            x, self.input_center, self._threshold(), planes, n, self._geometry(), scale,
            (offset, cls),
        )  # fmt: skip
        wo = self._out_width(w)
        return y.reshape(x.shape[0], cls.numel() // wo, wo, n).permute(0, 3, 1, 2)

    def _out_width(self, w: int) -> int:
        kernel, stride, padding, dilation = self._geometry()
        return (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1

    def _tap_rows(self, bits: Tensor) -> Tensor:
        """Bits [N, C, kh, kw] -> blocked rows [N / 32, kh * kw * words(C), 32]: each tap's
        channels in their own words."""
        n, c, kh, kw = bits.shape
        taps = bits.permute(0, 2, 3, 1).reshape(n, kh * kw, c)
        return binary.block_rows(binary.pack_bits(taps).reshape(n, -1))

    def _weight_bits(self) -> Tensor:
        return self._tap_rows(self.weight_codes() > 0)

    def _weight_planes(self) -> tuple[Tensor, Tensor]:
        codes = self.weight_codes()
        return self._tap_rows(codes > 0), self._tap_rows(codes != 0)

    def _maps(self, h: int, w: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For an h x w input: beta * alpha [N]; then, per class of output positions (those
        that see the same padded taps: 9 for a 3x3 kernel with padding 1), what the +1 padding
        adds to each dot (int32 [U, N]) and the centre's share plus the bias ([U, N], a
        zero-padded convolution of the centres), and each position's class (int32 [L])."""
        m = self.module
        assert isinstance(m, nn.Conv2d)
        _, stride, padding, dilation = self._geometry()
        c = self.weight_shape[1]
        center = self.input_center.reshape(1, c, 1, 1).expand(1, c, h, w)
        weight = self.dequantized_weight()
        offset = F.conv2d(center, weight, self._bias(), stride, padding, dilation)
        pads = (padding[1], padding[1], padding[0], padding[0])
        outside = F.pad(torch.zeros(1, c, h, w), pads, value=1.0)
        signs = self.weight_codes().float()
        corr = F.conv2d(outside, signs, None, stride, 0, dilation).round()
        scale = self.input_scale.float() * self._alpha()
        n = self.weight_shape[0]
        rows = torch.cat([corr.reshape(n, -1).t().double(), offset.reshape(n, -1).t().double()], 1)
        table, cls = torch.unique(rows, dim=0, return_inverse=True)
        corr_t, offset_t = table[:, :n].to(torch.int32), table[:, n:].float().contiguous()
        return scale, corr_t.contiguous(), offset_t, cls.to(torch.int32)


def build(
    qm: nn.Module, module: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor]
) -> IntFallback | None:
    """The bit module of a simulated layer (`int_build`'s hook), or None where the layer keeps
    the other integer modules. Records the centres of centred binary / ternary activations,
    which only these modules apply."""
    centred = False
    for role in ("input", "output"):
        q = getattr(qm, f"{role}_quantizer", None)
        if isinstance(q, CenteredSign) and record[role] is not None:
            record[role] = dict(record[role], center=True, axis=q.axis, dims=q.dims)
            tensors[f"{role}_center"] = q.center.detach().float().clone()
            centred = True
    rec = record.get("input")
    kernel = bits_kernel(
        spec_from_dict(record["weight"]["spec"]),
        None if rec is None else spec_from_dict(rec["spec"]),
        None if rec is None else rec["mode"],
        bool(rec and rec.get("center")),
    )
    if isinstance(module, nn.Linear) and (kernel is not None or centred):
        record["kind"] = IntBinaryLinear.kind
        return IntBinaryLinear(module, record, tensors)
    ternary_input = rec is not None and spec_from_dict(rec["spec"]).scheme == "ternary"
    if isinstance(module, nn.modules.conv._ConvNd) and (centred or ternary_input):
        record["kind"] = IntBinaryConv.kind
        return IntBinaryConv(module, record, tensors)
    return None
