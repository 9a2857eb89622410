"""lowbit on torch.distributed: wall time at 1 and 2 processes (gloo, 1 thread each), outputs
checked byte-identical.

- calibration: EfficientNet-Lite0, static int8 with the entropy calibrator on the first 256
  images of the ImageNet sample (8 batches of 32), `quantize` -> `convert` -> `save`.
- gptq: all-MiniLM-L6-v2, `weight_only(4, 128)` on every Linear, then GPTQ over the calibration
  sentences, `convert` -> `save`.
- adaround: EfficientNet-Lite0, W4 per channel / A8 (`w4a8(None)`) calibrated on the first 64
  images (2 batches), then AdaRound (200 steps per layer) on them, `convert` -> `save`.

Each rank takes a contiguous shard of the batches. Times are from a barrier after loading to
the end of the workflow (the slowest rank), plus each rank's CPU seconds (on a loaded machine
the wall times say little; the CPU seconds of the slowest rank are the better guide). Run it
on an otherwise idle machine with at least 2 cores:

    .venv/bin/python benchmarks/distributed.py [--data DIR] [--only calibration|gptq|adaround]

Prints a markdown table and writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lowbit
from lowbit.algorithms.adaround import adaround
from lowbit.algorithms.gptq import gptq
from lowbit.distributed import gather_objects

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagenet_sample import calib_eval_split, find_data_dir
from machine import describe, describe_line

WORLDS = (1, 2)
N_IMAGES, IMAGE_BATCH, ADAROUND_IMAGES = 256, 32, 64


def _shard(batches: list[Any], rank: int, world: int) -> list[Any]:
    per = -(-len(batches) // world)
    return batches[rank * per : (rank + 1) * per]


def _calibration(tmp: Path, rank: int, world: int) -> tuple[nn.Module, Any]:
    from efficientnet_lite0 import load_model

    images = torch.load(tmp / "images.pt")
    batches = [images[i : i + IMAGE_BATCH] for i in range(0, len(images), IMAGE_BATCH)]
    shard = _shard(batches, rank, world)
    config = lowbit.presets.int8("entropy")
    return load_model(), lambda m: lowbit.quantize(m, config, shard, progress=False)


def _gptq(tmp: Path, rank: int, world: int) -> tuple[nn.Module, Any]:
    from minilm import batches
    from minilm_common import CALIB, load

    model, tokenizer = load()
    shard = _shard(batches(tokenizer, CALIB), rank, world)
    config = replace(lowbit.presets.weight_only(4, 128), overrides={nn.Embedding: None})

    def run(m: nn.Module) -> nn.Module:
        return gptq(lowbit.quantize(m, config, shard, progress=False), shard, progress=False)

    return model, run


def _adaround(tmp: Path, rank: int, world: int) -> tuple[nn.Module, Any]:
    from efficientnet_lite0 import load_model

    images = torch.load(tmp / "images.pt")[:ADAROUND_IMAGES]
    batches = [images[i : i + IMAGE_BATCH] for i in range(0, len(images), IMAGE_BATCH)]
    shard = _shard(batches, rank, world)
    config = lowbit.presets.w4a8(None)

    def run(m: nn.Module) -> nn.Module:
        quantized = lowbit.quantize(m, config, shard, progress=False)
        return adaround(quantized, shard, iterations=200, progress=False)

    return load_model(), run


JOBS = {"calibration": _calibration, "gptq": _gptq, "adaround": _adaround}
IMAGE_JOBS = ("calibration", "adaround")


def _worker(rank: int, world: int, job: str, tmp: str) -> None:
    torch.set_num_threads(1)
    store = f"file://{tmp}/store-{job}-{world}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        model, run = JOBS[job](Path(tmp), rank, world)
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        quantized = lowbit.convert(run(model))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        lowbit.save(quantized, Path(tmp) / f"{job}-{world}.lowbit")
        times = gather_objects((wall, cpu), dist.group.WORLD if world > 1 else None)
        if rank == 0:
            (Path(tmp) / f"{job}-{world}.json").write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="the ImageNet sample folder")
    parser.add_argument("--only", choices=sorted(JOBS), action="append")
    args = parser.parse_args(argv)
    print(describe_line())
    rows = []
    for job in args.only or list(JOBS):
        with tempfile.TemporaryDirectory() as tmp:
            if job in IMAGE_JOBS:
                data_dir = find_data_dir(args.data, f"the {job} job")
                if data_dir is None:
                    continue
                torch.save(calib_eval_split(data_dir, N_IMAGES, 0).calib, Path(tmp) / "images.pt")
            for world in WORLDS:
                mp.spawn(_worker, args=(world, job, tmp), nprocs=world, join=True)
            times = {w: json.loads((Path(tmp) / f"{job}-{w}.json").read_text()) for w in WORLDS}
            files = {w: (Path(tmp) / f"{job}-{w}.lowbit").read_bytes() for w in WORLDS}
        walls = {w: max(t[0] for t in times[w]) for w in WORLDS}
        rows.append(
            {
                "job": job,
                "wall_s": walls,
                "cpu_s_per_rank": {w: [round(t[1], 2) for t in times[w]] for w in WORLDS},
                "ratio_2_to_1": round(walls[2] / walls[1], 3),
                "identical": files[1] == files[2],
            }
        )
    print("| job | 1 process (s) | 2 processes (s) | ratio | CPU s per rank (1; 2) | identical |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['job']} | {r['wall_s'][1]:.2f} | {r['wall_s'][2]:.2f} | {r['ratio_2_to_1']} "
            f"| {r['cpu_s_per_rank'][1]}; {r['cpu_s_per_rank'][2]} | {r['identical']} |"
        )
    out = Path(__file__).resolve().parent / "results" / "distributed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({**describe(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
