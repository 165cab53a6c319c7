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
* a call goes straight to one idle thread, the one idle for the shortest
  time: each idle thread waits on a lock of its own, and the caller releases
  that one lock, so one call wakes one thread (on one shared queue, a ``get``
  that takes an item wakes the next waiter too, and two idle threads were both
  woken per call). A call that finds no idle thread waits in a backlog the
  busy threads drain in order. It comes back as a ``run_sync_soon`` on the
  caller's Trio token that reschedules the waiting task, so one hop may serve
  several Trio runs (each call carries its own token);
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
(of one kind: ``inline_kind``) the hop stops waiting inline for calls of
that kind for :data:`INLINE_BACKOFF` seconds, so a disk
whose fsyncs take milliseconds costs the loop two ``wait_inline`` per backoff
period, not one per call (one miss alone, a thread preempted on a loaded
machine, does not turn it off). A call that has to start a thread is not
waited for inline (starting one takes longer than the wait).

The called function runs in a copy of the caller's context, like
``to_thread``; it must not call back into Trio (``trio.from_thread`` needs the
thread state ``to_thread`` sets up, which this hop does not).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Hashable
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

    def take_outcome(self) -> outcome.Outcome[Any]:
        """The outcome handed over, no longer kept here: unwrapped, an error's
        traceback holds the caller's frame, which holds this call (a reference
        cycle otherwise, see :mod:`conduit._stored_errors`)."""
        taken, self.outcome = self.outcome, None
        assert taken is not None
        return taken


class _Stop:
    """Handed to an idle thread by :meth:`WorkerHop.close`: exit."""


_STOP = _Stop()


class _Worker:
    """One thread's own hand-off: its wake lock, and what it is handed."""

    __slots__ = ("handed", "wake")

    def __init__(self) -> None:
        #: Held while the thread waits; releasing it wakes this thread alone.
        self.wake = threading.Lock()
        self.wake.acquire()
        self.handed: _Call | _Stop | None = None


class _InlineRecord:
    """One kind of call's inline waits: misses in a row, and until when it is not waited for."""

    __slots__ = ("misses", "slow_until")

    def __init__(self) -> None:
        #: Inline waits in a row that timed out.
        self.misses = 0
        #: Until when (``time.monotonic``) calls of the kind are not waited for inline.
        self.slow_until = 0.0


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
        # Guards everything below and each call's state (a withdrawal racing
        # the thread that takes the call); held for a few bytecodes only.
        self._lock = threading.Lock()
        #: Idle threads, the one idle for the shortest time last: a call goes
        #: to it (its stack and the store's data are the likeliest in cache).
        self._idle: list[_Worker] = []
        #: Calls no idle thread was there to take, in order.
        self._backlog: collections.deque[_Call] = collections.deque()
        self._threads = 0
        #: Busy threads that :meth:`close` asked to exit once out of work.
        self._retiring = 0
        self._started = 0
        #: Each kind of call's record of inline waits (see :meth:`run`).
        self._inline: dict[Hashable, _InlineRecord] = {}

    @property
    def threads(self) -> int:
        """Worker threads alive now (busy or idle)."""
        return self._threads

    async def run(
        self,
        function: Callable[..., R],
        *args: Any,
        wait_inline: float = 0.0,
        inline_kind: Hashable = None,
    ) -> R:
        """``function(*args)`` in a worker thread; its result, or its exception.

        ``wait_inline``: seconds the Trio thread may block waiting for a short
        call before it waits through the loop (see the module docstring). A
        call is always a cancel point; one answered within ``wait_inline`` is
        not a schedule point (the loop did not run meanwhile).

        ``inline_kind``: calls of one kind (of about the same length) share
        their record of misses and back off together; a kind's calls answered
        in time do not excuse another's that keep outlasting the wait. Give a
        few kinds per hop, not one per call.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        call = _Call(function, args)
        waiter = None
        record = None
        if wait_inline > 0.0:
            record = self._inline.get(inline_kind)
            if record is None:
                record = self._inline[inline_kind] = _InlineRecord()
            if time.monotonic() >= record.slow_until:
                waiter = threading.Lock()
                waiter.acquire()
        start = False
        worker = None
        with self._lock:
            if self._idle:
                # Straight to one idle thread: it alone is woken.
                worker = self._idle.pop()
                worker.handed = call
                call.state = _TAKEN
            else:
                # No thread takes it at once: start one if allowed, and wait
                # through the loop (a thread's start, or a busy thread's
                # current call, is no short wait).
                waiter = None
                self._backlog.append(call)
                if self._threads < self.max_threads:
                    self._threads += 1
                    self._started += 1
                    start = True
            number = self._started
            call.waiter = waiter
        if worker is not None:
            worker.wake.release()
        elif start:
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
            assert record is not None
            if waiter.acquire(timeout=wait_inline):
                record.misses = 0
            else:
                with self._lock:
                    if call.outcome is None:
                        # Still running: hear back through the loop.
                        call.waiter = None
                        record.misses += 1
                        if record.misses >= INLINE_MISSES:
                            record.misses = 0
                            record.slow_until = time.monotonic() + INLINE_BACKOFF
            if call.outcome is not None:
                result_: R = call.take_outcome().unwrap()
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
            idle, self._idle = self._idle, []
            self._threads -= len(idle)
            self._retiring = self._threads
            for worker in idle:
                worker.handed = _STOP
        for worker in idle:
            worker.wake.release()

    def _withdraw(self, call: _Call) -> bool:
        """Withdraw ``call`` if no thread has taken it (it is then skipped when taken)."""
        with self._lock:
            if call.state != _QUEUED:
                return False
            call.state = _WITHDRAWN
            return True

    def _next(self, worker: _Worker) -> _Call | None:
        """The next call of the backlog; else idle (None), or exit (``_STOP``)."""
        with self._lock:
            while self._backlog:
                call = self._backlog.popleft()
                if call.state == _QUEUED:
                    call.state = _TAKEN
                    return call
            if self._retiring:
                self._retiring -= 1
                self._threads -= 1
                worker.handed = _STOP
            else:
                worker.handed = None
                self._idle.append(worker)
            return None

    def _wait(self, worker: _Worker) -> _Call | None:
        """Wait for a hand-off; the call, or None to exit."""
        if not worker.wake.acquire(timeout=self.idle_timeout):
            with self._lock:
                if worker in self._idle:
                    # Nothing was handed over meanwhile: exit.
                    self._idle.remove(worker)
                    self._threads -= 1
                    return None
            # Handed something as the wait ran out: its release is on its way.
            worker.wake.acquire()
        handed = worker.handed
        return handed if isinstance(handed, _Call) else None

    def _work(self) -> None:
        lock = self._lock
        worker = _Worker()
        call = self._next(worker)
        while True:
            if call is None:
                if worker.handed is _STOP:
                    return
                call = self._wait(worker)
                if call is None:
                    return
            result = outcome.capture(call.context.run, call.function, *call.args)
            # Idle again (or on to the backlog's next call) before the caller
            # hears back: its next call (the caller's task may run before this
            # thread waits again) must find this thread, not start another one.
            following = self._next(worker)
            with lock:
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
            del result, waiter  # drop references before waiting again
            call = following


__all__ = ["IDLE_TIMEOUT", "INLINE_BACKOFF", "INLINE_MISSES", "WorkerHop"]
