"""Small files on the sending side: read cheaply, several per call when several are in flight.

A file up to the small-file limit (one chunk, at most 256 KiB) travels inside
one call (``file_upload_small``) instead of begin + stream + finish. What is
left per file is fixed cost, so it is cut here:

* :func:`probe` looks at the path once (:func:`._local.probe_source`): a
  file up to :data:`INLINE_LIMIT` is opened, read and hashed inline, which
  costs less than the worker-thread hop it replaces, as long as the file
  system answers fast; after :data:`INLINE_SLOW_LOOKS` slow looks the run
  reads in a worker thread instead, and concurrent sends share that hop (see
  :mod:`._shared_hop`). The price: an ``open`` that never returns (a hung
  network mount) holds the client's loop, where a hop would hold only that
  send; a directory walk, ``send_files_to_server`` and larger files always
  read in worker threads.
* :class:`SmallUploads` coalesces the small uploads in flight on one
  connection (a nursery of ``send_to_server`` calls): while a call is on its
  way, the next files queue, and go together as one ``file_upload_batch``
  (the server stores a batch in one worker-thread hop with one directory fsync
  per batch, see :mod:`._batch_store`). A lone caller never waits for a batch:
  with nothing in flight its file goes at once, as ``file_upload_small``. Each
  file still gets its own result, exactly what its own call would have
  answered; a whole-call failure (the connection closed) is each file's failure.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..errors import ConduitError, ConnectionClosed
from ._answers import BadAnswer, finish_answer
from ._batch import entry_result
from ._batch_store import (
    ENVELOPE_OVERHEAD,
    FRAME_OVERHEAD,
    MAX_BATCH_FILES,
    entry_cost,
    result_cost,
)
from ._local import Probe, SmallFile, probe_source
from ._shared_hop import STALLED_AFTER, SharedHop
from ._wire import UPLOAD_BATCH, transfer_failure

log = logging.getLogger("conduit.transfer")

if TYPE_CHECKING:
    from .._connection import Connection
    from .._peer import Peer
    from ..client import Client

#: Calls of small uploads in flight on one connection at once; the files that
#: arrive meanwhile queue for the next batch. A second call lets sends that
#: arrive while one is on its way leave without waiting for its answer; sends
#: released together by one answer (eight callers in step) gather into one
#: call, so the two processes then take turns (docs/benchmark-journal.md,
#: "Small files with eight in flight": 1, 2 and 3 measured level).
MAX_SMALL_CALLS = 2


def _probe_one(job: tuple[str | os.PathLike[str], int]) -> Probe:
    return probe_source(*job)


@attrs.define(eq=False)
class _Preparing:
    """A connection's sends between their start and their file read (see :func:`probe`)."""

    count: int = 0
    #: Set when ``count`` drops to zero; made only while a batch waits for it
    #: (a lone sequential send then creates and sets no event per file).
    settled: trio.Event | None = None

    async def wait_settled(self) -> None:
        """Return once no send is reading its file, or after :data:`STALLED_AFTER` seconds."""
        # One checkpoint first: the callers an answer just released run up to
        # their next send's probe, which counts them.
        await trio.lowlevel.checkpoint()
        with trio.move_on_after(STALLED_AFTER):
            while self.count:
                if self.settled is None:
                    self.settled = trio.Event()
                await self.settled.wait()


def _preparing(connection: Connection) -> _Preparing:
    preparing: _Preparing | None = connection.owned.get(_Preparing)
    if preparing is None:
        preparing = connection.owned[_Preparing] = _Preparing()
    return preparing


#: Files up to this many bytes are looked at (opened, read, hashed) inline,
#: in the Trio thread: about 10 µs of CPU for 4 KiB (52 µs for 64 KiB) on the
#: benchmark machine, against 40-120 µs for a worker-thread hop and its two
#: wake-ups. A larger one is left to the sender's own hop.
INLINE_LIMIT = 64 * 1024
#: A look that took longer than this (seconds, wall clock) was slow: a network
#: or sleeping disk, not a page-cache read (nor a look descheduled for a time
#: slice on a busy machine, which is why it is not lower).
INLINE_STALL = 0.005
#: After this many slow looks, a run looks at every file in a worker thread
#: (the shared hop) from then on: a slow file system stalls the loop a few
#: times at most, never for the rest of the run.
INLINE_SLOW_LOOKS = 3


@attrs.define(eq=False)
class _Looks:
    """The run's way of looking at files: inline while looks stay fast, else the shared hop."""

    #: Eight sends starting together look at their files in one hop, not eight.
    hop: SharedHop[tuple[str | os.PathLike[str], int], Probe]
    #: Slow inline looks so far.
    slow: int = 0


_LOOKS: trio.lowlevel.RunVar[_Looks] = trio.lowlevel.RunVar("conduit_small_looks")


def _looks() -> _Looks:
    try:
        return _LOOKS.get()
    except LookupError:
        # Its thread is not tied to the run: it exits once idle for
        # IDLE_TIMEOUT seconds, as Trio's own cached threads do.
        looks = _Looks(SharedHop(_probe_one))
        _LOOKS.set(looks)
        return looks


