"""`QuantConfig`: which spec each tensor role of each layer gets. Configuration is data."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from lowbit.calib import CALIBRATORS, make_calibrator
from lowbit.spec import Granularity, PerChannel, PerGroup, QuantSpec

K = TypeVar("K")
V = TypeVar("V")


class FrozenMapping(Mapping[K, V]):
    """A read-only copy of a dict, so that a frozen config cannot change behind its checks."""

    def __init__(self, items: Mapping[K, V]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: K) -> V:
        return self._items[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(self._items)


def _check_spec(value: object, where: str) -> None:
    if value is not None and not isinstance(value, QuantSpec):
        raise TypeError(f"{where} must be a QuantSpec or None, got {type(value).__name__}")


# Functional ops that can carry an output quantizer (`lowbit.nn.op_points`).
OP_KINDS = ("add", "matmul", "cat", "softmax")


@dataclass(frozen=True)
class LayerQuant:
    """The specs of one layer's roles; `None` leaves that role in float."""

    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    output: QuantSpec | None = None

    def __post_init__(self) -> None:
        for role in ("weight", "input", "output"):
            _check_spec(getattr(self, role), f"LayerQuant.{role}")


@dataclass(frozen=True)
class QuantConfig:
    """Specs for the weight, input and output of every quantizable layer, with overrides.

    Frozen and checked when built (spec types, the calibrator's name and arguments against every
    activation spec, override keys); derive a variant with `dataclasses.replace`.

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
    ops: the output spec of each functional op kind ("add": tensor + tensor, "matmul",
        "cat", "softmax"), found in one forward pass like fusable outputs; kinds not listed
        stay float. A `scaled_dot_product_attention` call counts as its three ops (matmul,
        softmax, matmul) and runs as them when one of its points is configured.
    op_overrides: keys are globs on an op's point name (`"blocks.3.add_0"`: the calling
        module, the op kind, its index among that kind in one call of that module's own
        forward) or on the calling module's name (`"blocks.*"`); values a spec, or `None` to
        keep it in float. The later matching entry wins. See docs/export.md, "Functional ops".
    ends: the specs of the first and the last layer that the default specs quantize (in module
        order, no override deciding them), when there are at least three such layers:
        XNOR-Net and TWN keep those in higher precision (a binary first layer sees raw pixels,
        a binary last layer makes the logits). `LayerQuant()` keeps them float; None (default)
        treats them as the others. The summary names them.
    """

    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    output: QuantSpec | None = None
    calibrator: str = "minmax"
    calibrator_args: Mapping[str, Any] = field(default_factory=dict)
    overrides: Mapping[type[nn.Module] | str, LayerQuant | None] = field(default_factory=dict)
    learnable_scales: bool = False
    fusable_outputs: bool = False
    ops: Mapping[str, QuantSpec | None] = field(default_factory=dict)
    op_overrides: Mapping[str, QuantSpec | None] = field(default_factory=dict)
    ends: LayerQuant | None = None

    def __post_init__(self) -> None:
        for role in ("weight", "input", "output"):
            _check_spec(getattr(self, role), f"QuantConfig.{role}")
        if self.ends is not None and not isinstance(self.ends, LayerQuant):
            raise TypeError(f"QuantConfig.ends must be a LayerQuant or None, got {self.ends!r}")
        for flag in ("learnable_scales", "fusable_outputs"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"QuantConfig.{flag} must be a bool, got {getattr(self, flag)!r}")
        for name in ("calibrator_args", "overrides", "ops", "op_overrides"):
            if not isinstance(getattr(self, name), Mapping):
                raise TypeError(f"QuantConfig.{name} must be a dict, got {getattr(self, name)!r}")
            object.__setattr__(self, name, FrozenMapping(getattr(self, name)))
        self._check_overrides()
        self._check_ops()
        self._check_calibrator()

    def _check_overrides(self) -> None:
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

    def _check_ops(self) -> None:
        for key, value in self.ops.items():
            if key not in OP_KINDS:
                raise ValueError(f"QuantConfig.ops key must be one of {OP_KINDS}, got {key!r}")
            _check_spec(value, f"QuantConfig.ops[{key!r}]")
        for key, value in self.op_overrides.items():
            if not isinstance(key, str):
                raise TypeError(f"QuantConfig.op_overrides key must be a name pattern, got {key!r}")
            _check_spec(value, f"QuantConfig.op_overrides[{key!r}]")

    def _check_calibrator(self) -> None:
        """The calibrator exists and takes its arguments for every calibrated activation spec,
        so that a typo fails here and not when a model is quantized."""
        if not isinstance(self.calibrator, str) or self.calibrator not in CALIBRATORS:
            raise ValueError(
                f"QuantConfig.calibrator must be one of {', '.join(CALIBRATORS)}, "
                f"got {self.calibrator!r}"
            )
        granularities: set[Granularity | None] = {s.granularity for s in self._calibrated_specs()}
        for granularity in granularities or {None}:
            try:
                make_calibrator(self.calibrator, granularity, **self.calibrator_args)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"QuantConfig.calibrator {self.calibrator!r} with calibrator_args "
                    f"{dict(self.calibrator_args)}: {error}"
                ) from None

    @property
    def calibrated(self) -> bool:
        """Whether some activation takes its range from the calibrator (binary and ternary
        activations do not), so that the calibrator matters."""
        return bool(self._calibrated_specs())

    def _calibrated_specs(self) -> set[QuantSpec]:
        layers = [self.default, *(v for v in self.overrides.values() if v is not None)]
        layers += [self.ends] if self.ends is not None else []
        ops = [*self.ops.values(), *self.op_overrides.values()]
        return {
            spec
            for spec in [*(s for lq in layers for s in (lq.input, lq.output)), *ops]
            if spec is not None and spec.scheme not in ("binary", "ternary")
        }

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

    def for_op(self, name: str, caller: str, kind: str) -> tuple[QuantSpec | None, str | None]:
        """An op point's output spec (None: keep float) and the override key that decided."""
        chosen, decided_by = self.ops.get(kind), None
        for key, value in self.op_overrides.items():
            if fnmatch.fnmatchcase(name, key) or fnmatch.fnmatchcase(caller, key):
                chosen, decided_by = value, repr(key)
        return chosen, decided_by

    @property
    def quantizes_ops(self) -> bool:
        """Whether any op point can get a quantizer (then `quantize` looks for them)."""
        return any(v is not None for v in (*self.ops.values(), *self.op_overrides.values()))

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
