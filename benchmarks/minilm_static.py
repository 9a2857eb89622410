"""all-MiniLM-L6-v2 static W8A8: lowbit `presets.int8_transformer()` against FP32 and against
ONNX Runtime's own `quantize_static`, on the STS benchmark.

Calibration: the first --calib sentences of STS-B train (both columns). Quality: Spearman x100
of the cosine similarity of the two sentence embeddings against the gold scores, on all 1,500
pairs of STS-B dev. Embedding: attention-masked mean pooling of the last hidden state,
L2-normalised (as sentence-transformers does for this model), computed inside the exported graph.
Rows: FP32 (torch and ORT), lowbit int8_transformer (its simulation in torch, its QDQ export in
ORT), ORT quantize_static MinMax (per-channel int8 weights, uint8 activations, after ORT's
quant_pre_process, its documented flow). Latency: ORT, batch 32 x 128 tokens, median of
interleaved rounds after a warm-up, --threads intra-op threads for every model.

The STS-B folder comes from --stsb, else LOWBIT_STSB, else ../shared/data/stsb beside the
repository.

    pip install -e '.[bench]'
    python benchmarks/minilm_static.py   # markdown table; writes results/minilm_static.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import describe, describe_line
from minilm_common import embed, load
from scipy.stats import spearmanr
from torch import Tensor, nn

import lowbit
from lowbit.export import export_onnx

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "minilm_static.json"
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
EVAL_BATCH, CALIB_BATCH, TIMED_BATCH, TOKENS = 64, 32, 32, 128
Batch = dict[str, Tensor]
Embedder = Callable[[Batch], Tensor]


class SentenceEncoder(nn.Module):
    """Tokens in, normalised sentence embeddings out: the pooling runs in the exported graph."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        }
        return embed(self.bert, batch)


def stsb(folder: Path, split: str) -> list[list[str]]:
    with open(folder / f"stsb-en-{split}.csv", newline="") as f:
        return list(csv.reader(f))


def tokenize(tokenizer: Any, sentences: list[str], size: int, **kwargs: Any) -> list[Batch]:
    return [
        {k: v for k, v in tokenizer(sentences[i : i + size], return_tensors="pt", **kwargs).items()}
        for i in range(0, len(sentences), size)
    ]


def torch_embedder(model: nn.Module) -> Embedder:
    def run(batch: Batch) -> Tensor:
        with torch.no_grad():
            return model(**batch)

    return run


