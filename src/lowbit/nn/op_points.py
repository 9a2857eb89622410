"""Quantizer points on functional ops: the output of an `x + y`, a `torch.matmul`, a `torch.cat`,
a softmax.

lowbit swaps modules, but a residual `x + inputs` or an attention `q @ k.T` is not a module: it is
a call inside some module's forward. A point is named by that calling module, the op kind and the
occurrence index of the op within that module's own forward (ops of its children belong to the
children): `blocks.3.add_0` is the first add `blocks.3`'s forward calls itself.

At run time `OpPoints`, a child module `lowbit_ops` of the calling module, holds one
`TensorQuantizer` per configured point (so state_dict, calibration, QAT and export see them) and
a forward pre-hook / hook pair on its module. While that module's forward runs, a
`TorchFunctionMode` numbers the ops the forward calls directly (global module hooks count how
deep in child modules a call is) and passes each configured op's result through its quantizer.
Counting ops, not tracing a graph, works with any forward, whatever Python it runs.

`F.scaled_dot_product_attention` is one call that holds attention's two matmuls and its softmax,
so it counts as those three ops (matmul, softmax, matmul), as the same model run with eager
attention calls them; when one of them has a quantizer, the call runs as those ops
(`attention_ops`) with the quantizers between them, and the export writes them so.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lowbit.exceptions import OpPointMismatch
from lowbit.nn.quantizer import TensorQuantizer
from lowbit.nn.records import spec_from_dict, spec_to_dict

ATTRIBUTE = "lowbit_ops"  # the name of the `OpPoints` child on a calling module

# The torch functions of each op kind (`x + y` and `x += y` reach the mode as Tensor.add /
# Tensor.add_, `x @ y` as Tensor.matmul).
OP_KINDS: dict[str, frozenset[Callable[..., Any]]] = {
    "add": frozenset({torch.add, Tensor.add, Tensor.add_}),
    "matmul": frozenset({torch.matmul, Tensor.matmul, torch.bmm, Tensor.bmm}),
    "cat": frozenset({torch.cat, torch.concat, torch.concatenate}),
    "softmax": frozenset({F.softmax, torch.softmax, Tensor.softmax}),
}
_KIND_OF: dict[Any, tuple[str, ...]] = {
    func: (kind,) for kind, funcs in OP_KINDS.items() for func in funcs
}
ATTENTION_KINDS = ("matmul", "softmax", "matmul")  # the ops of one attention call, in order
_KIND_OF[F.scaled_dot_product_attention] = ATTENTION_KINDS


def op_kinds(func: Any, tensor_operands: int) -> tuple[str, ...]:
    """The kinds of the ops a torch call is, in order, if lowbit can quantize them, else ().

    One kind for most calls; `scaled_dot_product_attention` is three (`ATTENTION_KINDS`).
    tensor_operands: how many of its first two arguments are tensors. An add counts only
    between two tensors (`x + 1` is an affine map runtimes fold, not an op)."""
    kinds = _KIND_OF.get(func, ())
    if kinds == ("add",) and tensor_operands < 2:
        return ()
    return kinds


def attention_ops(
    quantize: Callable[[str, Tensor], Tensor],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """`F.scaled_dot_product_attention` as eager attention computes it (scores = q k^T, scaled,
    masked, softmax, times v), with `quantize(kind, result)` applied to each of its three ops'
    results: the function torch documents as sdpa's reference, with the points between."""
    if enable_gqa:  # fewer key / value heads than query heads: repeat them
        repeat = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(repeat, -3)
        value = value.repeat_interleave(repeat, -3)
    factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = quantize("matmul", torch.matmul(query, key.transpose(-2, -1))) * factor
    if is_causal:
        rows, cols = query.size(-2), key.size(-2)
        keep = torch.ones(rows, cols, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, -math.inf)
        else:
            scores = scores + attn_mask
    weights = quantize("softmax", torch.softmax(scores, dim=-1))
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return quantize("matmul", torch.matmul(weights, value))


def point_name(module: str, kind: str, index: int) -> str:
    """`blocks.3.add_0`: the name a point has in configs, the summary and the ONNX export."""
    return f"{module}.{kind}_{index}" if module else f"{kind}_{index}"


