"""The receiving side of ``file_upload_batch``: several small files per call and per fsync.

(A client stores the answers of ``file_download_batch`` the same way, into
the download's directory: :class:`DirectoryAdmitter`, see
:mod:`._batch_download`.)

A batch is a list of ``{"name", "data", "sha256"}`` entries (each one what
``file_upload_small`` takes). Its size is bounded on both ends: at most
:data:`MAX_BATCH_FILES` entries and, like any call, no more bytes than the
receiving connection's ``max_frame_size`` (the frame decoder already refuses a
larger call; the sender sizes its batches by the peer's limit, and by its
own for the answer, :func:`result_cost`). A batch over
either bound is refused whole with code ``"batch_too_large"`` before anything
is stored.

Each entry gets exactly the per-file rules of ``file_upload_small``: its name
is checked (:func:`._names.safe_relative_name`), a file already there is
skipped (:mod:`._rerun`, within one :class:`._rerun.VariantBudget` for the
call), the disk budget admits and reserves it (space,
partial cap, quota; :mod:`._space`), it is written to an anonymous file (a
hidden partial file where the file system has no ``O_TMPFILE``, see
:meth:`._storage.StorageRoot.open_one_shot`), hashed and compared with its
SHA-256, fsynced, then published by the link that never overwrites. A
failure of one entry (a hostile name, a checksum mismatch, no room) becomes
that entry's ``{"success": False, "error", "code"}`` and touches no other
entry. A malformed batch is refused whole (``invalid_arguments``).

Group commit, and what it guarantees: all the entries are stored in one
worker-thread hop. Every file's bytes are fsynced before its name is linked
(so a name never points at bytes a crash could lose), and the directories that
received names are fsynced once per batch, after the last link and before the
answer is sent. So when the sender reads ``"success": True`` for an entry, that
file is as durable as after ``file_upload_small``; a crash during the batch
leaves some entries published in full and the others not at all (an
anonymous file the kernel frees, or a partial file the sweeper removes), never
a truncated file under a final name.
Nothing outside the batch's own files and directories is synced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import attrs

from ..errors import RPCError, TransferError
from ._names import DOWNLOAD_ID_PREFIX, MAX_NAME_BYTES, name_bytes, safe_relative_name
from ._rerun import VariantBudget, find_sync, skipped_result
from ._space import Admission, owned_transfer_id
from ._storage import StorageRoot
from ._wire import as_rpc_error

log = logging.getLogger("conduit.transfer")

#: Entries in one ``file_upload_batch`` call (or ``file_download_batch``
#: answer), at most.
MAX_BATCH_FILES = 64
#: Room kept in every batch call or answer for its framing, names and digests.
FRAME_OVERHEAD = 64 * 1024
#: Bytes per entry counted besides its data and name (keys, digest, encoding).
_ENTRY_OVERHEAD = 256
#: Room kept in a batch message whose entries hold no data (an upload's
#: answer, a download's call) for its envelope.
ENVELOPE_OVERHEAD = 1024
#: Bytes a success's result in a batch upload's answer takes besides its
#: name, at most (its keys, digest, size, times and flags), and a failure's
#: besides its error's text (its keys and code; it does not name the file).
_SUCCESS_OVERHEAD = 256
_FAILURE_OVERHEAD = 128
#: Bytes (UTF-8) of a failed file's error text in a batch's answer, at most:
#: a message may quote the name and a part of it, escaped, and the answer has
#: a frame to fit in (see :func:`result_cost`).
MAX_ERROR_TEXT = 512

T = TypeVar("T")

#: One bound of a batch: what an item costs in one of its messages, and the
#: room that message has (the call's in the peer's frame, the answer's in ours).
Budget = tuple[Callable[[T], int], int]


def entry_cost(name: str, size: int) -> int:
    """Bytes a file of ``size`` bytes named ``name`` takes in a batch (a bound)."""
    return size + name_bytes(name) + _ENTRY_OVERHEAD


def result_cost(name: str) -> int:
    """Bytes the result of a file named ``name`` takes in a batch upload's
    answer, at most: a success names it as ``path`` and ``filename``, in the
    server's form (NFC, which can make a name up to three times as long:
    U+1D160, 4 bytes, is 12; a published ``name (1).ext`` a little longer
    still); a failure has an error's text, cut at :data:`MAX_ERROR_TEXT`
    (it may quote the name, escaped), instead."""
    size = name_bytes(name)
    if not name.isascii():
        size = min(3 * size, MAX_NAME_BYTES)  # a longer one is refused: its error
    return max(2 * (size + 16) + _SUCCESS_OVERHEAD, MAX_ERROR_TEXT + _FAILURE_OVERHEAD)


def name_cost(name: str) -> int:
    """Bytes a name takes in a batch download's call, at most."""
    return name_bytes(name) + _ENTRY_OVERHEAD


