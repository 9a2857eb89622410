"""What the report shows, computed: activation histograms with every calibrator's range,
per-channel weight ranges of depthwise layers, and the fixes to try for the worst layers."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.batches import run_batch
from lowbit.calib import Histogram, make_calibrator
from lowbit.evaluate import LayerError
from lowbit.nn.modules import QuantModule
from lowbit.numerics import fake_quantize, tensor_qparams
from lowbit.spec import PerChannel, PerTensor, QuantSpec
from lowbit.transforms.fold_bn import fold_batchnorm

REPORT_CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
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
    """A suggestion for one weak layer, with the evidence behind it."""

    layer: str
    sqnr_db: float
    actions: tuple[str, ...]


def folded_reference(model: nn.Module, example: Any) -> nn.Module:
    """A copy of the float model with BatchNorm folded, as `quantize` and `analyze` see it."""
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        fold_batchnorm(reference, lambda m: run_batch(m, example))
    return reference


def activation_stats(
    reference: nn.Module,
    qmodel: nn.Module,
    layers: Sequence[str],
    data: Iterable[Any],
    calibrators: Sequence[str] = REPORT_CALIBRATORS,
) -> list[ActivationStats]:
    """Feed `data` through the folded float model and let every calibrator see each layer's input.

    Each layer's input spec comes from the quantized model; layers without an input quantizer
    are skipped.
    """
    qmodules = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantModule)}
    specs = {n: _input_spec(qmodules[n]) for n in layers if n in qmodules}
    modules = dict(reference.named_modules())
    cals = {n: {c: make_calibrator(c) for c in calibrators} for n in specs if n in modules}
    seen: dict[str, list[Tensor]] = {n: [] for n in cals}

    def hook(name: str) -> Any:
        def observe(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().float()
            for cal in cals[name].values():
                cal.observe(x)
            seen[name].append(x.reshape(-1)[:: max(1, x.numel() // 20000)])

        return observe

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in cals]
    try:
        with torch.no_grad():
            for batch in data:
                run_batch(reference, batch)
    finally:
        for h in handles:
            h.remove()
    stats = []
    for name, by_cal in cals.items():
        spec = specs[name]
        ranges = {c: _as_floats(cal.compute_range(spec)) for c, cal in by_cal.items()}
        histogram = getattr(by_cal.get("percentile"), "histogram", None) or _histogram(seen[name])
        sample = torch.cat(seen[name])
        sqnr = {c: _sqnr_under_range(sample, lo, hi, spec) for c, (lo, hi) in ranges.items()}
        stats.append(ActivationStats(name, spec, histogram, ranges, sqnr))
    return stats


def _input_spec(qm: QuantModule) -> QuantSpec:
    """The layer's input spec; int8 per tensor for weight-only layers, to show what it would be."""
    if qm.input_quantizer is not None and qm.input_quantizer.spec.scheme == "uniform":
        return qm.input_quantizer.spec
    return _INT8_WEIGHT


def _as_floats(r: tuple[Tensor, Tensor]) -> tuple[float, float]:
    return float(r[0].reshape(-1)[0]), float(r[1].reshape(-1)[0])


def _histogram(values: list[Tensor]) -> Histogram:
    h = Histogram()
    for v in values:
        h.observe(v)
    return h


def _sqnr_under_range(x: Tensor, lo: float, hi: float, spec: QuantSpec) -> float:
    from lowbit.numerics import qparams

    scale, zero_point = qparams(torch.tensor(lo), torch.tensor(hi), spec)
    return sqnr_db(x, fake_quantize(x, scale, zero_point, spec))


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """10 log10(sum ref^2 / sum (ref - approx)^2), in float64."""
    r, a = reference.double(), approx.double()
    noise = float(((r - a) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(float((r * r).sum()), 1e-300) / noise)


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


def suggest_fixes(
    errors: Sequence[LayerError],
    activations: Sequence[ActivationStats],
    weights: Sequence[ChannelRanges],
    *,
    calibrator: str,
    per_tensor: bool,
    exclude_gain: dict[str, float],
    worst: int = 3,
) -> list[Fix]:
    """For the `worst` layers: keep in float, per-channel weights, or another calibrator,
    each with the number that motivates it."""
    by_act = {a.layer: a for a in activations}
    by_weight = {w.layer: w for w in weights}
    fixes = []
    for error in list(errors)[:worst]:
        actions: list[str] = []
        w = by_weight.get(error.name)
        if w is not None and per_tensor and w.per_channel_sqnr_db > w.per_tensor_sqnr_db + 3:
            actions.append(
                f"per-channel weights (drop --per-tensor): int8 weight SQNR "
                f"{w.per_tensor_sqnr_db:.1f} dB per tensor vs {w.per_channel_sqnr_db:.1f} dB "
                f"per channel; channel ranges differ {w.spread:.0f}x"
            )
        act = by_act.get(error.name)
        if act is not None and act.sqnr_db:
            best = max(act.sqnr_db, key=lambda c: act.sqnr_db[c])
            current = act.sqnr_db.get(calibrator)
            if best != calibrator and current is not None and act.sqnr_db[best] > current + 1:
                actions.append(
                    f"--calibrator {best}: its input SQNR is {act.sqnr_db[best]:.1f} dB vs "
                    f"{current:.1f} dB with {calibrator} (range {act.ranges[best][1]:.3g} vs "
                    f"{act.ranges[calibrator][1]:.3g})"
                )
        gain = exclude_gain.get(error.name)
        keep = f"keep it in float: --exclude '{error.name}'"
        if gain is not None:
            keep += f" (model output SQNR {gain:+.1f} dB)"
        actions.append(keep)
        fixes.append(Fix(error.name, error.sqnr_db, tuple(actions)))
    return fixes


def output_sqnr(reference: nn.Module, qmodel: nn.Module, data: Iterable[Any]) -> float:
    """SQNR of the model's output (logits) against the float model, over `data`."""
    signal = noise = 0.0
    with torch.no_grad():
        for batch in data:
            r = _first_tensor(run_batch(reference, batch)).double()
            q = _first_tensor(run_batch(qmodel, batch)).double()
            signal += float((r * r).sum())
            noise += float(((r - q) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def _first_tensor(out: Any) -> Tensor:
    while isinstance(out, tuple | list):
        out = out[0]
    if not isinstance(out, Tensor):
        raise ValueError(f"the model must return a tensor, got {type(out).__name__}")
    return out
