"""Converted integer modules: integer weights in buffers, integer kernels where PyTorch has them.

Every module here is built from one *record* (plain JSON data: the specs, the weight shape, how
the inputs are quantized) and a dict of tensors, so `convert` and `lowbit.io.load` construct them
the same way. The state dict holds the portable form (int8 / int16 codes, or codes of 4 bits and
fewer packed into uint8 with `numerics.pack`, float32 scales, int32 zero points); kernel-specific
layouts are caches rebuilt on first use and never saved.

Kernels (`module.kernel` says which one a module uses):
- "int_mm": `torch._int_mm`, int8 x int8 -> int32, for int8 inputs (static per-tensor or
  dynamic per-token) times symmetric int8 weights (per-tensor or per output channel). The input
  zero point is taken out with precomputed weight row sums, so the accumulator is exact.
  Per-token dynamic inputs run `lowbit.kernels.dynamic_int8_linear`: quantize, an int8 GEMM
  (lowbit's VNNI kernel, `_int_mm`, fbgemm or oneDNN, by shape and CPU), rescale, in one C++
  op; its packed weights are a cache.
- "int8pack": `aten._weight_int8pack_mm`, float inputs times int8 per-channel weights.
- "int4pack": `aten._weight_int4pack_mm_for_cpu`, float inputs times int4 group-wise weights.
  Where lowbit's C++ kernels are built (AVX-512 CPUs), both run those instead
  (`lowbit.kernels.weight_only`): far faster for one token and for many.
- "onednn_qconv": Conv2d with static per-tensor int8 inputs and symmetric int8 weights:
  oneDNN's quantized convolution (`lowbit.kernels.qconv2d`), float32 output, channels_last.
- "gather": Embedding: gathers the rows of codes (packed ones too) that the indices select and
  dequantizes only those rows, so the table stays integer in memory.
- "dequantize": dequantize the weight and run the layer's float forward (with the input
  fake-quantized): other convolutions, and any spec or layer no kernel handles.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lowbit import kernels, numerics
from lowbit.kernels import dynamic, weight_only
from lowbit.nn.modules import QuantModule
from lowbit.nn.padded_conv import ZeroPaddedConv2d
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.spec import Granularity, PerChannel, PerGroup, PerTensor, QuantSpec

__all__ = [
    "IntConv",
    "IntEmbedding",
    "IntFallback",
    "IntLinear",
    "IntModule",
    "PerTokenQuantizer",
    "check_codes",
    "check_stored_codes",
    "int_module_from_quant",
    "int_module_from_record",
    "spec_from_dict",
    "spec_to_dict",
    "stored_codes_layout",
]

ActMode = Literal["static", "dynamic", "per_token"]
Kernel = Literal["int_mm", "int8pack", "int4pack", "onednn_qconv", "gather", "dequantize"]
_INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts


# ---------------------------------------------------------------------------------------------
# Specs as JSON-able dicts


def spec_to_dict(spec: QuantSpec) -> dict[str, Any]:
    g = spec.granularity
    gran: dict[str, Any] = {"type": type(g).__name__}
    if isinstance(g, PerChannel):
        gran["axis"] = g.axis
    elif isinstance(g, PerGroup):
        gran.update(size=g.size, axis=g.axis)
    return {
        "bits": spec.bits,
        "signed": spec.signed,
        "symmetric": spec.symmetric,
        "narrow_range": spec.narrow_range,
        "granularity": gran,
        "scale_type": spec.scale_type,
        "rounding": spec.rounding,
        "scheme": spec.scheme,
    }


def spec_from_dict(d: dict[str, Any]) -> QuantSpec:
    """Inverse of `spec_to_dict`; raises ValueError on anything malformed."""
    try:
        gran = d["granularity"]
        kind = gran["type"]
        granularity: Granularity
        if kind == "PerTensor":
            granularity = PerTensor()
        elif kind == "PerChannel":
            granularity = PerChannel(int(gran["axis"]))
        elif kind == "PerGroup":
            granularity = PerGroup(int(gran["size"]), int(gran["axis"]))
        else:
            raise ValueError(f"unknown granularity {kind!r}")
        return QuantSpec(
            bits=int(d["bits"]),
            signed=bool(d["signed"]),
            symmetric=bool(d["symmetric"]),
            narrow_range=bool(d["narrow_range"]),
            granularity=granularity,
            scale_type=d["scale_type"],
            rounding=d["rounding"],
            scheme=d["scheme"],
        )
    except (KeyError, TypeError) as error:
        raise ValueError(f"malformed spec record {d!r}: {error}") from error


# ---------------------------------------------------------------------------------------------
# Per-token dynamic activations (quantize_dynamic)


class PerTokenQuantizer(TensorQuantizer):
    """Dynamic quantizer with one scale per token: per row of the input flattened to 2-D.

    Its spec has granularity `PerChannel(0)`, applied to `x.reshape(-1, x.shape[-1])`, so a
    (batch, seq, features) input gets batch * seq scales, as in LLM.int8 / SmoothQuant kernels.
    """

    def __init__(self, spec: QuantSpec) -> None:
        if spec.granularity != PerChannel(0):
            raise ValueError("PerTokenQuantizer needs a spec with granularity PerChannel(0)")
        super().__init__(spec, dynamic=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "off" or x.numel() == 0:
            return x
        flat = x.reshape(-1, x.shape[-1])
        scale, zero_point = numerics.tensor_qparams(flat, self.spec)
        return numerics.fake_quantize(flat, scale, zero_point, self.spec).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Weight storage


def _pack_bits(spec: QuantSpec) -> int | None:
    """Bits per code in packed storage, or None when codes are stored in their own dtype."""
    if spec.scheme == "binary":
        return 1
    if spec.bits <= 2:
        return 2
    if spec.bits <= 4:
        return 4
    return None


def store_codes(q: Tensor, spec: QuantSpec) -> Tensor:
    """Codes as saved: packed uint8 (flattened) for 4 bits and fewer, else the storage dtype."""
    bits = _pack_bits(spec)
    if bits is None:
        return q.to(spec.storage_dtype).contiguous()
    flat = q.reshape(-1)
    if spec.scheme == "binary":  # codes are -1 / +1: store the sign bit as 0 / 1
        return numerics.pack((flat > 0).to(torch.uint8), 1, signed=False)
    return numerics.pack(flat, bits, signed=spec.signed)


def stored_codes_layout(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[torch.Size, torch.dtype]:
    """Shape and dtype of `store_codes` for codes of `shape`, without computing them."""
    bits = _pack_bits(spec)
    if bits is None:
        return torch.Size(shape), spec.storage_dtype
    per_byte = 8 // bits
    return torch.Size([-(-math.prod(shape) // per_byte)]), torch.uint8


def load_codes(stored: Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> Tensor:
    """Inverse of `store_codes`: integer codes in their original shape."""
    bits = _pack_bits(spec)
    if bits is None:
        return stored.reshape(shape)
    numel = 1
    for n in shape:
        numel *= n
    if spec.scheme == "binary":
        sign = numerics.unpack(stored, 1, numel, signed=False)
        return (sign.to(torch.int8) * 2 - 1).reshape(shape)
    return numerics.unpack(stored, bits, numel, signed=spec.signed).reshape(shape)


def check_codes(codes: Tensor, spec: QuantSpec) -> None:
    """ValueError if integer codes (or zero points) fall outside [qmin, qmax] of `spec`."""
    if codes.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(codes))
    if lo < spec.qmin or hi > spec.qmax:
        raise ValueError(
            f"values in [{lo}, {hi}] are outside [{spec.qmin}, {spec.qmax}] of the "
            f"{spec.bits}-bit spec"
        )


def check_stored_codes(stored: Tensor, spec: QuantSpec) -> None:
    """`check_codes` on codes as `store_codes` wrote them, without unpacking them: each byte
    value present is decoded once."""
    if spec.scheme == "binary":
        return  # every bit pattern is a code, -1 or +1
    bits = _pack_bits(spec)
    if bits is None:
        return check_codes(stored, spec)
    per_byte = 8 // bits
    every_byte = torch.arange(256, dtype=torch.uint8)
    decoded = load_codes(every_byte, spec, (256 * per_byte,)).reshape(256, per_byte)
    present = torch.bincount(stored.reshape(-1), minlength=256) > 0
    check_codes(decoded[present], spec)


def _act_record(q: TensorQuantizer | None) -> dict[str, Any] | None:
    if q is None or q.mode == "off":
        return None
    if q.mode == "calibrate":
        raise ValueError(
            "a quantizer is still in calibrate mode: calibrate the model "
            "(lowbit.quantize / calibrate) before converting it"
        )
    mode: ActMode = (
        "per_token" if isinstance(q, PerTokenQuantizer) else ("dynamic" if q.dynamic else "static")
    )
    if mode == "static" and not q.has_qparams:
        raise ValueError(
            "a static quantizer has no scale yet (it saw no data): calibrate the "
            "model before converting it"
        )
    return {"spec": spec_to_dict(q.spec), "mode": mode}


# ---------------------------------------------------------------------------------------------
# Modules


class IntModule(nn.Module):
    """Base: integer weight codes, their scales and zero points, input and output quantization.

    Buffers (all saved): `qweight`, `weight_scale`, `weight_zero_point` (affine specs only;
    symmetric ones have an all-zero one that is not saved), `input_scale` / `input_zero_point`
    and `output_scale` / `output_zero_point` for static activation quantization.
    """

    kind = "IntModule"
    kernel: Kernel = "dequantize"
    qweight: Tensor
    weight_scale: Tensor
    weight_zero_point: Tensor

    def __init__(self, record: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        super().__init__()
        self.record = dict(record, kind=self.kind)
        self.weight_spec = spec_from_dict(record["weight"]["spec"])
        self.weight_shape = tuple(int(n) for n in record["weight"]["shape"])
        self.register_buffer("qweight", _need(tensors, "qweight"))
        self.register_buffer("weight_scale", _need(tensors, "weight_scale").float())
        if self.weight_spec.symmetric:
            zp = torch.zeros(self.weight_scale.shape, dtype=torch.int32)
            self.register_buffer("weight_zero_point", zp, persistent=False)
        else:
            self.register_buffer("weight_zero_point", _need(tensors, "weight_zero_point"))
        self.input_spec, self.input_mode = self._act("input", record, tensors)
        self.output_spec, self.output_mode = self._act("output", record, tensors)

    def _act(
        self, role: str, record: dict[str, Any], tensors: dict[str, Tensor]
    ) -> tuple[QuantSpec | None, ActMode | None]:
        rec = record.get(role)
        if rec is None:
            return None, None
        spec = spec_from_dict(rec["spec"])
        mode = rec["mode"]
        if mode not in ("static", "dynamic", "per_token"):
            raise ValueError(f"unknown {role} quantization mode {mode!r}")
        if mode == "static":
            self.register_buffer(f"{role}_scale", _need(tensors, f"{role}_scale").float())
            zp = _need(tensors, f"{role}_zero_point").to(torch.int32)
            self.register_buffer(f"{role}_zero_point", zp)
        return spec, mode

    # -- weights ------------------------------------------------------------------------------
    def weight_codes(self) -> Tensor:
        return load_codes(self.qweight, self.weight_spec, self.weight_shape)

    def dequantized_weight(self) -> Tensor:
        return numerics.dequantize(
            self.weight_codes(), self.weight_scale, self.weight_zero_point, self.weight_spec
        )

    # -- activations --------------------------------------------------------------------------
    def _qparams(self, role: str, x: Tensor) -> tuple[Tensor, Tensor]:
        spec = self.input_spec if role == "input" else self.output_spec
        mode = self.input_mode if role == "input" else self.output_mode
        assert spec is not None
        if mode == "static":
            return getattr(self, f"{role}_scale"), getattr(self, f"{role}_zero_point")
        if mode == "per_token":
            return numerics.tensor_qparams(x.reshape(-1, x.shape[-1]), spec)
        return numerics.tensor_qparams(x, spec)

    def _fake_quant(self, role: str, x: Tensor) -> Tensor:
        spec = self.input_spec if role == "input" else self.output_spec
        if spec is None or x.numel() == 0:
            return x
        scale, zero_point = self._qparams(role, x)
        if (self.input_mode if role == "input" else self.output_mode) == "per_token":
            flat = x.reshape(-1, x.shape[-1])
            return numerics.fake_quantize(flat, scale, zero_point, spec).reshape(x.shape)
        return numerics.fake_quantize(x, scale, zero_point, spec)

    def state_record(self) -> dict[str, Any]:
        """The JSON record `lowbit.io` saves to rebuild this module."""
        return dict(self.record)

    def extra_repr(self) -> str:
        from lowbit.transforms.swap import describe

        parts = [f"W {describe(self.weight_spec)}"]
        if self.input_spec is not None:
            if self.input_mode == "per_token":
                parts.append(f"I int{self.input_spec.bits} per-token dynamic")
            else:
                parts.append(f"I {describe(self.input_spec)} {self.input_mode}")
        if self.output_spec is not None:
            parts.append(f"O {describe(self.output_spec)} {self.output_mode}")
        return f"{', '.join(parts)}, kernel={self.kernel}"


def _need(tensors: dict[str, Tensor], key: str) -> Tensor:
    if key not in tensors:
        raise KeyError(key)
    return tensors[key]


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
        bias = _need(tensors, "bias").float() if record.get("bias") else None
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


class IntFallback(IntModule):
    """Integer weights, computed by dequantizing them into the original layer's own forward.

    The float layer stays a child (`module`) with its weight Parameter removed, so subclasses
    that pad or reshape in their forward (EfficientNet's `Conv2dStaticSamePadding`) keep that.
    """

    kind = "IntFallback"

    def __init__(
        self, module: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor]
    ) -> None:
        super().__init__(record, tensors)
        if "weight" in module._parameters:
            del module.weight
        bias = tensors.get("module.bias")
        if record.get("bias") and bias is None and getattr(module, "bias", None) is None:
            raise KeyError("module.bias")
        if bias is not None and getattr(module, "bias", None) is None:
            module._parameters.pop("bias", None)
            module.__dict__.pop("bias", None)
            module.bias = nn.Parameter(bias.detach().clone())  # a folded BatchNorm made one
        self.module = module

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point():
            x = self._fake_quant("input", x)
        weight = {"weight": self.dequantized_weight()}
        y = functional_call(self.module, weight, (x, *args), kwargs, strict=False)
        return self._fake_quant("output", y) if isinstance(y, Tensor) else y


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


class IntEmbedding(IntFallback):
    """Embedding with integer weights: gathers the selected rows of codes, dequantizes those.

    Rows are gathered straight from the stored codes (packed ones too, when a row fills whole
    bytes), with their scales where the scales vary by row (per row, per group of a row). An
    embedding whose forward is its own, or with `max_norm`, dequantizes the whole table.
    """

    kind = "IntEmbedding"

    def __init__(
        self, module: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor]
    ) -> None:
        super().__init__(module, record, tensors)
        if self._gathers():
            self.kernel = "gather"

    def _gathers(self) -> bool:
        m, g = self.module, self.weight_spec.granularity
        per_byte = 8 // (_pack_bits(self.weight_spec) or 8)  # a row must fill whole bytes
        return (
            type(m).forward is nn.Embedding.forward
            and getattr(m, "max_norm", None) is None
            and self.weight_shape[1] % per_byte == 0
            and (isinstance(g, PerTensor | PerChannel) or g.axis % 2 == 1)
        )

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.kernel != "gather" or args or kwargs or not isinstance(x, Tensor):
            return super().forward(x, *args, **kwargs)
        index = x.reshape(-1)
        rows = self._row_codes(index)  # first: it checks the indices
        scale = self._row_params(self.weight_scale, index)
        zero_point = self._row_params(self.weight_zero_point, index)
        y = numerics.dequantize(rows, scale, zero_point, self.weight_spec)
        return self._fake_quant("output", y.reshape(*x.shape, self.weight_shape[1]))

    def _row_codes(self, index: Tensor) -> Tensor:
        """The integer codes of rows `index`: [len(index), width]."""
        rows, width = self.weight_shape
        lo, hi = (int(v) for v in torch.aminmax(index)) if index.numel() else (0, 0)
        if lo < 0 or hi >= rows:
            raise IndexError(f"embedding index out of range [0, {rows}): {index.tolist()[:8]}")
        stored = self.qweight.reshape(rows, -1)[index].reshape(-1)
        return load_codes(stored, self.weight_spec, (len(index), width))

    def _row_params(self, param: Tensor, index: Tensor) -> Tensor:
        """A scale or zero point for rows `index`: gathered where it varies by row."""
        g = self.weight_spec.granularity
        by_row = isinstance(g, PerGroup) or (isinstance(g, PerChannel) and g.axis % 2 == 0)
        return param[index] if by_row and param.dim() else param


_KINDS: dict[str, type[IntModule]] = {
    c.kind: c for c in (IntLinear, IntConv, IntEmbedding, IntFallback)
}


# ---------------------------------------------------------------------------------------------
# Builders


def int_module_from_record(
    module: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor]
) -> IntModule:
    """Build the integer module of a float layer from a saved record and its local tensors."""
    cls = _KINDS.get(record.get("kind", ""))
    if cls is None:
        raise ValueError(f"unknown integer module kind {record.get('kind')!r}")
    if issubclass(cls, IntFallback):
        return cls(module, record, tensors)
    return IntLinear(record, tensors)


def int_module_from_quant(qm: QuantModule) -> IntModule | None:
    """The integer module of a simulated layer, or None if its weight is not quantized.

    Dynamic weight quantizers (QAT) get their parameters fixed from the final weight; learnable
    scales are taken as they are.
    """
    wq = qm.weight_quantizer
    if wq is None or wq.mode == "off":
        return None
    module = qm.module
    weight = module.weight.detach()
    spec = wq.spec
    if wq.dynamic or not wq.has_qparams:
        scale, zero_point = numerics.tensor_qparams(weight, spec)
    else:
        scale, zero_point = wq.scale.detach().float(), wq.zero_point.detach()
    codes = numerics.quantize(weight, scale, zero_point, spec)
    record: dict[str, Any] = {
        "weight": {"spec": spec_to_dict(spec), "shape": list(weight.shape)},
        "input": _act_record(qm.input_quantizer),
        "output": _act_record(qm.output_quantizer),
        "module_type": type(module).__name__,
        "bias": getattr(module, "bias", None) is not None,
    }
    tensors: dict[str, Tensor] = {
        "qweight": store_codes(codes, spec),
        "weight_scale": scale.detach().float().clone(),
        "weight_zero_point": zero_point.to(torch.int32).clone(),
    }
    for role in ("input", "output"):
        q = getattr(qm, f"{role}_quantizer")
        if record[role] is not None and record[role]["mode"] == "static":
            tensors[f"{role}_scale"] = q.scale.detach().float().clone()
            tensors[f"{role}_zero_point"] = q.zero_point.detach().clone()
    plain_linear = isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
    if plain_linear:
        record["kind"] = IntLinear.kind
        bias = module.bias
        if isinstance(bias, Tensor):
            tensors["bias"] = bias.detach().float().clone()
        return IntLinear(record, tensors)
    if isinstance(module, nn.Embedding):
        record["kind"] = IntEmbedding.kind
    elif isinstance(module, nn.modules.conv._ConvNd):
        record["kind"] = IntConv.kind
    else:
        record["kind"] = IntFallback.kind
    return int_module_from_record(module, record, tensors)
