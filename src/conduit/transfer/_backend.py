"""The storage seam of the transfer handler: what the server side asks of where files live.

``FileTransferHandler`` picks one :class:`Backend` when it is built and the
receiver, sender and manager only ever talk to it:

* :class:`._backend_local.LocalBackend` -- a local directory (the default):
  the fd-based :class:`._storage.StorageRoot`, fsync, the disk budget
  (:mod:`._space`), the hash gate's cached ``pread`` hashing, the batch
  store's group commit. It is the code that ran before the seam existed,
  moved behind it unchanged, so the local store keeps every guarantee and
  its speed;
* :class:`._backend_store.StoreBackend` -- any
  :class:`conduit.cluster.store.Store` (``storage_dir="s3://BUCKET/PREFIX"``:
  :class:`conduit.cluster.s3.S3Store`), through that async protocol only.

The seam is at the depth of the handler's operations (admit an upload, list,
stat, open for a download, delete, rename) rather than of single file
operations, because that is where the two differ: the local store decides
space and ownership with one lock around its directory, an object store with
conditional writes. Below the seam, bytes move through two small interfaces
shared by both: a :class:`Sink` (a partial being received) and a
:class:`Source` (a stored file being sent); the engine (:mod:`._engine`)
streams into and out of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from .. import _threads
from ..protocol.connection import Buffer
from ._engine import BlockReader, BlockWriter
from ._local import SmallFile
from ._storage import PartialFile

if TYPE_CHECKING:
    from .._peer import Peer
    from ..cluster.s3 import S3Store
    from ._batch_store import Entry

__all__ = ["Admitted", "Backend", "LocalSink", "Sink", "SmallRead", "Source"]


class Sink(BlockWriter, Protocol):
    """A file being received: write, then publish (or close to resume later, or discard)."""

    def sha256_hex(self) -> str:
        """Hex SHA-256 of the bytes accepted so far."""
        ...

    async def publish(self, *, overwrite: bool, expected_sha256: str) -> str:
        """Verify, make durable and visible without overwriting; the relative name used.

        A wrong ``expected_sha256`` discards the partial and raises ``ChecksumMismatch``.
        """
        ...

    async def close(self) -> None:
        """Stop writing and keep what is durable, for a resume."""
        ...

    async def discard(self) -> None:
        """Delete the partial (harmless after :meth:`close` or twice)."""
        ...

    def location_of(self, name: str) -> str:
        """Where the published ``name`` lives (a path or a URL), for callbacks and logs."""
        ...


class Source(BlockReader, Protocol):
    """A stored file opened to be sent (a download served, or a local file uploaded)."""

    async def hash_prefix(self, length: int, limiter: trio.CapacityLimiter | None) -> Any:
        """Hash the next ``length`` bytes; the hasher (``TransferError`` if it is shorter)."""
        ...

    async def seek(self, position: int) -> None:
        """Continue reading from byte ``position``."""
        ...

    async def aclose(self) -> None:
        """Release the file or connection."""
        ...


@attrs.define(eq=False)
class Admitted:
    """An upload a backend accepted: the partial to receive into, and the backend's ticket."""

    sink: Sink
    #: The backend's own record of the admission (its reservation), given back to release.
    ticket: Any


@attrs.frozen
class Opened:
    """A stored file opened for a download: where to read it, and what it is."""

    source: Source
    size: int
    modified_ns: int


@attrs.frozen
class SmallRead:
    """A stored file read whole for a download batch (:meth:`Backend.read_small_files`)."""

    size: int
    modified_ns: int
    #: Its bytes and their SHA-256; None when it is larger than there was room
    #: for, it changed while it was read (the per-file path then sends it), or
    #: it could not be opened.
    small: SmallFile | None
    #: Why it could not be opened or read (a missing file, an unsafe name, ...).
    error: Exception | None = None


