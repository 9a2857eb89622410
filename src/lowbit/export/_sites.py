"""What each quantizer of a lowbit model becomes in ONNX: one `Site` per exported tensor role.

Validation lives here: every construct that QuantizeLinear / DequantizeLinear cannot express is
rejected with the module's name and the reason, before anything is traced or written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit import numerics
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.spec import PerChannel, PerGroup, PerTensor, QuantSpec

MIN_OPSET = 13  # per-axis DequantizeLinear
MAX_OPSET = 21  # INT4 / INT16 and blocked (per-group) DequantizeLinear
BLOCKED_OPSET = 21
# ONNX element types by name (onnx.TensorProto values; kept here so onnx loads lazily).
INT4, UINT4, INT8, UINT8, INT16, UINT16 = "int4", "uint4", "int8", "uint8", "int16", "uint16"
_RANGES = {
    INT4: (-8, 7),
    UINT4: (0, 15),
    INT8: (-128, 127),
    UINT8: (0, 255),
    INT16: (-(2**15), 2**15 - 1),
    UINT16: (0, 2**16 - 1),
}
# Weights for CPUs without VNNI (ONNX Runtime's reduce_range): 7-bit codes.
REDUCED_RANGE = (-64, 63)


@dataclass
class Site:
    """One quantized tensor: a weight (integer initializer -> DequantizeLinear) or an activation
    (QuantizeLinear -> DequantizeLinear)."""

    key: str  # "<module>.<role>", unique in the model
    module: str
    role: str  # "weight", "input" or "output"
    spec: QuantSpec
    scale: Tensor
    zero_point: Tensor
    elem: str = INT8  # ONNX element type of the codes and zero point
    codes: Tensor | None = None  # weights only: the integer codes
    simulated: Tensor | None = None  # weights only: what the simulation computes

    @property
    def is_weight(self) -> bool:
        return self.role == "weight"

    @property
    def axis(self) -> int | None:
        g = self.spec.granularity
        return None if isinstance(g, PerTensor) else g.axis

    @property
    def block_size(self) -> int | None:
        g = self.spec.granularity
        return g.size if isinstance(g, PerGroup) else None

    def simulate(self, x: Tensor) -> Tensor:
        """What lowbit's simulation computes for this tensor (used while tracing)."""
        if self.simulated is not None:
            return self.simulated.to(x.dtype)
        return numerics.fake_quantize(x, self.scale, self.zero_point, self.spec)


def _where(module: str, role: str) -> str:
    return f"module {module!r} ({role} quantizer)"


def _element_type(spec: QuantSpec, fits_int4: bool, where: str) -> str:
    lo, hi = spec.qmin, spec.qmax
    candidates = [INT4, UINT4] if fits_int4 else []
    candidates += [UINT8, INT8, UINT16, INT16]
    for name in candidates:
        r_lo, r_hi = _RANGES[name]
        if name.startswith("u") != (lo >= 0):
            continue
        if r_lo <= lo and hi <= r_hi:
            return name
    raise NotImplementedError(f"{where}: codes [{lo}, {hi}] do not fit an ONNX integer type")


