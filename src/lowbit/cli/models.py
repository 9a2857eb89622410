"""Models for the command line: load from ONNX, a factory, or a saved .lowbit; save with a recipe.

A .lowbit file (`lowbit.io`) needs a float skeleton to load into. The command line therefore
stores, as extras of the file (`lowbit.io.save(..., extras=)`), how to build that skeleton again:
`cli.recipe`, `{"model": "pkg.module:factory"}` or `{"model": "/abs/model.onnx"}`, and for an
ONNX model the float ONNX graph itself (`cli.float_onnx`), so the file still loads once the ONNX
file has moved. The graph goes without its weights (the .lowbit holds them all) when the model
rebuilt from it with zero weights, given the float model's state dict, was checked to compute
exactly as the float model; otherwise it goes whole. `lowbit eval model.lowbit` reads them;
`--model-factory` overrides them.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lowbit.io.onnx_import import fold_zero_pads, padded_convolutions

__all__ = [
    "LoadedModel",
    "OnnxRunner",
    "load_model",
    "save_lowbit",
]

RECIPE = "cli.recipe"  # names of the extras the command line stores in a .lowbit file
FLOAT_ONNX = "cli.float_onnx"
_LEFT_OUT = "lowbit: zeros here; the .lowbit file holds the values"  # doc_string of such weights
_LEAVE_OUT_FROM = 64  # elements: smaller initializers (shapes, pads) stay


@dataclass
class LoadedModel:
    """A float (or loaded quantized) model and how to rebuild it."""

    model: nn.Module
    recipe: str  # "pkg.module:factory" or an absolute ONNX path
    kind: str  # "onnx", "factory" or "lowbit"
    input_shape: tuple[int, ...] | None = None  # one sample's shape, where the file says it


def load_model(
    spec: str, *, weights: str | None = None, model_factory: str | None = None
) -> LoadedModel:
    """Load MODEL as the command line accepts it: .onnx, .lowbit, or `package.module:factory`."""
    path = Path(spec)
    if spec.endswith(".lowbit"):
        if weights is not None:
            raise ValueError("--weights applies to a factory model, not to a .lowbit file")
        return _load_lowbit(path, model_factory)
    if spec.endswith(".onnx"):
        if weights is not None:
            raise ValueError("--weights applies to a factory model; an ONNX file holds its own")
        model, shape = onnx_to_torch(path)
        return LoadedModel(model, str(path.resolve()), "onnx", shape)
    if ":" in spec and not path.exists():
        model = build_from_factory(spec)
        if weights is not None:
            load_weights(model, Path(weights))
        return LoadedModel(model.eval(), spec, "factory")
    raise ValueError(
        f"MODEL must be an .onnx file, a .lowbit file or a package.module:factory callable, "
        f"got {spec!r}"
    )


def build_from_factory(spec: str) -> nn.Module:
    """Call `package.module:factory` (the current folder is importable, as with `python -m`)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"a factory is written package.module:callable, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r} for {spec!r}: {error}") from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"{module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ValueError(f"{spec!r} is not callable")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec}() must return an nn.Module, got {type(model).__name__}")
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict from safetensors or a torch file (weights_only: no code runs)."""
    if not path.is_file():
        raise FileNotFoundError(f"no such weights file: {path}")
    state: Any
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {path} as safetensors: {error}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a foreign or pickled file
            raise ValueError(
                f"cannot read {path} as a state dict (loaded with weights_only=True): "
                f"{str(error).splitlines()[0]}"
            ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()
        raise ValueError(
            f"--weights {path} do not fit the model: {' '.join(first[:2])[:300]}"
        ) from None


def onnx_to_torch(path: Path) -> tuple[nn.Module, tuple[int, ...] | None]:
    """An ONNX file as a torch module (onnx2torch), and its input's per-sample shape if fixed."""
    return proto_to_torch(read_onnx(path), path.name)


def read_onnx(path: Path) -> Any:
    """The ONNX model in `path` (external data included)."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as error:  # onnx raises DecodeError and others for a foreign file
        raise ValueError(f"cannot read {path} as ONNX: {error}") from None


def proto_to_torch(proto: Any, name: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """An ONNX model as a torch module (onnx2torch), and its input's per-sample shape if fixed;
    `name` names the model in errors."""
    shape = onnx_input_shape(proto)
    _inline_constant_identities(proto)
    fold_zero_pads(proto)
    convert = _onnx2torch()
    try:
        model = convert(proto)
    except Exception as error:  # an op onnx2torch lacks raises NotImplementedError, and more
        hint = ""
        if "QuantizeLinear" in str(error) or "DequantizeLinear" in str(error):
            hint = " (the file is already quantized: quantize the float ONNX model)"
        raise ValueError(
            f"cannot bring {name} into PyTorch with onnx2torch: {error}{hint}"
        ) from None
    padded_convolutions(model)
    return model.eval(), shape


def _inline_constant_identities(proto: Any) -> None:
    """Replace `Identity(initializer)` nodes by a copy of the initializer, in place.

    PyTorch's exporter shares equal constants (two zero biases) through Identity nodes, which
    onnx2torch cannot read as a layer's weight.
    """
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    for node in list(graph.node):
        if node.op_type == "Identity" and node.input[0] in initializers:
            array = numpy_helper.to_array(initializers[node.input[0]])
            graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
            graph.node.remove(node)


def onnx_input_shape(proto: Any) -> tuple[int, ...] | None:
    """The first graph input's shape without the batch dimension, if every dimension is fixed."""
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if not inputs:
        return None
    dims = inputs[0].type.tensor_type.shape.dim[1:]
    if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
        return None
    return tuple(int(d.dim_value) for d in dims)


