"""What the report shows, computed: activation histograms with every calibrator's range,
per-channel weight ranges of depthwise layers, each layer's own effect on the model's output, and
the fixes measured to help the worst layers."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.batches import run_batch
from lowbit.calib import FROM_HISTOGRAM, Histogram, from_histogram
from lowbit.evaluate.accuracy import top1_agreement
from lowbit.evaluate.diagnosis import by_role, only, quantizer_points
from lowbit.evaluate.sqnr import energy_ratio_db, output_sqnr
from lowbit.nn.modules import QuantModule, quant_modules
from lowbit.nn.quantizer import TensorQuantizer, switched_off
from lowbit.numerics import fake_quantize, qparams, tensor_qparams
from lowbit.spec import PerChannel, PerTensor, QuantSpec
from lowbit.transforms.fold_bn import fold_batchnorm

_INT8_WEIGHT = QuantSpec(bits=8, narrow_range=True, granularity=PerTensor())


@dataclass
class ActivationStats:
    """One layer's input distribution and the range each calibrator picks for its spec."""

    layer: str
    spec: QuantSpec
    histogram: Histogram
    ranges: dict[str, tuple[float, float]]
    sqnr_db: dict[str, float] = field(default_factory=dict)  # input SQNR under each range


@dataclass
class ChannelRanges:
    """Per-output-channel weight ranges of one layer, and int8 weight SQNR of two granularities."""

    layer: str
    lo: Tensor
    hi: Tensor
    per_tensor_sqnr_db: float
    per_channel_sqnr_db: float

    @property
    def spread(self) -> float:
        """Largest over smallest channel |w| max: how much per-tensor scales waste."""
        amax = torch.maximum(self.lo.abs(), self.hi.abs())
        return float(amax.max() / amax.clamp_min(1e-12).min())

    def levels_used(self) -> Tensor:
        """int8 levels each channel would use under one per-tensor scale (of 255)."""
        amax = torch.maximum(self.lo.abs(), self.hi.abs())
        return 254.0 * amax / amax.max().clamp_min(1e-12) + 1.0


@dataclass(frozen=True)
class Fix:
    """The fixes tried on one weak layer: those measured to help, and the others."""

    layer: str
    sqnr_db: float  # model output SQNR with this layer alone quantized
    actions: tuple[str, ...]
    tried: tuple[str, ...] = ()


def folded_reference(model: nn.Module, example: Any) -> nn.Module:
    """A copy of the float model with BatchNorm folded, as `quantize` and `analyze` see it."""
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        fold_batchnorm(reference, lambda m: run_batch(m, example))
    return reference


def activation_stats(
    qmodel: nn.Module,
    layers: Sequence[str],
    histograms: Mapping[str, Histogram],
    calibrators: Sequence[str] = FROM_HISTOGRAM,
) -> list[ActivationStats]:
    """Each layer's input histogram from calibration, and the range every calibrator picks from
    it for the layer's input spec: no further pass over the data.

    `histograms` are keyed by quantizer name (`layer.input_quantizer`); layers without one are
    skipped.
    """
    qmodules = quant_modules(qmodel)
    stats = []
    for name in layers:
        histogram = histograms.get(f"{name}.input_quantizer")
        if name not in qmodules or histogram is None:
            continue
        spec = _input_spec(qmodules[name])
        ranges = {
            c: _as_floats(from_histogram(c, histogram).compute_range(spec)) for c in calibrators
        }
        sqnr = {c: _histogram_sqnr(histogram, lo, hi, spec) for c, (lo, hi) in ranges.items()}
        stats.append(ActivationStats(name, spec, histogram, ranges, sqnr))
    return stats


def _input_spec(qm: QuantModule) -> QuantSpec:
    """The layer's input spec; int8 per tensor for weight-only layers, to show what it would be."""
    if qm.input_quantizer is not None and qm.input_quantizer.spec.scheme == "uniform":
        return qm.input_quantizer.spec
    return _INT8_WEIGHT


def _as_floats(r: tuple[Tensor, Tensor]) -> tuple[float, float]:
    return float(r[0].reshape(-1)[0]), float(r[1].reshape(-1)[0])


def _histogram_sqnr(h: Histogram, lo: float, hi: float, spec: QuantSpec) -> float:
    """SQNR of the observed values quantized to [lo, hi]: bin centres weighted by their counts."""
    edges = h.edges().double()
    keep = h.counts > 0
    centres = ((edges[:-1] + edges[1:]) / 2)[keep].clamp(h.min, h.max)
    counts = h.counts[keep].double()
    scale, zero_point = qparams(torch.tensor(lo), torch.tensor(hi), spec)
    approx = fake_quantize(centres.float(), scale, zero_point, spec).double()
    noise = float((counts * (centres - approx) ** 2).sum())
    signal = float((counts * centres**2).sum())
    return energy_ratio_db(signal, noise)


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """10 log10(sum ref^2 / sum (ref - approx)^2), in float64."""
    return output_sqnr([reference], [approx])


def is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        and module.groups > 1
        and module.groups == module.in_channels
    )


def channel_ranges(reference: nn.Module, limit: int = 6) -> list[ChannelRanges]:
    """Per-channel weight ranges of the depthwise convolutions (BatchNorm folded in), or, in a
    model without any, of the layers whose channel ranges differ the most."""
    depthwise = [(n, m) for n, m in reference.named_modules() if is_depthwise(m)]
    candidates = depthwise or [
        (n, m)
        for n, m in reference.named_modules()
        if isinstance(m, nn.Conv2d | nn.Conv1d | nn.Linear) and m.weight.shape[0] > 1
    ]
    result = [_channel_ranges(n, m.weight.detach()) for n, m in candidates]
    if not depthwise:
        result.sort(key=lambda r: -r.spread)
    return result[:limit]


