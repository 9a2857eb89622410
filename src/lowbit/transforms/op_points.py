"""Find the functional ops a model's forward calls and give the configured ones quantizers.

`find_op_sites` watches one forward pass with a `TorchFunctionMode` and global module hooks: each
op is attributed to the innermost module running when it is called, and numbered per kind in
that module's forward, exactly as `lowbit.nn.op_points` numbers them at run time. Ops inside a
quantized layer (a `QuantModule` and what it wraps) are the layer's own, never points.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.overrides import TorchFunctionMode

from lowbit.batches import Forward, run_batch
from lowbit.config import OP_KINDS, QuantConfig
from lowbit.nn.modules import QuantModule
from lowbit.nn.op_points import OP_KINDS as OP_FUNCTIONS
from lowbit.nn.op_points import OpPoints, op_kind, point_name
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.transforms.swap import LayerRecord, QuantizerFactory, describe

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


class _Find(TorchFunctionMode):
    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        # the modules running, innermost last, each with its ops so far in this call of it
        self.stack: list[tuple[nn.Module, Counter[str]]] = []
        self.inside_layer = 0  # > 0 while a quantized layer (or a quantizer) runs
        self.sites: dict[OpSite, None] = {}  # in call order; a module called twice adds none

    def enter(self, module: nn.Module, args: Any) -> None:
        self.stack.append((module, Counter()))
        self.inside_layer += isinstance(module, QuantModule | TensorQuantizer)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack and self.stack[-1][0] is module:
            self.stack.pop()
            self.inside_layer -= isinstance(module, QuantModule | TensorQuantizer)

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        kind = op_kind(func, args)
        if kind is None or self.inside_layer or not self.stack:
            return result
        module, counts = self.stack[-1]
        caller = self.names.get(id(module))
        if caller is not None:  # else a module built inside the forward: not addressable
            self.sites[OpSite(caller, kind, counts[kind])] = None
        counts[kind] += 1
        return result


def find_op_sites(model: nn.Module, batch: Any, forward: Forward | None = None) -> list[OpSite]:
    """Every functional op (`OP_KINDS`) one forward pass of `batch` calls, in call order. A
    module called several times numbers the ops of each call from 0, as at run time.

    Run it with the model's quantizers off: the pass must not feed calibrators."""
    find = _Find({id(m): name for name, m in model.named_modules()})
    handles = [
        nn.modules.module.register_module_forward_pre_hook(find.enter),
        nn.modules.module.register_module_forward_hook(find.leave, always_call=True),
    ]
    try:
        with find:
            run_batch(model, batch, forward)
    finally:
        for handle in handles:
            handle.remove()
    return list(find.sites)


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