def looks_inline() -> bool:
    """Whether this run still looks at small files inline (see :data:`INLINE_SLOW_LOOKS`)."""
    return _looks().slow < INLINE_SLOW_LOOKS


async def _look(
    looks: _Looks, path: str | os.PathLike[str], limit: int, *, alone: bool = False
) -> Probe:
    if looks.slow >= INLINE_SLOW_LOOKS:
        return await looks.hop.run((path, limit))
    if alone:
        # A sender alone on its connection (see SmallUploads.alone): nobody
        # to gather, so no pass of the run loop; still a cancel point, and
        # the call that carries the file is the schedule point.
        await trio.lowlevel.checkpoint_if_cancelled()
    else:
        # A schedule point while counted as preparing: sends started together
        # all count themselves before the first one's file may leave alone.
        await trio.lowlevel.checkpoint()
    started = time.perf_counter()
    try:
        # Never more than INLINE_LIMIT bytes read in the Trio thread.
        return probe_source(path, min(limit, INLINE_LIMIT))
    finally:
        if time.perf_counter() - started > INLINE_STALL:
            looks.slow += 1
            if looks.slow == INLINE_SLOW_LOOKS:
                log.info("slow file system: small files are read in a worker thread from now on")


async def probe(path: str | os.PathLike[str], limit: int, client: Client) -> Probe:
    """:func:`probe_source`: inline while looks are fast, else in a shared worker-thread hop.

    While it runs, the send counts as *preparing* on ``client``'s connection: a
    batch about to leave waits for it (see :class:`SmallUploads`), so eight
    sends that start together leave together. A sender that has been alone on
    the connection (:meth:`SmallUploads.alone`) looks without that schedule
    point: the first send of a burst after such a run leaves alone, the
    others gather behind it.
    """
    looks = _looks()
    try:
        connection = client.server.connection
    except ConnectionClosed:
        return await _look(looks, path, limit)  # not connected: the send reports it
    preparing = _preparing(connection)
    uploads: SmallUploads | None = connection.owned.get(SmallUploads)
    alone = preparing.count == 0 and uploads is not None and uploads.alone()
    preparing.count += 1
    try:
        return await _look(looks, path, limit, alone=alone)
    finally:
        preparing.count -= 1
        if preparing.count == 0 and preparing.settled is not None:
            preparing.settled.set()
            preparing.settled = None


@attrs.define(eq=False)
class _Queued:
    """A small upload waiting for the next batch, then its answer."""

    name: str
    small: SmallFile
    done: trio.Event = attrs.field(factory=trio.Event)
    result: dict[str, Any] | None = None


class SmallUploads:
    """One connection's small uploads: sent at once when nothing else is under way, else batched.

    A file goes at once, alone, when no call of small uploads is on the way, none
    is queued and no other send is reading its file. Otherwise it queues; a
    task of the connection takes the queue as one batch as soon as a call may
    start, after the sends still reading their files have queued too. Kept in
    ``Connection.owned``, so it goes with the connection.
    """

    def __init__(self) -> None:
        self._calls = 0
        #: Files in a row that went at once, alone, with no other send queued
        #: meanwhile (a sequential sender); any queued send resets it.
        self._lone = 0
        #: Sends queued so far (a lone send that saw it move was not alone).
        self._queued = 0
        self._queue: list[_Queued] = []
        #: A task is about to take the queue.
        self._flushing = False
        #: The server answered ``not_found`` to a batch: one call per file from now on.
        self._no_batches = False

    def alone(self) -> bool:
        """Whether the connection's small uploads have been one sequential sender's lately.

        True after :data:`LONE_SENDS` files in a row went at once, alone, with
        no send queued meanwhile, while nothing is on the way or queued now.
        :func:`probe` then skips the schedule point that lets sends starting
        together gather (a whole pass of the run loop per file, about a tenth
        of a sequential upload's Python calls on the client). The first send
        of a burst after such a run goes alone, and the burst's others queue,
        which resets the count: from then on every send gathers again.
        """
        return self._lone >= LONE_SENDS and not (self._calls or self._queue or self._flushing)

    async def send(self, peer: Peer, name: str, small: SmallFile, method: str) -> dict[str, Any]:
        """Upload one small file with ``method`` (or in a batch); its result dict.

        A success is the receiver's verdict, as :func:`._answers.finish_answer`
        checked it; a failure is ``{"success": False, "error", "code"}``.
        """
        preparing = peer.connection.owned.get(_Preparing)
        busy = preparing is not None and preparing.count > 0
        if not (self._calls or self._queue or self._flushing or busy):
            self._calls += 1
            queued_before = self._queued
            try:
                return await send_one(peer, name, small, method)
            finally:
                self._calls -= 1
                self._lone = self._lone + 1 if self._queued == queued_before else 0
                self._schedule(peer)
        self._lone = 0
        self._queued += 1
        queued = _Queued(name, small)
        self._queue.append(queued)
        self._schedule(peer)
        try:
            await queued.done.wait()
        except BaseException:
            # Cancelled before its batch was taken: it is not sent at all.
            if queued in self._queue:
                self._queue.remove(queued)
            raise
        assert queued.result is not None
        return queued.result

    def _schedule(self, peer: Peer) -> None:
        """Start the task that sends the queue, if one may start and none is starting."""
        if self._flushing or not self._queue or self._calls >= MAX_SMALL_CALLS:
            return
        self._flushing = True
        self._calls += 1
        try:
            peer.connection.spawn(self._send_batch, peer)
        except ConnectionClosed as exc:
            self._flushing = False
            self._calls -= 1
            _settle(self._queue, transfer_failure(exc))
            self._queue.clear()

    async def _send_batch(self, peer: Peer) -> None:
        # A task of the connection, not of any one caller: a caller cancelled
        # while its file is on the way does not take the others' call down.
        batch: list[_Queued] = []
        try:
            try:
                await _preparing(peer.connection).wait_settled()
            finally:
                self._flushing = False
            batch = _take_batch(self._queue, peer.connection)
            if self._no_batches or len(batch) == 1:
                for queued in batch:
                    queued.result = await send_one(peer, queued.name, queued.small, _SMALL_OF)
                    queued.done.set()
                return
            answer = await _call_batch(peer, batch) if batch else []
            if answer is None:
                self._no_batches = True
                for queued in batch:
                    queued.result = await send_one(peer, queued.name, queued.small, _SMALL_OF)
                    queued.done.set()
                return
            if isinstance(answer, dict):
                _settle(batch, answer)
                return
            for queued, raw in zip(batch, answer, strict=True):
                queued.result = entry_result(raw, len(queued.small.data))
                queued.done.set()
        except BaseException as exc:
            # The connection is going (its tasks are cancelled): nobody waits forever.
            _settle(batch, transfer_failure(ConnectionClosed(f"the upload was stopped: {exc!r}")))
            raise
        finally:
            self._calls -= 1
            if peer.connection.is_open:
                self._schedule(peer)
            else:
                _settle(self._queue, transfer_failure(ConnectionClosed("connection closed")))
                self._queue.clear()


