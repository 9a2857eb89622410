"""The workflows a user calls: static PTQ, QAT preparation and their summary."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.batches import Forward, leading_samples, run_batch, run_user_batch
from lowbit.config import QuantConfig
from lowbit.distributed import active_group, example_batch, rank, step
from lowbit.nn.quantizer import TensorQuantizer, switched_off
from lowbit.progress import progress_bar
from lowbit.transforms.fold_bn import fold_batchnorm
from lowbit.transforms.fusable_outputs import layers_needing_output_quantizers
from lowbit.transforms.op_points import find_op_sites, place_op_points
from lowbit.transforms.swap import (
    LayerRecord,
    QuantizerFactory,
    add_output_quantizers,
    check_overrides,
    qat_quantizers,
    static_quantizers,
    swap_modules,
)
from lowbit.workflows.calibration_checks import SignWatch, finish_calibration
from lowbit.workflows.sharded import divided_ranges, sync_calibration


@dataclass(frozen=True)
class QuantSummary:
    """What `quantize` did to each layer with weights, kept on the model; `str()` is a table.

    ops: the functional ops (`QuantConfig.ops`) whose output is quantized, or kept in float by
    an override, named `<calling module>.<kind>_<index>`, their kind the op ("add", ...)."""

    layers: tuple[LayerRecord, ...]
    folded_batchnorms: tuple[tuple[str, str], ...] = ()
    ops: tuple[LayerRecord, ...] = ()

    @property
    def quantized(self) -> list[LayerRecord]:
        """The layers that were quantized."""
        return [r for r in self.layers if r.quantized]

    @property
    def kept_float(self) -> list[LayerRecord]:
        """The layers left in float, each with its reason."""
        return [r for r in self.layers if not r.quantized]

    def __str__(self) -> str:
        lines = [
            f"lowbit: quantized {len(self.quantized)} of {len(self.layers)} layers with weights; "
            f"folded {len(self.folded_batchnorms)} BatchNorm(s)"
        ]
        if self.ops:
            n_ops = sum(r.quantized for r in self.ops)
            lines[0] += f"; quantized the output of {n_ops} functional op(s)"
        width = max((len(r.name) for r in (*self.layers, *self.ops)), default=0)
        for r in (*self.layers, *self.ops):
            mark = "Q" if r.quantized else "F"
            lines.append(f"  {mark} {r.name:<{width}}  {r.kind:<24} {r.detail}")
        return "\n".join(lines)


def quantize(
    model: nn.Module,
    config: QuantConfig,
    calib_data: Iterable[Any],
    *,
    forward: Forward | None = None,
    progress: bool = True,
    inplace: bool = False,
    group: Any = None,
) -> nn.Module:
    """Static post-training quantization.

    Folds BatchNorm, swaps quantizable layers for `QuantModule`s, runs `calib_data` through the
    model to calibrate the activation quantizers, and returns a model that simulates the
    quantized arithmetic exactly. `model.lowbit_summary` says what was quantized and how, and
    what stayed in float and why.

    Inside torch.distributed (or with `group=`), `calib_data` is this rank's shard and every
    rank gets the same model, that of one process over all shards (see docs/distributed.md).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a QuantConfig (see lowbit.presets), got {type(config).__name__}"
        )
    group = active_group(group)
    example = example_batch(calib_data, group)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    with torch.no_grad():
        with step(group, "quantize"):  # a failure on one rank ends every rank's call
            example = _probe(model, example, forward)
            folded = fold_batchnorm(
                model, lambda m: run_user_batch(m, example, forward, "calib_data batch 0")
            )
            check_overrides(model, config)
            records = swap_modules(model, config, static_quantizers(config))
            if config.fusable_outputs and config.input is not None:
                records = _quantize_fusable_outputs(
                    model, config, example, forward, records, static_quantizers(config)
                )
            ops = _place_op_points(model, config, example, forward, static_quantizers(config))
            observed = _observe(model, calib_data, forward, group, progress and rank(group) == 0)
        _finish(model, observed, group)
    summary = QuantSummary(tuple(records), tuple(folded), tuple(ops))
    model.lowbit_summary = summary  # type: ignore[assignment]
    return model


def _probe(model: nn.Module, example: Any, forward: Forward | None) -> Any:
    """What the structural passes (BN folding and its check, the fusable-output and op-site
    traces) run: the first 2 samples of `example` when the model takes them, else all of it.

    Those passes read which layer feeds which, not the values, and they run on every rank of a
    sharded calibration: on a whole batch they were a tenth of EfficientNet-Lite0's calibration,
    on two samples they are a few hundredths of a second. Two, not one: a `squeeze()` keeps
    the batch dimension. A model that rejects the cut (a batch size built into its forward)
    gets the whole batch, as before.
    """
    small = leading_samples(example, 2)
    if small is None:
        return example
    try:
        with torch.no_grad():
            run_batch(model, small, forward)
    except Exception:  # any failure on the cut batch means: use the whole one
        return example
    return small


def _place_op_points(
    model: nn.Module,
    config: QuantConfig,
    example: Any,
    forward: Forward | None,
    make_quantizer: QuantizerFactory,
) -> list[LayerRecord]:
    """Output quantizers on the functional ops the config names (`QuantConfig.ops`)."""
    if not config.quantizes_ops:
        return []
    with switched_off(q for q in model.modules() if isinstance(q, TensorQuantizer)):
        sites = find_op_sites(model, example, forward)
    return place_op_points(model, config, sites, make_quantizer)


