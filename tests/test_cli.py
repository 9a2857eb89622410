"""The `lowbit` command driven as a user would: `main([...])` and one console-script call.

A tiny CNN (conv, depthwise conv with very different channel ranges, pointwise conv, linear) is
written as an importable factory module; data are random PNGs, an .npy and an .npz whose labels
are the float model's own predictions, so the float model scores 100 % and a good int8 model
nearly as much.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.cli.main import main
from lowbit.io.lowbit_format import read_extra

FACTORY_SOURCE = """
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def make():
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # depthwise channels spanning 100x: per-tensor weights suffer
        model.features[3].weight.mul_(torch.logspace(-2, 0, 8).view(8, 1, 1, 1))
    return model.eval()
"""
FACTORY = "lowbit_cli_tinynet:make"
SIZE = 16
THREADS = ["--threads", "1"]


@dataclass(frozen=True)
class Workspace:
    root: Path
    images: Path  # flat folder, <synset>_<name>.png, synsets.txt above it
    classes: Path  # class subfolders
    unlabelled: Path  # flat folder, no synsets
    calib_npy: Path
    labelled_npz: Path  # x and y = the float model's predictions
    float_onnx: Path


def _write_images(folder: Path, names: list[str], rng: np.random.Generator) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


def make_workspace(root: Path) -> Workspace:
    """The factory module (importable once `root` is on sys.path), images, arrays, ONNX."""
    (root / "lowbit_cli_tinynet.py").write_text(FACTORY_SOURCE)
    rng = np.random.default_rng(0)
    synsets = [f"n{10000000 + i:08d}" for i in range(10)]
    (root / "synsets.txt").write_text("\n".join(synsets) + "\n")
    _write_images(root / "images", [f"{synsets[i % 10]}_{i}.png" for i in range(12)], rng)
    for c in ("cat", "dog"):
        _write_images(root / "classes" / c, [f"{c}{i}.png" for i in range(3)], rng)
    _write_images(root / "unlabelled", [f"img{i}.png" for i in range(3)], rng)
    model = _build(root)
    x = torch.randn(48, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    np.save(root / "calib.npy", x[:32].numpy())
    np.savez(root / "labelled.npz", x=x.numpy(), y=y.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x[:1],),
            str(root / "float.onnx"),
            dynamo=False,
            opset_version=13,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
    return Workspace(
        root,
        root / "images",
        root / "classes",
        root / "unlabelled",
        root / "calib.npy",
        root / "labelled.npz",
        root / "float.onnx",
    )


def _build(root: Path) -> torch.nn.Module:
    """The float model, from the module file (the caller put `root` on sys.path)."""
    assert str(root) in sys.path
    return importlib.import_module(FACTORY.partition(":")[0]).make()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("cli")
    sys.path.insert(0, str(root))
    yield make_workspace(root)
    sys.path.remove(str(root))
    sys.modules.pop("lowbit_cli_tinynet", None)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code = main([*argv, "--json", *THREADS])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def run_fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    _, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert lines[-1].startswith("lowbit: error: ")
    return lines[-1]


# ---------------------------------------------------------------- quantize + eval round trips


def test_factory_to_lowbit_then_eval(workspace: Workspace, capsys: pytest.CaptureFixture) -> None:
    out = workspace.root / "tiny.int8.lowbit"
    result = run_json(
        capsys, "quantize", FACTORY, "--calib", str(workspace.images), "--size", str(SIZE),
        "--preset", "int8", "--calibrator", "percentile", "-o", str(out),
    )  # fmt: skip
    assert out.is_file() and result["output"] == str(out)
    assert result["calibration_samples"] == 12 and not result["random_calibration"]
    assert result["quantized_layers"] == ["features.0", "features.3", "features.6", "classifier"]
    assert result["quantized_bytes"] < result["float_bytes"] / 1.8

    npz = str(workspace.labelled_npz)
    fp32 = run_json(capsys, "eval", FACTORY, "--data", npz)
    assert fp32["top1"] == 100.0 and fp32["samples"] == 48
    # The .lowbit file says how to rebuild its skeleton: no --model-factory needed.
    int8 = run_json(capsys, "eval", str(out), "--data", npz)
    assert int8["engine"] == "pytorch" and int8["top1"] >= 80.0
    assert int8["top5"] >= int8["top1"]


def test_onnx_in_onnx_out_runs_in_onnxruntime(
    workspace: Workspace, capsys: pytest.CaptureFixture
) -> None:
    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed")
    out = workspace.root / "tiny.int8.onnx"
    run_json(
        capsys, "quantize", str(workspace.float_onnx), "--calib", str(workspace.calib_npy),
        "-o", str(out),
    )  # fmt: skip
    import onnx

    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    result = run_json(capsys, "eval", str(out), "--data", str(workspace.labelled_npz))
    assert result["engine"] == "onnxruntime" and result["top1"] >= 80.0
    # A .lowbit from an ONNX model rebuilds its skeleton from that ONNX file.
    saved = workspace.root / "from_onnx.lowbit"
    run_json(
        capsys, "quantize", str(workspace.float_onnx), "--calib", str(workspace.calib_npy),
        "--preset", "w8", "-o", str(saved),
    )  # fmt: skip
    assert run_json(capsys, "eval", str(saved), "--data", str(workspace.labelled_npz))["top1"] > 80


def test_lowbit_from_onnx_loads_without_the_onnx_file(
    workspace: Workspace, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed")
    moved = tmp_path / "float.onnx"
    shutil.copy(workspace.float_onnx, moved)
    saved = tmp_path / "from_onnx.lowbit"
    run_json(
        capsys, "quantize", str(moved), "--calib", str(workspace.calib_npy), "-o", str(saved),
    )  # fmt: skip
    data = str(workspace.labelled_npz)
    before = run_json(capsys, "eval", str(saved), "--data", data)
    moved.unlink()  # the .lowbit holds the float ONNX graph: it needs nothing else
    after = run_json(capsys, "eval", str(saved), "--data", data)
    assert after["top1"] == before["top1"] > 80.0
    import onnx

    weights = [i.raw_data for i in onnx.load(str(workspace.float_onnx)).graph.initializer]
    weight_bytes = sum(len(w) for w in weights if len(w) >= 64 * 4)
    stored = read_extra(saved, "cli.float_onnx")  # without the weights the .lowbit holds
    assert stored is not None and weight_bytes > 1000
    assert len(stored) < workspace.float_onnx.stat().st_size - weight_bytes * 0.9


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_file(workspace: Workspace, capsys: pytest.CaptureFixture, suffix: str) -> None:
    model = _build(workspace.root)
    with torch.no_grad():
        model.classifier.bias.fill_(0.5)
        model.classifier.bias[3] = 100.0  # class 3 always wins: top-1 is the share of 3s
    path = workspace.root / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    npz = str(workspace.labelled_npz)
    y = np.load(npz)["y"]
    result = run_json(capsys, "eval", FACTORY, "--weights", str(path), "--data", npz)
    assert result["top1"] == pytest.approx(100.0 * float((y == 3).mean()))

    wrong = workspace.root / f"wrong{suffix}"
    state = {"classifier.weight": torch.zeros(2, 2)}
    if suffix == ".pt":
        torch.save(state, wrong)
    else:
        from safetensors.torch import save_file

        save_file(state, str(wrong))
    message = run_fails(capsys, "eval", FACTORY, "--weights", str(wrong), "--data", npz)
    assert "do not fit the model" in message


def test_every_preset_writes_a_lowbit_file(
    workspace: Workspace, capsys: pytest.CaptureFixture
) -> None:
    presets = ("int8-asym", "w16", "w4", "w4a8", "dynamic", "binary", "ternary")
    for preset in (*presets, "xnor", "ternary-int8"):
        out = workspace.root / f"tiny.{preset}.lowbit"
        result = run_json(
            capsys, "quantize", FACTORY, "--calib", str(workspace.calib_npy), "--preset", preset,
            "-o", str(out),
        )  # fmt: skip
        assert out.is_file(), preset
        assert result["quantized_bytes"] < result["float_bytes"], preset
        run_json(capsys, "eval", str(out), "--data", str(workspace.labelled_npz))


def test_exclude_and_per_tensor(workspace: Workspace, capsys: pytest.CaptureFixture) -> None:
    out = workspace.root / "tiny.exclude.lowbit"
    result = run_json(
        capsys, "quantize", FACTORY, "--calib", str(workspace.calib_npy), "--per-tensor",
        "--exclude", "features.3", "--exclude", "classifier", "-o", str(out),
    )  # fmt: skip
    assert result["float_layers"] == ["features.3", "classifier"]
    message = run_fails(
        capsys, "quantize", FACTORY, "--calib", str(workspace.calib_npy), "--exclude", "nope*",
        "-o", str(out),
    )  # fmt: skip
    assert "match no module" in message


def test_random_calibration_warns(workspace: Workspace, capsys: pytest.CaptureFixture) -> None:
    out = workspace.root / "tiny.random.lowbit"
    code = main(
        ["quantize", FACTORY, "--input-shape", f"3,{SIZE},{SIZE}", "-o", str(out), *THREADS]
    )
    _, err = capsys.readouterr()
    assert code == 0 and out.is_file()
    assert "lowbit: warning: no --calib data: calibrating on random data" in err
    message = run_fails(capsys, "quantize", FACTORY, "-o", str(out))
    assert "--input-shape" in message


NOISY_SOURCE = """
import warnings

