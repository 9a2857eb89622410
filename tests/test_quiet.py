"""The library never writes to stdout: it returns and attaches its summaries, and its progress
bars and progress lines go to stderr (a pipe or a `--json` reader sees only what the caller
prints)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import presets
from lowbit.algorithms import adaround, awq, bias_correction, equalize, gptq
from lowbit.evaluate.accuracy import accuracy


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
    ).eval()


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich draws its bars as on a terminal, so a bar sent to stdout would show there."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")


def test_workflows_and_algorithms_write_nothing_to_stdout(
    terminal: None, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _model()
    calib = [torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    labelled = [(x, model(x).argmax(1)) for x in calib]
    qmodel = lowbit.quantize(model, presets.int8(), calib)
    assert "quantized 3 of 3 layers" in str(qmodel.lowbit_summary)
    lowbit.prepare_qat(model, presets.int8(), calib)
    lowbit.convert(qmodel)
    lowbit.quantize_dynamic(model)
    lowbit.quantize_weights(model, bits=4)
    equalize(model, calib)
    bias_correction(lowbit.quantize(model, presets.int8(), calib, progress=False), calib)
    adaround(lowbit.quantize(model, presets.int8(), calib, progress=False), calib, iterations=2)
    weight_only = presets.weight_only(4, group_size=None)
    gptq(lowbit.quantize(model, weight_only, calib, progress=False), calib)
    awq(lowbit.quantize(model, weight_only, calib, progress=False), calib, grid=2)
    accuracy(qmodel, labelled)
    auto = lowbit.auto_quantize(model, presets.int8(), calib, lambda m: 100.0, max_drop=1.0)
    assert auto.lowbit_auto.meets_budget
    out, err = capsys.readouterr()
    assert out == ""
    assert "calibrating" in err and "auto_quantize: 0 kept" in err  # progress is on stderr
