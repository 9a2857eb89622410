"""The report's figures, drawn with matplotlib's Agg backend and returned as base64 PNG."""

from __future__ import annotations

import base64
import importlib.util
import io
import math
from collections.abc import Sequence
from typing import Any

import torch

from lowbit.report.analysis import ActivationStats, ChannelRanges, LayerEffect

COLORS = {"minmax": "#d62728", "percentile": "#ff7f0e", "entropy": "#2ca02c", "mse": "#1f77b4"}
_STYLES = {"minmax": "-", "percentile": "--", "entropy": "-.", "mse": ":"}


def require_matplotlib() -> None:
    """ValueError at once if matplotlib is missing, before the report does any work."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("the report needs matplotlib: pip install 'lowbit[report]'")


def _pyplot() -> Any:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def sqnr_bars(effects: Sequence[LayerEffect], highlight: int = 3) -> str:
    """Each layer's own effect (the model's output SQNR with only that layer quantized) as
    horizontal bars, worst first, the `highlight` worst in red."""
    plt = _pyplot()
    shown = list(effects)[:40]
    values = [min(e.output_sqnr_db, 100.0) for e in shown]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(shown) + 1.2))
    colors = ["#d62728" if i < highlight else "#4c72b0" for i in range(len(shown))]
    ax.barh(range(len(shown)), values, color=colors)
    ax.set_yticks(range(len(shown)), [f"{e.layer} ({e.kind})" for e in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("model output SQNR with only this layer quantized (dB, higher is better)")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
    ax.set_title(f"Each layer quantized alone, worst first ({len(effects)} quantized layers)")
    return _png(fig)


def activation_histogram(stats: ActivationStats) -> str:
    """The input histogram of one layer (log counts) with each calibrator's clipping range."""
    plt = _pyplot()
    h = stats.histogram
    edges = h.edges()
    centres = ((edges[:-1] + edges[1:]) / 2).numpy()
    counts = h.counts.numpy()
    keep = (centres >= h.min - h.bin_width) & (centres <= h.max + h.bin_width)
    fig, ax = plt.subplots(figsize=(6.2, 3.2))
    ax.fill_between(centres[keep], counts[keep], step="mid", color="#888888", alpha=0.6, lw=0)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)
    for name, (lo, hi) in stats.ranges.items():
        color, style = COLORS.get(name, "black"), _STYLES.get(name, "-")
        label = f"{name}: [{lo:.3g}, {hi:.3g}]"
        if name in stats.sqnr_db:
            label += f", {stats.sqnr_db[name]:.1f} dB"
        ax.axvline(hi, color=color, ls=style, lw=1.6, label=label)
        if lo < 0 and h.min < 0:
            ax.axvline(lo, color=color, ls=style, lw=1.6)
    ax.set_title(f"input of {stats.layer}", fontsize=10)
    ax.set_xlabel("activation value")
    ax.set_ylabel("count (log)")
    ax.legend(fontsize=7, loc="upper right", framealpha=0.85)
    return _png(fig)


def channel_ranges(ranges: ChannelRanges) -> str:
    """Per-channel weight min / max bars with the per-tensor range that int8 would use."""
    plt = _pyplot()
    n = len(ranges.lo)
    fig, ax = plt.subplots(figsize=(6.2, 3.0))
    x = torch.arange(n).numpy()
    ax.bar(x, ranges.hi.numpy(), color="#4c72b0", width=0.85, label="channel max")
    ax.bar(x, ranges.lo.numpy(), color="#55a868", width=0.85, label="channel min")
    amax = float(torch.maximum(ranges.lo.abs(), ranges.hi.abs()).max())
    ax.axhline(amax, color="#d62728", ls="--", lw=1.2, label="per-tensor range")
    ax.axhline(-amax, color="#d62728", ls="--", lw=1.2)
    levels = ranges.levels_used()
    ax.set_title(
        f"{ranges.layer}: per-tensor int8 gives the narrowest channel "
        f"{float(levels.min()):.0f} of 255 levels",
        fontsize=9,
    )
    ax.set_xlabel("output channel")
    ax.set_ylabel("weight value")
    if n > 40:
        ax.set_xticks([])
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def tradeoff(rows: Sequence[dict[str, Any]]) -> str | None:
    """Accuracy (or agreement) against size, one point per variant; None without numbers."""
    key = "top1" if any(r.get("top1") is not None for r in rows) else "agreement"
    points = [(r["size_kib"], r[key], r["variant"]) for r in rows if r.get(key) is not None]
    if len(points) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 3.2))
    labels: dict[tuple[float, float], list[str]] = {}
    for size, value, name in points:  # variants on the same spot share one label
        labels.setdefault((round(size, 3), round(value, 3)), []).append(name)
    for (size, value), names in labels.items():
        ax.scatter(size, value, s=30)
        ax.annotate(
            "\n".join(names), (size, value), fontsize=7, xytext=(5, -3), textcoords="offset points"
        )
    ax.set_xscale(
        "log" if max(p[0] for p in points) / max(min(p[0] for p in points), 1e-9) > 20 else "linear"
    )
    ax.set_xlabel("weights (KiB)")
    ax.set_ylabel("top-1 %" if key == "top1" else "top-1 agreement with float %")
    ax.set_title("accuracy vs size", fontsize=10)
    if not all(math.isfinite(p[1]) for p in points):
        return None
    return _png(fig)