def _quantize_fusable_outputs(
    model: nn.Module,
    config: QuantConfig,
    example: Any,
    forward: Forward | None,
    records: list[LayerRecord],
    make_quantizer: QuantizerFactory,
) -> list[LayerRecord]:
    """Output quantizers (input spec) for the layers whose outputs no runtime can fuse."""
    assert config.input is not None
    with switched_off(q for q in model.modules() if isinstance(q, TensorQuantizer)):
        names = layers_needing_output_quantizers(model, example, forward)
    return add_output_quantizers(model, names, config.input, make_quantizer, records)


def calibrate(
    model: nn.Module,
    calib_data: Iterable[Any],
    *,
    forward: Forward | None = None,
    progress: bool = True,
    group: Any = None,
) -> None:
    """Observe activations over `calib_data`, then fix every calibrated quantizer's parameters.

    A quantizer that saw no data (its layer never ran) or only zeros is switched off and named in
    a warning, as is a binary input that never goes below 0; a model whose output no longer
    depends on its input is a ValueError (see `lowbit.workflows.calibration_checks`).

    Inside torch.distributed (or with `group=`), `calib_data` is this rank's shard (it may be
    empty) and the calibrators are reduced over the group (`lowbit.workflows.sharded`).
    """
    group = active_group(group)
    with step(group, "calibration"):
        observed = _observe(model, calib_data, forward, group, progress and rank(group) == 0)
    _finish(model, observed, group)


@dataclass
class _Observed:
    """What one process's calibration pass saw, before any reduction over ranks."""

    quantizers: list[TensorQuantizer]
    watch: SignWatch
    batches: int


def _observe(
    model: nn.Module, calib_data: Iterable[Any], forward: Forward | None, group: Any, progress: bool
) -> _Observed:
    """The calibration pass over this process's data (its shard, in a group): local, nothing is
    exchanged."""
    quantizers = [q for q in model.modules() if isinstance(q, TensorQuantizer) and q.calibrator]
    for q in quantizers:
        q.set_mode("calibrate")
        if group is not None and q.calibrator is not None:
            q.calibrator.start_shard()
    n_batches = 0
    watch = SignWatch(model)
    try:
        with torch.no_grad():
            for batch in progress_bar(calib_data, "calibrating", enabled=progress):
                output = run_user_batch(model, batch, forward, f"calib_data batch {n_batches}")
                watch.see(batch, output)
                n_batches += 1
    finally:
        watch.remove()
    return _Observed(quantizers, watch, n_batches)


def _finish(model: nn.Module, observed: _Observed, group: Any) -> None:
    """Reduce what the ranks observed (in a group), then fix every quantizer's range."""
    quantizers, watch, n_batches = observed.quantizers, observed.watch, observed.batches
    ranges = None
    if group is not None:
        n_batches = sync_calibration(model, quantizers, watch, n_batches, group)
        if n_batches > 0:
            ranges = divided_ranges(quantizers, group)
    if n_batches == 0:
        raise ValueError("calib_data is empty: calibration needs at least one batch")
    finish_calibration(model, quantizers, n_batches, ranges)
    watch.check()


def prepare_qat(
    model: nn.Module,
    config: QuantConfig,
    calib_data: Iterable[Any] | None = None,
    *,
    forward: Forward | None = None,
    progress: bool = True,
    inplace: bool = False,
    group: Any = None,
) -> nn.Module:
    """A trainable model with fake quantization (straight-through gradients) for QAT.

    Weights are quantized from their current values at every step (or, with
    `config.learnable_scales`, with LSQ-trained scales); activation ranges follow a moving
    average while training and freeze in eval. With `calib_data`, activation ranges start from a
    PTQ calibration (required for learnable scales), and BatchNorm layers that follow a
    quantized layer are recorded so that `convert` folds them at the end; BatchNorm itself keeps
    training normally. Inside torch.distributed (or with `group=`), calibration is sharded as
    in `quantize`.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(
            f"config must be a QuantConfig (see lowbit.presets), got {type(config).__name__}"
        )
    if config.learnable_scales and calib_data is None:
        raise ValueError("learnable scales start from calibrated ranges: pass calib_data")
    if (config.fusable_outputs or config.quantizes_ops) and calib_data is None:
        raise ValueError(
            "config.fusable_outputs and config.ops (on in presets.int8() and int8_asymmetric()) "
            "find the outputs to quantize in one forward pass: pass calib_data, or set "
            "config.fusable_outputs = False and config.ops = {} "
            "(dataclasses.replace(config, fusable_outputs=False, ops={}))"
        )
    if not inplace:
        model = copy.deepcopy(model)
    pairs: list[tuple[str, str]] = []
    observed, was_training = None, model.training
    group = active_group(group)
    example = None if calib_data is None else example_batch(calib_data, group)
    ops: list[LayerRecord] = []
    with step(group, "prepare_qat"):  # a failure on one rank ends every rank's call
        if calib_data is not None:
            probe = copy.deepcopy(model).eval()
            example = _probe(probe, example, forward)
            with torch.no_grad():
                pairs = fold_batchnorm(
                    probe, lambda m: run_user_batch(m, example, forward, "calib_data batch 0")
                )
        check_overrides(model, config)
        records = swap_modules(model, config, qat_quantizers(config))
        if calib_data is not None:
            model.eval()
            with torch.no_grad():
                if config.fusable_outputs and config.input is not None:
                    records = _quantize_fusable_outputs(
                        model, config, example, forward, records, qat_quantizers(config)
                    )
                ops = _place_op_points(model, config, example, forward, qat_quantizers(config))
            observed = _observe(model, calib_data, forward, group, progress and rank(group) == 0)
    if observed is not None:
        with torch.no_grad():
            _finish(model, observed, group)
        model.train(was_training)
    model.lowbit_bn_pairs = pairs  # type: ignore[assignment]
    model.lowbit_summary = QuantSummary(tuple(records), ops=tuple(ops))  # type: ignore[assignment]
    return model
