"""auto_quantize when no candidate meets the budget: the best model found, summarised truthfully.
(Its search with a budget that can be met is in tests/test_cle_adaround.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.config import QuantConfig
from lowbit.evaluate.mixed_precision import auto_quantize
from lowbit.exceptions import LowbitWarning
from lowbit.nn.modules import quant_modules
from lowbit.spec import PerChannel, QuantSpec


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)]
    return nn.Sequential(*layers).eval()


def _eight_bit_layers(model: nn.Module) -> int:
    return sum(
        1
        for layer in quant_modules(model).values()
        if layer.weight_quantizer is not None and layer.weight_quantizer.spec.bits == 8
    )


def test_unmet_budget_returns_the_best_model_with_its_own_accuracy():
    """Every 8-bit layer adds 5 points and float layers add none, so the first candidate (8-bit)
    with all layers kept is the best model; the second (float) keeps the same layers at a worse
    accuracy. The summary must report the best model's step, not the later one."""
    calls: list[nn.Module] = []

    def eval_fn(model: nn.Module) -> float:
        calls.append(model)
        return 100.0 if len(calls) == 1 else 40.0 + 5 * _eight_bit_layers(model)

    config = QuantConfig(
        weight=QuantSpec(bits=2, granularity=PerChannel(0)),
        input=QuantSpec(bits=8, narrow_range=True),
    )
    before = copy.deepcopy(config)
    calib = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.warns(LowbitWarning, match=r"no candidate met the budget.*55\.00%"):
        mixed = auto_quantize(_model(), config, calib, eval_fn, max_drop=1.0, progress=False)
    summary = mixed.lowbit_auto
    assert not summary.meets_budget
    assert summary.accuracy == 55.0 == max(s.accuracy for s in summary.steps)
    assert _eight_bit_layers(mixed) == 3 == len(summary.kept) == summary.quantized_layers
    assert {what for _, what in summary.kept} == {summary.steps[1].candidate}
    assert summary.steps[-1].candidate == "float" and summary.steps[-1].accuracy == 40.0
    assert config == before  # the caller's config is never changed
