"""`IntLinear`: a Linear layer with integer weights and the integer kernels that run it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit import numerics
from lowbit.kernels import dynamic, weight_only
from lowbit.nn.int_base import IntModule, Kernel, need
from lowbit.nn.packs import cached
from lowbit.spec import PerChannel, PerGroup, PerTensor

_INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts
Packed = dict[str, Any]


class IntLinear(IntModule):
    """A Linear layer with integer weights.

    With int8 inputs (static per-tensor, dynamic per-tensor or per-token) and symmetric int8
    weights it multiplies integers with `torch._int_mm`; with float inputs (weight-only) it uses
    the int8 / int4 weight-packed kernels (CPU kernels: elsewhere those layers dequantize).
    Anything else dequantizes the weight.
    """

    kind = "IntLinear"
    bias: Tensor | None

    def __init__(self, record: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        super().__init__(record, tensors)
        self.out_features, self.in_features = self.weight_shape
        bias = need(tensors, "bias").float() if record.get("bias") else None
        self.register_buffer("bias", bias)
        self._int4_group_size = self._int4_group()  # fixed by the spec and shape: found once
        self._kernels = self._choose_kernels()
        # per-token int8 inputs that `kernels.dynamic` quantizes itself, in one op on the CPU
        self._per_token = self._kernels[0] == "int_mm" and self._per_token_spec()

    # -- kernel selection ---------------------------------------------------------------------
    def _choose_kernels(self) -> tuple[Kernel, Kernel]:
        """The kernel on the CPU and on other devices."""
        if self.input_spec is not None:
            if self._int8_weight_ok() and self._int8_input_ok() and _has_op("_int_mm"):
                return "int_mm", "int_mm"
            return "dequantize", "dequantize"
        small = self.weight_spec.scheme == "uniform" and self.weight_spec.bits <= 4
        if small and self._int4_group_size is not None:
            return "int4pack", "dequantize"
        if self._int8_weight_ok() and _has_op("_weight_int8pack_mm"):
            return "int8pack", "dequantize"
        return "dequantize", "dequantize"

    def _int8_weight_ok(self) -> bool:
        s = self.weight_spec
        return (
            s.scheme in ("uniform", "binary", "ternary")
            and s.qmin >= -128
            and s.qmax <= 127
            and isinstance(s.granularity, PerTensor | PerChannel)
            and s.granularity in (PerTensor(), PerChannel(0), PerChannel(-2))
            and not bool(self.weight_zero_point.any())
        )

    def _int8_input_ok(self) -> bool:
        s = self.input_spec
        if s is None or s.scheme == "log2" or s.qmin < -128 or s.qmax > 255:
            return False
        per_tensor = isinstance(s.granularity, PerTensor) and self.input_mode != "per_token"
        per_token = self.input_mode == "per_token" and s.symmetric
        return per_tensor or per_token

    def _per_token_spec(self) -> bool:
        s = self.input_spec
        return (
            self.input_mode == "per_token"
            and s is not None
            and s.symmetric
            and s.signed
            and s.scheme == "uniform"
            and s.bits == 8
            and s.scale_type == "float"
            and s.rounding == "nearest"
        )

    def _int4_group(self) -> int | None:
        """The group size of aten's int4 kernel for this weight, None where it does not apply."""
        s = self.weight_spec
        n, k = self.weight_shape
        if (
            s.scheme != "uniform"
            or s.qmin < (-8 if s.signed else 0)
            or s.qmax > (7 if s.signed else 15)
        ):
            return None
        if not (
            _has_op("_weight_int4pack_mm_for_cpu")
            and _has_op("_convert_weight_to_int4pack_for_cpu")
        ):
            return None
        if n % 16 or k % 2:
            return None
        span = self._int4_span()
        if span is None:
            return None
        return next((size for size in _INT4_GROUPS if span % size == 0), None)

    def _int4_span(self) -> int | None:
        """How many inputs share one scale: a group, or the whole row."""
        g = self.weight_spec.granularity
        if isinstance(g, PerGroup) and g.axis in (-1, 1):
            return g.size
        if g in (PerTensor(), PerChannel(0), PerChannel(-2)):
            return self.weight_shape[1]
        return None

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """x [..., in_features] through the kernel `self.kernel` names."""
        # Kept lean: Python overhead is much of the cost of a one-token call.
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x: IntLinear expects {self.in_features} features in the last dimension, got "
                f"shape {tuple(x.shape)}"
            )
        flat = x.dim() == 2
        rows = x if flat else x.reshape(-1, self.in_features)
        y = _RUN[self.kernel](self, rows, self.current_packs())
        if not flat:
            y = y.reshape(*x.shape[:-1], self.out_features)
        if self.output_spec is not None:
            y = self._fake_quant("output", y)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _run_int_mm(self, x: Tensor, packs: Packed) -> Tensor:
        """int8 x int8 -> exact int32, rescaled. Per-token inputs on the CPU: one op of
        `kernels.dynamic` (quantize, the GEMM route for the shape, rescale, bias), float32 out."""
        if self._per_token and x.is_cpu:
            weights = cached(packs, "dynamic", self._make_dynamic_weights)
            xf = x if x.dtype is torch.float32 else x.float()
            return dynamic.dynamic_int8_linear(xf, weights)
        spec = self.input_spec
        assert spec is not None
        if x.shape[0] == 0:
            return self._add_bias(x.new_zeros(0, self.out_features))
        scale, zero_point = self._qparams("input", x)
        q = numerics.quantize(x, scale, zero_point, spec).to(torch.int32)
        zp = zero_point.to(torch.int32)
        if spec.qmax > 127:  # uint8 codes: shift into int8, the difference q - zp is unchanged
            q, zp = q - 128, zp - 128
        w = cached(packs, "int8_weight", self._int8_codes)
        operand = cached(packs, "int_mm_operand", lambda: dynamic.int_mm_operand(w))
        acc = _int_matmul(q.to(torch.int8), w, operand)
        if bool(zp.any()):
            row_sums = cached(packs, "row_sums", lambda: w.to(torch.int32).sum(1))
            acc = acc - zp.reshape(-1, 1) * row_sums
        in_scale = scale.float().reshape(-1, 1) if scale.dim() else scale.float()
        y = (acc.float() * (in_scale * self.weight_scale.float())).to(x.dtype)
        return self._add_bias(y)

    def _run_int8pack(self, x: Tensor, packs: Packed) -> Tensor:
        """Float x times int8 codes: lowbit's C++ kernels where built, else aten's."""
        w = cached(packs, "int8_weight", self._int8_codes)
        scale = cached(packs, "weight_scale_n", self._scale_per_output)
        xf = x.float().contiguous()
        if weight_only.applies(x):
            vnni = cached(packs, "vnni", lambda: weight_only.vnni_pack(w))
            bias = self._bias_or_zeros(packs)
            return weight_only.linear_int8(xf, w, scale, bias, vnni).to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(xf, w, scale)
        return self._add_bias(y.to(x.dtype))

    def _run_int4pack(self, x: Tensor, packs: Packed) -> Tensor:
        """Float x times int4 codes: lowbit's C++ kernels where built, else aten's."""
        xf = x.float().contiguous()
        if weight_only.applies(x):
            rows = cached(packs, "int4_rows", self._int4_rows)
            scale, center = cached(packs, "int4_groups", self._int4_groups)
            vnni = cached(packs, "vnni", lambda: weight_only.vnni_pack_int4(rows, scale, center))
            bias = self._bias_or_zeros(packs)
            return weight_only.linear_int4(xf, rows, scale, center, bias, vnni).to(x.dtype)
        if x.shape[0] == 0:
            return self._add_bias(x.new_zeros(0, self.out_features))
        group = self._int4_group_size
        assert group is not None
        packed = cached(packs, "int4_weight", self._int4_pack)
        scales_zeros = cached(packs, "int4_scales", lambda: self._int4_scales_zeros(group))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xf, packed, group, scales_zeros)
        return self._add_bias(y.to(x.dtype))

    def _run_dequantize(self, x: Tensor, packs: Packed) -> Tensor:
        """The float Linear on the dequantized weight, the input fake-quantized."""
        y = F.linear(self._fake_quant("input", x), self.dequantized_weight().to(x.dtype))
        return self._add_bias(y)

    # -- layouts ------------------------------------------------------------------------------
    def _add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _bias_or_zeros(self, packs: Packed) -> Tensor:
        if self.bias is not None:
            return self.bias.float()
        device = self.qweight.device
        return cached(packs, "zero_bias", lambda: torch.zeros(self.out_features, device=device))

    def _make_dynamic_weights(self) -> dynamic.DynamicLinearWeights:
        spec = self.input_spec
        assert spec is not None
        bias = self.bias if self.bias is not None else torch.zeros(self.out_features)
        return dynamic.DynamicLinearWeights(self.weight_codes(), self.weight_scale, bias, spec.qmax)

    def _int8_codes(self) -> Tensor:
        return self.weight_codes().to(torch.int8)

    def _scale_per_output(self) -> Tensor:
        return self.weight_scale.float().expand(self.out_features).contiguous()

    def _params_per_span(self) -> tuple[Tensor, Tensor]:
        """Weight scale (float) and zero point per (row, span of inputs): [N, K / span]."""
        n, _ = self.weight_shape
        scale = self.weight_scale.float()
        scale = scale.reshape(n, -1) if scale.dim() else scale.expand(n, 1)
        zp = self.weight_zero_point
        zp = zp.reshape(scale.shape) if zp.dim() else zp.expand(scale.shape)
        return scale, zp

    def _int4_groups(self) -> tuple[Tensor, Tensor]:
        """Scales and centers (offset + zero point) per (row, span of inputs): [N, K / span]."""
        scale, zp = self._params_per_span()
        offset = 8 if self.weight_spec.signed else 0
        return scale.contiguous(), (zp.float() + offset).contiguous()

    def _int4_rows(self) -> Tensor:
        offset = 8 if self.weight_spec.signed else 0
        return weight_only.pack_int4_rows(self.weight_codes().to(torch.int32) + offset)

    def _int4_scales_zeros(self, group: int) -> Tensor:
        """aten's int4 scales and zeros: [K / group, N, 2]."""
        span = self._int4_span()
        assert span is not None
        scale, zp = self._params_per_span()  # per (row, span) -> per (row, kernel group)
        repeat = span // group
        scale = scale.repeat_interleave(repeat, 1)
        zp = zp.repeat_interleave(repeat, 1).float()
        # kernel: w = (u - 8) * scale + zero with u in [0, 15]; lowbit: w = (q - zp) * scale
        offset = 8 if self.weight_spec.signed else 0  # u = q + offset
        zero = (8 - offset - zp) * scale
        return torch.stack([scale.t(), zero.t()], -1).contiguous()

    def _int4_pack(self) -> Tensor:
        offset = 8 if self.weight_spec.signed else 0
        u = self.weight_codes().to(torch.int32) + offset
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)


