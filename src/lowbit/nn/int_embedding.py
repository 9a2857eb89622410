"""`IntEmbedding`: an embedding table kept integer, dequantized row by row as it is looked up."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lowbit import numerics
from lowbit.nn.int_base import IntFallback
from lowbit.spec import PerChannel, PerGroup, PerTensor


class IntEmbedding(IntFallback):
    """Embedding with integer weights: gathers the selected rows of codes, dequantizes those.

    Rows are gathered straight from the stored codes (packed ones too, when a row fills whole
    bytes), with their scales where the scales vary by row (per row, per group of a row). An
    embedding whose forward is its own, or with `max_norm`, dequantizes the whole table.
    """

    kind = "IntEmbedding"

    def __init__(
        self, module: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor]
    ) -> None:
        super().__init__(module, record, tensors)
        if self._gathers():  # plain tensor ops: on any device
            self._kernels = ("gather", "gather")

    def _gathers(self) -> bool:
        m, g = self.module, self.weight_spec.granularity
        per_byte = 8 // (numerics.packed_bits(self.weight_spec) or 8)  # a row must fill whole bytes
        return (
            type(m).forward is nn.Embedding.forward
            and getattr(m, "max_norm", None) is None
            and self.weight_shape[1] % per_byte == 0
            and (isinstance(g, PerTensor | PerChannel) or g.axis % 2 == 1)
        )

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.kernel != "gather" or args or kwargs or not isinstance(x, Tensor):
            return super().forward(x, *args, **kwargs)
        index = x.reshape(-1)
        rows = self._row_codes(index)  # first: it checks the indices
        scale = self._row_params(self.weight_scale, index)
        zero_point = self._row_params(self.weight_zero_point, index)
        y = numerics.dequantize(rows, scale, zero_point, self.weight_spec)
        return self._fake_quant("output", y.reshape(*x.shape, self.weight_shape[1]))

    def _row_codes(self, index: Tensor) -> Tensor:
        """The integer codes of rows `index`: [len(index), width]."""
        rows, width = self.weight_shape
        lo, hi = (int(v) for v in torch.aminmax(index)) if index.numel() else (0, 0)
        if lo < 0 or hi >= rows:
            raise IndexError(f"embedding index out of range [0, {rows}): {index.tolist()[:8]}")
        stored = self.qweight.reshape(rows, -1)[index].reshape(-1)
        return numerics.load_codes(stored, self.weight_spec, (len(index), width))

    def _row_params(self, param: Tensor, index: Tensor) -> Tensor:
        """A scale or zero point for rows `index`: gathered where it varies by row."""
        g = self.weight_spec.granularity
        by_row = isinstance(g, PerGroup) or (isinstance(g, PerChannel) and g.axis % 2 == 0)
        return param[index] if by_row and param.dim() else param