def weight_site(
    module: str, weight: Tensor, quantizer: TensorQuantizer, *, int4: bool, reduce_range: bool
) -> Site:
    """The integer codes and parameters of a weight, bit-exact with the simulation."""
    spec, where = quantizer.spec, _where(module, "weight")
    if spec.scheme == "log2":
        raise NotImplementedError(
            f"{where}: the log2 scheme has no ONNX form (DequantizeLinear is uniform: "
            "(q - zero_point) * scale)"
        )
    if spec.rounding != "nearest":
        raise NotImplementedError(
            f"{where}: rounding={spec.rounding!r}; QuantizeLinear rounds to nearest even, "
            "quantize with rounding='nearest' to export"
        )
    if reduce_range and spec.signed and (spec.qmin < REDUCED_RANGE[0] or spec.qmax > 63):
        raise ValueError(
            f"{where}: reduce_range=True needs 7-bit weight codes in [-64, 63], but its spec "
            f"has [{spec.qmin}, {spec.qmax}]; quantize with "
            "lowbit.export.reduce_range_config(config) so the simulation uses them too"
        )
    if reduce_range and not spec.signed and spec.qmax > 127:
        raise ValueError(
            f"{where}: reduce_range=True needs 7-bit weight codes in [0, 127], but its spec "
            f"has [{spec.qmin}, {spec.qmax}]; quantize with reduce_range_config(config)"
        )
    weight = weight.detach().float()
    if quantizer.dynamic or not quantizer.has_qparams:
        if not quantizer.dynamic:
            raise ValueError(f"{where}: the quantizer has no scale; quantize the model first")
        # Dynamic weight quantizers (QAT, binary, ternary) take their parameters from the
        # weight at every step: at export the weight is fixed, so are they.
        scale, zero_point = numerics.tensor_qparams(weight, spec)
    else:
        scale, zero_point = quantizer.scale.detach().float(), quantizer.zero_point.detach()
    codes = numerics.quantize(weight, scale, zero_point, spec)
    simulated = numerics.dequantize(codes, scale, zero_point, spec)
    elem = _element_type(spec, int4, where)
    return Site(
        f"{module}.weight",
        module,
        "weight",
        spec,
        scale,
        zero_point.to(torch.int32),
        elem,
        codes,
        simulated,
    )


def activation_site(module: str, role: str, quantizer: TensorQuantizer, opset: int) -> Site:
    """Per-tensor (or per-axis) QuantizeLinear -> DequantizeLinear of an input or output."""
    spec, where = quantizer.spec, _where(module, role)
    if quantizer.dynamic:
        raise NotImplementedError(
            f"{where}: dynamic activation quantization (parameters from every tensor) has no "
            "QDQ form here; calibrate a static quantizer (lowbit.quantize) to export"
        )
    if spec.scheme != "uniform":
        raise NotImplementedError(
            f"{where}: the {spec.scheme} scheme has no ONNX QuantizeLinear form"
        )
    if isinstance(spec.granularity, PerGroup):
        raise NotImplementedError(
            f"{where}: PerGroup activations cannot be exported (QuantizeLinear of activations "
            "is per-tensor or per-axis)"
        )
    if spec.rounding != "nearest":
        raise NotImplementedError(
            f"{where}: rounding={spec.rounding!r}; QuantizeLinear rounds to nearest even"
        )
    if quantizer.mode == "calibrate" or not quantizer.has_qparams:
        raise ValueError(f"{where}: not calibrated (no scale); run lowbit.quantize first")
    if spec.bits not in (4, 8, 16):
        raise NotImplementedError(
            f"{where}: {spec.bits}-bit activations; QuantizeLinear saturates to 4, 8 or 16-bit "
            "integer types only"
        )
    if spec.bits != 8 and opset < 21:
        raise ValueError(f"{where}: {spec.bits}-bit activations need opset 21, got {opset}")
    # A narrow range ([-127, 127]) is exported as int8: QuantizeLinear saturates at -128, which
    # differs from the simulation only for inputs beyond the calibrated range (by one step).
    elem = _element_type(spec.with_(narrow_range=False), spec.bits == 4, where)
    if isinstance(spec.granularity, PerChannel) and quantizer.scale.dim() != 1:
        raise ValueError(f"{where}: per-channel scale must be 1-d")
    return Site(
        f"{module}.{role}",
        module,
        role,
        spec,
        quantizer.scale.detach().float(),
        quantizer.zero_point.detach().to(torch.int32),
        elem,
    )


def weight_fits_int4(spec: QuantSpec) -> bool:
    """Codes of this weight spec fit ONNX INT4 / UINT4 (4-bit, binary, ternary)."""
    return spec.scheme != "log2" and (
        (spec.qmin >= -8 and spec.qmax <= 7) or (spec.qmin >= 0 and spec.qmax <= 15)
    )


def needs_opset_21(spec: QuantSpec, role: str) -> bool:
    """Whether the best export of this spec needs opset 21 (INT4, INT16, blocked)."""
    if role == "weight":
        return isinstance(spec.granularity, PerGroup) or spec.bits > 8 or weight_fits_int4(spec)
    return spec.bits != 8
