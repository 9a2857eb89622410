"""`brecq`: quantize a model and reconstruct it block by block (BRECQ / QDrop), the 4-bit
recipe for CNNs: first and last layer at 8 bits (as the papers do), weight scales from a
clipping search, learned rounding and activation step sizes per block.

The algorithm itself (`lowbit.algorithms.brecq.block_reconstruction`) works on a model that
`quantize` returned; this workflow adds what needs the float model and the config.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from lowbit.algorithms.brecq import BrecqReport, block_reconstruction
from lowbit.algorithms.capture import execution_order
from lowbit.batches import Forward
from lowbit.config import LayerQuant, QuantConfig
from lowbit.nn.modules import QUANTIZABLE
from lowbit.spec import QuantSpec
from lowbit.workflows.quantization import quantize

__all__ = ["brecq", "first_last_layers"]


def brecq(
    model: nn.Module,
    config: QuantConfig,
    calib_data: Iterable[Any],
    *,
    qdrop: float = 0.5,
    first_last_bits: int | None = 8,
    blocks: Sequence[str] | None = None,
    iterations: int = 500,
    batch_size: int = 16,
    lr: float = 1e-2,
    act_lr: float = 1e-3,
    reg_weight: float = 0.01,
    weight_scales: str = "mse",
    max_samples: int | None = 128,
    seed: int = 0,
    forward: Forward | None = None,
    progress: bool = True,
    group: Any = None,
) -> nn.Module:
    """Static PTQ of `model` with `config` (as `lowbit.quantize`), then block reconstruction.

    first_last_bits: the first and the last quantized layer (in execution order) get weights
        and activations of at least this many bits (None: as the config says). The summary
        (`qmodel.lowbit_brecq`) names them.
    qdrop, blocks, iterations, ...: see `lowbit.algorithms.brecq.block_reconstruction`.
    Returns a new model; `model` is untouched.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a QuantConfig (see lowbit.presets), got {type(config).__name__}"
        )
    kept: tuple[str, ...] = ()
    if first_last_bits is not None:
        if not isinstance(first_last_bits, int) or not 2 <= first_last_bits <= 16:
            raise ValueError(f"first_last_bits must be None or 2..16, got {first_last_bits!r}")
        config, kept = _first_last_config(model, config, calib_data, forward, first_last_bits)
    qmodel = quantize(model, config, calib_data, forward=forward, progress=progress, group=group)
    block_reconstruction(
        qmodel,
        calib_data,
        qdrop=qdrop,
        blocks=blocks,
        iterations=iterations,
        batch_size=batch_size,
        lr=lr,
        act_lr=act_lr,
        reg_weight=reg_weight,
        weight_scales=weight_scales,
        max_samples=max_samples,
        seed=seed,
        forward=forward,
        progress=progress,
        group=group,
    )
    report = qmodel.lowbit_brecq
    assert isinstance(report, BrecqReport)
    qmodel.lowbit_brecq = replace(report, high_precision=kept)
    return qmodel


def first_last_layers(
    model: nn.Module, config: QuantConfig, calib_data: Iterable[Any], forward: Forward | None
) -> list[str]:
    """The first and the last layer that `config` quantizes, in execution order."""
    candidates = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZABLE)
        and (lq := config.for_layer(name, m)[0]) is not None
        and lq.weight is not None
    }
    names = {id(m): n for n, m in candidates.items()}
    order = execution_order(model, list(candidates.values()), calib_data, forward)
    if not order:
        return []
    return list(dict.fromkeys([names[id(order[0])], names[id(order[-1])]]))


def _first_last_config(
    model: nn.Module,
    config: QuantConfig,
    calib_data: Iterable[Any],
    forward: Forward | None,
    bits: int,
) -> tuple[QuantConfig, tuple[str, ...]]:
    kept = first_last_layers(model, config, calib_data, forward)
    overrides: dict[Any, LayerQuant | None] = {}
    for name in kept:
        lq = config.for_layer(name, model.get_submodule(name))[0]
        assert lq is not None
        overrides[name] = LayerQuant(
            _at_least(lq.weight, bits), _at_least(lq.input, bits), _at_least(lq.output, bits)
        )
    # The config's own overrides come after, so an explicit choice of the user wins.
    merged = {**overrides, **config.overrides}
    return replace(config, overrides=merged), tuple(kept)


def _at_least(spec: QuantSpec | None, bits: int) -> QuantSpec | None:
    if spec is None or spec.scheme != "uniform" or spec.bits >= bits:
        return spec
    return spec.with_(bits=bits)
