"""The base of the converted integer modules: integer weights in buffers, their scales and zero
points, how the inputs and outputs are quantized; and the fallback that dequantizes the weight
into the original layer's forward.

Every integer module is built from one *record* (plain JSON data, `lowbit.nn.records`) and a dict
of tensors, so `convert` and `lowbit.io.load` construct them the same way. The state dict holds
the portable form (int8 / int16 codes, or codes of 4 bits and fewer packed into uint8 with
`numerics.store_codes`, float32 scales, int32 zero points); kernel-specific layouts are caches
built on first use and never saved (`lowbit.nn.packs`).

Kernels (`module.kernel` names the one its forward runs; each module chooses at construction, for
the CPU and for other devices, and `kernel` reads the choice for the device its weight is on):
- "int_mm": `torch._int_mm`, int8 x int8 -> int32, for int8 inputs (static per-tensor or
  dynamic per-token) times symmetric int8 weights (per-tensor or per output channel). The input
  zero point is taken out with precomputed weight row sums, so the accumulator is exact.
  Per-token dynamic inputs run `lowbit.kernels.dynamic_int8_linear`: quantize, an int8 GEMM
  (lowbit's VNNI kernel, `_int_mm`, fbgemm or oneDNN, by shape and CPU), rescale, in one C++
  op; its packed weights are a cache.
- "int8pack": `aten._weight_int8pack_mm`, float inputs times int8 per-channel weights.
- "int4pack": `aten._weight_int4pack_mm_for_cpu`, float inputs times int4 group-wise weights.
  Where lowbit's C++ kernels are built (AVX-512 CPUs), both run those instead
  (`lowbit.kernels.weight_only`): far faster for one token and for many.
- "onednn_qconv": Conv2d with static per-tensor int8 inputs and symmetric int8 weights:
  oneDNN's quantized convolution (`lowbit.kernels.qconv2d`), float32 output, channels_last.
- "gather": Embedding: gathers the rows of codes (packed ones too) that the indices select and
  dequantizes only those rows, so the table stays integer in memory.
- "dequantize": dequantize the weight and run the layer's float forward (with the input
  fake-quantized): other convolutions, and any spec or layer no kernel handles.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lowbit import numerics
from lowbit.nn.packs import Packs
from lowbit.nn.records import ActMode, describe, spec_from_dict
from lowbit.spec import QuantSpec

Kernel = Literal[
    "int_mm",
    "int8pack",
    "int4pack",
    "onednn_qconv",
    "gather",
    "dequantize",
    "xnor",
    "bwn",
    "ternary",
]


class IntModule(nn.Module):
    """Base: integer weight codes, their scales and zero points, input and output quantization.

    Buffers (all saved): `qweight`, `weight_scale`, `weight_zero_point` (affine specs only;
    symmetric ones have an all-zero one that is not saved), `input_scale` / `input_zero_point`
    and `output_scale` / `output_zero_point` for static activation quantization.
    """

    kind = "IntModule"
    # (on the CPU, on other devices): set once by a subclass's __init__ (`_choose_kernels`)
    _kernels: tuple[Kernel, Kernel] = ("dequantize", "dequantize")
    qweight: Tensor
    weight_scale: Tensor
    weight_zero_point: Tensor

    def __init__(self, record: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        super().__init__()
        self.record = dict(record, kind=self.kind)
        self.weight_spec = spec_from_dict(record["weight"]["spec"])
        self.weight_shape = tuple(int(n) for n in record["weight"]["shape"])
        self.register_buffer("qweight", need(tensors, "qweight"))
        self.register_buffer("weight_scale", need(tensors, "weight_scale").float())
        if self.weight_spec.symmetric:
            zp = torch.zeros(self.weight_scale.shape, dtype=torch.int32)
            self.register_buffer("weight_zero_point", zp, persistent=False)
        else:
            self.register_buffer("weight_zero_point", need(tensors, "weight_zero_point"))
        self.input_spec, self.input_mode = self._act("input", record, tensors)
        self.output_spec, self.output_mode = self._act("output", record, tensors)
        self._packs = Packs()

    @property
    def kernel(self) -> Kernel:
        """The kernel `forward` runs, for the device this module's weight is on."""
        on_cpu, elsewhere = self._kernels
        return on_cpu if self._buffers["qweight"].is_cpu else elsewhere  # type: ignore[union-attr]

    def _pack_sources(self) -> tuple[Tensor | None, ...]:
        """The tensors this module's kernel layouts are derived from (`lowbit.nn.packs`): its
        buffers (read from `_buffers`: `nn.Module.__getattr__` costs a microsecond each)."""
        return tuple(self._buffers.values())

    def current_packs(self) -> dict[str, Any]:
        """The kernel layouts this module holds now, by name (after dropping stale ones)."""
        return self._packs.of(self._pack_sources())

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # Buffers made under torch.inference_mode keep no version counter, so `Packs` cannot
        # see a load_state_dict copy into them: the layouts are dropped here too.
        self._packs = Packs()
        super()._load_from_state_dict(*args, **kwargs)

    def _act(
        self, role: str, record: dict[str, Any], tensors: dict[str, Tensor]
    ) -> tuple[QuantSpec | None, ActMode | None]:
        rec = record.get(role)
        if rec is None:
            return None, None
        spec = spec_from_dict(rec["spec"])
        mode = rec["mode"]
        if mode not in ("static", "dynamic", "per_token"):
            raise ValueError(f"unknown {role} quantization mode {mode!r}")
        if mode == "static":
            self.register_buffer(f"{role}_scale", need(tensors, f"{role}_scale").float())
            zp = need(tensors, f"{role}_zero_point").to(torch.int32)
            self.register_buffer(f"{role}_zero_point", zp)
        return spec, mode

    # -- weights ------------------------------------------------------------------------------
    def weight_codes(self) -> Tensor:
        """The integer weight codes, unpacked, in the weight's shape."""
        return numerics.load_codes(self.qweight, self.weight_spec, self.weight_shape)

    def dequantized_weight(self) -> Tensor:
        """The weight as float32 reals: what the "dequantize" kernel computes with."""
        return numerics.dequantize(
            self.weight_codes(), self.weight_scale, self.weight_zero_point, self.weight_spec
        )

    # -- activations --------------------------------------------------------------------------
    def _qparams(self, role: str, x: Tensor) -> tuple[Tensor, Tensor]:
        spec = self.input_spec if role == "input" else self.output_spec
        mode = self.input_mode if role == "input" else self.output_mode
        assert spec is not None
        if mode == "static":
            return getattr(self, f"{role}_scale"), getattr(self, f"{role}_zero_point")
        if mode == "per_token":
            return numerics.tensor_qparams(x.reshape(-1, x.shape[-1]), spec)
        return numerics.tensor_qparams(x, spec)

    def _fake_quant(self, role: str, x: Tensor) -> Tensor:
        spec = self.input_spec if role == "input" else self.output_spec
        if spec is None or x.numel() == 0:
            return x
        scale, zero_point = self._qparams(role, x)
        if (self.input_mode if role == "input" else self.output_mode) == "per_token":
            flat = x.reshape(-1, x.shape[-1])
            return numerics.fake_quantize(flat, scale, zero_point, spec).reshape(x.shape)
        return numerics.fake_quantize(x, scale, zero_point, spec)

    def state_record(self) -> dict[str, Any]:
        """The JSON record `lowbit.io` saves to rebuild this module."""
        return dict(self.record)

    def extra_repr(self) -> str:
        parts = [f"W {describe(self.weight_spec)}"]
        if self.input_spec is not None:
            if self.input_mode == "per_token":
                parts.append(f"I int{self.input_spec.bits} per-token dynamic")
            else:
                parts.append(f"I {describe(self.input_spec)} {self.input_mode}")
        if self.output_spec is not None:
            parts.append(f"O {describe(self.output_spec)} {self.output_mode}")
        return f"{', '.join(parts)}, kernel={self.kernel}"


