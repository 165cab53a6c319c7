"""The pool of worker tasks that run the calls a peer makes.

Long-lived workers, one per concurrently running call, so a slow handler never
delays the others and a handler may call back into its peer, without paying a
task start (~7 us) per call. A CANCEL from the peer cancels that worker's scope;
the worker ends and the pool starts a fresh one later. Which call ids are in
use and how many may run is the state machine's
(:class:`~conduit.protocol.connection.ConnectionState`) to decide.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .errors import ConnectionClosed, RPCError
from .protocol.connection import CallReceived
from .protocol.messages import Call, Result

log = logging.getLogger("conduit.connection")

Dispatch = Callable[[str, dict[str, Any]], Awaitable[Any]]


class CallWorkers:
    """A pool of worker tasks running incoming calls, at most ``limit`` at once."""

    def __init__(
        self,
        limit: int,
        dispatch: Dispatch,
        send_result: Callable[[int, Result], Awaitable[None]],
        finished: Callable[[int], None],
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        label: str,
    ) -> None:
        self._limit = limit
        self._dispatch = dispatch
        self._send_result = send_result
        self._finished = finished
        self._spawn = spawn
        self._label = label
        self._queue: deque[CallReceived] = deque()
        self._idle = trio.lowlevel.ParkingLot()
        self._workers = 0
        self._running: dict[int, trio.CancelScope] = {}

    def submit(self, event: CallReceived) -> None:
        """Queue an incoming call the state machine accepted."""
        self._queue.append(event)
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
        for index, queued in enumerate(self._queue):
            if queued.call_id == call_id:
                del self._queue[index]
                self._finished(call_id)
                return

    async def _worker(self) -> None:
        try:
            # One scope for the worker's whole life: a CANCEL ends the worker,
            # which is rare, instead of costing a scope on every call.
            with trio.CancelScope() as scope:
                while True:
                    while not self._queue:
                        await self._idle.park()
                    event = self._queue.popleft()
                    call_id = event.call_id
                    self._running[call_id] = scope
                    try:
                        result = await self._run(event.call)
                    finally:
                        del self._running[call_id]
                        self._finished(call_id)
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
