"""A cheaper worker-thread hop for short blocking calls: persistent threads, one hand-off.

``trio.to_thread.run_sync`` costs about 55 µs of CPU per call on the
benchmark machine (a capacity-limiter round trip, a copied context, a thread
taken from the cache and renamed with two ``prctl`` calls, then the wake-up
back into Trio). A small upload pays that on both ends for a few
microseconds of file work. :class:`WorkerHop` keeps the part that cannot go
(one futex wake of a waiting thread, one wake-up of the Trio loop through its
token) and drops the rest, for about 35 µs:

* each hop owns up to ``max_threads`` threads, started on demand and kept
  while they are busy; a thread idle for ``idle_timeout`` seconds exits, and
  :meth:`WorkerHop.close` ends them all (the threads are daemons, so an
  interpreter never waits for them either);
* a call is handed over through a ``queue.SimpleQueue`` (a C queue: no Python
  lock on the hand-off) and comes back as a ``run_sync_soon`` on the caller's
  Trio token that reschedules the waiting task, so one hop may serve several
  Trio runs (each call carries its own token);
* cancellation is ``trio.to_thread.run_sync``'s (``abandon_on_cancel=False``):
  a call no thread has taken yet is withdrawn and raises ``Cancelled``; a call
  a thread has started runs to its end, and its outcome is delivered.

A call expected to be short may be waited for in the Trio thread first
(``wait_inline=seconds``): the Trio thread blocks on a lock, without the GIL,
for at most that long, and the worker hands the outcome over through that
lock. A sequential small upload measured why (the ``smallfiles`` scenario's
server, per file): the way back through the loop (the wake-up socket's byte,
``epoll_wait`` returning, ``run_sync_soon``'s queue, a reschedule, one more
pass of the loop, and the GIL taken back from the worker while it is still
finishing) cost the Trio thread about 60-100 µs of CPU, more than the store
itself. Waiting on a lock the worker releases costs one futex wake. The loop
stalls for at most ``wait_inline``; a call that outlasts it is heard back
through the loop as usual; after :data:`INLINE_MISSES` such calls in a row
the hop stops waiting inline for :data:`INLINE_BACKOFF` seconds, so a disk
whose fsyncs take milliseconds costs the loop two ``wait_inline`` per backoff
period, not one per call (one miss alone, a thread preempted on a loaded
machine, does not turn it off). A call that has to start a thread is not
waited for inline (starting one takes longer than the wait).

The called function runs in a copy of the caller's context, like
``to_thread``; it must not call back into Trio (``trio.from_thread`` needs the
thread state ``to_thread`` sets up, which this hop does not).
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

R = TypeVar("R")

#: Seconds a worker thread waits for its next call before it exits (as Trio's
#: own thread cache does).
IDLE_TIMEOUT = 10.0

#: Calls in a row that outlast their ``wait_inline`` before a hop stops waiting inline.
INLINE_MISSES = 2
#: Seconds a hop then stops waiting inline.
INLINE_BACKOFF = 0.25

_QUEUED, _TAKEN, _WITHDRAWN = 0, 1, 2


class _Call:
    """One call: what to run, where to deliver it, and whether a thread took it."""

    __slots__ = ("args", "context", "function", "outcome", "state", "task", "token", "waiter")

    def __init__(self, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.function = function
        self.args = args
        self.context = contextvars.copy_context()
        self.token = trio.lowlevel.current_trio_token()
        self.task = trio.lowlevel.current_task()
        self.state = _QUEUED
        #: Held by a Trio thread waiting inline; the worker releases it (under
        #: the hop's lock the worker reads it and the Trio thread clears it).
        self.waiter: threading.Lock | None = None
        #: The outcome, when it is handed over through ``waiter``.
        self.outcome: outcome.Outcome[Any] | None = None


#: Tells one worker thread to exit (see :meth:`WorkerHop.close`).
_STOP = None


class WorkerHop:
    """Run blocking functions in up to ``max_threads`` persistent worker threads.

    Thread-safe: any Trio run in the process may use one instance.
    """

    def __init__(
        self, name: str, *, max_threads: int = 1, idle_timeout: float = IDLE_TIMEOUT
    ) -> None:
        """``name`` names the threads (``conduit <name> N``)."""
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        self.name = name
        self.max_threads = max_threads
        self.idle_timeout = idle_timeout
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        # Guards the counts below and each call's state (a withdrawal racing
        # the thread that takes the call); held for a few bytecodes only.
        self._lock = threading.Lock()
        self._threads = 0
        #: Calls (and stop marks) put and not yet taken by a thread.
        self._queued = 0
        #: Threads waiting for a call.
        self._idle = 0
        self._started = 0
        #: Until when (``time.monotonic``) calls are not waited for inline.
        self._slow_until = 0.0
        #: Inline waits in a row that timed out.
        self._misses = 0

    @property
    def threads(self) -> int:
        """Worker threads alive now (busy or idle)."""
        return self._threads

    async def run(self, function: Callable[..., R], *args: Any, wait_inline: float = 0.0) -> R:
        """``function(*args)`` in a worker thread; its result, or its exception.

        ``wait_inline``: seconds the Trio thread may block waiting for a short
        call before it waits through the loop (see the module docstring). A
        call is always a cancel point; one answered within ``wait_inline`` is
        not a schedule point (the loop did not run meanwhile).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        call = _Call(function, args)
        waiter = None
        if wait_inline > 0.0 and time.monotonic() >= self._slow_until:
            waiter = threading.Lock()
            waiter.acquire()
        start = False
        with self._lock:
            self._queued += 1
            if self._queued > self._idle:
                # No idle thread takes it at once: start one if allowed, and
                # wait through the loop (a thread's start, or a busy thread's
                # current call, is no short wait).
                waiter = None
                if self._threads < self.max_threads:
                    self._threads += 1
                    self._started += 1
                    start = True
            number = self._started
            call.waiter = waiter
        self._calls.put(call)
        if start:
            try:
                threading.Thread(
                    target=self._work, name=f"conduit {self.name} {number}", daemon=True
                ).start()
            except BaseException:
                with self._lock:
                    self._threads -= 1
                self._withdraw(call)
                raise
        if waiter is not None:
            if waiter.acquire(timeout=wait_inline):
                self._misses = 0
            else:
                with self._lock:
                    if call.outcome is None:
                        # Still running: hear back through the loop.
                        call.waiter = None
                        self._misses += 1
                        if self._misses >= INLINE_MISSES:
                            self._misses = 0
                            self._slow_until = time.monotonic() + INLINE_BACKOFF
            if call.outcome is not None:
                result_: R = call.outcome.unwrap()
                return result_

        def abort(_: Any) -> trio.lowlevel.Abort:
            return (
                trio.lowlevel.Abort.SUCCEEDED
                if self._withdraw(call)
                else trio.lowlevel.Abort.FAILED
            )

        result: R = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def close(self) -> None:
        """Let every worker thread exit once the calls already handed over are done.

        The hop stays usable: a later :meth:`run` starts a thread again.
        """
        with self._lock:
            count = self._threads
            self._queued += count
        for _ in range(count):
            self._calls.put(_STOP)

    def _withdraw(self, call: _Call) -> bool:
        """Withdraw ``call`` if no thread has taken it (it is then skipped when taken)."""
        with self._lock:
            if call.state != _QUEUED:
                return False
            call.state = _WITHDRAWN
            return True

    def _work(self) -> None:
        lock = self._lock
        with lock:
            self._idle += 1
        while True:
            try:
                call = self._calls.get(timeout=self.idle_timeout)
            except queue.Empty:
                with lock:
                    if self._queued <= self._idle - 1:
                        # Nothing was handed over meanwhile that another idle
                        # thread would not take: exit.
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            with lock:
                self._queued -= 1
                if call is _STOP:
                    self._idle -= 1
                    self._threads -= 1
                    return
                if call.state == _WITHDRAWN:
                    continue
                self._idle -= 1
                call.state = _TAKEN
            result = outcome.capture(call.context.run, call.function, *call.args)
            # Idle again before the caller hears back: its next call (the
            # caller's task may run before this thread reaches ``get``) must
            # find this thread, not start another one.
            with lock:
                self._idle += 1
                waiter = call.waiter
                if waiter is not None:
                    call.outcome = result
            if waiter is not None:
                waiter.release()  # the Trio thread waits inline for it
            else:
                # A run cannot end while its task waits here (the wait is not
                # abandoned on cancel); the guard is for a run torn down anyway.
                with contextlib.suppress(trio.RunFinishedError):
                    call.token.run_sync_soon(trio.lowlevel.reschedule, call.task, result)
            del call, result, waiter  # drop references before waiting again


__all__ = ["IDLE_TIMEOUT", "INLINE_BACKOFF", "INLINE_MISSES", "WorkerHop"]