def _onnx2torch() -> Callable[[Any], nn.Module]:
    """onnx2torch's `convert`. torchvision serves only its NMS / RoIAlign converters; where
    torchvision is missing or its compiled ops do not match torch, a stand-in lets the rest load.
    The stand-in lives in `sys.modules` only while onnx2torch imports, so that other libraries
    (transformers probes for torchvision) still see it missing.
    """
    stubbed = False
    try:
        import torchvision  # noqa: F401
    except Exception:  # a torchvision built for another torch fails in many ways
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        stubbed = True
        stub = types.ModuleType("torchvision")
        ops = types.ModuleType("torchvision.ops")

        def unavailable(*_args: Any, **_kwargs: Any) -> Any:
            raise ValueError("this ONNX op needs a working torchvision")

        ops.nms = unavailable  # type: ignore[attr-defined]
        ops.roi_align = unavailable  # type: ignore[attr-defined]
        stub.ops = ops  # type: ignore[attr-defined]
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, ops
    try:
        from onnx2torch import convert
    except ImportError:
        raise ValueError(
            "reading ONNX models needs onnx2torch: pip install --no-deps onnx2torch"
        ) from None
    finally:
        if stubbed:
            del sys.modules["torchvision"], sys.modules["torchvision.ops"]
    return convert


def _load_lowbit(path: Path, model_factory: str | None) -> LoadedModel:
    from lowbit.io.lowbit_format import load, read_extras

    # one header read; a missing or foreign file is reported first
    extras = read_extras(path, [] if model_factory else [RECIPE, FLOAT_ONNX])
    recipe = model_factory or _parse_recipe(extras.get(RECIPE))
    if recipe is None:
        raise ValueError(
            f"{path} does not say how to build its float skeleton (it was not written by "
            "`lowbit quantize`): pass --model-factory package.module:factory"
        )
    float_onnx = extras.get(FLOAT_ONNX)
    if float_onnx is not None:
        skeleton, shape = proto_to_torch(_with_zero_weights(float_onnx), path.name)
    else:
        loaded = load_model(recipe)
        skeleton, shape = loaded.model, loaded.input_shape
    return LoadedModel(load(path, skeleton).eval(), recipe, "lowbit", shape)


def _parse_recipe(raw: bytes | None) -> str | None:
    """The skeleton recipe the command line stored in a .lowbit file (its RECIPE extra), if any."""
    if raw is None:
        return None
    try:
        recipe = json.loads(raw).get("model")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return recipe if isinstance(recipe, str) else None


def save_lowbit(model: nn.Module, path: Path, recipe: str) -> None:
    """`lowbit.save` with how to build the float skeleton again: the recipe, and for an ONNX
    model the float ONNX model itself, so that the file needs nothing else to load."""
    from lowbit.io.lowbit_format import save

    extras = {RECIPE: json.dumps({"model": recipe}).encode()}
    if recipe.endswith(".onnx"):
        extras[FLOAT_ONNX] = float_onnx_to_store(Path(recipe))
    save(model, path, extras=extras)


def float_onnx_to_store(path: Path) -> bytes:
    """The float ONNX model at `path` as a .lowbit file stores it: without its weights where
    the model rebuilt that way was checked to compute as the original, else whole."""
    proto = read_onnx(path)
    whole = proto.SerializeToString()  # before proto_to_torch, which edits the graph
    light = _without_weights(whole)
    original, shape = proto_to_torch(proto, path.name)
    rebuilt, _ = proto_to_torch(_with_zero_weights(light), path.name)
    return light if shape is not None and _same_function(original, rebuilt, shape) else whole


def _without_weights(data: bytes) -> bytes:
    """The serialized ONNX model with the data of its large initializers left out."""
    import onnx

    proto = onnx.load_from_string(data)
    for init in proto.graph.initializer:
        if math.prod(init.dims) >= _LEAVE_OUT_FROM:
            shell = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
            init.CopyFrom(shell)
            init.doc_string = _LEFT_OUT
    return proto.SerializeToString()


def _with_zero_weights(data: bytes) -> Any:
    """The ONNX model, with zeros where `_without_weights` left data out."""
    import onnx

    proto = onnx.load_from_string(data)
    for init in proto.graph.initializer:
        if init.doc_string == _LEFT_OUT:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            init.raw_data = np.zeros(tuple(init.dims), dtype).tobytes()
    return proto


def _same_function(original: nn.Module, rebuilt: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether `rebuilt`, given the state dict of `original`, computes exactly what it does."""
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    try:
        rebuilt.load_state_dict(original.state_dict(), strict=True)
        with torch.no_grad():
            a, b = original(x), rebuilt(x)
    except Exception:  # a model that does not take one float tensor: store it whole
        return False
    return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)


class OnnxRunner:
    """An ONNX file run by ONNX Runtime on the CPU, called like a model: tensor in, tensor out."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # ORT raises its own exception types
            raise ValueError(f"ONNX Runtime cannot load {path}: {error}") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        try:
            outputs = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})
        except Exception as error:  # ORT's own types (InvalidArgument, Fail), not RuntimeError
            raise RuntimeError(f"ONNX Runtime: {' '.join(str(error).split())}") from error
        return torch.from_numpy(outputs[0])
