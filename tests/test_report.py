"""`lowbit report`: one self-contained HTML file, checked in headless chromium where installed."""

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
from test_cli import FACTORY, THREADS, Workspace, make_workspace

from lowbit.cli import main

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("report")
    sys.path.insert(0, str(root))
    yield make_workspace(root)
    sys.path.remove(str(root))
    sys.modules.pop("lowbit_cli_tinynet", None)


@pytest.fixture(scope="module")
def report(workspace: Workspace) -> tuple[Path, dict]:
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
    # The depthwise layer's channels span 100x: with --per-tensor it is among the weakest and
    # the report says to go per-channel, with the numbers.
    depthwise = next(w for w in worst if w["layer"] == "features.3")
    assert any(f.startswith("per-channel weights") for f in depthwise["fixes"])
    for layer in worst:
        assert f"--exclude '{layer['layer']}'" in layer["fixes"][-1]
        assert layer["layer"] in page
    assert "depthwise convolutions" in page
    assert all(c in page for c in ("minmax", "percentile", "entropy", "mse"))


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
