"""Building integer modules: from a simulated layer (`convert`) or from a saved record
(`lowbit.io.load`), the record's "kind" naming the class."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lowbit import numerics
from lowbit.nn import int_binary
from lowbit.nn.int_base import IntFallback, IntModule
from lowbit.nn.int_conv import IntConv
from lowbit.nn.int_embedding import IntEmbedding
from lowbit.nn.int_linear import IntLinear
from lowbit.nn.modules import QuantModule
from lowbit.nn.records import act_record, spec_to_dict

_KINDS: dict[str, type[IntModule]] = {
    c.kind: c
    for c in (
        IntLinear,
        IntConv,
        IntEmbedding,
        IntFallback,
        int_binary.IntBinaryLinear,
        int_binary.IntBinaryConv,
    )
}


def int_module_from_record(
    module: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor]
) -> IntModule:
    """Build the integer module of a float layer from a saved record and its local tensors."""
    cls = _KINDS.get(record.get("kind", ""))
    if cls is None:
        raise ValueError(f"unknown integer module kind {record.get('kind')!r}")
    if issubclass(cls, IntFallback):
        return cls(module, record, tensors)
    return IntLinear(record, tensors)


def int_module_from_quant(qm: QuantModule) -> IntModule | None:
    """The integer module of a simulated layer, or None if its weight is not quantized.

    Dynamic weight quantizers (QAT) get their parameters fixed from the final weight; learnable
    scales are taken as they are.
    """
    wq = qm.weight_quantizer
    if wq is None or wq.mode == "off":
        return None
    module = qm.module
    weight = module.weight.detach()
    spec = wq.spec
    if wq.dynamic or not wq.has_qparams:
        scale, zero_point = numerics.tensor_qparams(weight, spec)
    else:
        scale, zero_point = wq.scale.detach().float(), wq.zero_point.detach()
    codes = numerics.quantize(weight, scale, zero_point, spec)
    record: dict[str, Any] = {
        "weight": {"spec": spec_to_dict(spec), "shape": list(weight.shape)},
        "input": act_record(qm.input_quantizer),
        "output": act_record(qm.output_quantizer),
        "module_type": type(module).__name__,
        "bias": getattr(module, "bias", None) is not None,
    }
    tensors: dict[str, Tensor] = {
        "qweight": numerics.store_codes(codes, spec),
        "weight_scale": scale.detach().float().clone(),
        "weight_zero_point": zero_point.to(torch.int32).clone(),
    }
    for role in ("input", "output"):
        q = getattr(qm, f"{role}_quantizer")
        if record[role] is not None and record[role]["mode"] == "static":
            tensors[f"{role}_scale"] = q.scale.detach().float().clone()
            tensors[f"{role}_zero_point"] = q.zero_point.detach().clone()
    bits = int_binary.build(qm, module, record, tensors)
    if bits is not None:
        return bits
    plain_linear = isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
    if plain_linear:
        record["kind"] = IntLinear.kind
        bias = module.bias
        if isinstance(bias, Tensor):
            tensors["bias"] = bias.detach().float().clone()
        return IntLinear(record, tensors)
    if isinstance(module, nn.Embedding):
        record["kind"] = IntEmbedding.kind
    elif isinstance(module, nn.modules.conv._ConvNd):
        record["kind"] = IntConv.kind
    else:
        record["kind"] = IntFallback.kind
    return int_module_from_record(module, record, tensors)
