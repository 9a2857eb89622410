"""`lowbit report` and `compare`: one self-contained HTML file (checked in headless chromium where
installed), latency measured in interleaved rounds, one calibration pass for every calibrator,
layers ranked by their own cost and fixes proposed only where measured to help."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_cli import FACTORY, THREADS, Workspace, make_workspace
from torch import nn

from lowbit.cli.main import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("report")
    sys.path.insert(0, str(root))
    yield make_workspace(root)
    sys.path.remove(str(root))
    sys.modules.pop("lowbit_cli_tinynet", None)


@pytest.fixture(scope="module")
def report(workspace: Workspace) -> tuple[Path, dict]:
    pytest.importorskip("matplotlib")
    out = workspace.root / "report.html"
    argv = [
        "report", FACTORY, "--calib", str(workspace.calib_npy), "--data",
        str(workspace.labelled_npz), "--per-tensor", "--no-latency", "-o", str(out), "--json",
        *THREADS,
    ]  # fmt: skip
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(argv) == 0
    return out, json.loads(buffer.getvalue())


def test_report_is_self_contained(report: tuple[Path, dict]) -> None:
    path, _ = report
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    kinds = {alt for alt, _ in images}
    assert {"per-layer SQNR", "activation histogram", "per-channel weight ranges"} <= kinds
    assert all(len(data) > 2000 for _, data in images)
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)  # nothing fetched
    assert "<script" not in page


def test_report_names_the_weak_layers_and_the_fixes(report: tuple[Path, dict]) -> None:
    path, result = report
    page = path.read_text()
    variants = [r["variant"] for r in result["rows"]]
    assert variants == [
        "float32",
        "int8 (minmax) per-tensor",
        "int8 (percentile) per-tensor",
        "int8 (entropy) per-tensor",
        "int8 (mse) per-tensor",
    ]
    worst = result["worst_layers"]
    assert len(worst) == 3 and worst[0]["sqnr_db"] <= worst[1]["sqnr_db"] <= worst[2]["sqnr_db"]
    for layer in worst:
        # Every fix was measured: proposed ones gained >= 1 dB, the others are listed as tried.
        assert all(_gain(f) >= 1.0 for f in layer["fixes"])
        assert all(_gain(f) < 1.0 for f in layer["tried"])
        assert len(layer["fixes"]) + len(layer["tried"]) == 2  # float, and per-channel weights
        assert layer["layer"] in page
    assert "with this layer alone quantized" in page
    assert "depthwise convolutions" in page
    assert all(c in page for c in ("minmax", "percentile", "entropy", "mse"))


def _gain(fix: str) -> float:
    return float(re.search(r"model output SQNR ([+-][0-9.]+) dB", fix).group(1))  # type: ignore[union-attr]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(report: tuple[Path, dict]) -> None:
    from PIL import Image, ImageStat

    path, _ = report
    shot = path.with_suffix(".png")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                str(_chromium()),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--screenshot={shot}",
                "--window-size=1200,3000",
                path.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        gray = image.convert("L")
        # Drawn content: many dark pixels (text, bars), not a blank or error page.
        top = gray.crop((0, 0, 1200, 1500))
        dark = sum(top.point(lambda v: 255 if v < 128 else 0).histogram()[255:])
        assert dark > 5000
        assert ImageStat.Stat(gray).stddev[0] > 20
    keep = Path(tempfile.gettempdir()) / "lowbit-report-screenshot.png"
    shutil.copy(shot, keep)  # for a person to look at


# ---------------------------------------------------------------- what to try


class Rescale(nn.Module):
    """Multiplies each channel by a fixed factor (no weights to quantize)."""

    def __init__(self, factors: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("factors", factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factors


def _spread_channels_net() -> nn.Module:
    """Linear whose output channels span 1000x, rescaled to one size before the next Linear:
    every channel matters equally, so per-tensor weights in the first layer wipe out the small
    ones, and only there."""
    torch.manual_seed(0)
    first, second = nn.Linear(16, 16), nn.Linear(16, 4)
    scales = torch.logspace(-3, 0, 16)
    with torch.no_grad():
        first.weight.mul_(scales[:, None])
        first.bias.mul_(scales)
    return nn.Sequential(first, Rescale(1 / scales), second).eval()


def _quantized(model: nn.Module, per_tensor: bool) -> tuple[nn.Module, list, list]:
    """int8 weights and inputs only (no output quantizers: the layers' own costs stay apart)."""
    from dataclasses import replace

    import lowbit
    from lowbit.cli.data import TensorBatches
    from lowbit.cli.variants import preset_config
    from lowbit.report import analysis

    calib = TensorBatches(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), None, 32)
    config = preset_config("int8", per_tensor=per_tensor)
    assert config is not None
    qmodel = lowbit.quantize(model, replace(config, fusable_outputs=False), calib, progress=False)
    batches = list(calib)
    return qmodel, batches, analysis.model_outputs(model, batches)