def _channel_ranges(name: str, w: Tensor) -> ChannelRanges:
    flat = w.reshape(w.shape[0], -1).float()
    per_tensor = _weight_sqnr(w, _INT8_WEIGHT)
    per_channel = _weight_sqnr(w, _INT8_WEIGHT.with_(granularity=PerChannel(0)))
    return ChannelRanges(name, flat.min(1).values, flat.max(1).values, per_tensor, per_channel)


def _weight_sqnr(w: Tensor, spec: QuantSpec) -> float:
    scale, zero_point = tensor_qparams(w.float(), spec)
    return sqnr_db(w, fake_quantize(w.float(), scale, zero_point, spec))


# A fix is proposed only if it raises the model's output SQNR by at least this much: 1 dB is a
# fifth less output noise power, the smallest change that moves top-1 agreement measurably on a
# few hundred samples; below it a change is within what another calibration sample would give.
HELPFUL_DB = 1.0


@dataclass(frozen=True)
class LayerEffect:
    """What quantizing one layer alone (every other layer in float) does to the model's output."""

    layer: str
    kind: str
    output_sqnr_db: float
    agreement: float  # top-1 agreement with the float model, percent


def model_outputs(model: nn.Module, batches: Sequence[Any]) -> list[Tensor]:
    """The model's output (first tensor) on every batch, in float64 for the comparisons."""
    with torch.no_grad():
        return [_first_tensor(run_batch(model, b)).double() for b in batches]


def layer_effects(
    qmodel: nn.Module, batches: Sequence[Any], reference: Sequence[Tensor]
) -> list[LayerEffect]:
    """Quantize each layer (or functional-op point) alone, the rest in float, and measure the
    model's output against `reference` (the float model's outputs on `batches`): worst first.

    This is the layer's own cost; the SQNR at a layer inside the fully quantized model also
    carries what earlier layers passed on, so it ranks deep layers worst whatever they cost.
    """
    points = quantizer_points(qmodel)  # layers and functional-op points (lowbit.diagnose's)
    effects = []
    for point in points:
        with only(points, point.quantizers):
            outputs = model_outputs(qmodel, batches)
        effects.append(
            LayerEffect(
                point.name,
                point.kind,
                output_sqnr(reference, outputs),
                top1_agreement(reference, outputs),
            )
        )
    return sorted(effects, key=lambda e: e.output_sqnr_db)


def weights_vs_activations(
    qmodel: nn.Module, batches: Sequence[Any], reference: Sequence[Tensor]
) -> tuple[float, float]:
    """The model's output SQNR with only the weights quantized, and with only the activations
    (as `lowbit.diagnose` measures them): which of the two loses the accuracy."""
    points = quantizer_points(qmodel)
    values = []
    for kept in by_role(points):
        with only(points, kept):
            values.append(output_sqnr(reference, model_outputs(qmodel, batches)))
    return values[0], values[1]


def suggest_fixes(
    qmodel: nn.Module,
    effects: Sequence[LayerEffect],
    batches: Sequence[Any],
    reference: Sequence[Tensor],
    base_sqnr: float,
    *,
    per_tensor: bool,
    worst: int = 3,
) -> list[Fix]:
    """For the `worst` layers by their own effect: try keeping the layer in float and (with
    per-tensor weights) per-channel weights for it, in the whole quantized model; propose what
    raised the model's output SQNR (`base_sqnr` as it is) by at least HELPFUL_DB, and list the
    rest as tried."""
    layers = quant_modules(qmodel)
    points = {p.name: p for p in quantizer_points(qmodel)}
    fixes = []
    for effect in effects[:worst]:
        point = points[effect.layer]
        keep = (
            f"keep it in float: QuantConfig.op_overrides {{'{effect.layer}': None}}"
            if point.is_op
            else f"keep it in float: --exclude '{effect.layer}'"
        )
        trials = {keep: switched_off(point.quantizers)}
        layer = layers.get(effect.layer)
        if per_tensor and layer is not None and _per_tensor_weight(layer):
            trials["per-channel weights (drop --per-tensor)"] = _per_channel_weight(layer)
        gains = {}
        for action, trial in trials.items():
            with trial:
                gains[action] = output_sqnr(reference, model_outputs(qmodel, batches)) - base_sqnr
        fixes.append(
            Fix(
                effect.layer,
                effect.output_sqnr_db,
                tuple(_gain(a, g) for a, g in gains.items() if g >= HELPFUL_DB),
                tuple(_gain(a, g) for a, g in gains.items() if g < HELPFUL_DB),
            )
        )
    return fixes


def _gain(action: str, gain: float) -> str:
    """Two decimals, so that a gain just under the threshold does not print as it."""
    return f"{action} (model output SQNR {gain:+.2f} dB)"


def _per_tensor_weight(layer: QuantModule) -> bool:
    q = layer.weight_quantizer
    return (
        q is not None and q.spec.scheme == "uniform" and isinstance(q.spec.granularity, PerTensor)
    )


@contextmanager
def _per_channel_weight(layer: QuantModule) -> Iterator[None]:
    """The layer's weight quantized per output channel inside the block."""
    original = layer.weight_quantizer
    assert original is not None
    per_channel = TensorQuantizer(original.spec.with_(granularity=PerChannel(0)))
    per_channel.set_qparams_from(layer.module.weight.detach())
    layer.weight_quantizer = per_channel
    try:
        yield
    finally:
        layer.weight_quantizer = original


def _first_tensor(out: Any) -> Tensor:
    while isinstance(out, tuple | list):
        out = out[0]
    if not isinstance(out, Tensor):
        raise ValueError(f"the model must return a tensor, got {type(out).__name__}")
    return out
