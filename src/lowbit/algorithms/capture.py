"""Capture what one layer receives during calibration, one layer at a time, in bounded memory.

Layer-wise PTQ algorithms (GPTQ, AWQ, AdaRound, bias correction, SmoothQuant) need the inputs of
one layer at a time. These helpers run the calibration batches through the model with a forward
hook on that layer and stop each forward pass as soon as the layer has run (a private exception
raised from the hook), so nothing downstream is computed and memory holds only that layer's
inputs.

    order = execution_order(model, candidates, batches)      # the layers in the order they run
    x = capture_inputs(model, layer, batches)                 # Linear: [rows, in_features]
    xs = capture_batches(model, layer, batches)               # raw first inputs, one per batch
    for args in iter_layer_inputs(model, layer, batches): ... # streaming, one batch at a time

A layer that runs several times in one forward pass (a shared module) is captured at its first
call. A layer that never runs raises `ValueError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.batches import Forward, check_batch, first_batch, run_batch, run_hooked

__all__ = [
    "capture_batches",
    "capture_inputs",
    "execution_order",
    "iter_group_inputs",
    "iter_layer_inputs",
]


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the layer of interest has run."""


def iter_layer_inputs(
    model: nn.Module,
    layer: nn.Module,
    batches: Iterable[Any],
    forward: Forward | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Yield the positional arguments `layer` receives, one tuple per calibration batch.

    Each forward pass stops right after `layer` is entered (its own forward does not run), so
    only one batch's worth of this layer's inputs is alive at a time. Runs under `no_grad`.
    Raises ValueError for empty `batches` or a layer that never runs.
    """
    for args in iter_group_inputs(model, [layer], batches, forward):
        yield args[0]


def iter_group_inputs(
    model: nn.Module,
    layers: Sequence[nn.Module],
    batches: Iterable[Any],
    forward: Forward | None = None,
) -> Iterator[list[tuple[Any, ...]]]:
    """Yield, per calibration batch, the positional arguments each of `layers` receives (in
    the order of `layers`): one pass serves layers that take the same input.

    Each forward pass stops once every layer has been entered (the last one's own forward does
    not run). Runs under `no_grad`. Raises ValueError for empty `batches` or a layer that does
    not run.
    """
    first_batch(batches)  # a clear error for an empty or non-iterable data set
    captured: dict[int, tuple[Any, ...]] = {}

    def make_hook(index: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if index in captured:  # a shared module: its first call counts
                return
            captured[index] = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            if len(captured) == len(layers):
                raise _StopForward

        return hook

    def register() -> list[Any]:
        return [m.register_forward_pre_hook(make_hook(i)) for i, m in enumerate(layers)]

    handles = register()
    try:
        for i, batch in enumerate(batches):
            check_batch(batch)
            captured.clear()
            with torch.no_grad(), contextlib.suppress(_StopForward):
                run_batch(model, batch, forward)
            missing = [m for j, m in enumerate(layers) if j not in captured]
            if missing:
                raise ValueError(
                    f"layer {type(missing[0]).__name__} did not run on calibration batch {i}: "
                    "is it part of this model's forward pass?"
                )
            args = [captured.pop(j) for j in range(len(layers))]
            # Release the hooks while the caller works, so the caller may run the model itself.
            for handle in handles:
                handle.remove()
            yield args
            handles = register()
    finally:
        for handle in handles:
            handle.remove()


def capture_batches(
    model: nn.Module,
    layer: nn.Module,
    batches: Iterable[Any],
    forward: Forward | None = None,
) -> list[Tensor]:
    """The first positional input of `layer` for every batch, as the layer received it."""
    out: list[Tensor] = []
    for args in iter_layer_inputs(model, layer, batches, forward):
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(f"{type(layer).__name__}'s first input is not a tensor")
        out.append(args[0])
    return out


def capture_inputs(
    model: nn.Module,
    layer: nn.Module,
    batches: Iterable[Any],
    forward: Forward | None = None,
    max_rows: int | None = None,
) -> Tensor:
    """The inputs of a Linear-like layer over all batches, flattened to [rows, features].

    Every leading dimension (batch, sequence) becomes a row; the last dimension is the features.
    `max_rows` keeps at most that many rows (the first ones) and stops early once reached.
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
    rows: list[Tensor] = []
    n = 0
    for args in iter_layer_inputs(model, layer, batches, forward):
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise TypeError(f"{type(layer).__name__}'s first input is not a tensor")
        x = x.reshape(-1, x.shape[-1])
        if max_rows is not None:
            x = x[: max_rows - n]
        rows.append(x)
        n += x.shape[0]
        if max_rows is not None and n >= max_rows:
            break
    return torch.cat(rows)


def execution_order(
    model: nn.Module,
    layers: Sequence[nn.Module],
    batches: Iterable[Any],
    forward: Forward | None = None,
) -> list[nn.Module]:
    """`layers` in the order of their first call on the first batch; layers that never run are
    left out."""
    batch = first_batch(batches)
    check_batch(batch)
    order: list[nn.Module] = []
    seen: set[int] = set()
    handles = []

    def make_hook(m: nn.Module) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, _args: tuple[Any, ...]) -> None:
            if id(m) not in seen:
                seen.add(id(m))
                order.append(m)

        return hook

    for m in layers:
        handles.append(m.register_forward_pre_hook(make_hook(m)))
    run_hooked(model, batch, forward, handles, "calib_data batch 0")
    return order