def test_layers_rank_by_their_own_cost_and_fixes_are_measured() -> None:
    from lowbit.report import analysis

    model = _spread_channels_net()
    qmodel, batches, reference = _quantized(model, per_tensor=True)
    effects = analysis.layer_effects(qmodel, batches, reference)
    assert [e.layer for e in effects] == ["0", "2"]  # the 1000x-channel layer first
    assert effects[0].output_sqnr_db < effects[1].output_sqnr_db
    # Quantizing it alone is what the whole model loses, to a fraction of a dB.
    base = analysis.output_sqnr(reference, analysis.model_outputs(qmodel, batches))
    assert base <= effects[0].output_sqnr_db + 0.5
    (fix, _) = analysis.suggest_fixes(
        qmodel, effects, batches, reference, base, per_tensor=True, worst=2
    )
    assert fix.layer == "0"
    proposed = {a.rsplit(" (model", 1)[0]: _gain(a) for a in fix.actions}
    assert proposed["per-channel weights (drop --per-tensor)"] > 10.0
    assert proposed["keep it in float: --exclude '0'"] > 10.0
    # The trial left the model as it was.
    assert analysis.output_sqnr(reference, analysis.model_outputs(qmodel, batches)) == base


def test_no_fix_is_proposed_when_none_helps() -> None:
    from lowbit.report import _fixes_caption, analysis

    torch.manual_seed(0)
    layers = [nn.Linear(16, 16) for _ in range(12)]
    for layer in layers:  # orthogonal: every layer passes the signal on at the same size
        nn.init.orthogonal_(layer.weight)
        nn.init.zeros_(layer.bias)
    model = nn.Sequential(*layers).eval()
    qmodel, batches, reference = _quantized(model, per_tensor=False)
    effects = analysis.layer_effects(qmodel, batches, reference)
    base = analysis.output_sqnr(reference, analysis.model_outputs(qmodel, batches))
    fixes = analysis.suggest_fixes(qmodel, effects, batches, reference, base, per_tensor=False)
    # Twelve alike layers share the loss: keeping any one in float removes about a twelfth of
    # the noise, a fraction of a dB, so nothing is proposed and the report says so.
    assert len(fixes) == 3 and all(not f.actions and len(f.tried) == 1 for f in fixes)
    assert all(_gain(f.tried[0]) < 1.0 for f in fixes)
    assert "None of the fixes tried helps" in _fixes_caption(fixes, [], 64)


# ---------------------------------------------------------------- one calibration pass


