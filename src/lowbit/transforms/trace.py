"""Watch one forward pass: every module call and every torch function call, in order.

Real models wire their layers in their own `forward` (EfficientNet pads and then calls
`F.conv2d`, a ResNet block adds its skip with `+`), so which tensor goes where is only known by
running the model. BatchNorm folding, the pairs of cross-layer equalization and the outputs that
need a quantizer all ask that question; `trace` answers it once. Module hooks see module calls, a
`TorchFunctionMode` sees every torch function (`F.relu`, `torch.add`, `x + y`, `x.view`), and
each call is recorded with the module that made it, so a later consumer can key a functional op
by "the second `add` of `layer1.0`".

Tensors are recorded as `Value`s: a number that names one tensor object for the whole pass (the
same object always gets the same number, and a number is never given to another tensor even
after the first one is freed), so the trace does not keep the pass's activations alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lowbit.batches import tensors_of

__all__ = ["Call", "Trace", "Value", "is_metadata", "trace"]

# Tensor properties that read metadata only; touching them does not consume the values.
_METADATA_ATTRS = frozenset(
    {
        "shape",
        "dtype",
        "device",
        "ndim",
        "layout",
        "is_cuda",
        "is_sparse",
        "is_quantized",
        "is_meta",
        "requires_grad",
        "grad_fn",
        "names",
    }
)
_METADATA_FUNCS = frozenset({"size", "dim", "numel", "__len__", "is_floating_point", "stride"})


def is_metadata(func: Callable[..., Any]) -> bool:
    """Whether a torch function seen by a TorchFunctionMode only reads a tensor's metadata
    (x.shape, x.size(), ...): such a call does not consume the tensor's values."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return getattr(owner, "__name__", "") in _METADATA_ATTRS
    return name in _METADATA_FUNCS


@dataclass(frozen=True)
class Value:
    """A tensor of the traced pass: `id` names the tensor object, `shape` is its shape."""

    id: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Call:
    """One module call or torch function call of the traced pass.

    op: the function's name ("conv2d", "add", "relu"; a property by its own name, "T"), or the
    module's class name. caller: the innermost module running around the call (its qualified
    name; None outside the model). scope: every module running around it, outermost first.
    module: the module called (None for a function). index: how many calls of `op` the caller
    made before this one, so (caller, op, index) names a call across passes. args, kwargs and
    result are the call's own, with every tensor replaced by its `Value`; inputs and outputs
    are the Values of all tensors in them (args before kwargs).
    """

    op: str
    caller: str | None
    scope: tuple[str, ...]
    module: str | None
    func: Callable[..., Any] | None
    index: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: tuple[Value, ...]
    result: Any = None
    outputs: tuple[Value, ...] = ()

    @property
    def first(self) -> Value | None:
        """The first positional argument, when it is a tensor."""
        return self.args[0] if self.args and isinstance(self.args[0], Value) else None

    @property
    def output(self) -> Value | None:
        """The result, when it is one tensor."""
        return self.result if isinstance(self.result, Value) else None


@dataclass
class Trace:
    """The calls of one pass in the order they started, and what the pass returned.

    tensors maps Value ids to the tensors themselves, only when `trace(keep_tensors=True)`.
    """

    calls: list[Call]
    output: object
    tensors: dict[int, Tensor] = field(default_factory=dict)

    def module_calls(self) -> dict[str, int]:
        """How many times each module ran, by qualified name."""
        counts: dict[str, int] = {}
        for call in self.calls:
            if call.module is not None:
                counts[call.module] = counts.get(call.module, 0) + 1
        return counts


