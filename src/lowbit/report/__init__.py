"""The HTML report: what quantization cost, which layers lost it, and what to try.

`build_report` quantizes the model (one preset, every calibrator asked for), measures accuracy,
size and latency, analyzes per-layer SQNR, activation ranges and per-channel weight ranges, and
writes one self-contained HTML file. matplotlib (Agg) draws the figures.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowbit._atomic import write_atomic
from lowbit.data import Batches

__all__ = ["ReportResult", "build_report"]


@dataclass
class ReportResult:
    path: Path
    rows: list[dict[str, Any]]
    worst_layers: list[dict[str, Any]]
    notes: list[str]


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
) -> ReportResult:
    """Analyze `model` quantized with `preset` / `calibrator` and write the report to `path`."""
    from lowbit.cli_variants import compare, make_variant
    from lowbit.evaluate import analyze
    from lowbit.report import analysis, plots
    from lowbit.report.html import Page, render

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
    from lowbit.nn.modules import QuantModule

    has_quant_modules = any(isinstance(m, QuantModule) for m in chosen.model.modules())
    errors = analyze(model, chosen.model, calib) if has_quant_modules else []
    reference = analysis.folded_reference(model, next(iter(calib)))
    layer_names = [e.name for e in errors]
    activations = analysis.activation_stats(
        reference, chosen.model, layer_names[: worst + 1], calib
    )
    weights = analysis.channel_ranges(reference)
    base_sqnr = analysis.output_sqnr(model, chosen.model, calib) if errors else None
    exclude_gain: dict[str, float] = {}
    if base_sqnr is not None:
        for e in errors[:worst]:
            trial = make_variant(
                model,
                preset,
                calib,
                calibrator=calibrator,
                per_tensor=per_tensor,
                exclude=[*exclude, e.name],
                progress=False,
            )
            exclude_gain[e.name] = analysis.output_sqnr(model, trial.model, calib) - base_sqnr
    fixes = analysis.suggest_fixes(
        errors,
        activations,
        weights,
        calibrator=calibrator,
        per_tensor=per_tensor,
        exclude_gain=exclude_gain,
        worst=worst,
    )
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
        errors=errors,
        fixes=fixes,
        sqnr_png=plots.sqnr_bars(errors, worst) if errors else None,
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
        {"layer": f.layer, "sqnr_db": f.sqnr_db, "fixes": list(f.actions)} for f in fixes
    ]
    return ReportResult(target, rows, worst_layers, comparison.notes())