_RUN: dict[str, Callable[[IntLinear, Tensor, Packed], Tensor]] = {
    "int_mm": IntLinear._run_int_mm,
    "int8pack": IntLinear._run_int8pack,
    "int4pack": IntLinear._run_int4pack,
    "dequantize": IntLinear._run_dequantize,
}


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def _int_matmul(a: Tensor, w: Tensor, operand: Tensor) -> Tensor:
    """a [M, K] int8 @ w [N, K]^T int8 -> int32, exact. `torch._int_mm` where it runs, on the
    CPU through `operand` (`dynamic.int_mm_operand(w)`, exact where oneDNN would saturate)."""
    m, k = a.shape
    n = w.shape[0]
    if m == 0 or k == 0:
        return torch.zeros(m, n, dtype=torch.int32, device=a.device)
    if a.is_cuda:  # cuBLAS wants M > 16 and K, N multiples of 8: pad with zeros
        pm, pk, pn = max(17, -(-m // 8) * 8), -(-k // 8) * 8, -(-n // 8) * 8
        a_p = F.pad(a, (0, pk - k, 0, pm - m))
        w_p = F.pad(w, (0, pk - k, 0, pn - n))
        try:
            return torch._int_mm(a_p, w_p.t().contiguous())[:m, :n]
        except RuntimeError:
            pass
    else:
        try:
            return dynamic.int_mm(a, operand, n)
        except RuntimeError:
            pass
    # Exact fallback: float64 holds every partial sum of int8 products for K < 2^38.
    return (a.double() @ w.double().t()).to(torch.int32)
