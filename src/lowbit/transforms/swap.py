"""Swap a model's layers for `QuantModule`s following a `QuantConfig`, and say what happened."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lowbit.calib import make_calibrator
from lowbit.config import LayerQuant, QuantConfig, weight_spec_for
from lowbit.nn.binary_act import CenteredSign
from lowbit.nn.modules import QUANTIZABLE, QuantModule
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.nn.records import describe
from lowbit.spec import PerTensor, QuantSpec

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


@dataclass(frozen=True)
class LayerRecord:
    """One line of the summary: a layer, whether it was quantized, how or why not."""

    name: str
    kind: str
    quantized: bool
    detail: str


QuantizerFactory = Callable[[QuantSpec, str], TensorQuantizer]


def static_quantizers(config: QuantConfig) -> QuantizerFactory:
    """Quantizers for static PTQ: activations calibrated, weights fixed from the weight."""

    def make(spec: QuantSpec, role: str) -> TensorQuantizer:
        if _centred(spec, role):
            return CenteredSign(spec)
        if role == "weight" or spec.scheme in ("binary", "ternary"):
            return TensorQuantizer(spec)
        calibrator = make_calibrator(config.calibrator, spec.granularity, **config.calibrator_args)
        return TensorQuantizer(spec, calibrator)

    return make


def qat_quantizers(config: QuantConfig) -> QuantizerFactory:
    """Quantizers for QAT: weights re-quantized every step (or LSQ scales), activation ranges
    tracked with a moving average while training."""

    def make(spec: QuantSpec, role: str) -> TensorQuantizer:
        learnable = config.learnable_scales and spec.scheme == "uniform"
        if _centred(spec, role):
            return CenteredSign(spec, learnable=True)
        if role == "weight" or spec.scheme in ("binary", "ternary"):
            return TensorQuantizer(spec, dynamic=not learnable, learnable=learnable)
        calibrator = make_calibrator("moving_average", spec.granularity)
        return TensorQuantizer(spec, calibrator, learnable=learnable, track=not learnable)

    return make


def _centred(spec: QuantSpec, role: str) -> bool:
    """Per-tensor binary and ternary activations quantize around a centre per channel
    (`CenteredSign`): a plain sign turns every ReLU output into +1, a plain ternary never uses
    its -1."""
    centred = spec.scheme in ("binary", "ternary") and spec.granularity == PerTensor()
    return role != "weight" and centred


def check_overrides(model: nn.Module, config: QuantConfig) -> None:
    """ValueError for a user's override key (name pattern or module type) that matches no module
    of `model`: such an override would silently do nothing."""
    modules = dict(model.named_modules())
    unmatched = config.unmatched_overrides(modules)
    if unmatched:
        names = list(modules)[1:4]
        types = sorted({type(m).__name__ for m in modules.values()})
        raise ValueError(
            f"QuantConfig.overrides key(s) {', '.join(unmatched)} match no module of the model; "
            f"module names look like {names}, module types are {types}"
        )


def swap_modules(
    model: nn.Module, config: QuantConfig, make_quantizer: QuantizerFactory
) -> list[LayerRecord]:
    """Replace quantizable layers in place; return one record per layer with weights."""
    records: list[LayerRecord] = []
    _swap_children(model, "", config, make_quantizer, records, _ends(model, config))
    return records


def _ends(model: nn.Module, config: QuantConfig) -> dict[str, str]:
    """The first and last layers the default specs quantize, when `config.ends` applies to
    them (at least three such layers): name -> "first" / "last"."""
    if config.ends is None:
        return {}
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZABLE) and config.for_layer(name, m) == (config.default, None)
    ]
    return {names[0]: "first", names[-1]: "last"} if len(names) >= 3 else {}


def _swap_children(
    parent: nn.Module,
    prefix: str,
    config: QuantConfig,
    make_quantizer: QuantizerFactory,
    records: list[LayerRecord],
    ends: dict[str, str],
) -> None:
    for child_name, child in parent.named_children():
        name = f"{prefix}{child_name}"
        kind = type(child).__name__
        if isinstance(child, QUANTIZABLE):
            layer, decided_by = config.for_layer(name, child)
            end = ""
            if name in ends:
                end = f" (the {ends[name]} layer: QuantConfig.ends, XNOR-Net practice)"
            layer = config.ends if end else layer
            wrapped = _wrap(child, layer, make_quantizer) if layer is not None else None
            if wrapped is None:
                why = f"kept in float by override {decided_by}" if decided_by else "no spec"
                records.append(
                    LayerRecord(name, kind, False, "kept in float" + end if end else why)
                )
                continue
            setattr(parent, child_name, wrapped)
            records.append(LayerRecord(name, kind, True, _how(wrapped) + end))
            continue
        own_params = list(child.parameters(recurse=False))
        if own_params and isinstance(child, _NORMS):
            records.append(LayerRecord(name, kind, False, "normalization layers stay in float"))
        elif own_params:
            records.append(
                LayerRecord(
                    name,
                    kind,
                    False,
                    "no quantized implementation for this layer type (its parameters are used by "
                    "its own forward code)",
                )
            )
        _swap_children(child, f"{name}.", config, make_quantizer, records, ends)


def _wrap(
    module: nn.Module, layer: LayerQuant, make_quantizer: QuantizerFactory
) -> QuantModule | None:
    is_embedding = isinstance(module, nn.Embedding)
    if layer.weight is None and (layer.input is None or is_embedding) and layer.output is None:
        return None
    weight_q = None
    if layer.weight is not None:
        weight_q = make_quantizer(weight_spec_for(module, layer.weight), "weight")
        if not weight_q.dynamic:
            weight_q.set_qparams_from(module.weight)  # type: ignore[arg-type]
    input_q = None
    if layer.input is not None and not is_embedding:
        input_q = make_quantizer(layer.input, "input")
    output_q = make_quantizer(layer.output, "output") if layer.output is not None else None
    if isinstance(module, nn.modules.conv._ConvNd):  # centres per channel: axis 1
        for q in (input_q, output_q):
            if isinstance(q, CenteredSign):
                q.set_axis(1, module.weight.dim())
    return QuantModule(module, weight_q, input_q, output_q)


def add_output_quantizers(
    model: nn.Module,
    names: list[str],
    spec: QuantSpec,
    make_quantizer: QuantizerFactory,
    records: list[LayerRecord],
) -> list[LayerRecord]:
    """Give the named QuantModules that have none an output quantizer; return updated records."""
    modules = dict(model.named_modules())
    added = set()
    for name in names:
        m = modules[name]
        if isinstance(m, QuantModule) and m.output_quantizer is None:
            m.output_quantizer = make_quantizer(spec, "output")
            added.add(name)
    return [
        LayerRecord(r.name, r.kind, r.quantized, _how(modules[r.name])) if r.name in added else r
        for r in records
    ]


def _how(wrapped: QuantModule) -> str:
    parts = [f"{role[0].upper()} {describe(q.spec)}" for role, q in wrapped.quantizers().items()]
    return ", ".join(parts)
