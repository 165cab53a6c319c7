"""Calls of one blocking function from many tasks, run many per worker-thread hop.

A worker-thread hop costs tens of microseconds of CPU (waking a thread,
handing it the GIL, waking the event loop with the answer), which is more
than looking at a small file costs. Eight tasks that each open and read a
small file would pay eight hops; :class:`SharedHop` makes them pay one:

* a task that finds no hop under way runs its call at once, alone (a lone
  caller waits for nothing);
* a task that arrives while a hop is under way queues; when the hop ends, the
  first queued task leads the next hop, which runs every queued call in one
  worker thread, one after the other.

Each call gets its own result or exception; a hop that fails as a whole
(no worker thread could be had) fails each call it carried that had not run
with a copy of its error. A queued task that is cancelled
before its hop starts is dropped (its call never runs); a call already in a
hop runs to its end, as any worker-thread call does (the leader's hop is
shielded: its cancellation must not leave the calls it carries unanswered).

The shared hops run on a persistent worker thread (:class:`.._worker_hop.WorkerHop`),
cheaper than a ``trio.to_thread`` hop; only one shared hop is under way at a
time, so one thread serves them.

A slow call (a file on a hung network mount) must not hold up everyone: a
task never queues behind a hop that has run for :data:`STALLED_AFTER` seconds,
and a task that has waited that long in the queue leaves it; both run their
call in a hop of their own instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import attrs
import trio

from .. import _threads
from .._stored_errors import detached
from .._worker_hop import IDLE_TIMEOUT, WorkerHop

A = TypeVar("A")
R = TypeVar("R")

#: Calls run in one hop, at most (the rest wait for the next one).
MAX_CALLS_PER_HOP = 64
#: Seconds after which a hop under way counts as stalled: nobody waits for it.
STALLED_AFTER = 0.05


@attrs.define(eq=False)
class _Job(Generic[A, R]):
    arg: A
    #: Set when the job is done, or when its task is to lead the next hop.
    wake: trio.Event = attrs.field(factory=trio.Event)
    lead: bool = False
    done: bool = False
    #: Its call was run (a worker thread took it): its outcome is its own.
    ran: bool = False
    result: R | None = None
    error: BaseException | None = None
    #: Its caller was cancelled: nobody will take the outcome.
    abandoned: bool = False


def _not_run(failure: BaseException) -> Exception:
    """The error of a call whose hop failed before running it: a copy of the
    hop's ``failure`` (its leader raises the failure itself), or a
    ``RuntimeError`` naming it where no copy can be made (the same object,
    raised in many tasks, would carry their tracebacks into one another) or
    where it is not an ``Exception`` (a ``KeyboardInterrupt`` is the
    leader's to raise)."""
    if isinstance(failure, Exception):
        copy = detached(failure)
        if copy is not failure:
            return copy
    return RuntimeError(f"the shared hop failed before this call ran: {failure!r}")


class SharedHop(Generic[A, R]):
    """Run ``function(arg)`` in a worker thread, sharing the hop with concurrent callers.

    One instance belongs to one Trio run (its events are that run's). Its
    thread exits once idle for ``idle_timeout`` seconds, or at :meth:`close`.
    """

    def __init__(
        self,
        function: Callable[[A], R],
        *,
        name: str = "shared hop",
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        """``name`` names the thread (``conduit <name> N``)."""
        self._function = function
        self._queue: list[_Job[A, R]] = []
        #: A hop is under way, or a queued task has been told to lead one.
        self._busy = False
        #: When the last shared hop started (Trio's clock).
        self._started = 0.0
        #: The shared hops' thread (one hop at a time; a stalled one is not
        #: queued behind: those go alone, on Trio's threads).
        self._worker = WorkerHop(name, idle_timeout=idle_timeout)

    async def run(self, arg: A) -> R:
        """``function(arg)``, run in a worker thread; its result, or its exception."""
        job: _Job[A, R] = _Job(arg)
        try:
            if not self._busy:
                self._busy = True
                await self._hop(job)
            elif trio.current_time() - self._started < STALLED_AFTER:
                self._queue.append(job)
                try:
                    with trio.move_on_after(STALLED_AFTER):
                        await job.wake.wait()
                except BaseException:
                    if not job.done:
                        self._leave(job)
                    raise
                if job.lead:
                    self._queue.remove(job)
                    await self._hop(job)
                elif job in self._queue:
                    # Still queued behind a stalled hop: go alone.
                    self._queue.remove(job)
                    await self._alone(job)
                else:
                    await job.wake.wait()  # taken by a hop under way: its call is running
            else:
                await self._alone(job)
        except BaseException:
            # Cancelled: the error nobody will raise is dropped, here if its
            # hop is over, else by that hop when it is (see _hop).
            job.abandoned = True
            job.error = None
            raise
        error, job.error = job.error, None
        if error is not None:
            try:
                raise error
            finally:
                # Its traceback holds the worker's frames (which hold the job)
                # and this one: neither may hold it back (see
                # conduit._stored_errors), or the cycle outlives the call.
                del error
        return job.result  # type: ignore[return-value]

    def close(self) -> None:
        """Let the shared hops' thread exit (see :meth:`.._worker_hop.WorkerHop.close`)."""
        self._worker.close()

    def _leave(self, job: _Job[A, R]) -> None:
        """A queued task gives up (cancelled): drop its call, pass on the lead it got."""
        if job in self._queue:
            self._queue.remove(job)
        if job.lead:
            self._hand_on()

    async def _hop(self, leader: _Job[A, R]) -> None:
        """Run the leader's call and the queued ones (up to the bound) in one hop."""
        jobs = [leader, *self._queue[: MAX_CALLS_PER_HOP - 1]]
        del self._queue[: MAX_CALLS_PER_HOP - 1]
        self._started = trio.current_time()
        try:
            with trio.CancelScope(shield=True):
                await self._worker.run(self._run_all, jobs)
        except BaseException as exc:
            # The hop failed as a whole (no thread could be started, say):
            # the leader raises it; a call carried along that never ran must
            # fail too, not return None as if it had (a copy each: see
            # conduit._stored_errors).
            for job in jobs[1:]:
                if not job.ran:
                    job.error = _not_run(exc)
            raise
        finally:
            for job in jobs:
                job.done = True
                if job.abandoned:
                    # Its traceback holds the worker's frames, which hold the
                    # jobs: kept, it would close a cycle (see
                    # conduit._stored_errors).
                    job.error = None
                job.wake.set()
            self._hand_on()

    async def _alone(self, job: _Job[A, R]) -> None:
        """Run one call in a hop of its own, beside the shared ones."""
        await _threads.run_sync(self._run_all, [job])
        job.done = True

    def _run_all(self, jobs: list[_Job[A, R]]) -> None:
        # Worker thread: each call's outcome on its own job, a BaseException
        # (SystemExit) too: it is that call's, raised to its own caller, and
        # the calls behind it still run.
        for job in jobs:
            job.ran = True
            try:
                job.result = self._function(job.arg)
            except BaseException as exc:
                job.error = exc

    def _hand_on(self) -> None:
        """The first queued task leads the next hop; or nobody is busy any more."""
        if self._queue:
            following = self._queue[0]
            following.lead = True
            following.wake.set()
        else:
            self._busy = False


__all__ = ["MAX_CALLS_PER_HOP", "STALLED_AFTER", "SharedHop"]
