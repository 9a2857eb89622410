"""lowbit.io: save / load round trips, size on disk, bad files, atomic writes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import lowbit._atomic
import lowbit.io.lowbit_format
from lowbit import presets
from lowbit.cli import demo
from lowbit.io.lowbit_format import load, read_header, save
from lowbit.nn import IntConv, IntLinear
from lowbit.workflows.conversion import convert, quantize_dynamic, quantize_weights
from lowbit.workflows.quantization import quantize


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

    def failing_fsync(fd):
        raise OSError("disk full")  # after the whole file was written, before the rename

    monkeypatch.setattr(lowbit._atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        save(model, path)  # overwriting: the old file must survive intact
    with pytest.raises(OSError, match="disk full"):
        save(model, tmp_path / "new.lowbit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.lowbit"]
    assert path.read_bytes() == before
    monkeypatch.undo()

    with pytest.raises(OSError):
        save(model, tmp_path / "no_such_dir" / "m.lowbit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.lowbit"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_permissions_of_open(tmp_path, umask):
    """save and export_onnx create files as open() does: 0666 less the umask."""
    from lowbit.export import export_onnx

    model = _big()
    sim = quantize(model, presets.int8(), [torch.randn(8, 512)], progress=False)
    old = os.umask(umask)
    try:
        save(quantize_dynamic(model), tmp_path / "m.lowbit")
        _quiet(export_onnx, sim, torch.randn(1, 512), tmp_path / "m.onnx")
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"m.lowbit": 0o666 & ~umask, "m.onnx": 0o666 & ~umask, "plain": 0o666 & ~umask}


_HANGING_SAVE = """
import sys, time
import torch
from torch import nn
import lowbit._atomic
from lowbit.workflows.conversion import quantize_dynamic
from lowbit.io.lowbit_format import save

def hang(fd):  # the whole file is written: stop here until killed
    print("written", flush=True)
    time.sleep(600)

lowbit._atomic.os.fsync = hang
torch.manual_seed(0)
save(quantize_dynamic(nn.Sequential(nn.Linear(512, 512))), sys.argv[1])
"""


def _start_hanging_save(path: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", _HANGING_SAVE, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "written\n"
    return child


def test_a_killed_save_leaves_nothing_the_next_save_keeps(tmp_path):
    path, model = _saved(tmp_path)
    before = path.read_bytes()
    killed = [_start_hanging_save(path) for _ in range(2)]
    live = _start_hanging_save(path)
    try:
        for child in killed:
            child.kill()  # SIGKILL: no clean-up runs in the child
            child.wait()
        left = lowbit._atomic.temp_files(path)
        assert len(left) == 3 and all(p.stat().st_size > 100_000 for p in left)
        assert path.read_bytes() == before
        save(model, tmp_path / "other.lowbit")  # another target's temporary files stay
        assert len(lowbit._atomic.temp_files(path)) == 3
        save(model, path)  # removes the two the killed saves left, not the live one
        assert len(lowbit._atomic.temp_files(path)) == 1
    finally:
        live.kill()
        live.wait()
    save(model, path)
    assert lowbit._atomic.temp_files(path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.lowbit", "other.lowbit"]
    assert torch.equal(load(path, _big(seed=1))[0].qweight, model[0].qweight)


def test_read_header_reads_no_tensor(tmp_path, monkeypatch):
    path, _ = _saved(tmp_path)
    reads = []

    class CountingOpen:
        def __init__(self, *args, **kwargs):
            self.file = safe_open(*args, **kwargs)

        def __enter__(self):
            inner = self.file.__enter__()
            original = inner.get_tensor

            class Proxy:
                def __getattr__(self, name):
                    return getattr(inner, name)

                def get_tensor(self, key):
                    reads.append(key)
                    return original(key)

            return Proxy()

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

    monkeypatch.setattr(lowbit.io.lowbit_format, "safe_open", CountingOpen)
    assert read_header(path)["format"] == "lowbit"
    assert reads == []
    load(path, _big())
    assert sorted(reads) == sorted(quantize_dynamic(_big()).state_dict())


def test_extras_round_trip_and_load_ignores_them(tmp_path):
    model = quantize_dynamic(_big())
    path = tmp_path / "m.lowbit"
    blob = os.urandom(10_000)
    save(model, path, extras={"tool.blob": blob, "tool.empty": b""})
    assert read_header(path)["extras"] == ["tool.blob", "tool.empty"]
    assert lowbit.io.read_extra(path, "tool.blob") == blob
    assert lowbit.io.read_extra(path, "tool.empty") == b""
    assert lowbit.io.read_extra(path, "tool.none") is None
    both = lowbit.io.lowbit_format.read_extras(path, ["tool.blob", "tool.none", "tool.empty"])
    assert both == {"tool.blob": blob, "tool.empty": b""}
    (tmp_path / "x.lowbit").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a lowbit file"):
        lowbit.io.lowbit_format.read_extras(tmp_path / "x.lowbit", [])  # checked with no names
    x = torch.randn(2, 512)
    with torch.no_grad():
        assert torch.equal(load(path, _big(seed=1))(x), model(x))
    with pytest.raises(TypeError, match=r"extras\['x'\] must be bytes"):
        save(model, path, extras={"x": "text"})  # type: ignore[dict-item]


def _conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
        nn.LayerNorm(10),
    )


def _with(path: Path, out: Path, change) -> Path:
    """A copy of the lowbit file `path` with its tensors changed by `change(tensors)`."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    change(tensors)
    save_file(tensors, out, metadata=metadata)
    return out


