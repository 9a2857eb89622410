"""The per-token dynamic quantizer of `quantize_dynamic`: one scale per row of the input."""

from __future__ import annotations

from torch import Tensor

from lowbit import numerics
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.spec import PerChannel, QuantSpec


class PerTokenQuantizer(TensorQuantizer):
    """Dynamic quantizer with one scale per token: per row of the input flattened to 2-D.

    Its spec has granularity `PerChannel(0)`, applied to `x.reshape(-1, x.shape[-1])`, so a
    (batch, seq, features) input gets batch * seq scales, as in LLM.int8 / SmoothQuant kernels.
    """

    def __init__(self, spec: QuantSpec) -> None:
        if spec.granularity != PerChannel(0):
            raise ValueError("PerTokenQuantizer needs a spec with granularity PerChannel(0)")
        super().__init__(spec, dynamic=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "off" or x.numel() == 0:
            return x
        flat = x.reshape(-1, x.shape[-1])
        scale, zero_point = numerics.tensor_qparams(flat, self.spec)
        return numerics.fake_quantize(flat, scale, zero_point, self.spec).reshape(x.shape)
