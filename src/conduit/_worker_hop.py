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

The called function runs in a copy of the caller's context, like
``to_thread``; it must not call back into Trio (``trio.from_thread`` needs the
thread state ``to_thread`` sets up, which this hop does not).
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

R = TypeVar("R")

#: Seconds a worker thread waits for its next call before it exits (as Trio's
#: own thread cache does).
IDLE_TIMEOUT = 10.0

_QUEUED, _TAKEN, _WITHDRAWN = 0, 1, 2


class _Call:
    """One call: what to run, where to deliver it, and whether a thread took it."""

    __slots__ = ("args", "context", "function", "state", "task", "token")

    def __init__(self, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.function = function
        self.args = args
        self.context = contextvars.copy_context()
        self.token = trio.lowlevel.current_trio_token()
        self.task = trio.lowlevel.current_task()
        self.state = _QUEUED


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

    @property
    def threads(self) -> int:
        """Worker threads alive now (busy or idle)."""
        return self._threads

    async def run(self, function: Callable[..., R], *args: Any) -> R:
        """``function(*args)`` in a worker thread; its result, or its exception."""
        await trio.lowlevel.checkpoint_if_cancelled()
        call = _Call(function, args)
        start = False
        with self._lock:
            self._queued += 1
            if self._queued > self._idle and self._threads < self.max_threads:
                self._threads += 1
                self._started += 1
                start = True
            number = self._started
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
        while True:
            with lock:
                self._idle += 1
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
                    self._idle -= 1
                continue
            with lock:
                self._idle -= 1
                self._queued -= 1
                if call is _STOP:
                    self._threads -= 1
                    return
                if call.state == _WITHDRAWN:
                    continue
                call.state = _TAKEN
            result = outcome.capture(call.context.run, call.function, *call.args)
            # A run cannot end while its task waits here (the wait is not
            # abandoned on cancel); the guard is for a run torn down anyway.
            with contextlib.suppress(trio.RunFinishedError):
                call.token.run_sync_soon(trio.lowlevel.reschedule, call.task, result)
            del call, result  # drop references before waiting again


__all__ = ["IDLE_TIMEOUT", "WorkerHop"]
