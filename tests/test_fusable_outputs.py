"""`QuantConfig.fusable_outputs`: the layer outputs no runtime fuses are found and quantized, so
ONNX Runtime runs every conv of a residual network as QLinearConv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit import presets
from lowbit.export import export_onnx
from lowbit.nn.modules import quant_modules
from lowbit.workflows.quantization import prepare_qat, quantize


class ResidualNet(nn.Module):
    """stem -> ReLU6 -> [expand -> ReLU6 -> project] + skip -> head -> ReLU6 -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 16, 1)
        self.project = nn.Conv2d(16, 8, 1)
        self.head = nn.Conv2d(8, 12, 1)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.stem(x))  # consumed by expand and by the residual Add
        y = self.project(F.relu6(self.expand(x)))  # reaches the Add: not fusable
        x = x + y
        x = self.act(self.head(x))  # then a pool: not fusable
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # a model output


def _quantize(fusable: bool) -> nn.Module:
    torch.manual_seed(0)
    calib = [torch.randn(8, 3, 10, 10) for _ in range(2)]
    config = presets.int8_asymmetric(fusable_outputs=fusable)
    return quantize(ResidualNet(), config, calib, progress=False)


def test_finds_the_layers_whose_outputs_reach_unfusable_ops():
    qmodel = _quantize(True)
    with_output = {n for n, m in quant_modules(qmodel).items() if m.output_quantizer is not None}
    # stem reaches the Add through its ReLU6 (followed through), project reaches it directly,
    # head reaches the pool; expand feeds project only, and fc's output is the model's.
    assert with_output == {"stem", "project", "head"}
    for name in with_output:
        q = quant_modules(qmodel)[name].output_quantizer
        assert q is not None and q.has_qparams and q.spec == presets.int8_asymmetric().input
    assert "O uint8 affine per-tensor" in str(qmodel.lowbit_summary)
    assert all(m.output_quantizer is None for m in quant_modules(_quantize(False)).values())


def test_qat_gets_the_same_output_quantizers():
    torch.manual_seed(0)
    calib = [torch.randn(8, 3, 10, 10)]
    config = presets.int8_asymmetric(fusable_outputs=True)
    qat = prepare_qat(ResidualNet(), config, calib, progress=False)
    with_output = {n for n, m in quant_modules(qat).items() if m.output_quantizer is not None}
    assert with_output == {"stem", "project", "head"}
    qat(torch.randn(2, 3, 10, 10)).sum().backward()  # trains through them
    with pytest.raises(ValueError, match="calib_data"):
        prepare_qat(ResidualNet(), config, progress=False)


def _integer_convs(path: Path, tmp_path: Path) -> tuple[int, int]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    return ops.count("QLinearConv"), sum(op in ("Conv", "FusedConv", "NchwcConv") for op in ops)


def test_every_conv_runs_in_integer_in_onnx_runtime(tmp_path):
    x = torch.randn(4, 3, 10, 10)
    plain, fusable = _quantize(False), _quantize(True)
    counts = {}
    for name, qmodel in (("plain", plain), ("fusable", fusable)):
        path = export_onnx(qmodel, x[:1], tmp_path / f"{name}.onnx")
        counts[name] = _integer_convs(path, tmp_path)
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"input": x.numpy()}
        )[0]
        with torch.no_grad():
            assert np.abs(out - qmodel(x).numpy()).max() < 0.05
    assert counts["fusable"] == (4, 0)
    assert counts["plain"][1] > 0  # without it ORT keeps some convs in float
