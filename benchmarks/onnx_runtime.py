"""EfficientNet-Lite0 in ONNX Runtime: lowbit's QDQ export against ORT's own quantize_static.

Models, all from the same float network and the same 64 calibration images (sorted file order):
- fp32: `torch.onnx.export` of the float model;
- lowbit int8_asymmetric / int8 (TensorRT-style): `lowbit.quantize` (min-max) + `export_onnx`;
- lowbit int8_asymmetric fusable: `int8_asymmetric(fusable_outputs=True)`, which also quantizes
  the conv outputs that reach the residual Adds and the pool (14 projection convs and the head),
  so ORT can run every conv as QLinearConv; also with the MSE calibrator;
- ort quantize_static: `onnxruntime.quantization.quantize_static` of the fp32 file (QDQ,
  per_channel=True, uint8 activations, int8 weights), with its default MinMax calibration and
  with Percentile.

With --float64-control (slow: float64 convolutions), lowbit's own simulation of int8_asymmetric is
also run in float64, to show how many images flip between two exact implementations that differ
only in float rounding: the floor of the "agree" column for any runtime.

Each is timed in ONNX Runtime (CPU, intra_op_num_threads=2, default graph optimizations) at batch 1
and batch 32: warm-up, then the median of interleaved rounds (every model once per round, so a
busy machine slows all of them alike). Top-1 is on the other 436 images; "agree" is top-1
agreement with lowbit's own simulation of the same model. The graph ORT actually runs is saved
(`SessionOptions.optimized_model_filepath`) and its integer convolutions counted.

    .venv/bin/python benchmarks/onnx_runtime.py [--data DIR] [--rounds N] [--eval-limit N]
                                                [--float64-control]

Prints a markdown table and writes benchmarks/results/onnx_runtime.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lowbit import presets
from lowbit.api import quantize
from lowbit.export import export_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficientnet_lite0 import load_model
from imagenet_sample import calib_eval_split, find_data_dir

N_CALIB = 64
BATCH = 32
THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results" / "onnx_runtime.json"
INT8_CONVS = ("QLinearConv", "ConvInteger")
FLOAT_CONVS = ("Conv", "FusedConv", "NchwcConv")


@dataclass
class Row:
    name: str
    how: str
    file_mb: float = 0.0
    top1: float | None = None
    agree: float | None = None
    ms_b1: float | None = None
    ms_b32: float | None = None
    int8_convs: str = ""
    optimized_ops: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def export_fp32(model: nn.Module, example: Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            opset_version=13,
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )


def ort_quantize_static(fp32_path: Path, calib: Tensor, path: Path, method: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": b.numpy()} for b in calib.split(BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        str(fp32_path),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
    )


def session(path: Path, optimized_to: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized_to is not None:
        options.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict(sess: Any, x: Tensor) -> Tensor:
    outs = [sess.run(None, {"input": b.numpy()})[0] for b in x.split(BATCH)]
    return torch.from_numpy(np.concatenate(outs))


def simulate(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(b) for b in x.split(BATCH)])


def float64_control(qmodel: nn.Module, x: Tensor, sim: Tensor) -> dict[str, Any]:
    """Agreement of the float64 simulation with the float32 one: the floor any runtime meets."""
    model64 = copy.deepcopy(qmodel).double()
    logits = simulate(model64, x.double()).float()
    agree = (logits.argmax(1) == sim.argmax(1)).float().mean().item()
    return {"agree": agree, "max": (logits - sim).abs().max().item()}


def optimized_ops(path: Path, tmp: Path) -> dict[str, int]:
    import onnx

    out = tmp / f"{path.stem}.optimized.onnx"
    session(path, out)
    return dict(Counter(n.op_type for n in onnx.load(str(out)).graph.node))


def time_models(sessions: dict[str, Any], x: Tensor, rounds: int) -> dict[str, tuple[float, float]]:
    """Median ms at batch 1 and batch 32, interleaving the models round by round."""
    b1, b32 = x[:1].numpy(), x[:BATCH].numpy()
    for sess in sessions.values():  # warm-up
        for _ in range(3):
            sess.run(None, {"input": b1})
        sess.run(None, {"input": b32})
    t1: dict[str, list[float]] = {k: [] for k in sessions}
    t32: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            for _ in range(5):
                t0 = time.perf_counter()
                sess.run(None, {"input": b1})
                t1[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sess.run(None, {"input": b32})
            t32[name].append(time.perf_counter() - t0)
    return {k: (1e3 * statistics.median(t1[k]), 1e3 * statistics.median(t32[k])) for k in sessions}


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    head = (
        "| model | file MB | top-1 % | agree w/ lowbit sim % | ms batch 1 | ms batch 32 | "
        "int8 convs in ORT's graph |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        top1 = None if r.top1 is None else 100 * r.top1
        agree = None if r.agree is None else 100 * r.agree
        lines.append(
            f"| {r.name} | {r.file_mb:.1f} | {fmt(top1)} | {fmt(agree)} | {fmt(r.ms_b1)} | "
            f"{fmt(r.ms_b32, '.0f')} | {r.int8_convs} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="imagenet-sample folder")
    parser.add_argument("--rounds", type=int, default=10, help="timing rounds")
    parser.add_argument("--eval-limit", type=int, default=None, help="smoke runs: fewer images")
    parser.add_argument("--float64-control", action="store_true", help="see the docstring")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    data_dir = find_data_dir(args.data, "onnx_runtime benchmark")
    if data_dir is None:
        return 0
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    split = calib_eval_split(data_dir, N_CALIB, args.eval_limit)
    calib, evals, labels = split.calib, split.evals, split.labels
    print(f"calibrate on {len(calib)} images, evaluate on {len(evals)}; {THREADS} threads")

    fp32 = load_model()
    lowbit_models = {
        "lowbit int8_asymmetric": presets.int8_asymmetric(),
        "lowbit int8_asymmetric fusable": presets.int8_asymmetric(fusable_outputs=True),
        "lowbit int8_asymmetric fusable mse": presets.int8_asymmetric("mse", fusable_outputs=True),
        "lowbit int8 (TensorRT-style)": presets.int8(),
    }
    rows: list[Row] = []
    sessions: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        paths: dict[str, Path] = {}
        paths["fp32"] = tmp / "fp32.onnx"
        export_fp32(fp32, calib[:1], paths["fp32"])
        rows.append(Row("fp32", "torch.onnx.export"))
        sims: dict[str, Tensor] = {}
        control: dict[str, Any] | None = None
        for name, config in lowbit_models.items():
            qmodel = quantize(fp32, config, list(calib.split(BATCH)), progress=False)
            paths[name] = tmp / f"{'_'.join(name.split()[1:3])}.onnx"
            t0 = time.perf_counter()
            export_onnx(qmodel, calib[:1], paths[name])
            row = Row(name, "lowbit.quantize + export_onnx")
            row.notes.append(f"export {time.perf_counter() - t0:.1f}s")
            sims[name] = simulate(qmodel, evals)
            if args.float64_control and control is None:
                control = float64_control(qmodel, evals, sims[name])
            rows.append(row)
            print(f"[{time.perf_counter() - start:5.0f}s] exported {name}", flush=True)
        for method in ("MinMax", "Percentile"):
            name = f"ort quantize_static {method}"
            paths[name] = tmp / f"ort_static_{method}.onnx"
            ort_quantize_static(paths["fp32"], calib, paths[name], method)
            rows.append(Row(name, f"QDQ, per_channel, u8/s8, {method}"))
            print(f"[{time.perf_counter() - start:5.0f}s] ORT quantize_static {method}", flush=True)

        for row in rows:
            path = paths[row.name]
            row.file_mb = path.stat().st_size / 1e6
            sessions[row.name] = session(path)
            logits = predict(sessions[row.name], evals)
            row.top1 = (logits.argmax(1) == labels).float().mean().item()
            if row.name in sims:
                row.agree = (logits.argmax(1) == sims[row.name].argmax(1)).float().mean().item()
            ops = optimized_ops(path, tmp)
            row.optimized_ops = ops
            convs = sum(ops.get(k, 0) for k in INT8_CONVS + FLOAT_CONVS)
            row.int8_convs = f"{sum(ops.get(k, 0) for k in INT8_CONVS)}/{convs}"
            print(f"[{time.perf_counter() - start:5.0f}s] evaluated {row.name}", flush=True)
        timings = time_models(sessions, evals, args.rounds)
    for row in rows:
        row.ms_b1, row.ms_b32 = timings[row.name]

    print()
    print(table(rows))
    if control is not None:
        print(
            f"\ncontrol: lowbit's float64 simulation vs its float32 one (int8_asymmetric): "
            f"top-1 agreement {100 * control['agree']:.2f}%, max |logit difference| "
            f"{control['max']:.3f}"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta = {
        "model": "efficientnet-lite0",
        "n_calib": N_CALIB,
        "n_eval": len(evals),
        "threads": THREADS,
        "timing": f"median of {args.rounds} interleaved rounds (5 runs at batch 1, 1 at 32)",
        "onnxruntime": __import__("onnxruntime").__version__,
        "torch": torch.__version__,
        "load_average_1min": load,
        "total_s": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "rows": [asdict(r) for r in rows], "float64_control": control}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nload average {load}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
