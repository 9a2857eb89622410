"""EfficientNet-Lite0 in ONNX Runtime and OpenVINO: every static preset's export against FP32
and against ONNX Runtime's own quantize_static.

Models, all from the same float network and the same 64 calibration images (sorted file order):
- fp32: `torch.onnx.export` of the float model;
- lowbit presets with their defaults (`int8()`, `int8_asymmetric()`, which quantize the layer
  outputs ORT needs, `fusable_outputs=True`, and the residual Adds' outputs, `ops={"add": ...}`),
  exported with `export_onnx`'s default
  target="onnxruntime" for ORT and target="openvino" for OpenVINO; `int8()` also with
  target="tensorrt" (int8 zero point 0, TensorRT's form) in ORT and target="onnxruntime" in
  OpenVINO; both presets also with `fusable_outputs=False` (the outputs that reach the residual
  Adds and the pool, and the Adds' outputs, left unquantized); `w4a8(None)` (INT4 weights:
  float convs in ORT);
- ort quantize_static: `onnxruntime.quantization.quantize_static` of the fp32 file (after
  `quant_pre_process`, QDQ, per_channel=True, uint8 activations, int8 weights), with MinMax and
  Percentile calibration.

With --float64-control (slow: float64 convolutions), lowbit's own simulation of int8_asymmetric is
also run in float64, to show how many images flip between two exact implementations that differ
only in float rounding: the floor of the "agree" column for any runtime.

Each is timed in ONNX Runtime (CPU, 2 threads, default graph optimizations) and in OpenVINO (CPU,
2 inference threads, static shapes) at batch 1 and batch 32: warm-up, then the median of
interleaved rounds (every model once per round, so a busy machine slows all of them alike; at
batch 1 a round's figure is the median of a burst of runs), with the spread (the middle half of
the rounds; a spread above 10% of its median is flagged under the table).
Top-1 is on the other 436 images; "agree" is top-1 agreement with lowbit's own simulation of the
same model (with --agree: the simulation is slow, so it is off by default). The graph ORT
actually runs is saved
(`SessionOptions.optimized_model_filepath`) and its integer convolutions and residual Adds
(QLinearAdd) counted. The CPU (model
name and VNNI / AMX flags) is printed with the table.

    .venv/bin/python benchmarks/onnx_runtime.py [--data DIR] [--rounds N] [--eval-limit N]
                                                [--agree] [--float64-control] [--no-openvino]
                                                [--presets NAME ...] [--ort-static NAME ...]

Prints markdown tables and writes benchmarks/results/onnx_runtime.json.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lowbit import presets
from lowbit.config import QuantConfig
from lowbit.export import export_onnx
from lowbit.workflows.quantization import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficientnet_lite0 import load_model
from imagenet_sample import calib_eval_split, find_data_dir
from machine import cpu_description, describe

N_CALIB = 64
BATCH = 32
BURST = 20  # batch-1 runs per model and round
WIDE_SPREAD = 0.10  # a spread above this fraction of its median is flagged
THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results" / "onnx_runtime.json"
INT8_CONVS = ("QLinearConv", "ConvInteger")
FLOAT_CONVS = ("Conv", "FusedConv", "NchwcConv")
INT8_ADDS, FLOAT_ADDS = ("QLinearAdd",), ("Add",)
Runner = Callable[[np.ndarray], np.ndarray]

# Every preset whose export has integer activations, with its defaults, and the variants that
# show what each default buys.
CONFIGS: dict[str, Callable[[], QuantConfig]] = {
    "int8()": presets.int8,
    "int8(fusable_outputs=False)": lambda: presets.int8(fusable_outputs=False),
    "int8_asymmetric()": presets.int8_asymmetric,
    "int8_asymmetric(fusable_outputs=False)": lambda: presets.int8_asymmetric(
        fusable_outputs=False
    ),
    "w4a8(None)": lambda: presets.w4a8(None),
}
ORT, OPENVINO = "onnxruntime", "openvino"
# (config, export target, the runtimes that run that file)
EXPORTS: list[tuple[str, str, tuple[str, ...]]] = [
    ("int8()", "onnxruntime", (ORT, OPENVINO)),
    ("int8()", "tensorrt", (ORT,)),  # TensorRT's int8 form, as ORT runs it
    ("int8()", "openvino", (OPENVINO,)),
    ("int8(fusable_outputs=False)", "onnxruntime", (ORT,)),
    ("int8_asymmetric()", "onnxruntime", (ORT,)),
    ("int8_asymmetric()", "openvino", (OPENVINO,)),
    ("int8_asymmetric(fusable_outputs=False)", "onnxruntime", (ORT,)),
    ("w4a8(None)", "onnxruntime", (ORT,)),  # INT4 weights: float convs in ORT
]
# ORT's quantize_static runs by row name: (calibration method, symmetric activations). The
# symmetric row is the peer of int8(): uint8 codes around 128, as its export for ORT writes.
ORT_STATIC = {
    "MinMax": ("MinMax", False),
    "Percentile": ("Percentile", False),
    "MinMax symmetric": ("MinMax", True),
}


@dataclass
class Row:
    name: str
    runtime: str
    file_mb: float = 0.0
    top1: float | None = None
    agree: float | None = None
    ms_b1: float | None = None
    spread_b1: float | None = None  # interquartile range of the rounds' batch-1 medians, ms
    ms_b32: float | None = None
    spread_b32: float | None = None  # interquartile range of the batch-32 rounds, ms
    int8_convs: str = ""
    int8_adds: str = ""  # residual Adds (of two activations) ORT runs as QLinearAdd
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


def ort_quantize_static(
    fp32_path: Path, calib: Tensor, path: Path, method: str, symmetric: bool
) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": b.numpy()} for b in calib.split(BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    # ORT's documented flow: pre-process (shape inference, graph optimization) first.
    prepared = path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(
        str(prepared),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options={"ActivationSymmetric": symmetric},
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


def ort_runner(path: Path) -> Runner:
    sess = session(path)
    return lambda x: sess.run(None, {"input": x})[0]


def openvino_runner(path: Path, sample_shape: tuple[int, ...]) -> Runner:
    """OpenVINO on the CPU, compiled for batch 1 and batch 32 (static shapes, its fast case),
    f32 where not quantized (AMX CPUs would otherwise run the float parts in bf16)."""
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": THREADS, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = {}
    for batch in (1, BATCH):
        model = core.read_model(str(path))
        model.reshape([batch, *sample_shape])
        compiled[batch] = core.compile_model(model, "CPU", config)

    def run(x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n not in compiled:  # a last, partial batch: pad it to the compiled size
            x = np.concatenate([x, np.repeat(x[-1:], BATCH - n, axis=0)])
        return np.asarray(compiled[len(x)](x)[0])[:n]

    return run


def predict(run: Runner, x: Tensor) -> Tensor:
    return torch.from_numpy(np.concatenate([run(b.numpy()) for b in x.split(BATCH)]))


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
    """Op counts of the graph ORT runs; an Add of a constant (a bias) counts as "Add(constant)",
    so "Add" counts the Adds of two activations (residual Adds)."""
    import onnx

    out = tmp / f"{path.stem}.optimized.onnx"
    session(path, out)
    graph = onnx.load(str(out)).graph
    constants = {t.name for t in graph.initializer}

    def kind(node: Any) -> str:
        constant = node.op_type == "Add" and any(i in constants for i in node.input)
        return "Add(constant)" if constant else node.op_type

    return dict(Counter(kind(n) for n in graph.node))


def time_models(
    runners: dict[str, Runner], x: Tensor, rounds: int, burst: int = BURST
) -> dict[str, list[float]]:
    """[median ms, interquartile range ms] at batch 1 and at batch 32 per model, the models
    interleaved round by round after a warm-up.

    A batch-1 run is a few ms, less than the noise of one timing: each round times a burst of
    `burst` runs per model and keeps their median, after two untimed runs that absorb the cost of
    switching sessions (ORT's previous thread pool still spinning, cold caches)."""
    b1, b32 = x[:1].numpy(), x[:BATCH].numpy()
    for run in runners.values():
        for _ in range(3):
            run(b1)
        run(b32)
    t1: dict[str, list[float]] = {k: [] for k in runners}
    t32: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            run(b1)
            run(b1)
            times = []
            for _ in range(burst):
                t0 = time.perf_counter()
                run(b1)
                times.append(1e3 * (time.perf_counter() - t0))
            t1[name].append(statistics.median(times))
            t0 = time.perf_counter()
            run(b32)
            t32[name].append(1e3 * (time.perf_counter() - t0))
    return {
        k: [statistics.median(t1[k]), _iqr(t1[k]), statistics.median(t32[k]), _iqr(t32[k])]
        for k in runners
    }


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def wide_spreads(rows: list[Row]) -> list[str]:
    """One line per timing whose spread exceeds WIDE_SPREAD of its median: that figure cannot
    separate models closer than its spread."""
    out = []
    for r in rows:
        for batch, ms, spread in ((1, r.ms_b1, r.spread_b1), (BATCH, r.ms_b32, r.spread_b32)):
            if ms and spread is not None and spread > WIDE_SPREAD * ms:
                out.append(f"{r.name}, batch {batch}: spread {spread:.1f} ms of {ms:.1f} ms")
    return out


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    """Markdown; the agreement column only when measured (--agree)."""
    agree = any(r.agree is not None for r in rows)
    head = ["model", "file MB", "top-1 %", "ms batch 1 (spread)", "ms batch 32 (spread)"]
    head.append("int8 convs")
    head.append("int8 adds")
    head[3:3] = ["agree w/ lowbit sim %"] if agree else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, f"{r.file_mb:.1f}", fmt(None if r.top1 is None else 100 * r.top1)]
        cells += [fmt(None if r.agree is None else 100 * r.agree)] if agree else []
        cells += [f"{fmt(r.ms_b1, '.1f')} ({fmt(r.spread_b1, '.1f')})"]
        cells += [f"{fmt(r.ms_b32, '.0f')} ({fmt(r.spread_b32, '.0f')})"]
        cells += [r.int8_convs or "-", r.int8_adds or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def export_lowbit(
    fp32: nn.Module,
    calib: Tensor,
    evals: Tensor | None,
    tmp: Path,
    log: Callable[[str], None],
    configs: list[str],
) -> tuple[dict[str, Path], dict[str, Tensor], nn.Module | None]:
    """Quantize with each of `configs`, export each (config, target): the files, keyed by row
    name, each config's simulated logits on `evals` (if given), and the int8_asymmetric() model
    (None if not among them)."""
    paths: dict[str, Path] = {}
    sims: dict[str, Tensor] = {}
    asym: nn.Module | None = None
    for config_name in configs:
        make = CONFIGS[config_name]
        qmodel = quantize(fp32, make(), list(calib.split(BATCH)), progress=False)
        if evals is not None:
            sims[config_name] = simulate(qmodel, evals)
        asym = qmodel if config_name == "int8_asymmetric()" else asym
        for i, (name, target, _) in enumerate(e for e in EXPORTS if e[0] == config_name):
            paths[row_name(name, target)] = export_onnx(
                qmodel, calib[:1], tmp / f"{len(paths)}_{i}.onnx", target=target
            )
        log(f"quantized and exported {config_name}")
    return paths, sims, asym


def row_name(config: str, target: str) -> str:
    return f"lowbit {config}, target={target}"


def measure(
    runtime: str,
    paths: dict[str, Path],
    sims: dict[str, Tensor],
    split: Any,
    rounds: int,
    tmp: Path,
) -> list[Row]:
    """Top-1, agreement and interleaved timings of the files `runtime` runs."""
    names = ["fp32"] + [row_name(c, t) for c, t, rt in EXPORTS if runtime in rt]
    names += [f"ort quantize_static {m}" for m in ORT_STATIC]
    names = [n for n in names if n in paths]  # the rows --presets / --ort-static left out
    runners: dict[str, Runner] = {}
    rows: list[Row] = []
    for name in names:
        path = paths[name]
        if runtime == ORT:
            runners[name] = ort_runner(path)
        else:
            runners[name] = openvino_runner(path, tuple(split.evals.shape[1:]))
        row = Row(name, runtime, path.stat().st_size / 1e6)
        pred = predict(runners[name], split.evals).argmax(1)
        row.top1 = (pred == split.labels).float().mean().item()
        config = name.removeprefix("lowbit ").split(", target=")[0]
        if config in sims:
            row.agree = (pred == sims[config].argmax(1)).float().mean().item()
        if runtime == ORT:
            row.optimized_ops = optimized_ops(path, tmp)
            n_int = sum(row.optimized_ops.get(k, 0) for k in INT8_CONVS)
            n_all = n_int + sum(row.optimized_ops.get(k, 0) for k in FLOAT_CONVS)
            row.int8_convs = f"{n_int}/{n_all}"
            row.int8_adds = _fraction(row.optimized_ops, INT8_ADDS, FLOAT_ADDS)
        rows.append(row)
    timings = time_models(runners, split.evals, rounds)
    for row in rows:
        row.ms_b1, row.spread_b1, row.ms_b32, row.spread_b32 = timings[row.name]
    return rows


def _fraction(ops: dict[str, int], integer: tuple[str, ...], floating: tuple[str, ...]) -> str:
    """ "9/9": the integer ops of a kind out of all of that kind in ORT's optimized graph. The
    float count includes any Add that is not between activations (a bias after an integer
    product), so it is an upper bound on the residual Adds left in float."""
    n_int = sum(ops.get(k, 0) for k in integer)
    return f"{n_int}/{n_int + sum(ops.get(k, 0) for k in floating)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="imagenet-sample folder")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds")
    parser.add_argument("--eval-limit", type=int, default=None, help="smoke runs: fewer images")
    parser.add_argument("--agree", action="store_true", help="agreement with the simulation")
    parser.add_argument("--float64-control", action="store_true", help="see the docstring")
    parser.add_argument("--no-openvino", action="store_true", help="ONNX Runtime only")
    parser.add_argument("--presets", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument(
        "--ort-static", nargs="+", choices=list(ORT_STATIC), default=list(ORT_STATIC)
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.float64_control and "int8_asymmetric()" not in args.presets:
        parser.error("--float64-control needs int8_asymmetric() among --presets")
    data_dir = find_data_dir(args.data, "onnx_runtime benchmark")
    if data_dir is None:
        return 0
    torch.set_num_threads(THREADS)
    start = time.perf_counter()

    def log(what: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f}s] {what}", flush=True)

    split = calib_eval_split(data_dir, N_CALIB, args.eval_limit)
    calib = split.calib
    cpu = cpu_description()
    print(f"CPU: {cpu}")
    print(f"calibrate on {len(calib)} images, evaluate on {len(split.evals)}; {THREADS} threads")
    runtimes = [ORT] if args.no_openvino else [ORT, OPENVINO]
    fp32 = load_model()
    rows: list[Row] = []
    control: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        agree = args.agree or args.float64_control
        evals = split.evals if agree else None
        paths, sims, asym = export_lowbit(fp32, calib, evals, tmp, log, args.presets)
        if args.float64_control and asym is not None:
            control = float64_control(asym, split.evals, sims["int8_asymmetric()"])
        paths["fp32"] = tmp / "fp32.onnx"
        export_fp32(fp32, calib[:1], paths["fp32"])
        for name in args.ort_static:
            method, symmetric = ORT_STATIC[name]
            path = tmp / f"ort_static_{name.replace(' ', '_')}.onnx"
            paths[f"ort quantize_static {name}"] = path
            ort_quantize_static(paths["fp32"], calib, path, method, symmetric)
        log("ORT quantize_static")
        for runtime in runtimes:
            rows += measure(runtime, paths, sims, split, args.rounds, tmp)
            log(f"measured in {runtime}")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\nCPU: {cpu}; load average {load}; median of {args.rounds} interleaved rounds")
    for runtime in runtimes:
        print(f"\n{runtime} ({THREADS} threads), EfficientNet-Lite0:\n")
        print(table([r for r in rows if r.runtime == runtime]))
        for warning in wide_spreads([r for r in rows if r.runtime == runtime]):
            print(f"warning: {warning}")
    if control is not None:
        print(
            f"\ncontrol: lowbit's float64 simulation vs its float32 one (int8_asymmetric): "
            f"top-1 agreement {100 * control['agree']:.2f}%, max |logit difference| "
            f"{control['max']:.3f}"
        )
    meta = {
        "model": "efficientnet-lite0",
        **describe(),
        "n_calib": N_CALIB,
        "n_eval": len(split.evals),
        "threads": THREADS,
        "timing": f"median of {args.rounds} interleaved rounds (per round: the median of a "
        f"burst of {BURST} runs at batch 1, one run at batch 32)",
        "onnxruntime": __import__("onnxruntime").__version__,
        "openvino": None if args.no_openvino else __import__("openvino").__version__,
        "torch": torch.__version__,
        "load_average_1min": load,
        "total_s": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "rows": [asdict(r) for r in rows], "float64_control": control}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{time.perf_counter() - start:.0f} s in all; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
