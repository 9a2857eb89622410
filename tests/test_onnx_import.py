"""ONNX models brought into PyTorch reach the same integer kernels as the native model."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import presets
from lowbit.nn.padded_conv import ZeroPaddedConv2d

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnx2torch") is None, reason="onnx2torch is not installed"
)  # imported by lowbit.cli.models, which stands in for a missing torchvision


class SamePadded(nn.Module):
    """'SAME' padding as TensorFlow-style models export it: an explicit zero pad, then a conv
    without padding; asymmetric for the stride-2 layer, symmetric for the other."""

    def __init__(self) -> None:
        super().__init__()
        self.pad1, self.conv1 = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 8, 3, stride=2)
        self.pad2 = nn.ZeroPad2d(1)
        self.conv2 = nn.Conv2d(8, 8, 3, groups=8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(self.pad1(x)))
        x = torch.relu(self.conv2(self.pad2(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = SamePadded().eval()
    path = tmp_path_factory.mktemp("onnx") / "same.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=13,
            input_names=["x"], dynamic_axes={"x": {0: "batch"}},
        )  # fmt: skip
    return model, path


def test_zero_pads_fold_into_the_convolutions(exported: tuple[nn.Module, Path]) -> None:
    import onnx

    from lowbit.cli.models import onnx_to_torch
    from lowbit.io.onnx_import import fold_zero_pads

    _, path = exported
    proto = onnx.load(str(path))
    assert sum(n.op_type == "Pad" for n in proto.graph.node) == 2
    assert fold_zero_pads(proto) == 2
    assert not any(n.op_type in ("Pad", "ConstantOfShape", "Slice") for n in proto.graph.node)
    pads = [list(a.ints) for n in proto.graph.node for a in n.attribute if a.name == "pads"]
    assert sorted(pads) == [[0, 0, 1, 1], [1, 1, 1, 1]]  # begins (h, w), then ends
    imported, _ = onnx_to_torch(path)
    kinds = {type(m).__name__ for m in imported.modules()}
    assert "ZeroPaddedConv2d" in kinds and not kinds & {"OnnxPadStatic", "OnnxPadDynamic"}


def test_imported_model_computes_what_onnx_runtime_does(exported: tuple[nn.Module, Path]) -> None:
    import onnxruntime as ort

    from lowbit.cli.models import onnx_to_torch

    _, path = exported
    imported, _ = onnx_to_torch(path)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(imported(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_imported_model_runs_the_native_models_kernels(exported: tuple[nn.Module, Path]) -> None:
    from lowbit.cli.models import onnx_to_torch

    model, path = exported
    imported, _ = onnx_to_torch(path)
    calib = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(4))]

    def kernels(m: nn.Module) -> dict[tuple[str, str], int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = lowbit.convert(lowbit.quantize(m, presets.int8(), calib, progress=False))
        return sorted(
            f"{type(c).__name__}:{c.kernel}" for c in converted.modules() if hasattr(c, "kernel")
        )

    assert kernels(imported) == kernels(model)
    qmodel = lowbit.quantize(imported, presets.int8(), calib, progress=False)
    converted = lowbit.convert(qmodel)
    # No float pad runs in front of an integer convolution: each pads in its quantize step.
    kinds = {type(m).__name__ for m in converted.modules()}
    assert not kinds & {"OnnxPadStatic", "OnnxPadDynamic"}
    with torch.no_grad():  # the padded int8 conv computes what the simulation does
        x = calib[0]
        torch.testing.assert_close(converted(x), qmodel(x), rtol=0, atol=1e-3)


def test_padded_conv_wraps_a_conv_exactly() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, bias=True)
    padded = ZeroPaddedConv2d.wrap(conv, (0, 1, 0, 1))
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        expected = conv(nn.functional.pad(x, (0, 1, 0, 1)))
        torch.testing.assert_close(padded(x), expected, rtol=0, atol=0)
    assert padded.weight is conv.weight
