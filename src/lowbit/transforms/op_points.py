"""Find the functional ops a model's forward calls and give the configured ones quantizers.

`find_op_sites` reads one traced forward pass (`lowbit.transforms.trace`): each op belongs to the
innermost module running when it is called, and is numbered per kind within one call of that
module, exactly as `lowbit.nn.op_points` numbers them at run time. Ops inside a quantized layer
(a `QuantModule` and what it wraps) are the layer's own, never points.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowbit.batches import Forward, run_batch
from lowbit.config import OP_KINDS, QuantConfig
from lowbit.nn.modules import QuantModule
from lowbit.nn.op_points import OP_KINDS as OP_FUNCTIONS
from lowbit.nn.op_points import OpPoints, op_kinds, point_name
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.nn.records import describe
from lowbit.transforms.swap import LayerRecord, QuantizerFactory
from lowbit.transforms.trace import Value, trace

assert set(OP_KINDS) == set(OP_FUNCTIONS), "config.OP_KINDS and nn.op_points.OP_KINDS differ"


@dataclass(frozen=True)
class OpSite:
    """One functional op call: the calling module, the op kind, its index in that forward."""

    caller: str
    kind: str
    index: int

    @property
    def name(self) -> str:
        return point_name(self.caller, self.kind, self.index)


def find_op_sites(model: nn.Module, batch: Any, forward: Forward | None = None) -> list[OpSite]:
    """Every functional op (`OP_KINDS`) one forward pass of `batch` calls, in call order. A
    module called several times numbers the ops of each call from 0, as at run time; ops inside
    a quantized layer (or a quantizer) are the layer's own.

    Run it with the model's quantizers off: the pass must not feed calibrators."""
    traced = trace(model, lambda m: run_batch(m, batch, forward))
    layers = {n for n, m in model.named_modules() if isinstance(m, QuantModule | TensorQuantizer)}
    counts: dict[str, Counter[str]] = {}  # per calling module, its ops in its current call
    sites: dict[OpSite, None] = {}  # in call order; a module called twice adds none
    for call in traced.calls:
        if call.module is not None:  # a module starts a call: its ops are numbered from 0
            counts[call.module] = Counter()
            continue
        operands = sum(isinstance(a, Value) for a in call.args[:2])
        kinds = op_kinds(call.func, operands)
        if not kinds or call.caller is None or layers.intersection(call.scope):
            continue
        seen = counts.setdefault(call.caller, Counter())
        for kind in kinds:  # an attention call is three ops
            sites[OpSite(call.caller, kind, seen[kind])] = None
            seen[kind] += 1
    return list(sites)


def place_op_points(
    model: nn.Module,
    config: QuantConfig,
    sites: list[OpSite],
    make_quantizer: QuantizerFactory,
) -> list[LayerRecord]:
    """Attach an `OpPoints` to each calling module with a configured op; one summary record
    per quantized op and per op an override keeps in float."""
    _check_op_overrides(config, sites)
    records: list[LayerRecord] = []
    by_caller: dict[str, dict[str, TensorQuantizer]] = {}
    for site in sites:
        spec, decided_by = config.for_op(site.name, site.caller, site.kind)
        if spec is None:
            if decided_by is not None:
                why = f"kept in float by op override {decided_by}"
                records.append(LayerRecord(site.name, site.kind, False, why))
            continue
        quantizer = make_quantizer(spec, "output")
        by_caller.setdefault(site.caller, {})[f"{site.kind}_{site.index}"] = quantizer
        records.append(LayerRecord(site.name, site.kind, True, f"O {describe(spec)}"))
    for caller, quantizers in by_caller.items():
        kinds = {name.rpartition("_")[0] for name in quantizers}
        counts = Counter(s.kind for s in sites if s.caller == caller and s.kind in kinds)
        OpPoints(caller, dict(counts), quantizers).attach(model.get_submodule(caller))
    return records


def _check_op_overrides(config: QuantConfig, sites: list[OpSite]) -> None:
    """ValueError for an op override that matches no op point: it would silently do nothing."""
    for key in config.op_overrides:
        if not any(
            fnmatch.fnmatchcase(s.name, key) or fnmatch.fnmatchcase(s.caller, key) for s in sites
        ):
            found = [s.name for s in sites[:4]] or "nothing (no add, matmul or cat is called)"
            raise ValueError(
                f"QuantConfig.op_overrides key {key!r} matches no functional op of the model; "
                f"op points are named like {found}"
            )
