"""`lowbit compare` (a table over presets) and `lowbit report` (an HTML report on one preset):
the commands that quantize the float model several ways and measure each."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.calib import FROM_HISTOGRAM
from lowbit.cli import args as common
from lowbit.cli.args import UsageError
from lowbit.cli.variants import PRESETS, preset_variants

if TYPE_CHECKING:
    from lowbit.cli.data import Batches
    from lowbit.cli.models import LoadedModel
    from lowbit.config import QuantConfig
    from lowbit.evaluate.compare import Workflow


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `compare` and `report` subcommands."""
    c = commands.add_parser(
        "compare", help="accuracy, size, latency and quantization time over presets"
    )
    common.add_model(c)
    common.add_calib_options(c)
    common.add_eval_options(c, required=False)
    c.add_argument(
        "--presets", default="int8,int8-asym,w8,w4a8", help="comma-separated (default: %(default)s)"
    )
    c.add_argument(
        "--calibrators", default="minmax,entropy", help="comma-separated (default: %(default)s)"
    )
    c.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    common.add_data_options(c)
    c.set_defaults(run=_compare)

    r = commands.add_parser("report", help="an HTML report with plots: what was lost and where")
    common.add_model(r)
    common.add_calib_options(r)
    common.add_eval_options(r, required=False)
    r.add_argument("--preset", default="int8", choices=PRESETS, help="default: int8")
    r.add_argument("--calibrator", default="minmax", choices=FROM_HISTOGRAM)
    r.add_argument(
        "--calibrators",
        default=",".join(FROM_HISTOGRAM),
        help="calibrators in the table (default: %(default)s)",
    )
    r.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    r.add_argument("-o", "--output", required=True, metavar="REPORT.html")
    common.add_data_options(r)
    r.set_defaults(run=_report)


def _float_model_inputs(
    args: argparse.Namespace, command: str
) -> tuple[list[str], Batches | None, LoadedModel, Batches, bool]:
    """What compare and report both start from: calibrators, evaluation data, the float model and
    its calibration data (and whether that data is random)."""
    calibrators = common.split(args.calibrators, FROM_HISTOGRAM, "--calibrators")
    data = common.eval_data(args) if args.data else None
    loaded = common.load(args)
    if loaded.kind == "lowbit":
        raise UsageError(f"{command} starts from the float model: pass the ONNX file or factory")
    if data is not None:
        common.check_sample_shape(data, loaded.input_shape, f"--data {args.data}", args.model)
    calib, is_random = common.calibration(args, loaded)
    return calibrators, data, loaded, calib, is_random


def _configs(
    args: argparse.Namespace, preset_names: Sequence[str], calibrators: Sequence[str]
) -> tuple[dict[str, QuantConfig | Workflow], dict[str, str]]:
    """{row name: config} for the comparison, and the preset of each row."""

    named = preset_variants(
        preset_names, calibrators, per_tensor=args.per_tensor, exclude=args.exclude
    )
    return {n: how for n, (_, how) in named.items()}, {n: p for n, (p, _) in named.items()}


def _with_presets(rows: list[dict[str, Any]], preset_of: dict[str, str]) -> list[dict[str, Any]]:
    """The rows with the preset each came from (None for float), after the variant's name."""
    return [{"variant": r["variant"], "preset": preset_of.get(r["variant"]), **r} for r in rows]


def _compare(args: argparse.Namespace) -> int:
    """Quantize with every preset (and calibrator) and print one table."""
    from lowbit.evaluate.compare import compare

    preset_names = common.split(args.presets, PRESETS, "--presets")
    calibrators, data, loaded, calib, is_random = _float_model_inputs(args, "compare")
    configs, preset_of = _configs(args, preset_names, calibrators)
    comparison = compare(
        loaded.model,
        calib,
        configs,
        data=data,
        latency=not args.no_latency,
        progress=not args.json,
    )
    rows, notes = _with_presets(comparison.rows(), preset_of), comparison.notes()
    if args.json:
        common.emit_json(
            {"command": "compare", "random_calibration": is_random, "rows": rows, "notes": notes}
        )
        return 0
    _print_table(rows)
    for note in notes:
        print(f"note: {note}")
    if not notes and not args.no_latency:
        print("every quantized variant is faster than float here")
    return 0


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from lowbit.report.html import COLUMNS

    shown = [c for c in COLUMNS if c[0] != "kernels"]  # too wide for a cell: listed below
    columns = [c for c in shown if any(r.get(c[0]) is not None for r in rows)]
    table = Table(title="lowbit compare")
    for key, title, _ in columns:
        table.add_column(title, justify="left" if key == "variant" else "right")
    for i, r in enumerate(rows):  # the first row is the float model
        slow = i > 0 and r.get("speedup") is not None and r["speedup"] < 1.0
        cells = [fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in columns]
        table.add_row(*cells, style="yellow" if slow else None)
    Console(width=max(120, Console().width)).print(table)
    by_kernels: dict[str, list[str]] = {}
    for r in rows:
        if r.get("kernels"):
            by_kernels.setdefault(r["kernels"], []).append(r["variant"])
    for kernels, names in by_kernels.items():
        print(f"layers run: {', '.join(names)}: {kernels}")


def _report(args: argparse.Namespace) -> int:
    """Write the HTML report on one preset (every calibrator asked for in its table)."""
    from lowbit.report import build_report
    from lowbit.report.plots import require_matplotlib

    require_matplotlib()  # before minutes of work
    out = common.check_output(args.output, (".html",))
    calibrators, data, loaded, calib, is_random = _float_model_inputs(args, "report")
    ordered = [args.calibrator, *[c for c in calibrators if c != args.calibrator]]
    configs, preset_of = _configs(args, [args.preset], ordered)
    result = build_report(
        loaded.model,
        calib,
        out,
        configs,
        data=data,
        model_name=Path(args.model).name if loaded.kind == "onnx" else args.model,
        latency=not args.no_latency,
        progress=not args.json,
    )
    if args.json:
        common.emit_json(
            {
                "command": "report",
                "output": str(result.path),
                "random_calibration": is_random,
                "rows": _with_presets(result.rows, preset_of),
                "worst_layers": result.worst_layers,
                "advice": result.advice,
                "notes": result.notes,
            }
        )
        return 0
    print(f"wrote {result.path}")
    for note in result.notes:
        print(f"note: {note}")
    for layer in result.worst_layers:
        fix = f"try {layer['fixes'][0]}" if layer["fixes"] else "no fix tried helps"
        print(f"  {layer['layer']} alone: model output {layer['sqnr_db']:.1f} dB; {fix}")
    for advice in result.advice:
        print(f"  whole model: try {advice}")
    return 0
