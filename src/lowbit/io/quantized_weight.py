"""One weight matrix quantized to integer codes, as the checkpoint writers take it.

The streaming quantizer (`lowbit.pretrained`) produces these block by block, and each output
format (compressed-tensors, GGUF, lowbit's own file) packs them its own way, so the codes and
their scales travel between the two in one plain, checked record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    """Codes of a (out_features, in_features) matrix with per-channel or per-group scales.

    `codes` are int8 in the signed range of `bits` (symmetric: [-2^(b-1), 2^(b-1) - 1]);
    `scale` is float32 of shape (out_features, groups), one column when `group_size` is None
    (per output channel); `zero_point`, same shape as `scale`, is None for symmetric weights.
    The float weight is `(codes - zero_point) * scale`, each scale repeated over its group.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group_size: int | None

    def __post_init__(self) -> None:
        if self.codes.dtype != torch.int8 or self.codes.dim() != 2:
            raise TypeError(
                f"codes must be a 2-D int8 tensor, got {self.codes.dtype} {tuple(self.codes.shape)}"
            )
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        out_features, in_features = self.codes.shape
        if self.group_size is None:
            groups = 1
        elif self.group_size <= 0 or in_features % self.group_size:
            raise ValueError(f"group_size {self.group_size} must divide in_features {in_features}")
        else:
            groups = in_features // self.group_size
        if tuple(self.scale.shape) != (out_features, groups):
            raise ValueError(
                f"scale must have shape {(out_features, groups)}, got {tuple(self.scale.shape)}"
            )
        if self.zero_point is not None and self.zero_point.shape != self.scale.shape:
            raise ValueError("zero_point must have the shape of scale")

    @property
    def shape(self) -> tuple[int, int]:
        """The (out_features, in_features) of the float matrix."""
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix these codes stand for."""
        repeat = self.shape[1] if self.group_size is None else self.group_size
        codes = self.codes.to(torch.float32)
        if self.zero_point is not None:
            codes = codes - self.zero_point.to(torch.float32).repeat_interleave(repeat, dim=1)
        return codes * self.scale.to(torch.float32).repeat_interleave(repeat, dim=1)
