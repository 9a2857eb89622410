"""Running lowbit inside torch.distributed: which group to use, and steps that fail together.

Inside an initialized default process group of more than one process (or with an explicit
`group=`), the workflows treat each rank's data as its shard and reduce what they gathered, so
that every rank ends with the same model. What makes that safe is `step`: every rank reports
whether its part of a step raised, and if any did, every rank raises `DistributedError` naming
the ranks and their errors. A rank that fails therefore never leaves the others waiting in a
collective; a rank that dies or hangs ends the others' wait at the process group's timeout.

Nothing here runs outside a process group: `active_group` is None and every helper does the
local thing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lowbit.batches import first_batch

T = TypeVar("T")

__all__ = [
    "DistributedError",
    "active_group",
    "all_reduce",
    "check_same",
    "check_unsharded",
    "example_batch",
    "gather_objects",
    "gather_shards",
    "on_rank_zero",
    "rank",
    "step",
    "sum_over_ranks",
]


class DistributedError(RuntimeError):
    """A step failed on some rank, or ranks disagree; raised on every rank alike."""


def active_group(group: Any = None, *, every_rank: bool = False) -> Any:
    """The process group lowbit synchronizes over, or None to work alone.

    `group` is used when given; otherwise the default group when torch.distributed is
    initialized with more than one process. `every_rank=True` asks for no synchronization.
    """
    if every_rank:
        return None
    if group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("group= was given but torch.distributed is not initialized")
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def rank(group: Any) -> int:
    """This process's rank in `group` (0 when working alone)."""
    return 0 if group is None else dist.get_rank(group)


def all_reduce(tensor: Tensor, group: Any, op: Any = dist.ReduceOp.SUM) -> Tensor:
    """`tensor` reduced over `group`, as a new tensor on `tensor`'s device.

    The collective runs where the backend needs it: on the current CUDA device for nccl (so CPU
    statistics such as histograms reduce there too), on the tensor's own device otherwise.
    """
    device = tensor.device
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    reduced = tensor.detach().to(device, copy=True)
    dist.all_reduce(reduced, op=op, group=group)
    return reduced.to(tensor.device)


def gather_objects(obj: Any, group: Any) -> list[Any]:
    """`obj` from every rank of `group`, in rank order (a list of one when alone).

    Tensors travel pickled, and a CUDA tensor unpickles onto the device it left from (another
    rank's GPU): those inside dicts, lists and tuples are moved to this rank's current CUDA
    device, where each rank keeps its model and data under nccl."""
    if group is None:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return [_on_this_gpu(o) for o in gathered]


def _on_this_gpu(obj: Any) -> Any:
    """`obj` with the CUDA tensors in it (through dicts, lists, tuples) on the current device."""
    if isinstance(obj, Tensor):
        if obj.is_cuda and obj.device.index != torch.cuda.current_device():
            return obj.to(torch.device("cuda", torch.cuda.current_device()))
        return obj
    if isinstance(obj, dict):
        return {k: _on_this_gpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):  # not a named tuple
        return type(obj)(_on_this_gpu(v) for v in obj)
    return obj


def gather_shards(
    calib_data: Iterable[Any], group: Any, what: str, compute: Callable[[], T]
) -> list[T]:
    """`compute()` on every rank whose `calib_data` has a batch, as one `step` named `what`;
    what those ranks computed, in rank order (a rank without batches adds nothing)."""
    mine = None
    with step(group, what):
        if next(iter(calib_data), None) is not None:
            mine = compute()
    return [r for r in gather_objects(mine, group) if r is not None]


def sum_over_ranks(values: list[float], group: Any) -> list[float]:
    """Each of `values` summed over the ranks of `group`, in rank order: the same bits on every
    rank (exact for integers). Every rank passes a list of the same length."""
    shards = gather_objects(list(values), group)
    return [sum((shard[i] for shard in shards[1:]), shards[0][i]) for i in range(len(values))]


@contextmanager
def step(group: Any, what: str) -> Iterator[None]:
    """Run the body on every rank; if it raised on any, raise `DistributedError` on all.

    The exchange is also a barrier: no rank leaves the step before every rank finished its
    body. The failing rank's own exception is chained to its `DistributedError`.
    """
    if group is None:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as caught:
        error = caught
    status = None if error is None else f"{type(error).__name__}: {error}"
    failed = [(r, s) for r, s in enumerate(gather_objects(status, group)) if s is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {s}" for r, s in failed)
        raise DistributedError(f"{what} failed on {len(failed)} rank(s): {detail}") from error


def check_same(description: str, group: Any, what: str) -> None:
    """DistributedError on every rank unless `description` is the same on every rank.

    Only a digest travels; the error names the ranks whose description differs from rank 0's.
    """
    if group is None:
        return
    digest = hashlib.sha256(description.encode()).hexdigest()
    digests = gather_objects(digest, group)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DistributedError(
            f"{what} on rank(s) {differ} differ(s) from rank 0's: every rank must run the same "
            "model with the same config"
        )


def check_unsharded(model: nn.Module, what: str) -> None:
    """TypeError naming the way out when `model` is sharded by FSDP2 (`fully_shard`): each rank
    holds a slice of every weight, and `what` needs whole ones (FSDP itself refuses the
    deepcopy `convert` makes with a bare AssertionError)."""
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise TypeError(
            f"{what} needs whole weights, but the model is sharded by FSDP2 (fully_shard): "
            "call lowbit.sync_ranges(model), take its full state dict with torch.distributed."
            "checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
            "full_state_dict=True)), load it into an unsharded model made with the same "
            "lowbit.prepare_qat recipe, and pass that one (see docs/distributed.md, QAT)"
        )


def on_rank_zero(write: Callable[[], T], *, every_rank: bool = False) -> T | None:
    """`write()` on rank 0 only of the default group, everywhere when alone or with
    `every_rank=True`; the others wait for it and all raise `DistributedError` if it failed.
    Returns what `write` returned, None on the ranks that did not write."""
    group = active_group(every_rank=every_rank)
    result = None
    with step(group, "writing on rank 0"):
        if rank(group) == 0:
            result = write()
    return result


def example_batch(calib_data: Any, group: Any) -> Any:
    """The first batch of `calib_data`; in a group, a rank whose shard is empty gets the first
    batch of the lowest rank that has one. No batch on any rank is the usual ValueError."""
    if group is None:
        return first_batch(calib_data)
    example = None
    with step(group, "reading the first calib_data batch"):
        try:
            example = first_batch(calib_data)
        except ValueError:  # an empty shard; others may have data
            example = None
    holders = [r for r, has in enumerate(gather_objects(example is not None, group)) if has]
    if not holders:
        raise ValueError("calib_data is empty on every rank: calibration needs at least one batch")
    if len(holders) < dist.get_world_size(group):  # every rank joins the broadcast
        box = [example]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, holders[0]), group=group)
        example = _on_this_gpu(box[0]) if example is None else example
    return example
