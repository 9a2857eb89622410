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

import torch

from lowbit.kernels import conv, dynamic, native
from lowbit.kernels.compile import compile_enabled, set_compile
from lowbit.kernels.conv import onednn_conv_available, qconv2d
from lowbit.kernels.dynamic import dynamic_int8_linear, quantize_per_token


def cpu_route() -> dict[str, str]:
    """Which integer kernels lowbit's converted modules run on this CPU, in words: the ISA level
    of torch's own kernels, whether uint8 x int8 GEMMs sum exactly here (VNNI / AMX), the routes
    of a dynamic int8 Linear, whether lowbit's C++ kernels are built, and what an int8 conv runs.
    For benchmark tables and bug reports: the same model runs different kernels on another CPU."""
    conv_kernel = (
        "onednn_qconv"
        if conv.onednn_conv_available() and conv.onednn_conv_exact(-127, 127)
        else "dequantize"
    )
    return {
        "aten": torch.backends.cpu.get_cpu_capability(),
        "u8_gemm_exact": str(dynamic.u8_gemm_safe()),
        "dynamic_linear": ",".join(dynamic.default_routes()),
        "cpp_kernels": _cpp_kernels(),
        "int8_conv": conv_kernel,
    }


def _cpp_kernels() -> str:
    if not native.switched_on():
        return "switched off"
    return "built" if native.ops() is not None else "build failed"


__all__ = [
    "compile_enabled",
    "conv",
    "cpu_route",
    "dynamic_int8_linear",
    "onednn_conv_available",
    "qconv2d",
    "quantize_per_token",
    "set_compile",
]
