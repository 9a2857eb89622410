"""How `export_onnx` feeds the model to the TorchScript exporter.

Example inputs may be a tensor, a tuple of tensors, a dict of keyword inputs (Hugging Face's
`input_ids`, `attention_mask`, ...) or positional tensors followed by such a dict. The exporter
itself fills every parameter of `forward` it was not given with its default, positionally, which
breaks forwards with keyword-only machinery ("got multiple values for argument 'use_cache'"):
so the model is traced behind `KeywordCall`, whose forward takes positional tensors only.
Also here: input / output names, dynamic axes, eval mode for the length of the export, and the
opset that the operators the forward calls need.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lowbit.batches import tensors_of

# What `dynamic_axes` accepts: torch.onnx.export's form, {name: {dim: label}} or {name: [dims]}.
DynamicAxes = Mapping[str, Mapping[int, str] | Sequence[int]]
_TOKEN_DTYPES = (torch.int64, torch.int32)
_EXPECTED = (
    "example_inputs must be a tensor, a tuple of tensors, a dict of keyword tensors "
    "(input_ids=..., attention_mask=...), or positional tensors followed by such a dict"
)


@dataclass(frozen=True)
class Inputs:
    """Example inputs split into positional tensors and keyword tensors."""

    args: tuple[Tensor, ...]
    kwargs: dict[str, Tensor]

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        """In the order the ONNX graph takes them: positional first, then keywords."""
        return self.args + tuple(self.kwargs.values())

    def names(self, given: Sequence[str] | None) -> list[str]:
        """`given`, or "input" / "input_0", ... for positional tensors and the keys for keywords."""
        if given is not None:
            names = list(given)
            if len(names) != len(self.tensors) or not all(isinstance(n, str) for n in names):
                raise ValueError(
                    f"input_names must be {len(self.tensors)} strings (one per example input "
                    f"tensor), got {given!r}"
                )
            return names
        return _numbered("input", len(self.args)) + list(self.kwargs)


def as_inputs(example_inputs: Any) -> Inputs:
    """Split `example_inputs` (a tensor, a sequence of tensors, a dict of keyword tensors, or
    positional tensors / an args tuple followed by such a dict) into args and kwargs."""
    if isinstance(example_inputs, Tensor):
        return Inputs((example_inputs,), {})
    if isinstance(example_inputs, Mapping):
        return Inputs((), _keyword_tensors(example_inputs))
    if not isinstance(example_inputs, tuple | list) or not example_inputs:
        raise TypeError(_EXPECTED + f", got {type(example_inputs).__name__}")
    args: Sequence[Any] = example_inputs
    kwargs: dict[str, Tensor] = {}
    if isinstance(args[-1], Mapping):
        kwargs = _keyword_tensors(args[-1])
        args = args[:-1]
        if len(args) == 1 and isinstance(args[0], tuple | list):  # (args, kwargs)
            args = args[0]
    if not all(isinstance(t, Tensor) for t in args) or not (args or kwargs):
        raise TypeError(_EXPECTED + f", got {_describe(example_inputs)}")
    return Inputs(tuple(args), kwargs)


def _keyword_tensors(kwargs: Mapping[Any, Any]) -> dict[str, Tensor]:
    for key, value in kwargs.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise TypeError(
                f"example_inputs[{key!r}] must be a tensor keyed by a string (a keyword input "
                f"of the model's forward), got {type(value).__name__}"
            )
    if not kwargs:
        raise TypeError(_EXPECTED + ", got an empty dict")
    return dict(kwargs)


def _describe(obj: Sequence[Any]) -> str:
    return f"a {type(obj).__name__} of " + ", ".join(type(x).__name__ for x in obj)


def _numbered(stem: str, n: int) -> list[str]:
    return [stem] if n == 1 else [f"{stem}_{i}" for i in range(n)]


class KeywordCall(nn.Module):
    """`model(*args, **kwargs)` behind a forward that takes positional tensors only, so the
    exporter passes exactly the example inputs, and nothing else, to the model."""

    def __init__(self, model: nn.Module, n_args: int, keywords: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.n_args = n_args
        self.keywords = list(keywords)

    def forward(self, *tensors: Tensor) -> Any:
        keyword = dict(zip(self.keywords, tensors[self.n_args :], strict=True))
        return self.model(*tensors[: self.n_args], **keyword)


def _output_names(outputs: Any, given: Sequence[str] | None) -> list[str]:
    """`given`, the keys of a dict of tensors (Hugging Face outputs), or "output" / "output_i"."""
    if given is not None:
        return list(given)
    if isinstance(outputs, Mapping) and all(isinstance(v, Tensor) for v in outputs.values()):
        return [str(k) for k in outputs]
    return _numbered("output", len(list(tensors_of(outputs))))


def _default_axes(
    tensors: Mapping[str, Tensor], outputs: Mapping[str, Tensor]
) -> dict[str, dict[int, str]]:
    """Batch (dim 0) of every input and output; sequence (dim 1) of token inputs, the 2-D
    integer tensors of language models (ids, masks, token types)."""
    axes: dict[str, dict[int, str]] = {}
    for name, t in tensors.items():
        token = t.dim() == 2 and t.dtype in _TOKEN_DTYPES
        axes[name] = {0: "batch", 1: "sequence"} if token else {0: "batch"}
    axes.update({name: {0: "batch"} for name in outputs})
    return {name: dims for name, dims in axes.items() if _ndim(tensors, outputs, name) > 0}


def _check_axes(
    spec: Any, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]
) -> dict[str, dict[int, str]]:
    """`dynamic_axes` in torch.onnx.export's dict form, every name and dim checked; lists of
    dims get labels "<name>_dim_<d>"."""
    if not isinstance(spec, Mapping):
        raise TypeError(
            "dynamic_axes must be a dict {input or output name: {dim: label} or [dims]}, "
            f"got {type(spec).__name__}"
        )
    axes: dict[str, dict[int, str]] = {}
    for name, dims in spec.items():
        if name not in inputs and name not in outputs:
            raise ValueError(
                f"dynamic_axes names {name!r}, which is neither an input ({', '.join(inputs)}) "
                f"nor an output ({', '.join(outputs)})"
            )
        ndim = _ndim(inputs, outputs, name)
        labelled = dims if isinstance(dims, Mapping) else {d: f"{name}_dim_{d}" for d in dims}
        axes[name] = {}
        for dim, label in labelled.items():
            if isinstance(dim, bool) or not isinstance(dim, int) or not -ndim <= dim < ndim:
                raise ValueError(
                    f"dynamic_axes[{name!r}]: dim {dim!r} is not a dimension of a {ndim}-D tensor"
                )
            if not isinstance(label, str) or not label:
                raise ValueError(f"dynamic_axes[{name!r}][{dim}]: the label must be a string")
            axes[name][dim % ndim] = label
    return axes


def _ndim(inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor], name: str) -> int:
    return (inputs[name] if name in inputs else outputs[name]).dim()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (dropout off) meanwhile; every submodule's own mode afterwards,
    also on error (`model.train(flag)` would give them all the top module's)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class _Calls(TorchFunctionMode):
    """Records the name of every torch function a forward pass calls."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        self.names.add(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


