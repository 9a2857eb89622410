"""Integer kernels behind the converted modules of `lowbit.nn` (`int_linear`, `int_conv`).

- `dynamic`: int8 Linear with per-token activation scales: exact per-row codes, then the GEMM by
  the fastest route for the shape (lowbit's VNNI kernel, fbgemm or oneDNN on VNNI CPUs,
  `torch._int_mm` everywhere), then one rescale pass; each route one C++ op.
- `native`: builds lowbit's C++ kernels (`csrc/`) on first use.
- `weight_only`: compiled int8 / int4 GEMVs for one to a few rows (LLM decoding).
- `conv`: static int8 convolution through oneDNN (`torch.ops.onednn.qconv_pointwise`).
- `compile`: the switch for compiled kernels, C++ and `torch.compile` (`set_compile`, env
  `LOWBIT_COMPILE=0`).

docs/kernels.md says which kernel runs when, and what it measured.
"""

from __future__ import annotations

from lowbit.kernels import conv
from lowbit.kernels.compile import compile_enabled, set_compile
from lowbit.kernels.conv import onednn_conv_available, qconv2d
from lowbit.kernels.dynamic import dynamic_int8_linear, quantize_per_token

__all__ = [
    "compile_enabled",
    "conv",
    "dynamic_int8_linear",
    "onednn_conv_available",
    "qconv2d",
    "quantize_per_token",
    "set_compile",
]
