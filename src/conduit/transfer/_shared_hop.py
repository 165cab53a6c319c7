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

Each call gets its own result or exception. A queued task that is cancelled
before its hop starts is dropped (its call never runs); a call already in a
hop runs to its end, as any worker-thread call does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import attrs
import trio

A = TypeVar("A")
R = TypeVar("R")

#: Calls run in one hop, at most (the rest wait for the next one).
MAX_CALLS_PER_HOP = 64


@attrs.define(eq=False)
class _Job(Generic[A, R]):
    arg: A
    #: Set when the job is done, or when its task is to lead the next hop.
    wake: trio.Event = attrs.field(factory=trio.Event)
    lead: bool = False
    done: bool = False
    result: R | None = None
    error: BaseException | None = None


class SharedHop(Generic[A, R]):
    """Run ``function(arg)`` in a worker thread, sharing the hop with concurrent callers.

    One instance belongs to one Trio run (its events are that run's).
    """

    def __init__(self, function: Callable[[A], R]) -> None:
        self._function = function
        self._queue: list[_Job[A, R]] = []
        #: A hop is under way, or a queued task has been told to lead one.
        self._busy = False

    async def run(self, arg: A) -> R:
        """``function(arg)``, run in a worker thread; its result, or its exception."""
        job: _Job[A, R] = _Job(arg)
        if self._busy:
            self._queue.append(job)
            try:
                await job.wake.wait()
            except BaseException:
                if not job.done:
                    if job in self._queue:
                        self._queue.remove(job)
                    if job.lead:
                        self._hand_on()
                raise
            if job.lead:
                self._queue.remove(job)
        else:
            self._busy = True
        if not job.done:
            await self._hop(job)
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    async def _hop(self, leader: _Job[A, R]) -> None:
        """Run the leader's call and the queued ones (up to the bound) in one hop."""
        jobs = [leader, *self._queue[: MAX_CALLS_PER_HOP - 1]]
        del self._queue[: MAX_CALLS_PER_HOP - 1]
        try:
            await trio.to_thread.run_sync(self._run_all, jobs)
        finally:
            for job in jobs:
                job.done = True
                job.wake.set()
            self._hand_on()

    def _run_all(self, jobs: list[_Job[A, R]]) -> None:
        # Worker thread: each call's outcome on its own job.
        for job in jobs:
            try:
                job.result = self._function(job.arg)
            except Exception as exc:
                job.error = exc

    def _hand_on(self) -> None:
        """The first queued task leads the next hop; or nobody is busy any more."""
        if self._queue:
            following = self._queue[0]
            following.lead = True
            following.wake.set()
        else:
            self._busy = False


__all__ = ["MAX_CALLS_PER_HOP", "SharedHop"]
