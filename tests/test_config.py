"""Configs and presets: the one list of preset names, the one list of calibrators, and a
`QuantConfig` that is checked when it is built."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
from torch import nn

from lowbit import presets
from lowbit.calib import CALIBRATORS, FROM_HISTOGRAM, Histogram, from_histogram
from lowbit.config import LayerQuant, QuantConfig
from lowbit.spec import PerChannel, QuantSpec


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


# ---------------------------------------------------------------- QuantConfig checked when built


def test_a_misspelt_calibrator_fails_when_the_config_is_built() -> None:
    with pytest.raises(ValueError, match=r"QuantConfig.calibrator must be one of .*'entorpy'"):
        presets.int8("entorpy")
    with pytest.raises(ValueError, match=r"calibrator_args \{'pp': 99.9\}"):
        QuantConfig(input=QuantSpec(), calibrator="percentile", calibrator_args={"pp": 99.9})
    with pytest.raises(ValueError, match=r"Percentile p must be in \(0, 100\]"):
        QuantConfig(input=QuantSpec(), calibrator="percentile", calibrator_args={"p": 120})


def test_a_histogram_calibrator_on_per_channel_activations_fails_when_built() -> None:
    with pytest.raises(ValueError, match="Entropy supports only PerTensor"):
        QuantConfig(input=QuantSpec(granularity=PerChannel(1)), calibrator="entropy")
    with pytest.raises(ValueError, match="MSE supports only PerTensor"):
        QuantConfig(
            calibrator="mse",
            overrides={"head": LayerQuant(output=QuantSpec(granularity=PerChannel(1)))},
        )
    assert QuantConfig(input=QuantSpec(granularity=PerChannel(1))).calibrator == "minmax"


def test_bits_out_of_range_and_wrong_types_fail_when_built() -> None:
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(weight=QuantSpec(bits=17))
    with pytest.raises(ValueError, match="bits"):
        presets.weight_only(bits=1)
    with pytest.raises(TypeError, match=r"QuantConfig\.weight must be a QuantSpec or None"):
        QuantConfig(weight=8)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"LayerQuant\.input must be a QuantSpec or None"):
        LayerQuant(input="int8")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"QuantConfig\.fusable_outputs must be a bool"):
        QuantConfig(fusable_outputs=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"QuantConfig\.overrides must be a dict"):
        QuantConfig(overrides=[("fc", None)])  # type: ignore[arg-type]


def test_a_config_cannot_change_after_it_is_built() -> None:
    config = presets.int8()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.calibrator = "entorpy"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.overrides["fc"] = None  # type: ignore[index]
    with pytest.raises(ValueError, match=r"QuantConfig\.calibrator"):
        dataclasses.replace(config, calibrator="entorpy")
    edited = dataclasses.replace(config, overrides={"fc": None}, fusable_outputs=False)
    assert edited.overrides == {"fc": None} and config.overrides == {}
    assert copy.deepcopy(edited) == edited == pickle.loads(pickle.dumps(edited))


def test_the_caller_s_dicts_are_copied() -> None:
    overrides: dict[str | type[nn.Module], LayerQuant | None] = {"fc": None}
    config = QuantConfig(weight=QuantSpec(), overrides=overrides)
    overrides["head"] = None
    assert list(config.overrides) == ["fc"]
