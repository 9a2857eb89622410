"""Running a model on the batches users hand lowbit: tensors, tuples, dicts, DataLoaders."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

Forward = Callable[[nn.Module, Any], Any]


def run_batch(model: nn.Module, batch: Any, forward: Forward | None = None) -> Any:
    """One forward pass. A tensor is the input; a tuple or list is (inputs, labels, ...) and its
    first item is the input; a dict is passed as keyword arguments; `forward(model, batch)`
    covers anything else."""
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, tuple | list) and batch:
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(
        f"cannot feed a batch of type {type(batch).__name__} to the model: pass a "
        "tensor, a tuple (inputs, ...), a dict of keyword inputs, or forward="
    )


def run_hooked(
    model: nn.Module, batch: Any, forward: Forward | None, handles: Iterable[RemovableHandle]
) -> Any:
    """One no-grad pass of `batch` through `model`, then remove `handles` (the hooks registered
    to watch that pass), also when it raises."""
    try:
        with torch.no_grad():
            return run_batch(model, batch, forward)
    finally:
        for handle in handles:
            handle.remove()


def check_batch(batch: Any) -> None:
    """Reject NaN or Inf anywhere in a batch before it reaches a calibrator."""
    for i, t in enumerate(tensors_of(batch)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"calibration batch holds NaN or Inf (tensor {i} of the batch, "
                f"shape {tuple(t.shape)})"
            )


def tensors_of(obj: Any) -> Iterator[Tensor]:
    """Every tensor inside nested tuples, lists, mappings (Hugging Face outputs are ordered
    dicts) and objects that carry `last_hidden_state` or `logits`."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, tuple | list):
        for item in obj:
            yield from tensors_of(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from tensors_of(item)
    else:
        for attr in ("last_hidden_state", "logits"):
            value = getattr(obj, attr, None)
            if value is not None:
                yield from tensors_of(value)


def first_batch(data: Iterable[Any], what: str = "calib_data") -> Any:
    """The first batch, or a clear error for an empty or non-iterable data set."""
    if isinstance(data, Tensor | dict):
        raise TypeError(
            f"{what} must be an iterable of batches (a list of tensors, a "
            "DataLoader), not a single tensor or dict: wrap it in a list"
        )
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(
            f"{what} must be an iterable of batches, got {type(data).__name__}"
        ) from None
    for batch in iterator:
        return batch
    raise ValueError(f"{what} is empty: calibration needs at least one batch")
