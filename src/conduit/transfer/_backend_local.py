"""The local directory behind the storage seam (:mod:`._backend`): the default store.

Every operation is what the receiver, sender and manager did before the seam
existed, unchanged: a :class:`._storage.StorageRoot` per user (fd-based
confinement, never a symlink followed, fsync before a link that never
overwrites), the :class:`._space.DiskBudget` (reservations, quotas, partial
ownership and expiry), the :class:`._hashing.HashGate` (cached ``pread``
hashing for ``file_stat(sha256=True)`` and re-run checks) and the batch
store's group commit (:mod:`._batch_store`), on a thread pool of its own.
Each call is one worker-thread hop, as before.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .. import _threads
from .._stored_errors import detached
from ..errors import RPCError, TransferError, UnsafePathError
from ._backend import Admitted, LocalSink, Opened, SmallRead
from ._batch_store import Entry, store_batch
from ._engine import FileSource
from ._hashing import HashGate
from ._local import read_small
from ._names import safe_relative_name
from ._rationed import RationedThreads
from ._rerun import find_already_there, same_size_exists, skipped_result
from ._space import Admission, BudgetSettings, DiskBudget, user_storage
from ._storage import FileEntry, StorageRoot
from ._wire import as_rpc_error

#: Worker threads storing batches of small files, all connections together.
STORE_THREADS = 2
#: Worker threads walking the tree for ``file_list``, all connections together.
LIST_THREADS = 2
#: Worker threads deleting and renaming files, all connections together.
CHANGE_THREADS = 2

#: Seconds the Trio thread may wait inline for a small file's store, or a
#: short batch's (see :meth:`.._worker_hop.WorkerHop.run`): the loop stalls at most this long per
#: store. A store on tmpfs or a fast disk takes 0.1-0.3 ms in the worker, and
#: waiting for it on a lock instead of through the loop cut the Trio thread's
#: CPU per sequential upload by about a quarter (docs/benchmark-journal.md). At 0.5 ms,
#: 2-4 % of tmpfs stores outlasted the wait at load 4 on two cores; at 1 ms,
#: almost none. Stores whose fsyncs take milliseconds outlast it twice in a
#: row, and the hop then waits through the loop for
#: :data:`.._worker_hop.INLINE_BACKOFF` seconds. A short batch (see
#: :func:`_inline_kind`) is waited for the same way; each number of files
#: keeps its own record of misses, so lone files stored in time do not
#: excuse batches that keep outlasting the wait.
STORE_WAIT_INLINE = 0.001

#: The most files a batch may have for its store to be waited for inline too
#: (as eight sends in flight put theirs in one, see :mod:`._small`): eight of
#: 4 KiB take about 0.35 ms in the worker on tmpfs, well within
#: :data:`STORE_WAIT_INLINE`, and 45-50 µs less of the server's CPU per call
#: than through the loop (2 and 8 files, 2026-12-06). A directory's batches
#: (up to 64 files, ~3 ms) would outlast the wait every time, stalling the
#: loop for nothing: they are waited for through the loop.
INLINE_BATCH_FILES = 8
#: And the most bytes its files may hold together (small files go up to 256
#: KiB each: eight of those are no short store).
INLINE_BATCH_BYTES = 64 * 1024


def _inline_kind(entries: list[Entry]) -> int | None:
    """The kind of inline wait a store of ``entries`` gets (its number of
    files), or None when it is waited for through the loop."""
    count = len(entries)
    if count == 1:
        return 1  # a lone file of any small size, as before batches waited inline
    if count <= INLINE_BATCH_FILES and sum(len(e.data) for e in entries) <= INLINE_BATCH_BYTES:
        return count
    return None


if TYPE_CHECKING:
    from .._peer import Peer
    from ..cluster.s3 import S3Store

__all__ = ["LocalBackend"]


class LocalSettings(BudgetSettings, Protocol):
    """The handler settings the local store reads at each use."""

    hash_gate: HashGate


def read_files(storage: StorageRoot, names: list[str], limit: int, room: int) -> list[SmallRead]:
    """:meth:`LocalBackend.read_small_files` in a worker thread: the root opened once."""
    reads = []
    used = 0
    with storage.holding_root():
        for name in names:
            try:
                read = read_whole(storage, name, min(limit, room - used))
            except (OSError, UnsafePathError, TransferError) as exc:
                # Detached: kept in ``reads``, which this frame (in its traceback) holds.
                read = SmallRead(0, 0, None, detached(_as_stat_would(storage, name, exc)))
            if read.small is not None:
                used += read.size
            reads.append(read)
    return reads


def _as_stat_would(storage: StorageRoot, name: str, exc: Exception) -> Exception:
    """A directory refused as not a file is ``is_directory``, as :meth:`LocalBackend.stat`
    says it."""
    if isinstance(exc, UnsafePathError) and _is_directory(storage, name):
        return RPCError(f"{name!r} is a directory", "is_directory")
    return exc


def read_whole(storage: StorageRoot, name: str, max_size: int) -> SmallRead:
    """One file of :func:`read_files`: its bytes if it has at most ``max_size``.

    A file whose size, modification or change time moved while it was read
    is not returned (``small`` None) rather than read again: the per-file
    path sends it, with its own checks.
    """
    file, size = storage.open_for_read(name)
    with file:
        fd = file.fileno()
        before = os.fstat(fd)
        if size > max_size:
            return SmallRead(size, before.st_mtime_ns, None)
        small = read_small(fd, size)
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
            before.st_size,
            before.st_mtime_ns,
            before.st_ctime_ns,
        ):
            small = None
        return SmallRead(size, before.st_mtime_ns, small)


class LocalBackend:
    """:class:`._backend.Backend` on the handler's storage directory."""

    def __init__(self, settings: LocalSettings) -> None:
        """Serve ``settings.storage`` (read at each use, as the handler's other settings)."""
        self._settings = settings
        #: A local directory cannot stage pushes for other nodes.
        self.cluster_staging: S3Store | None = None
        # Reservations, quotas, partial ownership and expiry (see ._space).
        self.budget = DiskBudget(settings)
        # One call at a time per connection on each pool, owners (users, or
        # hosts) in turn when its threads are all busy: a number of
        # connections buys no bigger share of them.
        # Small files' stores: one batch at a time, on threads
        # of their own. On the hash gate's, they waited behind the whole-file
        # hashes any peer can ask for in a loop (seconds for a large file);
        # their own re-run hashing reads only same-size files, small ones.
        self._stores = RationedThreads("stores", STORE_THREADS)
        # Listings: one walk at a time, on threads of their
        # own. On Trio's default pool, two connections looping file_list over
        # a tree of many directories held its threads and everyone's
        # file_stat and downloads waited seconds.
        self._listings = RationedThreads("listing", LIST_THREADS)
        # Deletes and renames: one at a time, on threads of
        # their own. Each scans its directory (for a partial being written)
        # and fsyncs it: on Trio's default pool, one connection keeping many
        # in flight over a large directory held its threads, and everyone's
        # file_stat and downloads waited.
        self._changes = RationedThreads("changes", CHANGE_THREADS)

    def root_for(self, peer: Peer | None) -> StorageRoot:
        """The root ``peer`` sees: its user's root in accounts mode, else the storage."""
        return user_storage(self._settings.storage, peer)[0]

    def location_of(self, peer: Peer | None, name: str) -> str:
        """The absolute path of ``name`` in ``peer``'s root."""
        # A string join, not ``Path / name``: this runs once per stored small
        # file, and the Path parse costs more than the join.
        return os.path.join(self.root_for(peer).path, name)

    # ------------------------------------------------------------------ uploads

    async def rerun_answer(
        self, peer: Peer, name: str, size: int, sha256: str
    ) -> dict[str, Any] | None:
        """See :meth:`._backend.Backend.rerun_answer` (hashing within the hash gate)."""
        storage = self.root_for(peer)
        overwrite = self._settings.overwrite
        if not await same_size_exists(storage, name, size, overwrite=overwrite):
            return None
        if not sha256:
            return {"check_sha256": True}
        stored = await find_already_there(
            storage,
            name,
            size,
            sha256,
            (self._settings.hash_gate, peer),
            overwrite=overwrite,
        )
        return None if stored is None else skipped_result(stored, size, sha256)

    async def admit(self, peer: Peer, name: str, size: int, key: str, *, restart: bool) -> Admitted:
        """See :meth:`._backend.Backend.admit` (the disk budget's rules)."""
        admission = await self.budget.admit(peer, name, size, key, restart=restart)
        assert admission.partial is not None
        return Admitted(LocalSink(admission.partial), admission)

    async def release(self, admitted: Admitted) -> None:
        """See :meth:`._backend.Backend.release`."""
        admission: Admission = admitted.ticket
        await self.budget.release(admission)

    async def forget_partial(self, peer: Peer, name: str, key: str) -> None:
        """See :meth:`._backend.Backend.forget_partial`."""
        await self.budget.forget_partial(peer, name, key)

    async def store_small(self, peer: Peer, entries: list[Entry]) -> None:
        """All of ``entries`` in one worker-thread hop, one fsync pass (:mod:`._batch_store`)."""
        try:
            admitter = await self.budget.one_shot(peer)
        except Exception as exc:
            raise as_rpc_error(exc) from None
        digest_of_fd = self._settings.hash_gate.digest_of_fd  # the cache, not its threads
        overwrite = self._settings.overwrite
        try:
            kind = _inline_kind(entries)
            await self._stores.run(
                peer,
                lambda: store_batch(entries, admitter, overwrite, digest_of_fd),
                wait_inline=0.0 if kind is None else STORE_WAIT_INLINE,
                inline_kind=kind,
            )
        finally:
            admitter.finished()

    # ------------------------------------------------------------------ reads

    async def list_files(
        self, peer: Peer | None, *, max_entries: int, prefix: str | None, after: str | None = None
    ) -> list[dict[str, Any]]:
        """See :meth:`._backend.Backend.list_files`."""
        storage = self.root_for(peer)

        def walk() -> list[FileEntry]:
            return storage.list_files(max_entries=max_entries, prefix=prefix, after=after)

        if peer is None:  # the application's own call: no connection to ration
            entries = await _threads.run_sync(walk)
        else:
            entries = await self._listings.run(peer, walk)
        return [{"name": e.name, "size": e.size, "modified": e.modified} for e in entries]

    async def stat(self, peer: Peer, name: str, *, sha256: bool) -> dict[str, Any]:
        """See :meth:`._backend.Backend.stat` (``sha256``: cached, within the hash gate)."""
        storage = self.root_for(peer)
        try:
            file, size = await _threads.run_sync(storage.open_for_read, name)
        except Exception as exc:
            if await _threads.run_sync(_is_directory, storage, name):
                raise RPCError(f"{name!r} is a directory", "is_directory") from None
            raise as_rpc_error(exc, name=name) from None
        with file:
            info = os.fstat(file.fileno())
            answer: dict[str, Any] = {
                "name": safe_relative_name(name),
                "size": size,
                "modified_ns": info.st_mtime_ns,
            }
            if sha256:
                # Within the owner's hashing share, cached: not on the default
                # thread pool, where a loop of these would starve others.
                gate = self._settings.hash_gate
                answer["sha256"] = await gate.run(
                    peer, lambda: gate.digest_of_fd(file.fileno(), size)
                )
        return answer

    async def open_source(self, peer: Peer, name: str) -> Opened:
        """See :meth:`._backend.Backend.open_source` (an open descriptor, read in threads)."""
        file, size = await _threads.run_sync(self.root_for(peer).open_for_read, name)
        info = os.fstat(file.fileno())
        return Opened(FileSource(file, info), size, info.st_mtime_ns)

    async def read_small_files(
        self, peer: Peer, names: list[str], limit: int, room: int, threads: trio.CapacityLimiter
    ) -> list[SmallRead]:
        """See :meth:`._backend.Backend.read_small_files`: one worker-thread hop for
        them all (:func:`read_files`)."""
        storage = self.root_for(peer)
        async with threads:
            return await _threads.run_sync(read_files, storage, names, limit, room)

    # ------------------------------------------------------------------ changes

    async def delete(self, peer: Peer, name: str) -> None:
        """See :meth:`._backend.Backend.delete` (see :meth:`StorageRoot.delete`).

        The directories the file leaves empty go with it.
        """
        storage, prefix = user_storage(self._settings.storage, peer)

        def delete() -> None:
            storage.delete(name)
            self.budget.prune_after_removal(prefix, name)

        await self._changes.run(peer, delete)

    async def rename(self, peer: Peer, old: str, new: str, *, overwrite: bool) -> str:
        """See :meth:`._backend.Backend.rename` (see :meth:`StorageRoot.rename`).

        The directories the file leaves empty go, and so do those made for
        ``new`` by a rename that then failed (its file deleted meanwhile, say):
        otherwise each such try would leave directories no quota counts. A
        quota user's rename that would make directories is first admitted
        against the quota (:meth:`DiskBudget.admit_rename`): refused with
        ``quota_exceeded``, it makes nothing.
        """
        storage, prefix = user_storage(self._settings.storage, peer)
        account = getattr(peer, "account", None)
        quota = None if account is None else account.quota

        def rename() -> str:
            if quota is not None:
                self.budget.admit_rename(storage, prefix, new, quota)
            try:
                renamed = storage.rename(old, new, overwrite=overwrite)
            except (TransferError, OSError):
                with contextlib.suppress(UnsafePathError):  # a refused name made nothing
                    self.budget.prune_after_removal(prefix, new)
                raise
            self.budget.prune_after_removal(prefix, old, moved_to=renamed)
            return renamed

        return await self._changes.run(peer, rename)


def _is_directory(storage: StorageRoot, name: str) -> bool:
    try:
        return storage.is_directory(name)
    except UnsafePathError:
        return False
