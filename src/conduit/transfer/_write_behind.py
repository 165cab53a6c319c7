"""The receiver's writes in one worker thread that goes from batch to batch by itself.

A receiver that hands each batch to a worker thread and waits for it (one
hop per batch) leaves that thread idle between two batches for as long as the
way back takes: the thread wakes the event loop, the loop wakes the consumer,
the consumer takes the next batch from the stream and wakes a thread again.
On the two-core benchmark machine, with both peers' threads wanting the
cores, that was about a tenth of a download (docs/benchmark-journal.md, "Bulk: the
writer that never waits for the loop"), and the writing thread is the one
that sets the pace of a download: it hashes and writes every byte.

:class:`WriteBehind` keeps one thread while the transfer's data flows (from
the point the stream shows it is bulk until the stream has brought nothing
for :data:`WRITE_BEHIND_IDLE`) and a queue of at most :data:`WRITE_DEPTH`
batches: the consumer queues the next batch while the thread writes the
current one, and the thread takes it as soon as it is done. Each batch
written is reported back through the Trio token, in order (the stream then
returns its credit: see ``IncomingStream.receive(keep=True)``). Threads come
from Trio's thread cache, at most :data:`WRITE_BEHIND_THREADS` per Trio run;
a transfer that finds none free writes with a hop per batch, as before.
"""

from __future__ import annotations

import contextlib
import queue
from collections.abc import Callable, Sequence
from typing import Any

import outcome
import trio

from .._stored_errors import detached
from ..protocol.connection import Buffer

#: Batches queued or being written at once: one being written and the next.
#: Each is at most a window of the stream (its credit was returned ahead),
#: so the stream holds at most its window and two batches.
WRITE_DEPTH = 2
#: Transfers of one Trio run that write behind at once, each with a thread of
#: its own while its data flows; more write with a hop per batch.
WRITE_BEHIND_THREADS = 16

#: Seconds a transfer's stream may bring nothing to write (its writer thread
#: idle) before the thread goes back to the run's few: a sender that stalls
#: holds none. Much longer than a batch takes to arrive at bulk speed (a few
#: milliseconds), so a stream that flows keeps its thread.
WRITE_BEHIND_IDLE = 0.5

_THREADS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(
    "conduit_write_behind_threads"
)
#: Handed to the thread to make it return.
_STOP = None


def _threads() -> trio.CapacityLimiter:
    try:
        return _THREADS.get()
    except LookupError:
        limiter = trio.CapacityLimiter(WRITE_BEHIND_THREADS)
        _THREADS.set(limiter)
        return limiter


