"""The ONNX Runtime target writes a quantized Gemm whose output stays float (a classifier) as an
integer product: MatMulInteger -> Cast -> Mul -> Add, the values of DQ -> Gemm to float rounding."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lowbit import presets
from lowbit.export import export_onnx
from lowbit.workflows.quantization import quantize


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def _run(path: object, x: torch.Tensor, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("preset", ["int8", "int8_asymmetric"])
def test_float_output_gemm_becomes_an_integer_product(preset, tmp_path):
    calib = [torch.randn(64, 24) for _ in range(2)]
    qmodel = quantize(_classifier(), getattr(presets, preset)(), calib, progress=False)
    x = torch.randn(32, 24)
    ops = [n.op_type for n in onnx.load(export_onnx(qmodel, x[:1], tmp_path / "m.onnx")).graph.node]
    # the first Linear's output meets the second's input quantizer: ORT fuses it (QGemm) itself;
    # the logits' Gemm has no Q after it and becomes the integer product
    assert ops.count("Gemm") == 1 and ops.count("MatMulInteger") == 1
    assert ops[-4:] == ["MatMulInteger", "Cast", "Mul", "Add"]
    with torch.no_grad():
        ref = qmodel(x).numpy()
    # int32 sums scaled once against float products summed: float rounding of the logits
    out = _run(tmp_path / "m.onnx", x, optimize=False)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # optimized, ORT fuses the hidden layer (QGemm), which requantizes with its own rounding:
    # a hidden code may move by one step; the logits' product itself adds float rounding only
    out = _run(tmp_path / "m.onnx", x)
    weight = qmodel[2].module.weight.detach()
    step = float(qmodel[2].input_quantizer.scale) * float(weight.abs().sum(1).max())
    assert np.abs(out - ref).max() <= 2 * step
    trt = (
        export_onnx(qmodel, x[:1], tmp_path / "t.onnx", target="tensorrt")
        if preset == "int8"
        else None
    )
    if trt is not None:  # TensorRT's form stays standard Q/DQ -> Gemm
        assert "MatMulInteger" not in [n.op_type for n in onnx.load(trt).graph.node]
