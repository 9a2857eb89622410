"""A per-input-channel factor in front of a layer, where no op before it can absorb one.

SmoothQuant and AWQ divide a Linear's input channels by s and multiply its weight columns by s.
When the input's producer cannot take the division (a LayerNorm whose output also feeds a
residual connection, a GELU, attention's context), `InputScale` applies it explicitly: the
layer runs on `x * (1 / s)`, so the layer's input quantizer sees the scaled tensor. Exported, it
is one `Mul` by a constant before the layer's `QuantizeLinear`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["InputScale"]


class InputScale(nn.Module):
    """Runs `layer` on its input multiplied by `inv_scale` (per last-dimension channel)."""

    inv_scale: Tensor

    def __init__(self, layer: nn.Module, inv_scale: Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("inv_scale", inv_scale.detach().clone())

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.layer(x * self.inv_scale.to(x.dtype), *args, **kwargs)
