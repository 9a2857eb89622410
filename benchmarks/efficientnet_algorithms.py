"""EfficientNet-Lite0 on the ImageNet sample: PTQ algorithms beyond rounding to nearest.

Calibrates on the first 128 images (sorted file order) and measures top-1 on the other 372:

- W4 (4-bit per-channel weights, float activations, first and last layer at 8 bits):
  rounding to nearest vs AdaRound;
- W4A8 (the same weights, int8 per-tensor inputs): nearest vs AdaRound;
- W4, W4A8 and W4A4 (uint4 affine per-tensor inputs, MSE-calibrated) with block reconstruction
  (`lowbit.brecq`: BRECQ, QDrop p=0.5 where activations are quantized; given the plain config,
  it keeps the first and last layer at 8 bits by default);
- W8A8 (`presets.int8()`): plain, with CLE, with bias correction, with both;
- W8A8 with per-tensor weight scales: plain, with CLE, with CLE and bias correction;
- `auto_quantize(max_drop=1.0)` at W4A8.

    .venv/bin/python benchmarks/efficientnet_algorithms.py [--data DIR] [--only NAME ...]
        [--iterations N] [--brecq-iterations N] [--brecq-batch N]

Prints a markdown table and writes benchmarks/results/efficientnet_algorithms.json, with each
algorithm's run time (2 threads, as the issue's "2 cores").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from lowbit import brecq, presets
from lowbit.algorithms.adaround import adaround
from lowbit.algorithms.bias_correction import bias_correction
from lowbit.algorithms.cle import equalize
from lowbit.config import LayerQuant, QuantConfig
from lowbit.evaluate.mixed_precision import auto_quantize
from lowbit.spec import PerChannel, PerTensor, QuantSpec
from lowbit.workflows.quantization import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficientnet_lite0 import load_model
from imagenet_sample import calib_eval_split, find_data_dir
from machine import describe, describe_line

N_CALIB = 128
BATCH = 32
THREADS = 2
FIRST_LAST = ("_conv_stem", "_fc")
# Each variant is compared image by image with the row it improves on (run that row first).
BASELINE = {
    "w4-adaround": "w4-nearest",
    "w4a8-adaround": "w4a8-nearest",
    "w4-brecq": "w4-nearest",
    "w4a8-qdrop": "w4a8-nearest",
    "w4a4-qdrop": "w4a4-nearest",
    "w8a8-cle": "w8a8",
    "w8a8-bc": "w8a8",
    "w8a8-cle-bc": "w8a8",
    "w8a8-pt-cle": "w8a8-pt",
    "w8a8-pt-bc": "w8a8-pt",
    "w8a8-pt-cle-bc": "w8a8-pt",
}
RESULTS = Path(__file__).resolve().parent / "results" / "efficientnet_algorithms.json"


@dataclass
class Row:
    name: str
    description: str
    top1: float | None = None
    drop: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    # Process CPU time (all threads) of the same steps: on a shared machine wall time grows with
    # the load, CPU time much less (quiet wall time at 2 threads is at least half of it).
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Against the row's baseline (`BASELINE`): images now right / now wrong / predicted otherwise.
    vs_baseline: dict[str, int] = field(default_factory=dict)


def batches(x: Tensor, size: int = BATCH) -> list[Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def predict(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b) for b in batches(x)]).argmax(1)


def compare(pred: Tensor, base: Tensor, labels: Tensor) -> dict[str, int]:
    """Images a variant gets right that its baseline got wrong, the reverse, and all changes."""
    right, base_right = pred == labels, base == labels
    return {
        "better": int((right & ~base_right).sum()),
        "worse": int((~right & base_right).sum()),
        "differ": int((pred != base).sum()),
    }


A8 = QuantSpec(bits=8, narrow_range=True)
A4 = QuantSpec(bits=4, signed=False, symmetric=False)


def w4_config(act: QuantSpec | None, first_last: bool = True) -> QuantConfig:
    """4-bit per-channel weights and `act` inputs (None: float); the first and last layer at 8
    bits (weights and inputs) if `first_last`. 4-bit inputs take MSE-calibrated ranges."""
    w8 = QuantSpec(bits=8, narrow_range=True, granularity=PerChannel(0))
    a8 = None if act is None else A8
    return QuantConfig(
        weight=QuantSpec(bits=4, granularity=PerChannel(0)),
        input=act,
        calibrator="mse" if act is not None and act.bits < 8 else "minmax",
        overrides={name: LayerQuant(weight=w8, input=a8) for name in FIRST_LAST}
        if first_last
        else {},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="imagenet-sample folder")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--eval-limit", type=int, default=None, help="smoke runs: fewer images")
    parser.add_argument("--iterations", type=int, default=None, help="AdaRound iterations")
    parser.add_argument("--brecq-iterations", type=int, default=None, help="BRECQ steps/block")
    parser.add_argument("--brecq-batch", type=int, default=None, help="BRECQ samples per step")
    parser.add_argument(
        "--threads", type=int, default=THREADS, help="1 on a machine busy with other jobs"
    )
    args = parser.parse_args(argv)

    data_dir = find_data_dir(args.data, "efficientnet_algorithms benchmark")
    if data_dir is None:
        return 0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    split = calib_eval_split(data_dir, N_CALIB, args.eval_limit)
    calib = batches(split.calib)
    x_eval, y_eval = split.evals, split.labels
    print(describe_line())
    print(f"calibrate on {N_CALIB} images, evaluate on {len(y_eval)}; {args.threads} threads")
    fp32 = load_model()

    def eval_fn(model: nn.Module) -> float:
        return 100.0 * float((predict(model, x_eval) == y_eval).float().mean())

    rows: list[Row] = []
    fp32_row = Row("fp32", "float model", eval_fn(fp32), 0.0)
    rows.append(fp32_row)
    print(f"fp32: {fp32_row.top1:.2f}%", flush=True)
    ada_kwargs = {} if args.iterations is None else {"iterations": args.iterations}
    brecq_kwargs = {
        k: v
        for k, v in (("iterations", args.brecq_iterations), ("batch_size", args.brecq_batch))
        if v is not None
    }

    def timed(row: Row, what: str, fn: Callable[[], nn.Module]) -> nn.Module:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        row.seconds[what] = round(time.perf_counter() - t0, 1)
        row.cpu_seconds[what] = round(time.process_time() - c0, 1)
        return out

    def w4(row: Row, act: QuantSpec | None, ada: bool) -> nn.Module:
        q = timed(row, "quantize", lambda: quantize(fp32, w4_config(act), calib, progress=False))
        if ada:
            q = timed(row, "adaround", lambda: adaround(q, calib, progress=False, **ada_kwargs))
            report = q.lowbit_adaround  # type: ignore[union-attr]
            better = sum(r.mse_adaround < r.mse_nearest for r in report.layers)
            row.notes.append(
                f"AdaRound {len(report.layers)} layers in {report.seconds:.0f}s "
                f"({sum(r.steps for r in report.layers)} steps); output MSE "
                f"lower than nearest in {better}"
            )
        return q

    def reconstructed(row: Row, act: QuantSpec | None) -> nn.Module:
        """`lowbit.brecq` on the plain config: first / last layer at 8 bits by its default."""
        config = w4_config(act, first_last=False)
        qdrop = 0.0 if act is None else 0.5
        q = timed(
            row,
            "brecq",
            lambda: brecq(fp32, config, calib, qdrop=qdrop, progress=True, **brecq_kwargs),
        )
        report = q.lowbit_brecq  # type: ignore[union-attr]
        print(report, flush=True)
        lower = sum(b.mse_reconstructed < b.mse_nearest for b in report.blocks)
        steps = sum(b.steps for b in report.blocks)
        row.notes.append(
            f"{len(report.blocks)} blocks in {report.seconds:.0f}s ({steps} steps), output MSE "
            f"lower than nearest in {lower}; 8-bit: {', '.join(report.high_precision)}; "
            "s/block: " + ", ".join(f"{b.seconds:.0f}" for b in report.blocks)
        )
        return q

    def w8a8(row: Row, per_tensor: bool, cle: bool, bc: bool) -> nn.Module:
        """`presets.int8()`, or the same with one weight scale per tensor (what CLE is for)."""
        config = presets.int8()
        if per_tensor:
            assert config.weight is not None
            config = replace(config, weight=config.weight.with_(granularity=PerTensor()))
        base = fp32
        if cle:
            base = timed(row, "cle", lambda: equalize(fp32, calib, config=config, progress=False))
            rep = base.lowbit_equalization  # type: ignore[union-attr]
            row.notes.append(
                f"CLE: {len(rep.pairs)} pairs in {rep.iterations} rounds, "
                f"{len(rep.skipped)} skipped"
            )
        q = timed(row, "quantize", lambda: quantize(base, config, calib, progress=False))
        if bc:
            q = timed(row, "bias_correction", lambda: bias_correction(q, calib, progress=False))
            report = q.lowbit_bias_correction  # type: ignore[union-attr]
            row.notes.append(
                f"BC: {len(report.corrected)} of {len(report.layers)} layers corrected, skipped: "
                + ", ".join(f"{c.name} ({c.reason})" for c in report.layers if not c.corrected)
            )
        return q

    def auto(row: Row) -> nn.Module:
        q = timed(
            row,
            "auto_quantize",
            lambda: auto_quantize(
                fp32,
                w4_config(A8),
                calib,
                eval_fn,
                max_drop=1.0,
                progress=False,
            ),
        )
        summary = q.lowbit_auto  # type: ignore[union-attr]
        row.notes.append(
            f"kept {len(summary.kept)}/{summary.quantized_layers} in W8A8: "
            f"{[n for n, _ in summary.kept]}; meets budget: {summary.meets_budget}; steps: "
            + ", ".join(f"{len(s.kept)}->{s.accuracy:.2f}" for s in summary.steps)
        )
        return q

    plan: list[tuple[str, str, Callable[[Row], nn.Module]]] = [
        (
            "w4-nearest",
            "W4 per-channel, float act, first/last W8: nearest",
            lambda r: w4(r, None, False),
        ),
        ("w4-adaround", "same, AdaRound", lambda r: w4(r, None, True)),
        ("w4-brecq", "same, BRECQ (lowbit.brecq, qdrop=0)", lambda r: reconstructed(r, None)),
        (
            "w4a8-nearest",
            "W4 per-channel + A8 per-tensor, first/last W8A8: nearest",
            lambda r: w4(r, A8, False),
        ),
        ("w4a8-adaround", "same, AdaRound", lambda r: w4(r, A8, True)),
        ("w4a8-qdrop", "same, QDrop (lowbit.brecq, qdrop=0.5)", lambda r: reconstructed(r, A8)),
        (
            "w4a4-nearest",
            "W4 per-channel + A4 (uint4 affine, MSE ranges), first/last W8A8: nearest",
            lambda r: w4(r, A4, False),
        ),
        ("w4a4-qdrop", "same, QDrop (lowbit.brecq, qdrop=0.5)", lambda r: reconstructed(r, A4)),
        *(
            (
                "w8a8" + "-pt" * pt + "-cle" * cle + "-bc" * bc,
                "int8()"
                + ", weights PerTensor()" * pt
                + " after CLE" * cle
                + ", + bias correction" * bc,
                lambda r, pt=pt, cle=cle, bc=bc: w8a8(r, pt, cle, bc),
            )
            for pt in (False, True)
            for cle in (False, True)
            for bc in (False, True)
        ),
        ("auto-w4a8", "auto_quantize(max_drop=1.0) at W4A8, nearest", auto),
    ]
    predictions: dict[str, Tensor] = {}
    for name, description, make in plan:
        if args.only and name not in args.only:
            continue
        row = Row(name, description)
        t0 = time.perf_counter()
        try:
            model = make(row)
            pred = predictions[name] = predict(model, x_eval)
            row.top1 = 100.0 * float((pred == y_eval).float().mean())
            row.drop = row.top1 - (fp32_row.top1 or 0.0)
            if BASELINE.get(name) in predictions:
                row.vs_baseline = compare(pred, predictions[BASELINE[name]], y_eval)
        except Exception as error:  # reported in the table, not fatal
            row.notes.append(f"failed: {type(error).__name__}: {error}")
        rows.append(row)
        top = "-" if row.top1 is None else f"{row.top1:.2f}%"
        print(
            f"[{time.perf_counter() - start:5.0f}s] {name}: {top} "
            f"({time.perf_counter() - t0:.0f}s) "
            f"{row.seconds} cpu {row.cpu_seconds} {row.vs_baseline or ''} "
            f"{'; '.join(row.notes)[:400]}",
            flush=True,
        )

    print()
    print(table(rows))
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f}s")
    meta = {
        "model": "efficientnet-lite0",
        "n_calib": N_CALIB,
        "n_eval": len(y_eval),
        "threads": args.threads,
        "torch": torch.__version__,
        **describe(),
        "total_s": round(total, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out_rows = [asdict(r) for r in rows]
    if args.only and args.out.exists():  # a partial run updates its rows in the full results
        new = {r["name"]: r for r in out_rows}
        old = json.loads(args.out.read_text())["rows"]
        out_rows = [new.pop(r["name"], r) for r in old] + list(new.values())
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": out_rows}, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


def table(rows: list[Row]) -> str:
    lines = ["| config | top-1 % | drop pt | time s | notes |", "|---|---|---|---|---|"]
    for r in rows:
        top = "-" if r.top1 is None else f"{r.top1:.2f}"
        drop = "-" if r.drop is None else f"{r.drop:+.2f}"
        secs = ", ".join(f"{k} {v:.0f}" for k, v in r.seconds.items()) or "-"
        lines.append(
            f"| {r.name}: {r.description} | {top} | {drop} | {secs} | {'; '.join(r.notes)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