def _set(key: str, make):
    def change(tensors):
        tensors[key] = make(tensors[key])

    return change


def _poke(key: str, value: float):
    def change(tensors):
        tensors[key].view(-1)[0] = value

    return change


def _packed_too_short(tensors):
    tensors["0.qweight"] = tensors["0.qweight"][:-1]


_CORRUPT = {  # the last layer ("4", an IntLinear) unless said otherwise
    "codes-shape": (_set("4.qweight", lambda t: t.t().contiguous()), "qweight is torch.int8 of"),
    "codes-int16": (_set("4.qweight", lambda t: t.to(torch.int16)), "expected torch.int8"),
    "codes-float": (_set("4.qweight", lambda t: t.float()), "expected torch.int8"),
    "codes-minus-128": (_poke("4.qweight", -128), r"outside \[-127, 127\]"),
    "conv-codes-minus-128": (_poke("0.qweight", -128), r"outside \[-127, 127\]"),
    "scale-shape": (_set("4.weight_scale", lambda t: t[:5]), "weight_scale is"),
    "scale-float64": (_set("4.weight_scale", lambda t: t.double()), "expected torch.float32"),
    "scale-zero": (_poke("4.weight_scale", 0.0), "not finite and positive"),
    "scale-nan": (_poke("4.weight_scale", float("nan")), "not finite and positive"),
    "input-scale-two": (_set("4.input_scale", lambda t: t.repeat(2)), "expected 1 value"),
    "input-zero-point": (_poke("4.input_zero_point", 200), r"outside \[-127, 127\]"),
    "input-zero-point-float": (_set("4.input_zero_point", lambda t: t.float()), "torch.int32"),
    "bias-shape": (_set("4.bias", lambda t: t[:5]), "bias is"),
    "bias-int": (_set("4.bias", lambda t: t.int()), "expected torch.float32"),
    "float-layer-int": (_set("5.weight", lambda t: t.int()), "5.weight is torch.int32"),
}


def _fingerprint(model: nn.Module) -> list[tuple[str, str, Tensor]]:
    return [(n, type(m).__name__, m) for n, m in model.named_modules()] + [
        (k, str(v.dtype), v.clone()) for k, v in model.state_dict().items()
    ]


def _unchanged(model: nn.Module, before: list) -> bool:
    after = _fingerprint(model)
    return len(after) == len(before) and all(
        a[:2] == b[:2]
        and (a[2] is b[2] if isinstance(a[2], nn.Module) else torch.equal(a[2], b[2]))
        for a, b in zip(after, before, strict=True)
    )


@pytest.mark.parametrize("kind", sorted(_CORRUPT))
def test_load_checks_every_tensor_before_touching_the_model(tmp_path, kind):
    model = _conv_net()
    x = torch.randn(16, 3, 8, 8)
    int_model = _quiet(convert, quantize(model, presets.int8(), [x], progress=False))
    assert [type(m).__name__ for m in int_model] == [
        "IntConv", "Identity", "ReLU", "Flatten", "IntLinear", "LayerNorm"
    ]  # fmt: skip
    path = tmp_path / "good.lowbit"
    save(int_model, path)
    change, message = _CORRUPT[kind]
    bad = _with(path, tmp_path / "bad.lowbit", change)
    skeleton = _conv_net(seed=1)
    before = _fingerprint(skeleton)
    with pytest.raises(ValueError, match=message):
        load(bad, skeleton)
    assert _unchanged(skeleton, before)
    with torch.no_grad():  # the good file still loads into the same skeleton
        assert torch.equal(load(path, skeleton)(x), int_model(x))


