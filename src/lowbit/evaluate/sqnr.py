"""Per-layer signal-to-quantization-noise ratio: which layers lose the most."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.batches import Forward, first_batch, run_batch
from lowbit.nn.modules import quant_modules
from lowbit.transforms.fold_bn import fold_batchnorm


@dataclass(frozen=True)
class LayerError:
    """SQNR in dB of one layer's output: 10 log10(sum ref^2 / sum (ref - quantized)^2)."""

    name: str
    kind: str
    sqnr_db: float


def analyze(
    float_model: nn.Module,
    qmodel: nn.Module,
    data: Iterable[Any],
    *,
    forward: Forward | None = None,
) -> list[LayerError]:
    """SQNR of each quantized layer's output against the float model, worst layer first.

    Both models run on the same batches; the error at a layer includes what earlier layers
    passed on, as a deployed model would see it. BatchNorm is folded in a copy of the float
    model first, so each layer's output means the same thing in both models.
    """
    layers = quant_modules(qmodel)
    if not layers:
        raise ValueError("qmodel has no quantized layers: pass the model lowbit.quantize returned")
    example = first_batch(data, "data")
    reference = copy.deepcopy(float_model).eval()
    with torch.no_grad():
        fold_batchnorm(reference, lambda m: run_batch(m, example, forward))
    ref_modules = dict(reference.named_modules())
    missing = [n for n in layers if n not in ref_modules]
    if missing:
        raise ValueError(
            f"float_model has no layers named {missing[:3]}: is it the model that was quantized?"
        )
    signal = dict.fromkeys(layers, 0.0)
    noise = dict.fromkeys(layers, 0.0)
    qmodel.eval()
    with torch.no_grad():
        for batch in data:
            ref_out = _outputs(reference, {n: ref_modules[n] for n in layers}, batch, forward)
            q_out = _outputs(qmodel, layers, batch, forward)
            for name in layers:
                r, q = ref_out[name].double(), q_out[name].double()
                signal[name] += float((r * r).sum())
                noise[name] += float(((r - q) ** 2).sum())
    errors = [
        LayerError(
            name, type(layers[name].module).__name__, energy_ratio_db(signal[name], noise[name])
        )
        for name in layers
    ]
    return sorted(errors, key=lambda e: e.sqnr_db)


def _outputs(
    model: nn.Module, modules: Mapping[str, nn.Module], batch: Any, forward: Forward | None
) -> dict[str, Tensor]:
    captured: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name, m in modules.items()
    ]
    try:
        run_batch(model, batch, forward)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def output_sqnr(reference: Sequence[Tensor], outputs: Sequence[Tensor]) -> float:
    """SQNR in dB of `outputs` against `reference`, tensor by tensor (batches), in float64."""
    signal = noise = 0.0
    for r, q in zip(reference, outputs, strict=True):
        r, q = r.double(), q.double()
        signal += float((r * r).sum())
        noise += float(((r - q) ** 2).sum())
    return energy_ratio_db(signal, noise)


def energy_ratio_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): the one SQNR formula; inf when there is no noise."""
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)