def test_one_calibration_pass_gives_each_calibrators_ranges() -> None:
    from lowbit.cli.data import TensorBatches
    from lowbit.cli.variants import make_variant, preset_variant
    from lowbit.evaluate.compare import quantize_variants
    from lowbit.nn.quantizer import TensorQuantizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(24, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    x[0, 0, 0, 0] = 9.0  # an outlier, so that the calibrators disagree
    calib = TensorBatches(x, None, 8)
    calls = []
    model[0].register_forward_pre_hook(lambda _m, _i: calls.append(1))
    make_variant(model, "int8", calib, progress=False)
    one_quantization = len(calls)
    calls.clear()
    names = ["minmax", "percentile", "entropy", "mse"]
    configs = dict(preset_variant("int8", name) for name in names)
    variants = quantize_variants(model, configs, calib, progress=False)
    assert len(calls) == one_quantization  # four calibrators, the forward passes of one

    def scales(m: nn.Module) -> dict[str, torch.Tensor]:
        return {n: q.scale for n, q in m.named_modules() if isinstance(q, TensorQuantizer)}

    for name, variant in zip(names, variants, strict=True):
        direct = make_variant(model, "int8", calib, calibrator=name, progress=False)
        assert variant.name == direct.name and variant.calibrator == name
        for key, scale in scales(direct.model).items():
            assert torch.equal(scales(variant.model)[key], scale), (name, key)
    assert len({float(scales(v.model)["0.input_quantizer"]) for v in variants}) > 1


def test_configs_alike_but_for_the_calibrator_share_one_calibration_pass() -> None:
    from dataclasses import replace

    from lowbit import presets
    from lowbit.cli.data import TensorBatches
    from lowbit.evaluate.compare import quantize_variants
    from lowbit.workflows.conversion import quantize_dynamic

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    calib = TensorBatches(torch.randn(32, 8, generator=torch.Generator().manual_seed(3)), None, 8)
    calls = []
    model[0].register_forward_pre_hook(lambda _m, _i: calls.append(1))  # copies keep it
    configs = {
        "minmax": presets.int8("minmax"),
        "w8": presets.weight_only(8),
        "mse": presets.int8("mse"),
        "p99": replace(presets.int8("percentile"), calibrator_args={"p": 99.0}),
        "dynamic": quantize_dynamic,
    }

    def passes(chosen: dict) -> int:
        calls.clear()
        quantize_variants(model, chosen, calib, progress=False)
        return len(calls)

    alone = {name: passes({name: how}) for name, how in configs.items()}
    assert alone["mse"] > 0
    assert passes(configs) == sum(alone.values()) - alone["mse"]  # mse rode on minmax's pass
    variants = {v.name: v for v in quantize_variants(model, configs, calib, progress=False)}
    assert list(variants) == list(configs)
    assert variants["minmax"].histograms and variants["minmax"].model is not variants["mse"].model
    assert variants["mse"].histograms is variants["minmax"].histograms
    assert variants["p99"].histograms == {} and variants["p99"].calibrator == "percentile"
    assert variants["w8"].calibrator is None and variants["dynamic"].config is None


# ---------------------------------------------------------------- latency


class FakeClock:
    """Time that passes only when a fake model runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_latency_warms_up_then_interleaves_rounds() -> None:
    from lowbit.evaluate.latency import measure_latencies

    clock, calls = FakeClock(), []

    def model(name: str, seconds: float):  # type: ignore[no-untyped-def]
        def run(_x: torch.Tensor) -> None:
            calls.append(name)
            clock.now += seconds

        return run

    predicts = {"a": model("a", 0.002), "b": model("b", 0.001), "c": model("c", 0.004)}
    result = measure_latencies(predicts, torch.zeros(1), warmup=2, rounds=4, clock=clock)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, untimed
    rounds = [calls[6 + 3 * r : 9 + 3 * r] for r in range(4)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every model once per round
    assert [r[0] for r in rounds] == ["a", "b", "c", "a"]  # in a rotating order
    assert result["a"].median_ms == pytest.approx(2.0) and result["a"].runs == 4
    assert result["c"].median_ms == pytest.approx(4.0) and result["c"].spread < 1e-9
    assert not result["b"].noisy


def test_latency_spread_flags_a_busy_machine() -> None:
    from lowbit.evaluate.compare import Comparison, Variant
    from lowbit.evaluate.latency import measure_latencies

    clock = FakeClock()
    steady_times, busy_times = iter([2.0] * 20), iter([1.0, 1.0, 2.0, 1.0, 3.0, 1.0, 2.5] * 3)

    def steady(_x: torch.Tensor) -> None:
        clock.now += next(steady_times) / 1e3

    def busy(_x: torch.Tensor) -> None:
        clock.now += next(busy_times) / 1e3

    result = measure_latencies(
        {"steady": steady, "busy": busy}, torch.zeros(1), warmup=0, rounds=7, clock=clock
    )
    assert result["busy"].median_ms == pytest.approx(1.0)
    assert result["busy"].high_ms == pytest.approx(2.25)  # third quartile of the 7 rounds
    assert result["busy"].noisy and not result["steady"].noisy
    net = nn.Linear(2, 2)
    variants = [Variant("float32", net, latency=result["steady"])]
    variants.append(Variant("int8 (minmax)", net, latency=result["busy"]))
    (note,) = Comparison(variants).notes()
    assert "spread up to 125%" in note and "int8 (minmax)" in note and "float32" not in note


def test_latency_time_budget_keeps_a_minimum_of_rounds() -> None:
    from lowbit.evaluate.latency import measure_latencies

    clock = FakeClock()

    def slow(_x: torch.Tensor) -> None:
        clock.now += 5.0

    result = measure_latencies(
        {"slow": slow}, torch.zeros(1), warmup=1, rounds=9, min_rounds=3, max_seconds=1.0,
        clock=clock,
    )  # fmt: skip
    assert result["slow"].runs == 3
    with pytest.raises(ValueError, match="min_rounds"):
        measure_latencies({"slow": slow}, torch.zeros(1), min_rounds=0)


def _timed(name: str, median: float, spread: float = 0.02, **kwargs: object) -> object:
    from lowbit.evaluate.compare import Variant
    from lowbit.evaluate.latency import Latency

    low, high = median * (1 - spread / 2), median * (1 + spread / 2)
    latency = Latency(median, low, high, low, 7)
    return Variant(name, nn.Linear(2, 2), latency=latency, **kwargs)  # type: ignore[arg-type]


def test_a_slower_variant_is_explained_in_one_line() -> None:
    from lowbit.evaluate.compare import Comparison

    float32 = _timed("float32", 10.0)
    integer = {("conv", "onednn_qconv"): 49, ("linear", "int_mm"): 1}
    fast = _timed("int8 (minmax)", 4.0, kernel_counts=integer)
    weight_only = {("conv", "dequantize"): 49, ("linear", "int8pack"): 1}
    w8 = _timed("w8", 13.0, kernel_counts=weight_only)
    same = _timed("int8 (mse)", 10.1, spread=0.1, kernel_counts=integer)
    tiny = _timed("int8 (entropy)", 12.0, kernel_counts=integer)
    same2 = _timed("int8 (percentile)", 10.3, spread=0.1, kernel_counts=integer)
    tiny2 = _timed("w4a8", 12.5, kernel_counts=integer)
    variants = [float32, fast, w8, same, tiny, same2, tiny2]
    notes = Comparison(variants).notes()  # type: ignore[arg-type]
    assert len(notes) == 3 and all("\n" not in n for n in notes)  # one line per reason
    assert notes[0] == (
        "w8 takes 1.30x float's time: 49 of 50 layers have no integer kernel for this preset "
        "and dequantize their weights to compute in float"
    )
    assert notes[1] == (
        "int8 (mse), int8 (percentile) take 1.01-1.03x float's time, within the spread of the "
        "measurements: no measurable difference"
    )
    integer_line = "every layer runs an integer kernel (49 conv oneDNN int8, 1 linear int8 GEMM)"
    assert notes[2].startswith("int8 (entropy), w4a8 take 1.20-1.25x") and integer_line in notes[2]
    assert Comparison([float32, fast]).notes() == []  # type: ignore[list-item]


def test_kernels_of_the_converted_model_are_reported() -> None:
    from lowbit.cli.data import TensorBatches
    from lowbit.cli.variants import make_variant
    from lowbit.evaluate.compare import Variant, deployable, kernel_summary, layer_kernels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    calib = TensorBatches(torch.randn(8, 3, 8, 8), None, 8)
    variant = make_variant(model, "int8", calib, progress=False)
    converted = deployable(variant)
    counts = layer_kernels(converted)
    assert counts == {("conv", converted[0].kernel): 1, ("linear", converted[2].kernel): 1}
    assert kernel_summary({}) == "float"
    assert layer_kernels(deployable(Variant("float32", model))) == {}


# ---------------------------------------------------------------- optional dependency


def test_report_without_matplotlib_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    # The model does not exist: the check comes first, before any loading or calibration.
    code = main(["report", "missing.onnx", "-o", "r.html"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "needs matplotlib" in err and "missing.onnx" not in err


def test_compare_runs_the_float_model_once_for_agreement() -> None:
    from lowbit.cli.data import TensorBatches
    from lowbit.cli.variants import preset_variant
    from lowbit.evaluate.accuracy import top1_agreement
    from lowbit.evaluate.compare import compare

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    calib = TensorBatches(torch.randn(40, 8, generator=torch.Generator().manual_seed(5)), None, 16)
    calls = []
    model.register_forward_pre_hook(lambda m, _i: calls.append(m is model))  # copies keep it
    configs = dict(preset_variant("int8", name) for name in ["minmax", "mse"])
    result = compare(model, calib, configs, data=None, latency=False, progress=False)
    assert sum(calls) == len(calib)  # quantizing works on copies; agreement reuses the logits
    assert all(v.agreement is not None and v.agreement > 80 for v in result.variants[1:])
    a = [torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 1.0]])]
    b = [torch.tensor([[0.0, 2.0, 0.5], [0.0, 0.0, 1.0]])]
    assert top1_agreement(a, b) == 50.0


def test_another_calibrator_is_proposed_only_when_measured_better() -> None:
    from lowbit.evaluate.compare import Variant
    from lowbit.report import _calibrator_advice

    net = nn.Linear(2, 2)

    def variant(calibrator: str, db: float) -> Variant:
        return Variant(f"int8 ({calibrator})", net, calibrator=calibrator, output_sqnr_db=db)

    chosen = variant("minmax", 20.0)
    assert _calibrator_advice([chosen, variant("mse", 20.9), variant("entropy", 18.0)]) == []
    (advice,) = _calibrator_advice([chosen, variant("mse", 23.5), variant("entropy", 21.0)])
    assert advice == "--calibrator mse: model output SQNR 23.5 dB vs 20.0 dB with minmax"


def test_compare_lists_the_kernels_under_its_table(
    workspace: Workspace, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        ["compare", FACTORY, "--calib", str(workspace.calib_npy), "--presets", "w8", *THREADS]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "layers run: float32: float" in out
    assert re.search(r"layers run: w8: 3 conv \S+.*, 1 linear ", out)
    assert "spread" in out and "layers run ┃" not in out  # a line each, not a wrapped cell
