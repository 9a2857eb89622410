"""The blocks BRECQ reconstructs one at a time, found from the model's module tree.

A block is a unit whose output the rest of the network reads as a whole: a residual block, an
inverted residual (MBConv), a Bottleneck. Found by walking the tree from the root: containers
(`nn.Sequential`, `nn.ModuleList`, `nn.ModuleDict`: the stages) are opened, and any other module
holding quantized layers (at most `max_layers` of them) is one block; a larger one (a backbone
wrapper) is opened too. A quantized layer outside every block (a stem, a head, a classifier) is
a block of its own. Name patterns (fnmatch, as `QuantConfig.overrides`) choose the blocks instead.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from lowbit.nn.modules import QuantModule, quant_modules

__all__ = ["MAX_BLOCK_LAYERS", "find_blocks"]

MAX_BLOCK_LAYERS = 8
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def find_blocks(
    qmodel: nn.Module,
    patterns: Sequence[str] | None = None,
    max_layers: int = MAX_BLOCK_LAYERS,
) -> dict[str, nn.Module]:
    """Blocks by qualified name, in module-tree order; every quantized layer is in exactly one.

    patterns: fnmatch patterns of the block names; the outermost matching modules are blocks,
        and each quantized layer outside them is a block of its own."""
    found: dict[str, nn.Module] = {}
    if patterns is None:
        _walk(qmodel, "", max_layers, found)
    else:
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"blocks: expected a sequence of name patterns, got {patterns!r}")
        _matching(qmodel, list(patterns), found)
    return found


def _count(module: nn.Module) -> int:
    return len(quant_modules(module))


def _walk(module: nn.Module, prefix: str, max_layers: int, found: dict[str, nn.Module]) -> None:
    for name, child in module.named_children():
        full = prefix + name
        n = _count(child)
        if n == 0:
            continue
        if isinstance(child, QuantModule):
            found[full] = child
        elif isinstance(child, _CONTAINERS) or n > max_layers:
            _walk(child, full + ".", max_layers, found)
        else:
            found[full] = child


def _matching(qmodel: nn.Module, patterns: list[str], found: dict[str, nn.Module]) -> None:
    used: set[str] = set()

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = prefix + name
            hit = [p for p in patterns if fnmatch.fnmatchcase(full, p)]
            if hit and _count(child):
                used.update(hit)
                found[full] = child
            elif isinstance(child, QuantModule):
                found[full] = child
            else:
                visit(child, full + ".")

    visit(qmodel, "")
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ValueError(f"blocks: pattern(s) {unused} match no module holding quantized layers")