def cut_batches(items: Iterable[T], *budgets: Budget[T]) -> list[list[T]]:
    """Cut ``items`` into batches of at most MAX_BATCH_FILES that stay within
    every budget (the call in the peer's frame, its answer in ours: each
    file's result names it, so long names filled a small frame's answer
    long before its call); an item that does not fit one alone is left out
    (the per-file path takes it)."""
    batches: list[list[T]] = []
    current: list[T] = []
    used = [0] * len(budgets)
    for item in items:
        sizes = [cost(item) for cost, _room in budgets]
        fits, full = True, len(current) >= MAX_BATCH_FILES
        for index, (_cost, room) in enumerate(budgets):
            fits = fits and sizes[index] <= room
            full = full or used[index] + sizes[index] > room
        if not fits:
            continue
        if current and full:
            batches.append(current)
            used = [0] * len(budgets)
            current = []
        current.append(item)
        for index, size in enumerate(sizes):
            used[index] += size
    if current:
        batches.append(current)
    return batches


@attrs.define
class Entry:
    """One file of a batch, and what became of it."""

    name: str
    data: bytes
    sha256: str
    #: The safe relative name it is stored under (set once checked).
    safe: str = ""
    #: The published name, or the stored name of an identical file (skipped).
    published: str | None = None
    skipped: bool = False
    error: RPCError | None = None

    def failure(self) -> dict[str, Any]:
        """The entry's failure result (``error`` is set)."""
        assert self.error is not None
        # Cut: a message may quote the name, and the answer must fit the
        # sender's frame (result_cost).
        message = self.error.message.encode()[:MAX_ERROR_TEXT].decode(errors="ignore")
        return {"success": False, "error": message, "code": self.error.code}

    def skipped_result(self) -> dict[str, Any]:
        """The entry's ``already_there`` result."""
        assert self.published is not None
        return skipped_result(self.published, len(self.data), self.sha256)


def parse_batch(files: Any, max_bytes: int) -> list[Entry]:
    """Check a batch's shape and bounds; its entries.

    A malformed batch (not a list, an entry without a str name, bytes data
    and a str sha256) is refused whole with ``invalid_arguments``: no sender
    of ours makes one, so it is a broken or hostile peer, not a bad file.
    """
    if not isinstance(files, list):
        raise RPCError("files must be a list", "invalid_arguments")
    if len(files) > MAX_BATCH_FILES:
        raise RPCError(
            f"a batch holds at most {MAX_BATCH_FILES} files, got {len(files)}", "batch_too_large"
        )
    entries = []
    for raw in files:
        fields = raw if isinstance(raw, dict) else {}
        name, data, sha256 = fields.get("name"), fields.get("data"), fields.get("sha256")
        if not (isinstance(name, str) and isinstance(data, bytes) and isinstance(sha256, str)):
            raise RPCError(
                "each file needs name (str), data (bytes) and sha256 (str)", "invalid_arguments"
            )
        entries.append(Entry(name, data, sha256))
    total = sum(len(entry.data) for entry in entries)
    if total > max_bytes:
        raise RPCError(
            f"a batch holds at most {max_bytes} bytes of data, got {total}", "batch_too_large"
        )
    return entries


