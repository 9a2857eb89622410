"""What a quantized number is: the bit width, the integer grid, the granularity of its scales.

A `QuantSpec` is plain, frozen data. Every path in lowbit (fake-quant simulation, calibration,
integer kernels, ONNX export) reads the same spec, so they cannot disagree on what "int8" means.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

Rounding = Literal["nearest", "stochastic"]
ScaleType = Literal["float", "pow2"]
Scheme = Literal["uniform", "log2", "binary", "ternary"]

_ROUNDINGS = ("nearest", "stochastic")
_SCALE_TYPES = ("float", "pow2")
_SCHEMES = ("uniform", "log2", "binary", "ternary")


@dataclass(frozen=True)
class PerTensor:
    """One scale (and zero point) for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per slice along `axis` (output channels of a weight: axis 0)."""

    axis: int = 0


@dataclass(frozen=True)
class PerGroup:
    """One scale per run of `size` consecutive elements along `axis` (int4 LLM weights)."""

    size: int
    axis: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"PerGroup.size must be a positive int, got {self.size!r}")


Granularity = PerTensor | PerChannel | PerGroup


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    bits: 1 for binary, 2 for ternary, 2 to 16 for uniform and log2.
    signed: integers in [-2^(b-1), 2^(b-1) - 1] (or narrow: from -2^(b-1) + 1), else [0, 2^b - 1].
    symmetric: zero point fixed at 0 (scale only); otherwise affine with a zero point that makes
        real 0.0 exactly representable.
    narrow_range: drop the most negative code so the grid is symmetric, as TensorRT does (int8:
        [-127, 127]). Signed symmetric specs only.
    granularity: `PerTensor()`, `PerChannel(axis)` or `PerGroup(size, axis)`.
    scale_type: "float", or "pow2" (scales rounded up to a power of two, for shift-only hardware).
    rounding: "nearest" (half to even, as ONNX QuantizeLinear) or "stochastic".
    scheme: "uniform"; "log2" (levels are powers of two times the scale); "binary" (sign times a
        mean |x| scale, XNOR-Net); "ternary" (-1, 0, +1 times a scale, TWN).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = field(default_factory=PerTensor)
    scale_type: ScaleType = "float"
    rounding: Rounding = "nearest"
    scheme: Scheme = "uniform"

    def __post_init__(self) -> None:
        if self.scheme not in _SCHEMES:
            raise ValueError(f"QuantSpec.scheme must be one of {_SCHEMES}, got {self.scheme!r}")
        if self.rounding not in _ROUNDINGS:
            raise ValueError(
                f"QuantSpec.rounding must be one of {_ROUNDINGS}, got {self.rounding!r}"
            )
        if self.scale_type not in _SCALE_TYPES:
            raise ValueError(
                f"QuantSpec.scale_type must be one of {_SCALE_TYPES}, got {self.scale_type!r}"
            )
        if not isinstance(self.granularity, PerTensor | PerChannel | PerGroup):
            raise ValueError(
                "QuantSpec.granularity must be PerTensor(), PerChannel(axis) or "
                f"PerGroup(size, axis), got {self.granularity!r}"
            )
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise ValueError(f"QuantSpec.bits must be an int, got {self.bits!r}")
        expected_bits = {"binary": (1, 1), "ternary": (2, 2), "uniform": (2, 16), "log2": (2, 8)}
        lo, hi = expected_bits[self.scheme]
        if not lo <= self.bits <= hi:
            allowed = str(lo) if lo == hi else f"{lo} to {hi}"
            raise ValueError(
                f"QuantSpec.bits must be {allowed} for scheme {self.scheme!r}, got {self.bits}"
            )
        if self.scheme in ("binary", "ternary") and not (self.signed and self.symmetric):
            raise ValueError(
                f"QuantSpec scheme {self.scheme!r} needs signed=True and symmetric=True"
            )
        if self.scheme == "log2" and not self.symmetric:
            raise ValueError("QuantSpec scheme 'log2' needs symmetric=True (no zero point)")
        if self.narrow_range and not (self.signed and self.symmetric):
            raise ValueError("QuantSpec.narrow_range needs signed=True and symmetric=True")

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        if self.scheme == "binary":
            return -1
        if self.scheme == "ternary":
            return -1
        if self.scheme == "log2":
            return -self.log2_levels if self.signed else 0
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + int(self.narrow_range)

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        if self.scheme in ("binary", "ternary"):
            return 1
        if self.scheme == "log2":
            return self.log2_levels
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def log2_levels(self) -> int:
        """Number of non-zero magnitudes of a log2 spec: code m means scale * 2^(m - levels)."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """The smallest torch integer dtype that holds every code."""
        if self.qmin >= 0 and self.qmax <= 255:
            return torch.uint8
        if self.qmin >= -128 and self.qmax <= 127:
            return torch.int8
        if self.qmin >= -(2**15) and self.qmax < 2**15:
            return torch.int16
        return torch.int32

    def with_(self, **changes: object) -> QuantSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]
