"""OpenVINO against NNCF on its own runtime: EfficientNet-Lite0 and all-MiniLM-L6-v2.

(Not named openvino.py: a script's folder comes first on sys.path, so `import openvino` would
import the script itself.)

Every model is OpenVINO IR, run by OpenVINO on the CPU (2 inference threads, one stream, static
shapes, float parts in f32: on AMX CPUs OpenVINO would otherwise run them in bf16):
- FP32 IR: `openvino.convert_model` of the float model's ONNX export;
- NNCF: `nncf.quantize` of that FP32 IR on the same calibration data, with its default preset
  (and for MiniLM also `model_type=nncf.ModelType.TRANSFORMER`, its transformer preset);
- lowbit: `lowbit.export_openvino` of each int8 preset (`quantize` on the same data).

EfficientNet-Lite0: calibrate on the first 64 images of the ImageNet sample (sorted file order),
top-1 on the other 436, latency at batch 1 and 32. MiniLM: calibrate on the first sentences of
STS-B train, Spearman (x100) of the embeddings' cosine against the gold scores on STS-B dev,
latency at batch 32 x 128 tokens (every sentence padded to 128 tokens). Latency: warm-up, then
the median of interleaved rounds (every model once per round, so a busy machine slows all alike)
with the spread (the middle half of the rounds). "int8 ops" counts the convolutions / matmuls
OpenVINO's compiled model runs in int8 (its runtime precision), out of all of them. The CPU is
printed with the tables.

    .venv/bin/python benchmarks/openvino_nncf.py [--data DIR] [--stsb DIR] [--rounds N]
        [--eval-limit N] [--pairs N] [--only effnet|minilm]

Prints markdown tables and writes benchmarks/results/openvino_nncf.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lowbit import export_openvino, presets
from lowbit.config import QuantConfig
from lowbit.workflows.quantization import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
import onnx_runtime as ort_bench
from efficientnet_lite0 import load_model
from imagenet_sample import calib_eval_split, find_data_dir
from machine import cpu_description, describe
from minilm_common import load as load_minilm
from minilm_embeddings import read_pairs, stsb_dir

THREADS, BATCH, SEQ = 2, 32, 128
N_CALIB_IMAGES, N_CALIB_SENTENCES = 64, 256
RESULTS = Path(__file__).resolve().parent / "results" / "openvino_nncf.json"
OV_CONFIG = {"INFERENCE_NUM_THREADS": THREADS, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}
INT8_PRECISIONS = ("I8", "U8")
# lowbit's int8 presets, with their defaults
LOWBIT: dict[str, Callable[[], QuantConfig]] = {
    "int8()": presets.int8,
    "int8_asymmetric()": presets.int8_asymmetric,
}
Runner = Callable[[Any], np.ndarray]


@dataclass
class Row:
    model: str
    name: str
    file_mb: float
    metric: float | None = None  # top-1 % (EfficientNet) or STS-B dev Spearman x100 (MiniLM)
    ms_b1: float | None = None
    ms_b32: float | None = None
    spread_b32: float | None = None
    int8_ops: str = ""


def ir_size_mb(xml: Path) -> float:
    return (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 1e6


def onnx_to_ir(onnx_path: Path, xml: Path) -> Path:
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


def torch_to_ir(model: nn.Module, example: dict[str, Tensor], xml: Path) -> Path:
    """The float model through OpenVINO's own PyTorch frontend, as NNCF's documentation does."""
    import openvino as ov

    with torch.no_grad():
        converted = ov.convert_model(model, example_input=example)
    ov.save_model(converted, str(xml), compress_to_fp16=False)
    return xml


def nncf_quantize(fp32_xml: Path, calib: list[Any], xml: Path, transformer: bool) -> Path:
    """NNCF's post-training quantization of the FP32 IR, its default settings (or its
    transformer preset), on the calibration batches as they are."""
    import nncf
    import openvino as ov

    extra = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    model = ov.Core().read_model(str(fp32_xml))
    quantized = nncf.quantize(model, nncf.Dataset(calib), subset_size=len(calib), **extra)
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return xml


def compile_static(xml: Path, shape: list[int]) -> Any:
    """Compiled with every input fixed to `shape` (OpenVINO's fast case)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(xml))
    model.reshape({port.get_any_name(): shape for port in model.inputs})
    return core.compile_model(model, "CPU", OV_CONFIG)


def int8_ops(compiled: Any) -> str:
    """ "n/m": the convolutions and matmuls OpenVINO runs in int8, out of all of them."""
    kinds, n_int = 0, 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) not in ("Convolution", "FullyConnected", "MatMul"):
            continue
        kinds += 1
        n_int += info["runtimePrecision"].astype(str).upper() in INT8_PRECISIONS
    return f"{n_int}/{kinds}"


