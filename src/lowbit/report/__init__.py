"""The HTML report: what quantization cost, which layers lost it, and what to try.

`build_report` quantizes the model (one preset, every calibrator asked for, from one calibration
pass), measures accuracy, size and latency, measures each layer's own cost (quantized alone),
shows activation ranges and per-channel weight ranges, tries fixes for the worst layers, and
writes one self-contained HTML file. matplotlib (Agg) draws the figures.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from lowbit._atomic import write_atomic
from lowbit.cli.data import Batches

if TYPE_CHECKING:
    from lowbit.cli.variants import Variant

__all__ = ["ReportResult", "build_report"]


@dataclass
class ReportResult:
    path: Path
    rows: list[dict[str, Any]]
    worst_layers: list[dict[str, Any]]
    notes: list[str]
    advice: list[str]  # fixes for the whole model, measured to help


def build_report(
    model: nn.Module,
    calib: Batches,
    path: str | os.PathLike[str],
    *,
    data: Batches | None = None,
    preset: str = "int8",
    calibrator: str = "minmax",
    compare_calibrators: Sequence[str] = ("minmax", "percentile", "entropy", "mse"),
    per_tensor: bool = False,
    exclude: Sequence[str] = (),
    model_name: str = "model",
    latency: bool = True,
    progress: bool = True,
    worst: int = 3,
    sensitivity_samples: int = 16,
) -> ReportResult:
    """Analyze `model` quantized with `preset` / `calibrator` and write the report to `path`.

    One calibration pass serves every calibrator; each layer's effect is measured by quantizing
    it alone on the first `sensitivity_samples` calibration samples, and fixes are proposed only
    where they were measured to raise the model's output SQNR by `analysis.HELPFUL_DB`.
    """
    from lowbit.cli.variants import compare
    from lowbit.nn.modules import QuantModule
    from lowbit.report import analysis, plots
    from lowbit.report.html import Page, render

    plots.require_matplotlib()
    target = Path(path)
    calibrators = [calibrator, *[c for c in compare_calibrators if c != calibrator]]
    comparison = compare(
        model,
        calib,
        data=data,
        preset_names=[preset],
        calibrators=calibrators,
        per_tensor=per_tensor,
        exclude=exclude,
        latency=latency,
        progress=progress,
    )
    chosen = comparison.variants[1]
    sample = _head(calib, sensitivity_samples)
    float_outputs = analysis.model_outputs(model, sample)
    effects: list[analysis.LayerEffect] = []
    fixes: list[analysis.Fix] = []
    advice: list[str] = []
    base_sqnr = None
    if any(isinstance(m, QuantModule) for m in chosen.model.modules()):
        base_sqnr = analysis.output_sqnr(
            float_outputs, analysis.model_outputs(chosen.model, sample)
        )
        effects = analysis.layer_effects(chosen.model, sample, float_outputs)
        fixes = analysis.suggest_fixes(
            chosen.model, effects, sample, float_outputs, base_sqnr, per_tensor=per_tensor,
            worst=worst,
        )  # fmt: skip
        advice = _calibrator_advice(comparison.variants[1:])
    reference = analysis.folded_reference(model, sample[0])
    activations = analysis.activation_stats(
        chosen.model, [e.layer for e in effects[: worst + 1]], chosen.histograms
    )
    weights = analysis.channel_ranges(reference)
    rows = comparison.rows()
    summary = getattr(chosen.model, "lowbit_summary", "")
    meta = (
        f"{model_name} · preset {preset}{' per-tensor' if per_tensor else ''} · calibrator "
        f"{calibrator} · {calib.num_samples} calibration samples · "
        + (f"{data.num_samples} labelled samples" if data is not None else "no labelled data")
        + (f" · model output SQNR {base_sqnr:.1f} dB" if base_sqnr is not None else "")
        + f" · {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    depthwise = any(analysis.is_depthwise(m) for m in reference.modules())
    page = Page(
        title=f"lowbit report: {model_name}",
        meta=meta,
        rows=rows,
        notes=comparison.notes(),
        fixes=fixes,
        fixes_caption=_fixes_caption(fixes, advice, sum(len(b[0]) for b in sample)),
        sqnr_png=plots.sqnr_bars(effects, worst) if effects else None,
        tradeoff_png=plots.tradeoff(rows),
        histograms=[plots.activation_histogram(a) for a in activations],
        histogram_caption=(
            "The input of the weakest layers over the calibration data, "
            "counts on a log scale. Each line is the clipping threshold a calibrator picks for "
            "this layer's input spec; the legend gives the range and the SQNR of this input "
            "quantized with it. minmax keeps every outlier and spends the int8 grid on them; "
            "percentile, entropy (TensorRT's KL search) and mse clip the tail for finer steps."
        ),
        channel_pngs=[plots.channel_ranges(w) for w in weights],
        channel_caption=(
            "Weight range of each output channel (BatchNorm folded in). One per-tensor scale "
            "must cover the widest channel, so narrow channels get only a few int8 levels; "
            "per-channel scales give each channel all 255. "
            + (
                "These are the model's depthwise convolutions, the classic failure case."
                if depthwise
                else "The model has no depthwise convolution; shown are the layers whose "
                "channel ranges differ the most."
            )
            + " "
            + "; ".join(
                f"{w.layer}: {w.per_tensor_sqnr_db:.1f} dB per tensor vs "
                f"{w.per_channel_sqnr_db:.1f} dB per channel"
                for w in weights
            )
        ),
        summary=str(summary),
    )
    write_atomic(target, render(page).encode("utf-8"))
    worst_layers = [
        {"layer": f.layer, "sqnr_db": f.sqnr_db, "fixes": list(f.actions), "tried": list(f.tried)}
        for f in fixes
    ]
    return ReportResult(target, rows, worst_layers, comparison.notes(), advice)


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
    from lowbit.report.analysis import HELPFUL_DB

    sqnr = {
        v.calibrator: v.output_sqnr_db
        for v in variants
        if v.calibrator is not None and v.output_sqnr_db is not None
    }
    chosen = variants[0].calibrator
    if chosen not in sqnr:
        return []
    best = max(sqnr, key=lambda c: sqnr[c])
    if sqnr[best] - sqnr[chosen] < HELPFUL_DB:
        return []
    return [
        f"--calibrator {best}: model output SQNR {sqnr[best]:.1f} dB vs {sqnr[chosen]:.1f} dB "
        f"with {chosen}"
    ]


def _fixes_caption(fixes: Sequence[Any], advice: Sequence[str], n_samples: int) -> str:
    from lowbit.report.analysis import HELPFUL_DB

    helpful = [a for f in fixes for a in f.actions]
    text = (
        f"Layers ranked by their own cost: the model's output SQNR against float with only that "
        f"layer quantized, on {n_samples} calibration samples. Each fix was tried in the whole "
        f"quantized model and is proposed only if it raised the output SQNR by {HELPFUL_DB:g} dB "
        "or more. "
    )
    if advice:
        text += "Try for the whole model: " + "; ".join(advice) + ". "
    if fixes and not helpful and not advice:
        text += (
            "None of the fixes tried helps: no single layer dominates the loss, so keeping "
            "layers in float buys little here."
        )
    return text
