"""From a simulated model to a real integer one: `convert`, `quantize_dynamic`, `quantize_weights`.

`convert` replaces every `QuantModule` by its integer module (`lowbit.nn.int_build`). The other
two are whole workflows that need no calibration data: they swap layers with the same
`swap_modules` as static PTQ, then convert.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from lowbit import presets
from lowbit.config import LayerQuant, QuantConfig
from lowbit.distributed import check_unsharded
from lowbit.exceptions import LowbitWarning
from lowbit.nn import IntModule, PerTokenQuantizer
from lowbit.nn.int_build import int_module_from_quant
from lowbit.nn.modules import QuantModule, quant_modules
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.spec import Granularity, PerChannel, PerGroup, PerTensor, QuantSpec
from lowbit.transforms.fold_bn import fold_bn_into
from lowbit.transforms.swap import (
    LayerRecord,
    QuantizerFactory,
    static_quantizers,
    swap_modules,
)
from lowbit.workflows.quantization import QuantSummary

__all__ = ["convert", "quantize_dynamic", "quantize_weights"]

DYNAMIC_BITS = (8,)
WEIGHT_BITS = (2, 4, 8, 16)


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every `QuantModule` of a quantized (or QAT) model by its integer module.

    Weights become integer codes (packed for 4 bits and fewer) with their scales; linear layers
    compute with integer kernels where PyTorch has one. Layers without one (convolutions,
    embeddings, unusual specs) are computed as dequantize-then-float; one warning lists them.
    Functional-op quantizers (`QuantConfig.ops`) stay as they are: the add (matmul, cat) runs in
    float and its output is fake-quantized, the same numbers as before.
    `model.lowbit_summary` is kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_unsharded(model, "lowbit.convert")
    summary = getattr(model, "lowbit_summary", None)
    if not inplace:
        model = copy.deepcopy(model)
    fallbacks: list[str] = []
    with torch.no_grad():
        fold_qat_batchnorms(model)
        for name, qm in quant_modules(model).items():
            int_module = int_module_from_quant(qm)
            if int_module is None:
                fallbacks.append(f"{name or '<model>'} (QuantModule without weight quantizer)")
                continue
            if int_module.kernel == "dequantize":
                fallbacks.append(f"{name or '<model>'} ({int_module.kind})")
            if not name:
                model = int_module
            else:
                model.set_submodule(name, int_module)
    if summary is not None:
        model.lowbit_summary = summary
    if fallbacks:
        warnings.warn(
            f"lowbit.convert: no integer kernel for {len(fallbacks)} layer(s); computed as "
            f"dequantize-then-float: {', '.join(fallbacks)}",
            LowbitWarning,
            stacklevel=2,
        )
    return model


def fold_qat_batchnorms(model: nn.Module) -> None:
    """Fold the BatchNorms that `prepare_qat` recorded after quantized layers, in place.

    During QAT they trained as separate layers; folding them now gives the integer model one
    conv per pair. Weight quantizers that follow the weight take its folded values; learned
    scales are re-initialised from the folded weight.
    """
    pairs = getattr(model, "lowbit_bn_pairs", [])
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        if not isinstance(layer, QuantModule) or not isinstance(bn, nn.modules.batchnorm._NormBase):
            continue
        fold_bn_into(layer.module, bn)
        model.set_submodule(bn_name, nn.Identity())
        quantizer = layer.weight_quantizer
        if quantizer is not None and not quantizer.dynamic:
            quantizer.set_qparams_from(layer.module.weight)
    model.lowbit_bn_pairs = []  # type: ignore[assignment]


def int_modules(model: nn.Module) -> dict[str, IntModule]:
    """The integer modules of a converted model by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, IntModule)}


def quantize_dynamic(
    model: nn.Module,
    bits: int = 8,
    layers: tuple[type[nn.Module], ...] = (nn.Linear,),
    *,
    inplace: bool = False,
) -> nn.Module:
    """Dynamic quantization: int8 per-channel weights, activations quantized per token at run time.

    Each row of a layer's input (flattened to 2-D) gets its own symmetric int8 scale when it
    runs; the product is computed by `torch._int_mm`. Needs no calibration data.
    """
    if bits not in DYNAMIC_BITS:
        raise ValueError(f"bits must be one of {DYNAMIC_BITS} for quantize_dynamic, got {bits!r}")
    _check_layers(layers, (nn.Linear,), "quantize_dynamic")
    weight = presets.int8().weight
    act = QuantSpec(bits=bits, narrow_range=True, granularity=PerChannel(0))
    config = QuantConfig(overrides=dict.fromkeys(layers, LayerQuant(weight=weight, input=act)))

    def make(spec: QuantSpec, role: str) -> TensorQuantizer:
        return PerTokenQuantizer(spec) if role == "input" else TensorQuantizer(spec)

    return _swap_and_convert(model, config, make, inplace)


def quantize_weights(
    model: nn.Module,
    bits: int = 8,
    granularity: Granularity = PerChannel(0),  # noqa: B008 - frozen dataclass
    group_size: int | None = None,
    *,
    layers: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding),
    inplace: bool = False,
) -> nn.Module:
    """Weight-only quantization: integer weights (symmetric), float activations.

    bits: 2, 4, 8 or 16. group_size: one scale per `group_size` inputs (`PerGroup`), overriding
    `granularity`. int8 per-channel and int4 group-wise Linear layers use PyTorch's weight-packed
    kernels; the rest are dequantized on the fly. Embeddings get one scale per row (embedding
    vector), or per group of a row, and look up integer rows; `layers=(nn.Linear,)` keeps them
    in float.
    """
    if bits not in WEIGHT_BITS:
        raise ValueError(f"bits must be one of {WEIGHT_BITS} for quantize_weights, got {bits!r}")
    if group_size is not None and (
        not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1
    ):
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if not isinstance(granularity, PerTensor | PerChannel | PerGroup):
        raise ValueError(
            f"granularity must be PerTensor(), PerChannel(axis) or PerGroup(size), "
            f"got {granularity!r}"
        )
    _check_layers(layers, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd), "quantize_weights")
    spec = presets.weight_only(bits, group_size).weight
    assert spec is not None
    if group_size is None:
        spec = spec.with_(granularity=granularity)
    config = QuantConfig(overrides=dict.fromkeys(layers, LayerQuant(weight=spec)))
    return _swap_and_convert(model, config, static_quantizers(config), inplace)


def _check_layers(layers: object, allowed: tuple[type[nn.Module], ...], workflow: str) -> None:
    if not isinstance(layers, tuple) or not layers:
        raise ValueError(f"layers must be a non-empty tuple of module types, got {layers!r}")
    for t in layers:
        if not (isinstance(t, type) and issubclass(t, allowed)):
            names = ", ".join(a.__name__ for a in allowed)
            raise ValueError(f"layers: {workflow} supports {names} (and subclasses), got {t!r}")


def _swap_and_convert(
    model: nn.Module,
    config: QuantConfig,
    make: QuantizerFactory,
    inplace: bool,
) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    with torch.no_grad():
        records: list[LayerRecord] = swap_modules(model, config, make)
    if not any(r.quantized for r in records):
        raise ValueError("no layer of the model matches `layers`: nothing to quantize")
    model.lowbit_summary = QuantSummary(tuple(records))  # type: ignore[assignment]
    return convert(model, inplace=True)
