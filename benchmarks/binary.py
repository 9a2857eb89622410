"""Binary and ternary layers on bits (issue 20), as ratios measured in the same run.

    .venv/bin/python benchmarks/binary.py [--only kernels digits] [--rounds N] [--threads 1 2]
        [--clock wall|cpu] [--json PATH]   # cpu: this process's CPU time (a loaded machine)
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI .venv/bin/python benchmarks/binary.py --only kernels \
        --json benchmarks/results/binary_vnni.json   # int8 without AMX: a VNNI-only CPU

1. Kernels: Linear 1 x 4096 x 4096 and 64 x 4096 x 4096, and a 3x3 Conv2d 64 -> 64 on 56 x 56
   at batch 8, converted by lowbit: XNOR (binary weights x centred binary inputs, popcounts),
   BWN (binary weights x float inputs), ternary (float, int8 and centred ternary inputs; the
   conv with centred ternary inputs), against FP32 and against lowbit's int8 kernels (the dynamic
   int8 Linear, the static int8 oneDNN conv), at 1 and 2 threads. Goals (the issue): XNOR at 1
   token >= 10x FP32, at 64 tokens >= 4x lowbit's int8.
2. Digits end to end: an XNOR-Net (binary weights and inputs, the first and last layers 8-bit)
   and two ternary networks (ternary weights with int8 inputs, and with centred ternary inputs,
   8-bit ends), trained by lowbit's QAT from an FP32 twin on scikit-learn's digits, converted,
   run on the bit kernels: test accuracy of FP32, simulation and converted model, agreement of
   converted and simulation, file sizes, speed against the FP32 twin.

Candidates are interleaved (benchmarks/kernels.py `interleaved`), medians over rounds. Prints
markdown tables and writes benchmarks/results/binary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lowbit
from lowbit import presets
from lowbit.cli import demo
from lowbit.config import QuantConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import interleaved
from machine import describe, describe_line, kernels_used

RESULTS = Path(__file__).resolve().parent / "results" / "binary.json"
LINEAR_TOKENS = (1, 64)
WIDTH = 4096
BINARY = presets.binary(xnor=True)
XNOR = QuantConfig(weight=BINARY.weight, input=BINARY.input)  # every layer binary
BWN = presets.binary()
TERNARY = presets.ternary()
TERNARY_INT8 = presets.ternary("int8")
# ternary weights x centred per-tensor ternary inputs: popcounts on two planes each
TERNARY_X_TERNARY = QuantConfig(weight=TERNARY.weight, input=presets.ternary("ternary").input)

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*no integer kernel.*")


def _converted(model: nn.Module, config: QuantConfig, calib: list[Tensor]) -> nn.Module:
    return lowbit.convert(lowbit.quantize(model, config, calib, progress=False))


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCK["wall"]


def bench_linear(rounds: int) -> list[dict[str, Any]]:
    rows = []
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(WIDTH, WIDTH)).eval()
    calib = [torch.randn(16, WIDTH)]
    models = {
        "xnor": _converted(layer, XNOR, calib),
        "bwn": _converted(layer, BWN, calib),
        "ternary": _converted(layer, TERNARY, calib),
        "ternary_int8": _converted(layer, TERNARY_INT8, calib),
        "ternary_x_ternary": _converted(layer, TERNARY_X_TERNARY, calib),
        "int8_dynamic": lowbit.quantize_dynamic(layer),
    }
    for m in LINEAR_TOKENS:
        x = torch.randn(m, WIDTH)
        cands = {"fp32": lambda x=x: layer(x)}
        cands.update({name: (lambda x=x, q=q: q(x)) for name, q in models.items()})
        with torch.inference_mode():
            ms = interleaved(cands, rounds, clock=_clock)
        rows.append(_row("linear", [m, WIDTH, WIDTH], ms, models))
    return rows


def bench_conv(rounds: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1)).eval()
    calib = [torch.randn(2, 64, 56, 56)]
    int8 = presets.int8(fusable_outputs=False)
    models = {
        "xnor": _converted(conv, XNOR, calib),
        "ternary_x_ternary": _converted(conv, TERNARY_X_TERNARY, calib),
        "int8_onednn": _converted(conv, int8, calib),
    }
    x = torch.randn(8, 64, 56, 56)
    cands = {"fp32": lambda: conv(x)}
    cands.update({name: (lambda q=q: q(x)) for name, q in models.items()})
    with torch.inference_mode():
        ms = interleaved(cands, max(3, rounds // 3), clock=_clock)
    return [_row("conv3x3", [8, 64, 56, 56], ms, models)]


def _row(bench: str, shape: list[int], ms: dict[str, float], models: dict[str, nn.Module]):
    return {
        "bench": bench,
        "shape": shape,
        "threads": torch.get_num_threads(),
        "ms": ms,
        "kernels": {name: kernels_used(q) for name, q in models.items()},
        "speedup_vs_fp32": {k: ms["fp32"] / v for k, v in ms.items() if k != "fp32"},
        "xnor_vs_int8": ms.get("int8_dynamic", ms.get("int8_onednn", 0.0)) / ms["xnor"],
        "ternary_x_ternary_vs_int8": ms.get("int8_dynamic", ms.get("int8_onednn", 0.0))
        / ms["ternary_x_ternary"],
    }


# --- digits end to end --------------------------------------------------------------------------


class DigitsXnorNet(nn.Module):
    """A small XNOR-Net for 8 x 8 digits: conv (8-bit), two binary convs, a binary Linear, the
    classifier (8-bit); BatchNorm after every layer but the last."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, width), *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 2 * width), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * 4, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def train(model: nn.Module, data: demo.Digits, epochs: int, lr: float, seed: int = 0) -> None:
    """Adam with a cosine schedule, batch 64, cross-entropy."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(data.x_train) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train), generator=g)
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def _file_bytes(model: nn.Module, quantized: bool) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        if quantized:
            lowbit.save(model, path)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path.stat().st_size


def bench_digits(rounds: int, epochs: int) -> list[dict[str, Any]]:
    data = demo.load_digits()
    torch.manual_seed(0)
    fp32 = DigitsXnorNet()
    train(fp32, data, epochs, 3e-3)
    calib = demo.calibration_batches(data)
    rows = []
    networks = (
        ("xnor", BINARY),
        ("ternary_int8", presets.ternary("int8", ends="int8")),
        ("ternary_x_ternary", presets.ternary("ternary", ends="int8")),
    )
    for name, config in networks:
        row = _digits_row(name, config, fp32, data, calib, rounds, epochs)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "summary"}), flush=True)
    return rows


def _digits_row(
    name: str,
    config: QuantConfig,
    fp32: nn.Module,
    data: demo.Digits,
    calib: list[Tensor],
    rounds: int,
    epochs: int,
) -> dict[str, Any]:
    """QAT from the FP32 twin, convert, then accuracy, files and speed of one network."""
    qat = lowbit.prepare_qat(fp32, config, calib, progress=False)
    train(qat, data, epochs, 1e-3, seed=1)
    converted = lowbit.convert(qat)
    one, batch = data.x_test[:1], data.x_test[:256]
    with torch.inference_mode():
        sim_pred = qat(data.x_test).argmax(1)
        int_pred = converted(data.x_test).argmax(1)
        ms = interleaved(
            {
                "fp32_b1": lambda: fp32(one),
                "lowbit_b1": lambda: converted(one),
                "fp32_b256": lambda: fp32(batch),
                "lowbit_b256": lambda: converted(batch),
            },
            rounds,
            clock=_clock,
        )
    return {
        "bench": "digits",
        "network": name,
        "threads": torch.get_num_threads(),
        "epochs": epochs,
        "accuracy_fp32": demo.accuracy(fp32, data.x_test, data.y_test),
        "accuracy_sim": float((sim_pred == data.y_test).float().mean() * 100),
        "accuracy_converted": float((int_pred == data.y_test).float().mean() * 100),
        "agreement_converted_sim": float((sim_pred == int_pred).float().mean()),
        "bytes_fp32": _file_bytes(fp32, False),
        "bytes_lowbit": _file_bytes(converted, True),
        "kernels": kernels_used(converted),
        "ms": ms,
        "summary": str(qat.lowbit_summary),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| bench | shape / net | threads | ms (median) | ratios |", "|---|---|---|---|---|"]
    for r in rows:
        ms = ", ".join(f"{k} {v:.3g}" for k, v in r["ms"].items())
        if r["bench"] == "digits":
            case = r["network"]
            ratio = (
                f"acc fp32 {r['accuracy_fp32']:.2f} / sim {r['accuracy_sim']:.2f} / converted "
                f"{r['accuracy_converted']:.2f}, agreement {r['agreement_converted_sim']:.4f}, "
                f"file {r['bytes_lowbit']} B vs fp32 {r['bytes_fp32']} B, "
                f"b1 {r['ms']['fp32_b1'] / r['ms']['lowbit_b1']:.2f}x, "
                f"b256 {r['ms']['fp32_b256'] / r['ms']['lowbit_b256']:.2f}x fp32"
            )
        else:
            case = "x".join(map(str, r["shape"]))
            ratio = ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup_vs_fp32"].items())
            ratio += f" fp32; xnor {r['xnor_vs_int8']:.2f}x int8"
            ratio += f", ternary_x_ternary {r['ternary_x_ternary_vs_int8']:.2f}x int8"
        lines.append(f"| {r['bench']} | {case} | {r['threads']} | {ms} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=["kernels", "digits"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCK),
        default="wall",
        help="wall time, or this process's CPU time (a loaded machine; 1 thread only)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help="default: %(default)s")
    args = parser.parse_args(argv)
    global _clock
    _clock = CLOCK[args.clock]
    print(describe_line())
    onednn_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "(not set: oneDNN's best, AMX where present)")
    print(f"ONEDNN_MAX_CPU_ISA: {onednn_isa}")
    rows: list[dict[str, Any]] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        if "kernels" in args.only:
            for row in bench_linear(args.rounds) + bench_conv(args.rounds):
                print(json.dumps(row), flush=True)
                rows.append(row)
    if "digits" in args.only:
        torch.set_num_threads(args.threads[0])
        rows += bench_digits(args.rounds, args.epochs)
    print(table(rows))
    for r in rows:
        if r["bench"] == "digits":
            print(f"\n{r['network']}:\n{r['summary']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "torch": torch.__version__,
        **describe(),
        "onednn_max_cpu_isa": onednn_isa,
        "clock": args.clock,
        "rows": rows,
    }
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
