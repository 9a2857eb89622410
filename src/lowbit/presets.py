"""Ready-made `QuantConfig`s for the common targets, as functions and by name (`by_name`).

Configs are frozen: derive a variant with `dataclasses.replace(config, ...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from lowbit.config import LayerQuant, QuantConfig
from lowbit.spec import PerChannel, PerGroup, PerTensor, QuantSpec

# TensorRT's int8: symmetric, narrow range [-127, 127], weights per output channel.
_INT8_WEIGHT = QuantSpec(bits=8, narrow_range=True, granularity=PerChannel(0))
_INT8_ACT = QuantSpec(bits=8, narrow_range=True, granularity=PerTensor())


def int8(calibrator: str = "minmax", fusable_outputs: bool = True) -> QuantConfig:
    """W8A8 as TensorRT: per-channel symmetric int8 weights, per-tensor symmetric int8 inputs.

    fusable_outputs (default True) also quantizes the layer outputs that feed residual Adds,
    pools and the like (`QuantConfig.fusable_outputs`), and the output of every add of two
    tensors (`QuantConfig.ops`): ONNX Runtime and TensorRT run a layer or an Add in integer only
    when its output is quantized, as their own quantizers do. False quantizes layer inputs only.
    """
    return QuantConfig(
        weight=_INT8_WEIGHT,
        input=_INT8_ACT,
        calibrator=calibrator,
        fusable_outputs=fusable_outputs,
        ops={"add": _INT8_ACT} if fusable_outputs else {},
    )


def int8_asymmetric(calibrator: str = "minmax", fusable_outputs: bool = True) -> QuantConfig:
    """W8A8 as ONNX Runtime and TFLite: int8 per-channel weights, uint8 affine inputs.

    fusable_outputs: as in `int8`; with it ONNX Runtime runs every conv as QLinearConv and
    every residual add as QLinearAdd.
    """
    act = QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerTensor())
    return QuantConfig(
        weight=_INT8_WEIGHT,
        input=act,
        calibrator=calibrator,
        fusable_outputs=fusable_outputs,
        ops={"add": act} if fusable_outputs else {},
    )


# Attention probabilities lie in [0, 1]: unsigned codes give them all 256 levels.
_UINT8_PROBS = QuantSpec(bits=8, signed=False, granularity=PerTensor())


def int8_transformer(calibrator: str = "minmax") -> QuantConfig:
    """Static W8A8 for transformer encoders and decoders: every Linear (int8 per-channel weights,
    int8 per-tensor inputs) and both attention matmuls, Q @ K^T and P @ V.

    Both operands of each matmul are quantized: Q, K and V as the outputs of their Linear layers
    (`fusable_outputs`), P as the output of the softmax (uint8: it lies in [0, 1]), and the
    matmuls' own outputs (`ops`), so that ONNX Runtime runs them in integer. A model with
    `scaled_dot_product_attention` gets the same points: the call counts as its matmul,
    softmax and matmul (`lowbit.nn.op_points`). Kept in float, as `lowbit.diagnose` named
    them on all-MiniLM-L6-v2 (docs/transformers.md): every tensor + tensor add. With the adds
    quantized too, STS-B Spearman fell from 93.3 to 83.8 (300 dev pairs); the residual add
    before each block's last LayerNorm alone accounts for 91% of that loss. An eager model's
    attention-mask add holds -3.4e38 beside the scores, which no int8 scale can hold.
    Activations are per tensor: static per-token scales are not a thing runtimes take in Q/DQ.
    """
    return QuantConfig(
        weight=_INT8_WEIGHT,
        input=_INT8_ACT,
        calibrator=calibrator,
        fusable_outputs=True,
        ops={"matmul": _INT8_ACT, "softmax": _UINT8_PROBS},
    )


def weight_only(bits: int = 8, group_size: int | None = None) -> QuantConfig:
    """Weights only, channel-wise abs-max (or per group of `group_size` inputs); float inputs."""
    granularity = PerGroup(group_size) if group_size else PerChannel(0)
    return QuantConfig(weight=QuantSpec(bits=bits, granularity=granularity))


def w4a8(group_size: int | None = 128, calibrator: str = "minmax") -> QuantConfig:
    """4-bit weights (per group of inputs, or per channel with None) and int8 inputs."""
    granularity = PerGroup(group_size) if group_size else PerChannel(0)
    weight = QuantSpec(bits=4, granularity=granularity)
    return QuantConfig(weight=weight, input=_INT8_ACT, calibrator=calibrator)


Ends = Literal["int8", "float", "same"]


def binary(xnor: bool = False, ends: Ends | None = None) -> QuantConfig:
    """Binary weights (sign times the mean |w| per channel, XNOR-Net / BWN).

    xnor=True binarizes the inputs of each layer too (XNOR-Net): around a centre per channel
    with one scale, set by calibration and learned in QAT (`lowbit.nn.binary_act`), so that
    ReLU outputs binarize to something other than +1. Converted, such layers run on bits
    (`module.kernel` "xnor"; binary weights with float inputs: "bwn").
    ends: the first and last layers (models of three or more): "int8" (W8A8, the default with
    xnor=True), "float", or "same" as the others (the default without xnor): XNOR-Net keeps
    them in higher precision; the summary says which they are.
    """
    weight = QuantSpec(bits=1, scheme="binary", granularity=PerChannel(0))
    act = QuantSpec(bits=1, scheme="binary", granularity=PerTensor()) if xnor else None
    ends = ends if ends is not None else ("int8" if xnor else "same")
    return QuantConfig(weight=weight, input=act, ends=_ends(ends))


def ternary(
    activations: Literal["float", "int8", "ternary"] = "float", ends: Ends = "same"
) -> QuantConfig:
    """Ternary weights {-a, 0, +a} per channel (TWN); float inputs, static per-tensor int8
    ones, or ternary ones centred per channel as `binary(xnor=True)`'s (c + s * {-1, 0, +1},
    set by calibration and learned in QAT). Converted, all run on two bit-planes
    (`module.kernel` "ternary"; ternary x ternary by popcounts).

    ends: the first and last layers (models of three or more): "int8", "float" or "same".
    """
    choices = {"float": None, "int8": _INT8_ACT, "ternary": QuantSpec(bits=2, scheme="ternary")}
    if activations not in choices:
        raise ValueError(f"activations must be 'float', 'int8' or 'ternary', got {activations!r}")
    weight = QuantSpec(bits=2, scheme="ternary", granularity=PerChannel(0))
    act = choices[activations]
    return QuantConfig(weight=weight, input=act, ends=_ends(ends))


def _ends(ends: str) -> LayerQuant | None:
    """`QuantConfig.ends` for a preset's `ends` argument."""
    choices = {"int8": LayerQuant(_INT8_WEIGHT, _INT8_ACT), "float": LayerQuant(), "same": None}
    if ends not in choices:
        raise ValueError(f"ends must be one of {', '.join(choices)}, got {ends!r}")
    return choices[ends]


