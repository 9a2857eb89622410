"""Save and load converted (integer) models: one safetensors file, never pickle.

The file holds every tensor of the converted model's state dict (integer weights as int8 / int16,
or packed into uint8 for 4 bits and fewer; float32 scales; int32 zero points; the float layers'
parameters) and, in the safetensors metadata, a JSON header:

    {"format": "lowbit", "version": 1, "torch": "...",
     "modules": [{"name": "fc1", "kind": "IntLinear", "weight": {"spec": {...}, "shape": [...]},
                  "input": {"spec": {...}, "mode": "static"} | null, "output": ... }, ...],
     "ops": [{"caller": "blocks.3", "counts": {"add": 1},            # functional-op output
              "points": {"add_0": {"spec": {...}, "mode": "quantize"}}}],  # quantizers
     "identity": ["features.1", ...],          # layers the saved model replaced by nn.Identity
                                               # (BatchNorms folded into their convolution)
     "extras": ["cli.recipe", ...]}            # byte strings saved as uint8 tensors named
                                               # "__lowbit_extra__.<name>" (`save(extras=)`)

Loading needs the float model's architecture, as `load_state_dict` does: pass a freshly built
float model and `load` rebuilds the integer modules inside it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from lowbit import numerics
from lowbit._atomic import write_atomic
from lowbit.distributed import on_rank_zero
from lowbit.nn.int_base import IntModule
from lowbit.nn.int_build import int_module_from_record
from lowbit.nn.modules import QuantModule
from lowbit.nn.op_points import OpPoints, op_points
from lowbit.nn.records import spec_from_dict
from lowbit.numerics import check_codes, check_stored_codes, stored_codes_layout
from lowbit.spec import PerTensor, QuantSpec

__all__ = ["FORMAT", "VERSION", "load", "read_extra", "read_header", "save"]

FORMAT = "lowbit"
VERSION = 1
_KEY = "lowbit"
_EXTRA = "__lowbit_extra__."  # tensor-name prefix of the byte strings saved with `extras`


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    extras: Mapping[str, bytes] | None = None,
    every_rank: bool = False,
) -> None:
    """Write a converted model to `path` (a safetensors file), atomically.

    `extras`: named byte strings stored beside the model (`read_extra` returns them; `load`
    ignores them), for tools that keep their own data in the file. The file is written under a
    temporary name in the same folder and renamed into place (`lowbit._atomic`), so on any error
    no half-written file remains and an existing file at `path` is left untouched.

    Under torch.distributed only rank 0 writes and the others wait for it; `every_rank=True`
    makes every rank write its own `path`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ValueError(
            "model still holds simulated QuantModules: call lowbit.convert(model) "
            "first, then save the converted model"
        )
    records = [
        dict(m.state_record(), name=name)
        for name, m in model.named_modules()
        if isinstance(m, IntModule)
    ]
    if any(not r["name"] for r in records):
        raise ValueError("model is itself an integer layer: save a model that contains it")
    extras = dict(extras or {})
    header = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "modules": records,
        "ops": [points.record() for points in op_points(model).values()],
        "identity": [n for n, m in model.named_modules() if n and isinstance(m, nn.Identity)],
        "extras": sorted(extras),
    }
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name, data in extras.items():
        if not isinstance(data, bytes):
            raise TypeError(f"extras[{name!r}] must be bytes, got {type(data).__name__}")
        tensors[_EXTRA + name] = torch.from_numpy(np.frombuffer(data, np.uint8).copy())
    chunks = _safetensors_chunks(tensors, {_KEY: json.dumps(header)})
    on_rank_zero(lambda: write_atomic(path, *chunks), every_rank=every_rank)


def _safetensors_chunks(
    tensors: dict[str, Tensor], metadata: dict[str, str]
) -> list[bytes | memoryview]:
    """A safetensors file as the pieces to write one after the other: its length-prefixed JSON
    header, then each tensor's bytes, not copied (safetensors' own writers make a temporary
    file, or hold the whole file in memory twice)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    data = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors.values()]
    offset = 0
    for (name, t), raw in zip(tensors.items(), data, strict=True):
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name} is {t.dtype}, which lowbit files do not hold")
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + raw.numel()],
        }
        offset += raw.numel()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # tensor data starts 8-byte aligned
    return [struct.pack("<Q", len(text)), text, *(raw.numpy().data for raw in data)]


_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a lowbit file (its tensors are not read); ValueError if `path` is
    not one."""
    header, _ = _read(path, tensors=False)
    return header


def read_extra(path: str | os.PathLike[str], name: str) -> bytes | None:
    """The byte string saved as `extras[name]`, or None if the file has none of that name."""
    return read_extras(path, [name]).get(name)


