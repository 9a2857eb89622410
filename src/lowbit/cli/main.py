"""The `lowbit` command: quantize, eval, compare, report, demo (see docs/cli.md).

Exit codes: 0 success, 2 bad usage or bad input (one-line reason, no traceback).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit.calib import FROM_HISTOGRAM
from lowbit.cli.variants import PRESETS

if TYPE_CHECKING:
    from lowbit.cli.data import Batches
    from lowbit.cli.models import LoadedModel

PRESET_CHOICES = PRESETS
CALIBRATOR_CHOICES = FROM_HISTOGRAM
TARGET_CHOICES = ("onnxruntime", "openvino", "tensorrt")  # lowbit.export's targets


class UsageError(ValueError):
    """Bad input found by the command line itself."""


# ---------------------------------------------------------------- shared helpers


def _say(args: argparse.Namespace, *lines: str) -> None:
    if not args.json:
        for line in lines:
            print(line)


def _warn(message: str) -> None:
    print(f"lowbit: warning: {message}", file=sys.stderr)


def _emit_json(payload: dict[str, Any]) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    print(json.dumps(clean(payload), indent=2))


def _load(args: argparse.Namespace) -> LoadedModel:
    from lowbit.cli.models import load_model

    return load_model(
        args.model,
        weights=getattr(args, "weights", None),
        model_factory=getattr(args, "model_factory", None),
    )


def _preprocess(args: argparse.Namespace) -> Any:
    from lowbit.cli.data import make_preprocess

    return make_preprocess(args.preprocess, args.mean, args.std, args.size)


def _input_shape(args: argparse.Namespace, loaded: LoadedModel) -> tuple[int, ...] | None:
    if args.input_shape:
        try:
            shape = tuple(int(d) for d in args.input_shape.split(","))
        except ValueError:
            raise UsageError(
                f"--input-shape is one sample's shape, e.g. 3,224,224; got {args.input_shape!r}"
            ) from None
        if not shape or min(shape) < 1:
            raise UsageError(f"--input-shape dimensions must be positive, got {args.input_shape}")
        if loaded.input_shape is not None and shape != loaded.input_shape:
            raise UsageError(
                f"--input-shape {args.input_shape} does not match the input of {args.model}: "
                f"it takes samples of shape {_dims(loaded.input_shape)}"
            )
        return shape
    if loaded.input_shape is not None:
        return loaded.input_shape
    if args.size:
        return (3, args.size, args.size)
    return None


def _calibration(args: argparse.Namespace, loaded: LoadedModel) -> tuple[Batches, bool]:
    """The calibration batches, and whether they are random stand-ins."""
    from lowbit.cli.data import load_data, random_batches

    if args.calib is not None:
        batches = load_data(
            args.calib, _preprocess(args), batch_size=args.batch_size, limit=args.num_calib
        )
        _check_sample_shape(batches, loaded.input_shape, f"--calib {args.calib}", args.model)
        return batches, False
    shape = _input_shape(args, loaded)
    if shape is None:
        raise UsageError(
            "no --calib data and the input shape is unknown: pass --calib DATA, or "
            "--input-shape C,H,W to calibrate on random data"
        )
    _warn(
        f"no --calib data: calibrating on random data of shape {shape}; activation ranges "
        "will not match real inputs (pass --calib DATA for a usable model)"
    )
    return random_batches(
        shape, num_samples=min(args.num_calib, 64), batch_size=args.batch_size
    ), True


def _eval_data(args: argparse.Namespace) -> Batches:
    from lowbit.cli.data import load_data

    return load_data(
        args.data,
        _preprocess(args),
        batch_size=args.batch_size,
        limit=args.limit,
        need_labels=True,
    )


def _check_sample_shape(
    data: Batches, declared: tuple[int, ...] | None, option: str, model: str
) -> None:
    """UsageError when the samples of `data` do not have the shape the model file declares
    (ONNX fixes it; the model would otherwise be exported for, or fail on, the wrong shape)."""
    if declared is None:
        return
    sample = tuple(data.example().shape[1:])
    if sample != declared:
        raise UsageError(
            f"{option} holds samples of shape {_dims(sample)} but {model} takes "
            f"{_dims(declared)} (one sample, without the batch dimension): pass data of that "
            "shape (--size resizes images)"
        )


def _fixed_sample_shape(dims: list[Any]) -> tuple[int, ...] | None:
    """One sample's shape from an ONNX Runtime input shape ([batch, 3, 224, 224]), or None
    where a dimension is symbolic."""
    sample = dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in sample):
        return None
    return tuple(sample)


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _reporting_bad_batches(predict: Any, what: str) -> Any:
    """`predict` fed the user's batches: a batch the model rejects raises a ValueError or
    TypeError naming the batch and the reason (exit 2), not a traceback from inside the model."""
    from lowbit.batches import run_user_batch

    batch_index = itertools.count()

    def run(x: Any) -> Any:
        return run_user_batch(predict, x, None, f"{what} batch {next(batch_index)}")

    return run


def _check_output(path: str, suffixes: tuple[str, ...]) -> Path:
    out = Path(path)
    if out.suffix not in suffixes:
        raise UsageError(f"-o must end in {' or '.join(suffixes)}, got {path!r}")
    if not out.parent.is_dir():
        raise UsageError(f"-o {path}: no such folder {out.parent}")
    return out


def _split(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise UsageError(
            f"{option} takes a comma-separated list of {', '.join(allowed)}; got {value!r}"
        )
    return items


# ---------------------------------------------------------------- commands


def _quantize(args: argparse.Namespace) -> int:
    from lowbit.cli.variants import deployable, make_variant
    from lowbit.evaluate import model_bytes

    out = _check_output(args.output, (".onnx", ".lowbit"))
    if out.suffix == ".onnx" and args.preset == "dynamic":
        raise UsageError(
            "--preset dynamic quantizes activations at run time, which ONNX QDQ cannot express: "
            "write a .lowbit file, or use --preset int8 for ONNX"
        )
    loaded = _load(args)
    if loaded.kind == "lowbit":
        raise UsageError(
            f"{args.model} is already quantized: quantize the float model (ONNX or factory), "
            "or run `lowbit eval` on this file"
        )
    calib, is_random = _calibration(args, loaded)
    variant = make_variant(
        loaded.model,
        args.preset,
        calib,
        calibrator=args.calibrator,
        per_tensor=args.per_tensor,
        exclude=args.exclude,
        progress=not args.json,
    )
    if out.suffix == ".onnx":
        _export_onnx(variant.model, calib.example(), out, args.target)
    else:
        from lowbit.cli.models import save_lowbit

        save_lowbit(deployable(variant), out, loaded.recipe)
    summary = getattr(variant.model, "lowbit_summary", None)
    float_bytes, q_bytes = model_bytes(loaded.model), model_bytes(variant.model)
    if args.json:
        _emit_json(
            {
                "command": "quantize",
                "output": str(out),
                "preset": args.preset,
                "calibrator": variant.calibrator,
                "random_calibration": is_random,
                "calibration_samples": calib.num_samples,
                "quantize_s": variant.quantize_s,
                "float_bytes": float_bytes,
                "quantized_bytes": q_bytes,
                "quantized_layers": [r.name for r in summary.quantized] if summary else [],
                "float_layers": [r.name for r in summary.kept_float] if summary else [],
            }
        )
    else:
        if summary is not None:
            print(summary)
        print(
            f"wrote {out} ({args.preset}, {variant.name}): weights {float_bytes / 1024:.1f} KiB "
            f"-> {q_bytes / 1024:.1f} KiB; quantization took {variant.quantize_s:.2f} s on "
            f"{calib.num_samples} {'random' if is_random else 'calibration'} samples"
        )
    return 0


def _export_onnx(model: Any, example: Any, out: Path, target: str) -> None:
    try:
        from lowbit.export import export_onnx
    except ImportError as error:
        raise UsageError(
            f"ONNX export is not available in this lowbit ({error}); write a .lowbit file"
        ) from None
    export_onnx(model, example, out, target=target)


def _eval(args: argparse.Namespace) -> int:
    from lowbit.evaluate.accuracy import accuracy

    if args.model.endswith(".onnx"):
        from lowbit.cli.models import OnnxRunner

        predict: Any = OnnxRunner(Path(args.model))
        engine, declared = "onnxruntime", _fixed_sample_shape(predict.session.get_inputs()[0].shape)
    else:
        loaded = _load(args)
        predict, engine, declared = loaded.model, "pytorch", loaded.input_shape
    data = _eval_data(args)
    _check_sample_shape(data, declared, f"--data {args.data}", args.model)
    started = time.perf_counter()
    result = accuracy(_reporting_bad_batches(predict, "--data"), data, progress=not args.json)
    took = time.perf_counter() - started
    if args.json:
        _emit_json(
            {
                "command": "eval",
                "model": args.model,
                "engine": engine,
                "top1": result.top1,
                "top5": result.top5,
                "samples": result.num_samples,
                "seconds": took,
            }
        )
    else:
        print(
            f"{args.model} ({engine}): top-1 {result.top1:.2f} %  top-5 {result.top5:.2f} %  "
            f"on {result.num_samples} samples in {took:.1f} s"
        )
    return 0


def _float_model_inputs(
    args: argparse.Namespace, command: str
) -> tuple[list[str], Batches | None, LoadedModel, Batches, bool]:
    """What compare and report both start from: calibrators, evaluation data, the float model and
    its calibration data (and whether that data is random)."""
    calibrators = _split(args.calibrators, CALIBRATOR_CHOICES, "--calibrators")
    data = _eval_data(args) if args.data else None
    loaded = _load(args)
    if loaded.kind == "lowbit":
        raise UsageError(f"{command} starts from the float model: pass the ONNX file or factory")
    if data is not None:
        _check_sample_shape(data, loaded.input_shape, f"--data {args.data}", args.model)
    calib, is_random = _calibration(args, loaded)
    return calibrators, data, loaded, calib, is_random


def _compare(args: argparse.Namespace) -> int:
    from lowbit.cli.variants import compare

    preset_names = _split(args.presets, PRESET_CHOICES, "--presets")
    calibrators, data, loaded, calib, is_random = _float_model_inputs(args, "compare")
    comparison = compare(
        loaded.model,
        calib,
        data=data,
        preset_names=preset_names,
        calibrators=calibrators,
        per_tensor=args.per_tensor,
        exclude=args.exclude,
        latency=not args.no_latency,
        progress=not args.json,
    )
    rows, notes = comparison.rows(), comparison.notes()
    if args.json:
        _emit_json(
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
    for r in rows:
        slow = r.get("speedup") is not None and r["speedup"] < 1.0 and r.get("preset")
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
    from lowbit.report import build_report
    from lowbit.report.plots import require_matplotlib

    require_matplotlib()  # before minutes of work
    out = _check_output(args.output, (".html",))
    calibrators, data, loaded, calib, is_random = _float_model_inputs(args, "report")
    result = build_report(
        loaded.model,
        calib,
        out,
        data=data,
        preset=args.preset,
        calibrator=args.calibrator,
        compare_calibrators=calibrators,
        per_tensor=args.per_tensor,
        exclude=args.exclude,
        model_name=Path(args.model).name if loaded.kind == "onnx" else args.model,
        latency=not args.no_latency,
        progress=not args.json,
    )
    if args.json:
        _emit_json(
            {
                "command": "report",
                "output": str(result.path),
                "random_calibration": is_random,
                "rows": result.rows,
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


def _demo(args: argparse.Namespace) -> int:
    """Train a small CNN on the bundled digits, quantize it to int8, show what it cost."""
    import torch

    from lowbit import presets
    from lowbit.cli import demo
    from lowbit.evaluate import model_bytes
    from lowbit.workflows.quantization import quantize

    torch.manual_seed(args.seed)
    data = demo.load_digits(args.seed)
    started = time.perf_counter()
    model = demo.train(demo.DigitsNet(), data)
    print(
        f"trained DigitsNet on {len(data.x_train)} digits in {time.perf_counter() - started:.1f} s"
    )
    started = time.perf_counter()
    qmodel = quantize(
        model, presets.int8(args.calibrator), demo.calibration_batches(data), progress=False
    )
    took = time.perf_counter() - started
    print(qmodel.lowbit_summary)
    rows = [("FP32", model), (f"INT8 ({args.calibrator})", qmodel)]
    print(f"\n{'model':<16} {'top-1 %':>8} {'weights KiB':>12}")
    for name, m in rows:
        acc = demo.accuracy(m, data.x_test, data.y_test)
        print(f"{name:<16} {acc:>8.2f} {model_bytes(m) / 1024:>12.1f}")
    print(f"\nquantization took {took:.2f} s; accuracy on {len(data.x_test)} held-out digits")
    return 0


# ---------------------------------------------------------------- parser


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="an .onnx file, a package.module:factory callable, or a .lowbit file",
    )
    p.add_argument(
        "--weights", metavar="FILE", help="state dict for a factory model (.safetensors or torch)"
    )
    p.add_argument(
        "--model-factory",
        metavar="SPEC",
        help="package.module:factory that builds the float skeleton of a .lowbit file "
        "(default: the one `lowbit quantize` stored in it)",
    )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--preprocess",
        default="imagenet",
        choices=["imagenet", "inception", "none"],
        help="image normalization: imagenet mean/std, inception [-1, 1], none [0, 1] "
        "(default: imagenet)",
    )
    g.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="override mean")
    g.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="override std")
    g.add_argument(
        "--size",
        type=int,
        help="resize the short side to size/0.875, then center-crop to size (e.g. 224)",
    )
    g.add_argument("--batch-size", type=int, default=32, help="default: 32")
    g.add_argument("--json", action="store_true", help="print one JSON object, no progress bars")
    _add_verbose(g)
    g.add_argument(
        "--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's own choice)"
    )


def _add_verbose(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show other libraries' deprecation warnings (each once)",
    )


def _add_calib_options(p: argparse.ArgumentParser, *, calib_required: bool = False) -> None:
    p.add_argument(
        "--calib",
        metavar="DATA",
        required=calib_required,
        help="calibration data: a folder of images, an .npy or .npz file (omitted: random data)",
    )
    p.add_argument(
        "--num-calib", type=int, default=256, help="calibration samples to use (default: 256)"
    )
    p.add_argument("--input-shape", metavar="C,H,W", help="one sample's shape, for random data")
    p.add_argument(
        "--per-tensor", action="store_true", help="one weight scale per tensor, not per channel"
    )
    p.add_argument(
        "--exclude",
        metavar="PATTERN",
        action="append",
        default=[],
        help="keep layers whose qualified name matches this glob in float (repeatable)",
    )


def _add_eval_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--data",
        metavar="DIR",
        required=required,
        help="labelled images: files named <synset>_<name>.JPEG (with a synsets.txt next to or "
        "above the folder) or class subfolders; or an .npz with x and y",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__

    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    q = commands.add_parser("quantize", help="quantize a model, write .onnx (QDQ) or .lowbit")
    _add_model(q)
    _add_calib_options(q)
    q.add_argument("--preset", default="int8", choices=PRESET_CHOICES, help="default: int8")
    q.add_argument("--calibrator", default="minmax", choices=CALIBRATOR_CHOICES)
    q.add_argument("-o", "--output", required=True, metavar="OUT", help="OUT.onnx or OUT.lowbit")
    q.add_argument(
        "--target",
        default="onnxruntime",
        choices=TARGET_CHOICES,
        help="the runtime an OUT.onnx is for (default: onnxruntime; see docs/export.md)",
    )
    _add_data_options(q)
    q.set_defaults(run=_quantize)

    e = commands.add_parser("eval", help="top-1 / top-5 accuracy on a labelled image folder")
    _add_model(e)
    _add_eval_options(e, required=True)
    _add_data_options(e)
    e.set_defaults(run=_eval)

    c = commands.add_parser(
        "compare", help="accuracy, size, latency and quantization time over presets"
    )
    _add_model(c)
    _add_calib_options(c)
    _add_eval_options(c, required=False)
    c.add_argument(
        "--presets", default="int8,int8-asym,w8,w4a8", help="comma-separated (default: %(default)s)"
    )
    c.add_argument(
        "--calibrators", default="minmax,entropy", help="comma-separated (default: %(default)s)"
    )
    c.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    _add_data_options(c)
    c.set_defaults(run=_compare)

    r = commands.add_parser("report", help="an HTML report with plots: what was lost and where")
    _add_model(r)
    _add_calib_options(r)
    _add_eval_options(r, required=False)
    r.add_argument("--preset", default="int8", choices=PRESET_CHOICES, help="default: int8")
    r.add_argument("--calibrator", default="minmax", choices=CALIBRATOR_CHOICES)
    r.add_argument(
        "--calibrators",
        default="minmax,percentile,entropy,mse",
        help="calibrators in the table (default: %(default)s)",
    )
    r.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    r.add_argument("-o", "--output", required=True, metavar="REPORT.html")
    _add_data_options(r)
    r.set_defaults(run=_report)

    demo = commands.add_parser("demo", help="quantize a CNN trained on the bundled digits")
    demo.add_argument("--calibrator", default="minmax", choices=CALIBRATOR_CHOICES)
    demo.add_argument("--seed", type=int, default=0)
    _add_verbose(demo)
    demo.set_defaults(run=_demo, json=False)
    return parser


# Other libraries' notes to the developers who call them (lowbit's), not to lowbit's users.
_DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@contextmanager
def _plain_warnings(verbose: bool) -> Iterator[None]:
    """Warnings as one line each, each distinct warning once (see docs/cli.md).

    lowbit's own (`LowbitWarning`) always show; other libraries' warnings are marked as theirs,
    and their deprecation notes show only with --verbose.
    """
    from lowbit.exceptions import LowbitWarning

    seen: set[tuple[type[Warning], str]] = set()

    def show(message: Any, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
        text = (str(message).splitlines() or [category.__name__])[0]
        if (category, text) in seen:
            return
        seen.add((category, text))
        if issubclass(category, LowbitWarning):
            _warn(text)
        elif verbose or not issubclass(category, _DEVELOPER_WARNINGS):
            _warn(f"{text} ({category.__name__} from a library lowbit uses)")

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every one reaches `show`, which keeps the first
        warnings.showwarning = show
        yield


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with `n` PyTorch threads, then restore the previous setting."""
    if n is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for option in ("batch_size", "num_calib", "limit", "size", "threads"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            print(f"lowbit: error: --{option.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    try:
        with _plain_warnings(args.verbose), _threads(getattr(args, "threads", None)):
            return int(args.run(args))
    except (ValueError, TypeError, OSError, NotImplementedError, ImportError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"lowbit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