import torch
from torch import nn


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3)
        self.unused = nn.Linear(4, 4)  # never runs: lowbit warns that it stays in float

    def forward(self, x):
        warnings.warn("old_api is deprecated", UserWarning)  # another library's, every call
        warnings.warn("the default will change", FutureWarning)
        return self.conv(x).mean((2, 3))


def make():
    torch.manual_seed(0)
    return Noisy().eval()
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_warnings_show_once_and_lowbits_own_always(
    workspace: Workspace, capsys: pytest.CaptureFixture, verbose: bool
) -> None:
    (workspace.root / "lowbit_cli_noisy.py").write_text(NOISY_SOURCE)
    out = workspace.root / "noisy.lowbit"
    argv = ["quantize", "lowbit_cli_noisy:make", "--calib", str(workspace.calib_npy), "-o"]
    code = main([*argv, str(out), "--batch-size", "8", *THREADS, *["--verbose"] * verbose])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "lowbit: quantized 2 of 2 layers" in stdout  # the CLI prints the library's summary
    lines = err.splitlines()
    own = [line for line in lines if "saw no calibration data" in line]
    assert len(own) == 1 and own[0].startswith("lowbit: warning: 1 quantizer(s)")
    noise = [line for line in lines if "old_api is deprecated" in line]
    assert noise == [
        "lowbit: warning: old_api is deprecated (UserWarning from a library lowbit uses)"
    ]  # raised on every one of the forward passes, shown once
    deprecations = [line for line in lines if "the default will change" in line]
    assert len(deprecations) == verbose


