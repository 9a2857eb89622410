"""BRECQ / QDrop block reconstruction against its defining properties on a small residual CNN:
it lowers each block's output error below rounding to nearest, QDrop with a vanishing drop
probability is BRECQ, a seed reproduces a run, and the first and last layers stay at 8 bits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit import brecq
from lowbit.algorithms._blocks import find_blocks
from lowbit.algorithms.brecq import block_reconstruction
from lowbit.config import QuantConfig
from lowbit.nn.modules import quant_modules
from lowbit.spec import PerChannel, QuantSpec
from lowbit.workflows.quantization import quantize


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 2 * channels, 1)
        self.conv2 = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2 * channels)
        self.conv3 = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return x + self.conv3(y)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.Sequential(_Residual(8), _Residual(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stages(torch.relu(self.stem(x)))
        return self.fc(y.mean((2, 3)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return _Net().eval()


def _calib() -> list[torch.Tensor]:
    """Smooth, correlated images (white noise would make rounding to nearest optimal)."""
    torch.manual_seed(1)
    coarse = torch.randn(32, 3, 3, 3) + torch.randn(32, 1, 1, 1)
    x = nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=True)
    return list((x + 0.05 * torch.randn_like(x)).split(16))


def _w4a8() -> QuantConfig:
    return QuantConfig(
        weight=QuantSpec(bits=4, granularity=PerChannel(0)),
        input=QuantSpec(bits=8, narrow_range=True),
    )


FAST = {"iterations": 120, "batch_size": 8, "progress": False}
QUICK = {"iterations": 20, "batch_size": 8, "progress": False}  # properties, not quality


def _rtn(model: nn.Module) -> nn.Module:
    return quantize(model, _w4a8(), _calib(), progress=False)


def _block_error(qmodel: nn.Module, model: nn.Module, name: str, x: torch.Tensor) -> float:
    """The block's output error in `qmodel` on the input it receives there, against the float
    block on the float model's own input (an independent measurement from the report's)."""
    seen: dict[str, torch.Tensor] = {}

    def grab(key: str):
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            seen[key] = out

        return hook

    handles = [
        qmodel.get_submodule(name).register_forward_hook(grab("q")),
        model.get_submodule(name).register_forward_hook(grab("f")),
    ]
    with torch.no_grad():
        qmodel(x), model(x)
    for h in handles:
        h.remove()
    return float((seen["q"] - seen["f"]).pow(2).sum(1).mean())


def test_blocks_found_from_the_module_tree_or_by_name():
    qmodel = _rtn(_net())
    assert list(find_blocks(qmodel)) == ["stem", "stages.0", "stages.1", "fc"]
    assert list(find_blocks(qmodel, ["stages"])) == ["stem", "stages", "fc"]
    assert list(find_blocks(qmodel, max_layers=2)) == [
        "stem",
        *(f"stages.{i}.conv{j}" for i in (0, 1) for j in (1, 2, 3)),
        "fc",
    ]


def test_reconstruction_lowers_block_output_error_below_nearest():
    model, x = _net(), torch.cat(_calib())
    rtn = _rtn(model)
    rec = block_reconstruction(_rtn(model), _calib(), qdrop=0.0, weight_scales="keep", **FAST)
    report = rec.lowbit_brecq
    assert [b.name for b in report.blocks] == ["stem", "stages.0", "stages.1", "fc"]
    for b in report.blocks:
        assert b.mse_reconstructed <= b.mse_nearest, b
    assert sum(b.mse_reconstructed for b in report.blocks) < 0.7 * sum(
        b.mse_nearest for b in report.blocks
    )
    for name in ("stages.0", "stages.1"):
        assert _block_error(rec, model, name, x) < 0.8 * _block_error(rtn, model, name, x)
    with torch.no_grad():
        ref = model(x)
        assert (rec(x) - ref).pow(2).mean() < 0.7 * (rtn(x) - ref).pow(2).mean()
    for name, qm in quant_modules(rec).items():  # codes on the grid, one step from nearest
        wq = qm.weight_quantizer
        assert torch.equal(qm.quantized_weight(), qm.module.weight), name
        w_float = model.get_submodule(name).weight
        scale = wq.scale.reshape(-1, *[1] * (w_float.dim() - 1))
        codes_rec, codes_rtn = torch.round(qm.module.weight / scale), torch.round(w_float / scale)
        assert (codes_rec - codes_rtn).abs().max() <= 1, name
    assert "BRECQ reconstruction of 4 block(s)" in str(report)


def _state(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in qmodel.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qdrop_with_vanishing_probability_is_brecq_and_a_seed_reproduces_a_run():
    model = _net()
    cases = [("brecq", 0.0, 0), ("p0", 1e-12, 0), ("qdrop", 0.5, 0), ("again", 0.5, 0)]
    cases.append(("seed1", 0.5, 1))
    runs = {
        key: _state(block_reconstruction(_rtn(model), _calib(), qdrop=p, seed=s, **QUICK))
        for key, p, s in cases
    }
    assert _equal(runs["brecq"], runs["p0"])  # the QDrop path with no drop is BRECQ
    assert not _equal(runs["brecq"], runs["qdrop"])
    assert _equal(runs["qdrop"], runs["again"])  # reproducible with a seed
    assert not _equal(runs["qdrop"], runs["seed1"])


def test_brecq_keeps_first_and_last_layers_at_8_bits_and_learns_activation_scales():
    model = _net()
    rtn = _rtn(model)
    qmodel = brecq(model, _w4a8(), _calib(), **QUICK)
    report = qmodel.lowbit_brecq
    assert report.high_precision == ("stem", "fc")
    assert "kept at 8 bits: stem, fc" in str(report) and "QDrop (p=0.5)" in str(report)
    layers = quant_modules(qmodel)
    assert {n: m.weight_quantizer.spec.bits for n, m in layers.items()} == {
        n: 8 if n in ("stem", "fc") else 4 for n in layers
    }
    # The activation step sizes were learned: at least one moved from its calibrated value.
    moved = [
        n
        for n, m in layers.items()
        if n not in ("stem", "fc")
        and not torch.equal(m.input_quantizer.scale, quant_modules(rtn)[n].input_quantizer.scale)
    ]
    assert moved
    assert all(type(m) is type(model.get_submodule(n)) for n, m in model.named_modules())


def test_bad_inputs():
    model = _net()
    qmodel = _rtn(model)
    with pytest.raises(ValueError, match="qdrop"):
        block_reconstruction(qmodel, _calib(), qdrop=1.5, progress=False)
    with pytest.raises(ValueError, match="iterations"):
        block_reconstruction(qmodel, _calib(), iterations=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        block_reconstruction(qmodel, _calib(), batch_size=-1, progress=False)
    with pytest.raises(ValueError, match="weight_scales"):
        block_reconstruction(qmodel, _calib(), weight_scales="max", progress=False)
    with pytest.raises(ValueError, match="match no module"):
        block_reconstruction(qmodel, _calib(), blocks=["nothing.*"], progress=False)
    with pytest.raises(TypeError, match="name patterns"):
        block_reconstruction(qmodel, _calib(), blocks="stages", progress=False)
    with pytest.raises(ValueError, match="no quantized layers"):
        block_reconstruction(model, _calib(), progress=False)
    with pytest.raises(ValueError, match="empty"):
        block_reconstruction(qmodel, [], progress=False)
    with pytest.raises(TypeError, match="QuantConfig"):
        brecq(model, {}, _calib(), progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="first_last_bits"):
        brecq(model, _w4a8(), _calib(), first_last_bits=1, progress=False)
    assert _equal(_state(qmodel), _state(_rtn(model)))  # refused calls changed nothing
    assert copy.deepcopy(model) is not None
