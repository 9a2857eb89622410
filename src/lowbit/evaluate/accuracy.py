"""Top-1 / top-5 accuracy of a classifier over labelled batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
    same = total = 0
    with torch.no_grad():
        for batch in batches:
            a = _logits(reference(batch[0])).argmax(1)
            b = _logits(candidate(batch[0])).argmax(1)
            same += int((a == b).sum())
            total += len(a)
    if total == 0:
        raise ValueError("no samples to compare")
    return 100.0 * same / total


def _logits(out: object) -> Tensor:
    if isinstance(out, tuple | list) and out:
        out = out[0]
    if not isinstance(out, Tensor):
        raise ValueError(f"the model must return a tensor of logits, got {type(out).__name__}")
    return out.float()
