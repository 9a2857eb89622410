"""`QuantConfig`: which spec each tensor role of each layer gets. Configuration is data."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lowbit.spec import PerChannel, PerGroup, QuantSpec


@dataclass(frozen=True)
class LayerQuant:
    """The specs of one layer's roles; `None` leaves that role in float."""

    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    output: QuantSpec | None = None


@dataclass
class QuantConfig:
    """Specs for the weight, input and output of every quantizable layer, with overrides.

    calibrator: how activation ranges are chosen: "minmax", "moving_average", "percentile",
        "entropy" or "mse", with `calibrator_args` passed to it (e.g. {"p": 99.99}).
    overrides: keys are a module type (matching subclasses too) or a glob on qualified module
        names ("features.0.*", "classifier"); values are a `LayerQuant`, or `None` to keep the
        layer in float. Name patterns win over types; among equals the later entry wins.
    learnable_scales: for QAT, train the scales (LSQ) instead of tracking weight ranges.
    fusable_outputs: `quantize` (and `prepare_qat`, given calib_data) also quantizes, with the
        input spec, the output of each layer
        whose output reaches an op other than a quantized layer or an activation (a residual
        Add, a pool, a concat), found by watching one forward pass. ONNX Runtime and TensorRT
        run a conv / matmul in integer only when its output is quantized; without this such
        layers stay float in the runtime (see docs/export.md). Layers with an output spec keep it.
    """

    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    output: QuantSpec | None = None
    calibrator: str = "minmax"
    calibrator_args: dict[str, Any] = field(default_factory=dict)
    overrides: dict[type[nn.Module] | str, LayerQuant | None] = field(default_factory=dict)
    learnable_scales: bool = False
    fusable_outputs: bool = False

    def __post_init__(self) -> None:
        for key, value in self.overrides.items():
            if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module))):
                raise TypeError(
                    f"QuantConfig.overrides key must be a module type or a name "
                    f"pattern, got {key!r}"
                )
            if value is not None and not isinstance(value, LayerQuant):
                raise TypeError(
                    f"QuantConfig.overrides[{key!r}] must be a LayerQuant or None, "
                    f"got {type(value).__name__}"
                )

    @property
    def default(self) -> LayerQuant:
        return LayerQuant(self.weight, self.input, self.output)

    def for_layer(self, name: str, module: nn.Module) -> tuple[LayerQuant | None, str | None]:
        """The layer's specs (None: keep float) and the override key that decided, if any."""
        chosen: LayerQuant | None = self.default
        decided_by: str | None = None
        for key, value in self.overrides.items():
            if isinstance(key, type) and isinstance(module, key):
                chosen, decided_by = value, key.__name__
        for key, value in self.overrides.items():
            if isinstance(key, str) and fnmatch.fnmatchcase(name, key):
                chosen, decided_by = value, repr(key)
        return chosen, decided_by

    def unmatched_overrides(self, modules: dict[str, nn.Module]) -> list[str]:
        """Override keys that match none of `modules` (by qualified name): a name pattern that
        matches no name, a type no module is an instance of. Almost always a typo or the wrong
        model, so `quantize` rejects them."""
        unmatched = []
        for key in self.overrides:
            if isinstance(key, str) and not any(fnmatch.fnmatchcase(n, key) for n in modules):
                unmatched.append(repr(key))
            elif isinstance(key, type) and not any(isinstance(m, key) for m in modules.values()):
                unmatched.append(key.__name__)
        return unmatched


def weight_spec_for(module: nn.Module, spec: QuantSpec) -> QuantSpec:
    """The spec a layer's weight really gets.

    Per-channel means per output channel, which ConvTranspose keeps on axis 1. Groups split a
    Linear's input features; a convolution's last axis is its kernel width, so convolutions take
    per-channel scales instead (the summary shows it).
    """
    convolution = isinstance(module, nn.modules.conv._ConvNd)
    if convolution and isinstance(spec.granularity, PerGroup):
        spec = spec.with_(granularity=PerChannel(0))
    transposed = isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d)
    if transposed and spec.granularity == PerChannel(0):
        return spec.with_(granularity=PerChannel(1))
    return spec
