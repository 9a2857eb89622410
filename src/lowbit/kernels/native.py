"""lowbit's C++ kernels (`kernels/csrc/`), built for this machine on first use.

They are compiled with `torch.utils.cpp_extension` (needs a C++ compiler with OpenMP, and ninja,
a dependency of lowbit) the first time a kernel needs them: about 15-30 s once, after which torch
keeps the build in its extension cache (`TORCH_EXTENSIONS_DIR`, default
`~/.cache/torch_extensions`) and rebuilds only when the source changes. They register
`torch.ops.lowbit.*`.

The same switch as `torch.compile` turns them off (`set_compile(False)`, env `LOWBIT_COMPILE=0`);
a failed build warns once and leaves the eager kernels, which compute the same codes.

torch guards a build with a lock file that a killed build (Ctrl-C, SIGKILL) leaves behind, and
every later build then waits on it forever. lowbit's builds take an advisory lock first, which
the system releases when its holder dies: whoever holds it knows that a torch lock file it finds
is stale, and removes it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lowbit.exceptions import LowbitWarning
from lowbit.kernels.compile import switched_on

_CSRC = Path(__file__).with_name("csrc")
SOURCES = [
    _CSRC / "linear.cpp",
    _CSRC / "float_linear.cpp",
    _CSRC / "binary.cpp",
    _CSRC / "binary_conv.cpp",
]
# torch rebuilds when the sources or flags change, not when torch does: the version in the name
# keeps a build for one torch from being loaded by another.
_EXTENSION = "lowbit_kernels_" + re.sub(r"\W", "_", torch.__version__)
_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]

_lock = threading.Lock()
_state: dict[str, Any] = {"ops": None, "tried": False}


def ops() -> Any | None:
    """`torch.ops.lowbit` once built and loaded; None where switched off or the build failed."""
    if not switched_on() or torch.compiler.is_compiling():
        return None
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["ops"] = _build()
                _state["tried"] = True
    return _state["ops"]


def _build() -> Any | None:
    path = os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        # torch runs `ninja` from PATH; the pip package's binary is not there when the
        # environment was not activated.
        if shutil.which("ninja") is None:
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
        build = Path(_get_build_directory(_EXTENSION, verbose=False))
        with _build_lock(build):
            load(
                name=_EXTENSION,
                sources=[str(source) for source in SOURCES],
                extra_cflags=_FLAGS,
                build_directory=str(build),
                is_python_module=False,
                verbose=False,
            )
        return torch.ops.lowbit
    except Exception as error:  # no compiler, no ninja, an unwritable cache...
        warnings.warn(
            f"lowbit: building the C++ kernels failed ({type(error).__name__}: "
            f"...{str(error)[-400:]}); using the eager kernels (set LOWBIT_COMPILE=0 to skip)",
            LowbitWarning,
            stacklevel=3,
        )
        return None
    finally:
        os.environ["PATH"] = path


@contextlib.contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """Hold lowbit's lock on `build` (released by the system if this process dies), and clear
    torch's lock file there, which only a build killed while holding it can have left."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock only
        yield
        return
    with open(build / "lowbit.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
