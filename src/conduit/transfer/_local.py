"""Open a local file to send (upload, push, cluster push) without a stat-then-open race."""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

from ..errors import UnsafePathError


def open_local_fd(
    path: str | os.PathLike[str], *, follow_symlinks: bool = True
) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading if it is a regular file: its descriptor (blocking) and fstat.

    One ``open`` then ``fstat`` of what was opened, never ``stat`` then
    ``open``: a FIFO swapped in between would block the worker thread until
    a writer came. ``O_NONBLOCK`` makes opening a FIFO (or a device) return at
    once; anything but a regular file raises ``IsADirectoryError`` (code
    ``not_a_file``). ``follow_symlinks=False`` refuses a symbolic link
    atomically (``O_NOFOLLOW``) with :class:`UnsafePathError`. Else the usual
    OSError subclass. The caller closes the descriptor.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)  # FileNotFoundError, PermissionError as usual
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise UnsafePathError(f"{str(path)!r} is a symbolic link; not followed") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", str(Path(path)))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def open_local_file(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> io.FileIO:
    """:func:`open_local_fd` as a file object (which owns the descriptor)."""
    fd, _ = open_local_fd(path, follow_symlinks=follow_symlinks)
    return io.FileIO(fd, "r", closefd=True)


__all__ = ["open_local_fd", "open_local_file"]
