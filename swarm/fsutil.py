"""Crash-safe writes: a reader (or a restarted peer) sees the whole new file or the old one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomic(path: str | os.PathLike, blob: bytes | memoryview, mode: int | None = None) -> None:
    """Write ``blob`` to a temp file beside ``path``, fsync it, rename it over ``path``, fsync the directory."""
    path = Path(path)
    write_streamed(path.parent, path.name, lambda f: (f.write(blob), path)[1], mode)


def write_streamed(directory: Path, name: str, fill: Callable[[BinaryIO], Path], mode: int | None = None) -> Path:
    """``fill`` writes a temp file in ``directory`` as its data comes, and returns the path the file is to have
    (known only at the end, say); the file is fsynced, renamed to it, and the directory fsynced. On any error the
    temp file is removed: a crash leaves at most a dot-file named after ``name``, never read as a result."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            path = fill(f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)
    return path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
