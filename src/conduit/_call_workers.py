"""The tasks that read a connection and run the calls its peer makes (leader/follower).

One task at a time holds the *reading role*: it reads records, feeds the state
machine and, when a CALL arrives, runs the handler itself, right there (in a
copy of its contextvars, as a task of its own would have). Most
handlers finish without ever blocking (an echo, a lookup, a computation): the
result is queued and the reader reads on, with no task switch at all for the
call. When a handler blocks (it awaits I/O, a sleep, a call back into the
peer), the reading role passes to a follower (an idle task of this pool, or a
new one) before Trio gets control, so the other calls and the data streams go
on; the task that read the call finishes it, sends the result, and then waits
to be handed the reading role again.

So a slow handler still never delays the others and a handler may call back
into its peer, while the common call costs no hop between a reader and a
worker. A CANCEL from the peer cancels the scope of the task running that
call (one scope for the task's whole life, as a scope per call costs ~4 us);
the task then ends, and the pool starts a fresh one when it needs one. Which
call ids are in use and how many may run is the state machine's
(:class:`~conduit.protocol.connection.ConnectionState`) to decide.
"""

from __future__ import annotations

import contextvars
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import outcome
import trio

from .errors import CallbackCancelledError, ConnectionClosed, RPCError
from .protocol.connection import CallReceived
from .protocol.messages import Result

log = logging.getLogger("conduit.connection")

#: The most characters of an error message a RESULT carries: a handler's
#: exception with a megabyte of text must still reach its caller, shortened.
MAX_ERROR_TEXT = 8192


class UnsendableResult(Exception):
    """What a dispatcher raises when a handler returned but its value cannot
    go on the wire (answered ``bad_result``, not taken for the handler's own failure)."""


def _text(value: object) -> str:
    """``value`` as a RESULT's text: a str, never raising, at most MAX_ERROR_TEXT long."""
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:  # a __str__ that raises must not end the connection
        text = f"<{type(value).__name__} that cannot be shown>"
    if len(text) > MAX_ERROR_TEXT:
        text = f"{text[:MAX_ERROR_TEXT]}... ({len(text) - MAX_ERROR_TEXT} characters cut)"
    return text


Dispatch = Callable[[str, dict[str, Any]], Coroutine[Any, Any, Any]]

#: Idle tasks kept waiting for the reading role; one finishing a blocked call
#: while this many wait ends instead. Not a limit on running calls (that is
#: ``max_concurrent_calls``): a reader that must hand off and finds nobody
#: idle starts a new task.
MAX_IDLE_FOLLOWERS = 32


class Blocked:
    """A call whose handler blocked while the reader ran it: the rest runs off the reading path."""

    __slots__ = ("call_id", "context", "coroutine", "method", "trap")

    def __init__(
        self,
        call_id: int,
        method: str,
        coroutine: Coroutine[Any, Any, Any],
        trap: Any,
        context: contextvars.Context,
    ):
        self.call_id = call_id
        self.method = method
        self.coroutine = coroutine
        #: What the coroutine yielded to Trio when it blocked, still to be passed on.
        self.trap = trap
        #: The call's own contextvars, in which every step of it runs.
        self.context = context


