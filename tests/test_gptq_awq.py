"""GPTQ, AWQ, SmoothQuant and the layer-input capture helper, on small synthetic models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import lowbit
from lowbit import numerics
from lowbit.algorithms.awq import InputScale, awq
from lowbit.algorithms.capture import (
    capture_batches,
    capture_inputs,
    execution_order,
    iter_layer_inputs,
)
from lowbit.algorithms.gptq import gptq, gptq_quantize_weight
from lowbit.algorithms.smoothquant import smoothquant
from lowbit.nn.modules import quant_modules
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.spec import PerChannel, PerGroup, QuantSpec

D = 64


@pytest.fixture(autouse=True)
def _no_grad():  # type: ignore[no-untyped-def]
    with torch.no_grad():
        yield


class PreLNBlock(nn.Module):
    """Pre-LN transformer block: LN -> Q, K, V -> attention -> O; LN -> fc1 -> GELU -> fc2."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / D**0.5, -1)
        x = x + self.o(att @ self.v(h))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class PostLN(nn.Module):
    """LN output feeds a Linear and a residual: folding into the LN would change the output."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(x)
        return h + self.fc(h)


def outlier_data(n_batches: int = 4, d: int = D, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    channel_scale = torch.ones(d)
    channel_scale[[3, 17, 40]] = 25.0
    return [torch.randn(4, 16, d, generator=g) * channel_scale for _ in range(n_batches)]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(PreLNBlock(), PreLNBlock()).eval()
    for p in m.parameters():  # non-trivial LayerNorm affine parameters
        if p.dim() == 1:
            p.data.add_(0.1 * torch.randn_like(p))
    return m


def all_quantizers_off(model: nn.Module) -> None:
    for q in model.modules():
        if isinstance(q, TensorQuantizer):
            q.set_mode("off")


# --- capture ---------------------------------------------------------------------------------


def test_capture_inputs_shapes_and_early_stop() -> None:
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    data = [torch.randn(3, 5, 8) for _ in range(2)]
    calls = []
    m[2].register_forward_hook(lambda *a: calls.append(1))
    x = capture_inputs(m, m[0], data)
    assert x.shape == (30, 8)
    assert torch.equal(x, torch.cat(data).reshape(-1, 8))
    assert calls == []  # the forward stopped at the captured layer
    assert capture_inputs(m, m[2], data, max_rows=20).shape == (20, 16)
    assert [t.shape for t in capture_batches(m, m[0], data)] == [(3, 5, 8)] * 2
    assert execution_order(m, [m[2], m[0]], data) == [m[0], m[2]]
    assert len(list(iter_layer_inputs(m, m[2], data))) == 2
    assert m[0]._forward_pre_hooks == {}
    with pytest.raises(ValueError, match="empty"):
        capture_inputs(m, m[0], [])
    with pytest.raises(ValueError, match="did not run"):
        capture_inputs(m, nn.Linear(8, 8), data)


# --- SmoothQuant -----------------------------------------------------------------------------


def test_smoothquant_keeps_float_outputs_and_flattens_outliers() -> None:
    model = make_model()
    data = outlier_data()
    x = torch.cat(data)
    ref = model(x)
    fc1_in_before = model[0].ln2(x).abs().amax((0, 1))
    smoothed = smoothquant(copy.deepcopy(model), data, alpha=0.5)
    torch.testing.assert_close(
        smoothed(x), ref, rtol=1e-5, atol=1e-5 * float(ref.detach().abs().max())
    )
    groups = dict(smoothed.lowbit_smoothquant)
    assert groups["0.ln1"] == ["0.q", "0.k", "0.v"]
    assert groups["0.ln2"] == ["0.fc1"]
    # the input of the smoothed layers has flatter channel maxima
    h = smoothed[0].ln1(x).abs().amax((0, 1))
    before = model[0].ln1(x).abs().amax((0, 1))
    assert float(h.max() / h.median()) < float(before.max() / before.median())
    assert fc1_in_before.numel() == D


def test_smoothquant_skips_producer_with_other_consumers() -> None:
    torch.manual_seed(0)
    model = PostLN().eval()
    data = outlier_data()
    x = torch.cat(data)
    ref = model(x)
    out = smoothquant(copy.deepcopy(model), data)
    assert out.lowbit_smoothquant == ()
    torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-6)


def test_smoothquant_bad_inputs() -> None:
    model = make_model()
    data = outlier_data(1)
    with pytest.raises(ValueError, match="empty"):
        smoothquant(model, [])
    with pytest.raises(ValueError, match="alpha"):
        smoothquant(model, data, alpha=1.5)
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        smoothquant(nn.Sequential(nn.LayerNorm(D)), data)
    q = lowbit.quantize(model, lowbit.presets.weight_only(8), data, progress=False)
    with pytest.raises(TypeError, match="before"):
        smoothquant(q, data)


# --- AWQ -------------------------------------------------------------------------------------


def test_awq_scaling_is_float_exact_and_beats_rtn() -> None:
    model = make_model()
    data = outlier_data()
    x = torch.cat(data)
    ref = model(x)
    rtn = lowbit.quantize(model, lowbit.presets.weight_only(4, 32), data, progress=False)
    scaled = awq(copy.deepcopy(rtn), data, progress=False)
    err_rtn = float((rtn(x) - ref).pow(2).mean())
    err_awq = float((scaled(x) - ref).pow(2).mean())
    assert err_awq < err_rtn
    records = {tuple(r["layers"]): r for r in scaled.lowbit_awq}
    assert records[("0.q", "0.k", "0.v")]["inverse_scale_in"] == "0.ln1"
    assert all(r["output_mse"] <= r["output_mse_rtn"] for r in scaled.lowbit_awq)
    # scaled float weights + folded / explicit input scales: the float function is unchanged
    all_quantizers_off(scaled)
    torch.testing.assert_close(
        scaled(x), ref, rtol=1e-5, atol=1e-5 * float(ref.detach().abs().max())
    )
    # the weight quantizer parameters follow the scaled weights
    for qm in quant_modules(scaled).values():
        s, _ = numerics.tensor_qparams(qm.module.weight, qm.weight_quantizer.spec)
        torch.testing.assert_close(qm.weight_quantizer.scale, s)


def test_awq_explicit_input_scale_wrapper() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)).eval()
    data = [x.abs() for x in outlier_data()]
    q = lowbit.quantize(model, lowbit.presets.weight_only(3, 32), data, progress=False)
    out = awq(q, data, progress=False)
    wrapped = [m for m in out.modules() if isinstance(m, InputScale)]
    assert wrapped, "a layer after GELU can only take an explicit input scale"
    x = torch.cat(data)
    all_quantizers_off(out)
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


def test_awq_bad_inputs() -> None:
    model = make_model()
    data = outlier_data(1)
    with pytest.raises(ValueError, match="no quantized layers"):
        awq(model, data)
    q = lowbit.quantize(model, lowbit.presets.weight_only(4), data, progress=False)
    with pytest.raises(ValueError, match="empty"):
        awq(q, [])
    with pytest.raises(ValueError, match="grid"):
        awq(q, data, grid=0)
    w4a8 = lowbit.quantize(model, lowbit.presets.w4a8(32), data, progress=False)
    with pytest.raises(ValueError, match="weight-only"):
        awq(w4a8, data, progress=False)
    ternary = lowbit.quantize(model, lowbit.presets.ternary(), data, progress=False)
    with pytest.raises(ValueError, match="not uniform"):
        awq(ternary, data, progress=False)


# --- GPTQ ------------------------------------------------------------------------------------


def correlated_data(n_batches: int = 4, d: int = D, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    scale = torch.linspace(0.2, 3.0, d)
    return [(torch.randn(8, 16, d, generator=g) @ mix) * scale for _ in range(n_batches)]


@pytest.mark.parametrize(
    ("group_size", "act_order"), [(None, False), (32, False), (None, True), (32, True)]
)
def test_gptq_beats_round_to_nearest(group_size: int | None, act_order: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(D, 96)).eval()
    data = correlated_data()
    x = torch.cat(data)
    ref = layer(x)
    rtn = lowbit.quantize(layer, lowbit.presets.weight_only(4, group_size), data, progress=False)
    out = gptq(copy.deepcopy(rtn), data, act_order=act_order, progress=False)
    err_rtn = float((rtn(x) - ref).pow(2).mean())
    err_gptq = float((out(x) - ref).pow(2).mean())
    assert err_gptq < 0.9 * err_rtn
    # the existing weight quantizer reproduces the GPTQ weights exactly
    qm = quant_modules(out)["0"]
    assert torch.equal(qm.quantized_weight(), qm.module.weight)
    if group_size:
        assert qm.weight_quantizer.scale.shape == (96, D // group_size)


def test_gptq_whole_model_and_conv() -> None:
    model = make_model()
    data = outlier_data()
    x = torch.cat(data)
    ref = model(x)
    rtn = lowbit.quantize(model, lowbit.presets.weight_only(4, 32), data, progress=False)
    out = gptq(copy.deepcopy(rtn), data, progress=False)
    assert float((out(x) - ref).pow(2).mean()) < float((rtn(x) - ref).pow(2).mean())
    torch.manual_seed(0)
    conv = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding="same")
    ).eval()
    cdata = [torch.randn(4, 8, 8, 8) for _ in range(4)]
    cx = torch.cat(cdata)
    cref = conv(cx)
    cfg = lowbit.QuantConfig(weight=QuantSpec(bits=4, granularity=PerGroup(4, axis=1)))
    crtn = lowbit.quantize(conv, cfg, cdata, progress=False)
    cout = gptq(copy.deepcopy(crtn), cdata, progress=False)
    assert float((cout(cx) - cref).pow(2).mean()) < float((crtn(cx) - cref).pow(2).mean())
    for qm in quant_modules(cout).values():
        assert torch.equal(qm.quantized_weight(), qm.module.weight)


def reference_obq(w: Tensor, h: Tensor, scale: Tensor, spec: QuantSpec) -> Tensor:
    """Straightforward float64 sequential quantization with optimal error compensation.

    Column i is rounded; the rest of the row absorbs the error through the inverse Hessian of the
    remaining columns, which is then updated by eliminating column i (Frantar et al. 2022, eq. 2-3).
    """
    w = w.double().clone()
    hinv = torch.linalg.inv(h.double())
    q = torch.zeros_like(w)
    s = scale.double().unsqueeze(1)
    for i in range(w.shape[1]):
        q[:, i] = torch.clamp(torch.round(w[:, i] / s[:, 0]), spec.qmin, spec.qmax) * s[:, 0]
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i + 1 :] -= err.unsqueeze(1) * hinv[i, i + 1 :].unsqueeze(0)
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return q


def test_gptq_matches_float64_reference() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 32, generator=g)
    x = correlated_data(1, 32, seed=2)[0].reshape(-1, 32)
    h = 2 * x.double().T @ x.double() / x.shape[0]
    damp = 0.01
    h_damped = h + damp * torch.diag(h).mean() * torch.eye(32, dtype=torch.float64)
    spec = QuantSpec(bits=4, granularity=PerChannel(0))
    scale, zp = numerics.tensor_qparams(w, spec)
    es = scale.unsqueeze(1).expand_as(w)
    ez = zp.unsqueeze(1).expand_as(w)
    expected = reference_obq(w, h_damped, scale, spec)
    for block in (1, 5, 128):
        got = gptq_quantize_weight(w, h, spec, scale=es, zero_point=ez, block_size=block, damp=damp)
        torch.testing.assert_close(got.weight.double(), expected.float().double())
        assert torch.equal(
            got.codes, numerics.quantize(got.weight, scale, zp, spec).to(torch.int32)
        )
    # act_order is the same procedure on permuted columns
    perm = torch.argsort(torch.diag(h), descending=True)
    expected_ao = reference_obq(w[:, perm], h_damped[perm][:, perm], scale, spec)
    got_ao = gptq_quantize_weight(
        w, h, spec, scale=es, zero_point=ez, damp=damp, act_order=True
    ).weight
    torch.testing.assert_close(got_ao[:, perm].double(), expected_ao.float().double())


def test_gptq_bad_inputs() -> None:
    model = make_model()
    data = outlier_data(1)
    with pytest.raises(ValueError, match="no quantized layers"):
        gptq(model, data)
    q = lowbit.quantize(model, lowbit.presets.weight_only(4), data, progress=False)
    with pytest.raises(ValueError, match="empty"):
        gptq(q, [])
    with pytest.raises(ValueError, match="block_size"):
        gptq(q, data, block_size=0)
    with pytest.raises(ValueError, match="damp"):
        gptq(q, data, damp=float("nan"))
    ternary = lowbit.quantize(model, lowbit.presets.ternary(), data, progress=False)
    with pytest.raises(ValueError, match="not uniform"):
        gptq(ternary, data, progress=False)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        gptq("model", data)  # type: ignore[arg-type]


def test_smoothquant_explicit_smooths_what_no_producer_absorbs(tmp_path) -> None:
    """Post-LN: the LayerNorm also feeds the residual, so only an explicit factor smooths fc;
    the float function is unchanged, fc's input is flatter, and the export carries the Mul."""
    torch.manual_seed(0)
    model = PostLN().eval()
    data = outlier_data()
    x = torch.cat(data)
    ref = model(x)
    out = smoothquant(copy.deepcopy(model), data, alpha=0.95, explicit=True)
    assert out.lowbit_smoothquant == (("explicit", ["fc"]),)
    assert isinstance(out.fc, InputScale)
    torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    before = model.ln(x).abs().amax((0, 1))
    after = (model.ln(x) * out.fc.inv_scale).abs().amax((0, 1))
    assert float(after.max() / after.median()) < 0.5 * float(before.max() / before.median())
    qmodel = lowbit.quantize(out, lowbit.presets.int8(fusable_outputs=False), data, progress=False)
    assert "fc.layer" in quant_modules(qmodel)
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "smoothed.onnx"
    lowbit.export_onnx(qmodel, x[:1], path)
    nodes = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert nodes.index("Mul") < nodes.index("QuantizeLinear")  # x / s, then quantized