def interleaved(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, tuple[float, float]]:
    """(median ms, interquartile range ms) of each run, interleaved round by round."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {k: (statistics.median(v), ort_bench._iqr(v)) for k, v in times.items()}


# -- EfficientNet-Lite0 ---------------------------------------------------------------------


def effnet_rows(split: Any, tmp: Path, rounds: int, log: Callable[[str], None]) -> list[Row]:
    fp32 = load_model()
    calib = split.calib
    paths: dict[str, Path] = {}
    onnx_fp32 = tmp / "effnet_fp32.onnx"
    ort_bench.export_fp32(fp32, calib[:1], onnx_fp32)
    paths["FP32 IR"] = onnx_to_ir(onnx_fp32, tmp / "effnet_fp32.xml")
    batches = [b.numpy() for b in calib.split(BATCH)]
    paths["NNCF nncf.quantize (default)"] = nncf_quantize(
        paths["FP32 IR"], batches, tmp / "effnet_nncf.xml", transformer=False
    )
    log("EfficientNet-Lite0: FP32 IR and NNCF")
    for name, make in LOWBIT.items():
        qmodel = quantize(fp32, make(), list(calib.split(BATCH)), progress=False)
        xml = tmp / f"effnet_{name.strip('()')}.xml"
        paths[f"lowbit {name}"] = export_openvino(qmodel, calib[:1], xml)
        log(f"EfficientNet-Lite0: lowbit {name}")
    sample_shape = tuple(split.evals.shape[1:])
    runners = {k: ort_bench.openvino_runner(p, sample_shape) for k, p in paths.items()}
    rows = []
    for name, path in paths.items():
        pred = ort_bench.predict(runners[name], split.evals).argmax(1)
        top1 = 100 * (pred == split.labels).float().mean().item()
        ops = int8_ops(compile_static(path, [1, *sample_shape]))
        rows.append(Row("EfficientNet-Lite0", name, ir_size_mb(path), top1, int8_ops=ops))
    log("EfficientNet-Lite0: top-1")
    timings = ort_bench.time_models(runners, split.evals, rounds)
    for row in rows:
        row.ms_b1, row.ms_b32, row.spread_b32 = timings[row.name]
    return rows


# -- all-MiniLM-L6-v2 -----------------------------------------------------------------------


def tokenize(tokenizer: Any, sentences: list[str]) -> list[dict[str, Tensor]]:
    """Batches of BATCH sentences, each padded (or cut) to SEQ tokens."""
    return [
        dict(
            tokenizer(
                sentences[i : i + BATCH],
                padding="max_length",
                truncation=True,
                max_length=SEQ,
                return_tensors="pt",
            )
        )
        for i in range(0, len(sentences), BATCH)
    ]


def as_numpy(batch: dict[str, Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in batch.items()}


def minilm_runner(xml: Path) -> Runner:
    """Last hidden state of a batch, compiled for BATCH x SEQ (a partial batch is padded)."""
    compiled = compile_static(xml, [BATCH, SEQ])

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        n = len(batch["input_ids"])
        feed = {
            port.get_any_name(): np.resize(batch[port.get_any_name()], (BATCH, SEQ))
            for port in compiled.inputs
        }
        return np.asarray(compiled(feed)[compiled.outputs[0]])[:n]  # last_hidden_state

    return run


def sentence_embeddings(run: Runner, batches: list[dict[str, Tensor]]) -> np.ndarray:
    """Mean over the attention mask, L2-normalised, as sentence-transformers does."""
    out = []
    for batch in batches:
        hidden = run(as_numpy(batch))
        mask = batch["attention_mask"].numpy()[..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def spearman(
    run: Runner, first: list[dict[str, Tensor]], second: list[dict[str, Tensor]], gold: Tensor
) -> float:
    from scipy.stats import spearmanr

    cosine = (sentence_embeddings(run, first) * sentence_embeddings(run, second)).sum(1)
    return 100 * float(spearmanr(cosine, gold.numpy()).statistic)


def read_train_sentences(folder: Path, n: int) -> list[str]:
    with open(folder / "stsb-en-train.csv", newline="") as f:
        rows = list(csv.reader(f))
    return [sentence for row in rows for sentence in row[:2]][:n]


def minilm_rows(
    folder: Path, n_pairs: int | None, tmp: Path, rounds: int, log: Callable[[str], None]
) -> list[Row]:
    model, tokenizer = load_minilm()
    calib = tokenize(tokenizer, read_train_sentences(folder, N_CALIB_SENTENCES))
    first, second, gold = read_pairs(folder)
    first, second, gold = first[:n_pairs], second[:n_pairs], gold[:n_pairs]
    evals = (tokenize(tokenizer, first), tokenize(tokenizer, second))
    paths: dict[str, Path] = {}
    paths["FP32 IR"] = torch_to_ir(model, calib[0], tmp / "minilm_fp32.xml")
    numpy_calib = [as_numpy(b) for b in calib]
    for name, transformer in (("default", False), ("model_type=TRANSFORMER", True)):
        xml = tmp / f"minilm_nncf_{transformer}.xml"
        paths[f"NNCF nncf.quantize ({name})"] = nncf_quantize(
            paths["FP32 IR"], numpy_calib, xml, transformer
        )
    log("MiniLM: FP32 IR and NNCF")
    for name, make in {**LOWBIT, "int8_transformer()": presets.int8_transformer}.items():
        qmodel = quantize(model, make(), calib, progress=False)
        xml = tmp / f"minilm_{name.strip('()')}.xml"
        paths[f"lowbit {name}"] = export_openvino(qmodel, calib[0], xml)
        log(f"MiniLM: lowbit {name}")
    runners = {k: minilm_runner(p) for k, p in paths.items()}
    rows = []
    for name, path in paths.items():
        score = spearman(runners[name], *evals, gold)
        ops = int8_ops(compile_static(path, [BATCH, SEQ]))
        rows.append(Row("all-MiniLM-L6-v2", name, ir_size_mb(path), score, int8_ops=ops))
    log("MiniLM: STS-B dev")
    batch = as_numpy(evals[0][0])
    timings = interleaved({k: (lambda run=run: run(batch)) for k, run in runners.items()}, rounds)
    for row in rows:
        row.ms_b32, row.spread_b32 = timings[row.name]
    return rows


def table(rows: list[Row], metric: str) -> str:
    head = ["model", "IR MB", metric, "ms batch 1", "ms batch 32 (spread)", "int8 ops"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, f"{r.file_mb:.1f}", ort_bench.fmt(r.metric), ort_bench.fmt(r.ms_b1, ".1f")]
        cells += [
            f"{ort_bench.fmt(r.ms_b32, '.1f')} ({ort_bench.fmt(r.spread_b32, '.1f')})",
            r.int8_ops,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="imagenet-sample folder")
    parser.add_argument("--stsb", type=Path, default=None, help="folder of stsb-en-*.csv")
    parser.add_argument("--rounds", type=int, default=11, help="timing rounds")
    parser.add_argument("--eval-limit", type=int, default=None, help="smoke runs: fewer images")
    parser.add_argument("--pairs", type=int, default=None, help="smoke runs: fewer STS pairs")
    parser.add_argument("--only", choices=("effnet", "minilm"), default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    start = time.perf_counter()

    def log(what: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f}s] {what}", flush=True)

    cpu = cpu_description()
    print(f"CPU: {cpu}; OpenVINO {THREADS} threads, f32 float parts")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        data_dir = find_data_dir(args.data, "EfficientNet-Lite0") if args.only != "minilm" else None
        if data_dir is not None:
            split = calib_eval_split(data_dir, N_CALIB_IMAGES, args.eval_limit)
            rows += effnet_rows(split, tmp, args.rounds, log)
        folder = stsb_dir(args.stsb) if args.only != "effnet" else None
        if folder is not None:
            rows += minilm_rows(folder, args.pairs, tmp, args.rounds, log)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\nCPU: {cpu}; load average {load}; median of {args.rounds} interleaved rounds")
    for model, metric in (
        ("EfficientNet-Lite0", "top-1 %"),
        ("all-MiniLM-L6-v2", "STS-B dev Spearman"),
    ):
        if any(r.model == model for r in rows):
            print(f"\n{model} in OpenVINO ({THREADS} threads):\n")
            print(table([r for r in rows if r.model == model], metric))
    import nncf
    import openvino as ov

    meta = {
        **describe(),
        "threads": THREADS,
        "timing": f"median of {args.rounds} interleaved rounds",
        "openvino": ov.__version__,
        "nncf": nncf.__version__,
        "torch": torch.__version__,
        "load_average_1min": load,
        "eval_limit": args.eval_limit,
        "pairs": args.pairs,
        "total_s": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\n{time.perf_counter() - start:.0f} s in all; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
