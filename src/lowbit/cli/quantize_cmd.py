"""`lowbit quantize` (write an .onnx QDQ, OpenVINO .xml or .lowbit file) and `lowbit eval`
(accuracy of one model): the commands about a single model."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from lowbit.calib import FROM_HISTOGRAM
from lowbit.cli import args as common
from lowbit.cli import pretrained_cmd, ranks
from lowbit.cli.args import UsageError
from lowbit.cli.variants import PRESETS, make_variant

TARGET_CHOICES = ("onnxruntime", "openvino", "tensorrt")  # lowbit.export's targets


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `quantize` and `eval` subcommands."""
    q = commands.add_parser(
        "quantize", help="quantize a model, write .onnx (QDQ), .xml (OpenVINO IR) or .lowbit"
    )
    common.add_model(q)
    common.add_calib_options(q)
    q.add_argument("--preset", default="int8", choices=PRESETS, help="default: int8")
    q.add_argument("--calibrator", default="minmax", choices=FROM_HISTOGRAM)
    q.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="OUT.onnx, OUT.xml or OUT.lowbit"
    )
    q.add_argument(
        "--target",
        default=None,
        choices=TARGET_CHOICES,
        help="the runtime an OUT.onnx is for (default: onnxruntime; see docs/export.md)",
    )
    common.add_data_options(q)
    common.add_nproc(q)
    pretrained_cmd.add_options(q)
    q.set_defaults(run=_quantize)

    e = commands.add_parser("eval", help="top-1 / top-5 accuracy on a labelled image folder")
    common.add_model(e)
    common.add_eval_options(e, required=True)
    common.add_data_options(e)
    e.set_defaults(run=_eval)


def _quantize(args: argparse.Namespace) -> int:
    """Quantize the float model with a preset and write it; print what was quantized. Under
    torchrun each rank calibrates on its shard, and rank 0 writes and prints."""
    if pretrained_cmd.is_pretrained(args.model):
        return pretrained_cmd.run(args)
    out = common.check_output(args.output, (".onnx", ".lowbit", ".xml"))
    if out.suffix in (".onnx", ".xml") and args.preset == "dynamic":
        raise UsageError(
            "--preset dynamic quantizes activations at run time, which ONNX QDQ cannot express: "
            "write a .lowbit file, or use --preset int8 for ONNX"
        )
    if out.suffix == ".xml" and args.target is not None:
        raise UsageError("an OUT.xml is OpenVINO IR, always in OpenVINO's form: drop --target")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return ranks.launch(args.nproc, args.argv)
    with ranks.process_group() as (rank, world):
        return _quantize_shard(args, out, rank, world)


def _quantize_shard(args: argparse.Namespace, out: Path, rank: int, world: int) -> int:
    """`_quantize` on rank `rank` of `world`: calibrate on this rank's shard."""
    from lowbit.evaluate import model_bytes
    from lowbit.evaluate.compare import deployable

    loaded = common.load(args)
    if loaded.kind == "lowbit":
        raise UsageError(
            f"{args.model} is already quantized: quantize the float model (ONNX or factory), "
            "or run `lowbit eval` on this file"
        )
    calib, is_random = common.calibration(args, loaded)
    variant = make_variant(
        loaded.model,
        args.preset,
        calib if world == 1 else ranks.ShardBatches(calib, rank, world),
        calibrator=args.calibrator,
        per_tensor=args.per_tensor,
        exclude=args.exclude,
        progress=not args.json,
    )
    if out.suffix in (".onnx", ".xml"):
        _export(variant.model, calib.example(), out, args.target or "onnxruntime")
    else:
        from lowbit.cli.models import save_lowbit

        save_lowbit(deployable(variant), out, loaded.recipe)
    if rank != 0:
        return 0
    summary = getattr(variant.model, "lowbit_summary", None)
    float_bytes, q_bytes = model_bytes(loaded.model), model_bytes(variant.model)
    if args.json:
        common.emit_json(
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
        return 0
    if summary is not None:
        print(summary)
    print(
        f"wrote {out} ({args.preset}, {variant.name}): weights {float_bytes / 1024:.1f} KiB "
        f"-> {q_bytes / 1024:.1f} KiB; quantization took {variant.quantize_s:.2f} s on "
        f"{calib.num_samples} {'random' if is_random else 'calibration'} samples"
    )
    return 0


def _export(model: Any, example: Any, out: Path, target: str) -> None:
    """OUT.onnx for `target`, or OUT.xml (OpenVINO IR)."""
    try:
        from lowbit.export import export_onnx, export_openvino

        if out.suffix == ".xml":
            export_openvino(model, example, out)
        else:
            export_onnx(model, example, out, target=target)
    except ImportError as error:
        raise UsageError(
            f"{out.suffix} export is not available ({error}); write a .lowbit file"
        ) from None


def _eval(args: argparse.Namespace) -> int:
    """Top-1 and top-5 accuracy of an ONNX file (in ONNX Runtime) or a PyTorch model."""
    from lowbit.evaluate.accuracy import accuracy

    if args.model.endswith(".onnx"):
        from lowbit.cli.models import OnnxRunner

        predict: Any = OnnxRunner(Path(args.model))
        engine = "onnxruntime"
        declared = common.fixed_sample_shape(predict.session.get_inputs()[0].shape)
    else:
        loaded = common.load(args)
        predict, engine, declared = loaded.model, "pytorch", loaded.input_shape
    data = common.eval_data(args)
    common.check_sample_shape(data, declared, f"--data {args.data}", args.model)
    started = time.perf_counter()
    predict = common.reporting_bad_batches(predict, "--data")
    result = accuracy(predict, data, progress=not args.json)
    took = time.perf_counter() - started
    if args.json:
        common.emit_json(
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
