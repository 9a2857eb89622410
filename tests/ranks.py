"""Spawn a gloo process group of CPU workers for the distributed tests (1 thread each).

`run_ranks(scenario, out, world)` starts `world` processes; each joins the group through a file
store in `out`, runs `scenario(rank, out)` and records its seconds in it (process start-up and
imports left out: they take what the machine's load makes them take, which says nothing of a
rank waiting for another). Returns the slowest rank's seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Scenario = Callable[[int, Path], None]


def run_ranks(scenario: Scenario, out: Path, world: int = 2, timeout_s: int = 30) -> float:
    """Run `scenario` on `world` ranks; the slowest rank's seconds in it."""
    mp.spawn(_worker, args=(scenario, str(out), world, timeout_s), nprocs=world, join=True)
    return max(float((out / f"seconds.rank{r}").read_text()) for r in range(world))


def _worker(rank: int, scenario: Scenario, out: str, world: int, timeout_s: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    start = time.perf_counter()
    try:
        scenario(rank, Path(out))
    finally:
        dist.destroy_process_group()
    (Path(out) / f"seconds.rank{rank}").write_text(str(time.perf_counter() - start))
