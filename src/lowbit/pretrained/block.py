"""Quantize one transformer block on its cached calibration inputs, with lowbit's algorithms.

The block is a plain `nn.Module`; its Linear layers are swapped for `QuantModule`s exactly as
`lowbit.quantize` does, and the algorithms run on the block alone, the batches being the block's
inputs (`BlockInput`): GPTQ layer by layer in execution order (each layer's Hessian from inputs
that already include the quantization of the layers before it, inside the block and, through the
cached inputs, in the blocks before), AWQ on the block's known scale groups, SmoothQuant's
factors folded into the norms (and Linear producers) before int8 weights with per-token int8
activations. The result is read off the quantizers as `QuantizedWeight` records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit import numerics
from lowbit.algorithms.awq import awq_group
from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.smoothquant import ScaleGroup, smooth_groups
from lowbit.config import LayerQuant, QuantConfig
from lowbit.io.quantized_weight import QuantizedWeight
from lowbit.nn import PerTokenQuantizer
from lowbit.nn.modules import QuantModule, quant_modules
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.pretrained.architectures import BlockInput
from lowbit.spec import PerChannel, PerGroup, QuantSpec
from lowbit.transforms.swap import swap_modules

__all__ = ["METHODS", "Recipe", "quantize_block", "quantized_tensors"]

METHODS = ("rtn", "gptq", "awq", "smoothquant")


@dataclass(frozen=True)
class Recipe:
    """How every block is quantized."""

    method: str
    bits: int
    group_size: int | None
    damp: float = 0.01
    awq_grid: int = 20
    smoothquant_alpha: float = 0.5
    fp16_scales: bool = False  # GGUF stores float16 scales: round them before choosing codes
    act_order: bool = False  # GPTQ: columns by decreasing Hessian diagonal, static groups

    @property
    def weight_spec(self) -> QuantSpec:
        granularity = PerGroup(self.group_size) if self.group_size else PerChannel(0)
        return QuantSpec(bits=self.bits, granularity=granularity)

    @property
    def activation_spec(self) -> QuantSpec | None:
        """Per-token dynamic int8 inputs for SmoothQuant's W8A8; None (float) otherwise."""
        if self.method != "smoothquant":
            return None
        return QuantSpec(bits=8, narrow_range=True, granularity=PerChannel(0))

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"


def _forward(block: nn.Module, batch: BlockInput) -> Tensor:
    return batch.run(block)


def _groups(block: nn.Module, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[ScaleGroup]:
    return [
        ScaleGroup(p, block.get_submodule(p), list(c), [block.get_submodule(n) for n in c])
        for p, c in pairs
    ]


def quantize_block(
    block: nn.Module,
    recipe: Recipe,
    inputs: Sequence[BlockInput],
    scale_groups: Sequence[tuple[str, Sequence[str]]],
) -> nn.Module:
    """Quantize `block` in place (its Linears become `QuantModule`s) and return it.

    `inputs`: the block's calibration inputs (unused by "rtn"). `scale_groups`: the
    (producer, consumers) pairs of the architecture, for AWQ and SmoothQuant.
    """
    block.eval()
    if recipe.method == "smoothquant":
        smooth_groups(
            block, _groups(block, scale_groups), inputs, recipe.smoothquant_alpha, forward=_forward
        )
    act = recipe.activation_spec
    config = QuantConfig(overrides={nn.Linear: LayerQuant(weight=recipe.weight_spec, input=act)})

    def make(spec: QuantSpec, role: str) -> TensorQuantizer:
        return PerTokenQuantizer(spec) if role == "input" else TensorQuantizer(spec)

    with torch.no_grad():
        swap_modules(block, config, make)
    if recipe.method == "gptq":
        scale_dtype = torch.float16 if recipe.fp16_scales else None
        gptq(
            block,
            inputs,
            forward=_forward,
            damp=recipe.damp,
            act_order=recipe.act_order,
            progress=False,
            scale_dtype=scale_dtype,
        )
    elif recipe.method == "awq":
        for group in _groups(block, scale_groups):
            wrapped = group.producer
            if isinstance(wrapped, QuantModule):  # a quantized Linear producer (up_proj)
                group.producer = wrapped.module
            awq_group(block, group, inputs, _forward, recipe.awq_grid)
            if isinstance(wrapped, QuantModule) and wrapped.weight_quantizer is not None:
                wrapped.weight_quantizer.set_qparams_from(wrapped.module.weight)
    if recipe.fp16_scales:  # GPTQ's are already: it rounds each group's scale as it finds it
        for qm in quant_modules(block).values():
            wq = qm.weight_quantizer
            assert wq is not None
            wq.set_qparams(numerics.representable_scale(wq.scale, torch.float16), wq.zero_point)
    return block


def quantized_tensors(
    block: nn.Module, names: dict[str, str], dtypes: dict[str, torch.dtype]
) -> dict[str, Tensor | QuantizedWeight]:
    """The block's tensors under their checkpoint names: a `QuantizedWeight` for each quantized
    Linear weight, float tensors (in the checkpoint's dtype) for the rest. `names` maps the float
    block's state-dict keys to checkpoint names.

    The float tensors of the block are also rounded to that dtype in place, so that the block's
    outputs (the next block's inputs) are those of the model as written.
    """
    layers = quant_modules(block)
    out: dict[str, Tensor | QuantizedWeight] = {}
    for key, name in names.items():
        owner, _, leaf = key.rpartition(".")
        qm = layers.get(owner)
        if qm is not None and leaf == "weight":
            out[name] = _record(qm)
            continue
        tensor = _float_tensor(block, layers, owner, leaf)
        with torch.no_grad():
            stored = tensor.detach().to(dtypes[name])
            tensor.copy_(stored.to(tensor.dtype))
        out[name] = stored
    return out


def _float_tensor(block: nn.Module, layers: dict[str, QuantModule], owner: str, leaf: str) -> Any:
    module = layers[owner].module if owner in layers else block.get_submodule(owner)
    return getattr(module, leaf)


def _record(qm: QuantModule) -> QuantizedWeight:
    wq = qm.weight_quantizer
    assert wq is not None and wq.has_qparams
    spec = wq.spec
    weight = qm.module.weight.detach()
    codes = numerics.quantize(weight, wq.scale, wq.zero_point, spec).to(torch.int8)
    out_features = weight.shape[0]
    scale = wq.scale.detach().float().reshape(out_features, -1).clone()
    zero_point = None
    if not spec.symmetric:
        zero_point = wq.zero_point.detach().reshape(out_features, -1).clone()
    g = spec.granularity
    group_size = g.size if isinstance(g, PerGroup) else None
    return QuantizedWeight(codes, scale, zero_point, spec.bits, group_size)
