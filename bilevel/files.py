"""Files that are never half-written: each is written to a temporary file in the same folder,
flushed to disk and renamed over its name, so a crash at any moment (a kill, a full disk, a
preempted node) leaves either the old file or the new one, never a torn or empty one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from bilevel.errors import WriteError

__all__ = ["write_atomic", "write_text_atomic"]


def _new_file_mode(path: Path) -> int:
    """The permissions ``path`` gets: those it has, or for a new file what ``open()`` would
    give (0o666 less the process's umask). ``mkstemp`` makes its file 0o600, so without this
    every summary, checkpoint and plot would be unreadable to the rest of a shared group."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        pass
    umask = os.umask(0o022)  # the umask can only be read by setting it: put it back at once
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(fh)`` on a temporary binary file beside ``path``, fsync it and rename it
    over ``path``. On any error the temporary file is removed and ``path`` is untouched. The
    file keeps the permissions it had, or gets those of a plainly created file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # POSIX; Windows has no such permissions to keep
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(path, err) from err  # a full disk, a quota: one line, old file kept
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text`` (UTF-8), atomically."""
    return write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))
