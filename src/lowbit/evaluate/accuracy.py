"""Top-1 / top-5 accuracy of a classifier over labelled batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.progress import progress_bar

Predict = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Accuracy:
    """Top-1 and top-5 accuracy in percent over `num_samples` samples."""

    top1: float
    top5: float
    num_samples: int


def accuracy(
    predict: Predict,
    batches: Iterable[tuple[Tensor, ...]],
    *,
    progress: bool = True,
    description: str = "evaluating",
) -> Accuracy:
    """Run `predict` (a model, or any callable from inputs to logits) over `(inputs, labels)`.

    Top-5 is top-k with k = min(5, number of classes). Raises ValueError for batches without
    labels, logits that are not [batch, classes], or labels beyond the number of classes.
    """
    top1 = top5 = total = 0
    with torch.no_grad():
        for batch in progress_bar(batches, description, enabled=progress):
            if len(batch) < 2:
                raise ValueError("accuracy needs labelled batches (inputs, labels)")
            x, y = batch[0], batch[1]
            logits = _logits(predict(x))
            if logits.dim() != 2 or logits.shape[0] != len(y):
                raise ValueError(
                    f"the model's output must be logits of shape [batch, classes], got "
                    f"{tuple(logits.shape)} for a batch of {len(y)}"
                )
            if int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
                raise ValueError(
                    f"labels go up to {int(y.max())} but the model has {logits.shape[1]} classes"
                )
            k = min(5, logits.shape[1])
            best = logits.topk(k, dim=1).indices
            top1 += int((best[:, 0] == y).sum())
            top5 += int((best == y[:, None]).any(1).sum())
            total += len(y)
    if total == 0:
        raise ValueError("no samples to evaluate")
    return Accuracy(100.0 * top1 / total, 100.0 * top5 / total, total)


def agreement(
    reference: Predict, candidate: Predict, batches: Iterable[tuple[Tensor, ...]]
) -> float:
    """Percent of samples where both models predict the same top-1 class (no labels needed)."""
    return top1_agreement(logits(reference, batches), logits(candidate, batches))


def logits(predict: Predict, batches: Iterable[tuple[Tensor, ...]]) -> list[Tensor]:
    """`predict`'s logits for every batch's inputs, to compare several models against once."""
    with torch.no_grad():
        return [_logits(predict(batch[0])) for batch in batches]


def top1_agreement(reference: Sequence[Tensor], candidate: Sequence[Tensor]) -> float:
    """Percent of samples whose top-1 class (last axis) is the same in both lists of logits."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference batches but {len(candidate)} candidate ones")
    same = total = 0
    for r, c in zip(reference, candidate, strict=True):
        a, b = r.argmax(-1), c.argmax(-1)
        same += int((a == b).sum())
        total += a.numel()
    if total == 0:
        raise ValueError("no samples to compare")
    return 100.0 * same / total


def _logits(out: object) -> Tensor:
    if isinstance(out, tuple | list) and out:
        out = out[0]
    if not isinstance(out, Tensor):
        raise ValueError(f"the model must return a tensor of logits, got {type(out).__name__}")
    return out.float()
