"""The HTML report: what quantization cost, which layers lost it, and what to try.

`build_report` quantizes the model with every config asked for (those alike but for the
calibrator from one calibration pass), measures accuracy, size and latency, measures each layer's
own cost (quantized alone), shows activation ranges and per-channel weight ranges, tries fixes
for the worst layers, and writes one self-contained HTML file. matplotlib (Agg) draws the figures.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lowbit._atomic import write_atomic
from lowbit.config import QuantConfig
from lowbit.evaluate.compare import Batches, Comparison, Variant, Workflow, compare
from lowbit.report import analysis, plots
from lowbit.report.html import Page, render
from lowbit.spec import PerTensor

__all__ = ["ReportResult", "build_report"]

_HISTOGRAM_CAPTION = (
    "The input of the weakest layers over the calibration data, counts on a log scale. Each line "
    "is the clipping threshold a calibrator picks for this layer's input spec; the legend gives "
    "the range and the SQNR of this input quantized with it. minmax keeps every outlier and "
    "spends the int8 grid on them; percentile, entropy (TensorRT's KL search) and mse clip the "
    "tail for finer steps."
)


@dataclass
class ReportResult:
    """Where the report went and what it found, for the command line to print or emit as JSON."""

    path: Path
    rows: list[dict[str, Any]]
    worst_layers: list[dict[str, Any]]
    notes: list[str]
    advice: list[str]  # fixes for the whole model, measured to help


@dataclass
class _Analysis:
    """What the chosen variant's layers cost and what helps, measured on a few samples."""

    effects: list[analysis.LayerEffect]
    fixes: list[analysis.Fix]
    advice: list[str]
    base_sqnr: float | None
    split: tuple[float, float] | None = None  # output SQNR: weights only, activations only


