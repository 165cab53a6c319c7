"""Bookkeeping for RPC calls on one connection, both directions.

Calls are the hot path, so this module avoids per-call Trio objects where it
can (measured on the benchmark machine: a task start and exit ~7 us, a cancel
scope ~4 us, a ``move_on_after`` ~5 us, an Event ~3.5 us):

* :class:`PendingCalls` (calls we made) parks the caller with
  ``wait_task_rescheduled`` and wakes it straight from the receive task; all
  timeouts share one timer task and a heap of deadlines.
* :class:`CallWorkers` (calls we serve) keeps a pool of long-lived worker tasks,
  one per concurrently running call, so a slow handler never delays the others
  and a handler may call back into its peer. A CANCEL from the peer cancels
  that worker's scope; the worker ends and the pool starts a fresh one later.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import outcome
import trio

from .errors import ConnectionClosed, RemoteProtocolError, RPCError, RPCTimeoutError
from .protocol.messages import Call, Result

log = logging.getLogger("conduit.connection")


class _Pending:
    __slots__ = ("early", "method", "parked", "task", "timeout")

    def __init__(self, task: trio.lowlevel.Task, method: str, timeout: float | None) -> None:
        self.task = task
        self.method = method
        self.timeout = timeout
        self.parked = False
        self.early: outcome.Outcome[Result] | None = None

    def deliver(self, result: outcome.Outcome[Result]) -> None:
        """Wake the caller, or leave the outcome for it if it is still sending."""
        if self.parked:
            trio.lowlevel.reschedule(self.task, result)
        else:
            self.early = result


class PendingCalls:
    """Calls this side made and is waiting on."""

    def __init__(self, send_cancel: Callable[[int], None]) -> None:
        self._calls: dict[int, _Pending] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._send_cancel = send_cancel
        self._timer_scope: trio.CancelScope | None = None
        self._closed: str | None = None

    def __len__(self) -> int:
        return len(self._calls)

    async def wait(
        self,
        call_id: int,
        method: str,
        timeout: float | None,
        send: Callable[[], Awaitable[None]],
    ) -> Result:
        """Register ``call_id``, ``send`` the call, and park until its result arrives."""
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        # Registered before sending: the reply may arrive while send() yields.
        pending = self._calls[call_id] = _Pending(trio.lowlevel.current_task(), method, timeout)
        if timeout is not None:
            self._add_deadline(trio.current_time() + timeout, call_id)
        try:
            await send()
        except BaseException:
            self._calls.pop(call_id, None)
            raise
        if pending.early is not None:  # answered, timed out or failed while sending
            return pending.early.unwrap()
        pending.parked = True

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            # Cancelled by the caller's own scope: forget the call; the peer is
            # told below, once we are running again.
            del self._calls[call_id]
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            result: Result = await trio.lowlevel.wait_task_rescheduled(abort)
        except trio.Cancelled:
            self._send_cancel(call_id)
            raise
        return result

    def resolve(self, call_id: int, result: Result) -> None:
        """A RESULT arrived: wake its caller (unknown ids were given up on; ignore them)."""
        pending = self._calls.pop(call_id, None)
        if pending is not None:
            pending.deliver(outcome.Value(result))

    def fail_all(self, reason: str) -> None:
        """The connection ended: every waiting caller gets ConnectionClosed."""
        self._closed = reason
        calls, self._calls = self._calls, {}
        for pending in calls.values():
            pending.deliver(outcome.Error(ConnectionClosed(reason)))

    def _add_deadline(self, deadline: float, call_id: int) -> None:
        heapq.heappush(self._deadlines, (deadline, call_id))
        # Deadlines of answered calls stay in the heap until they come up;
        # rebuild it when they outnumber the live ones, so memory stays bounded.
        if len(self._deadlines) > 2 * len(self._calls) + 64:
            self._deadlines = [entry for entry in self._deadlines if entry[1] in self._calls]
            heapq.heapify(self._deadlines)
        scope = self._timer_scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline

    async def run_timer(self) -> None:
        """Fail calls whose timeout passed. Runs for the connection's lifetime."""
        while True:
            deadline = self._deadlines[0][0] if self._deadlines else float("inf")
            with trio.CancelScope(deadline=deadline) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, call_id = heapq.heappop(self._deadlines)
                pending = self._calls.pop(call_id, None)
                if pending is None:
                    continue  # answered in time
                error = RPCTimeoutError(
                    f"call to {pending.method!r} timed out after {pending.timeout:g}s"
                )
                pending.deliver(outcome.Error(error))
                self._send_cancel(call_id)


Dispatch = Callable[[str, dict[str, Any]], Awaitable[Any]]


class CallWorkers:
    """A pool of worker tasks running incoming calls, at most ``limit`` at once."""

    def __init__(
        self,
        limit: int,
        dispatch: Dispatch,
        send_result: Callable[[int, Result], Awaitable[None]],
        refuse: Callable[[int, Result], None],
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        label: str,
    ) -> None:
        self._limit = limit
        self._dispatch = dispatch
        self._send_result = send_result
        self._refuse = refuse
        self._spawn = spawn
        self._label = label
        self._queue: deque[tuple[int, Call]] = deque()
        self._idle = trio.lowlevel.ParkingLot()
        self._workers = 0
        self._active: set[int] = set()  # queued or running
        self._running: dict[int, trio.CancelScope] = {}

    def submit(self, call_id: int, call: Call) -> None:
        """Queue an incoming call; refuse it at once when over the limit."""
        if call_id in self._active:
            raise RemoteProtocolError(f"call id {call_id} is already in use")
        if len(self._active) >= self._limit:
            self._refuse(
                call_id,
                Result(
                    False,
                    error=f"too many concurrent calls (limit {self._limit})",
                    code="overloaded",
                ),
            )
            return
        self._active.add(call_id)
        self._queue.append((call_id, call))
        if self._idle:
            self._idle.unpark()
        elif self._workers < self._limit:
            self._workers += 1
            self._spawn(self._worker)

    def cancel(self, call_id: int) -> None:
        """The caller gave up: cancel the handler, or drop the call if not started."""
        scope = self._running.get(call_id)
        if scope is not None:
            scope.cancel()
            return
        for index, (queued, _) in enumerate(self._queue):
            if queued == call_id:
                del self._queue[index]
                self._active.discard(call_id)
                return

    async def _worker(self) -> None:
        try:
            # One scope for the worker's whole life: a CANCEL ends the worker,
            # which is rare, instead of costing a scope on every call.
            with trio.CancelScope() as scope:
                while True:
                    while not self._queue:
                        await self._idle.park()
                    call_id, call = self._queue.popleft()
                    self._running[call_id] = scope
                    try:
                        result = await self._run(call)
                    finally:
                        del self._running[call_id]
                        self._active.discard(call_id)
                    if result is not None:
                        await self._send_result(call_id, result)
        finally:
            self._workers -= 1
            if self._queue and not self._idle:
                # Cancelled with calls still queued and nobody idle: start a successor.
                self._workers += 1
                try:
                    self._spawn(self._worker)
                except ConnectionClosed:
                    self._workers -= 1

    async def _run(self, call: Call) -> Result | None:
        try:
            value = await self._dispatch(call.method, call.args)
        except RPCError as exc:
            return Result(False, error=exc.message, code=exc.code)
        except ConnectionClosed:
            return None
        except Exception as exc:
            log.exception("%s: RPC handler %r failed", self._label, call.method)
            return Result(False, error=f"{type(exc).__name__}: {exc}", code="handler_error")
        return Result(True, value)
