"""lowbit.batches: outputs_match, the guard BN folding and equalization use to prove a rewrite kept
the model's outputs; leading_samples, the cut batch quantize's structural passes run."""

from __future__ import annotations

import pytest
import torch

from lowbit.batches import leading_samples, outputs_match

X = torch.tensor([1.0, -2.0, 4.0])
INF = float("inf")
NAN = float("nan")


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ([X], [X.clone()], True),
        ([X], [X + 4.0 * 1e-5], True),  # within 1e-4 of the largest magnitude (4)
        ([X], [X + 4.0 * 1e-3], False),
        ([X], [X, X], False),
        ([X], [X[:2]], False),
        ([torch.tensor([1, 2])], [torch.tensor([1, 3])], False),
        ([torch.tensor([1, 2])], [torch.tensor([1, 2])], True),
        ([torch.tensor([-INF, 1.0, NAN])], [torch.tensor([-INF, 1.0, NAN])], True),
        ([torch.tensor([-INF, 1.0])], [torch.tensor([-INF, 1.5])], False),
        ([torch.tensor([-INF, 1.0])], [torch.tensor([0.0, 1.0])], False),
        ([torch.tensor([INF, NAN])], [torch.tensor([INF, NAN])], True),
        ([torch.tensor([-INF, 1.0])], [torch.tensor([INF, 1.0])], False),  # the sign flipped
        ([torch.tensor([NAN, 1.0])], [torch.tensor([INF, 1.0])], False),
        ([torch.tensor([1 + 1j])], [torch.tensor([1 + 2j])], False),
        ([torch.tensor([1 + 1j])], [torch.tensor([1 + 1j])], True),
    ],
)
def test_outputs_match(before: list[torch.Tensor], after: list[torch.Tensor], expected: bool):
    assert outputs_match(before, after) is expected


def test_outputs_match_tolerance_is_relative_to_the_reference():
    big = torch.tensor([1000.0, 0.0])
    assert outputs_match([big], [big + torch.tensor([0.0, 0.05])])
    assert not outputs_match([big], [big + torch.tensor([0.0, 0.05])], rtol=1e-6)


def test_leading_samples_cuts_only_batches_of_tensors_with_one_batch_size():
    x, y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    assert torch.equal(leading_samples(x, 2), x[:2])
    cut = leading_samples((x, [y]), 2)
    assert isinstance(cut, tuple) and torch.equal(cut[0], x[:2]) and torch.equal(cut[1][0], y[:2])
    assert torch.equal(leading_samples({"a": x, "b": y}, 2)["b"], y[:2])
    assert leading_samples(x[:2], 2) is None  # nothing to save
    assert leading_samples((x, torch.zeros(1, 2)), 2) is None  # a broadcast tensor
    assert leading_samples((x, ["name"] * 6), 2) is None  # not only tensors
    assert leading_samples((x, torch.tensor(1.0)), 2) is None  # a scalar


class _BatchSizes(torch.nn.Module):
    """Conv + BN + ReLU + Linear that records the batch size of each forward; with `fixed`, its
    forward only takes batches of that size."""

    def __init__(self, fixed: int | None = None) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 16, 3)
        self.fixed, self.sizes = fixed, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.view(self.fixed or x.shape[0], -1))


def test_structural_passes_of_quantize_run_on_two_samples():
    """BN folding, its check and the fusable-output / op-site traces run the first 2 samples of
    the first batch (they look at the wiring, which the batch size does not change); the
    calibration itself runs every sample, and the model is the same as from whole batches."""
    from lowbit import presets, quantize

    torch.manual_seed(0)
    batches = [torch.randn(8, 1, 4, 4) for _ in range(3)]
    cut, fixed = _BatchSizes(), _BatchSizes(fixed=8)
    fixed.load_state_dict(cut.state_dict())
    small = quantize(cut, presets.int8("entropy"), batches, progress=False, inplace=True)
    assert cut.sizes == [2] * 5 + [8] * 3
    assert small.lowbit_summary.folded_batchnorms == (("conv", "bn"),)
    # a forward that takes only whole batches gets them, and the same model comes out
    whole = quantize(fixed, presets.int8("entropy"), batches, progress=False, inplace=True)
    assert fixed.sizes == [2] + [8] * 7
    for key, value in whole.state_dict().items():
        assert torch.equal(small.state_dict()[key], value), key