def build_report(
    model: nn.Module,
    calib: Batches,
    path: str | os.PathLike[str],
    configs: Mapping[str, QuantConfig | Workflow],
    *,
    data: Batches | None = None,
    model_name: str = "model",
    latency: bool = True,
    progress: bool = True,
    worst: int = 3,
    sensitivity_samples: int = 16,
) -> ReportResult:
    """Analyze `model` quantized with the first of `configs` ({row name: config}), compared with
    the others (the same preset with other calibrators, say), and write the report to `path`.

    Configs alike but for the calibrator share one calibration pass (`evaluate.compare`); each
    layer's effect is measured by quantizing it alone on the first `sensitivity_samples`
    calibration samples, and fixes are proposed only where they were measured to raise the
    model's output SQNR by `analysis.HELPFUL_DB`.
    """
    plots.require_matplotlib()
    if not configs:
        raise ValueError("configs: the report needs at least one {name: QuantConfig}")
    target = Path(path)
    comparison = compare(model, calib, configs, data=data, latency=latency, progress=progress)
    chosen = comparison.variants[1]
    sample = _head(calib, sensitivity_samples)
    float_outputs = analysis.model_outputs(model, sample)
    found = _analyze(chosen, comparison, sample, float_outputs, worst)
    reference = analysis.folded_reference(model, sample[0])
    activations = analysis.activation_stats(
        chosen.model, [e.layer for e in found.effects[: worst + 1]], chosen.histograms
    )
    weights = analysis.channel_ranges(reference)
    rows = comparison.rows()
    meta = (
        f"{model_name} · variant {chosen.name} · {calib.num_samples} calibration samples · "
        + (f"{data.num_samples} labelled samples" if data is not None else "no labelled data")
        + (f" · model output SQNR {found.base_sqnr:.1f} dB" if found.base_sqnr is not None else "")
        + f" · {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    depthwise = any(analysis.is_depthwise(m) for m in reference.modules())
    page = Page(
        title=f"lowbit report: {model_name}",
        meta=meta,
        rows=rows,
        notes=comparison.notes(),
        fixes=found.fixes,
        fixes_caption=_fixes_caption(
            found.fixes, found.advice, sum(len(b[0]) for b in sample), found.split
        ),
        sqnr_png=plots.sqnr_bars(found.effects, worst) if found.effects else None,
        tradeoff_png=plots.tradeoff(rows),
        histograms=[plots.activation_histogram(a) for a in activations],
        histogram_caption=_HISTOGRAM_CAPTION,
        channel_pngs=[plots.channel_ranges(w) for w in weights],
        channel_caption=_channel_caption(weights, depthwise),
        summary=str(getattr(chosen.model, "lowbit_summary", "")),
    )
    write_atomic(target, render(page).encode("utf-8"))
    worst_layers = [
        {"layer": f.layer, "sqnr_db": f.sqnr_db, "fixes": list(f.actions), "tried": list(f.tried)}
        for f in found.fixes
    ]
    return ReportResult(target, rows, worst_layers, comparison.notes(), found.advice)


def _analyze(
    chosen: Variant,
    comparison: Comparison,
    sample: list[tuple[Any, ...]],
    float_outputs: list[Tensor],
    worst: int,
) -> _Analysis:
    """Each layer's own cost in the chosen variant, fixes for the `worst`, and a better
    calibrator if one measured better; nothing for a variant without simulated layers."""
    from lowbit.nn.modules import QuantModule

    if not any(isinstance(m, QuantModule) for m in chosen.model.modules()):
        return _Analysis([], [], [], None)
    base_sqnr = analysis.output_sqnr(float_outputs, analysis.model_outputs(chosen.model, sample))
    effects = analysis.layer_effects(chosen.model, sample, float_outputs)
    weight = chosen.config.weight if chosen.config is not None else None
    per_tensor = weight is not None and isinstance(weight.granularity, PerTensor)
    fixes = analysis.suggest_fixes(
        chosen.model, effects, sample, float_outputs, base_sqnr, per_tensor=per_tensor, worst=worst
    )
    advice = _calibrator_advice(comparison.variants[1:])
    split = analysis.weights_vs_activations(chosen.model, sample, float_outputs)
    return _Analysis(effects, fixes, advice, base_sqnr, split)


def _channel_caption(weights: Sequence[analysis.ChannelRanges], depthwise: bool) -> str:
    which = (
        "These are the model's depthwise convolutions, the classic failure case."
        if depthwise
        else "The model has no depthwise convolution; shown are the layers whose "
        "channel ranges differ the most."
    )
    sqnr = "; ".join(
        f"{w.layer}: {w.per_tensor_sqnr_db:.1f} dB per tensor vs "
        f"{w.per_channel_sqnr_db:.1f} dB per channel"
        for w in weights
    )
    return (
        "Weight range of each output channel (BatchNorm folded in). One per-tensor scale must "
        "cover the widest channel, so narrow channels get only a few int8 levels; per-channel "
        f"scales give each channel all 255. {which} {sqnr}"
    )


def _head(calib: Batches, n: int) -> list[tuple[Any, ...]]:
    """The first `n` samples of `calib` as batches (the last one cut short)."""
    if n < 1:
        raise ValueError(f"sensitivity_samples must be >= 1, got {n}")
    head, taken = [], 0
    for batch in calib:
        head.append(tuple(t[: n - taken] for t in batch))
        taken += len(head[-1][0])
        if taken >= n:
            break
    return head


def _calibrator_advice(variants: Sequence[Variant]) -> list[str]:
    """'--calibrator X' if another calibrator's variant has a model output SQNR HELPFUL_DB or
    more above the chosen one's (the first)."""

    sqnr = {
        v.calibrator: v.output_sqnr_db
        for v in variants
        if v.calibrator is not None and v.output_sqnr_db is not None
    }
    chosen = variants[0].calibrator
    if chosen not in sqnr:
        return []
    best = max(sqnr, key=lambda c: sqnr[c])
    if sqnr[best] - sqnr[chosen] < analysis.HELPFUL_DB:
        return []
    return [
        f"--calibrator {best}: model output SQNR {sqnr[best]:.1f} dB vs {sqnr[chosen]:.1f} dB "
        f"with {chosen}"
    ]


def _fixes_caption(
    fixes: Sequence[Any],
    advice: Sequence[str],
    n_samples: int,
    split: tuple[float, float] | None = None,
) -> str:
    helpful = [a for f in fixes for a in f.actions]
    text = (
        f"Layers and functional-op points ranked by their own cost: the model's output SQNR "
        f"against float with only that point quantized, on {n_samples} calibration samples. "
        "Each fix was tried in the whole quantized model and is proposed only if it raised the "
        f"output SQNR by {analysis.HELPFUL_DB:g} dB or more. "
    )
    if split is not None:
        text += f"Weights only quantized: {split[0]:.1f} dB; activations only: {split[1]:.1f} dB. "
    if advice:
        text += "Try for the whole model: " + "; ".join(advice) + ". "
    if fixes and not helpful and not advice:
        text += (
            "None of the fixes tried helps: no single layer dominates the loss, so keeping "
            "layers in float buys little here."
        )
    return text
