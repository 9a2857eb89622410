"""Configs and presets: the one list of preset names, the one list of calibrators, and a
`QuantConfig` that is checked when it is built."""

from __future__ import annotations

import pytest
import torch

from lowbit import presets
from lowbit.calib import CALIBRATORS, FROM_HISTOGRAM, Histogram, from_histogram
from lowbit.config import QuantConfig


@pytest.mark.parametrize("name", presets.NAMES)
def test_every_preset_name_gives_a_config(name: str) -> None:
    config = presets.by_name(name, "entropy")
    assert isinstance(config, QuantConfig)
    calibrated = config.input is not None or config.output is not None
    assert (config.calibrator == "entropy") == calibrated


def test_by_name_matches_the_preset_functions() -> None:
    assert presets.by_name("int8") == presets.int8()
    assert presets.by_name("int8-asym", "mse") == presets.int8_asymmetric("mse")
    assert presets.by_name("w4") == presets.weight_only(4)
    assert presets.by_name("w4a8") == presets.w4a8(None)


def test_an_unknown_preset_name_is_refused_with_the_names() -> None:
    with pytest.raises(ValueError, match=r"preset must be one of int8, int8-asym, .*got 'int9'"):
        presets.by_name("int9")


def test_the_command_line_offers_the_listed_names() -> None:
    from lowbit.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    options = {a.dest: a.choices for a in commands["quantize"]._actions}
    assert options["preset"] == (*presets.NAMES, "dynamic")
    assert options["calibrator"] == FROM_HISTOGRAM


@pytest.mark.parametrize("name", FROM_HISTOGRAM)
def test_every_histogram_calibrator_comes_from_a_histogram(name: str) -> None:
    histogram = Histogram()
    histogram.observe(torch.linspace(-1.0, 2.0, 1000))
    assert type(from_histogram(name, histogram)) is CALIBRATORS[name]


def test_calibrators_without_a_histogram_form_are_not_offered() -> None:
    assert set(FROM_HISTOGRAM) == set(CALIBRATORS) - {"moving_average"}
