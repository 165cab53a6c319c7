"""The storage seam between file transfer and where the bytes live.

Derived from what ``transfer/_handler.py`` asks of ``transfer/_storage.py``
today: open a hidden partial file under a transfer id (resuming from a
verified prefix), append to it while hashing, publish it under its name
without overwriting (``name (1).ext`` on a clash), discard it, list / stat /
read published files (from an offset, for resumed downloads), and remove old
partials. Two implementations satisfy it: the local directory store
(:class:`conduit.cluster.local.LocalStore`, ``transfer/_storage.StorageRoot``
behind a thin async adapter) and :class:`conduit.cluster.s3.S3Store`. The
transfer handler uses the protocol for an ``s3://`` storage
(``transfer/_backend_store.py``); for a local directory it keeps calling
``StorageRoot`` directly (``transfer/_backend_local.py``), whose fd-based,
single-hop paths this protocol's per-call granularity would slow down.

The protocol is async (Trio): the S3 store waits on the network, the local
store on the disk, and both do their blocking work in worker threads, so the
transfer code just awaits. Names are always network names: every
implementation passes them through ``transfer._names.safe_relative_name``
before touching storage.

Differences the caller must respect (both are true of the local store too):

* ``overwrite`` is decided when the partial is *opened*, not when it is
  published: an object store fixes the final key when the multipart upload
  starts, so that is where the collision policy chooses the name.
* :attr:`PartialUpload.offset` counts bytes accepted, which may exceed the
  durable part: after a crash a resume starts from :meth:`Store.find_partial`
  (the verified, durable prefix), which for the S3 store is a whole number of
  parts.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import attrs

__all__ = ["FileReader", "PartialUpload", "Store", "StoredFile"]


@attrs.frozen
class StoredFile:
    """One published file: what ``file_list`` and ``file_stat`` report."""

    #: Relative POSIX name, canonical (``safe_relative_name(name) == name``).
    name: str
    #: Size in bytes.
    size: int
    #: Modification time in nanoseconds since the epoch (part of the download resume key).
    modified_ns: int
    #: An opaque tag that changes whenever the content may have (the ETag on
    #: S3), for caches keyed on content; ``""`` when the store has none.
    version: str = ""

    @property
    def modified(self) -> float:
        """Modification time in seconds since the epoch."""
        return self.modified_ns / 1e9


@runtime_checkable
class FileReader(Protocol):
    """A published file opened for reading, from a start offset."""

    @property
    def size(self) -> int:
        """Size of the whole file (not of the range being read)."""
        ...

    @property
    def modified_ns(self) -> int:
        """Modification time of the file opened, in nanoseconds since the epoch."""
        ...

    @property
    def version(self) -> str:
        """:attr:`StoredFile.version` of the file opened."""
        ...

    async def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of the next bytes of the range; ``b""`` at its end."""
        ...

    async def aclose(self) -> None:
        """Release the connection or descriptor."""
        ...


@runtime_checkable
class PartialUpload(Protocol):
    """A file being received: append, then publish (or close to resume later, or discard)."""

    @property
    def name(self) -> str:
        """The safe relative name it is being received as."""
        ...

    @property
    def transfer_id(self) -> str:
        """The transfer id that finds this partial again for a resume."""
        ...

    @property
    def offset(self) -> int:
        """Bytes accepted so far (where the next append goes)."""
        ...

    def sha256_hex(self) -> str:
        """Hex SHA-256 of the bytes accepted so far."""
        ...

    async def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add ``data`` at :attr:`offset`."""
        ...

    async def publish(self, *, expected_sha256: str | None = None) -> str:
        """Verify, make visible without overwriting, close; return the relative name used.

        A wrong ``expected_sha256`` discards the partial and raises
        ``ChecksumMismatch``.
        """
        ...

    async def close(self) -> None:
        """Stop writing and keep what is durable, for a resume."""
        ...

    async def discard(self) -> None:
        """Delete the partial. Harmless to call again or after :meth:`close`."""
        ...


@runtime_checkable
class Store(Protocol):
    """Where received files go and where served files come from."""

    def location_of(self, name: str) -> str:
        """Where ``name`` lives, for logs and the ``path`` of callbacks (a path or a URL)."""
        ...

    async def open_partial(
        self, name: str, transfer_id: str, *, resume: bool, overwrite: bool = False
    ) -> PartialUpload:
        """Open (``resume=True``: reuse and verify, else restart) the partial for ``name``.

        A partial another writer is using raises ``TransferError`` code ``"busy"``.
        """
        ...

    async def put_file(
        self, name: str, data: bytes, *, sha256: str, overwrite: bool = False
    ) -> str:
        """Store a whole small file at once: verify, publish without overwriting; the name used.

        The same checks and collision policy as a partial published with
        ``expected_sha256=sha256`` (``ChecksumMismatch`` stores nothing), in
        as few round trips as the store allows: nothing to resume.
        """
        ...

    async def find_partial(self, name: str, transfer_id: str) -> int | None:
        """The durable size of the partial for ``name`` / ``transfer_id``, or ``None``."""
        ...

    async def discard_partial(self, name: str, transfer_id: str) -> bool:
        """Remove that partial; whether there was one."""
        ...

    async def check_can_accept(
        self, size: int, max_file_size: int | None = None, *, offset: int = 0
    ) -> None:
        """Raise ``TransferError`` (``invalid_size``, ``too_large``, ``no_space``) unless
        a ``size``-byte file, ``offset`` bytes of which are already stored, fits."""
        ...

    async def list_files(
        self, *, max_entries: int = 100_000, prefix: str | None = None, after: str | None = None
    ) -> list[StoredFile]:
        """The first ``max_entries`` published files in the store's listing
        order; never partials, never unsafe names.

        With ``prefix`` (a directory name, checked like any name), only the
        files below it, still named from the root; with ``after``, only those
        that come after it in that order (the next page of a listing goes on
        from the name of the last entry of the one before). The order is the names' for a
        local directory and for an S3 store that lists keys by their bytes
        (AWS, MinIO); SeaweedFS lists a directory before the names that
        extend its own with a character below ``/`` (``d/a/b`` before
        ``d/a-z.txt``). The same order on every call: pages never repeat or
        skip a file that stays.
        """
        ...

    async def used_bytes(self) -> int:
        """What a quota counts of this store: the bytes of every published file
        (``list_files`` stops at ``max_entries``; this never does). A local
        store adds its directories (its root's included), at the size the file
        system gives them, and what each file's entry may take in its
        directory (``transfer._storage.ENTRY_ALLOWANCE``)."""
        ...

    async def stat(self, name: str) -> StoredFile:
        """The published file ``name``; ``FileNotFoundError`` if there is none."""
        ...

    async def open_reader(self, name: str, *, start: int = 0) -> FileReader:
        """Open ``name`` for reading from byte ``start``; ``FileNotFoundError`` if missing."""
        ...

    async def delete(self, name: str) -> bool:
        """Remove the published file ``name``; whether it existed."""
        ...

    async def rename(self, name: str, new_name: str, *, overwrite: bool = False) -> str:
        """Give ``name`` a new name (collision policy as for publishing); return it."""
        ...

    async def cleanup_stale_partials(self, max_age_seconds: float) -> int:
        """Remove partials nobody wrote to for ``max_age_seconds``; return how many."""
        ...
