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
listing, the answer was full, it changed while read) and every file when the
server predates batches (its answer is ``not_found``) take the per-file path.
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

from ..errors import ConduitError
from ._answers import BatchFile, batch_download_answer
from ._batch_store import FRAME_OVERHEAD, cut_batches, entry_cost
from ._progress import TransferProgress
from ._wire import DOWNLOAD_BATCH, transfer_failure

if TYPE_CHECKING:
    from .._connection import Connection
    from .._peer import Peer
    from ._receiver import Receiver

ProgressCallback = Callable[[TransferProgress], Any]
Attempt = Callable[["Peer"], Awaitable[dict[str, Any]]]
OnPeer = Callable[[Attempt], Awaitable[dict[str, Any]]]


@attrs.define
class _Wanted:
    """A file to ask for: where its result goes, its name, the size the listing gave."""

    index: int
    name: str
    listed_size: int


def _cost(wanted: _Wanted) -> int:
    return entry_cost(wanted.name, wanted.listed_size)


async def receive_small_files(
    receiver: Receiver,
    on_peer: OnPeer,
    files: Sequence[tuple[int, str, int]],
    local_dir: Path,
    *,
    limit: int,
    parallel: int,
    on_progress: ProgressCallback | None,
) -> dict[int, dict[str, Any]]:
    """Download ``files`` (index, remote name, listed size) into ``local_dir`` in batches.

    Returns the results by index; the files without one are left for the
    per-file path. ``on_peer`` runs each call on the connection, again after
    a reconnect (a batch only reads on the server, so asking twice is harmless).
    """
    results: dict[int, dict[str, Any]] = {}
    limiter = trio.CapacityLimiter(parallel)
    unsupported = False

    async def one(batch: list[_Wanted]) -> None:
        nonlocal unsupported
        async with limiter:
            if unsupported:
                return
            outcome = await _call_batch(on_peer, batch, max_bytes)
            if outcome.get("unsupported"):
                unsupported = True
            elif not outcome.get("success"):
                for wanted in batch:
                    results[wanted.index] = dict(outcome)
            else:
                await _keep(receiver, local_dir, batch, outcome, results, on_progress)

    budget = await on_peer(_answer_budget)
    if not budget.get("success"):
        return results  # not connected: the per-file path reports it, file by file
    max_bytes: int = budget["bytes"]
    wanted = [_Wanted(*file) for file in files if 0 <= file[2] <= limit]
    async with trio.open_nursery() as nursery:
        for batch in cut_batches(wanted, _cost, max_bytes):
            nursery.start_soon(one, batch)
    return results


async def _answer_budget(peer: Peer) -> dict[str, Any]:
    """The data bytes one batch answer from ``peer`` may carry: what our frames take."""
    await trio.lowlevel.checkpoint()
    return {"success": True, "bytes": peer.connection.settings.max_frame_size - FRAME_OVERHEAD}


async def _call_batch(on_peer: OnPeer, batch: list[_Wanted], max_bytes: int) -> dict[str, Any]:
    """Ask for ``batch`` through ``on_peer``: what :func:`_fetch_batch` returns, or a
    failure dict (the connection gone for good fails the batch, file by file, as
    in :func:`._batch._call_batch`)."""
    attempt = functools.partial(_fetch_batch, batch=batch, max_bytes=max_bytes)
    try:
        return await on_peer(attempt)
    except (ConduitError, OSError) as exc:
        return transfer_failure(exc)


async def _fetch_batch(peer: Peer, *, batch: list[_Wanted], max_bytes: int) -> dict[str, Any]:
    """One ``file_download_batch`` call: ``{"success": True, "entries": [...],
    "started": ..., "connection": ...}``, a failure dict, or ``{"unsupported":
    True}`` when the server does not know the method."""
    # Each file's clock starts before the call it travels in, as a single
    # download's does: its elapsed and speed cover the round trip.
    started = trio.current_time()
    names = [wanted.name for wanted in batch]
    try:
        answer = await peer.call(
            DOWNLOAD_BATCH,
            names=names,
            max_bytes=max_bytes,
            timeout=math.inf,  # reads take what the disk takes; the heartbeat sees a dead peer
        )
        # A file may come larger than our limit (the server's may be higher), never
        # larger than the answer's room.
        entries = batch_download_answer(answer, names, max_bytes)
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
    local_dir: Path,
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
        elif entry is not None:
            results[wanted.index] = entry
    if not files:
        return
    connection: Connection = outcome["connection"]
    try:
        kept = await receiver.keep_small_downloads(
            connection,
            local_dir,
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
