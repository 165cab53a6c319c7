"""Synchronous, symlink-safe storage for received and served files.

The async transfer layer calls into this module through
``trio.to_thread.run_sync``, in large blocks; nothing here is async and nothing
here blocks on anything but the disk.

Resolution is openat-style: every operation opens the storage root once and then
walks the (already validated) name one segment at a time with
``os.open(segment, O_DIRECTORY | O_NOFOLLOW, dir_fd=parent)``, and opens or
creates the final entry relative to that directory descriptor with
``O_NOFOLLOW``. A symbolic link anywhere below the root, including one planted
after a check, is therefore never followed: there is no check-then-use window
of the ``os.path.realpath`` kind. The root itself *may* be a symbolic link: it
is chosen by the operator, not by the peer.

Receiving writes into a hidden partial file next to the target
(:func:`._names.partial_basename`), hashing while writing. Publishing fsyncs the
file, gives it its final name without ever overwriting an existing file
(``os.link``, which fails atomically with ``EEXIST``), removes the partial name
and fsyncs the directory. See :meth:`PartialFile.publish` for the collision
policy and the fallbacks for file systems without hard links. A file that
arrives whole in one call (:meth:`StorageRoot.open_one_shot`) is written to an
anonymous ``O_TMPFILE`` file in the target's directory instead, where the file
system has them: it has no name to remove, to lock or to sweep after a crash.

POSIX only: ``dir_fd``, ``O_NOFOLLOW`` and ``flock`` are what make this safe.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import heapq
import hmac
import io
import itertools
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Final

import attrs

from .._log_limit import ThreadedLimitedLog
from ..errors import ChecksumMismatch, TransferError, UnsafePathError
from ._names import (
    DOWNLOAD_ID_PREFIX,
    MAX_DEPTH,
    PARTIAL_PREFIX,
    check_transfer_id,
    collision_candidates,
    is_partial_name,
    partial_basename,
    safe_relative_name,
    split_name,
)
from ._prefix_digests import PREFIX_DIGESTS
from ._stoppable import Stopped

log = logging.getLogger("conduit.transfer")
# Partials the disk would not delete: a peer can make the line come again
# (resuming and abandoning into a directory that refuses deletes), so it has
# a budget; discards run in worker threads.
_undeleted_log = ThreadedLimitedLog(log)

__all__ = [
    "ENTRY_ALLOWANCE",
    "FileEntry",
    "PartialEntry",
    "PartialFile",
    "StorageRoot",
    "sha256_of_fd",
]

_CLOEXEC: Final = os.O_CLOEXEC
# O_NOFOLLOW on every open below the root: a symlink there is refused, not followed.
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK so that opening a FIFO planted under a file name cannot hang a
# worker thread; it is cleared again once the entry is known to be a regular file
# (a partial keeps it: it does not apply to a regular file's reads and writes).
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | _CLOEXEC
_PARTIAL_FLAGS: Final = (
    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | _CLOEXEC
)
# An anonymous file in a directory (see StorageRoot.open_one_shot), linked in
# through /proc/self/fd when published; None where either is missing.
_TMPFILE_FLAGS: int | None = (
    os.O_TMPFILE | os.O_WRONLY | _CLOEXEC
    if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
    else None
)
# Where an open descriptor can be linked from (its magic link).
_PROC_FD = "/proc/self/fd/"
# errno values of that link meaning "not here" (no /proc, a restricted one, ...).
_NO_PROC_LINK_ERRNOS: Final = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS}
)
# errno values meaning "no O_TMPFILE here": the file system does not support it
# (EOPNOTSUPP), or the kernel predates it and sees O_DIRECTORY (EISDIR, EINVAL).
_NO_TMPFILE_ERRNOS: Final = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL, errno.ENOSYS}
)
_PLACEHOLDER_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
# Partial files hold bytes nobody has verified yet: private while receiving.
_PARTIAL_MODE: Final = 0o600
#: Tries of an operation whose directory is pruned under it (a rename's target, a
#: one-shot file's directory: see StorageRoot.rename and open_one_shot).
_PRUNED_ATTEMPTS: Final = 3
_HASH_BLOCK: Final = 1 << 20
_DEFAULT_MAX_ENTRIES: Final = 100_000
#: The fewest children of a directory a listing's walk takes at a time (it
#: takes as many as the listing asks for, when more): each slice past the
#: first reads the directory again.
_LISTING_SLICE: Final = 256
#: What a listing's slices grow to, doubling at each reading of a directory
#: after the first (when the listing asks for fewer): a directory of many
#: entries that list nothing (empty directories) is read a few times, not
#: once per 256 of them.
_LISTING_SLICE_GROWN: Final = 4096

# errno values meaning "this file system cannot make hard links".
_NO_HARDLINK_ERRNOS: Final = frozenset(
    {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}
)
# errno values meaning "renameat2(RENAME_NOREPLACE) is not supported here".
_NO_RENAMEAT2_ERRNOS: Final = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_RENAME_NOREPLACE: Final = 1
_FULL_DISK_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
#: What a file's entry may take in its directory, counted for each file
#: against a quota: twice ext4's largest (8 bytes and a 255-byte name, rounded
#: up to 4), since a hashed directory splits a full block in two (300 names
#: of 255 bytes measured 396 bytes each). File systems that report small
#: directory sizes (tmpfs, xfs) so still bound how many files a quota holds.
ENTRY_ALLOWANCE: Final = 528


# --------------------------------------------------------------------------- public classes


@attrs.frozen
class FileEntry:
    """One file in a listing of a :class:`StorageRoot`."""

    #: Relative POSIX name, as accepted by :func:`safe_relative_name` unchanged.
    name: str
    #: Size in bytes.
    size: int
    #: Modification time, seconds since the epoch.
    modified: float


@attrs.frozen
class PartialEntry:
    """One partial file below a :class:`StorageRoot` (see :meth:`StorageRoot.list_partials`)."""

    #: The directories that hold it, relative to the root.
    directories: tuple[str, ...]
    #: The partial file's own (hidden) base name.
    basename: str
    #: Size in bytes.
    size: int
    #: Modification time (wall clock), seconds since the epoch.
    modified: float


def _absolute(path: str | os.PathLike[str]) -> Path:
    # Fix the meaning of a relative path now, not at first use after a chdir.
    # Path.absolute() only consults the working directory; it touches no files.
    return Path(os.fspath(path)).absolute()


#: A thread's held root descriptor, ``(StorageRoot, fd)`` (see :meth:`StorageRoot.holding_root`).
_held = threading.local()


@attrs.frozen
class StorageRoot:
    """A directory that files are received into and served from.

    Constructing one touches nothing on disk; :meth:`ensure` (called by every
    operation that writes) creates the directory when it is first needed, and
    the read-only operations treat a missing root as empty. Instances hold no
    open descriptors and no mutable state, so one instance may be used from many
    threads at once (:meth:`holding_root` holds a descriptor for one thread).

    Every name argument is a name from the network: it is passed through
    :func:`safe_relative_name` and then resolved without following symlinks.
    """

    #: The root directory (made absolute at construction).
    path: Path = attrs.field(converter=_absolute)
    #: Mode of directories conduit creates (subject to the umask).
    dir_mode: int = 0o700
    #: Mode a received file gets when it is published.
    file_mode: int = 0o600
    #: How many of the last segments of :attr:`path` lie within the
    #: confinement: a root below another one (an account's, below the storage
    #: directory) is reached from that one without following symlinks, as
    #: every name below a root is. 0: :attr:`path` is opened as it is (the
    #: operator chose it, and it may be a symlink).
    confined: int = 0

    def ensure(self) -> None:
        """Create the root directory (and missing parents) if it does not exist yet."""
        if self.confined:
            fd = self._open_confined(create=True)
            assert fd is not None  # created, or raised
            os.close(fd)
            return
        make_directories(self.path, self.dir_mode)

    def open_partial(
        self, name: str, transfer_id: str, *, resume: bool, stop: threading.Event | None = None
    ) -> PartialFile:
        """Open the partial file that receives ``name`` for ``transfer_id``.

        Creates the root and the intermediate directories as needed. With
        ``resume=True`` an existing partial file is kept and its bytes are
        hashed once (:meth:`PartialFile.rehash_prefix`, which ``stop`` ends
        early), so the returned ``offset`` is the length to resume from and
        ``sha256_hex()`` the hash of that prefix; with ``resume=False`` any
        existing partial is truncated.

        The partial file is locked (``flock``) while open: a second transfer
        with the same id, such as a retry racing the dropped original, gets
        :class:`TransferError` with code ``"busy"`` instead of interleaving
        writes into the same file.
        """
        safe = safe_relative_name(name)
        tid = check_transfer_id(transfer_id)
        directories, basename = split_name(safe)
        partial_name = partial_basename(basename, tid)
        for attempt in range(1, _PRUNED_ATTEMPTS + 1):
            dir_fd = self._open_directory(directories, safe, create=True)
            try:
                fd = _open_partial_fd(dir_fd, partial_name, safe, truncate=not resume)
            except OSError:
                removed = os.fstat(dir_fd).st_nlink == 0
                os.close(dir_fd)
                if removed and attempt < _PRUNED_ATTEMPTS:
                    # Made empty and pruned since it was opened (a download
                    # beside this one gave up with nothing and removed the
                    # directories it made, a review found): make it again.
                    continue
                raise
            except BaseException:
                os.close(dir_fd)
                raise
            break
        partial = PartialFile(self, safe, tid, dir_fd, partial_name, fd)
        if resume:
            try:
                partial.rehash_prefix(stop)
            except BaseException:
                partial.close()
                raise
        return partial

    def open_one_shot(self, name: str, transfer_id: str) -> PartialFile:
        """A partial for a file that arrives whole in one call: anonymous where it can be.

        On Linux file systems with ``O_TMPFILE`` (ext4, xfs, btrfs, tmpfs, ...)
        the file is created in the target's directory without a name: nothing
        under any name can be seen, opened or locked by anyone else until
        :meth:`PartialFile.publish` links it in whole, and a crash leaves
        nothing to sweep. That skips the named partial's checks (``lstat``,
        ``fstat``, ``flock``: a file no other open can reach needs none of them)
        and its ``unlink`` after the link. ``transfer_id`` names the hidden
        temporary that an overwriting publish links first and renames over the
        target. Elsewhere (no ``O_TMPFILE``, or no ``/proc`` to link it from) it
        is :meth:`open_partial` with ``resume=False``: the same guarantees, a
        few more system calls. A ``/proc`` that refuses the link (a sandbox)
        fails that one file and turns anonymous files off for the process.
        """
        safe = safe_relative_name(name)
        tid = check_transfer_id(transfer_id)
        directories, _ = split_name(safe)
        if _TMPFILE_FLAGS is None:
            return self.open_partial(safe, tid, resume=False)
        attempt = 0
        while True:
            attempt += 1
            dir_fd = self._open_directory(directories, safe, create=True)
            try:
                fd = os.open(".", _TMPFILE_FLAGS, _PARTIAL_MODE, dir_fd=dir_fd)
            except OSError as exc:
                removed = os.fstat(dir_fd).st_nlink == 0
                os.close(dir_fd)
                if removed and attempt < _PRUNED_ATTEMPTS:
                    # Made empty and pruned since it was opened (a user's root
                    # held for a batch, whose last expired partial went): an
                    # anonymous file keeps no directory alive. Make it again,
                    # without the hold, which points at the removed one.
                    self._forget_hold()
                    continue
                if exc.errno not in _NO_TMPFILE_ERRNOS:
                    raise
                # This file system (or kernel) has no anonymous files: a named one.
                return self.open_partial(safe, tid, resume=False)
            except BaseException:
                os.close(dir_fd)
                raise
            return PartialFile(self, safe, tid, dir_fd, None, fd)

    def find_partial(self, name: str, transfer_id: str) -> int | None:
        """Size of the partial file left for ``name`` by ``transfer_id``, or ``None``.

        Read-only: creates nothing. Lets the caller tell a retrying sender that
        a resume is possible before it opens the partial with ``resume=True``
        (which verifies the prefix).
        """
        info = self._stat_partial(name, transfer_id)
        return None if info is None else info.st_size

    def discard_partial(self, name: str, transfer_id: str) -> bool:
        """Remove the partial file for ``name`` / ``transfer_id``; whether one existed."""
        safe = safe_relative_name(name)
        tid = check_transfer_id(transfer_id)
        directories, basename = split_name(safe)
        try:
            dir_fd = self._open_directory(directories, safe, create=False)
        except FileNotFoundError:
            return False
        with _closing(dir_fd):
            return _remove_regular(dir_fd, partial_basename(basename, tid))

    def open_for_read(self, name: str) -> tuple[io.FileIO, int]:
        """Open the published file ``name`` for reading; return (file, size).

        The file object is unbuffered (the caller reads large blocks with
        ``readinto``) and owns its descriptor. Refused with
        :class:`UnsafePathError`: symlinks (anywhere in the path), directories,
        FIFOs, devices and sockets, and any hidden or partial name (those are
        refused by :func:`safe_relative_name` before the disk is consulted).
        A missing file, or a path through a regular file, is
        :class:`FileNotFoundError`.
        """
        safe = safe_relative_name(name)
        directories, basename = split_name(safe)
        dir_fd = self._open_directory(directories, safe, create=False)
        with _closing(dir_fd):
            fd = _open_regular_for_read(dir_fd, basename, safe)
        size = os.fstat(fd).st_size
        return io.FileIO(fd, "r", closefd=True), size

    def list_files(
        self,
        *,
        max_entries: int = _DEFAULT_MAX_ENTRIES,
        prefix: str | None = None,
        after: str | None = None,
    ) -> list[FileEntry]:
        """The first ``max_entries`` published files below the root, by name (those
        named after ``after``, when given: the next page of a listing).

        Never follows symlinks (they are skipped, as are FIFOs and other
        special files), never lists hidden or partial files, and skips any
        entry whose name :func:`safe_relative_name` would refuse or change, so
        every listed name can be downloaded by exactly that name. A missing
        root lists as empty. With ``prefix`` (a directory name, checked like
        any name), only the files below that directory, still named from the
        root; a prefix that is not a directory lists as empty.
        """
        if max_entries < 0:
            raise ValueError("max_entries must not be negative")
        entries: list[FileEntry] = []
        segments: tuple[str, ...] = ()
        if prefix is None:
            root_fd = self._open_root(create=False, missing_ok=True)
        else:
            safe = safe_relative_name(prefix)
            segments = tuple(safe.split("/"))
            try:
                root_fd = self._open_directory(segments, safe, create=False)
            except (
                FileNotFoundError,
                NotADirectoryError,
                PermissionError,
                UnsafePathError,
                TransferError,
            ):
                # Not a directory here (or not one we may read): nothing
                # below it. Anything else (no descriptor left) raises: an
                # empty listing would say the directory holds nothing.
                root_fd = None
        if root_fd is None:
            return entries
        with _closing(root_fd):
            if max_entries == 0:
                return entries
            slice_size = max(max_entries, _LISTING_SLICE)
            walk = _walk_directory(root_fd, segments, after=after, slice_size=slice_size)
            with closing(walk):
                for _directory, entry, relative in walk:
                    listed = _listing_entry(entry, relative)
                    if listed is not None:
                        entries.append(listed)
                        if len(entries) == max_entries:
                            break
        return entries  # in name order: the walk's

    def free_space(self) -> int:
        """Bytes available to this (unprivileged) process on the root's file system.

        Measured on the root, or on its nearest existing ancestor while the
        root has not been created yet (so asking creates nothing).
        """
        # statvfs first: the root exists on every call but the first few, and
        # an exists() check before it cost a stat per admitted file.
        target = self.path
        while True:
            try:
                result = os.statvfs(target)
            except (FileNotFoundError, NotADirectoryError):
                if target.parent == target:
                    raise
                target = target.parent
                continue
            return result.f_bavail * result.f_frsize

    def check_can_accept(
        self, size: int, max_file_size: int | None = None, *, offset: int = 0, reserve: int = 0
    ) -> None:
        """Raise :class:`TransferError` unless a ``size``-byte file can be received.

        Codes: ``"invalid_size"`` for a negative size or an offset outside it,
        ``"too_large"`` when ``size`` exceeds ``max_file_size``, ``"no_space"``
        when the ``size - offset`` bytes still to come (``offset`` is what a
        resumed partial already holds) plus ``reserve`` exceed the free space.
        """
        if size < 0 or not 0 <= offset <= size:
            raise TransferError(f"invalid size {size} (offset {offset})", "invalid_size")
        if max_file_size is not None and size > max_file_size:
            raise TransferError(
                f"file of {size} bytes exceeds the limit of {max_file_size} bytes", "too_large"
            )
        needed = size - offset + reserve
        if needed <= 0:
            return  # nothing to write: no need to ask the file system
        available = self.free_space()
        if needed > available:
            raise TransferError(
                f"not enough disk space: {needed} bytes needed, {available} available",
                "no_space",
            )

    def cleanup_stale_partials(self, max_age_seconds: float, *, now: float | None = None) -> int:
        """Remove partial files not written to for ``max_age_seconds``; return how many.

        Partial files survive a dropped connection so that the transfer can
        resume; this is what eventually removes the ones nobody came back for.
        A partial file that is open by a transfer (it holds the lock) is never
        removed, however old. Symlinks are neither followed nor removed.
        """
        # Wall clock on purpose, not Trio's: the age is compared with file
        # mtimes, which the kernel stamps in wall-clock time and which outlive
        # this process (a partial from yesterday's run is still a day old).
        cutoff = (time.time() if now is None else now) - max_age_seconds
        root_fd = self._open_root(create=False, missing_ok=True)
        if root_fd is None:
            return 0
        removed = 0
        with _closing(root_fd), closing(_walk_tree(root_fd, _PARTIAL_WALK_DEPTH)) as walk:
            for directory, entry, _relative in walk:
                if _is_stale_partial(entry, cutoff) and _remove_if_idle(directory, entry.name):
                    removed += 1
        return removed

    # ---------------------------------------------------- disk budget (see ._space)

    def list_partials(self) -> list[PartialEntry]:
        """Every partial file below the root (not following symlinks); empty if no root.

        Deeper than names go (:data:`_PARTIAL_WALK_DEPTH`): from the storage
        directory, an account's partials lie below its root as well.
        """
        found: list[PartialEntry] = []
        root_fd = self._open_root(create=False, missing_ok=True)
        if root_fd is None:
            return found
        with _closing(root_fd), closing(_walk_tree(root_fd, _PARTIAL_WALK_DEPTH)) as walk:
            for _directory, entry, relative in walk:
                if not is_partial_name(entry.name) or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                *directories, basename = relative.split("/")
                found.append(
                    PartialEntry(tuple(directories), basename, info.st_size, info.st_mtime)
                )
        return found

    def stored_bytes(self) -> int:
        """Bytes below the root, for quotas, partial files left out (the disk budget
        indexes those): every published regular file's size plus
        :data:`ENTRY_ALLOWANCE`, and every directory's size (as the file system
        reports it: a block on most disks), the root's own included, so that
        neither directories nor empty files can be made without end for free."""
        root_fd = self._open_root(create=False, missing_ok=True)
        if root_fd is None:
            return 0
        with _closing(root_fd), closing(_walk_tree(root_fd)) as walk:
            # The root's own entries take room too (thousands of empty files
            # there counted nothing: the walk sees what is below the root).
            total = os.fstat(root_fd).st_size
            for _directory, entry, _relative in walk:
                if is_partial_name(entry.name):
                    continue
                with suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size + ENTRY_ALLOWANCE
                    elif entry.is_dir(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        return total

    def sync_directories(self, names: Iterable[str]) -> None:
        """fsync, once each, the directories that hold ``names`` (published with
        ``sync_directory=False``), so that their new entries survive a crash.

        The partial of a file lives in its target's directory, so this also
        makes the partial names' removal durable.
        """
        for directories in dict.fromkeys(split_name(safe_relative_name(n))[0] for n in names):
            fd, owned = self._borrow_directory(directories, "/".join(directories))
            try:
                os.fsync(fd)
            finally:
                if owned:
                    os.close(fd)

    def remove_idle_partial(self, directories: tuple[str, ...], basename: str) -> bool:
        """Unlink the partial file ``directories/basename`` unless a transfer holds it open.

        ``basename`` must be a partial file's name; directories are walked
        without following symlinks. Returns whether it was removed.
        """
        if not is_partial_name(basename) or "/" in basename:
            raise UnsafePathError(f"{basename!r} is not a partial file name")
        try:
            dir_fd = self._open_directory(
                directories, "/".join((*directories, basename)), create=False
            )
        except (OSError, UnsafePathError, TransferError):
            return False
        with _closing(dir_fd):
            return _remove_if_idle(dir_fd, basename)

    def adopt_partial(self, name: str, former_id: str, transfer_id: str) -> bool:
        """Rename ``name``'s idle partial under ``former_id`` to ``transfer_id``'s; whether it did.

        Only if no partial of ``transfer_id`` exists (never replacing one) and
        no transfer holds the former one locked. For partials that an earlier
        version of conduit named otherwise, so that a transfer cut before an
        upgrade resumes after it. Best effort: anything in the way (no such
        partial, a directory missing or unreadable) adopts nothing.
        """
        safe = safe_relative_name(name)
        directories, basename = split_name(safe)
        former = partial_basename(basename, check_transfer_id(former_id))
        current = partial_basename(basename, check_transfer_id(transfer_id))
        try:
            dir_fd = self._open_directory(directories, safe, create=False)
        except (OSError, UnsafePathError, TransferError):
            return False
        with _closing(dir_fd):
            try:
                fd = _open_checked(dir_fd, former, safe, _READ_FLAGS)
            except (OSError, UnsafePathError):
                return False  # none (the usual case), or not a regular file
            with _closing(fd):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False  # a transfer is writing it
                if not _same_file(dir_fd, former, fd):
                    return False
                try:
                    return _rename_without_replacing(dir_fd, former, dir_fd, current)
                except OSError:
                    return False

    def remove_other_partials(self, name: str, transfer_id: str) -> int:
        """Remove the idle partial files of ``name`` other than ``transfer_id``'s; how many.

        A download's partial is keyed by the server file's size and
        modification time, so a file that changed on the server between a cut
        and the retry gets a new partial, and the old one (up to the whole
        old size) would stay forever. The downloader calls this when its
        partial starts at zero. Only entries of ``name``'s directory whose
        name is exactly :func:`partial_basename` of ``name``'s base name
        under a valid transfer id of ``transfer_id``'s kind go (as long, and
        with the same :data:`DOWNLOAD_ID_PREFIX` or none: a download's
        partials are never taken for an upload's or a push's, and
        ``b.bin``'s are told from those of ``x-b.bin``), and only those no
        transfer holds locked (:func:`_remove_if_idle`): never a published
        file, a partial of another name or kind, or one being written. A
        missing directory removes nothing.

        Best effort: a directory that cannot be listed (write-only drop
        boxes, an I/O error) removes nothing and raises nothing, since the
        download itself does not depend on it.
        """
        safe = safe_relative_name(name)
        directories, basename = split_name(safe)
        tid = check_transfer_id(transfer_id)
        keep = partial_basename(basename, tid)
        return self._remove_idle_partials(
            directories,
            safe,
            lambda entry: entry != keep and _is_partial_of(entry, basename, tid),
        )

    def remove_download_partials(self, names: Iterable[str]) -> int:
        """Remove the idle partial files downloads of ``names`` left (any version); how many.

        What :meth:`remove_other_partials` does for a download that starts at
        zero, for many files at once: a batch of a directory's small files
        arrives whole, and a partial that a cut download of an earlier,
        larger version left would stay for ever. One listing per directory,
        not one per file. Only download partials go (never an upload's or a
        push's), only those no transfer holds locked; best effort, as there.
        """
        by_directory: dict[tuple[str, ...], tuple[str, dict[str, str]]] = {}
        for name in names:
            safe = safe_relative_name(name)
            directories, basename = split_name(safe)
            _, tails = by_directory.setdefault(directories, (safe, {}))
            # The part after the id: the same for every id of one length.
            tails[partial_basename(basename, _SOME_DOWNLOAD_ID)[_DOWNLOAD_HEAD:]] = basename
        return sum(
            self._remove_idle_partials(directories, some_name, _download_partial_of(tails))
            for directories, (some_name, tails) in by_directory.items()
        )

    def _remove_idle_partials(
        self, directories: tuple[str, ...], name: str, is_one: Callable[[str], bool]
    ) -> int:
        """Remove the regular files of ``directories`` that ``is_one`` picks and no
        transfer holds locked; how many (``name``: the file asked about, for errors).
        Best effort: a directory that cannot be opened or listed removes nothing."""
        try:
            dir_fd = self._open_directory(directories, name, create=False)
        except (OSError, UnsafePathError, TransferError):
            return 0
        with _closing(dir_fd):
            try:
                with os.scandir(dir_fd) as iterator:
                    candidates = [
                        entry.name
                        for entry in iterator
                        if is_one(entry.name) and entry.is_file(follow_symlinks=False)
                    ]
            except OSError:
                return 0
            return sum(_remove_if_idle(dir_fd, entry) for entry in candidates)

    def prune_empty_directories(self, directories: tuple[str, ...], *, keep: int = 0) -> int:
        """Remove ``directories`` from the deepest up while each is empty; return how many.

        Stops at the first one that is not empty (or not a directory, or
        gone), and above the first ``keep`` levels, which stay; never removes
        the root itself. Symlinks are neither followed nor removed.
        """
        fds: list[int] = []
        removed = 0
        if len(directories) <= max(keep, 0):
            return 0  # nothing below the kept levels: no need to open anything
        try:
            root_fd = self._open_root(create=False, missing_ok=True)
            if root_fd is None:
                return 0
            fds.append(root_fd)
            for segment in directories[:-1]:
                try:
                    fds.append(os.open(segment, _DIR_FLAGS, dir_fd=fds[-1]))
                except OSError:
                    return 0
            for depth in range(len(directories) - 1, max(keep, 0) - 1, -1):
                try:
                    os.rmdir(directories[depth], dir_fd=fds[depth])
                except OSError:
                    break
                removed += 1
        finally:
            for fd in fds:
                os.close(fd)
        return removed

    # ------------------------------------------- managing published files (issue 13)

    def existing_sha256(
        self, name: str, size: int, hash_fd: Callable[[int, int], str] | None = None
    ) -> str | None:
        """SHA-256 hex of the published file ``name`` if it is a regular file of ``size`` bytes.

        ``None`` when there is no such file, it has another size, or it is not a
        regular file (a symlink is never followed). Lets a re-run recognise a
        file that already arrived complete instead of storing a second copy.
        ``hash_fd(fd, size)`` replaces the plain read (the handler's cached,
        counted :meth:`HashGate.digest_of_fd <._hashing.HashGate.digest_of_fd>`).
        """
        safe = safe_relative_name(name)
        directories, basename = split_name(safe)
        try:
            dir_fd = self._open_directory(directories, safe, create=False)
        except (FileNotFoundError, UnsafePathError, TransferError):
            return None
        with _closing(dir_fd):
            info = _lstat(dir_fd, basename)
            if info is None or not stat.S_ISREG(info.st_mode) or info.st_size != size:
                return None
            try:
                fd = _open_regular_for_read(dir_fd, basename, safe)
            except (FileNotFoundError, UnsafePathError):
                return None
        with _closing(fd):
            return (hash_fd or _hash_fd)(fd, size)

    def entry_stat(self, name: str) -> os.stat_result | None:
        """``lstat`` of whatever is at ``name`` (a file, a directory, a symlink: never
        followed), or ``None`` when nothing is (or its directory cannot be reached)."""
        safe = safe_relative_name(name)
        directories, basename = split_name(safe)
        try:
            dir_fd, owned = self._borrow_directory(directories, safe)
        except (FileNotFoundError, UnsafePathError, TransferError):
            return None
        try:
            return _lstat(dir_fd, basename)
        finally:
            if owned:
                os.close(dir_fd)

    def is_directory(self, name: str) -> bool:
        """Whether ``name`` is a directory below the root (symlinks are not followed)."""
        safe = safe_relative_name(name)
        try:
            os.close(self._open_directory(tuple(safe.split("/")), safe, create=False))
        except (OSError, UnsafePathError, TransferError):
            return False
        return True

    def missing_directories(self, directories: tuple[str, ...]) -> int:
        """How many of ``directories`` (a path below the root, outermost first) do
        not exist yet: what making them would add (the last ones of the path).

        Through :meth:`is_directory` (its confinement: no symlink followed):
        one look when they all exist, the common case; else a binary search
        for the deepest that does (directories exist as a prefix of the path),
        a handful of looks at 63 levels. A segment that is not a directory
        counts as missing, with all below it: that can only overcount.
        """
        if not directories or self.is_directory("/".join(directories)):
            return 0
        # The first ``there`` levels exist; the first ``absent + 1`` do not.
        there, absent = 0, len(directories) - 1
        while there < absent:
            middle = (there + absent + 1) // 2
            if self.is_directory("/".join(directories[:middle])):
                there = middle
            else:
                absent = middle - 1
        return len(directories) - there

    def delete(self, name: str) -> None:
        """Remove the published file ``name``.

        Refused with :class:`TransferError`: ``"not_found"``, ``"unsafe_path"``
        (a symlink, directory or special file: never followed, never removed)
        and ``"busy"`` (a transfer is writing that name right now).
        """
        safe = _managed_name(name)
        directories, basename = split_name(safe)
        with _closing(self._managed_directory(directories, safe)) as dir_fd:
            _require_regular(dir_fd, basename, safe)
            _refuse_busy(dir_fd, basename, safe)
            os.unlink(basename, dir_fd=dir_fd)
            os.fsync(dir_fd)

    def rename(self, old: str, new: str, *, overwrite: bool = False) -> str:
        """Give the published file ``old`` the name ``new`` (created directories as needed).

        Atomic: ``renameat2(RENAME_NOREPLACE)`` where the kernel has it, else a
        hard link (which fails atomically if ``new`` exists) then the removal of
        ``old``; an existing ``new`` is refused (``"exists"``) unless
        ``overwrite``, and then atomically replaced (``os.replace``). Never
        follows a symlink; codes as :meth:`delete`. Returns the new name.
        """
        source = _managed_name(old)
        target = _managed_name(new)
        if source == target:
            raise TransferError(f"{source!r} and {target!r} are the same name", "exists")
        src_dirs, src_base = split_name(source)
        dest_dirs, dest_base = split_name(target)
        with _closing(self._managed_directory(src_dirs, source)) as src_fd:
            _require_regular(src_fd, src_base, source)
            _refuse_busy(src_fd, src_base, source)
            attempt = 0
            while True:
                attempt += 1
                try:
                    dest_fd = self._open_directory(dest_dirs, target, create=True)
                except UnsafePathError as exc:
                    raise TransferError(str(exc), "unsafe_path") from None
                with _closing(dest_fd):
                    try:
                        self._move(src_fd, src_base, dest_fd, dest_base, target, overwrite)
                    except FileNotFoundError:
                        # The target's directory, made empty, was removed by
                        # a pruning (after another delete or rename) between
                        # its opening and the move: make it again.
                        if attempt == _PRUNED_ATTEMPTS or _lstat(src_fd, src_base) is None:
                            raise
                        continue
                    os.fsync(dest_fd)
                    if not os.path.samestat(os.fstat(dest_fd), os.fstat(src_fd)):
                        os.fsync(src_fd)
                    return target

    @staticmethod
    def _move(
        src_fd: int, src_base: str, dest_fd: int, dest_base: str, target: str, overwrite: bool
    ) -> None:
        _refuse_busy(dest_fd, dest_base, target)
        existing = _lstat(dest_fd, dest_base)
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            # Said so: "already exists" read as if --overwrite would do (a
            # review, 2026-12-07); nothing replaces a directory.
            raise TransferError(
                f"{target!r} is a directory: a file is never moved over one", "exists"
            )
        if existing is not None and not overwrite:
            raise TransferError(f"{target!r} already exists", "exists")
        if overwrite:
            os.replace(src_base, dest_base, src_dir_fd=src_fd, dst_dir_fd=dest_fd)
        elif not _move_without_replacing(src_fd, src_base, dest_fd, dest_base):
            raise TransferError(f"{target!r} already exists", "exists")

    def _managed_directory(self, directories: tuple[str, ...], name: str) -> int:
        try:
            return self._open_directory(directories, name, create=False)
        except FileNotFoundError:
            raise TransferError(f"no such file: {name!r}", "not_found") from None
        except UnsafePathError as exc:
            raise TransferError(str(exc), "unsafe_path") from None

    # ----------------------------------------------------------------------- internals

    @contextmanager
    def holding_root(self) -> Iterator[None]:
        """Within: this thread's operations on this root open it once, not once each.

        A small upload's store opens the root four times (the re-run check, the
        partial, the publish, the directory sync), each a path walk from ``/``;
        held, each is a ``dup`` of one descriptor (about a tenth of the worker's
        system-call time per file). The root is resolved once, when the hold
        starts: a root moved meanwhile is not followed until the next hold (as
        an operation that opened it once would not). A missing root is not
        held (nothing is created here). The instance itself stays stateless;
        the hold belongs to the calling thread.
        """
        try:
            fd = self._open_root(create=False, missing_ok=True)
        except UnsafePathError:
            fd = None  # (a confined root that is a link: each operation refuses it)
        if fd is None:
            yield
            return
        previous = getattr(_held, "root", None)
        _held.root = (self, fd)
        try:
            yield
        finally:
            _held.root = previous
            os.close(fd)

    def _forget_hold(self) -> None:
        """Stop using this thread's hold of this root (:meth:`holding_root`) for
        the rest of it: the directory it holds was removed."""
        held: tuple[StorageRoot, int] | None = getattr(_held, "root", None)
        if held is not None and held[0] is self:
            _held.root = None  # (the hold closes its descriptor when it ends)

    def _open_root(self, *, create: bool, missing_ok: bool = False) -> int | None:
        held: tuple[StorageRoot, int] | None = getattr(_held, "root", None)
        if held is not None and held[0] is self:
            return os.dup(held[1])
        if self.confined:
            return self._open_confined(create=create, missing_ok=missing_ok)
        # The root itself may be a symlink: the operator chose it.
        try:
            return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        except FileNotFoundError:
            if create:
                # Created on first use only: an open that succeeds costs no makedirs.
                self.ensure()
                return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
            if missing_ok:
                return None
            raise

    def _open_confined(self, *, create: bool, missing_ok: bool = False) -> int | None:
        """:meth:`_open_root` of a root below another one (see :attr:`confined`):
        the outer root as the operator named it, then each segment below it
        without following a symlink (``UnsafePathError`` for one), created
        when ``create``."""
        segments = self.path.parts[-self.confined :]
        outer = StorageRoot(self.path.parents[self.confined - 1], self.dir_mode, self.file_mode)
        fd = outer._open_root(create=create, missing_ok=missing_ok)
        if fd is None:
            return None
        try:
            return _descend(fd, segments, "/".join(segments), create, self.dir_mode)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise

    def _borrow_directory(self, directories: tuple[str, ...], name: str) -> tuple[int, bool]:
        """The directory that holds ``name`` (never created), and whether the caller closes it.

        For a name at the top of a held root (:meth:`holding_root`) it is the
        held descriptor itself, which the caller must not close: a small file's
        re-run check and directory sync use it as it is, without the ``dup``
        and ``close`` each that :meth:`_open_directory` costs (four system
        calls of a sequential small upload's store). Only for a use that ends
        before the caller returns: a descriptor kept beyond it (a partial's
        directory) is always opened.
        """
        if not directories:
            held: tuple[StorageRoot, int] | None = getattr(_held, "root", None)
            if held is not None and held[0] is self:
                return held[1], False
        return self._open_directory(directories, name, create=False), True

    def _open_directory(self, directories: tuple[str, ...], name: str, *, create: bool) -> int:
        """Descriptor of the directory that holds ``name``; the caller closes it."""
        root_fd = self._open_root(create=create)
        assert root_fd is not None  # missing_ok is False: a missing root raised
        return _descend(root_fd, directories, name, create, self.dir_mode)

    def _stat_partial(self, name: str, transfer_id: str) -> os.stat_result | None:
        safe = safe_relative_name(name)
        tid = check_transfer_id(transfer_id)
        directories, basename = split_name(safe)
        try:
            dir_fd = self._open_directory(directories, safe, create=False)
        except FileNotFoundError:
            return None
        with _closing(dir_fd):
            info = _lstat(dir_fd, partial_basename(basename, tid))
        if info is not None and not stat.S_ISREG(info.st_mode):
            raise UnsafePathError(f"the partial file for {name!r} is not a regular file")
        return info


class PartialFile:
    """A hidden file being received, with a running SHA-256 of its contents.

    Obtained from :meth:`StorageRoot.open_partial`. Writes go at :attr:`offset`
    and are hashed as they are written (one pass, nothing is re-read). Closing
    keeps the file on disk so that the transfer can resume; :meth:`publish`
    makes it visible under its final name and :meth:`discard` deletes it.
    Usable as a context manager, which closes (not discards) on exit.

    From :meth:`StorageRoot.open_one_shot` it may be anonymous (no
    :attr:`partial_name`): closing or discarding it leaves nothing on disk.

    Not thread-safe: one transfer drives one partial file.
    """

    def __init__(
        self,
        root: StorageRoot,
        name: str,
        transfer_id: str,
        dir_fd: int,
        partial_name: str | None,
        fd: int,
    ) -> None:
        """Wrap open descriptors; use :meth:`StorageRoot.open_partial` instead."""
        self._root = root
        self._name = name
        self._transfer_id = transfer_id
        self._dir_fd: int | None = dir_fd
        self._partial_name = partial_name
        self._fd: int | None = fd
        self._hash = hashlib.sha256()
        self._offset = 0
        self._finished = False  # published or discarded: nothing left on disk to manage

    @property
    def root(self) -> StorageRoot:
        """The storage root the file is received into."""
        return self._root

    @property
    def name(self) -> str:
        """The safe relative name this file is being received as."""
        return self._name

    @property
    def transfer_id(self) -> str:
        """The transfer id the partial file belongs to."""
        return self._transfer_id

    @property
    def partial_name(self) -> str | None:
        """Base name of the hidden partial file, in the target's directory (None: anonymous)."""
        return self._partial_name

    @property
    def offset(self) -> int:
        """Bytes written (and hashed) so far; where the next block goes."""
        return self._offset

    @property
    def finished(self) -> bool:
        """Whether the file was published or discarded (nothing of it is left to manage)."""
        return self._finished

    @property
    def closed(self) -> bool:
        """Whether the descriptors have been released."""
        return self._fd is None

    def write_block(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` at :attr:`offset` and add it to the running hash.

        A full disk raises :class:`TransferError` with code ``"no_space"``; the
        offset and hash still match the bytes that did reach the file.
        """
        fd = self._require_open()
        view = memoryview(data).cast("B")
        while view:
            try:
                written = os.pwrite(fd, view, self._offset)
            except OSError as exc:
                raise _translate_write_error(exc, self._name) from exc
            if not written:
                raise _wrote_nothing(len(view), self._name)
            # Hash exactly what reached the file, so a failed write leaves a consistent prefix.
            self._hash.update(view[:written])
            self._offset += written
            view = view[written:]

    def write_chunks(self, chunks: Sequence[bytes | bytearray | memoryview]) -> None:
        """Append ``chunks`` at :attr:`offset`, in order, and add them to the running hash.

        One ``pwritev`` for the batch (no join into one buffer first: that
        copy, made holding the GIL, cost the receiver more than the fifteen
        extra hash updates it saved). Like :meth:`write_block`, a full disk
        raises ``no_space`` with the offset and hash matching what reached the file.
        """
        fd = self._require_open()
        views = [view for view in (memoryview(chunk).cast("B") for chunk in chunks) if view]
        first = 0
        while first < len(views):
            try:
                written = os.pwritev(fd, views[first : first + IOV_MAX], self._offset)
            except OSError as exc:
                raise _translate_write_error(exc, self._name) from exc
            if not written:
                raise _wrote_nothing(sum(map(len, views[first:])), self._name)
            # Hash exactly what reached the file (a short write ends mid-chunk).
            while written:
                view = views[first]
                done = min(written, len(view))
                self._hash.update(view[:done])
                self._offset += done
                written -= done
                if done == len(view):
                    first += 1
                else:
                    views[first] = view[done:]

    def rehash_prefix(self, stop: threading.Event | None = None) -> int:
        """Hash the bytes already in the file, seeding the running hash; return the length.

        Used when resuming. Reads in large blocks, once. If the file changed
        length while being read, it is truncated to what was hashed so that
        offset, hash and contents agree. :class:`Stopped` (the file as it
        was) if ``stop`` is set between two blocks: the transfer was given up.
        """
        fd = self._require_open()
        status = os.fstat(fd)
        size = status.st_size
        # A hash kept when the partial was last closed (or given up part
        # way), if the file is as it was: nothing, or only the rest, to read.
        kept = PREFIX_DIGESTS.take(status)
        position, digest = kept if kept is not None else (0, hashlib.sha256())
        while position < size:
            if stop is not None and stop.is_set():
                PREFIX_DIGESTS.keep(status, position, digest)
                raise Stopped(f"stopped hashing the partial of {self._name!r}")
            block = os.pread(fd, min(_HASH_BLOCK, size - position), position)
            if not block:
                break
            digest.update(block)
            position += len(block)
        if os.fstat(fd).st_size != position:
            os.ftruncate(fd, position)
        self._hash = digest
        self._offset = position
        return position

    def sha256_hex(self) -> str:
        """Hex SHA-256 of everything written so far (the file does not need to be closed)."""
        return self._hash.hexdigest()

    def fsync(self) -> None:
        """Flush the file's data to stable storage."""
        os.fsync(self._require_open())

    def close(self) -> None:
        """Release the descriptors and the lock; the partial file stays for a resume
        (its running hash is kept for it: see :mod:`._prefix_digests`)."""
        fd, dir_fd = self._fd, self._dir_fd
        self._fd = self._dir_fd = None
        if fd is not None:
            if self._partial_name is not None and not self._finished:
                with suppress(OSError):
                    status = os.fstat(fd)
                    if status.st_size == self._offset:
                        PREFIX_DIGESTS.keep(status, self._offset, self._hash.copy())
            os.close(fd)
        if dir_fd is not None:
            os.close(dir_fd)

    def discard(self) -> None:
        """Delete the partial file and close. Harmless to call again.

        Closed whatever happens: a partial the disk will not let go of (a
        directory made read-only, a file system remounted so) is logged and
        left to the sweep of old partials, and its descriptors and lock are
        released all the same (kept, its name stayed "busy" until the server
        restarted). Callers discard on their way out of a failure, which an
        error of the cleanup's own must not replace.
        """
        if self._finished:
            return
        self._finished = True
        partial_name = self._partial_name
        try:
            if partial_name is None:
                pass  # anonymous: the last descriptor's close frees it
            elif self._fd is None:
                self._root.discard_partial(self._name, self._transfer_id)
            else:
                assert self._dir_fd is not None
                if _same_file(self._dir_fd, partial_name, self._fd):
                    _unlink_quietly(self._dir_fd, partial_name)
        except OSError as exc:
            _undeleted_log.warning(
                "undeleted partial",
                "could not delete the partial file of %r (the sweep of old partials will): %s",
                self._name,
                exc,
            )
        finally:
            self.close()

    def publish(
        self,
        final_name: str | None = None,
        *,
        overwrite: bool = False,
        expected_sha256: str | None = None,
        sync_directory: bool = True,
    ) -> str:
        """Make the file visible as ``final_name`` (default: the name it was opened for).

        Returns the relative name actually used, then closes. Steps: compare
        ``expected_sha256`` if given (a mismatch discards the partial and raises
        :class:`ChecksumMismatch`: the bytes are wrong, resuming would not fix
        them), fsync the file, give it its final name, fsync the directory.

        Collision policy (``overwrite=False``): an existing entry is never
        replaced. ``os.link`` either creates the name or fails with ``EEXIST``,
        atomically, so two publishers (threads or processes) can never both get
        one name; on ``EEXIST`` the next of ``stem (1).ext``, ``stem (2).ext``,
        ... is tried (:func:`collision_candidates`, at most 10 000, then
        :class:`TransferError` code ``"name_collision"``; past the first 16 an
        ``lstat`` search finds the next free number, so a crowded name costs
        a few dozen looks, not thousands of links). An existing
        directory or symlink under the name counts as taken. The partial name is
        unlinked after the link succeeds.

        File systems without hard links (FAT, some FUSE and network mounts):
        first ``renameat2(RENAME_NOREPLACE)`` (Linux), which is just as atomic
        and never overwrites. Failing that, the name is reserved with
        ``O_CREAT | O_EXCL`` and then ``os.replace``-d by the partial. That still
        never overwrites a file that existed before and never lets two conduit
        publishers share a name (the reservation is atomic), but for an instant
        the final name is visible as an empty file, and a crash in that instant
        leaves the empty placeholder behind. It is the last resort only.

        With ``overwrite=True`` the file atomically replaces whatever file had
        the name (``os.replace``; a symlink there is replaced, not followed).

        An anonymous file (:meth:`StorageRoot.open_one_shot`) is linked in
        through ``/proc/self/fd`` (``linkat`` with ``AT_SYMLINK_FOLLOW``), with
        the same rules: a link that fails on an existing name for
        ``overwrite=False``; for ``overwrite=True``, a link to a hidden partial
        name first, then ``os.replace`` of that over the target (a crash in
        between leaves a complete hidden partial, which the sweeper removes).

        ``sync_directory=False`` (group commit, see :mod:`._batch_store`) skips
        the directory fsyncs: the file's own bytes are still fsynced before its
        name exists, and the caller must :meth:`StorageRoot.sync_directories`
        before it tells anyone the file is stored.
        """
        fd = self._require_open()
        assert self._dir_fd is not None
        target = self._name if final_name is None else safe_relative_name(final_name)
        if expected_sha256 is not None:
            self._verify(expected_sha256)
        if self._root.file_mode != _PARTIAL_MODE:
            os.fchmod(fd, self._root.file_mode)
        os.fsync(fd)
        directories, basename = split_name(target)
        partial_name = self._partial_name
        if partial_name is None:
            if target == self._name:
                # Into the directory it was created in (a link must stay on
                # its file system); no second walk from the root.
                placed = _place_anonymous(fd, self._dir_fd, basename, self._transfer_id, overwrite)
                if sync_directory:
                    os.fsync(self._dir_fd)
            else:
                with _closing(self._root._open_directory(directories, target, create=True)) as dest:
                    placed = _place_anonymous(fd, dest, basename, self._transfer_id, overwrite)
                    if sync_directory:
                        os.fsync(dest)
            self._finished = True
            self.close()
            return "/".join((*directories, placed))
        if not _same_file(self._dir_fd, partial_name, fd):
            raise TransferError(f"the partial file for {self._name!r} was replaced", "conflict")
        dest_fd = self._root._open_directory(directories, target, create=True)
        with _closing(dest_fd):
            placed = _place(self._dir_fd, partial_name, dest_fd, basename, overwrite)
            if sync_directory:
                os.fsync(dest_fd)
            if sync_directory and not os.path.samestat(os.fstat(dest_fd), os.fstat(self._dir_fd)):
                os.fsync(self._dir_fd)  # the partial's removal lives in another directory
        self._finished = True
        self.close()
        return "/".join((*directories, placed))

    def __enter__(self) -> PartialFile:
        """Return self."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close, keeping the partial file for a resume."""
        self.close()

    def _require_open(self) -> int:
        if self._fd is None:
            raise ValueError(f"partial file for {self._name!r} is closed")
        return self._fd

    def _verify(self, expected_sha256: str) -> None:
        actual = self.sha256_hex()
        if not hmac.compare_digest(actual, expected_sha256.strip().lower()):
            self.discard()
            raise ChecksumMismatch(
                f"{self._name!r}: received bytes hash to {actual}, expected {expected_sha256}"
            )


# --------------------------------------------------------------------------- resolution


@contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _lstat(dir_fd: int, entry: str) -> os.stat_result | None:
    try:
        return os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _descend(fd: int, segments: Iterable[str], name: str, create: bool, mode: int) -> int:
    """The directory ``segments`` below the directory ``fd``, each opened without
    following a symlink (:func:`_open_subdirectory`); ``fd`` is taken (closed
    on the way down, or on failure)."""
    try:
        for segment in segments:
            child = _open_subdirectory(fd, segment, name, create, mode)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_subdirectory(parent: int, segment: str, name: str, create: bool, mode: int) -> int:
    created = False
    if create:
        try:
            os.mkdir(segment, mode, dir_fd=parent)
            created = True
        except FileExistsError:
            pass  # fine if it is a directory; anything else is refused by the open
    try:
        fd = os.open(segment, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such file in storage", name) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        raise _not_a_directory(parent, segment, name, create) from None
    if created:
        os.fsync(parent)  # make the new directory entry durable before files land in it
    return fd


def _not_a_directory(parent: int, segment: str, name: str, create: bool) -> Exception:
    info = _lstat(parent, segment)
    if info is not None and stat.S_ISLNK(info.st_mode):
        return UnsafePathError(
            f"{name!r}: {segment!r} is a symbolic link; links inside the storage are never followed"
        )
    if create:
        return TransferError(f"{name!r}: {segment!r} exists and is not a directory", "conflict")
    return FileNotFoundError(errno.ENOENT, "no such file in storage", name)


def _refuse_special(info: os.stat_result, name: str) -> None:
    mode = info.st_mode
    if stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        raise UnsafePathError(f"{name!r} is a symbolic link; links are never followed")
    if stat.S_ISDIR(mode):
        raise UnsafePathError(f"{name!r} is a directory, not a file")
    raise UnsafePathError(f"{name!r} is not a regular file (device, FIFO or socket)")


def _open_checked(dir_fd: int, entry: str, name: str, flags: int, mode: int = 0o600) -> int:
    """Open ``entry`` with ``flags`` (including O_NOFOLLOW); refuse anything but a regular file."""
    fd, _ = _open_checked_new(dir_fd, entry, name, flags, mode)
    try:
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_checked_new(
    dir_fd: int, entry: str, name: str, flags: int, mode: int = 0o600
) -> tuple[int, bool]:
    """:func:`_open_checked`, and whether ``entry`` was created empty by this open.

    ``O_NONBLOCK`` (in ``flags``: opening a FIFO must not block) is left on
    here: once the descriptor is known to be a regular file it does not apply
    to its reads and writes, and a small upload's partial, written and read in
    one worker-thread call, saves the ``ioctl`` that clears it.
    """
    before = _lstat(dir_fd, entry)
    if before is not None:
        # Refuse devices before opening them: opening alone can have side effects.
        _refuse_special(before, name)
    try:
        fd = os.open(entry, flags, mode, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such file in storage", name) from None
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        raise UnsafePathError(f"{name!r} is not a regular file") from None
    try:
        after = os.fstat(fd)
        _refuse_special(after, name)
        if before is not None and not os.path.samestat(before, after):
            raise UnsafePathError(f"{name!r} changed while it was being opened")
    except BaseException:
        os.close(fd)
        raise
    return fd, before is None and after.st_size == 0


def _open_regular_for_read(dir_fd: int, entry: str, name: str) -> int:
    return _open_checked(dir_fd, entry, name, _READ_FLAGS)


def _open_partial_fd(dir_fd: int, partial_name: str, name: str, *, truncate: bool) -> int:
    fd, created_empty = _open_checked_new(dir_fd, partial_name, name, _PARTIAL_FLAGS, _PARTIAL_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TransferError(f"{name!r} is already being received", "busy") from None
        if truncate and not created_empty:
            # A partial this open created (it was not there a moment before,
            # and was empty once open) has nothing to cut: a new upload's
            # partial, whose name holds a fresh random transfer id, skips it.
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _same_file(dir_fd: int, entry: str, fd: int) -> bool:
    info = _lstat(dir_fd, entry)
    return info is not None and os.path.samestat(info, os.fstat(fd))


def _unlink_quietly(dir_fd: int, entry: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(entry, dir_fd=dir_fd)


def _remove_regular(dir_fd: int, entry: str) -> bool:
    info = _lstat(dir_fd, entry)
    if info is None or not stat.S_ISREG(info.st_mode):
        return False
    # Forgotten first: once unlinked, the inode may be a new partial's.
    PREFIX_DIGESTS.forget(info)
    _unlink_quietly(dir_fd, entry)
    return True


def make_directories(path: Path, mode: int = 0o700) -> None:
    """``os.makedirs(path, mode, exist_ok=True)``, each directory it creates
    made durable (its parent fsynced, as for every directory made below a
    root): a storage root made just before a crash must not vanish with the
    files published into it since."""
    missing = []
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        missing.append(ancestor)
        ancestor = ancestor.parent
    os.makedirs(path, mode=mode, exist_ok=True)
    for created in reversed(missing):
        parent = os.open(created.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(parent)
        finally:
            os.close(parent)


#: Buffers per ``pwritev`` or ``readv`` call (Linux's IOV_MAX is 1024: more
#: is EINVAL).
IOV_MAX = 512


def _wrote_nothing(size: int, name: str) -> OSError:
    # A write that takes none of its bytes and reports no error (a file system
    # in user space may): trying again would spin for ever, in a thread a
    # shielded settle waits for.
    return OSError(errno.EIO, f"the file system took none of {size} bytes written to {name!r}")


def _translate_write_error(exc: OSError, name: str) -> Exception:
    if exc.errno in _FULL_DISK_ERRNOS:
        return TransferError(f"not enough disk space to receive {name!r}", "no_space")
    if exc.errno == errno.EFBIG:
        return TransferError(f"{name!r} is larger than the file system allows", "too_large")
    return exc


# --------------------------------------------------------------------------- publishing


def _place(src_dir: int, src: str, dest_dir: int, basename: str, overwrite: bool) -> str:
    """Give the partial ``src`` the name ``basename`` (or a collision variant); return it."""
    if overwrite:
        try:
            os.replace(src, basename, src_dir_fd=src_dir, dst_dir_fd=dest_dir)
        except IsADirectoryError:
            raise TransferError(f"{basename!r} is a directory", "conflict") from None
        return basename
    # Lazily: the alternatives are only built as far as they are needed.
    for candidate in itertools.chain([basename], _free_names(dest_dir, basename)):
        if _place_without_replacing(src_dir, src, dest_dir, candidate):
            return candidate
    raise TransferError(f"no free name for {basename!r}", "name_collision")


def _place_anonymous(
    fd: int, dest_dir: int, basename: str, transfer_id: str, overwrite: bool
) -> str:
    """Give the anonymous file ``fd`` the name ``basename`` (or a collision variant); return it."""
    # linkat(AT_FDCWD, "/proc/self/fd/N", dest_dir, name, AT_SYMLINK_FOLLOW):
    # the magic link resolves to the open file itself, which an O_TMPFILE
    # file opened without O_EXCL may be linked from.
    source = f"{_PROC_FD}{fd}"
    if overwrite:
        temporary = partial_basename(basename, transfer_id)
        _link_anonymous(source, dest_dir, temporary)
        try:
            os.replace(temporary, basename, src_dir_fd=dest_dir, dst_dir_fd=dest_dir)
        except IsADirectoryError:
            _unlink_quietly(dest_dir, temporary)
            raise TransferError(f"{basename!r} is a directory", "conflict") from None
        except BaseException:
            _unlink_quietly(dest_dir, temporary)
            raise
        return basename
    for candidate in itertools.chain([basename], _free_names(dest_dir, basename)):
        try:
            _link_anonymous(source, dest_dir, candidate)
        except FileExistsError:
            continue
        return candidate
    raise TransferError(f"no free name for {basename!r}", "name_collision")


def _free_names(dest_dir: int, basename: str) -> Iterator[str]:
    """``basename``'s collision variants in ``dest_dir``, the search led by an ``lstat`` each."""
    return collision_candidates(basename, lambda name: _lstat(dest_dir, name) is not None)


def _link_anonymous(source: str, dest_dir: int, name: str) -> None:
    """``linkat`` of an anonymous file; a refusal of the mechanism itself turns it off."""
    global _TMPFILE_FLAGS
    try:
        os.link(source, name, dst_dir_fd=dest_dir, follow_symlinks=True)
    except OSError as exc:
        if exc.errno in _NO_PROC_LINK_ERRNOS and _TMPFILE_FLAGS is not None:
            # A /proc that cannot be linked from (a sandbox, a restricted
            # mount): this file fails, and later ones use named partials.
            _TMPFILE_FLAGS = None
            log.warning("anonymous files cannot be linked here (%s): named partials from now", exc)
        raise


def _place_without_replacing(src_dir: int, src: str, dest_dir: int, candidate: str) -> bool:
    """True if ``src`` now also/instead lives at ``candidate``; False if the name is taken."""
    try:
        os.link(src, candidate, src_dir_fd=src_dir, dst_dir_fd=dest_dir, follow_symlinks=False)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARDLINK_ERRNOS:
            raise
        return _rename_without_replacing(src_dir, src, dest_dir, candidate)
    # Published; a failure to remove the partial name leaves only a hidden second
    # link to the same bytes, which cleanup_stale_partials removes later.
    with suppress(OSError):
        os.unlink(src, dir_fd=src_dir)
    return True


def _rename_without_replacing(src_dir: int, src: str, dest_dir: int, candidate: str) -> bool:
    renamed = _renameat2_noreplace(src_dir, src, dest_dir, candidate)
    if renamed is not None:
        return renamed
    return _reserve_and_replace(src_dir, src, dest_dir, candidate)


def _reserve_and_replace(src_dir: int, src: str, dest_dir: int, candidate: str) -> bool:
    # Last resort, see PartialFile.publish: O_EXCL reserves the name atomically.
    try:
        os.close(os.open(candidate, _PLACEHOLDER_FLAGS, _PARTIAL_MODE, dir_fd=dest_dir))
    except FileExistsError:
        return False
    try:
        os.replace(src, candidate, src_dir_fd=src_dir, dst_dir_fd=dest_dir)
    except BaseException:
        _unlink_quietly(dest_dir, candidate)
        raise
    return True


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    function = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_renameat2: Callable[..., int] | None = _load_renameat2()


def _renameat2_noreplace(src_dir: int, src: str, dest_dir: int, candidate: str) -> bool | None:
    """True if renamed, False if the name is taken, None if unsupported here."""
    function = _renameat2
    if function is None:
        return None
    result = function(
        src_dir, os.fsencode(src), dest_dir, os.fsencode(candidate), _RENAME_NOREPLACE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        return False
    if code in _NO_RENAMEAT2_ERRNOS:
        return None
    raise OSError(code, os.strerror(code), candidate)


# --------------------------------------------------------------------------- managing


def _managed_name(name: str) -> str:
    try:
        return safe_relative_name(name)
    except UnsafePathError as exc:
        raise TransferError(str(exc), "unsafe_path") from None


def sha256_of_fd(fd: int, size: int) -> tuple[str, int]:
    """SHA-256 hex of the first ``size`` bytes of ``fd`` by ``pread``, and how many were read."""
    digest = hashlib.sha256()
    position = 0
    while position < size:
        block = os.pread(fd, min(_HASH_BLOCK, size - position), position)
        if not block:
            break
        digest.update(block)
        position += len(block)
    return digest.hexdigest(), position


def _hash_fd(fd: int, size: int) -> str:
    return sha256_of_fd(fd, size)[0]


def _require_regular(dir_fd: int, entry: str, name: str) -> None:
    info = _lstat(dir_fd, entry)
    if info is None:
        raise TransferError(f"no such file: {name!r}", "not_found")
    if not stat.S_ISREG(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise TransferError(f"{name!r} is {kind}; refused", "unsafe_path")


def _refuse_busy(dir_fd: int, basename: str, name: str) -> None:
    """Refuse (``"busy"``) if a transfer holds the lock of a partial file for ``basename``.

    The file system is the registry: every partial file being written is
    ``flock``-ed by its writer (in this process or another), so a partial that
    will become ``basename`` and cannot be locked is in use.
    """
    suffixes = ("-" + basename, "~" + hashlib.sha256(basename.encode("utf-8")).hexdigest()[:16])
    with os.scandir(dir_fd) as iterator:
        candidates = [
            entry.name
            for entry in iterator
            # (the suffix test first: cheap, and false for nearly every entry)
            if entry.name.endswith(suffixes) and _partial_id(entry.name, basename) is not None
        ]
    for candidate in candidates:
        try:
            fd = os.open(candidate, _READ_FLAGS, dir_fd=dir_fd)
        except OSError:
            continue  # gone, or not a file we would open
        with _closing(fd):
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TransferError(f"{name!r} is being written; try again later", "busy") from None


def _move_without_replacing(src_dir: int, src: str, dest_dir: int, candidate: str) -> bool:
    """Rename ``src`` to ``candidate`` unless it exists; False if it does."""
    renamed = _renameat2_noreplace(src_dir, src, dest_dir, candidate)
    if renamed is not None:
        return renamed
    try:
        os.link(src, candidate, src_dir_fd=src_dir, dst_dir_fd=dest_dir, follow_symlinks=False)
    except FileExistsError:
        return False
    os.unlink(src, dir_fd=src_dir)
    return True


# --------------------------------------------------------------------------- walking


_Walk = Generator[tuple[int, os.DirEntry[str], str], None, None]


#: How deep the walks that find partial files go below the storage directory:
#: an account's root (at most 128 segments, the 255 characters of
#: ``accounts.MAX_ROOT``) and then a name of up to :data:`MAX_DEPTH` segments.
#: At MAX_DEPTH alone, a user's deepest partials were never found after a
#: restart: never expired, counted or evicted.
_PARTIAL_WALK_DEPTH: Final = 128 + MAX_DEPTH


def _walk_tree(root_fd: int, max_depth: int = MAX_DEPTH, prefix: tuple[str, ...] = ()) -> _Walk:
    """Yield (directory fd, entry, relative name) for the entries below ``root_fd``,
    whose own name is ``prefix``.

    In the order each directory gives its entries, a directory's
    subdirectories after its reading has ended: the walks that visit every
    entry need no other order, and so hold the names of a directory's
    subdirectories, not all its entries (the quota's count of a directory of
    150,000 files, read whole and sorted, held 120 MB until 2026-12-08), and
    one open directory per level (two descriptors while it is read). Hidden
    entries are yielded (cleanup needs the partial files) but hidden
    directories are not entered, nor are symlinks, nor directories past
    ``max_depth`` segments. A directory that is replaced while the walk runs
    is skipped, not followed; one that cannot be opened for another reason
    (no descriptor left) raises, rather than go uncounted.
    """
    base = "/".join(prefix) + "/" if prefix else ""
    below: list[str] = []
    with os.scandir(root_fd) as iterator:
        for entry in iterator:
            yield root_fd, entry, base + entry.name
            if entry.name.startswith(".") or len(prefix) + 1 >= max_depth:
                continue
            with suppress(OSError):  # gone since the scan: nothing below it to walk
                if entry.is_dir(follow_symlinks=False):
                    below.append(entry.name)
    for name in below:
        child = _open_walked_directory(root_fd, name)
        if child is not None:
            with _closing(child):
                yield from _walk_tree(child, max_depth, (*prefix, name))


def _open_walked_directory(dir_fd: int, name: str) -> int | None:
    """The directory a walk found, opened; None if it is gone, or no longer a
    directory (a symlink, which is never followed, or a file), or unreadable.

    Any other failure raises (no descriptor left, an I/O error): a walk that
    went on without the directory would count or list the tree short.
    """
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _WALK_SKIPPED_ERRNOS:
            return None
        raise


#: Why a directory a walk found may not open, and is passed over.
_WALK_SKIPPED_ERRNOS: Final = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.EPERM}
)


def _walk_key(entry: os.DirEntry[str]) -> str:
    """What orders a directory's children so that a listing's walk yields relative names in
    name order: a directory ``a`` sorts as ``a/``, as every name below it starts
    (``a-z.txt``, then ``a/b``, then ``a0``)."""
    try:
        return entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name
    except OSError:
        return entry.name


def _walk_directory(
    dir_fd: int,
    prefix: tuple[str, ...],
    after: str | None = None,
    slice_size: int = _LISTING_SLICE,
) -> _Walk:
    """Yield (directory fd, entry, relative name) below ``dir_fd``, whose own name is
    ``prefix``, in name order; with ``after``, only the entries named after it
    (a directory all of whose names come before it is not even read).

    A slice of a directory's children is held at once (the first by name of
    those not yet walked: ``slice_size`` of them, and a slice smaller than
    :data:`_LISTING_SLICE_GROWN` doubles at each new reading, up to it), and
    a directory with more is read again for the next ones: a listing's
    memory stays bounded by the slice and the depth (:data:`MAX_DEPTH`)
    whatever a directory holds (150,000 files in one, read whole and sorted,
    held 30 MB for a page of two, until 2026-12-08).
    """
    base = "/".join(prefix) + "/" if prefix else ""
    rest = None  # ``after`` as named from this directory
    if after is not None:
        if not after.startswith(base):  # (only ever a listing's prefix)
            if after > base:
                return  # every name below comes before ``after``
        else:
            rest = after[len(base) :]
    walked: str | None = None  # the key of the last child walked
    most = slice_size
    while True:
        children = _children(dir_fd, rest, walked, most)
        for key, entry in children:
            yield dir_fd, entry, base + entry.name
            if len(prefix) + 1 >= MAX_DEPTH or not key.endswith("/"):
                continue
            child = _open_walked_directory(dir_fd, entry.name)
            if child is None:
                continue
            # ``after`` goes on below only if it lies there: else every name
            # below comes after it.
            below = after if rest is not None and rest.startswith(key) else None
            with _closing(child):
                yield from _walk_directory(child, (*prefix, entry.name), below, slice_size)
        if len(children) < most:
            return
        walked = children[-1][0]
        most = max(most, min(most * 2, _LISTING_SLICE_GROWN))


def _children(
    dir_fd: int, after: str | None, walked: str | None, most: int
) -> list[tuple[str, os.DirEntry[str]]]:
    """The children of the directory ``dir_fd`` a listing still has to walk,
    with their :func:`_walk_key`, in key order: files and directories, not
    hidden, whose key comes after ``walked``, and that are named after
    ``after`` (named from this directory) or are a directory ``after`` lies
    below; the first ``most`` of them.

    What a listing never shows (hidden names, symlinks, special files) is
    left out here, before the slice is cut: 20,000 hidden files ahead of a
    page's first file took 79 readings of their directory when they filled
    the slices.
    """
    with os.scandir(dir_fd) as iterator:
        keyed: Iterator[tuple[str, os.DirEntry[str]]] = (
            (_walk_key(entry), entry) for entry in iterator if _may_list(entry)
        )
        if walked is not None:
            keyed = (child for child in keyed if child[0] > walked)
        if after is not None:
            keyed = (
                (key, entry)
                for key, entry in keyed
                if key > after or (key.endswith("/") and after.startswith(key))
            )
        # (Keys are unique, as names are: entries themselves are never compared.)
        first = list(itertools.islice(keyed, most))
        past = next(keyed, None)
        if past is None:  # the directory fits the slice (most do): a plain sort
            first.sort()
            return first
        return heapq.nsmallest(most, itertools.chain(first, (past,), keyed))


def _may_list(entry: os.DirEntry[str]) -> bool:
    """Whether a listing's walk may show ``entry`` or something below it: a
    directory or a regular file (never followed through a link), not hidden."""
    if entry.name.startswith("."):
        return False
    try:
        return entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)
    except OSError:
        return False  # gone since the scan


def _listing_entry(entry: os.DirEntry[str], relative: str) -> FileEntry | None:
    """The listing row for ``entry`` (one :func:`_may_list` let through), or None
    if it must not be listed: a directory, or a name not downloadable as it is."""
    if not entry.is_file(follow_symlinks=False):
        return None
    try:
        if safe_relative_name(relative) != relative:
            return None  # not downloadable under exactly this name
        info = entry.stat(follow_symlinks=False)
    except (UnsafePathError, FileNotFoundError):
        return None
    return FileEntry(relative, info.st_size, info.st_mtime)


def _is_stale_partial(entry: os.DirEntry[str], cutoff: float) -> bool:
    if not is_partial_name(entry.name) or not entry.is_file(follow_symlinks=False):
        return False
    try:
        return entry.stat(follow_symlinks=False).st_mtime < cutoff
    except FileNotFoundError:
        return False


def _partial_id(entry: str, basename: str) -> str | None:
    """The transfer id under which ``entry`` is the partial file of ``basename``, if it is one.

    Transfer ids may contain ``-``, which also separates the id from the base
    name: ``.conduit-partial-K-x-b.bin`` reads as ``x-b.bin``'s partial under
    id ``K`` and as ``b.bin``'s under ``K-x``. The ids conduit makes never
    contain one (hex digits, and a download's ``dl_``), so the first ``-``
    ends the id, and the entry counts only if :func:`partial_basename` gives
    it back exactly (the long names' shortened form included): deleting
    ``b.bin`` is not refused as busy while ``x-b.bin`` is being received.
    """
    if not is_partial_name(entry):
        return None
    rest = entry[len(PARTIAL_PREFIX) :]
    transfer_id = rest[: rest.find("-")]
    if not transfer_id or partial_basename(basename, transfer_id) != entry:
        return None
    try:
        return check_transfer_id(transfer_id)
    except UnsafePathError:
        return None


def _is_partial_of(entry: str, basename: str, like_id: str) -> bool:
    """Whether ``entry`` is the partial file of ``basename`` under an id of ``like_id``'s kind.

    Ids of one kind have one length (a download's is ``"dl_"`` and 32 hex
    digits), and the prefix tells a download's from an upload's or a push's
    (32 hex digits).
    """
    transfer_id = _partial_id(entry, basename)
    return (
        transfer_id is not None
        and len(transfer_id) == len(like_id)
        and transfer_id.startswith(DOWNLOAD_ID_PREFIX) == like_id.startswith(DOWNLOAD_ID_PREFIX)
    )


#: A download's partial id, for its length: every download's has this one.
_SOME_DOWNLOAD_ID = DOWNLOAD_ID_PREFIX + "0" * 32
#: Where the part of a download's partial name after its id begins.
_DOWNLOAD_HEAD = len(PARTIAL_PREFIX) + len(_SOME_DOWNLOAD_ID)


def _download_partial_of(tails: dict[str, str]) -> Callable[[str], bool]:
    """Whether an entry is a download's partial of one of the base names of
    ``tails`` (the part of such a partial's name after its id → base name)."""

    def is_one(entry: str) -> bool:
        if not entry.startswith(PARTIAL_PREFIX + DOWNLOAD_ID_PREFIX):
            return False
        listed = tails.get(entry[_DOWNLOAD_HEAD:])
        return listed is not None and _is_partial_of(entry, listed, _SOME_DOWNLOAD_ID)

    return is_one


def _remove_if_idle(dir_fd: int, entry: str) -> bool:
    """Unlink a partial file unless a transfer holds its lock."""
    try:
        fd = _open_checked(dir_fd, entry, entry, _READ_FLAGS)
    except (OSError, UnsafePathError):
        return False  # vanished or not a regular file any more
    with _closing(fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # an active transfer is writing it
        if not _same_file(dir_fd, entry, fd):
            return False
        _unlink_quietly(dir_fd, entry)
        PREFIX_DIGESTS.forget(os.fstat(fd))
    return True
