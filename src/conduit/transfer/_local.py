"""Open a local file to send (upload, push, cluster push) without a stat-then-open race.

And look at it once, in one worker-thread hop: :func:`read_source` opens and
checks it and, for a small file, reads and hashes it and closes it (it was
four hops: a directory check, open, read, close); :func:`probe_source` is the
same look for ``send_to_server``, which must also tell a directory apart.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from pathlib import Path

import attrs

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


@attrs.frozen
class SmallFile:
    """A small local file, read whole: its bytes and their SHA-256 (hex)."""

    data: bytes
    sha256: str


@attrs.frozen
class LocalSource:
    """What one look at a local path found: a small file read whole, or an open larger one."""

    #: The file's bytes, when it is at most the small-file limit.
    small: SmallFile | None = None
    #: Otherwise the file, open for reading at position 0 (the caller closes it).
    file: io.FileIO | None = None
    #: A small file whose size changed while it was read (nothing to send).
    changed: bool = False


def _read_exactly(fd: int, size: int) -> bytes:
    """Up to ``size + 1`` bytes of ``fd``: one more than expected shows a file that grew.

    A regular file's ``read`` returns fewer bytes than asked only at its end,
    so a first read that brings ``size`` bytes (one short of what was asked)
    is taken as the whole file, without the extra ``read`` that would see the
    end: one system call fewer per small file. Only a read shorter than that
    goes on reading (to the end, or to ``size + 1`` bytes).
    """
    part = os.read(fd, size + 1)
    if len(part) >= size:
        return part
    parts = [part]
    left = size + 1 - len(part)
    while left > 0 and part:
        part = os.read(fd, left)
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_small(fd: int, size: int) -> SmallFile | None:
    """The bytes of ``fd`` from its position, and their hash; None when it did not
    hold ``size`` bytes (it changed). Blocking: run it in a worker thread."""
    data = _read_exactly(fd, size)
    if len(data) != size:
        return None
    return SmallFile(data, hashlib.sha256(data).hexdigest())


def read_source(
    path: str | os.PathLike[str], limit: int, *, follow_symlinks: bool = True
) -> LocalSource:
    """Open ``path`` to send it (worker thread): a small file comes back read and closed.

    Raises what :func:`._local.open_local_file` raises (a missing file, not a
    regular file, a refused symbolic link).
    """
    fd, info = open_local_fd(path, follow_symlinks=follow_symlinks)
    if info.st_size > limit:
        return LocalSource(file=io.FileIO(fd, "r", closefd=True))
    try:
        small = read_small(fd, info.st_size)
        return LocalSource(small=small, changed=small is None)
    finally:
        os.close(fd)


@attrs.frozen
class Probe:
    """What ``send_to_server`` needs to know about a path before choosing how to send it."""

    is_directory: bool = False
    #: The whole file, when it is a small regular file that could be read.
    small: SmallFile | None = None


def probe_source(path: str | os.PathLike[str], limit: int) -> Probe:
    """Is ``path`` a directory, or a small file (read whole)? One look, in a worker thread.

    Never raises: anything else (missing, unreadable, a special file, a small
    file that changed while read) is left to the sending path, which reports it
    as it always does.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError:
        # An unreadable directory is still a directory (its walk reports it).
        return Probe(is_directory=os.path.isdir(path))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            return Probe(is_directory=True)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return Probe()
        # Left non-blocking: ``O_NONBLOCK`` does not apply to a regular file's
        # reads (two ``fcntl`` calls saved per small file).
        return Probe(small=read_small(fd, info.st_size))
    except OSError:
        return Probe()
    finally:
        os.close(fd)


__all__ = [
    "LocalSource",
    "Probe",
    "SmallFile",
    "open_local_fd",
    "open_local_file",
    "probe_source",
    "read_small",
    "read_source",
]