def need(tensors: dict[str, Tensor], key: str) -> Tensor:
    """tensors[key]; a KeyError naming the tensor a record needs and the file lacks."""
    if key not in tensors:
        raise KeyError(key)
    return tensors[key]


class IntFallback(IntModule):
    """Integer weights, computed by dequantizing them into the original layer's own forward.

    The float layer stays a child (`module`) with its weight Parameter removed, so subclasses
    that pad or reshape in their forward (EfficientNet's `Conv2dStaticSamePadding`) keep that.
    """

    kind = "IntFallback"

    def __init__(
        self, module: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor]
    ) -> None:
        super().__init__(record, tensors)
        if "weight" in module._parameters:
            del module.weight
        bias = tensors.get("module.bias")
        if record.get("bias") and bias is None and getattr(module, "bias", None) is None:
            raise KeyError("module.bias")
        if bias is not None and getattr(module, "bias", None) is None:
            module._parameters.pop("bias", None)
            module.__dict__.pop("bias", None)
            module.bias = nn.Parameter(bias.detach().clone())  # a folded BatchNorm made one
        self.module = module

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point():
            x = self._fake_quant("input", x)
        weight = {"weight": self.dequantized_weight()}
        y = functional_call(self.module, weight, (x, *args), kwargs, strict=False)
        return self._fake_quant("output", y) if isinstance(y, Tensor) else y
