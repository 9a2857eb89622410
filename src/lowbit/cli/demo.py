"""The embedded default: a small CNN trained on scikit-learn's bundled digits, then quantized.

It needs no download, so `lowbit demo` (the README's first command) works on a fresh machine,
and the test suite trains the same network to check accuracy claims on a real task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


class DigitsNet(nn.Module):
    """Conv -> depthwise conv -> pointwise conv -> linear, with BatchNorm: a MobileNet in small."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),  # depthwise
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 1, bias=False),  # pointwise
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(2 * width * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


@dataclass(frozen=True)
class Digits:
    """The 8x8 digits split into train and test, pixels scaled to [0, 1]."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits(seed: int = 0) -> Digits:
    """scikit-learn's bundled digits (1,797 images), 80/20 split."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("the demo needs scikit-learn: pip install 'lowbit[cli]'") from error
    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return Digits(x[:cut], y[:cut], x[cut:], y[cut:])


def train(
    model: nn.Module, data: Digits, *, epochs: int = 15, lr: float = 3e-3, seed: int = 0
) -> nn.Module:
    """Adam with a fixed seed; a few seconds on a CPU. Also fine-tunes QAT models."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train))
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def calibration_batches(data: Digits, n_batches: int = 4, batch_size: int = 64) -> list[Tensor]:
    return [data.x_train[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
