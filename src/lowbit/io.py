"""Save and load converted (integer) models: one safetensors file, never pickle.

The file holds every tensor of the converted model's state dict (integer weights as int8 / int16,
or packed into uint8 for 4 bits and fewer; float32 scales; int32 zero points; the float layers'
parameters) and, in the safetensors metadata, a JSON header:

    {"format": "lowbit", "version": 1, "torch": "...",
     "modules": [{"name": "fc1", "kind": "IntLinear", "weight": {"spec": {...}, "shape": [...]},
                  "input": {"spec": {...}, "mode": "static"} | null, "output": ... }, ...],
     "identity": ["features.1", ...]}          # layers the saved model replaced by nn.Identity
                                               # (BatchNorms folded into their convolution)

Loading needs the float model's architecture, as `load_state_dict` does: pass a freshly built
float model and `load` rebuilds the integer modules inside it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lowbit.nn.int_modules import IntModule, int_module_from_record
from lowbit.nn.modules import QuantModule

__all__ = ["FORMAT", "VERSION", "load", "save"]

FORMAT = "lowbit"
VERSION = 1
_KEY = "lowbit"


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write a converted model to `path` (a safetensors file), atomically.

    The file is written under a temporary name in the same folder and renamed into place, so on
    any error no half-written file remains and an existing file at `path` is left untouched.
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
    header = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "modules": records,
        "identity": [n for n, m in model.named_modules() if n and isinstance(m, nn.Identity)],
    }
    # Clones: safetensors refuses tensors that share memory (tied weights).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata={_KEY: json.dumps(header)})
        with open(tmp_name, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a lowbit file; ValueError if `path` is not one."""
    header, _ = _read(path, tensors=False)
    return header


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Load a saved converted model into `model`, a freshly built float model of the same
    architecture (modified in place and returned), as `load_state_dict` does.
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
    for name in header["identity"]:
        _set_submodule(model, name, nn.Identity(), path)
    for record in header["modules"]:
        name = record["name"]
        float_module = _get_submodule(model, name, path)
        prefix = f"{name}."
        local = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            int_module = int_module_from_record(float_module, record, local)
        except KeyError as error:
            raise ValueError(
                f"not a lowbit file: {path}: tensor {prefix}{error.args[0]} is missing"
            ) from error
        _set_submodule(model, name, int_module, path)
    missing, unexpected = _compare_keys(model, tensors)
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
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"model does not match the file {path}: {error}") from error
    return model


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
            loaded = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict if tensors else {}
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
    if (
        not isinstance(modules, list)
        or not all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in modules)
        or not isinstance(identity, list)
    ):
        raise ValueError(f"not a lowbit file: {path}: malformed header")
    header["identity"] = identity
    return header, loaded


def _get_submodule(model: nn.Module, name: str, path: object) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as error:
        raise ValueError(
            f"model does not match the file {path}: it has no layer {name!r}; "
            "pass a float model of the same architecture"
        ) from error


def _set_submodule(model: nn.Module, name: str, new: nn.Module, path: object) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = _get_submodule(model, parent_name, path) if parent_name else model
    if not hasattr(parent, child):
        raise ValueError(f"model does not match the file {path}: it has no layer {name!r}")
    setattr(parent, child, new)


def _compare_keys(model: nn.Module, tensors: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(tensors)), sorted(set(tensors) - expected)
