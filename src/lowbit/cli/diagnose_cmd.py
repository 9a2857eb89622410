"""`lowbit diagnose`: which layers and functional ops of a model lose the accuracy, and the
fewest to keep in float (`lowbit.diagnose`)."""

from __future__ import annotations

import argparse
import dataclasses

from lowbit.calib import FROM_HISTOGRAM
from lowbit.cli import args as common
from lowbit.cli.args import UsageError
from lowbit.cli.variants import preset_config
from lowbit.presets import NAMES


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `diagnose` subcommand."""
    d = commands.add_parser(
        "diagnose", help="which layers and functional ops lose the accuracy; what to keep float"
    )
    common.add_model(d)
    common.add_calib_options(d)
    common.add_eval_options(d, required=False)
    d.add_argument("--preset", default="int8", choices=NAMES, help="default: int8")
    d.add_argument("--calibrator", default="minmax", choices=FROM_HISTOGRAM)
    d.add_argument(
        "--by",
        default="point",
        choices=("point", "pattern"),
        help="one row per point, or per name pattern (blocks' copies as one; default: point)",
    )
    d.add_argument("--keep", type=int, default=3, help="most points kept in float (default: 3)")
    d.add_argument(
        "--sweep-samples", type=int, default=32, help="samples of the per-point sweep (default: 32)"
    )
    common.add_data_options(d)
    d.set_defaults(run=_diagnose)


def _diagnose(args: argparse.Namespace) -> int:
    """Diagnose the preset on the model: top-1 on --data, else the output SQNR on calibration."""
    from lowbit.evaluate.accuracy import accuracy
    from lowbit.evaluate.diagnosis import diagnose

    data = common.eval_data(args) if args.data else None
    loaded = common.load(args)
    if loaded.kind == "lowbit":
        raise UsageError("diagnose starts from the float model: pass the ONNX file or factory")
    if data is not None:
        common.check_sample_shape(data, loaded.input_shape, f"--data {args.data}", args.model)
    calib, is_random = common.calibration(args, loaded)
    try:
        config = preset_config(
            args.preset, args.calibrator, per_tensor=args.per_tensor, exclude=args.exclude
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    assert config is not None  # NAMES holds no workflow preset
    result = diagnose(
        loaded.model,
        config,
        calib,
        calib if data is None else data,
        None if data is None else (lambda m: accuracy(m, data, progress=False).top1),
        by=args.by,
        keep=args.keep,
        sweep_samples=args.sweep_samples,
        progress=not args.json,
    )
    if args.json:
        payload = {"command": "diagnose", "random_calibration": is_random}
        common.emit_json({**payload, **dataclasses.asdict(result)})
        return 0
    print(result)
    return 0
