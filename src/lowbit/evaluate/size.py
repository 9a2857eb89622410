"""How many bytes a model's parameters take once stored at their quantized width."""

from __future__ import annotations

from torch import Tensor, nn

from lowbit.nn.modules import QuantModule
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.numerics import tensor_qparams


def model_bytes(model: nn.Module) -> int:
    """Parameter bytes: quantized weights at their bit width (plus scales and zero points),
    everything else at its own dtype. Buffers such as BatchNorm statistics count too."""
    total = 0
    counted: set[int] = set()  # quantized weights and their quantizer's scale / zero point
    for module in model.modules():
        if isinstance(module, QuantModule) and module.weight_quantizer is not None:
            q = module.weight_quantizer
            weight = module.module.weight
            counted.update(id(t) for t in (weight, *q.parameters(), *q.buffers()))
            total += (weight.numel() * q.spec.bits + 7) // 8
            n_params = q.scale.numel() if q.has_qparams else _dynamic_params(q, weight)
            total += n_params * (4 + (0 if q.spec.symmetric else 1))
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in counted and tensor.numel():
            total += tensor.numel() * tensor.element_size()
    return total


def _dynamic_params(q: TensorQuantizer, weight: Tensor) -> int:
    """How many scales a quantizer without stored ones computes for `weight`."""
    return tensor_qparams(weight, q.spec)[0].numel()