class Backend(Protocol):
    """The server side of storage, as the transfer roles use it (names are network names)."""

    #: The S3 store a cluster node may stage cross-node pushes in when it has
    #: no ``cluster_staging`` (None: this backend has none).
    cluster_staging: S3Store | None

    def location_of(self, peer: Peer | None, name: str) -> str:
        """Where ``peer``'s published ``name`` lives (a path or a URL)."""
        ...

    async def rerun_answer(
        self, peer: Peer, name: str, size: int, sha256: str
    ) -> dict[str, Any] | None:
        """A begin's answer when the file may already be there (see :mod:`._rerun`), else None."""
        ...

    async def admit(self, peer: Peer, name: str, size: int, key: str, *, restart: bool) -> Admitted:
        """Check the upload against every limit, open its partial (resuming unless ``restart``)."""
        ...

    async def forget_partial(self, peer: Peer, name: str, key: str) -> None:
        """Remove ``peer``'s idle partial of ``name`` under ``key``: its begin was
        answered ``already_there``, so nothing will resume it."""
        ...

    async def release(self, admitted: Admitted) -> None:
        """The upload ended (published, kept for a resume or discarded): free its reservation."""
        ...

    async def store_small(self, peer: Peer, entries: list[Entry]) -> None:
        """Store one-shot small files; each outcome is left on its entry (:mod:`._batch_store`)."""
        ...

    async def list_files(
        self, peer: Peer | None, *, max_entries: int, prefix: str | None, after: str | None = None
    ) -> list[dict[str, Any]]:
        """The first ``max_entries`` published files (after ``after``, when
        given) as ``{"name", "size", "modified"}``, in the storage's listing
        order (:meth:`conduit.cluster.store.Store.list_files`)."""
        ...

    async def stat(self, peer: Peer, name: str, *, sha256: bool) -> dict[str, Any]:
        """The ``file_stat`` answer; ``RPCError`` ``is_directory`` for a directory."""
        ...

    async def open_source(self, peer: Peer, name: str) -> Opened:
        """Open the published ``name`` for a download, positioned at byte 0."""
        ...

    async def read_small_files(
        self, peer: Peer, names: list[str], limit: int, room: int, threads: trio.CapacityLimiter
    ) -> list[SmallRead]:
        """Read the published ``names`` whole, in order, each opened as :meth:`open_source`
        opens it and read as one version: those of at most ``limit`` bytes, while
        their sizes add up to at most ``room``. ``threads``: the connection's
        share of the worker threads (:class:`._budget.SendBudget`)."""
        ...

    async def delete(self, peer: Peer, name: str) -> None:
        """Remove the published ``name`` (``FileNotFoundError`` if there is none)."""
        ...

    async def rename(self, peer: Peer, old: str, new: str, *, overwrite: bool) -> str:
        """Rename ``old`` to ``new`` (``exists`` unless ``overwrite``); the new name."""
        ...


class LocalSink:
    """A :class:`Sink` over a local :class:`PartialFile`: each call one worker-thread hop."""

    def __init__(self, partial: PartialFile) -> None:
        """Wrap an open partial file."""
        self.partial = partial
        #: What a writing thread calls (see :func:`~._engine.receive_file`).
        self.blocking_write: Callable[[Sequence[Buffer]], None] | None = partial.write_chunks

    @property
    def offset(self) -> int:
        """Bytes written."""
        return self.partial.offset

    def sha256_hex(self) -> str:
        """Hex SHA-256 of the bytes written."""
        return self.partial.sha256_hex()

    async def write(self, chunks: Sequence[Buffer]) -> None:
        """Append ``chunks`` (one ``pwritev`` and their hash, in one worker-thread hop).

        The hash is updated per chunk: each update gives up the GIL and wins
        it back from the event loop thread, which measured cheaper than
        joining the chunks first (a copy made holding the GIL; see
        docs/benchmark-journal.md, "Fifth round (wave 7, bulk)").
        """
        await _threads.run_sync(self.partial.write_chunks, chunks)

    async def publish(self, *, overwrite: bool, expected_sha256: str) -> str:
        """Verify, fsync, link without overwriting (see :meth:`PartialFile.publish`)."""
        # No write can still be running: a worker thread is waited for, even
        # when the upload is cancelled.
        partial = self.partial
        return await _threads.run_sync(
            lambda: partial.publish(overwrite=overwrite, expected_sha256=expected_sha256)
        )

    async def close(self) -> None:
        """Close, keeping the partial file for a resume."""
        await _threads.run_sync(self.partial.close)

    async def discard(self) -> None:
        """Delete the partial file."""
        await _threads.run_sync(self.partial.discard)

    def location_of(self, name: str) -> str:
        """The absolute path of the published ``name``."""
        return str(self.partial.root.path / name)
