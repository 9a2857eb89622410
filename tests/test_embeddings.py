"""Embeddings with integer weights: per-row (or per-group) codes, simulated, converted (rows
gathered, only those dequantized), saved packed, and exported to ONNX (DequantizeLinear ->
Gather)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import lowbit
from lowbit import numerics, presets
from lowbit.config import QuantConfig
from lowbit.nn import IntEmbedding
from lowbit.spec import PerChannel, PerGroup, PerTensor, QuantSpec

ROWS, WIDTH = 50, 16

SPECS = {
    "int8 per row": QuantSpec(bits=8, granularity=PerChannel(0)),
    "int4 per row": QuantSpec(bits=4, granularity=PerChannel(0)),
    "uint4 affine per row": QuantSpec(
        bits=4, signed=False, symmetric=False, granularity=PerChannel(0)
    ),
    "int4 group 8": QuantSpec(bits=4, granularity=PerGroup(8)),
    "int2 per row": QuantSpec(bits=2, granularity=PerChannel(0)),
    "int8 per tensor": QuantSpec(bits=8, granularity=PerTensor()),
    "int8 per column": QuantSpec(bits=8, granularity=PerChannel(1)),
    "ternary": QuantSpec(bits=2, scheme="ternary", granularity=PerChannel(0)),
    "binary": QuantSpec(bits=1, scheme="binary", granularity=PerChannel(0)),
}
INDEX = torch.tensor([[0, 5, 49, 7], [3, 3, 1, 0]])


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(ROWS, WIDTH)
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.embed(ids))


def _net(seed: int = 0) -> TokenNet:
    torch.manual_seed(seed)
    return TokenNet().eval()


def _convert(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error", lowbit.LowbitWarning)  # an embedding has its kernel
        return lowbit.convert(model)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_integer_embedding_gathers_rows_exactly_as_the_simulation(spec: QuantSpec) -> None:
    emb = nn.Sequential(nn.Embedding(ROWS, WIDTH))
    sim = lowbit.quantize(emb, QuantConfig(weight=spec), [INDEX], progress=False)
    converted = _convert(sim)
    layer = converted[0]
    assert isinstance(layer, IntEmbedding) and layer.kernel == "gather"
    with torch.no_grad():
        torch.testing.assert_close(converted(INDEX), sim(INDEX), rtol=0, atol=0)
        empty = torch.zeros(0, 3, dtype=torch.long)
        assert converted(empty).shape == (0, 3, WIDTH)


def test_int4_rows_match_a_float64_formula_and_only_gathered_rows_are_dequantized(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emb = nn.Sequential(nn.Embedding(ROWS, WIDTH))
    converted = _convert(lowbit.quantize_weights(emb, bits=4))
    weight = emb[0].weight.detach().double()
    scale = weight.abs().amax(1, keepdim=True) / 7  # symmetric int4 per row: codes in [-8, 7]
    expected = (weight / scale).round().clamp(-8, 7) * scale
    shapes = []
    dequantize = numerics.dequantize
    monkeypatch.setattr(
        numerics, "dequantize", lambda q, *a: shapes.append(tuple(q.shape)) or dequantize(q, *a)
    )
    with torch.no_grad():
        out = converted(INDEX)
    torch.testing.assert_close(out.double(), expected[INDEX], rtol=1e-6, atol=1e-7)
    assert shapes == [(INDEX.numel(), WIDTH)]  # the rows looked up, not the table
    assert converted[0].qweight.dtype == torch.uint8  # packed, two codes a byte
    assert converted[0].qweight.numel() == ROWS * WIDTH // 2


def test_out_of_range_indices_raise() -> None:
    converted = _convert(lowbit.quantize_weights(nn.Sequential(nn.Embedding(ROWS, WIDTH)), bits=8))
    for bad in (torch.tensor([ROWS]), torch.tensor([-1])):
        with pytest.raises(IndexError, match="out of range"):
            converted(bad)


def test_embeddings_whose_rows_cannot_be_gathered_fall_back_to_the_whole_table() -> None:
    odd = nn.Sequential(nn.Embedding(ROWS, 12))  # 12 sign bits are not whole bytes
    sim = lowbit.quantize(odd, presets.binary(), [INDEX], progress=False)
    with pytest.warns(lowbit.LowbitWarning, match="dequantize-then-float"):
        converted = lowbit.convert(sim)
    assert converted[0].kernel == "dequantize"
    torch.testing.assert_close(converted(INDEX), sim(INDEX), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:lowbit.convert. no integer kernel")  # the tiny Linear head
def test_quantize_weights_quantizes_embeddings_unless_kept_float() -> None:
    net = _net()
    both = lowbit.quantize_weights(net, bits=4, group_size=8)
    assert isinstance(both.embed, IntEmbedding) and both.embed.kernel == "gather"
    assert both.embed.weight_spec.granularity == PerGroup(8)
    assert "Q embed" in str(both.lowbit_summary)
    linear_only = lowbit.quantize_weights(net, bits=4, layers=(nn.Linear,))
    assert isinstance(linear_only.embed, nn.Embedding)
    assert "F embed" in str(linear_only.lowbit_summary)


def test_save_load_round_trip_keeps_packed_codes(tmp_path: Path) -> None:
    converted = lowbit.quantize_weights(_net(), bits=4)
    path = tmp_path / "tokens.lowbit"
    lowbit.save(converted, path)
    restored = lowbit.load(path, _net(seed=1))
    assert isinstance(restored.embed, IntEmbedding) and restored.embed.kernel == "gather"
    torch.testing.assert_close(restored.embed.qweight, converted.embed.qweight, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(restored(INDEX), converted(INDEX), rtol=0, atol=0)


@pytest.mark.parametrize("bits, group", [(8, None), (4, None), (4, 8)])
def test_onnx_export_runs_in_onnxruntime_as_simulated(
    tmp_path: Path, bits: int, group: int | None
) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    emb = nn.Sequential(nn.Embedding(ROWS, WIDTH)).eval()
    sim = lowbit.quantize(emb, presets.weight_only(bits, group), [INDEX], progress=False)
    path = lowbit.export_onnx(sim, (INDEX,), tmp_path / "tokens.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops == ["DequantizeLinear", "Gather"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, ROWS, (5, INDEX.shape[1]), generator=torch.Generator().manual_seed(0))
    (out,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        np.testing.assert_array_equal(out, sim(ids).numpy())
