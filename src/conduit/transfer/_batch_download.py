"""The client's side of ``file_download_batch``: a directory's small files, many per call.

``receive_from_server`` on a directory lists it, then asks for the files the
listing shows as small (up to the small-file limit) in batches: up to
:data:`._batch_store.MAX_BATCH_FILES` names per call, no more listed bytes
than this side's ``max_frame_size`` takes in one answer, a few calls in
flight. Each file comes back whole with its SHA-256 (see
:mod:`._batch_serve`), and a batch is stored as the server stores an upload
batch (:func:`._batch_store.store_batch`: checked against a local copy that
is already there, written to an anonymous file, verified, fsynced, published
without overwriting, the directories synced once per batch). So a directory
of many small files costs a round trip per batch where the per-file path
costs two per file (``file_stat``, then ``file_download``), which is what
matters over a long link.

A file the server leaves out of its answer (it grew past the limit since the
listing, the answer was full, it changed while read), every file of a call
that failed as a whole (``overloaded``, an answer the server could not send,
the connection lost for good) and every file when the server predates
batches (its answer is ``not_found``) take the per-file path.
A file that fails fails alone, with the result a single download would give.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .. import _threads
from ..errors import ConduitError, UnsafePathError
from ._answers import BatchFile, SameFile, batch_download_answer
from ._batch_store import ENVELOPE_OVERHEAD, FRAME_OVERHEAD, cut_batches, entry_cost, name_cost
from ._progress import ProgressReporter, TransferProgress
from ._rerun import kept_download_result
from ._storage import StorageRoot
from ._wire import DOWNLOAD_BATCH, transfer_failure

if TYPE_CHECKING:
    from .._connection import Connection
    from .._peer import Peer
    from ._receiver import Receiver

ProgressCallback = Callable[[TransferProgress], Any]
#: Our copy of a file: its SHA-256 and size, or None.
Have = tuple[str, int] | None
Attempt = Callable[["Peer"], Awaitable[dict[str, Any]]]
OnPeer = Callable[[Attempt], Awaitable[dict[str, Any]]]


@attrs.define
class _Wanted:
    """A file to ask for: where its result goes, its name, the size a listing gave
    (None: not known; counted as the small-file limit)."""

    index: int
    name: str
    listed_size: int | None
    limit: int

    def cost(self) -> int:
        """What it may take in an answer, at most."""
        size = self.limit if self.listed_size is None else self.listed_size
        return entry_cost(self.name, size)

    def call_cost(self) -> int:
        """What it takes in the call, at most."""
        return name_cost(self.name)


async def receive_small_files(
    receiver: Receiver,
    on_peer: OnPeer,
    files: Sequence[tuple[int, str, int | None]],
    local_dir: Path,
    *,
    limit: int,
    parallel: int,
    on_progress: ProgressCallback | None,
) -> dict[int, dict[str, Any]]:
    """Download ``files`` (index, remote name, listed size or None) into ``local_dir``
    in batches.

    Returns the results by index; the files without one are left for the
    per-file path. ``on_peer`` runs each call on the connection, again after
    a reconnect (a batch only reads on the server, so asking twice is harmless).
    """
    results: dict[int, dict[str, Any]] = {}
    local = StorageRoot(local_dir)
    limiter = trio.CapacityLimiter(parallel)
    unsupported = False

    async def one(batch: list[_Wanted]) -> None:
        nonlocal unsupported
        async with limiter:
            if unsupported:
                return
            # A re-run: the digests of the copies already here, so that the
            # server sends none of the bytes it would send again.
            have = await _threads.run_sync(_local_digests, local, batch)
            outcome = await _call_batch(on_peer, list(zip(batch, have, strict=True)), max_bytes)
            if outcome.get("unsupported"):
                unsupported = True
            elif outcome.get("success"):
                await _keep(receiver, local, batch, outcome, results, on_progress)
            # Else the call failed, not its files (the connection, the server's
            # limits, an answer it could not send): each file takes the
            # per-file path, which gives it its own outcome.

    budget = await on_peer(_answer_budget)
    if not budget.get("success"):
        return results  # not connected: the per-file path reports it, file by file
    max_bytes: int = budget["bytes"]
    wanted = [
        _Wanted(index, name, size, limit)
        for index, name, size in files
        if size is None or 0 <= size <= limit
    ]
    async with trio.open_nursery() as nursery:
        budgets = (_Wanted.cost, max_bytes), (_Wanted.call_cost, budget["call_bytes"])
        for batch in cut_batches(wanted, *budgets):
            nursery.start_soon(one, batch)
    return results


async def _answer_budget(peer: Peer) -> dict[str, Any]:
    """The data bytes one batch answer from ``peer`` may carry (what our frames
    take), and the bytes of names its call may (what the peer's take)."""
    await trio.lowlevel.checkpoint()
    return {
        "success": True,
        "bytes": peer.connection.settings.max_frame_size - FRAME_OVERHEAD,
        "call_bytes": peer.connection.keys.peer_max_frame_size - ENVELOPE_OVERHEAD,
    }


def _local_digests(local: StorageRoot, batch: list[_Wanted]) -> list[Have]:
    """The SHA-256 and size of each file's copy in ``local`` when it has the listed
    size (or is small, the size not known), else None (in a worker thread;
    links never followed, as for every local name)."""
    try:
        with local.holding_root():
            return [_local_digest(local, wanted) for wanted in batch]
    except (OSError, UnsafePathError):  # no directory to look in (storing says why)
        return [None] * len(batch)


def _local_digest(local: StorageRoot, wanted: _Wanted) -> Have:
    try:
        size = wanted.listed_size
        if size is None:  # the size of our copy, if it is small
            info = local.entry_stat(wanted.name)
            if info is None or info.st_size > wanted.limit:
                return None
            size = info.st_size
        digest = local.existing_sha256(wanted.name, size)
    except (OSError, UnsafePathError):
        return None
    return None if digest is None else (digest, size)


async def _call_batch(
    on_peer: OnPeer, batch: list[tuple[_Wanted, Have]], max_bytes: int
) -> dict[str, Any]:
    """Ask for ``batch`` through ``on_peer``: what :func:`_fetch_batch` returns, or a
    failure dict (the connection gone for good: raised, it would cancel the
    other batches)."""
    attempt = functools.partial(_fetch_batch, batch=batch, max_bytes=max_bytes)
    try:
        return await on_peer(attempt)
    except (ConduitError, OSError) as exc:
        return transfer_failure(exc)


async def _fetch_batch(
    peer: Peer, *, batch: list[tuple[_Wanted, Have]], max_bytes: int
) -> dict[str, Any]:
    """One ``file_download_batch`` call: ``{"success": True, "entries": [...],
    "started": ..., "connection": ...}``, a failure dict, or ``{"unsupported":
    True}`` when the server does not know the method."""
    # Each file's clock starts before the call it travels in, as a single
    # download's does: its elapsed and speed cover the round trip.
    started = trio.current_time()
    asked = [(wanted.name, have) for wanted, have in batch]
    try:
        answer = await peer.call(
            DOWNLOAD_BATCH,
            names=[name for name, _ in asked],
            have=[None if have is None else have[0] for _, have in asked],
            max_bytes=max_bytes,
            timeout=math.inf,  # reads take what the disk takes; the heartbeat sees a dead peer
        )
        # A file may come larger than our limit (the server's may be higher), never
        # larger than the answer's room.
        entries = batch_download_answer(answer, asked, max_bytes)
    except ConduitError as exc:
        if getattr(exc, "code", None) == "not_found" and DOWNLOAD_BATCH in str(exc):
            return {"success": True, "unsupported": True}
        return transfer_failure(exc)
    return {
        "success": True,
        "entries": entries,
        "started": started,
        "connection": peer.connection,
    }


async def _keep(
    receiver: Receiver,
    local: StorageRoot,
    batch: list[_Wanted],
    outcome: dict[str, Any],
    results: dict[int, dict[str, Any]],
    on_progress: ProgressCallback | None,
) -> None:
    """Store the files of a batch answer; every entry's result but those to fetch by itself."""
    files: list[tuple[_Wanted, BatchFile]] = []
    for wanted, entry in zip(batch, outcome["entries"], strict=True):
        if isinstance(entry, BatchFile):
            files.append((wanted, entry))
        elif isinstance(entry, SameFile):
            results[wanted.index] = await _already_there(local, entry, on_progress, outcome)
        elif entry is not None:
            results[wanted.index] = entry
    if not files:
        return
    connection: Connection = outcome["connection"]
    try:
        kept = await receiver.keep_small_downloads(
            connection,
            local.path,
            [file for _, file in files],
            on_progress,
            started=outcome["started"],
        )
    except (OSError, ConduitError) as exc:
        # The directory itself failed (one file's failure is in its result):
        # each file's failure, as a single download's would be, never an
        # exception that would cancel the other batches.
        kept = [transfer_failure(exc)] * len(files)
    for (wanted, _), result in zip(files, kept, strict=True):
        results[wanted.index] = result


async def _already_there(
    local: StorageRoot,
    same: SameFile,
    on_progress: ProgressCallback | None,
    outcome: dict[str, Any],
) -> dict[str, Any]:
    """A file the server found we have: its one 100% report, and the single path's skip."""
    await ProgressReporter(
        on_progress,
        filename=same.name,
        direction="download",
        total_size=same.size,
        resumed_from=same.size,
        started=outcome["started"],
    ).finish()
    path = str(local.path / same.name)
    return kept_download_result(same.name, same.size, same.sha256, path)