class Admitter(Protocol):
    """Admits each one-shot file of a batch (a worker thread calls it)."""

    @property
    def storage(self) -> StorageRoot:
        """Where the files go."""
        ...

    def admit(self, name: str, size: int) -> Admission:
        """Check and reserve room for ``name``, then open its (anonymous) partial."""
        ...

    def release(self, admission: Admission) -> None:
        """The file was published or discarded: free what :meth:`admit` reserved."""
        ...


@attrs.frozen
class DirectoryAdmitter:
    """An :class:`Admitter` for a directory of this process's own: the client's side
    of a download batch (``receive_from_server`` of a directory).

    Each file's size is checked against the handler's ``max_file_size`` and
    the free space, as a single download's is; there is no budget, quota or
    owner to reserve for.
    """

    storage: StorageRoot
    max_file_size: int | None = None

    def admit(self, name: str, size: int) -> Admission:
        """Check the size and the free space, then open ``name``'s anonymous partial."""
        self.storage.check_can_accept(size, self.max_file_size)
        # A download's kind of id: a partial a crash leaves under it (no
        # O_TMPFILE, or an overwrite's temporary) is one a later download of
        # the name removes (StorageRoot.remove_download_partials).
        transfer_id = DOWNLOAD_ID_PREFIX + owned_transfer_id(None, "")
        partial = self.storage.open_one_shot(name, transfer_id)
        return Admission(self.storage, (), name, transfer_id, "", size, 0, partial)

    def release(self, admission: Admission) -> None:
        """Nothing was reserved."""


def store_batch(
    entries: Sequence[Entry],
    admitter: Admitter,
    overwrite: bool,
    hash_fd: Callable[[int, int], str] | None = None,
) -> None:
    """Skip, admit, write, verify, fsync and publish every entry; then sync the directories.

    Runs in one worker thread. Each entry's outcome is left on the entry.
    ``admitter``: the server's disk budget for its caller
    (:meth:`._space.DiskBudget.one_shot`), or a :class:`DirectoryAdmitter`.
    ``hash_fd`` hashes a same-size stored file for the re-run check (the
    handler's cached :class:`._hashing.HashGate`, within whose threads this runs).
    """
    storage = admitter.storage
    with storage.holding_root():
        _store_entries(entries, admitter, overwrite, hash_fd)


def _store_entries(
    entries: Sequence[Entry],
    admitter: Admitter,
    overwrite: bool,
    hash_fd: Callable[[int, int], str] | None,
) -> None:
    storage = admitter.storage
    published = []
    budget = VariantBudget()  # one for the whole call
    for entry in entries:
        if entry.error is not None:
            continue
        try:
            entry.safe = safe_relative_name(entry.name)
            size = len(entry.data)
            stored = find_sync(
                storage, entry.safe, size, entry.sha256, hash_fd, budget, overwrite=overwrite
            )
            if stored is not None:
                entry.published, entry.skipped = stored, True
                continue
            admission = admitter.admit(entry.safe, size)
        except Exception as exc:
            entry.error = as_rpc_error(exc, name=entry.name)
            continue
        partial = admission.partial
        assert partial is not None
        try:
            partial.write_block(entry.data)
            entry.published = partial.publish(
                overwrite=overwrite, expected_sha256=entry.sha256, sync_directory=False
            )
            published.append(entry)
        except Exception as exc:
            partial.discard()
            entry.error = as_rpc_error(exc, name=entry.name)
        finally:
            admitter.release(admission)
    try:
        storage.sync_directories(entry.published for entry in published if entry.published)
    except OSError as exc:
        # Linked but not known to be durable: not reported as stored.
        log.warning("syncing the directories of a batch failed: %s", exc)
        failure = as_rpc_error(TransferError(f"could not sync the directory: {exc}", "io_error"))
        for entry in published:
            entry.error = failure
