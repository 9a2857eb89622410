"""What every command shares: its errors, its output, the options it takes, and the model and
data those options name."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lowbit.cli.data import Batches
    from lowbit.cli.models import LoadedModel


class UsageError(ValueError):
    """Bad input found by the command line itself."""


# ---------------------------------------------------------------- shared helpers


def warn(message: str) -> None:
    """One line on stderr, marked as lowbit's warning."""
    print(f"lowbit: warning: {message}", file=sys.stderr)


def emit_json(payload: dict[str, Any]) -> None:
    """The `--json` output: one object, NaN and infinity as null (strict JSON)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    print(json.dumps(clean(payload), indent=2))


def load(args: argparse.Namespace) -> LoadedModel:
    """The model MODEL, --weights and --model-factory name."""
    from lowbit.cli.models import load_model

    return load_model(
        args.model,
        weights=getattr(args, "weights", None),
        model_factory=getattr(args, "model_factory", None),
    )


def preprocess(args: argparse.Namespace) -> Any:
    """How images become tensors, from --preprocess, --mean, --std and --size."""
    from lowbit.cli.data import make_preprocess

    return make_preprocess(args.preprocess, args.mean, args.std, args.size)


def input_shape(args: argparse.Namespace, loaded: LoadedModel) -> tuple[int, ...] | None:
    """One sample's shape: --input-shape (checked against the model's), the model's own, or
    3 x SIZE x SIZE; None where nothing says."""
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
                f"it takes samples of shape {dims(loaded.input_shape)}"
            )
        return shape
    if loaded.input_shape is not None:
        return loaded.input_shape
    if args.size:
        return (3, args.size, args.size)
    return None


def calibration(args: argparse.Namespace, loaded: LoadedModel) -> tuple[Batches, bool]:
    """The calibration batches, and whether they are random stand-ins."""
    from lowbit.cli.data import load_data, random_batches

    if args.calib is not None:
        batches = load_data(
            args.calib, preprocess(args), batch_size=args.batch_size, limit=args.num_calib
        )
        check_sample_shape(batches, loaded.input_shape, f"--calib {args.calib}", args.model)
        return batches, False
    shape = input_shape(args, loaded)
    if shape is None:
        raise UsageError(
            "no --calib data and the input shape is unknown: pass --calib DATA, or "
            "--input-shape C,H,W to calibrate on random data"
        )
    warn(
        f"no --calib data: calibrating on random data of shape {shape}; activation ranges "
        "will not match real inputs (pass --calib DATA for a usable model)"
    )
    return random_batches(
        shape, num_samples=min(args.num_calib, 64), batch_size=args.batch_size
    ), True


def eval_data(args: argparse.Namespace) -> Batches:
    """The labelled --data, --limit samples at most."""
    from lowbit.cli.data import load_data

    return load_data(
        args.data,
        preprocess(args),
        batch_size=args.batch_size,
        limit=args.limit,
        need_labels=True,
    )


def check_sample_shape(
    data: Batches, declared: tuple[int, ...] | None, option: str, model: str
) -> None:
    """UsageError when the samples of `data` do not have the shape the model file declares
    (ONNX fixes it; the model would otherwise be exported for, or fail on, the wrong shape)."""
    if declared is None:
        return
    sample = tuple(data.example().shape[1:])
    if sample != declared:
        raise UsageError(
            f"{option} holds samples of shape {dims(sample)} but {model} takes "
            f"{dims(declared)} (one sample, without the batch dimension): pass data of that "
            "shape (--size resizes images)"
        )


def fixed_sample_shape(dims: list[Any]) -> tuple[int, ...] | None:
    """One sample's shape from an ONNX Runtime input shape ([batch, 3, 224, 224]), or None
    where a dimension is symbolic."""
    sample = dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in sample):
        return None
    return tuple(sample)


def dims(shape: tuple[int, ...]) -> str:
    """3x224x224."""
    return "x".join(str(d) for d in shape)


def reporting_bad_batches(predict: Any, what: str) -> Any:
    """`predict` fed the user's batches: a batch the model rejects raises a ValueError or
    TypeError naming the batch and the reason (exit 2), not a traceback from inside the model."""
    from lowbit.batches import run_user_batch

    batch_index = itertools.count()

    def run(x: Any) -> Any:
        return run_user_batch(predict, x, None, f"{what} batch {next(batch_index)}")

    return run


def check_output(path: str, suffixes: tuple[str, ...]) -> Path:
    """-o as a Path, when it has one of `suffixes` and its folder exists."""
    out = Path(path)
    if out.suffix not in suffixes:
        raise UsageError(f"-o must end in {' or '.join(suffixes)}, got {path!r}")
    if not out.parent.is_dir():
        raise UsageError(f"-o {path}: no such folder {out.parent}")
    return out


def split(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    """A comma-separated option's items, each one of `allowed`."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise UsageError(
            f"{option} takes a comma-separated list of {', '.join(allowed)}; got {value!r}"
        )
    return items


def add_model(p: argparse.ArgumentParser) -> None:
    """MODEL, --weights, --model-factory."""
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


def add_data_options(p: argparse.ArgumentParser) -> None:
    """Preprocessing, batch size, --json, --verbose, --threads."""
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
    add_verbose(g)
    g.add_argument(
        "--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's own choice)"
    )


def add_nproc(p: argparse.ArgumentParser) -> None:
    """--nproc: run on N processes (torchrun), each calibrating on its shard of the data."""
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="run on N processes started by torchrun, each calibrating on 1/N of the data; the "
        "output is the same file as with one (default: 1; see docs/distributed.md)",
    )


def add_verbose(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--verbose: other libraries' deprecation warnings too."""
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show other libraries' deprecation warnings (each once)",
    )


def add_calib_options(p: argparse.ArgumentParser, *, calib_required: bool = False) -> None:
    """Calibration data, and what to quantize: --per-tensor, --exclude."""
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


def add_eval_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """Labelled --data and --limit."""
    p.add_argument(
        "--data",
        metavar="DIR",
        required=required,
        help="labelled images: files named <synset>_<name>.JPEG (with a synsets.txt next to or "
        "above the folder) or class subfolders; or an .npz with x and y",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