def test_lowbit_warnings_have_their_own_category() -> None:
    import lowbit

    model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 4), "unused": torch.nn.Linear(4, 4)})
    calib = [torch.randn(2, 4)]
    with pytest.warns(lowbit.LowbitWarning, match="saw no calibration data"):
        lowbit.quantize(model, lowbit.presets.int8(), calib, forward=lambda m, x: m["used"](x))
    assert issubclass(lowbit.LowbitWarning, UserWarning)


def test_eval_image_folders(workspace: Workspace, capsys: pytest.CaptureFixture) -> None:
    by_synset = run_json(
        capsys, "eval", FACTORY, "--data", str(workspace.images), "--size", str(SIZE)
    )
    assert by_synset["samples"] == 12
    by_folder = run_json(
        capsys, "eval", FACTORY, "--data", str(workspace.classes), "--size", str(SIZE),
        "--preprocess", "inception", "--limit", "5",
    )  # fmt: skip
    assert by_folder["samples"] == 5
    message = run_fails(
        capsys, "eval", FACTORY, "--data", str(workspace.unlabelled), "--size", str(SIZE)
    )
    assert "no labels" in message and "synsets.txt" in message


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["quantize", "missing.onnx", "-o", "x.lowbit"], "no such file"),
        (["quantize", FACTORY, "-o", "x.pt"], "-o must end in .onnx or .lowbit"),
        (["quantize", "no_such_module_xyz:make", "-o", "x.lowbit"], "cannot import"),
        (["quantize", FACTORY, "--preset", "dynamic", "-o", "x.onnx"], "ONNX QDQ cannot"),
        (["quantize", FACTORY, "--calib", "missing_dir", "-o", "x.lowbit"], "no such file"),
        (["quantize", FACTORY, "--calib", "NAN", "-o", "x.lowbit"], "NaN"),
        (["eval", FACTORY, "--data", "CALIB"], "no labels"),
        (["eval", "model.pt", "--data", "CALIB"], "MODEL must be"),
        (["compare", FACTORY, "--calib", "CALIB", "--presets", "int9"], "--presets takes"),
        (["eval", "NAN", "--data", "CALIB"], "not a lowbit file"),
    ],
    ids=[
        "missing-model", "bad-suffix", "bad-factory", "dynamic-onnx", "missing-calib",
        "nan-calib", "unlabelled-npy", "unknown-model-kind", "bad-preset-list", "foreign-lowbit",
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line(
    workspace: Workspace,
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    argv: list[str],
    expected: str,
) -> None:
    bad = tmp_path / "nan.npy"
    np.save(bad, np.full((2, 3, SIZE, SIZE), np.nan, dtype=np.float32))
    foreign = tmp_path / "foreign.lowbit"
    foreign.write_bytes(b"not a safetensors file at all")
    substitutions = {"CALIB": str(workspace.calib_npy), "NAN": str(bad)}
    argv = [substitutions.get(a, a) for a in argv]
    if argv[:2] == ["eval", str(bad)]:
        argv[1] = str(foreign)
    argv = [str(tmp_path / a) if a.startswith("x.") else a for a in argv]
    assert expected in run_fails(capsys, *argv)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", FACTORY, "--preset", "int3", "-o", "x.lowbit"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["eval", FACTORY, "--data", "d", "--batch-size", "0"]) == 2


# ---------------------------------------------------------------- compare


def test_compare_table(workspace: Workspace, capsys: pytest.CaptureFixture) -> None:
    result = run_json(
        capsys, "compare", FACTORY, "--calib", str(workspace.calib_npy), "--data",
        str(workspace.labelled_npz), "--presets", "int8,w8", "--calibrators", "minmax,mse",
    )  # fmt: skip
    names = [r["variant"] for r in result["rows"]]
    assert names == ["float32", "int8 (minmax)", "int8 (mse)", "w8"]
    for row in result["rows"]:
        assert row["top1"] is not None and row["size_kib"] > 0 and row["latency_ms"] > 0
    assert result["rows"][0]["top1"] == 100.0
    assert result["rows"][1]["size_kib"] < result["rows"][0]["size_kib"] / 1.8
    slow = [r["variant"] for r in result["rows"][1:] if r["speedup"] <= 1]
    for name in slow:  # each slower variant gets its one-line reason
        assert any(name in n and "x float's time" in n for n in result["notes"])
    assert all(r["kernels"] for r in result["rows"])


def test_compare_human_output(workspace: Workspace, capsys: pytest.CaptureFixture) -> None:
    code = main(
        ["compare", FACTORY, "--calib", str(workspace.calib_npy), "--presets", "w8",
         "--no-latency", *THREADS]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "lowbit compare" in out and "agrees with float %" in out and "w8" in out


# ---------------------------------------------------------------- the console script


def test_console_script(workspace: Workspace) -> None:
    script = Path(sys.executable).parent / "lowbit"
    if not script.exists():
        pytest.skip("the lowbit console script is not installed next to this Python")
    done = subprocess.run(
        [str(script), "eval", FACTORY, "--data", str(workspace.labelled_npz), "--json", *THREADS],
        cwd=workspace.root,  # factories import from the current folder, as python -m does
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["top1"] == 100.0
    bad = subprocess.run(
        [str(script), "eval", "nope.onnx", "--data", "x"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("lowbit: error:")
    assert "Traceback" not in bad.stderr


def test_demo_command_is_registered() -> None:
    from lowbit.cli.main import build_parser

    args = build_parser().parse_args(["demo", "--calibrator", "entropy"])
    assert args.run.__name__ == "_demo" and args.calibrator == "entropy"


def test_demo_without_scikit_learn_names_the_extra(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    assert "pip install 'lowbit[cli]'" in run_fails(capsys, "demo")


def test_every_extra_named_in_messages_and_docs_exists() -> None:
    """`pip install 'lowbit[x]'` in an error message or a page must name a real extra."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    files = [root / "README.md", *(root / "docs").glob("*.md"), *(root / "src").rglob("*.py")]
    named = {
        (path.name, extra.strip())
        for path in files
        for group in re.findall(r"lowbit\[([\w,\s-]+)\]", path.read_text())
        for extra in group.split(",")
    }
    assert {name for _, name in named} >= {"cli", "report"}  # the search finds them
    assert [(path, name) for path, name in sorted(named) if name not in extras] == []


# ---------------------------------------------------------------- data


def test_preprocessing(workspace: Workspace) -> None:
    from lowbit.cli.data import load_data, make_preprocess

    inception = load_data(workspace.images, make_preprocess("inception", size=SIZE), batch_size=4)
    x, y = next(iter(inception))
    assert x.shape == (4, 3, SIZE, SIZE) and y.tolist() == [0, 0, 1, 1]  # n..0_0, n..0_10, ...
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0 and float(x.min()) < -0.9
    plain = make_preprocess("none", size=SIZE)(workspace.images / "n10000000_0.png")
    assert float(plain.min()) >= 0.0 and float(plain.max()) <= 1.0
    custom = make_preprocess("imagenet", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert custom.std == (0.25, 0.25, 0.25)
    native = make_preprocess("none")(workspace.images / "n10000000_0.png")
    assert native.shape == (3, 20, 24)  # no --size: the image as it is
    with pytest.raises(ValueError, match="--preprocess must be one of"):
        make_preprocess("caffe")


# ---------------------------------------------------------------- data the model does not take


def test_data_of_another_shape_than_the_onnx_input_exits_2(
    workspace: Workspace, capsys: pytest.CaptureFixture
) -> None:
    """float.onnx takes 3x16x16: 3x32x32 calibration data used to write an ONNX model whose input
    was 3x32x32, and eval failed with an ONNX Runtime traceback."""
    root = workspace.root
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.save(root / "wrong.npy", x)
    np.savez(root / "wrong.npz", x=x, y=np.zeros(4, dtype=np.int64))
    out = root / "wrong.int8.onnx"
    line = run_fails(
        capsys,
        "quantize",
        str(workspace.float_onnx),
        "--calib",
        str(root / "wrong.npy"),
        "-o",
        str(out),
    )
    assert "wrong.npy holds samples of shape 3x32x32" in line and "takes 3x16x16" in line
    assert not out.exists()
    line = run_fails(capsys, "eval", str(workspace.float_onnx), "--data", str(root / "wrong.npz"))
    assert "shape 3x32x32" in line and "takes 3x16x16" in line
    argv = ["quantize", str(workspace.float_onnx), "--input-shape", "3,32,32", "-o", str(out)]
    assert "it takes samples of shape 3x16x16" in run_fails(capsys, *argv)


def test_runtime_input_errors_exit_2_naming_the_batch(
    workspace: Workspace, capsys: pytest.CaptureFixture
) -> None:
    """Where the file cannot say the shape (dynamic height and width), the runtime's own
    rejection still comes out as one line that names the batch, for ONNX Runtime and PyTorch."""
    root = workspace.root
    head = torch.nn.Sequential(
        torch.nn.Conv2d(3, 2, 1), torch.nn.Flatten(), torch.nn.Linear(2 * SIZE * SIZE, 10)
    )
    dynamic = root / "dynamic_hw.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            head.eval(),
            (torch.randn(1, 3, SIZE, SIZE),),
            str(dynamic),
            dynamo=False,
            opset_version=13,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}},
        )
    small = root / "small.npz"
    np.savez(small, x=np.zeros((3, 3, 8, 8), np.float32), y=np.zeros(3, dtype=np.int64))
    line = run_fails(capsys, "eval", str(dynamic), "--data", str(small))
    assert line.startswith(
        "lowbit: error: --data batch 0 (a tensor of shape (3, 3, 8, 8), float32)"
    )
    assert "ONNX Runtime" in line
    four_channels = root / "four_channels.npz"
    np.savez(four_channels, x=np.zeros((3, 4, 8, 8), np.float32), y=np.zeros(3, dtype=np.int64))
    line = run_fails(capsys, "eval", FACTORY, "--data", str(four_channels))
    assert "--data batch 0 (a tensor of shape (3, 4, 8, 8), float32) does not fit the model" in line


def test_quantize_target_chooses_the_activation_type(
    workspace: Workspace, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    import onnx
    from onnx import TensorProto

    from lowbit.cli.quantize_cmd import TARGET_CHOICES
    from lowbit.export._targets import TARGETS

    assert TARGET_CHOICES == TARGETS
    types = {}
    for target in ("onnxruntime", "tensorrt"):
        out = tmp_path / f"{target}.onnx"
        run_json(
            capsys, "quantize", FACTORY, "--calib", str(workspace.calib_npy), "--target", target,
            "-o", str(out),
        )  # fmt: skip
        model = onnx.load(str(out))
        zero_points = {n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear"}
        types[target] = {t.data_type for t in model.graph.initializer if t.name in zero_points}
    assert types == {"onnxruntime": {TensorProto.UINT8}, "tensorrt": {TensorProto.INT8}}
