"""A worker-thread job that a cancellation stops between two of its steps.

Trio cannot abandon a thread whose job holds something (a partial file's
lock, a disk reservation, a transfer slot): with ``trio.to_thread.run_sync``
a cancelled caller then waits for the whole job. Opening a partial to resume
it hashes every byte already in it, seconds for many GiB, and all that time
the cancelled transfer keeps its slot. A job run by :func:`run_stoppable` is
given a ``stop`` event instead, set when its caller is cancelled; it checks
the event between steps and gives up with :class:`Stopped`, so the caller
waits for one step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

from .. import _threads

T = TypeVar("T")


class Stopped(Exception):
    """Raised by a job that found its ``stop`` event set (its caller was cancelled)."""


async def run_stoppable(job: Callable[[threading.Event], T], *, name: str) -> T:
    """``job(stop)`` in a worker thread; a cancellation sets ``stop`` and waits for the job.

    Like ``trio.to_thread.run_sync`` (Trio's thread cache, within its default
    thread limiter): if the job returns although the caller was cancelled,
    its value is returned and the cancellation comes at the caller's next
    checkpoint, so the caller's cleanup sees what the job made. A job that
    stopped ends in the cancellation itself, never in :class:`Stopped`.
    """
    async with trio.to_thread.current_default_thread_limiter():
        stop = threading.Event()
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[T | _threads.Raised]) -> None:
            # The task is parked until this runs, so the run cannot have ended.
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            stop.set()
            return trio.lowlevel.Abort.FAILED  # rescheduled by deliver, soon

        # The job's error comes back as a value (see conduit._threads: raised
        # out of the thread, it would be in a reference cycle).
        trio.lowlevel.start_thread_soon(lambda: _threads.returned(job, stop), deliver, name=name)
        try:
            result: T = _threads.unwrap(await trio.lowlevel.wait_task_rescheduled(abort))
        except Stopped:
            # What set stop (a cancellation, or a KeyboardInterrupt delivered
            # to this task) comes out at this checkpoint.
            await trio.lowlevel.checkpoint()
            raise  # pragma: no cover - stop is set only by an abort
        return result


__all__ = ["Stopped", "run_stoppable"]