def test_load_checks_packed_codes_and_the_model(tmp_path):
    int_model = _quiet(quantize_weights, _big(), bits=4, group_size=128)
    path = tmp_path / "w4.lowbit"
    save(int_model, path)
    bad = _with(path, tmp_path / "bad.lowbit", _packed_too_short)
    skeleton = _big(seed=1)
    before = _fingerprint(skeleton)
    with pytest.raises(ValueError, match=r"not a lowbit file.*'0'.*qweight is torch.uint8"):
        load(bad, skeleton)
    assert _unchanged(skeleton, before)
    other = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256))
    before = _fingerprint(other)
    with pytest.raises(ValueError, match=r"does not match.*'2'.*\(512, 512\).*\(256, 512\)"):
        load(path, other)
    assert _unchanged(other, before)


def test_saved_tensors_read_back_with_safetensors(tmp_path):
    """lowbit writes the safetensors format itself (streamed, no copy): safetensors reads it."""
    holder = nn.Module()
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        holder.register_buffer(
            "t_" + str(dtype)[6:], torch.randn(3, 5, generator=generator).to(dtype)
        )
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        holder.register_buffer("t_" + str(dtype)[6:], torch.arange(-7, 8).to(dtype).reshape(5, 3))
    holder.register_buffer("bool", torch.tensor([True, False, True]))
    holder.register_buffer("scalar", torch.tensor(2.5))
    holder.register_buffer("empty", torch.zeros(0, 4))
    holder.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t())
    path = tmp_path / "dtypes.lowbit"
    save(holder, path)
    read = load_file(path)
    assert read.keys() == holder.state_dict().keys()
    for key, want in holder.state_dict().items():
        assert read[key].dtype == want.dtype and torch.equal(read[key], want), key
    assert read_header(path)["modules"] == []


@pytest.mark.skipif(importlib.util.find_spec("onnx2torch") is None, reason="needs onnx2torch")
def test_cli_file_from_an_onnx_with_free_input_shape_stores_it_whole(tmp_path):
    """Without a fixed input shape the graph without weights cannot be checked: stored whole."""
    from lowbit.cli.models import FLOAT_ONNX, load_model, save_lowbit

    model = _conv_net().eval()
    onnx_path = tmp_path / "free.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            nn.Sequential(*list(model)[:4]),  # conv, BN, ReLU, Flatten: any height and width
            (torch.randn(1, 3, 8, 8),),
            str(onnx_path),
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}},
        )
    loaded = load_model(str(onnx_path))
    assert loaded.input_shape is None
    int_model = _quiet(quantize_weights, loaded.model, bits=8, layers=(nn.Conv2d,))
    saved = tmp_path / "free.lowbit"
    save_lowbit(int_model, saved, loaded.recipe)
    stored = lowbit.io.read_extra(saved, FLOAT_ONNX)
    assert stored is not None and len(stored) >= onnx_path.stat().st_size
    onnx_path.unlink()
    x = torch.randn(2, 3, 10, 12)
    with torch.no_grad():
        assert torch.equal(load_model(str(saved)).model(x), int_model(x))


def test_load_checks_every_layer_name_before_touching_the_model(tmp_path):
    int_model = _quiet(
        convert, quantize(_conv_net(), presets.int8(), [torch.randn(16, 3, 8, 8)], progress=False)
    )
    path = tmp_path / "good.lowbit"
    save(int_model, path)
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["lowbit"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    assert header["identity"] == ["1"]  # the folded BatchNorm
    # "training" is an attribute of the skeleton but not a layer; "9" does not exist.
    for identity, message in (
        (["1", "training"], "no layer 'training'"),
        (["1", "9"], "no layer '9'"),
        (["1", ""], "a layer without a name"),
    ):
        bad = tmp_path / "bad.lowbit"
        save_file(tensors, bad, metadata={"lowbit": json.dumps(dict(header, identity=identity))})
        skeleton = _conv_net(seed=1)
        before = _fingerprint(skeleton)
        with pytest.raises(ValueError, match=message):
            load(bad, skeleton)
        assert _unchanged(skeleton, before)
