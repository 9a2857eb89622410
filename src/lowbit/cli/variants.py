"""Preset names to configs for the command line: `--preset`, `--calibrator`, `--per-tensor` and
`--exclude` become `{row name: QuantConfig}` for `evaluate.compare` and the report.

`dynamic` is not a config but its own workflow (`quantize_dynamic`), given to the comparison in
a config's place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from lowbit import presets
from lowbit.calib import FROM_HISTOGRAM
from lowbit.config import QuantConfig
from lowbit.evaluate.compare import Batches, Variant, Workflow, quantize_variant
from lowbit.spec import PerTensor

DYNAMIC = "dynamic"
PRESETS = (*presets.NAMES, DYNAMIC)


def preset_config(
    name: str,
    calibrator: str = "minmax",
    *,
    per_tensor: bool = False,
    exclude: Sequence[str] = (),
) -> QuantConfig | None:
    """The `QuantConfig` of a preset name; None for `dynamic` (its own workflow)."""
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    if calibrator not in FROM_HISTOGRAM:
        raise ValueError(
            f"--calibrator must be one of {', '.join(FROM_HISTOGRAM)}, got {calibrator!r}"
        )
    if name == DYNAMIC:
        if per_tensor or exclude:
            raise ValueError("--per-tensor and --exclude do not apply to --preset dynamic")
        return None
    config = presets.by_name(name, calibrator)
    if per_tensor and config.weight is not None:
        if config.weight.scheme != "uniform":
            raise ValueError(f"--per-tensor applies to integer presets, not {name}")
        config = replace(config, weight=config.weight.with_(granularity=PerTensor()))
    if exclude:
        config = replace(config, overrides={**config.overrides, **dict.fromkeys(exclude, None)})
    return config


def preset_variant(
    preset: str,
    calibrator: str = "minmax",
    *,
    per_tensor: bool = False,
    exclude: Sequence[str] = (),
) -> tuple[str, QuantConfig | Workflow]:
    """The row name of a preset ("int8 (entropy) per-tensor"; the calibrator only where it
    matters) and its config, or `quantize_dynamic` for `dynamic`."""
    from lowbit.workflows.conversion import quantize_dynamic

    config = preset_config(preset, calibrator, per_tensor=per_tensor, exclude=exclude)
    name = f"{preset} ({calibrator})" if config is not None and config.calibrated else preset
    name = f"{name} per-tensor" if per_tensor else name
    return name, quantize_dynamic if config is None else config


def preset_variants(
    preset_names: Sequence[str],
    calibrators: Sequence[str],
    *,
    per_tensor: bool = False,
    exclude: Sequence[str] = (),
) -> dict[str, tuple[str, QuantConfig | Workflow]]:
    """{row name: (preset, config or workflow)}: a row per preset, one per calibrator for the
    presets whose activations are calibrated."""
    rows: dict[str, tuple[str, QuantConfig | Workflow]] = {}
    for preset in preset_names:
        for calibrator in calibrators:
            name, how = preset_variant(preset, calibrator, per_tensor=per_tensor, exclude=exclude)
            rows.setdefault(name, (preset, how))
    return rows


def make_variant(
    model: nn.Module,
    preset: str,
    calib: Batches,
    *,
    calibrator: str = "minmax",
    per_tensor: bool = False,
    exclude: Sequence[str] = (),
    progress: bool = True,
) -> Variant:
    """Quantize `model` with a preset (simulated; `dynamic` is converted), timing it."""
    name, how = preset_variant(preset, calibrator, per_tensor=per_tensor, exclude=exclude)
    return quantize_variant(model, name, how, calib, progress=progress)