def read_extras(path: str | os.PathLike[str], names: Iterable[str]) -> dict[str, bytes]:
    """Those of `names` the file has as extras, from one read of its header; ValueError if
    `path` is not a lowbit file (also when `names` is empty)."""
    stored = read_header(path)["extras"]
    present = [n for n in names if n in stored]
    if not present:
        return {}
    with safe_open(str(path), framework="pt") as f:
        return {n: bytes(f.get_tensor(_EXTRA + n).numpy()) for n in present}


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Load a saved converted model into `model`, a freshly built float model of the same
    architecture (modified in place and returned), as `load_state_dict` does.

    Every tensor is checked against the header and the model (shapes, dtypes, integer codes
    within the range of their spec) before the model is touched: a bad file or a model of
    another architecture raises ValueError and leaves `model` as it was.
    """
    if model is None:
        read_header(path)  # a bad file is reported as such first
        raise ValueError(
            "lowbit.load needs a model skeleton: pass a freshly built float model "
            "of the same architecture, load(path, model)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    header, tensors = _read(path, tensors=True)
    for name in header["extras"]:
        tensors.pop(_EXTRA + name, None)
    for name in [*header["identity"], *(r["name"] for r in header["modules"])]:
        _check_layer(model, name, path)
    built = {r["name"]: _build(model, r, tensors, path) for r in header["modules"]}
    ops = [_build_ops(model, r, tensors, path) for r in header["ops"]]
    _check_state(_state_after(model, header["identity"], built, ops), tensors, path)
    for name in header["identity"]:
        model.set_submodule(name, nn.Identity())
    for name, int_module in built.items():
        model.set_submodule(name, int_module)
    for points in ops:
        points.attach(model.get_submodule(points.caller))
    model.load_state_dict(tensors, strict=True)
    return model


def _build(
    model: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor], path: object
) -> IntModule:
    """The integer module of one record, checked; the float layer in `model` stays as it is."""
    name = record["name"]
    float_module = _get_submodule(model, name, path)
    prefix = f"{name}."
    local = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        _check_record(float_module, record, local)
        return int_module_from_record(_own_copy(float_module), record, local)
    except KeyError as error:
        raise ValueError(
            f"not a lowbit file: {path}: tensor {prefix}{error.args[0]} is missing"
        ) from error
    except _Mismatch as error:
        raise ValueError(
            f"model does not match the file {path}: layer {name!r}: {error}; "
            "pass a float model of the same architecture"
        ) from None
    except ValueError as error:
        raise ValueError(f"not a lowbit file: {path}: layer {name!r}: {error}") from None


def _build_ops(
    model: nn.Module, record: dict[str, Any], tensors: dict[str, Tensor], path: object
) -> OpPoints:
    """The functional-op quantizers of one calling module, checked against the model."""
    try:
        points = OpPoints.from_record(record, tensors)
    except ValueError as error:
        raise ValueError(f"not a lowbit file: {path}: {error}") from None
    owner = _get_submodule(model, points.caller, path) if points.caller else model
    if hasattr(owner, "lowbit_ops"):
        raise ValueError(
            f"model already has op quantizers on {points.caller!r}: pass a float model"
        )
    return points


class _Mismatch(Exception):
    """The float model, not the file, differs from what was saved."""


def _own_copy(module: nn.Module) -> nn.Module:
    """A shallow copy with its own parameter, buffer and child tables: an integer module built
    on it (which removes the float weight) leaves the user's layer intact."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    return clone


def _check_record(
    float_module: nn.Module, record: dict[str, Any], local: dict[str, Tensor]
) -> None:
    """Check one layer's tensors against its record and the float layer (ValueError,
    `_Mismatch`, or KeyError naming a missing tensor)."""
    weight = record.get("weight")
    if not (
        isinstance(weight, dict)
        and isinstance(weight.get("shape"), list)
        and isinstance(weight.get("spec"), dict)
    ):
        raise ValueError("malformed weight record")
    shape = tuple(int(n) for n in weight["shape"])
    spec = spec_from_dict(weight["spec"])
    float_weight = getattr(float_module, "weight", None)
    if not isinstance(float_weight, Tensor) or tuple(float_weight.shape) != shape:
        found = tuple(float_weight.shape) if isinstance(float_weight, Tensor) else "no weight"
        raise _Mismatch(f"the file has a weight of shape {shape}, the model {found}")
    codes_shape, codes_dtype = stored_codes_layout(spec, shape)
    qweight = _tensor(local, "qweight", codes_shape, codes_dtype)
    try:
        check_stored_codes(qweight, spec)
    except ValueError as error:
        raise ValueError(f"tensor qweight: {error}") from None
    param_shape = numerics.reduce_by(torch.empty(shape, device="meta"), spec.granularity, _rows)
    _check_qparams(local, "weight", spec, param_shape.shape)
    for role in ("input", "output"):
        act = record.get(role)
        if isinstance(act, dict) and act.get("mode") == "static":
            act_spec = spec_from_dict(act["spec"])
            scale_shape = local.get(f"{role}_scale", torch.empty(())).shape
            if isinstance(act_spec.granularity, PerTensor) and scale_shape.numel() != 1:
                raise ValueError(f"{role}_scale has shape {tuple(scale_shape)}, expected 1 value")
            _check_qparams(local, role, act_spec, scale_shape)
    if record.get("bias"):
        key = "bias" if record.get("kind") == "IntLinear" else "module.bias"
        _tensor(local, key, torch.Size([_out_features(float_module, shape)]), torch.float32)


