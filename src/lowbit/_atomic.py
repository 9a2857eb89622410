"""The one way lowbit writes a file: whole or not at all, with the permissions of `open()`.

`write_atomic` writes to a temporary name in the target's folder, fsyncs, and renames over the
target, so a reader sees the old file or the new one, never half of one. The temporary file is
created as `open()` creates files (mode 0666 less the umask), so the result is as readable as any
file the user writes. While it is being written the temporary file holds an exclusive lock; a
process killed mid-write (SIGKILL, power loss) releases it, and the next write to the same target
deletes every unlocked temporary file of that target: a killed save leaves nothing that the next
save does not clean up (on POSIX systems). Lowest layer: imports nothing from lowbit.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "temp_files", "write_atomic"]

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"  # as tempfile.mkstemp, which lowbit used


def write_atomic(path: str | os.PathLike[str], *chunks: bytes | memoryview) -> None:
    """Write the chunks, one after the other, to `path` atomically (see the module docstring);
    on any error `path` is unchanged and no temporary file remains."""
    target = Path(path)
    fd, tmp = _begin(target)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            if _RENAME_OPEN:
                os.replace(tmp, target)  # still locked: no clean-up can take the finished file
        if not _RENAME_OPEN:
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """For writers that open the file themselves (too large to hold in memory): yields the
    temporary path to write; on normal exit it is fsynced and renamed over `path`, on any error
    deleted, so `path` is whole or unchanged, as with `write_atomic`."""
    target = Path(path)
    fd, tmp = _begin(target)
    try:
        yield tmp
        os.fsync(fd)
        if not _RENAME_OPEN:
            os.close(fd)
            fd = -1
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """The temporary files of writes to `path` now in its folder (live or left by a kill)."""
    target = Path(path)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[{_ALPHABET}]{{8}}\.tmp")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return [target.parent / n for n in sorted(names) if pattern.fullmatch(n)]


def _begin(target: Path) -> tuple[int, Path]:
    """Clean up `target`'s stale temporary files and create a new, locked one."""
    if not target.parent.is_dir():
        raise FileNotFoundError(f"no such folder: {target.parent}")
    _remove_stale(target)
    return _create_locked(target)


def _temp_name(target: Path) -> Path:
    token = "".join(secrets.choice(_ALPHABET) for _ in range(8))
    return target.parent / f".{target.name}.{token}.tmp"


def _create_locked(target: Path) -> tuple[int, Path]:
    """Create and lock a new temporary file for `target`: (descriptor, path)."""
    while True:
        tmp = _temp_name(target)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o666)
        except FileExistsError:
            continue
        _lock(fd, wait=True)
        if _still_named(fd, tmp):
            return fd, tmp
        os.close(fd)  # a concurrent clean-up took it between creation and lock: try again


def _remove_stale(target: Path) -> None:
    """Delete the temporary files of `target` that no live writer holds."""
    for tmp in temp_files(target):
        try:
            fd = os.open(tmp, os.O_RDWR | _BINARY)  # NFS locks exclusively only for writers
        except OSError:
            continue  # renamed or removed meanwhile
        try:
            if _lock(fd, wait=False) and _still_named(fd, tmp):
                tmp.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _still_named(fd: int, tmp: Path) -> bool:
    """Whether `tmp` still names the open file `fd` (no one deleted or replaced it)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(tmp))
    except FileNotFoundError:
        return False


_BINARY = getattr(os, "O_BINARY", 0)
_RENAME_OPEN = sys.platform != "win32"  # Windows renames no open file

if sys.platform == "win32":

    def _lock(fd: int, *, wait: bool) -> bool:
        """No flock on Windows: writes stay atomic, but files left by a kill stay too."""
        return False

else:
    import fcntl

    def _lock(fd: int, *, wait: bool) -> bool:
        """Lock `fd` exclusively (released when its process ends, even by SIGKILL); False if
        another process holds it and `wait` is False, or the file system has no locks."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            return False
        return True
