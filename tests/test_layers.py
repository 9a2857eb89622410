"""The architecture, checked: src/lowbit is a stack of layers, and a module imports only its own
layer or lower ones. Read with ast (imports inside functions and `TYPE_CHECKING` blocks count),
so a lazy import cannot hide an upward dependency. The README's Layout section says the same
order in words; change both together.

Also the size rules of issue 15: no file over 500 lines, no function over 80.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"

# Low to high. A unit is a top-level module or package of lowbit; "lowbit" is the facade
# (lowbit/__init__.py), which may import everything and which nothing inside lowbit imports.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("exceptions", "progress", "_atomic", "batches", "distributed"),  # support
    ("spec",),  # what a quantized number is
    ("numerics",),  # pure tensor functions over a spec
    ("calib", "kernels"),  # ranges from observed tensors; integer kernels
    ("config", "presets"),  # QuantConfig is data: specs and calibrator names
    ("nn",),  # quantizers, simulated and integer modules
    ("transforms",),  # model rewrites: tracing, BN folding, module swap
    ("algorithms",),  # PTQ beyond round-to-nearest
    ("workflows",),  # quantize, calibrate, prepare_qat, convert
    ("io", "export"),  # lowbit files, ONNX import, ONNX QDQ export
    ("pretrained",),  # Hugging Face checkpoints quantized block by block
    ("evaluate",),  # SQNR, accuracy, latency, size, comparison, mixed precision
    ("report",),  # markdown / HTML reports
    ("cli", "__main__"),  # the lowbit command; python -m lowbit
    ("lowbit",),  # the public facade
)
LEVEL: dict[str, int] = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}

MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The layer unit of a dotted lowbit module name: `lowbit.nn.modules` -> `nn`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lowbit"


def _imported(path: Path, tree: ast.Module) -> set[str]:
    """Every lowbit module `path` imports, anywhere in the file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from lowbit import presets` imports the module lowbit.presets;
                # `from lowbit import quantize` imports the facade.
                sub = SRC.parent.joinpath(*f"{base}.{alias.name}".split("."))
                is_module = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                found.add(f"{base}.{alias.name}" if is_module else base)
    return {name for name in found if name == "lowbit" or name.startswith("lowbit.")}


def _sources() -> list[tuple[Path, ast.Module]]:
    files = sorted(SRC.rglob("*.py"))
    assert files, f"no sources under {SRC}"
    return [(path, ast.parse(path.read_text(encoding="utf-8"), str(path))) for path in files]


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(path)) for path, _ in _sources()}
    missing = sorted(units - LEVEL.keys())
    assert not missing, f"place these in LAYERS (tests/test_layers.py) and the README: {missing}"
    stale = sorted(LEVEL.keys() - units)
    assert not stale, f"LAYERS names units that no longer exist: {stale}"


def test_no_module_imports_a_higher_layer():
    upward: dict[tuple[str, str], str] = {}
    for path, tree in _sources():
        importer = _module_name(path)
        for imported in _imported(path, tree):
            if LEVEL[_unit(imported)] > LEVEL[_unit(importer)]:
                upward[(importer, imported)] = f"{_unit(importer)} -> {_unit(imported)}"
    assert not upward, "imports of a higher layer:\n" + "\n".join(
        f"  {a} imports {b} ({why})" for (a, b), why in sorted(upward.items())
    )


def test_files_and_functions_stay_small():
    long: dict[tuple[str, str], int] = {}
    for path, tree in _sources():
        where = path.relative_to(SRC).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            long[(where, "")] = lines
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long[(where, node.name)] = size
    assert not long, (
        f"files over {MAX_FILE_LINES} lines or functions over {MAX_FUNCTION_LINES}:\n"
        + "\n".join(f"  {f} {fn or '(file)'}: {n} lines" for (f, fn), n in sorted(long.items()))
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import lowbit.nn.modules", {"lowbit.nn.modules"}),
        ("from lowbit import presets", {"lowbit.presets"}),
        ("from lowbit import quantize", {"lowbit"}),
        ("def f():\n    from lowbit.cli import main", {"lowbit.cli.main"}),
        ("from . import swap", {"lowbit.transforms.swap"}),
        ("from ..nn import modules", {"lowbit.nn.modules"}),
        ("import torch", set()),
    ],
)
def test_the_import_reader_sees_every_form(source: str, expected: set[str]):
    path = SRC / "transforms" / "fold_bn.py"
    assert _imported(path, ast.parse(source)) == expected
