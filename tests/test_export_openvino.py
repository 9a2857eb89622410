"""OpenVINO IR export: the IR OpenVINO compiles, holding the ONNX export's numbers, and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_export import _logit_step, _session, _simulate
from test_export_transformers import _bert, _tokens

from lowbit import export_openvino, presets
from lowbit.cli import demo
from lowbit.export import export_onnx
from lowbit.workflows.quantization import quantize

ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino)")

# float parts in float32 whatever the CPU (on AMX / AVX-512 BF16 CPUs OpenVINO picks bf16)
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="module")
def qdigits(digits, digits_net) -> torch.nn.Module:
    return quantize(digits_net, presets.int8(), demo.calibration_batches(digits), progress=False)


def _compile(path: Path) -> object:
    return ov.Core().compile_model(str(path), "CPU", F32)


def test_ir_holds_the_onnx_exports_numbers(qdigits, digits, tmp_path):
    x = digits.x_test
    xml = export_openvino(qdigits, x[:1], tmp_path / "m.xml")
    assert xml == tmp_path / "m.xml" and xml.with_suffix(".bin").stat().st_size > 0
    onnx_path = export_onnx(qdigits, x[:1], tmp_path / "m.onnx", target="openvino")
    # every activation Q/DQ pair became a FakeQuantize, every weight stays int8 in the .bin
    model = ov.Core().read_model(str(xml))
    kinds = [op.get_type_name() for op in model.get_ordered_ops()]
    graph = onnx.load(onnx_path).graph
    assert kinds.count("FakeQuantize") == sum(n.op_type == "QuantizeLinear" for n in graph.node)
    int8 = [
        op
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8
    ]
    assert len(int8) == 4  # the weights of the 3 convs and the classifier
    out = _compile(xml)(x.numpy())[0]
    # the same graph as the ONNX file read by OpenVINO: the same numbers
    np.testing.assert_allclose(out, _compile(onnx_path)(x.numpy())[0], rtol=1e-5, atol=1e-5)
    # against the simulation and ONNX Runtime: the runtimes' int8 kernels requantize with their
    # own rounding, a few steps of an activation at most
    ref = _simulate(qdigits, x)
    assert np.abs(out - ref).max() <= 16 * _logit_step(qdigits)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99
    ort_out = _session(onnx_path).run(None, {"input": x.numpy()})[0]
    assert np.abs(out - ort_out).max() <= 16 * _logit_step(qdigits)


def test_transformer_ir_keeps_batch_and_sequence_dynamic(tmp_path):
    qbert = _bert("sdpa")
    xml = export_openvino(qbert, _tokens(2, 16, 0), tmp_path / "bert.xml")
    compiled = _compile(xml)
    for batch, length in ((2, 16), (3, 24)):
        tokens = _tokens(batch, length, 7)
        out = compiled({k: v.numpy() for k, v in tokens.items()})[0]
        with torch.no_grad():
            ref = qbert(**tokens).logits.numpy()
            # logits of a random-weight classifier: within a few of its input steps
            classifier = qbert.classifier
            step = float(classifier.input_quantizer.scale) * float(
                classifier.module.weight.abs().sum(1).max()
            )
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= 4 * step


def test_bad_input_is_a_clear_error_and_leaves_no_file(qdigits, digits, tmp_path):
    x = digits.x_test[:1]
    with pytest.raises(ValueError, match=r"ends in \.xml"):
        export_openvino(qdigits, x, tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        export_openvino(qdigits, x, tmp_path / "missing" / "m.xml")
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        export_openvino("model", x, tmp_path / "m.xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="opset must be"):
        export_openvino(qdigits, x, tmp_path / "m.xml", opset=3)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_ir_for_an_xml_output(tmp_path, capsys):
    from lowbit.cli.main import main

    out = tmp_path / "digits.xml"
    argv = ["quantize", "lowbit.cli.demo:DigitsNet", "--input-shape", "1,8,8", "-o", str(out)]
    assert main([*argv, "--threads", "1"]) == 0
    capsys.readouterr()
    assert _compile(out)(np.zeros((2, 1, 8, 8), np.float32))[0].shape == (2, 10)
    assert main([*argv, "--target", "openvino"]) == 2
    assert "OpenVINO IR" in capsys.readouterr().err
