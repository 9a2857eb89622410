"""`lowbit quantize` on several processes.

Under `torchrun` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) each process joins a gloo
process group and calibrates on its shard of the calibration data: a contiguous block of whole
batches, in rank order, so that every calibrator (moving_average included) gives the model of
one process. Rank 0 writes the output and prints; the others print nothing. `--nproc N` starts
torchrun itself (`torch.distributed.run`, standalone, on this host) with the same arguments.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from lowbit.cli.data import Batches
from lowbit.distributed import DistributedError

__all__ = ["ShardBatches", "launch", "process_group"]


@contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """(rank, world size): joins the process group torchrun describes, with gloo (the command
    works on the CPU), and leaves it at the end; (0, 1) outside torchrun. A failure on any rank
    (`DistributedError`) becomes a ValueError, which the command reports in one line."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return
    dist.init_process_group("gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    except DistributedError as error:
        raise ValueError(str(error)) from error
    finally:
        dist.destroy_process_group()


class ShardBatches(Batches):
    """Rank `rank`'s contiguous block of the whole batches of `batches` (ceil(n / world) each;
    the last ranks may have fewer, or none). Its example is the data's first sample on every
    rank, the one a single process traces with."""

    def __init__(self, batches: Batches, rank: int, world: int) -> None:
        per = -(-len(batches) // world)
        first, last = min(rank * per, len(batches)), min((rank + 1) * per, len(batches))
        self.base, self.batch_size = batches, batches.batch_size
        self.has_labels = batches.has_labels
        self.start = first * batches.batch_size
        self.stop = min(last * batches.batch_size, batches.num_samples)

    @property
    def num_samples(self) -> int:
        return self.stop - self.start

    def _batch(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        return self.base._batch(self.start + start, self.start + stop)

    def example(self) -> torch.Tensor:
        return self.base.example()


def launch(nproc: int, argv: list[str]) -> int:
    """Run `lowbit <argv>` (without --nproc) on `nproc` processes through torchrun; the exit
    status: 0, or that of the first rank that failed (which printed its own error)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    child = _without_nproc(argv)
    config = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "lowbit", *child]
    )
    try:
        run(config)
    except ChildFailedError as failed:
        codes = [f.exitcode for _, f in sorted(failed.failures.items())]
        return next((c for c in codes if c > 0), 1)
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
