"""`QuantModule`: wraps a float layer so its weight and inputs are quantized in simulation.

The wrapped layer keeps its own forward. Subclasses that real models use (EfficientNet's
`Conv2dStaticSamePadding` pads and then calls `F.conv2d`) therefore behave exactly as before: the
wrapper only substitutes the fake-quantized weight for the call, through
`torch.func.functional_call`, and quantizes the first positional input.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from lowbit.nn.quantizer import TensorQuantizer

# Layers lowbit knows how to quantize. Embedding inputs are indices: only its weight is quantized.
QUANTIZABLE = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.Embedding,
)


class QuantModule(nn.Module):
    """A float layer plus the quantizers of its weight, input and (optionally) output."""

    def __init__(
        self,
        module: nn.Module,
        weight_quantizer: TensorQuantizer | None,
        input_quantizer: TensorQuantizer | None = None,
        output_quantizer: TensorQuantizer | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, QUANTIZABLE):
            raise TypeError(
                f"cannot quantize {type(module).__name__}: lowbit quantizes "
                f"{', '.join(t.__name__ for t in QUANTIZABLE)} and their subclasses"
            )
        if isinstance(module, nn.Embedding) and input_quantizer is not None:
            raise ValueError("an Embedding's input is indices; it takes no input quantizer")
        self.module = module
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer

    def quantized_weight(self) -> Tensor:
        """The weight as the quantized model sees it (fake-quantized, still float)."""
        weight: Tensor = self.module.weight
        return weight if self.weight_quantizer is None else self.weight_quantizer(weight)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.weight_quantizer is None:
            y = self.module(x, *args, **kwargs)
        else:
            weight = {"weight": self.quantized_weight()}
            y = functional_call(self.module, weight, (x, *args), kwargs, strict=False)
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def quantizers(self) -> dict[str, TensorQuantizer]:
        roles = {
            "weight": self.weight_quantizer,
            "input": self.input_quantizer,
            "output": self.output_quantizer,
        }
        return {role: q for role, q in roles.items() if q is not None}


def quant_modules(model: nn.Module) -> dict[str, QuantModule]:
    """The model's quantized layers by qualified name: the one walk every layer above uses."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}
