"""`lowbit.diagnose` on EfficientNet-Lite0 W8A8 with per-tensor weights: which layers lose top-1.

Config: `presets.int8()` with per-tensor weights (the classic depthwise failure). Calibration: the
first --calib images of the ImageNet sample; metric: top-1 on the next --eval images; each layer
and residual-add point swept by the model's output SQNR on the first --sweep evaluation images.

    python benchmarks/efficientnet_diagnose.py   # the diagnosis; results/efficientnet_diagnose.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
from efficientnet_lite0 import batches, load_model, per_tensor_weights
from imagenet_sample import REPO_ROOT, calib_eval_split, find_data_dir
from machine import describe, describe_line
from torch import nn

import lowbit

RESULTS = REPO_ROOT / "benchmarks" / "results" / "efficientnet_diagnose.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="the imagenet-sample folder")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=436)
    parser.add_argument("--sweep", type=int, default=32)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(describe_line())
    folder = find_data_dir(args.data, "efficientnet_diagnose")
    if folder is None:
        return 0
    split = calib_eval_split(folder, args.calib, args.eval)
    evals = batches(split.evals)

    def top1(model: nn.Module) -> float:
        with torch.no_grad():
            logits = torch.cat([model(b) for b in evals])
        return 100.0 * float((logits.argmax(1) == split.labels).float().mean())

    diagnosis = lowbit.diagnose(
        load_model(),
        per_tensor_weights(),
        batches(split.calib),
        evals,
        top1,
        sweep_samples=args.sweep,
        progress=False,
    )
    print(diagnosis)
    RESULTS.parent.mkdir(exist_ok=True)
    payload = {**describe(), "threads": args.threads, "calib": args.calib, "eval": len(evals)}
    RESULTS.write_text(json.dumps({**payload, **dataclasses.asdict(diagnosis)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
