"""Open a local file to send (upload, push, cluster push) without a stat-then-open race.

And look at it once, in one worker-thread hop: :func:`read_source` opens and
checks it and, for a small file, reads and hashes it and closes it (it was
four hops: a directory check, open, read, close); :func:`probe_source` is the
same look for ``send_to_server``, which must also tell a directory apart.

A file a directory walk found is opened through its directory
(:class:`WalkedDirectories`): the walk's path to it names directories that
another local program may replace, after the walk, by a link to a directory
outside the tree.
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

#: A directory as a walk found it: its ``(st_dev, st_ino)``.
DirectoryId = tuple[int, int]

_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def directory_id(info: os.stat_result) -> DirectoryId:
    """The identity of the directory ``info`` describes."""
    return info.st_dev, info.st_ino


class WalkedDirectories:
    """Opens the files a directory walk found, each through its directory.

    The walk gives each file's path and the identity of the directory it
    listed (:data:`DirectoryId`). A file is opened relative to a descriptor
    of its directory (``openat``), with ``O_NOFOLLOW``, once that descriptor
    is checked to be the directory the walk listed. A path of the walk that
    another program turned, since, into a way out of the tree (a directory
    replaced by a link to another, or by another directory: anywhere from
    the walk's top down) is refused with :class:`UnsafePathError`; the path
    alone, opened with ``O_NOFOLLOW``, refused a link only in its last part
    (a review, 2026-12-07: a file outside the tree uploaded under the
    tree's name). The descriptor of the last directory is kept for the
    next file (a walk's files come directory by directory); :meth:`close`
    lets it go. Use from one thread at a time.
    """

    def __init__(self) -> None:
        """No directory open yet."""
        self._open: tuple[str, int] | None = None

    def open(self, path: str | os.PathLike[str], within: DirectoryId) -> int:
        """A descriptor of the file at ``path``, in the directory ``within`` (raw, as
        ``os.open`` gives it: the caller checks and closes it)."""
        directory, basename = os.path.split(os.fspath(path))
        dir_fd = self._directory(directory or ".", within)
        try:
            return os.open(basename, _READ_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(
                    f"{os.fspath(path)!r} is a symbolic link; not followed"
                ) from None
            raise

    def _directory(self, directory: str, within: DirectoryId) -> int:
        if self._open is not None:
            if self._open[0] == directory:
                return self._open[1]
            self.close()
        # Links are followed here (the walk's top may be one, the caller's
        # choice): what is checked is where they lead.
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | _READ_FLAGS)
        try:
            if directory_id(os.fstat(dir_fd)) != within:
                raise UnsafePathError(
                    f"{directory!r} is no longer the directory that was walked "
                    "(replaced since, by a link or another directory); not followed"
                )
        except BaseException:
            os.close(dir_fd)
            raise
        self._open = (directory, dir_fd)
        return dir_fd

    def close(self) -> None:
        """Close the directory kept open. Harmless to call again."""
        if self._open is not None:
            fd, self._open = self._open[1], None
            os.close(fd)

    def __enter__(self) -> WalkedDirectories:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_local_fd(
    path: str | os.PathLike[str],
    *,
    within: DirectoryId | None = None,
    walked: WalkedDirectories | None = None,
) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading if it is a regular file: its descriptor (blocking) and fstat.

    One ``open`` then ``fstat`` of what was opened, never ``stat`` then
    ``open``: a FIFO swapped in between would block the worker thread until
    a writer came. ``O_NONBLOCK`` makes opening a FIFO (or a device) return at
    once; anything but a regular file raises ``IsADirectoryError`` (code
    ``not_a_file``). ``within``: ``path`` is a file a directory walk found in
    the directory of that identity, opened through it (``walked``'s, else
    one of its own: see :class:`WalkedDirectories`), and a symbolic link,
    there or in its place, is refused with :class:`UnsafePathError`.
    Else the usual OSError subclass. The caller closes the descriptor.
    """
    if within is None:
        fd = os.open(path, _READ_FLAGS)  # FileNotFoundError, PermissionError as usual
    elif walked is not None:
        fd = walked.open(path, within)
    else:
        with WalkedDirectories() as own:
            fd = own.open(path, within)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", str(Path(path)))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def open_local_file(
    path: str | os.PathLike[str],
    *,
    within: DirectoryId | None = None,
    walked: WalkedDirectories | None = None,
) -> io.FileIO:
    """:func:`open_local_fd` as a file object (which owns the descriptor)."""
    fd, _ = open_local_fd(path, within=within, walked=walked)
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
    path: str | os.PathLike[str], limit: int, *, within: DirectoryId | None = None
) -> LocalSource:
    """Open ``path`` to send it (worker thread): a small file comes back read and closed.

    Raises what :func:`._local.open_local_file` raises (a missing file, not a
    regular file, a refused symbolic link or directory replaced since a walk).
    """
    fd, info = open_local_fd(path, within=within)
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
    try:
        fd = os.open(path, _READ_FLAGS)
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
    "DirectoryId",
    "LocalSource",
    "Probe",
    "SmallFile",
    "WalkedDirectories",
    "directory_id",
    "open_local_fd",
    "open_local_file",
    "probe_source",
    "read_small",
    "read_source",
]