class WriteBehind:
    """One transfer's writes, in order, in a thread of its own (see the module docstring).

    ``write(chunks)`` is the sink's blocking append; ``written()`` runs in
    the Trio thread after each batch reached the sink, in order. Use
    :meth:`start`, then :meth:`put` each batch and :meth:`drain` at the end;
    in all cases :meth:`close`, then :meth:`settle` before the sink is
    closed.
    """

    def __init__(
        self,
        write: Callable[[Sequence[Buffer]], None],
        written: Callable[[], None],
        limiter: trio.CapacityLimiter,
    ) -> None:
        self._write = write
        self._written = written
        self._limiter = limiter
        self._token = trio.lowlevel.current_trio_token()
        self._jobs: queue.SimpleQueue[tuple[Sequence[Buffer], int] | None] = queue.SimpleQueue()
        #: Batches queued or being written.
        self.outstanding = 0
        #: Bytes written so far (the sink's offset moved by as much).
        self.bytes_written = 0
        self._failure: BaseException | None = None
        self._done = trio.lowlevel.ParkingLot()
        self._closed = False

    @classmethod
    def start(
        cls, write: Callable[[Sequence[Buffer]], None], written: Callable[[], None]
    ) -> WriteBehind | None:
        """A writer with its thread started, or None when this run's threads are all taken."""
        limiter = _threads()
        behind = cls(write, written, limiter)
        try:
            # On the writer's behalf: the thread gives the token back, from no task.
            limiter.acquire_on_behalf_of_nowait(behind)
        except trio.WouldBlock:
            return None
        try:
            trio.lowlevel.start_thread_soon(
                behind._run, behind._thread_ended, name="conduit write-behind"
            )
        except BaseException:
            limiter.release_on_behalf_of(behind)
            raise
        return behind

    async def wait_for_room(self) -> None:
        """Return once fewer than :data:`WRITE_DEPTH` batches are queued or being written.

        Raises what an earlier write raised (nothing more is written after it).
        """
        while self.outstanding >= WRITE_DEPTH and self._failure is None:
            await self._done.park()
        if self._failure is not None:
            raise detached(self._failure)

    async def put(self, chunks: Sequence[Buffer]) -> None:
        """Queue ``chunks`` behind the batches queued (after :meth:`wait_for_room`, at once).

        Cancelled while it waits, the batch was not queued.
        """
        await self.wait_for_room()
        self.outstanding += 1
        self._jobs.put((chunks, sum(len(chunk) for chunk in chunks)))

    async def drain(self) -> None:
        """Wait until every batch queued was written; raise what a write raised."""
        await self.settle()
        if self._failure is not None:
            raise detached(self._failure)

    async def settle(self) -> None:
        """Wait until no batch is queued or being written, whatever happened to them."""
        while self.outstanding:
            await self._done.park()

    def close(self) -> None:
        """Let the thread return after the batches queued (written, or skipped after a failure)."""
        if not self._closed:
            self._closed = True
            self._jobs.put(_STOP)

    def _run(self) -> None:
        # In the worker thread: each batch as it comes, until told to stop.
        failed = False
        while (job := self._jobs.get()) is not _STOP:
            chunks, count = job
            result: outcome.Outcome[Any] | None
            if failed:  # the sink is in an unknown state: write nothing more
                result = None
            else:
                try:
                    self._write(chunks)
                except BaseException as exc:
                    failed = True
                    # Kept detached (_batch_done): its traceback, and the
                    # batch's records the frames in it hold, go with this
                    # outcome. (Not outcome.capture: its own frame would be
                    # in the traceback too, the batch in its arguments.)
                    result = outcome.Error(exc)
                else:
                    result = outcome.Value(None)
            del chunks, job  # the records the chunks pin can be reused now
            # Handed over in a box that the Trio thread empties: once the batch
            # is reported, this frame holds nothing of a failure, whose
            # traceback holds this frame (a cycle, see conduit._stored_errors)
            # and the write's, which holds the batch's records. (A local
            # deleted after the hand-off held them until this thread ran
            # again, which a loaded machine may put off past the report.)
            handed: list[outcome.Outcome[Any] | None] = [result]
            del result
            try:
                self._token.run_sync_soon(self._batch_done, handed, count)
            except trio.RunFinishedError:
                return

    def _batch_done(self, handed: list[outcome.Outcome[Any] | None], count: int) -> None:
        # In the Trio thread, in the order the batches were written (None: one
        # skipped after a failure). Outside any task: an exception escaping
        # here would crash the whole run, so the callback's is the transfer's
        # failure instead. Every batch written is reported, an empty one too
        # (a peer's zero-length DATA): the stream releases its kept batches
        # oldest first, one per report. ``handed`` holds the batch's outcome
        # (None: skipped), taken out of it here.
        result = handed.pop()
        self.outstanding -= 1
        if isinstance(result, outcome.Value):
            self.bytes_written += count
            result = outcome.capture(self._written)
        if isinstance(result, outcome.Error) and self._failure is None:
            # Kept detached, raised as fresh copies (see conduit._stored_errors):
            # its traceback holds the writer's frames, which hold this object.
            self._failure = detached(result.error)
        self._done.unpark_all()

    def _thread_ended(self, result: outcome.Outcome[Any]) -> None:
        # Called by the thread cache, in that thread, once _run returned.
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._limiter.release_on_behalf_of, self)