#: Lone sends in a row (see :meth:`SmallUploads.alone`) after which a
#: connection's next send skips the gathering schedule point.
LONE_SENDS = 2

#: The single-file method a batch falls back to (batches are uploads only).
_SMALL_OF = "file_upload_small"


def _settle(batch: Sequence[_Queued], result: dict[str, Any]) -> None:
    for queued in batch:
        if not queued.done.is_set():
            queued.result = dict(result)
            queued.done.set()


def _take_batch(queue: list[_Queued], connection: Connection) -> list[_Queued]:
    """The queue's first files whose call fits in the peer's frame and whose
    answer fits in ours (at least one); they leave the queue."""
    room = connection.keys.peer_max_frame_size - FRAME_OVERHEAD
    answer_room = connection.settings.max_frame_size - ENVELOPE_OVERHEAD
    taken: list[_Queued] = []
    used = answered = 0
    for queued in queue:
        cost = entry_cost(queued.name, len(queued.small.data))
        answer = result_cost(queued.name)
        full = used + cost > room or answered + answer > answer_room
        if taken and (len(taken) >= MAX_BATCH_FILES or full):
            break
        taken.append(queued)
        used += cost
        answered += answer
    del queue[: len(taken)]
    return taken


async def send_one(peer: Peer, name: str, small: SmallFile, method: str) -> dict[str, Any]:
    """One ``*_small`` call; the checked verdict or a failure dict."""
    try:
        answer = await peer.call(
            method,
            name=name,
            data=small.data,
            sha256=small.sha256,
            timeout=math.inf,  # fsyncs take what they take; the heartbeat sees a dead peer
        )
        return finish_answer(answer, len(small.data))
    except (ConduitError, OSError) as exc:
        return transfer_failure(exc)


async def _call_batch(peer: Peer, batch: list[_Queued]) -> list[Any] | dict[str, Any] | None:
    """One ``file_upload_batch`` call: the per-file answers, a failure dict for all of
    them, or None when the server does not take batches."""
    try:
        answer = await peer.call(
            UPLOAD_BATCH,
            files=[{"name": q.name, "data": q.small.data, "sha256": q.small.sha256} for q in batch],
            timeout=math.inf,
        )
    except ConduitError as exc:
        if getattr(exc, "code", None) == "not_found" and UPLOAD_BATCH in str(exc):
            return None
        return transfer_failure(exc)
    listed = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(listed, list) or len(listed) != len(batch):
        return transfer_failure(BadAnswer("a batch answer must list one result per file"))
    return listed


__all__ = [
    "INLINE_LIMIT",
    "INLINE_SLOW_LOOKS",
    "INLINE_STALL",
    "LONE_SENDS",
    "MAX_SMALL_CALLS",
    "SmallUploads",
    "looks_inline",
    "probe",
    "send_one",
]
