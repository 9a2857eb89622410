"""The dynamo exporter (`torch.onnx.export(..., dynamo=True)`) behind `export_onnx`.

lowbit exports with the TorchScript exporter by default (docs/export.md says why); these tests
keep the dynamo path giving the same file, less its opset, so the switch stays one line in
`lowbit.export._exporters`. They need onnxscript.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from test_fusable_outputs import ResidualNet
from torch import nn

from lowbit import presets
from lowbit.cli import demo
from lowbit.export import _exporters, export_onnx
from lowbit.workflows.quantization import quantize

pytest.importorskip("onnxscript")


def _export(exporter: str, qmodel: nn.Module, x: torch.Tensor, path: Path, **kwargs) -> Path:
    saved = _exporters.DEFAULT_EXPORTER
    _exporters.DEFAULT_EXPORTER = exporter  # type: ignore[assignment]
    try:
        return export_onnx(qmodel, x, path, **kwargs)
    finally:
        _exporters.DEFAULT_EXPORTER = saved


def _qdq(model: onnx.ModelProto) -> list[tuple[str, tuple[str, ...]]]:
    """Each QuantizeLinear / DequantizeLinear by name, with the ops that read its output."""
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    return sorted(
        (n.name, tuple(sorted(readers.get(n.output[0], []))))
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear")
    )


def _parameters(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    suffixes = ("_scale", "_zero_point", "_quantized")
    return {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.name.endswith(suffixes)
    }


def _plain(path: Path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def _residual() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    calib = [torch.randn(8, 3, 10, 10) for _ in range(2)]
    return quantize(ResidualNet(), presets.int8(), calib, progress=False), torch.randn(6, 3, 10, 10)


@pytest.mark.parametrize("case", ["digits_int8_asymmetric", "digits_ternary", "residual_int8"])
def test_dynamo_writes_the_same_qdq_and_numbers(digits, digits_net, tmp_path, case):
    if case == "residual_int8":
        qmodel, x = _residual()
    else:
        preset = presets.int8_asymmetric() if case.endswith("asymmetric") else presets.ternary()
        calib = demo.calibration_batches(digits, 2)
        qmodel, x = quantize(digits_net, preset, calib, progress=False), digits.x_test[:64]
    torchscript = _export("torchscript", qmodel, x[:1], tmp_path / "ts.onnx")
    dynamo = _export("dynamo", qmodel, x[:1], tmp_path / "dynamo.onnx")
    ts_model, dynamo_model = onnx.load(torchscript), onnx.load(dynamo)
    # opset 13 is below the dynamo exporter's oldest (18); INT4 ternary codes need 21 in both
    expected = 21 if case == "digits_ternary" else 18
    assert dynamo_model.opset_import[0].version == expected
    assert _qdq(dynamo_model) == _qdq(ts_model) and len(_qdq(ts_model)) >= 4
    ours, theirs = _parameters(dynamo_model), _parameters(ts_model)
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    # batch 6 / 64 against an example of 1: the batch axis is dynamic in both
    np.testing.assert_array_equal(_plain(dynamo, x), _plain(torchscript, x))
    dims = [d.dim_param for d in dynamo_model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch"


def test_dynamo_refuses_an_explicit_opset_below_18(tmp_path):
    qmodel, x = _residual()
    with pytest.raises(ValueError, match=r"opset=13: the dynamo exporter writes opset 18"):
        _export("dynamo", qmodel, x[:1], tmp_path / "m.onnx", opset=13)
    assert list(tmp_path.iterdir()) == []


def test_unknown_exporter_is_a_value_error(tmp_path):
    qmodel, x = _residual()
    with pytest.raises(ValueError, match="exporter must be one of"):
        _export("fx", qmodel, x[:1], tmp_path / "m.onnx")