class _Values:
    """Numbers tensor objects while they live; a weak reference forgets a freed one, so its
    id() can be reused without being confused with it."""

    def __init__(self, keep: bool) -> None:
        self.numbers: dict[int, int] = {}
        self.refs: dict[int, weakref.ref[Tensor]] = {}
        self.kept: dict[int, Tensor] | None = {} if keep else None
        self.count = 0

    def of(self, tensor: Tensor) -> Value:
        key = id(tensor)
        number = self.numbers.get(key)
        if number is None:
            number = self.numbers[key] = self.count
            self.count += 1
            self.refs[key] = weakref.ref(tensor, partial(self._forget, key))
            if self.kept is not None:
                self.kept[number] = tensor
        return Value(number, tuple(tensor.shape))

    def _forget(self, key: int, _ref: object) -> None:
        self.numbers.pop(key, None)
        self.refs.pop(key, None)

    def replace(self, obj: Any) -> Any:
        """`obj` with every tensor inside tuples, lists and mappings replaced by its Value."""
        if isinstance(obj, Tensor):
            return self.of(obj)
        if isinstance(obj, tuple):
            return tuple(self.replace(o) for o in obj)
        if isinstance(obj, list):
            return [self.replace(o) for o in obj]
        if isinstance(obj, Mapping):
            return {k: self.replace(v) for k, v in obj.items()}
        return obj

    def all_of(self, obj: Any) -> tuple[Value, ...]:
        return tuple(self.of(t) for t in tensors_of(obj))


class _Recorder(TorchFunctionMode):
    """Records torch function calls; the module hooks keep `scope` (the modules running)."""

    def __init__(self, names: dict[int, str], keep_tensors: bool) -> None:
        super().__init__()
        self.names = names
        self.values = _Values(keep_tensors)
        self.calls: list[Call] = []
        self.scope: list[str] = []
        self.counts: dict[tuple[str | None, str], int] = {}
        self.open: list[int] = []  # positions in `calls` of the module calls still running

    def _call(
        self, op: str, module: str | None, func: Callable[..., Any] | None, args: Any, kwargs: Any
    ) -> Call:
        caller = self.scope[-1] if self.scope else None
        index = self.counts.get((caller, op), 0)
        self.counts[(caller, op)] = index + 1
        return Call(
            op=op,
            caller=caller,
            scope=tuple(self.scope),
            module=module,
            func=func,
            index=index,
            args=self.values.replace(tuple(args)),
            kwargs=self.values.replace(dict(kwargs)),
            inputs=self.values.all_of((args, kwargs)),
        )

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if is_metadata(func):
            return result
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property: name it by its owner (x.T -> "T")
            name = getattr(getattr(func, "__self__", None), "__name__", "")
        call = self._call(name, None, func, args, kwargs)
        self.calls.append(self._finished(call, result))
        return result

    def _finished(self, call: Call, result: Any) -> Call:
        values = self.values
        return replace(call, result=values.replace(result), outputs=values.all_of(result))

    def enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = self.names[id(module)]
        self.open.append(len(self.calls))
        self.calls.append(self._call(type(module).__name__, name, None, args, kwargs))
        self.scope.append(name)

    def leave(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        self.scope.pop()
        position = self.open.pop()
        self.calls[position] = self._finished(self.calls[position], result)


def trace(
    model: nn.Module, run: Callable[[nn.Module], object], *, keep_tensors: bool = False
) -> Trace:
    """Run `run(model)` once without gradients and record every call it makes.

    keep_tensors: also keep every tensor the pass touched, by Value id (`Trace.tensors`), for a
    caller that needs the values themselves (costs the pass's activations in memory).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not callable(run):
        raise TypeError(f"run: expected a callable taking the model, got {type(run).__name__}")
    recorder = _Recorder({id(m): n for n, m in model.named_modules()}, keep_tensors)
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(recorder.enter, with_kwargs=True))
        handles.append(
            module.register_forward_hook(recorder.leave, with_kwargs=True, always_call=True)
        )
    try:
        with torch.no_grad(), recorder:
            output = run(model)
    finally:
        for handle in handles:
            handle.remove()
        recorder.values.refs.clear()
    return Trace(recorder.calls, output, recorder.values.kept or {})