# The named presets, as the command line offers them; the calibrator reaches only the presets
# that calibrate activations.
_BY_NAME: dict[str, Callable[[str], QuantConfig]] = {
    "int8": lambda calibrator: int8(calibrator),
    "int8-asym": lambda calibrator: int8_asymmetric(calibrator),
    "int8-transformer": lambda calibrator: int8_transformer(calibrator),
    "w8": lambda _: weight_only(8),
    "w16": lambda _: weight_only(16),
    "w4": lambda _: weight_only(4),
    "w4a8": lambda calibrator: w4a8(None, calibrator),
    "binary": lambda _: binary(),
    "xnor": lambda calibrator: replace(binary(xnor=True), calibrator=calibrator),
    "ternary": lambda _: ternary(),
    "ternary-int8": lambda calibrator: replace(ternary("int8"), calibrator=calibrator),
}
NAMES: tuple[str, ...] = tuple(_BY_NAME)


def by_name(name: str, calibrator: str = "minmax") -> QuantConfig:
    """The preset called `name` (one of `NAMES`): "int8", "w4a8", ...; "w4a8" is per channel.

    `calibrator` applies to the presets with calibrated activations (int8, int8-asym, w4a8,
    ternary-int8, and xnor's 8-bit first and last layers); "xnor" is `binary(xnor=True)` (binary
    weights and centred binary inputs), "ternary-int8" `ternary("int8")`.
    """
    if name not in _BY_NAME:
        raise ValueError(f"preset must be one of {', '.join(NAMES)}, got {name!r}")
    return _BY_NAME[name](calibrator)
