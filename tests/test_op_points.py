"""Quantizer points on functional ops: found per calling module, configured, simulated exactly,
calibrated, exported as Q/DQ that ONNX Runtime fuses, saved and loaded."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from ort_reference import activation_code_flips
from torch import Tensor, nn

import lowbit
from lowbit import presets
from lowbit.config import QuantConfig
from lowbit.export import export_onnx
from lowbit.io.lowbit_format import read_header
from lowbit.nn.op_points import op_points
from lowbit.spec import PerTensor, QuantSpec
from lowbit.transforms.op_points import find_op_sites
from lowbit.workflows.quantization import prepare_qat, quantize

UINT8 = QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerTensor())
INT8 = QuantSpec(bits=8, narrow_range=True, granularity=PerTensor())


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + x  # Inner's own add_0


class Block(nn.Module):
    """Two adds of its own around a child with one add, a scalar add (not a point), a cat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.inner = Inner()

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(self.conv(x)) + 1.0  # a scalar add: an affine map, not a point
        z = torch.add(y, x)  # add_0
        z = z.add_(y)  # add_1 (in place: its quantized result is returned, as `z += y` uses)
        return torch.cat([z, x], 1)[:, :4]  # cat_0


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.b1 = Block()
        self.b2 = Block()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.b2(self.b1(torch.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def _data(n: int = 3, seed: int = 0) -> list[Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(8, 3, 6, 6) for _ in range(n)]


@pytest.fixture(scope="module")
def float_net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(self.inner(x) + x)


def test_sites_are_numbered_per_calling_module_without_its_children(float_net):
    # each call of a module numbers its ops from 0: one point serves every call, as one layer's
    # quantizers do
    assert [s.name for s in find_op_sites(Twice(), torch.randn(2, 4, 3, 3))] == [
        "inner.add_0",
        "add_0",
    ]
    sites = [s.name for s in find_op_sites(float_net, _data(1)[0])]
    assert sites == [
        "b1.inner.add_0",
        "b1.add_0",
        "b1.add_1",
        "b1.cat_0",
        "b2.inner.add_0",
        "b2.add_0",
        "b2.add_1",
        "b2.cat_0",
    ]


def test_config_by_kind_by_name_and_none(float_net):
    config = QuantConfig(
        weight=presets.int8().weight,
        input=UINT8,
        ops={"add": UINT8, "cat": None},
        op_overrides={"b2": None, "b1.inner.add_0": INT8, "*.cat_0": UINT8, "b2.cat_0": None},
    )
    qmodel = quantize(float_net, config, _data(), progress=False)
    records = {r.name: r for r in qmodel.lowbit_summary.ops}
    # "b2" names the calling module b2, not its child b2.inner ("b2*" would)
    assert {n for n, r in records.items() if r.quantized} == {
        "b1.inner.add_0",
        "b1.add_0",
        "b1.add_1",
        "b1.cat_0",
        "b2.inner.add_0",
    }
    assert records["b1.inner.add_0"].detail == "O int8 per-tensor"
    assert records["b1.add_0"].kind == "add" and records["b1.cat_0"].kind == "cat"
    assert "kept in float by op override 'b2'" in records["b2.add_0"].detail
    assert "b1.add_1" in str(qmodel.lowbit_summary)
    points = op_points(qmodel)
    assert set(points) == {"b1", "b1.inner", "b2.inner"}
    assert set(points["b1"]) == {"add_0", "add_1", "cat_0"}
    assert qmodel.b1.inner.lowbit_ops.add_0.spec == INT8
    assert "b1.lowbit_ops.add_1.scale" in qmodel.state_dict()


def test_bad_op_config_is_named():
    with pytest.raises(ValueError, match="ops key must be one of"):
        QuantConfig(ops={"mul": UINT8})
    with pytest.raises(TypeError, match=r"op_overrides\['b1'\] must be a QuantSpec"):
        QuantConfig(op_overrides={"b1": 8})  # type: ignore[dict-item]
    config = replace(presets.int8(), op_overrides={"blocks.*": None})
    with pytest.raises(ValueError, match=r"'blocks\.\*' matches no functional op.*b1\.inner"):
        quantize(Net().eval(), config, _data(1), progress=False)


class AddNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + x


def test_simulation_is_quantize_of_the_float_add():
    torch.manual_seed(0)
    config = QuantConfig(ops={"add": UINT8})
    qmodel = quantize(AddNet().eval(), config, [torch.randn(64, 16) * 3], progress=False)
    q = qmodel.lowbit_ops.add_0
    x = torch.randn(256, 16) * 4  # beyond the calibrated range too: saturation
    with torch.no_grad():
        out = qmodel(x).double()
        total = (qmodel.fc(x) + x).double()  # the float32 add, as the model computes it
    scale, zero = float(q.scale), int(q.zero_point)
    steps = total / scale
    codes = torch.clamp(torch.round(steps) + zero, 0, 255)
    simulated = out / scale + zero  # the simulation's codes, to float32 rounding
    assert (simulated - simulated.round()).abs().max() < 1e-3
    boundary = ((steps - steps.floor()) - 0.5).abs() < 1e-4  # float32 division may round across
    assert (simulated.round() == codes)[~boundary].all()
    assert ((simulated.round() - codes).abs() <= 1).all()
    assert (codes == 0).any() and (codes == 255).any()  # both ends saturate in this sample


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "entropy", "mse"])
def test_every_calibrator_calibrates_the_points(float_net, calibrator):
    config = presets.int8_asymmetric(calibrator=calibrator)
    qmodel = quantize(float_net, config, _data(2), progress=False)
    quantizers = [q for p in op_points(qmodel).values() for q in p.quantizers().values()]
    assert len(quantizers) == 6  # the adds of both blocks (cat is not in the preset)
    assert all(q.mode == "quantize" and q.scale.numel() == 1 for q in quantizers)


