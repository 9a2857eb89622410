"""lowbit.io: save / load round trips, size on disk, bad files, atomic writes."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lowbit.io
from lowbit import demo, presets
from lowbit.api import quantize
from lowbit.conversion import convert, quantize_dynamic, quantize_weights
from lowbit.io import load, read_header, save
from lowbit.nn.int_modules import IntConv, IntLinear


def _big(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_round_trip_digits(tmp_path, digits, digits_net):
    sim = quantize(digits_net, presets.int8(), demo.calibration_batches(digits), progress=False)
    int_model = _quiet(convert, sim)
    path = tmp_path / "digits.lowbit"
    save(int_model, path)
    loaded = load(path, demo.DigitsNet())  # a fresh float skeleton: BatchNorms, no conv bias
    assert isinstance(loaded.features[0], IntConv) and isinstance(loaded.classifier, IntLinear)
    assert isinstance(loaded.features[1], nn.Identity)  # folded BatchNorm
    assert loaded.classifier.kernel == "int_mm"
    x = digits.x_test[:50]
    with torch.no_grad():
        assert torch.equal(loaded(x), int_model(x))
    header = read_header(path)
    assert header["format"] == "lowbit" and header["version"] == 1
    kinds = {r["name"]: r["kind"] for r in header["modules"]}
    assert kinds == {
        "features.0": "IntConv",
        "features.3": "IntConv",
        "features.6": "IntConv",
        "classifier": "IntLinear",
    }


@pytest.mark.parametrize(
    "make",
    [
        quantize_dynamic,
        lambda m: quantize_weights(m, bits=4, group_size=128),
        lambda m: quantize_weights(m, bits=16),
        lambda m: quantize_weights(m, bits=2, group_size=32),
    ],
)
def test_round_trip_workflows(tmp_path, make):
    model = _quiet(make, _big())
    path = tmp_path / "m.lowbit"
    save(model, path)
    loaded = _quiet(load, path, _big(seed=1))  # other float weights: all must come from the file
    x = torch.randn(3, 512)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for (n1, t1), (n2, t2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)


def test_size_on_disk(tmp_path):
    model = _big()
    float_path = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, float_path)
    fp32 = float_path.stat().st_size
    ratios = {}
    for label, make in {
        "int8": lambda m: quantize_weights(m, bits=8),
        "int16": lambda m: quantize_weights(m, bits=16),
        "int4_g128": lambda m: quantize_weights(m, bits=4, group_size=128),
        "dynamic_int8": quantize_dynamic,
    }.items():
        path = tmp_path / f"{label}.lowbit"
        save(_quiet(make, model), path)
        ratios[label] = path.stat().st_size / fp32
    print("size ratios vs fp32:", {k: round(v, 4) for k, v in ratios.items()})
    assert 0.25 <= ratios["int8"] < 0.26
    assert 0.25 <= ratios["dynamic_int8"] < 0.26
    assert 0.50 <= ratios["int16"] < 0.51
    assert 0.125 <= ratios["int4_g128"] < 0.14  # 1/8 plus one float32 scale per 128 weights


def _saved(tmp_path: Path) -> tuple[Path, nn.Module]:
    model = quantize_dynamic(_big())
    path = tmp_path / "good.lowbit"
    save(model, path)
    return path, model


def test_bad_files_raise_value_error(tmp_path):
    path, _ = _saved(tmp_path)
    garbage = tmp_path / "garbage.lowbit"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="not a lowbit file"):
        load(garbage, _big())
    text = tmp_path / "text.lowbit"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a lowbit file"):
        load(text, _big())
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, plain)
    with pytest.raises(ValueError, match=r"not a lowbit file.*metadata"):
        load(plain, _big())

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["lowbit"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    wrong_version = tmp_path / "v99.lowbit"
    save_file(tensors, wrong_version, metadata={"lowbit": json.dumps(dict(header, version=99))})
    with pytest.raises(ValueError, match=r"not a lowbit file.*version"):
        load(wrong_version, _big())
    for dropped in ("0.qweight", "2.bias"):
        missing = tmp_path / "missing.lowbit"
        partial = {k: v for k, v in tensors.items() if k != dropped}
        save_file(partial, missing, metadata={"lowbit": json.dumps(header)})
        with pytest.raises(ValueError, match=r"not a lowbit file.*missing"):
            load(missing, _big())
    truncated = tmp_path / "truncated.lowbit"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a lowbit file"):
        load(truncated, _big())
    with pytest.raises(ValueError, match="skeleton"):
        load(path)
    with pytest.raises(ValueError, match="does not match"):
        load(path, nn.Sequential(nn.Linear(512, 512)))
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.lowbit", _big())


def test_save_rejects_simulated_models(tmp_path):
    sim = quantize(_big(), presets.int8(), [torch.randn(8, 512)], progress=False)
    with pytest.raises(ValueError, match="convert"):
        save(sim, tmp_path / "sim.lowbit")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    path, model = _saved(tmp_path)
    before = path.read_bytes()

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(lowbit.io, "save_file", failing_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        save(model, path)  # overwriting: the old file must survive intact
    with pytest.raises(RuntimeError, match="disk full"):
        save(model, tmp_path / "new.lowbit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.lowbit"]
    assert path.read_bytes() == before
    monkeypatch.undo()

    with pytest.raises(OSError):
        save(model, tmp_path / "no_such_dir" / "m.lowbit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.lowbit"]
