"""Running a model on the batches users hand lowbit: tensors, tuples, dicts, DataLoaders."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
    if isinstance(batch, dict):
        return model(**batch)
    fed = model_input(batch)
    if fed is None:
        raise TypeError(
            f"cannot feed a batch of type {type(batch).__name__} to the model: pass a "
            "tensor, a tuple (inputs, ...), a dict of keyword inputs, or forward="
        )
    return model(fed)


def model_input(batch: Any) -> Any:
    """The part of a batch that `run_batch` feeds the model: the tensor itself, the first item of
    a tuple or list, or the dict of keyword inputs; None for a batch of any other kind."""
    if isinstance(batch, Tensor | dict):
        return batch
    if isinstance(batch, tuple | list) and batch:
        return batch[0]
    return None


def run_user_batch(model: nn.Module, batch: Any, forward: Forward | None, where: str) -> Any:
    """`run_batch` for a batch the user handed in, `where` naming it ("calib_data batch 3"):
    NaN / Inf are rejected first, and when the model's forward fails on it, the error names the
    batch and what the model expected instead of a bare torch message from inside some layer."""
    check_batch(batch, where)
    try:
        return run_batch(model, batch, forward)
    except (RuntimeError, TypeError) as error:
        raise batch_error(error, model, batch, forward, where) from error


def batch_error(
    error: Exception, model: nn.Module, batch: Any, forward: Forward | None, where: str
) -> Exception:
    """A TypeError (no tensor in the input, float dtypes that differ from the weights') or a
    ValueError (anything else the model rejected) that says which batch and why."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    first = None if forward is not None else model_input(batch)
    fed = batch if first is None else first
    inputs = list(tensors_of(fed))
    if not inputs:
        return TypeError(
            f"{where} gives the model {describe_batch(fed)}, not tensors: pass a tensor, a tuple "
            "whose first item is the input tensor, or a dict of tensors (or forward=)"
        )
    params = model.parameters() if isinstance(model, nn.Module) else ()
    weights = {p.dtype for p in params if p.is_floating_point()}
    given = {t.dtype for t in inputs if t.is_floating_point()}
    if weights and given and not given <= weights:
        return TypeError(
            f"{where} is {_dtypes(given)} but the model's weights are {_dtypes(weights)}: "
            f"convert the batches to {_dtypes(weights)} (or the model); it failed with: {reason}"
        )
    return ValueError(f"{where} ({describe_batch(fed)}) does not fit the model: {reason}")


def describe_batch(obj: Any) -> str:
    """A short description for error messages: 'a tensor of shape (4, 3, 8, 8), float32'."""
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)}, {_dtypes({obj.dtype})}"
    if isinstance(obj, Mapping):
        items = ", ".join(f"{k}: {describe_batch(v)}" for k, v in list(obj.items())[:4])
        return f"a dict {{{items}}}"
    if isinstance(obj, tuple | list):
        first = f" whose first item is {describe_batch(obj[0])}" if obj else ""
        return f"a {type(obj).__name__} of {len(obj)}{first}"
    return f"a {type(obj).__name__}"


def _dtypes(dtypes: set[torch.dtype]) -> str:
    return " / ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def run_hooked(
    model: nn.Module,
    batch: Any,
    forward: Forward | None,
    handles: Iterable[RemovableHandle],
    where: str = "calib_data",
) -> Any:
    """One no-grad pass of `batch` (`where` says which, for errors) through `model`, then remove
    `handles` (the hooks registered to watch that pass), also when it raises."""
    try:
        with torch.no_grad():
            return run_user_batch(model, batch, forward, where)
    finally:
        for handle in handles:
            handle.remove()


def check_batch(batch: Any, where: str = "calibration batch") -> None:
    """Reject NaN or Inf anywhere in a batch before it reaches a calibrator."""
    for i, t in enumerate(tensors_of(batch)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{where} holds NaN or Inf (tensor {i} of the batch, shape {tuple(t.shape)})"
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


def outputs_match(before: Sequence[Tensor], after: Sequence[Tensor], rtol: float = 1e-4) -> bool:
    """Whether a rewrite that should not change a model (BN folding, equalization) kept its
    outputs: same count and shapes, integer tensors equal, and float ones within `rtol` of the
    largest finite magnitude of `before`, with the same NaN / +Inf / -Inf in the same places (a
    model whose output holds -inf, a masked logit, still compares its finite part)."""
    if len(before) != len(after):
        return False
    for a, b in zip(before, after, strict=True):
        if a.shape != b.shape:
            return False
        if not (a.is_floating_point() or a.is_complex()):
            if not torch.equal(a, b):
                return False
            continue
        wide = torch.complex128 if a.is_complex() else torch.float64
        a64, b64 = a.detach().to(wide), b.detach().to(wide)
        finite = torch.isfinite(a64)
        if not torch.equal(finite, torch.isfinite(b64)):
            return False
        # the same non-finite values too: -inf turned +inf, or inf turned NaN, is a change
        if not torch.equal(a64[~finite].nan_to_num(), b64[~finite].nan_to_num()):
            return False
        if not finite.any():
            continue
        scale = a64[finite].abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        if (a64[finite] - b64[finite]).abs().max() > rtol * scale:
            return False
    return True


def leading_samples(batch: Any, samples: int) -> Any | None:
    """The first `samples` samples of a batch made only of tensors (through tuples, lists and
    dicts) that share one leading dimension larger than `samples`; None for any other batch
    (a non-tensor item, a broadcast tensor, a scalar), which cannot be cut safely."""
    leaves = list(tensors_of(batch))
    sizes = {t.shape[0] if t.dim() > 0 else 0 for t in leaves}
    if len(sizes) != 1 or sizes.pop() <= samples or not _only_tensors(batch):
        return None
    return _cut(batch, samples)


def _only_tensors(obj: Any) -> bool:
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, tuple | list):
        return all(_only_tensors(item) for item in obj)
    if isinstance(obj, dict):
        return all(_only_tensors(item) for item in obj.values())
    return False


def _cut(obj: Any, samples: int) -> Any:
    if isinstance(obj, Tensor):
        return obj[:samples]
    if isinstance(obj, dict):
        return type(obj)({k: _cut(v, samples) for k, v in obj.items()})
    if hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(_cut(v, samples) for v in obj))
    return type(obj)(_cut(v, samples) for v in obj)


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


def head_batches(data: Iterable[Any], samples: int) -> list[Any]:
    """The first batches of `data` holding at least `samples` samples between them (counted by
    each batch's first tensor's leading dimension; a batch without one counts as one)."""
    head, count = [], 0
    for batch in data:
        head.append(batch)
        first = next((t for t in tensors_of(batch) if t.dim() > 0), None)
        count += 1 if first is None else int(first.shape[0])
        if count >= samples:
            break
    return head


def flat_outputs(model: nn.Module, batches: Sequence[Any], forward: Forward | None) -> list[Tensor]:
    """Each batch's output tensors, flattened into one float64 vector per batch: what output
    SQNR compares."""
    with torch.no_grad():
        return [
            torch.cat(
                [t.detach().double().flatten() for t in tensors_of(run_batch(model, b, forward))]
            )
            for b in batches
        ]
