"""auto_quantize when no candidate meets the budget: the best model found, summarised truthfully.
(Its search with a budget that can be met is in tests/test_cle_adaround.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit.evaluate.mixed_precision as mixed_precision
from lowbit import presets
from lowbit.config import QuantConfig
from lowbit.evaluate.diagnosis import diagnose
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


class _MaskedBlock(nn.Module):
    """Adds a large negative mask to its scores before a softmax, as attention does: the add's
    int8 output quantizer cannot hold -1e9 beside the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.proj(x)
        mask = torch.zeros_like(scores)
        mask[..., -2:] = -1e9
        return torch.softmax(scores + mask, dim=-1)


def _masked_blocks() -> nn.Module:
    """Two masked blocks and a head: the culprit is a functional op in each block, which
    auto_quantize's own ranking (layers only) cannot keep."""
    torch.manual_seed(3)
    return nn.Sequential(_MaskedBlock(), _MaskedBlock(), nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("by", ["point", "pattern"])
def test_a_diagnosis_decides_what_is_kept(by, monkeypatch):
    """Fed a diagnosis, auto_quantize keeps the op points it names in float (no sensitivity
    pass of its own), meets the budget, and its model and summaries say so."""
    model = _masked_blocks()
    data = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    config = QuantConfig(
        weight=presets.int8().weight, input=presets.int8().input, ops={"add": presets.int8().input}
    )
    with torch.no_grad():
        reference = [model(x) for x in data]

    def eval_fn(m: nn.Module) -> float:  # 100 - relative output error in percent
        with torch.no_grad():
            pairs = zip(data, reference, strict=True)
            errors = [((m(x) - r).norm() / r.norm()).item() for x, r in pairs]
        return 100.0 - 100.0 * sum(errors) / len(errors)

    # its own ranking knows layers only: keeping every layer in float does not help
    with pytest.warns(LowbitWarning, match="no candidate met the budget"):
        alone = auto_quantize(model, config, data, eval_fn, max_drop=1.0, progress=False)
    assert not alone.lowbit_auto.meets_budget
    d = diagnose(model, config, data, data, eval_fn, by=by, keep=2, progress=False)

    def no_ranking(*args: object) -> None:
        raise AssertionError("auto_quantize measured sensitivities despite the diagnosis")

    monkeypatch.setattr(mixed_precision, "rank_layers", no_ranking)
    mixed = auto_quantize(model, config, data, eval_fn, max_drop=1.0, diagnosis=d, progress=False)
    summary = mixed.lowbit_auto
    assert summary.meets_budget and summary.drop <= 1.0
    names = [p.name for p in d.points]
    assert [name for name, _ in summary.sensitivity] == names  # the diagnosis's order
    kept = [name for name, _ in summary.kept]
    assert kept == names[: len(kept)] and all(w == "float" for _, w in summary.kept)
    adds = {"0.add_0", "1.add_0"}
    assert set(kept) == ({"*.add_0"} if by == "pattern" else adds)  # the op points, no layer
    assert summary.quantized_layers == len(names)
    floats = {r.name for r in mixed.lowbit_summary.ops if not r.quantized}
    assert floats == adds
    assert all(r.detail == "float (kept by auto_quantize)" for r in mixed.lowbit_summary.ops)
    assert all(r.quantized for r in mixed.lowbit_summary.layers)


def test_a_diagnosis_of_another_config_is_refused():
    model = _masked_blocks()
    data = [torch.randn(8, 8)]
    config = QuantConfig(weight=presets.int8().weight, input=presets.int8().input)
    d = diagnose(model, config, data, data, keep=1, progress=False)
    with_ops = QuantConfig(
        weight=presets.int8().weight, input=presets.int8().input, ops={"add": presets.int8().input}
    )
    with pytest.raises(ValueError, match=r"diagnosis: its points.*0\.add_0"):
        auto_quantize(model, with_ops, data, lambda m: 50.0, diagnosis=d, progress=False)
    with pytest.raises(TypeError, match="diagnosis"):
        auto_quantize(model, config, data, lambda m: 50.0, diagnosis="fc", progress=False)
