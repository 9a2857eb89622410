"""One self-contained HTML page: inline CSS, figures as base64 PNG, nothing fetched."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lowbit.report.analysis import Fix

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0;
       color: #222; background: #fafafa; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 26px; margin-bottom: 4px; }
h2 { font-size: 19px; margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p.meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 12px 0; font-size: 14px; }
th, td { padding: 5px 10px; border-bottom: 1px solid #e4e4e4; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
tr.slow td { background: #fff4e5; }
.note { background: #fff4e5; border-left: 4px solid #ff9800; padding: 8px 12px; margin: 8px 0; }
.good { background: #eaf6ea; border-left: 4px solid #2ca02c; padding: 8px 12px; margin: 8px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.grid figure { margin: 0; flex: 1 1 480px; max-width: 540px; }
img { max-width: 100%; height: auto; }
code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; }
li { margin: 4px 0; } pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }
"""


@dataclass
class Page:
    """Everything the page shows, already computed."""

    title: str
    meta: str
    rows: list[dict[str, Any]]
    notes: list[str]
    fixes: Sequence[Fix]
    fixes_caption: str
    sqnr_png: str | None
    tradeoff_png: str | None
    histograms: list[str] = field(default_factory=list)
    histogram_caption: str = ""
    channel_pngs: list[str] = field(default_factory=list)
    channel_caption: str = ""
    summary: str = ""


def render(page: Page) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(page.title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{e(page.title)}</h1>",
        f'<p class="meta">{e(page.meta)}</p>',
        "<h2>Accuracy, size and latency</h2>",
        _table(page.rows),
        *[f'<div class="note">{e(n)}</div>' for n in page.notes],
    ]
    if page.tradeoff_png:
        parts.append(_img(page.tradeoff_png, "accuracy against size"))
    parts.append("<h2>Layers that lose the most, and what to try</h2>")
    parts.append(f"<p>{e(page.fixes_caption)}</p>")
    if page.fixes:
        parts.append("<ol>")
        for fix in page.fixes:
            items = "".join(f"<li>{e(a)}</li>" for a in fix.actions)
            items += "".join(f"<li>tried, does not help: {e(a)}</li>" for a in fix.tried)
            parts.append(
                f"<li><b><code>{e(fix.layer)}</code></b>: model output SQNR {_db(fix.sqnr_db)} "
                f"with this layer alone quantized<ul>{items}</ul></li>"
            )
        parts.append("</ol>")
    else:
        parts.append("<p>No quantized layer to analyze.</p>")
    if page.sqnr_png:
        parts.append(_img(page.sqnr_png, "per-layer SQNR"))
    parts.append("<h2>Activation ranges: where each calibrator clips</h2>")
    parts.append(f"<p>{e(page.histogram_caption)}</p>")
    parts.append(_grid(page.histograms, "activation histogram"))
    parts.append("<h2>Per-channel weight ranges: why per-tensor weights fail</h2>")
    parts.append(f"<p>{e(page.channel_caption)}</p>")
    parts.append(_grid(page.channel_pngs, "per-channel weight ranges"))
    if page.summary:
        parts.append("<h2>What was quantized</h2>")
        parts.append(f"<pre>{e(page.summary)}</pre>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _img(png: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'


def _grid(pngs: list[str], alt: str) -> str:
    if not pngs:
        return "<p>(none)</p>"
    figures = "".join(f"<figure>{_img(p, alt)}</figure>" for p in pngs)
    return f'<div class="grid">{figures}</div>'


def _db(value: float) -> str:
    return "lossless" if math.isinf(value) else f"{value:.1f} dB"


COLUMNS = (
    ("variant", "variant", "{}"),
    ("top1", "top-1 %", "{:.2f}"),
    ("top5", "top-5 %", "{:.2f}"),
    ("agreement", "agrees with float %", "{:.1f}"),
    ("output_sqnr_db", "output SQNR dB", "{:.1f}"),
    ("size_kib", "weights KiB", "{:.1f}"),
    ("latency_ms", "latency ms", "{:.2f}"),
    ("latency_spread", "spread", "±{:.0%}"),
    ("speedup", "speed-up", "{:.2f}x"),
    ("quantize_s", "quantize s", "{:.2f}"),
    ("kernels", "layers run", "{}"),
)


def _table(rows: list[dict[str, Any]]) -> str:
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
    body = []
    for i, r in enumerate(rows):  # the first row is the float model
        slow = i > 0 and r.get("speedup") is not None and r["speedup"] < 1.0
        cells = "".join(
            f"<td>{html.escape(fmt.format(r[key]) if r.get(key) is not None else '-')}</td>"
            for key, _, fmt in columns
        )
        body.append(f'<tr class="slow">{cells}</tr>' if slow else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
