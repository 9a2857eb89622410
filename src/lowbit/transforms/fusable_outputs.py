"""Find the quantized layers whose output reaches an op that no runtime fuses into the layer.

ONNX Runtime (QLinearConv, QLinearMatMul) and TensorRT run a conv or matmul in integer only when
its output is quantized: `DQ -> Conv -> (Relu / Clip) -> Q`. Where the next quantized layer
consumes the output (after an activation at most), its input quantizer is that Q. Where the output
reaches anything else first (a residual Add, a pool, a concat, a mean), nothing quantizes it and
the runtime keeps the layer in float. `layers_needing_output_quantizers` finds those layers by
watching one forward pass (`lowbit.transforms.trace` sees every torch call the model makes,
whatever its forward looks like) and following each layer's output through activations and
reshapes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.batches import Forward, run_user_batch
from lowbit.nn.modules import QuantModule
from lowbit.transforms.trace import trace

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


def layers_needing_output_quantizers(
    model: nn.Module, batch: Any, forward: Forward | None = None
) -> list[str]:
    """Names of the QuantModules of `model` whose output reaches an op other than a quantized
    layer or an activation / reshape in one forward pass of `batch`. Model outputs are not
    counted: quantizing the logits would only cost accuracy."""
    seen = trace(model, lambda m: run_user_batch(m, batch, forward, "calib_data"))
    modules = dict(model.named_modules())
    producer: dict[int, str] = {}  # Value id -> the layer whose output it is (or flows from)
    flagged: set[str] = set()
    for call in seen.calls:
        if any(isinstance(modules[s], QuantModule) for s in call.scope):
            continue  # a layer's own ops are not consumers of anything
        if call.module is not None:
            if isinstance(modules[call.module], QuantModule) and call.output is not None:
                producer[call.output.id] = call.module
            continue
        sources = {producer[v.id] for v in call.inputs if v.id in producer}
        if call.func in _PASS_THROUGH and call.output is not None and len(sources) == 1:
            producer[call.output.id] = sources.pop()
        else:
            flagged |= sources
    return sorted(flagged)
