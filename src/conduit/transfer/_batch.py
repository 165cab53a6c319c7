"""The sending side of ``file_upload_batch``: a directory's small files, many per call.

``send_to_server`` on a directory sends its files up to the small-file limit
(one chunk, at most 256 KiB) in batches: up to
:data:`._batch_store.MAX_BATCH_FILES` files per call, no more bytes than the
server's ``max_frame_size`` allows, and no more files than their answer fits
in this side's (:func:`._batch_store.result_cost`), a few batches in flight. The server stores
each batch with one fsync pass (see :mod:`._batch_store`) and answers one
result per file, exactly what a single small upload returns; a file that fails
fails alone. Larger files, and every file when the server predates batches
(its answer is ``not_found``), take the per-file path.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .. import _threads
from ..errors import ConduitError, UnsafePathError
from ._answers import BadAnswer, failed_entry, finish_answer
from ._batch_store import (
    ENVELOPE_OVERHEAD,
    FRAME_OVERHEAD,
    MAX_BATCH_FILES,
    cut_batches,
    entry_cost,
    result_cost,
)
from ._local import DirectoryId, WalkedDirectories, open_local_file
from ._progress import ProgressReporter, TransferProgress
from ._wire import UPLOAD_BATCH, transfer_failure

if TYPE_CHECKING:
    from .._peer import Peer

ProgressCallback = Callable[[TransferProgress], Any]
Attempt = Callable[["Peer"], Awaitable[dict[str, Any]]]
OnPeer = Callable[[Attempt], Awaitable[dict[str, Any]]]


@attrs.define
class _Small:
    """A file read for a batch: its bytes and their SHA-256."""

    index: int
    name: str
    data: bytes
    sha256: str


#: A file to send: its index, remote name, local path, and the directory a
#: walk found it in (None: a path the caller named, links followed).
LocalFile = tuple[int, str, str, DirectoryId | None]


def _read_small(
    names: Sequence[LocalFile], limit: int
) -> tuple[list[_Small], dict[int, dict[str, Any]]]:
    """Read the files up to ``limit`` bytes: (read, failed results); larger ones are left."""
    read: list[_Small] = []
    failed: dict[int, dict[str, Any]] = {}
    with WalkedDirectories() as walked:
        for index, name, local, within in names:
            try:
                with open_local_file(local, within=within, walked=walked) as file:
                    data = file.read(limit + 1)
            except (OSError, UnsafePathError) as exc:
                failed[index] = transfer_failure(exc)
                continue
            if len(data) <= limit:
                read.append(_Small(index, name, data, hashlib.sha256(data).hexdigest()))
    return read, failed


def _cost(small: _Small) -> int:
    return entry_cost(small.name, len(small.data))


def _result_cost(small: _Small) -> int:
    return result_cost(small.name)


def entry_result(answer: Any, size: int) -> dict[str, Any]:
    """One file's result from a batch answer's entry (``size``: the bytes sent)."""
    if not isinstance(answer, dict):
        return transfer_failure(BadAnswer("a batch result is not a mapping"))
    try:
        if answer.get("success") is not True:
            return failed_entry(answer)
        return finish_answer(answer, size)
    except BadAnswer as exc:
        return transfer_failure(exc)


async def send_small_files(
    on_peer: OnPeer,
    files: Sequence[LocalFile],
    limit: int,
    parallel: int,
    on_progress: ProgressCallback | None,
) -> dict[int, dict[str, Any]]:
    """Upload the small ones of ``files`` (index, remote name, local path, walked
    directory) in batches.

    Returns the results by index; the files without one are left for the
    per-file path (larger than ``limit``, or the server does not take batches).
    A file a walk found is opened through its directory, as a single send
    opens it (:class:`._local.WalkedDirectories`). ``on_peer`` runs each call
    on the connection, again after a reconnect (a batch sent twice stores
    nothing twice: what arrived the first time is ``already_there``).
    """
    results: dict[int, dict[str, Any]] = {}
    reading = trio.CapacityLimiter(parallel)  # groups of files read and held at once
    sending = trio.CapacityLimiter(parallel)  # batch calls in flight at once
    unsupported = False

    async def send(batch: list[_Small]) -> None:
        nonlocal unsupported
        async with sending:
            if unsupported:
                return
            outcome = await _call_batch(on_peer, batch, on_progress)
            if outcome.get("unsupported"):
                unsupported = True
            elif not outcome.get("success"):
                for small in batch:
                    results[small.index] = dict(outcome)
            else:
                await _report(batch, outcome, results)

    async def one(group: Sequence[LocalFile]) -> None:
        # A group's bytes are held until its last batch is answered, so at most
        # ``parallel`` groups are in memory; its batches go out side by side
        # (one after the other, a group of larger files took a round trip each).
        async with reading:
            read, failed = await _threads.run_sync(_read_small, group, limit)
            results.update(failed)
            async with trio.open_nursery() as batches:
                for batch in cut_batches(read, (_cost, max_bytes), (_result_cost, answer_bytes)):
                    batches.start_soon(send, batch)

    budget = await on_peer(_frame_budget)
    if not budget.get("success"):
        return results  # not connected: the per-file path reports it, file by file
    max_bytes: int = budget["bytes"]
    answer_bytes: int = budget["answer_bytes"]
    async with trio.open_nursery() as nursery:
        for start in range(0, len(files), MAX_BATCH_FILES):
            nursery.start_soon(one, files[start : start + MAX_BATCH_FILES])
    return results


async def _frame_budget(peer: Peer) -> dict[str, Any]:
    """The data bytes one batch call to ``peer`` may carry, and its answer (what
    our frames take)."""
    await trio.lowlevel.checkpoint()
    return {
        "success": True,
        "bytes": peer.connection.keys.peer_max_frame_size - FRAME_OVERHEAD,
        "answer_bytes": peer.connection.settings.max_frame_size - ENVELOPE_OVERHEAD,
    }


async def _call_batch(
    on_peer: OnPeer, batch: list[_Small], on_progress: ProgressCallback | None
) -> dict[str, Any]:
    """Send ``batch`` through ``on_peer``: what :func:`_send_batch` returns, or a failure dict.

    ``on_peer`` raises (``ConnectionClosed``) when the connection is gone for
    good: closed on purpose, or reconnecting gave up. That is this batch's
    failure, file by file, like any other lost call: raised, it would cancel
    the sibling batches and lose the results of the files already stored.
    A batch after it meets the same closed connection and fails the same way,
    so no file is left without a result.
    """
    attempt = functools.partial(_send_batch, batch=batch, on_progress=on_progress)
    try:
        return await on_peer(attempt)
    except (ConduitError, OSError) as exc:
        return transfer_failure(exc)


def _reporter(small: _Small, on_progress: ProgressCallback | None) -> ProgressReporter:
    """The progress reporter of one file of a batch; its clock starts now."""
    return ProgressReporter(
        on_progress, filename=small.name, direction="upload", total_size=len(small.data)
    )


async def _send_batch(
    peer: Peer, *, batch: list[_Small], on_progress: ProgressCallback | None
) -> dict[str, Any]:
    """One ``file_upload_batch`` call: ``{"success": True, "results": [...], "reporters":
    [...]}``, a failure dict, or ``{"unsupported": True}`` when the server does not know
    the method."""
    # Each file's clock starts before the call it travels in, as a single small
    # upload's does (Sender._send_small): its elapsed and speed then cover the
    # round trip and the server's storing, not the instant of reading the answer.
    reporters = [_reporter(small, on_progress) for small in batch]
    try:
        answer = await peer.call(
            UPLOAD_BATCH,
            files=[{"name": s.name, "data": s.data, "sha256": s.sha256} for s in batch],
            timeout=math.inf,  # fsyncs take what they take; the heartbeat sees a dead peer
        )
        listed = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(listed, list) or len(listed) != len(batch):
            raise BadAnswer("a batch answer must list one result per file")
    except ConduitError as exc:
        if getattr(exc, "code", None) == "not_found" and UPLOAD_BATCH in str(exc):
            return {"success": True, "unsupported": True}
        return transfer_failure(exc)
    return {"success": True, "results": listed, "reporters": reporters}


async def _report(
    batch: list[_Small], outcome: dict[str, Any], results: dict[int, dict[str, Any]]
) -> None:
    """Each file's result from the batch answer; its one progress report on success."""
    for small, raw, reporter in zip(batch, outcome["results"], outcome["reporters"], strict=True):
        result = entry_result(raw, len(small.data))
        if result.get("success"):
            await reporter.advance(len(small.data))
            final = await reporter.finish()
            result.update(resumed_from=0, elapsed=final.elapsed, speed=final.speed)
        results[small.index] = result