class OpPoints(nn.ModuleDict):
    """The output quantizers ("add_0", "matmul_1", ...) of the ops one module's forward calls.

    caller: the calling module's qualified name (for messages); counts: how many ops of each
    kind with a quantizer that forward called when the points were placed. A forward that calls
    another number of them is an `OpPointMismatch`: the points would quantize the wrong ops.
    """

    def __init__(
        self, caller: str, counts: dict[str, int], quantizers: dict[str, TensorQuantizer]
    ) -> None:
        super().__init__(quantizers)
        self.caller = caller
        self.counts = dict(counts)
        self._scopes: list[_Scope] = []

    def attach(self, owner: nn.Module) -> None:
        """Become `owner.lowbit_ops` and quantize the ops of its forward from now on."""
        if hasattr(owner, ATTRIBUTE):
            raise ValueError(f"module {self.caller!r} already has op quantizers")
        owner.add_module(ATTRIBUTE, self)
        owner.register_forward_pre_hook(self._enter)
        owner.register_forward_hook(self._leave, always_call=True)

    def _enter(self, owner: nn.Module, args: Any) -> None:
        scope = _Scope(self, owner)
        self._scopes.append(scope)
        scope.start()

    def _leave(self, owner: nn.Module, args: Any, output: Any) -> None:
        scope = self._scopes.pop()
        scope.stop()
        if output is None:  # the forward raised (or returns nothing): nothing to check
            return
        for kind, expected in self.counts.items():
            if scope.counts[kind] != expected:
                raise OpPointMismatch(
                    f"module {self.caller!r} called {scope.counts[kind]} {kind} op(s) in this "
                    f"forward pass but {expected} when its op quantizers were placed (quantize's "
                    f"first calibration batch): points are numbered by call order, so they no "
                    f"longer match; keep its ops in float (QuantConfig.op_overrides "
                    f"{{{self.caller!r}: None}}) or quantize with inputs that take the same path"
                )

    def quantizers(self) -> dict[str, TensorQuantizer]:
        """Local name ("add_0") -> quantizer (the export swaps them for markers meanwhile)."""
        return {k: q for k, q in self.items() if isinstance(q, TensorQuantizer)}

    def record(self) -> dict[str, Any]:
        """What a lowbit file keeps of these points (their scales are in its tensors)."""
        points = {
            local: {"spec": spec_to_dict(q.spec), "mode": q.mode}
            for local, q in self.quantizers().items()
        }
        return {"caller": self.caller, "counts": self.counts, "points": points}

    @classmethod
    def from_record(cls, record: dict[str, Any], tensors: dict[str, Tensor]) -> OpPoints:
        """The points of `record`, with the scales and zero points in `tensors` (keyed as in
        the model's state dict); ValueError for anything malformed or missing."""
        try:
            caller, counts = (
                str(record["caller"]),
                {str(k): int(v) for k, v in record["counts"].items()},
            )
            quantizers = {}
            for local, point in record["points"].items():
                q = TensorQuantizer(spec_from_dict(point["spec"]))
                prefix = f"{caller}.{ATTRIBUTE}.{local}." if caller else f"{ATTRIBUTE}.{local}."
                if point["mode"] == "quantize" and not q.dynamic:  # binary / ternary: dynamic
                    q.set_qparams(tensors[prefix + "scale"], tensors[prefix + "zero_point"])
                elif point["mode"] == "off":
                    q.set_mode("off")
                quantizers[str(local)] = q
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed op point record: missing or wrong {error}") from None
        return cls(caller, counts, quantizers)

    def point(self, local: str) -> str:
        """The point name of one of its quantizers: "add_0" -> "blocks.3.add_0"."""
        return f"{self.caller}.{local}" if self.caller else local

    def quantize(self, kind: str, index: int, result: Any) -> Any:
        name = f"{kind}_{index}"
        if name not in self or not isinstance(result, Tensor):
            return result
        return self[name](result)

    def configured(self, kind: str, index: int) -> bool:
        """Whether the `index`-th op of `kind` has a quantizer."""
        return f"{kind}_{index}" in self


class _Scope(TorchFunctionMode):
    """One forward pass of a calling module: numbers its own ops, quantizes the configured ones."""

    def __init__(self, points: OpPoints, owner: nn.Module) -> None:
        super().__init__()
        self.points = points
        self.owner = owner
        self.counts: Counter[str] = Counter()
        self.depth = 0  # > 0 while a child module runs: its ops are not the owner's
        self._handles: list[RemovableHandle] = []

    def start(self) -> None:
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._child_enters),
            nn.modules.module.register_module_forward_hook(self._child_leaves, always_call=True),
        ]
        self.__enter__()

    def stop(self) -> None:
        self.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()

    def _child_enters(self, module: nn.Module, args: Any) -> None:
        self.depth += 1

    def _child_leaves(self, module: nn.Module, args: Any, output: Any) -> None:
        if module is self.owner and self.depth == 0:
            return  # the owner's own end: its hooks were added after its entry was counted
        self.depth -= 1

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        # Every torch call of the forward passes here: most are no op kind, so look that up first.
        if self.depth or func not in _KIND_OF:
            return func(*args, **(kwargs or {}))
        kinds = op_kinds(func, sum(isinstance(a, Tensor) for a in args[:2]))
        if len(kinds) > 1:
            return self._attention(func, args, kwargs or {})
        result = func(*args, **(kwargs or {}))
        if not kinds:
            return result
        return self.points.quantize(kinds[0], self._next(kinds[0]), result)

    def _next(self, kind: str) -> int:
        index = self.counts[kind]
        self.counts[kind] += 1
        return index

    def _attention(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """An sdpa call: its three ops are numbered; it runs as them if one is configured."""
        points = [(kind, self._next(kind)) for kind in ATTENTION_KINDS]
        if not any(self.points.configured(kind, index) for kind, index in points):
            return func(*args, **kwargs)
        order = iter(points)

        def quantize(kind: str, result: Tensor) -> Tensor:
            expected, index = next(order)
            assert kind == expected, "attention_ops calls its ops in ATTENTION_KINDS order"
            return self.points.quantize(kind, index, result)

        return attention_ops(quantize, *args, **kwargs)


def op_points(model: nn.Module) -> dict[str, OpPoints]:
    """The `OpPoints` of a model by the qualified name of their calling module."""
    return {m.caller: m for m in model.modules() if isinstance(m, OpPoints)}
