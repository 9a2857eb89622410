"""lowbit.batches.outputs_match: the guard BN folding and equalization use to prove a rewrite kept
the model's outputs."""

from __future__ import annotations

import pytest
import torch

from lowbit.batches import outputs_match

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
