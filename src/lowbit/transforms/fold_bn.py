"""Fold eval-mode BatchNorm into the convolution or linear layer that feeds it.

Quantizing a conv and then its BN separately quantizes weights that the BN later rescales, so the
rounding error is rescaled too; folding first gives the quantizer the weights actually used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lowbit.batches import outputs_match, tensors_of
from lowbit.transforms.trace import Trace, Value, trace

__all__ = ["BN_TYPES", "PRODUCER_TYPES", "flatten_outputs", "fold_batchnorm", "fold_bn_into"]

# Every BatchNorm (1d / 2d / 3d, SyncBatchNorm, materialised lazy ones) folds by one formula.
BN_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_TYPES: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
PRODUCER_TYPES: tuple[type[nn.Module], ...] = (*_CONV_TYPES, *_CONVT_TYPES, nn.Linear)
"""Module types a BatchNorm can be folded into."""


def _output_channel_count(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, _CONV_TYPES + _CONVT_TYPES):
        return int(module.out_channels)  # type: ignore[arg-type]
    raise TypeError(
        f"module: expected one of {[t.__name__ for t in PRODUCER_TYPES]}, "
        f"got {type(module).__name__}"
    )


def fold_bn_into(module: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn``'s eval-mode affine transform into ``module``'s weight and bias, in place.

    Computed in float64 so the fold adds no rounding beyond the final cast. The weight Parameter
    keeps its identity (optimizers holding it stay valid); a bias is created if there was none.
    ``bn`` itself is left untouched: the caller removes it from the graph.
    """
    if not isinstance(bn, BN_TYPES):
        raise TypeError(f"bn: expected a BatchNorm module, got {type(bn).__name__}")
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    out_channels = _output_channel_count(module)
    if bn.num_features != out_channels:
        raise ValueError(
            f"bn: has {bn.num_features} features but {type(module).__name__} produces "
            f"{out_channels} channels"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn: has no running statistics (track_running_stats=False); cannot fold")
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"module: expected a weight tensor, got {type(weight).__name__}")

    f64 = torch.float64
    with torch.no_grad():
        mean = bn.running_mean.to(f64)
        var = bn.running_var.to(f64)
        gamma = bn.weight.to(f64) if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.to(f64) if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)

        w = weight.to(f64)
        if isinstance(module, _CONVT_TYPES):
            # ConvTranspose weight is (in, out/groups, *k): output channel g*(out/groups)+j lives
            # at weight[g*(in/groups) + i, j] for every i, so scale per group along dim 1.
            groups = cast(int, module.groups)
            per_group_in = w.shape[0] // groups
            per_group_out = w.shape[1]
            kernel = w.shape[2:]
            w = w.reshape(groups, per_group_in, per_group_out, *kernel)
            s = scale.reshape(groups, 1, per_group_out, *([1] * len(kernel)))
            w = (w * s).reshape(weight.shape)
        else:
            # Conv and Linear weights are (out, ...): one scale per leading row, groups or not.
            w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))

        old_bias = module.bias
        b = old_bias.to(f64) if isinstance(old_bias, Tensor) else torch.zeros_like(mean)
        new_bias = beta + (b - mean) * scale

        weight.copy_(w.to(weight.dtype))
        if isinstance(old_bias, Tensor):
            old_bias.copy_(new_bias.to(old_bias.dtype))
        else:
            module.bias = nn.Parameter(
                new_bias.to(device=weight.device, dtype=weight.dtype),
                requires_grad=weight.requires_grad,
            )


def flatten_outputs(output: object) -> list[Tensor]:
    """The tensors of a model output, for the equivalence guard that compares whatever `run`
    returns."""
    return list(tensors_of(output))


@dataclass
class _Uses:
    """What BN folding needs from one traced pass: producer outputs, who reads them, BN
    inputs, and how often each module ran."""

    outputs: dict[int, tuple[str, Value]] = field(default_factory=dict)
    module_users: dict[int, set[str]] = field(default_factory=dict)
    function_users: dict[int, int] = field(default_factory=dict)
    bn_inputs: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)


def _uses(model: nn.Module, seen: Trace) -> _Uses:
    """Read the trace: torch functions inside a BatchNorm's own forward are not uses."""
    modules = dict(model.named_modules())
    uses = _Uses(calls=seen.module_calls())
    for call in seen.calls:
        readers = [v.id for v in call.inputs if v.id in uses.outputs]
        if call.module is None:
            if not any(isinstance(modules[s], BN_TYPES) for s in call.scope):
                for key in readers:
                    uses.function_users[key] = uses.function_users.get(key, 0) + 1
            continue
        module = modules[call.module]
        for key in readers:
            uses.module_users.setdefault(key, set()).add(call.module)
        if isinstance(module, BN_TYPES) and call.first is not None:
            uses.bn_inputs.setdefault(call.module, call.first.id)
        elif isinstance(module, PRODUCER_TYPES) and call.output is not None:
            uses.outputs[call.output.id] = (call.module, call.output)
    return uses


