"""`IntLinear`: a Linear layer with integer weights and the integer kernels that run it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit import numerics
from lowbit.kernels import dynamic, weight_only
from lowbit.nn.int_base import IntModule, Kernel, need
from lowbit.spec import PerChannel, PerGroup, PerTensor

_INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts


class IntLinear(IntModule):
    """A Linear layer with integer weights.

    With int8 inputs (static per-tensor, dynamic per-tensor or per-token) and symmetric int8
    weights it multiplies integers with `torch._int_mm`; with float inputs (weight-only) it uses
    the int8 / int4 weight-packed kernels. Anything else dequantizes the weight.
    """

    kind = "IntLinear"
    bias: Tensor | None

    def __init__(self, record: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        super().__init__(record, tensors)
        self.out_features, self.in_features = self.weight_shape
        bias = need(tensors, "bias").float() if record.get("bias") else None
        self.register_buffer("bias", bias)
        self._cache: dict[str, Tensor] = {}
        self.kernel = self._choose_kernel()
        self._per_token = self.kernel == "int_mm" and self._per_token_spec()
        self._dynamic_weights: dynamic.DynamicLinearWeights | None = None
        # weight-only: the VNNI layout ([] where it does not apply), built on first use
        self._vnni_weight: list[Tensor] | None = None

    # -- kernel selection ---------------------------------------------------------------------
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

    def _choose_kernel(self) -> Kernel:
        if self.input_spec is not None:
            if self._int8_weight_ok() and self._int8_input_ok() and _has_op("_int_mm"):
                return "int_mm"
            return "dequantize"
        small = self.weight_spec.scheme == "uniform" and self.weight_spec.bits <= 4
        if small and self._int4_layout() is not None:
            return "int4pack"
        if self._int8_weight_ok() and _has_op("_weight_int8pack_mm"):
            return "int8pack"
        return "dequantize"

    def _int4_layout(self) -> tuple[int, Tensor] | None:
        """(kernel group size, [K / group, N, 2] scales and zeros) if the int4 kernel applies."""
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
        g = s.granularity
        if isinstance(g, PerGroup) and g.axis in (-1, 1):
            span = g.size
        elif g in (PerTensor(), PerChannel(0), PerChannel(-2)):
            span = k
        else:
            return None
        group = next((size for size in _INT4_GROUPS if span % size == 0), None)
        if group is None:
            return None
        # scales / zero points per (row, span) -> per (row, kernel group)
        scale, zp = self._params_per_span()
        repeat = span // group
        scale = scale.repeat_interleave(repeat, 1)
        zp = zp.repeat_interleave(repeat, 1).float()
        # kernel: w = (u - 8) * scale + zero with u in [0, 15]; lowbit: w = (q - zp) * scale
        offset = 8 if s.signed else 0  # u = q + offset
        zero = (8 - offset - zp) * scale
        return group, torch.stack([scale.t(), zero.t()], -1).contiguous()

    # -- forward ------------------------------------------------------------------------------
    def _cached(self, key: str, make: Any) -> Tensor:
        t = self._cache.get(key)
        if t is None or t.device != self.qweight.device:
            t = make()
            self._cache[key] = t
        return t

    def forward(self, x: Tensor) -> Tensor:
        if self._per_token and x.is_cpu and x.dtype is torch.float32:
            # The hot path of quantize_dynamic models, kept short: Python overhead is much of
            # the cost of a one-token call.
            weights = self._dynamic_weights
            if weights is None:
                weights = self._dynamic_weights = self._make_dynamic_weights()
            y = dynamic.dynamic_int8_linear(x.reshape(-1, self.in_features), weights)
            if x.dim() != 2:
                y = y.view(*x.shape[:-1], self.out_features)
            return y if self.output_spec is None else self._fake_quant("output", y)
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        # The weight-packed kernels used here are CPU kernels; elsewhere dequantize.
        kernel = self.kernel if self.kernel == "int_mm" or x.device.type == "cpu" else "dequantize"
        if kernel == "int_mm" and self._per_token and x.device.type == "cpu":  # not float32
            y = self.forward(flat.float()).to(x.dtype)
            return y.reshape(*shape[:-1], self.out_features)
        if kernel == "int_mm":
            y = self._forward_int_mm(flat)
        elif kernel in ("int8pack", "int4pack") and weight_only.applies(flat):
            y = self._forward_weight_only(flat)
            return self._fake_quant("output", y.reshape(*shape[:-1], self.out_features))
        elif kernel == "int8pack":
            y = self._forward_int8pack(flat)
        elif kernel == "int4pack":
            y = self._forward_int4pack(flat)
        else:
            y = F.linear(self._fake_quant("input", flat), self.dequantized_weight().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        y = y.reshape(*shape[:-1], self.out_features)
        return self._fake_quant("output", y)

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

    def _make_dynamic_weights(self) -> dynamic.DynamicLinearWeights:
        spec = self.input_spec
        assert spec is not None
        bias = self.bias if self.bias is not None else torch.zeros(self.out_features)
        return dynamic.DynamicLinearWeights(self.weight_codes(), self.weight_scale, bias, spec.qmax)

    # The packed weights are a cache of the buffers: dropped when they move or are reloaded,
    # and never copied or pickled (oneDNN's packed tensors cannot be).
    def _drop_packed(self) -> None:
        self._cache = {}
        self._dynamic_weights = None
        self._vnni_weight = None

    def _apply(self, fn: Any, recurse: bool = True) -> IntLinear:
        self._drop_packed()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._drop_packed()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return dict(super().__getstate__(), _cache={}, _dynamic_weights=None, _vnni_weight=None)

    def _forward_int_mm(self, x: Tensor) -> Tensor:
        spec = self.input_spec
        assert spec is not None
        if x.shape[0] == 0:
            return x.new_zeros(0, self.out_features)
        scale, zero_point = self._qparams("input", x)
        q = numerics.quantize(x, scale, zero_point, spec).to(torch.int32)
        zp = zero_point.to(torch.int32)
        if spec.qmax > 127:  # uint8 codes: shift into int8, the difference q - zp is unchanged
            q, zp = q - 128, zp - 128
        w = self._cached("int8_weight", lambda: self.weight_codes().to(torch.int8))
        operand = self._cached("int_mm_operand", lambda: dynamic.int_mm_operand(w))
        acc = _int_matmul(q.to(torch.int8), w, operand)
        if bool(zp.any()):
            row_sums = self._cached("row_sums", lambda: w.to(torch.int32).sum(1))
            acc = acc - zp.reshape(-1, 1) * row_sums
        in_scale = scale.float().reshape(-1, 1) if scale.dim() else scale.float()
        return (acc.float() * (in_scale * self.weight_scale.float())).to(x.dtype)

    def _bias_or_zeros(self, x: Tensor) -> Tensor:
        if self.bias is not None:
            return self.bias.float()
        return self._cached("zero_bias", lambda: torch.zeros(self.out_features, device=x.device))

    def _forward_weight_only(self, x: Tensor) -> Tensor:
        """Weight-only through `kernels.weight_only`'s C++ kernels, bias included."""
        bias = self._bias_or_zeros(x)
        xf = x.float().contiguous()
        if self.kernel == "int8pack":
            w = self._cached("int8_weight", lambda: self.weight_codes().to(torch.int8))
            scale = self._cached(
                "weight_scale_n",
                lambda: self.weight_scale.float().expand(self.out_features).contiguous(),
            )
            if self._vnni_weight is None:
                self._vnni_weight = weight_only.vnni_pack(w)
            return weight_only.linear_int8(xf, w, scale, bias, self._vnni_weight).to(x.dtype)
        packed = self._cached("int4_rows", self._int4_rows)
        scale = self._cached("int4_row_scale", lambda: self._int4_groups()[0])
        center = self._cached("int4_row_center", lambda: self._int4_groups()[1])
        if self._vnni_weight is None:
            self._vnni_weight = weight_only.vnni_pack_int4(packed, scale, center)
        y = weight_only.linear_int4(xf, packed, scale, center, bias, self._vnni_weight)
        return y.to(x.dtype)

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

    def _forward_int8pack(self, x: Tensor) -> Tensor:
        w = self._cached("int8_weight", lambda: self.weight_codes().to(torch.int8))
        scales = self.weight_scale.float().expand(self.out_features).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x.float().contiguous(), w, scales)
        return y.to(x.dtype)

    def _forward_int4pack(self, x: Tensor) -> Tensor:
        layout = self._int4_layout()
        assert layout is not None
        group, scales_zeros = layout
        packed = self._cached("int4_weight", self._int4_pack)
        sz = self._cached("int4_scales", lambda: scales_zeros)
        if x.shape[0] == 0:
            return x.new_zeros(0, self.out_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.float().contiguous(), packed, group, sz)
        return y.to(x.dtype)

    def _int4_pack(self) -> Tensor:
        offset = 8 if self.weight_spec.signed else 0
        u = self.weight_codes().to(torch.int32) + offset
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)


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