def _rows(rows: Tensor) -> Tensor:
    return rows.amin(1)


def _check_qparams(local: dict[str, Tensor], role: str, spec: QuantSpec, shape: torch.Size) -> None:
    """Scale (finite, > 0) and, where saved, zero point (within the codes) of one role."""
    scale = _tensor(local, f"{role}_scale", shape, torch.float32)
    lo, hi = torch.aminmax(scale) if scale.numel() else (1.0, 1.0)
    if not (lo > 0 and hi < math.inf):  # NaN fails both
        raise ValueError(f"{role}_scale holds values that are not finite and positive")
    if role != "weight" or not spec.symmetric:
        zero_point = _tensor(local, f"{role}_zero_point", shape, torch.int32)
        try:
            check_codes(zero_point, spec)
        except ValueError as error:
            raise ValueError(f"tensor {role}_zero_point: {error}") from None


def _tensor(local: dict[str, Tensor], key: str, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    if key not in local:
        raise KeyError(key)
    t = local[key]
    if t.shape != shape or t.dtype != dtype:
        raise ValueError(
            f"tensor {key} is {t.dtype} of shape {tuple(t.shape)}, "
            f"expected {dtype} of shape {tuple(shape)}"
        )
    return t


def _out_features(module: nn.Module, weight_shape: tuple[int, ...]) -> int:
    """The length of a layer's bias."""
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        return bias.numel()
    out = getattr(module, "out_channels", None) or getattr(module, "out_features", None)
    return int(out) if out is not None else weight_shape[0]


def _state_after(
    model: nn.Module, identity: list[str], built: dict[str, IntModule], ops: list[OpPoints]
) -> dict[str, Tensor]:
    """The state dict `model` will have once the identities, integer modules and functional-op
    quantizers are in."""
    gone = tuple(f"{n}." for n in [*identity, *built])
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(gone)}
    for name, module in built.items():
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    for points in ops:
        prefix = f"{points.caller}.lowbit_ops." if points.caller else "lowbit_ops."
        state.update({prefix + k: v for k, v in points.state_dict().items()})
    return state


def _check_state(expected: dict[str, Tensor], tensors: dict[str, Tensor], path: object) -> None:
    """Same names, shapes, and kinds of dtype (integer or float) as the model will have."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing and not unexpected:
        raise ValueError(
            f"not a lowbit file: {path}: tensors {missing[:5]} are missing (or the "
            "model is not the architecture that was saved)"
        )
    if missing or unexpected:
        raise ValueError(
            f"model does not match the file {path}: missing from the file {missing[:5]}, "
            f"not in the model {unexpected[:5]}; pass a float model of the same architecture"
        )
    for key, want in expected.items():
        got = tensors[key]
        if got.shape != want.shape or got.is_floating_point() != want.is_floating_point():
            raise ValueError(
                f"model does not match the file {path}: tensor {key} is {got.dtype} of shape "
                f"{tuple(got.shape)} in the file, {want.dtype} of shape {tuple(want.shape)} "
                "in the model; pass a float model of the same architecture"
            )


def _read(
    path: str | os.PathLike[str], *, tensors: bool
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            raw = metadata.get(_KEY)
            if raw is None:
                raise ValueError(f"not a lowbit file: {path}: safetensors without lowbit metadata")
            header = json.loads(raw)
            names = list(f.keys()) if tensors else []
            loaded = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"not a lowbit file: {path}: {error}") from error
    except ValueError as error:
        if str(error).startswith("not a lowbit file"):
            raise
        raise ValueError(f"not a lowbit file: {path}: {error}") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"not a lowbit file: {path}: format is not {FORMAT!r}")
    if header.get("version") != VERSION:
        raise ValueError(
            f"not a lowbit file: {path}: version {header.get('version')!r} is not "
            f"supported (this lowbit reads version {VERSION})"
        )
    modules, identity = header.get("modules"), header.get("identity", [])
    extras, ops = header.get("extras", []), header.get("ops", [])
    if (
        not isinstance(modules, list)
        or not isinstance(ops, list)
        or not all(isinstance(r, dict) for r in ops)
        or not all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in modules)
        or not isinstance(identity, list)
        or not isinstance(extras, list)
        or not all(isinstance(n, str) for n in [*identity, *extras])
    ):
        raise ValueError(f"not a lowbit file: {path}: malformed header")
    header["identity"], header["extras"], header["ops"] = identity, extras, ops
    return header, loaded


def _check_layer(model: nn.Module, name: str, path: object) -> None:
    """A layer the file replaces must be a module of `model` (checked before `model` changes)."""
    if not name:
        raise ValueError(f"not a lowbit file: {path}: a layer without a name")
    _get_submodule(model, name, path)


def _get_submodule(model: nn.Module, name: str, path: object) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as error:
        raise ValueError(
            f"model does not match the file {path}: it has no layer {name!r}; "
            "pass a float model of the same architecture"
        ) from error