@types.coroutine
def _resume(
    coroutine: Coroutine[Any, Any, Any], trap: Any, context: contextvars.Context
) -> Generator[Any, Any, Any]:
    """Go on running ``coroutine``, which yielded ``trap`` while driven by hand,
    each step in its call's ``context``.

    The coroutine started in this same task (the reader), so the trap (a Trio
    wait, a checkpoint) is this task's: it is passed to Trio unchanged, and
    Trio's answer is passed back, as ``await`` would have done.
    """
    while True:
        try:
            reply = yield trap
        except BaseException as exc:  # thrown into us (close()): the coroutine's to handle
            try:
                trap = context.run(coroutine.throw, exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                trap = context.run(coroutine.send, reply)
            except StopIteration as stop:
                return stop.value
            finally:
                # Trio's answer may be an Error outcome (a Cancelled, say): its
                # exception, raised out of the coroutine and through this frame,
                # must not find it still here (a reference cycle, see
                # conduit._stored_errors).
                del reply


async def _over(*_: object) -> None:
    raise ConnectionClosed("the connection is over")


def _ignore(*_: object) -> None:
    pass


class CallRunners:
    """The reading role and the tasks that take turns at it (see the module docstring)."""

    def __init__(
        self,
        read: Callable[[], Awaitable[Blocked | None]],
        dispatch: Dispatch,
        queue_result: Callable[[int, Result], None],
        queue_value: Callable[[int, Any], None],
        send_result: Callable[[int, Result], Awaitable[None]],
        finished: Callable[[int], None],
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
        label: str,
    ) -> None:
        self._read = read
        self._dispatch = dispatch
        self._queue_result = queue_result
        #: Queues the RESULT of a call that returned a value and frees the
        #: call's id (``finished`` is not called for it as well).
        self._queue_value = queue_value
        self._send_result = send_result
        self._finished = finished
        self._spawn = spawn
        self._label = label
        # Tasks parked until handed the reading role, most recently parked last.
        self._followers: list[trio.lowlevel.Task] = []
        # Calls that blocked, by id: the scope that cancels the task running each.
        self._running: dict[int, trio.CancelScope] = {}
        # The tasks finishing a call that blocked, until its answer is sent
        # (see answering), and where to wait for one to be.
        self._answering: set[trio.lowlevel.Task] = set()
        self._answered = trio.lowlevel.ParkingLot()

    async def run(self) -> None:
        """One task's life: read while holding the role, finish a call that blocked, follow.

        The connection starts the first one, holding the reading role.
        """
        with trio.CancelScope() as scope:
            while True:
                blocked = await self._read()
                if blocked is None:
                    return  # the connection is over
                self._pass_reading()
                await self._finish(blocked, scope)
                if len(self._followers) >= MAX_IDLE_FOLLOWERS:
                    return
                await self._follow()

    def detach(self) -> None:
        """The connection is over: drop its callbacks.

        They are its bound methods, so they and the connection hold each
        other: a reference cycle left to Python's cycle collector.
        """
        self._read = self._dispatch = self._send_result = _over
        self._queue_result = self._queue_value = self._finished = self._spawn = _ignore

    def start(self, event: CallReceived) -> Blocked | None:
        """Run an incoming call in the reading task until it finishes or first blocks.

        A call that finishes has its result queued (``queue_result``); one that
        blocks is returned, and the reader must hand over the reading role and
        finish it (what :meth:`run` does when the reader returns it).
        """
        call_id = event.call_id
        method = event.method
        # The handler's coroutine is driven directly, not through a wrapper
        # coroutine that would turn its outcome into a Result (a frame and a
        # coroutine less per call): _failure maps what it raises.
        coroutine = self._dispatch(method, event.args)
        # A context of its own, as a task of its own would give it: what one
        # handler sets (a ContextVar, a tracing span) must not be seen by the
        # next calls this task runs.
        context = contextvars.copy_context()
        try:
            trap = context.run(coroutine.send, None)
        except StopIteration as stop:
            self._queue_value(call_id, stop.value)  # frees the id too (one call less)
            return None
        except Exception as exc:
            self._finished(call_id)
            self._queue_result(call_id, self._failure(method, exc))
            return None
        except BaseException:
            self._finished(call_id)
            raise
        return Blocked(call_id, method, coroutine, trap, context)

    def cancel(self, call_id: int) -> None:
        """The caller gave up: cancel the task running that call, if it still runs."""
        scope = self._running.get(call_id)
        if scope is not None:
            scope.cancel()

    async def _follow(self) -> None:
        """Park until handed the reading role."""
        task = trio.lowlevel.current_task()
        self._followers.append(task)

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            self._followers.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _pass_reading(self) -> None:
        """Hand the reading role to an idle follower, or to a new task."""
        if self._followers:
            trio.lowlevel.reschedule(self._followers.pop(), outcome.Value(None))
            return
        self._spawn(self.run)

    def answering(self, task: trio.lowlevel.Task) -> bool:
        """Whether ``task`` runs a call that blocked and has not sent its answer yet."""
        return task in self._answering

    async def wait_answered(self, task: trio.lowlevel.Task) -> None:
        """Wait until ``task`` has sent the answer of the call it runs (see :meth:`answering`)."""
        while task in self._answering:
            await self._answered.park()

    async def _finish(self, blocked: Blocked, scope: trio.CancelScope) -> None:
        call_id = blocked.call_id
        self._running[call_id] = scope
        task = trio.lowlevel.current_task()
        self._answering.add(task)
        try:
            result: Result
            try:
                value = await _resume(blocked.coroutine, blocked.trap, blocked.context)
            except Exception as exc:
                result = self._failure(blocked.method, exc)
            else:
                result = Result(True, value)
            finally:
                del self._running[call_id]
                self._finished(call_id)
            await self._send_result(call_id, result)
        finally:
            self._answering.discard(task)
            self._answered.unpark_all()

    def _failure(self, method: str, exc: Exception) -> Result:
        """The RESULT for a handler that raised ``exc``.

        Its text always goes as a (bounded) str, whatever the exception
        holds: a RESULT the peer cannot decode ends the whole connection.
        """
        if isinstance(exc, RPCError):
            return Result(False, error=_text(exc.message), code=_text(exc.code))
        if isinstance(exc, UnsendableResult):
            log.error(
                "%s: RPC handler %r returned a value that cannot be sent",
                self._label,
                method,
                exc_info=exc.__cause__,
            )
            return Result(False, error=_text(exc), code="bad_result")
        if isinstance(exc, CallbackCancelledError):
            # The asyncio task running the handler was cancelled from the
            # asyncio side: asyncio.run() ending with it still running, most
            # often. A shutdown, not the handler's bug: no traceback.
            log.debug("%s: RPC handler %r was cancelled by asyncio", self._label, method)
            return Result(False, error=_text(exc), code="handler_error")
        if isinstance(exc, ConnectionClosed):
            # Perhaps this connection closing (then the RESULT has nowhere to
            # go and is dropped), perhaps another one the handler relayed to:
            # the caller hears why, and no traceback is logged either way.
            return Result(False, error=_text(exc.reason), code="connection_closed")
        log.exception("%s: RPC handler %r failed", self._label, method, exc_info=exc)
        return Result(False, error=f"{type(exc).__name__}: {_text(exc)}", code="handler_error")
