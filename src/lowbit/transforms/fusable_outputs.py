"""Find the quantized layers whose output reaches an op that no runtime fuses into the layer.

ONNX Runtime (QLinearConv, QLinearMatMul) and TensorRT run a conv or matmul in integer only when
its output is quantized: `DQ -> Conv -> (Relu / Clip) -> Q`. Where the next quantized layer
consumes the output (after an activation at most), its input quantizer is that Q. Where the output
reaches anything else first (a residual Add, a pool, a concat, a mean), nothing quantizes it and
the runtime keeps the layer in float. `layers_needing_output_quantizers` finds those layers by
watching one forward pass: a `TorchFunctionMode` sees every torch call the model makes, whatever
its forward looks like, and follows each layer's output through activations and reshapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lowbit.batches import Forward, run_hooked, tensors_of
from lowbit.nn.modules import QuantModule
from lowbit.transforms.fold_bn import is_metadata

# What a runtime fuses into the producing layer, or what leaves the values as they are: the
# output flows on through these to its real consumer.
_PASS_THROUGH: set[Callable[..., Any]] = {
    F.relu,
    F.relu6,
    F.hardtanh,
    torch.relu,
    torch.clamp,
    torch.clip,
    Tensor.relu,
    Tensor.clamp,
    Tensor.clip,
    torch.flatten,
    torch.reshape,
    Tensor.flatten,
    Tensor.reshape,
    Tensor.view,
    F.dropout,
    torch.dropout,
}


class _Watch(TorchFunctionMode):
    """Maps tensors to the layer that produced them; records layers read by other ops."""

    def __init__(self) -> None:
        super().__init__()
        self.producer: dict[int, str] = {}
        self.keep: list[Tensor] = []  # holds every watched tensor, so no id() is reused
        self.inside = 0  # > 0 while a QuantModule runs: its own ops are not consumers
        self.flagged: set[str] = set()

    def produced(self, name: str, output: Any) -> None:
        if isinstance(output, Tensor):
            self.producer[id(output)] = name
            self.keep.append(output)

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.inside or is_metadata(func):
            return result
        sources = {
            self.producer[id(t)] for t in tensors_of((args, kwargs)) if id(t) in self.producer
        }
        if not sources:
            return result
        if func in _PASS_THROUGH and isinstance(result, Tensor) and len(sources) == 1:
            self.produced(next(iter(sources)), result)
        else:
            self.flagged |= sources
        return result


def layers_needing_output_quantizers(
    model: nn.Module, batch: Any, forward: Forward | None = None
) -> list[str]:
    """Names of the QuantModules of `model` whose output reaches an op other than a quantized
    layer or an activation / reshape in one forward pass of `batch`. Model outputs are not
    counted: quantizing the logits would only cost accuracy."""
    watch = _Watch()
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, QuantModule):
            handles.append(m.register_forward_pre_hook(lambda *_: _enter(watch)))
            handles.append(m.register_forward_hook(_leave_hook(watch, name)))
    with watch:
        run_hooked(model, batch, forward, handles)
    return sorted(watch.flagged)


def _enter(watch: _Watch) -> None:
    watch.inside += 1


def _leave_hook(watch: _Watch, name: str) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        watch.inside -= 1
        if not watch.inside:
            watch.produced(name, output)

    return hook
