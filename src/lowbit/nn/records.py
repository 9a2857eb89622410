"""Specs and converted layers as plain data: the JSON records `convert` builds integer modules
from and `lowbit.io` saves, and the short names summaries and reprs print."""

from __future__ import annotations

from typing import Any, Literal

from lowbit.nn.per_token import PerTokenQuantizer
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.spec import Granularity, PerChannel, PerGroup, PerTensor, QuantSpec

ActMode = Literal["static", "dynamic", "per_token"]


def spec_to_dict(spec: QuantSpec) -> dict[str, Any]:
    """A spec as JSON-able data (`spec_from_dict` reads it back)."""
    g = spec.granularity
    gran: dict[str, Any] = {"type": type(g).__name__}
    if isinstance(g, PerChannel):
        gran["axis"] = g.axis
    elif isinstance(g, PerGroup):
        gran.update(size=g.size, axis=g.axis)
    return {
        "bits": spec.bits,
        "signed": spec.signed,
        "symmetric": spec.symmetric,
        "narrow_range": spec.narrow_range,
        "granularity": gran,
        "scale_type": spec.scale_type,
        "rounding": spec.rounding,
        "scheme": spec.scheme,
    }


def spec_from_dict(d: dict[str, Any]) -> QuantSpec:
    """Inverse of `spec_to_dict`; raises ValueError on anything malformed."""
    try:
        gran = d["granularity"]
        kind = gran["type"]
        granularity: Granularity
        if kind == "PerTensor":
            granularity = PerTensor()
        elif kind == "PerChannel":
            granularity = PerChannel(int(gran["axis"]))
        elif kind == "PerGroup":
            granularity = PerGroup(int(gran["size"]), int(gran["axis"]))
        else:
            raise ValueError(f"unknown granularity {kind!r}")
        return QuantSpec(
            bits=int(d["bits"]),
            signed=bool(d["signed"]),
            symmetric=bool(d["symmetric"]),
            narrow_range=bool(d["narrow_range"]),
            granularity=granularity,
            scale_type=d["scale_type"],
            rounding=d["rounding"],
            scheme=d["scheme"],
        )
    except (KeyError, TypeError) as error:
        raise ValueError(f"malformed spec record {d!r}: {error}") from error


def describe(spec: QuantSpec | None) -> str:
    """A short human name for a spec: 'int8 per-channel', 'uint8 affine', 'binary'."""
    if spec is None:
        return "float"
    base: str
    if spec.scheme in ("binary", "ternary"):
        base = spec.scheme
    else:
        base = f"{'int' if spec.signed else 'uint'}{spec.bits}"
        base += "" if spec.scheme == "uniform" else f" {spec.scheme}"
        base += "" if spec.symmetric else " affine"
    gran = type(spec.granularity).__name__
    gran = {"PerTensor": "per-tensor", "PerChannel": "per-channel"}.get(gran, "")
    if not gran:
        gran = f"group {spec.granularity.size}"  # type: ignore[union-attr]
    return f"{base} {gran}"


def act_record(q: TensorQuantizer | None) -> dict[str, Any] | None:
    """The record of an input or output quantizer (None: the activation stays float); raises
    ValueError for one that was never calibrated."""
    if q is None or q.mode == "off":
        return None
    if q.mode == "calibrate":
        raise ValueError(
            "a quantizer is still in calibrate mode: calibrate the model "
            "(lowbit.quantize / calibrate) before converting it"
        )
    mode: ActMode = (
        "per_token" if isinstance(q, PerTokenQuantizer) else ("dynamic" if q.dynamic else "static")
    )
    if mode == "static" and not q.has_qparams:
        raise ValueError(
            "a static quantizer has no scale yet (it saw no data): calibrate the "
            "model before converting it"
        )
    return {"spec": spec_to_dict(q.spec), "mode": mode}
