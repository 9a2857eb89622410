"""Spawn a gloo process group of CPU workers for the distributed tests (1 thread each).

`run_ranks(scenario, out, world)` starts `world` processes; each joins the group through a file
store in `out`, runs `scenario(rank, out)` and records the CPU seconds it spent in it. Returns
the largest, for the tests to check against `CPU_BUDGET_S`.

Why CPU seconds, not wall seconds: a rank never waits past the process group's timeout (its
collective raises, and the scenario with it, so the test fails), so the wall time has no hang
to reveal; it measures the queue for the cores, which another job on a loaded machine stretches
without bound (58 s of wall time for 4 ranks of 1 thread each on 2 busy cores). What the
bound checks is the issue's "each test under a minute" of work: a rank's own computation,
which load changes little, and which would grow if a rank redid the others' work.
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

# The budget for one distributed test, "under a minute", in CPU seconds of each rank.
CPU_BUDGET_S = 60.0


def run_ranks(scenario: Scenario, out: Path, world: int = 2, timeout_s: int = 30) -> float:
    """Run `scenario` on `world` ranks; the most CPU seconds a rank spent in it."""
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
    start = time.process_time()
    try:
        scenario(rank, Path(out))
    finally:
        dist.destroy_process_group()
    (Path(out) / f"seconds.rank{rank}").write_text(str(time.process_time() - start))