@pytest.fixture(scope="module")
def asym(float_net) -> nn.Module:
    return quantize(float_net, presets.int8_asymmetric(), _data(), progress=False)


def _optimized_ops(path, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def _output_scales(path) -> set[str]:
    return {n.input[1] for n in onnx.load(path).graph.node if n.op_type == "QuantizeLinear"}


def _check_against_ort(path, qmodel: nn.Module, x: Tensor) -> None:
    """ORT's plain Q/DQ graph computes the simulation: every sample to float rounding but those
    where an activation (a point's output included) sits on a rounding boundary, which
    `activation_code_flips` checks to be just that."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = qmodel(x).numpy()
    flipped = activation_code_flips(path, qmodel, x)
    assert flipped.mean() <= 0.25
    np.testing.assert_allclose(out[~flipped], ref[~flipped], atol=1e-4)


@pytest.mark.parametrize("preset", ["int8", "int8_asymmetric"])
def test_export_matches_ort_and_fuses_qlinearadd(float_net, preset, tmp_path):
    qmodel = quantize(float_net, getattr(presets, preset)(), _data(), progress=False)
    x = _data(1, seed=1)[0]
    path = export_onnx(qmodel, x[:1], tmp_path / "m.onnx")
    assert {"b1.add_1.output_scale", "b2.inner.add_0.output_scale"} <= _output_scales(path)
    _check_against_ort(path, qmodel, x)
    # the Add whose inputs are both quantized (Inner's conv output + quantized x) is fused
    assert _optimized_ops(path, tmp_path).count("QLinearAdd") >= 2


def test_convert_save_load_round_trip(float_net, asym, tmp_path):
    converted = lowbit.convert(asym)
    x = _data(1, seed=2)[0]
    with torch.no_grad():
        np.testing.assert_allclose(converted(x), asym(x), atol=1e-5)
    lowbit.save(converted, tmp_path / "m.lowbit")
    header = read_header(tmp_path / "m.lowbit")
    assert {r["caller"] for r in header["ops"]} == {"b1", "b2", "b1.inner", "b2.inner"}
    loaded = lowbit.load(tmp_path / "m.lowbit", copy.deepcopy(float_net))
    assert set(op_points(loaded)) == set(op_points(converted))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), converted(x), rtol=0, atol=0)
    # a file with op points needs a model with those calling modules
    with pytest.raises(ValueError, match=r"does not match|no layer"):
        lowbit.load(tmp_path / "m.lowbit", AddNet())


def test_deepcopy_keeps_the_points_working(asym):
    clone = copy.deepcopy(asym)
    x = _data(1, seed=3)[0]
    seen = []
    clone.b1.lowbit_ops.add_0.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        torch.testing.assert_close(clone(x), asym(x), rtol=0, atol=0)
    assert seen == [1]  # the copy's hooks call the copy's quantizers


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x) + x
        if x.mean() > 0:  # a data-dependent path: one more add
            y = y + x
        return y


def test_a_forward_that_runs_other_ops_is_a_clear_error():
    calib = [torch.ones(4, 4), -torch.ones(4, 4)]
    config = QuantConfig(ops={"add": UINT8})
    with pytest.raises(lowbit.OpPointMismatch, match=r"module '' called 1 add op\(s\).*but 2"):
        quantize(Branchy().eval(), config, calib, progress=False)


def test_qat_trains_through_the_points(float_net, tmp_path):
    qat = prepare_qat(float_net, presets.int8_asymmetric(), _data(2), progress=False)
    assert len(qat.lowbit_summary.ops) == 6
    qat.train()
    x = _data(1, seed=4)[0]
    qat(x).square().mean().backward()
    assert qat.stem.module.weight.grad is not None
    qat.eval()
    converted = lowbit.convert(qat)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), qat(x), atol=1e-5, rtol=0)
    lowbit.save(converted, tmp_path / "qat.lowbit")  # the points' tracked ranges are kept
    loaded = lowbit.load(tmp_path / "qat.lowbit", copy.deepcopy(float_net))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), converted(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"config\.ops"):
        prepare_qat(float_net, QuantConfig(ops={"add": UINT8}))


class Attention(nn.Module):
    """The two matmuls of attention and a cat, all functional."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2)  # matmul_0
        out = torch.matmul(torch.softmax(scores / 8**0.5, -1), self.v(x))  # matmul_1
        return torch.cat([out, x], -1)  # cat_0


def test_matmul_and_cat_points_export_and_match_ort(tmp_path):
    torch.manual_seed(0)
    config = QuantConfig(ops={"matmul": UINT8, "cat": UINT8})
    calib = [torch.randn(4, 6, 8) for _ in range(2)]
    qmodel = quantize(Attention().eval(), config, calib, progress=False)
    assert [r.name for r in qmodel.lowbit_summary.ops] == ["matmul_0", "matmul_1", "cat_0"]
    x = torch.randn(4, 6, 8)
    path = export_onnx(qmodel, x, tmp_path / "a.onnx")
    scales = {"matmul_0.output_scale", "matmul_1.output_scale", "cat_0.output_scale"}
    assert _output_scales(path) == scales
    _check_against_ort(path, qmodel, x)


def test_the_dynamo_exporter_writes_the_points_too(asym, tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    from lowbit.export import _exporters

    monkeypatch.setattr(_exporters, "DEFAULT_EXPORTER", "dynamo")
    x = _data(1, seed=5)[0]
    path = export_onnx(asym, x[:1], tmp_path / "d.onnx")
    assert {"b1.add_0.output_scale", "b2.inner.add_0.output_scale"} <= _output_scales(path)
    _check_against_ort(path, asym, x)


class Softmaxes(nn.Module):
    """Three spellings of softmax and one sdpa call (its matmul, softmax, matmul)."""

    def forward(self, x: Tensor) -> Tensor:
        a = torch.nn.functional.softmax(x, dim=-1)
        b = torch.softmax(x, dim=-1) + a.softmax(-1)
        q = b.reshape(2, 1, -1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q).reshape(x.shape)


def test_softmax_points_and_sdpa_counted_as_its_ops():
    x = torch.randn(2, 6, 4)
    names = [s.name for s in find_op_sites(Softmaxes(), x)]
    assert names == [
        "softmax_0",
        "softmax_1",
        "softmax_2",
        "add_0",
        "matmul_0",
        "softmax_3",
        "matmul_1",
    ]
    spec = QuantSpec(bits=8, signed=False, granularity=PerTensor())
    config = QuantConfig(ops={"softmax": spec}, op_overrides={"softmax_[012]": None})
    qmodel = quantize(Softmaxes(), config, [x], progress=False)
    assert set(op_points(qmodel)[""].quantizers()) == {"softmax_3"}  # the one inside sdpa
    q = op_points(qmodel)[""]["softmax_3"]
    with torch.no_grad():
        b = torch.softmax(x, dim=-1) + torch.softmax(torch.softmax(x, -1), -1)
        v = b.reshape(2, 1, -1, 4)
        p = q(torch.softmax(v @ v.transpose(-2, -1) / 2.0, dim=-1))
        torch.testing.assert_close(qmodel(x), (p @ v).reshape(x.shape))
        assert not torch.allclose(qmodel(x), Softmaxes()(x))