def _is_ancestor(ancestor: str, name: str) -> bool:
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _expected_output_dim(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return 2  # BN1d normalizes dim 1; only (N, features) puts the features there.
    assert isinstance(module, _CONV_TYPES + _CONVT_TYPES)
    return len(module.kernel_size) + 2  # type: ignore[arg-type]


def _find_pairs(model: nn.Module, uses: _Uses) -> list[tuple[str, str]]:
    """Pairs where the BN's input is exactly a producer's output and nothing else reads it."""
    modules = dict(model.named_modules())
    name_counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        name_counts[id(m)] = name_counts.get(id(m), 0) + 1
    pairs: list[tuple[str, str]] = []
    for bn_name, input_id in uses.bn_inputs.items():
        if input_id not in uses.outputs or bn_name == "":
            continue
        producer_name, output = uses.outputs[input_id]
        bn = modules[bn_name]
        producer = modules[producer_name]
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        usable = (
            not bn.training
            and bn.track_running_stats
            and bn.running_mean is not None
            and bn.running_var is not None
            and uses.calls.get(bn_name) == 1
            and uses.calls.get(producer_name) == 1
            and name_counts[id(bn)] == 1
            and name_counts[id(producer)] == 1
            and not parametrize.is_parametrized(producer)
            and isinstance(getattr(producer, "weight", None), nn.Parameter)
            and len(output.shape) == _expected_output_dim(producer)
            and bn.num_features == _output_channel_count(producer)
            and uses.function_users.get(input_id, 0) == 0
            and all(_is_ancestor(u, bn_name) for u in uses.module_users.get(input_id, set()))
        )
        if usable:
            pairs.append((producer_name, bn_name))
    return pairs


def fold_batchnorm(
    model: nn.Module, run: Callable[[nn.Module], object], rtol: float = 1e-4
) -> list[tuple[str, str]]:
    """Fold every foldable eval-mode BatchNorm into its producer, in place; return the pairs.

    Pairs are found by running ``run(model)`` once with hooks, because real models wire conv and
    BN in their own ``forward`` rather than in an ``nn.Sequential``. A BN is folded only when its
    input is exactly a Conv/ConvTranspose/Linear output that nothing else reads (other modules
    and torch functions such as a residual add are both watched). Each folded BN becomes
    ``nn.Identity``.

    ``run`` must be deterministic (same input each call): it is called again after folding and
    the outputs are compared within ``rtol`` of the output's largest magnitude. On a mismatch
    the model is restored and ``RuntimeError`` is raised, so the model's function never changes
    silently.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not callable(run):
        raise TypeError(f"run: expected a callable taking the model, got {type(run).__name__}")
    if model.training:
        raise ValueError(
            "model: is in training mode; call model.eval() first so BatchNorm uses its "
            "running statistics, which are what gets folded"
        )

    seen = trace(model, run)
    before = [t.detach().clone() for t in flatten_outputs(seen.output)]
    pairs = _find_pairs(model, _uses(model, seen))
    del seen
    if not pairs:
        return []

    modules = dict(model.named_modules())
    saved: list[tuple[nn.Module, Tensor, Tensor | None, str, nn.Module]] = []
    for producer_name, bn_name in pairs:
        producer = modules[producer_name]
        weight = producer.weight
        bias = producer.bias
        assert isinstance(weight, Tensor)
        saved.append(
            (
                producer,
                weight.detach().clone(),
                bias.detach().clone() if isinstance(bias, Tensor) else None,
                bn_name,
                modules[bn_name],
            )
        )

    def restore() -> None:
        with torch.no_grad():
            for producer, weight, bias, bn_name, bn in saved:
                producer.weight.copy_(weight)  # type: ignore[operator]
                if bias is None:
                    producer.register_parameter("bias", None)
                else:
                    producer.bias.copy_(bias)  # type: ignore[operator]
                model.set_submodule(bn_name, bn)

    try:
        for (producer_name, bn_name), entry in zip(pairs, saved, strict=True):
            fold_bn_into(modules[producer_name], entry[4])
            model.set_submodule(bn_name, nn.Identity())
        with torch.no_grad():
            after = flatten_outputs(run(model))
    except BaseException:
        restore()
        raise
    if not outputs_match(before, after, rtol):
        restore()
        raise RuntimeError(
            "fold_batchnorm: outputs changed after folding, so the model was restored; a folded "
            "pair's conv output is probably read elsewhere in a way hooks cannot see, or `run` "
            f"is not deterministic. Pairs: {pairs}"
        )
    return pairs