def needed_opset(functions: Iterable[str], opset: int) -> tuple[str, int] | None:
    """The operator among `functions` that the TorchScript exporter writes only from the newest
    opset above `opset` (`scaled_dot_product_attention`: 14), and that opset; None if none.

    Asked of the exporter's own table of ONNX forms, so nothing is traced at an opset that
    fails (a failed export prints the whole graph to stderr).
    """
    try:
        from torch.onnx._internal.torchscript_exporter import registration, utils
    except ImportError:  # older torch keeps the table elsewhere; its own error names the opset
        return None
    utils._trigger_symbolic_function_registration()
    needs = []
    for name in functions:
        op = f"aten::{name}"
        group = registration.registry.get_function_group(op)
        if group is not None and not registration.registry.is_registered_op(op, opset):
            needs.append((group.get_min_supported(), op))
    if not needs:
        return None
    version, op = max(needs)
    return op, version


def strip_prefix(graph: Any, prefix: str) -> None:
    """Rename the initializers `KeywordCall` prefixed back to the model's own parameter names."""
    renamed = {t.name: t.name.removeprefix(prefix) for t in graph.initializer}
    renamed = {old: new for old, new in renamed.items() if old != new}
    for t in graph.initializer:
        t.name = renamed.get(t.name, t.name)
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]


@dataclass(frozen=True)
class Signature:
    """The graph's input and output names and its dynamic axes."""

    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    functions: frozenset[str]  # the torch functions the forward pass calls


def signature(
    call: KeywordCall,
    inputs: Inputs,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    dynamic_axes: Any,
) -> Signature:
    """Names, dynamic axes and the functions called, from one forward pass of the inputs."""
    with torch.no_grad(), _Calls() as calls:
        outputs = call(*inputs.tensors)
    found = list(tensors_of(outputs))
    in_names, out_names = inputs.names(input_names), _output_names(outputs, output_names)
    if len(out_names) != len(found) or len(set(in_names + out_names)) < len(in_names + out_names):
        raise ValueError(
            f"input and output names must be distinct strings, one per tensor: the model takes "
            f"{len(inputs.tensors)} and returns {len(found)}, named {in_names} and {out_names}"
        )
    ins = dict(zip(in_names, inputs.tensors, strict=True))
    outs = dict(zip(out_names, found, strict=True))
    if dynamic_axes is None:
        axes = _default_axes(ins, outs)
    else:
        axes = _check_axes(dynamic_axes, ins, outs)
    return Signature(in_names, out_names, axes, frozenset(calls.names))
