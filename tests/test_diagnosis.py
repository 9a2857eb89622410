"""`lowbit.diagnose`: the culprits it names are those built into small models on purpose."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lowbit import presets
from lowbit.evaluate.diagnosis import diagnose, quantizer_points
from lowbit.evaluate.sqnr import output_sqnr
from lowbit.workflows.quantization import quantize


class Outlier(nn.Module):
    """fc1 -> fc2 -> fc3, with fc1's output channel 0 a thousand times the others and fc2's
    weight column 0 a thousand times smaller: the same function, but fc2's per-tensor input
    quantizer spends its int8 grid on that one channel and rounds the rest to zero."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 4)
        with torch.no_grad():
            self.fc1.weight[0] *= 1000.0
            self.fc1.bias[0] *= 1000.0
            self.fc2.weight[:, 0] /= 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Masked(nn.Module):
    """Two blocks adding a large negative mask before a softmax, as attention does: the add's
    output quantizer cannot hold -1e9 beside the scores."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.proj(x)
        mask = torch.zeros_like(scores)
        mask[..., -2:] = -1e9
        return self.out(torch.softmax(scores + mask, dim=-1))


def _data(n: int, seed: int) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g),) for _ in range(n)]


def test_names_the_layer_with_the_outlier_channel():
    model, calib, data = Outlier(), _data(4, 0), _data(2, 1)
    config = dataclasses.replace(presets.int8(), fusable_outputs=False, ops={})
    d = diagnose(model, config, calib, data, progress=False)
    assert d.keep_float == ("fc2",)
    assert d.recovered(d.steps[-1][1]) >= 0.8
    by_name = {p.name: p for p in d.points}
    assert by_name["fc2"].alone < by_name["fc1"].alone - 20  # fc2 alone costs the most
    # the activations, not the weights, lose it
    assert d.weights_only > d.activations_only + 10
    assert d.quantized < d.weights_only
    # what it says holds: the suggested config measures as the diagnosis said (to within what
    # calibrating fc3's input behind a float fc2 instead of a quantized one changes)
    fixed = quantize(model, d.keep_float_config(config), calib, progress=False)
    with torch.no_grad():
        ref = [model(*b) for b in data]
        out = [fixed(*b) for b in data]
    assert output_sqnr(ref, out) == pytest.approx(d.steps[-1][1], abs=1.0)
    assert "fc2" in str(d) and "activations only" in str(d)


def test_names_the_mask_add_and_measures_a_metric():
    model, calib, data = Masked(), _data(4, 2), _data(2, 3)
    config = dataclasses.replace(presets.int8(), ops={"add": presets.int8().input})
    assert "add_0" in {p.name for p in quantizer_points(quantize(model, config, calib))}

    def metric(m: nn.Module) -> float:  # negative mean squared error against float: higher better
        with torch.no_grad():
            return -float(sum(((m(*b) - model(*b)) ** 2).mean() for b in data))

    d = diagnose(model, config, calib, data, metric, sweep="metric", keep=2, progress=False)
    assert d.keep_float[0] == "add_0"
    assert d.points[0].is_op and d.points[0].kind == "add"
    assert d.recovered(d.steps[0][1]) >= 0.8
    assert d.float_value == 0.0 and d.quantized < 0.0
    fixed = d.keep_float_config(config, 1)
    assert fixed.op_overrides == {"add_0": None}


class Blocks(nn.Module):
    """Three masked blocks in a row: three copies of one culprit, one pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Masked() for _ in range(3))
        for block in self.blocks:
            block.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_by_pattern_keeps_a_repeated_culprit_with_one_override():
    model, calib, data = Blocks(), _data(4, 4), _data(2, 5)
    config = dataclasses.replace(presets.int8(), ops={"add": presets.int8().input})
    d = diagnose(model, config, calib, data, by="pattern", keep=1, progress=False)
    assert d.keep_float == ("blocks.*.add_0",)
    assert d.recovered(d.steps[-1][1]) >= 0.8
    assert {p.name for p in d.points} == {"blocks.*.add_0", "blocks.*.proj", "blocks.*.out"}
    fixed = d.keep_float_config(config)
    assert fixed.op_overrides == {"blocks.*.add_0": None}
    summary = quantize(model, fixed, calib, progress=False).lowbit_summary
    assert [r.name for r in summary.ops if not r.quantized] == [
        f"blocks.{i}.add_0" for i in range(3)
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"config": "int8"}, TypeError, "QuantConfig"),
        ({"metric": 3}, TypeError, "metric"),
        ({"sweep": "metric"}, ValueError, "needs a metric"),
        ({"sweep": "all"}, ValueError, "sweep"),
        ({"keep": 0}, ValueError, "keep"),
        ({"by": "layer"}, ValueError, "by"),
        ({"recover": 1.5}, ValueError, "recover"),
        ({"eval_data": []}, ValueError, "eval_data"),
    ],
)
def test_bad_input(kwargs, error, match):
    arguments = {
        "float_model": Outlier(),
        "config": presets.int8(),
        "calib_data": _data(1, 0),
        "eval_data": _data(1, 1),
        **kwargs,
    }
    with pytest.raises(error, match=match):
        diagnose(**arguments, progress=False)


def test_command_line(tmp_path, capsys):
    import sys

    from test_cli import FACTORY, make_workspace, run_json

    sys.path.insert(0, str(tmp_path))
    try:
        ws = make_workspace(tmp_path)
        result = run_json(
            capsys, "diagnose", FACTORY, "--calib", str(ws.calib_npy), "--data",
            str(ws.labelled_npz), "--preset", "int8", "--per-tensor", "--keep", "2",
        )  # fmt: skip
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("lowbit_cli_tinynet", None)
    assert result["command"] == "diagnose" and result["measure"] == "metric"
    assert result["float_value"] == 100.0  # the labels are the float model's predictions
    names = {p["name"] for p in result["points"]}
    assert result["keep_float"] and set(result["keep_float"]) <= names
    assert all(set(p) == {"name", "kind", "is_op", "alone", "without"} for p in result["points"])


def test_the_report_measures_with_the_same_mechanism():
    from lowbit.report import analysis

    model, calib, data = Outlier(), _data(4, 0), _data(2, 1)
    config = dataclasses.replace(presets.int8(), fusable_outputs=False, ops={})
    d = diagnose(model, config, calib, data, progress=False)
    qmodel = quantize(model, config, calib, progress=False)
    reference = analysis.model_outputs(model, data)
    split = analysis.weights_vs_activations(qmodel, data, reference)
    assert split == pytest.approx((d.weights_only, d.activations_only))
    effects = {e.layer: e.output_sqnr_db for e in analysis.layer_effects(qmodel, data, reference)}
    assert effects == pytest.approx({p.name: p.alone for p in d.points})