def ort_session(path: Path, threads: int, optimized_to: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized_to is not None:
        options.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_embedder(path: Path, threads: int) -> Embedder:
    session = ort_session(path, threads)

    def run(batch: Batch) -> Tensor:
        return torch.from_numpy(session.run(None, {k: batch[k].numpy() for k in INPUTS})[0])

    return run


def spearman(run: Embedder, pairs: tuple[list[Batch], list[Batch], list[float]]) -> float:
    first, second, gold = pairs
    a = torch.cat([run(b) for b in first])
    b = torch.cat([run(b) for b in second])
    return 100 * float(spearmanr((a * b).sum(1).numpy(), gold).statistic)


def export_fp32(model: nn.Module, example: Batch, path: Path) -> None:
    axes = {k: {0: "batch", 1: "sequence"} for k in INPUTS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(example[k] for k in INPUTS),
            str(path),
            opset_version=17,
            dynamo=False,
            input_names=INPUTS,
            output_names=["embedding"],
            dynamic_axes={**axes, "embedding": {0: "batch"}},
        )


def ort_quantize_static(fp32: Path, calib: list[Batch], path: Path) -> None:
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
            self.batches = iter([{k: b[k].numpy() for k in INPUTS} for b in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared = path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def integer_matmuls(path: Path, threads: int, tmp: Path) -> str:
    """How many of the MatMuls ORT runs are integer ones, in the graph it optimizes."""
    import onnx

    out = tmp / f"{path.stem}.optimized.onnx"
    ort_session(path, threads, out)
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    integer = sum(ops[k] for k in ("QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat"))
    return f"{integer}/{integer + ops['MatMul'] + ops['FusedMatMul']}"


def time_models(runs: dict[str, Embedder], batch: Batch, rounds: int) -> dict[str, float]:
    """Median ms per batch, the models interleaved round by round after a warm-up."""
    for run in runs.values():
        run(batch)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(batch)
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stsb", type=Path, help="folder holding stsb-en-{train,dev}.csv")
    parser.add_argument("--calib", type=int, default=256, help="calibration sentences")
    parser.add_argument("--pairs", type=int, default=1500, help="dev pairs scored (all: 1500)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(describe_line())
    folder = args.stsb or Path(os.environ.get("LOWBIT_STSB", REPO_ROOT.parent / "shared/data/stsb"))
    bert, tokenizer = load()
    model = SentenceEncoder(bert).eval()
    train = [s for row in stsb(folder, "train") for s in row[:2]][: args.calib]
    dev = stsb(folder, "dev")[: args.pairs]
    calib = tokenize(tokenizer, train, CALIB_BATCH, padding=True, truncation=True)
    pairs = (
        tokenize(tokenizer, [r[0] for r in dev], EVAL_BATCH, padding=True, truncation=True),
        tokenize(tokenizer, [r[1] for r in dev], EVAL_BATCH, padding=True, truncation=True),
        [float(r[2]) for r in dev],
    )
    timed = tokenize(
        tokenizer, train[:TIMED_BATCH], TIMED_BATCH, padding="max_length", max_length=TOKENS
    )[0]
    t0 = time.perf_counter()
    config = lowbit.presets.int8_transformer()
    qmodel = lowbit.quantize(model, config, calib, forward=lambda m, b: m(**b), progress=False)
    quantize_s = time.perf_counter() - t0
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = {
            "FP32": tmp / "fp32.onnx",
            "lowbit int8_transformer": tmp / "lowbit.onnx",
            "ORT quantize_static MinMax": tmp / "ort_minmax.onnx",
        }
        export_fp32(model, calib[0], paths["FP32"])
        export_onnx(qmodel, calib[0], paths["lowbit int8_transformer"])
        ort_quantize_static(paths["FP32"], calib, paths["ORT quantize_static MinMax"])
        runs = {name: ort_embedder(path, args.threads) for name, path in paths.items()}
        latency = time_models(runs, timed, args.rounds)
        for name, run in runs.items():
            rows[name] = {
                "spearman_ort": spearman(run, pairs),
                "latency_ms": latency[name],
                "integer_matmuls": integer_matmuls(paths[name], args.threads, tmp),
            }
            print(f"  {name}: ORT {rows[name]['spearman_ort']:.2f}", flush=True)
    rows["FP32"]["spearman_torch"] = spearman(torch_embedder(model), pairs)
    rows["lowbit int8_transformer"]["spearman_torch"] = spearman(torch_embedder(qmodel), pairs)
    fp32 = rows["FP32"]["spearman_torch"]
    print(f"\nSTS-B dev ({len(dev)} pairs), {len(train)} calibration sentences (train)")
    print(f"ORT latency: batch {TIMED_BATCH} x {TOKENS} tokens, {args.threads} thread(s)\n")
    print("| model | Spearman (torch) | Spearman (ORT) | drop (ORT) | ms | integer MatMuls |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        sim = f"{r['spearman_torch']:.2f}" if "spearman_torch" in r else ""
        print(
            f"| {name} | {sim} | {r['spearman_ort']:.2f} | {fp32 - r['spearman_ort']:.2f} | "
            f"{r['latency_ms']:.1f} | {r['integer_matmuls']} |"
        )
    print(f"\nlowbit.quantize: {quantize_s:.1f} s\n{qmodel.lowbit_summary}")
    RESULTS.parent.mkdir(exist_ok=True)
    payload = {**describe(), "threads": args.threads, "calib": len(train), "pairs": len(dev)}
    RESULTS.write_text(json.dumps({**payload, "quantize_s": quantize_s, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
