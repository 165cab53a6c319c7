"""The table of calls this side made and is waiting on, with their deadlines.

Calls are the hot path, so this avoids per-call Trio objects where it can
(measured on the benchmark machine: a task start and exit ~7 us, a cancel scope
~4 us, a ``move_on_after`` ~5 us, an Event ~3.5 us): :class:`PendingCalls`
parks the caller with ``wait_task_rescheduled`` and wakes it straight from the
reading task; all timeouts share one timer task and a heap of deadlines.
Calls the peer makes are run by :mod:`conduit._call_workers`.
"""

from __future__ import annotations

import heapq
from collections.abc import Awaitable, Callable
from typing import Any

import outcome
import trio

from .errors import ConnectionClosed, RPCError, RPCTimeoutError
from .protocol.connection import ConnectionState, Phase, ResultReceived
from .protocol.messages import Result

# Enum members are class attribute lookups (~0.1 us each); these run per call.
_CLOSED = Phase.CLOSED
_reschedule = trio.lowlevel.reschedule


class PendingCall:
    """One call this side waits on: who waits, and how to hand it the outcome."""

    __slots__ = ("done", "early", "held", "interrupt", "method", "parked", "task", "timeout")

    def __init__(
        self,
        task: trio.lowlevel.Task | None,
        method: str,
        timeout: float | None,
        done: Callable[[outcome.Outcome[Result]], None] | None = None,
    ) -> None:
        self.task = task
        self.method = method
        self.timeout = timeout
        self.parked = False
        self.early: outcome.Outcome[Result] | None = None
        #: For a caller that is no Trio task (see PendingCalls.register).
        self.done = done
        #: Set while the caller waits for the socket itself, holding the
        #: reading role (see conduit._reading_role): wakes it from that wait.
        self.interrupt: Callable[[], None] | None = None
        #: What its result holds in the endpoint's ResultsInHand until taken
        #: (0: a small one, or none yet).
        self.held = 0

    def settled(self) -> outcome.Outcome[Result] | None:
        """The outcome left for a caller that was not parked (None: none yet)."""
        return self.early

    def take(self) -> outcome.Outcome[Result]:
        """The outcome left for the caller, handed over: unwrapped, an Error's
        exception must not find it still kept here, where the caller's frame
        (in its traceback) reaches it: a reference cycle (see
        :mod:`conduit._stored_errors`)."""
        early, self.early = self.early, None
        assert early is not None
        return early

    def deliver(self, result: outcome.Outcome[Result]) -> bool:
        """Wake the caller, or leave the outcome for it if it is still sending.

        Returns whether the caller was woken (it is parked no more); a
        ``done`` callback is not counted: it wakes no Trio task.
        """
        if self.done is not None:
            self.done(result)
            return False
        if self.parked:
            assert self.task is not None
            trio.lowlevel.reschedule(self.task, result)
            return True
        self.early = result
        if self.interrupt is not None:
            self.interrupt()
        return False


def _value(result: Result) -> Any:
    """A call's value, or its failure raised as RPCError."""
    if not result.ok:
        raise RPCError(result.error or "remote call failed", result.code or "error")
    return result.value


def _ignore(_call_id: int) -> None:
    pass


def _nothing() -> None:
    pass


class PendingCalls:
    """Calls this side made and is waiting on."""

    def __init__(
        self,
        state: ConnectionState,
        send_cancel: Callable[[int], None],
        all_woken: Callable[[], None],
        start_timer: Callable[[], None] = lambda: None,
        read_own: Callable[[PendingCall], Awaitable[None] | None] | None = None,
    ) -> None:
        """``all_woken`` runs when the last caller woken by a batch of results has resumed;
        ``start_timer`` when the first deadline comes (it starts :meth:`run_timer`);
        ``read_own`` (optional) is asked, when a caller waiting alone is about
        to park, for a wait in which the caller reads the socket itself until
        its call has an outcome (None: park as usual; see
        :mod:`conduit._reading_role`)."""
        self._calls: dict[int, PendingCall] = {}
        # The machine skips these ids when its call ids wrap: the dict itself,
        # so nothing is added per call (fail_all empties it in place).
        state.calls_in_use = self._calls
        # What the large results count in until their callers take them.
        self._in_hand = state.results_in_hand
        #: Callers woken whose task has not run yet. While some are, a caller
        #: sending its next call queues it behind theirs: one record for the
        #: burst (see Connection._send_soon).
        self.waking = 0
        self._all_woken = all_woken
        self._deadlines: list[tuple[float, int]] = []
        self._state = state
        self._send_cancel = send_cancel
        self._timer_scope: trio.CancelScope | None = None
        self._start_timer: Callable[[], None] | None = start_timer
        self._timer_deadline = float("inf")
        self._read_own = read_own

    def __len__(self) -> int:
        return len(self._calls)

    def detach(self) -> None:
        """The connection is over (:meth:`fail_all` done): drop its callbacks,
        its bound methods, which would keep it in a reference cycle with us."""
        self._send_cancel = _ignore
        self._all_woken = self._start_timer = _nothing
        self._read_own = None

    async def wait(
        self,
        call_id: int,
        method: str,
        timeout: float | None,
        now: float,
        send: Callable[[bytes], Awaitable[None]],
        frame: bytes,
    ) -> Any:
        """Register ``call_id``, ``send(frame)`` (the call), park until its result
        arrives, and return its value (a failure reported by the peer raises
        :class:`~conduit.RPCError`).

        ``now`` is Trio's clock, which the caller has just read: the deadline
        counts from it. The value is taken out here, not by the caller
        (``Connection.call`` returns this coroutine itself): one coroutine
        layer less to resume on every wake-up.
        """
        if self._state.phase is _CLOSED:
            raise ConnectionClosed(self._state.close_reason or "connection closed")
        # Registered before sending: the reply may arrive while send() yields.
        pending = self._calls[call_id] = PendingCall(trio.lowlevel.current_task(), method, timeout)
        if timeout is not None:
            self._add_deadline(now + timeout, call_id)
        try:
            await send(frame)
        except BaseException:
            self._calls.pop(call_id, None)
            self._taken(pending)
            raise
        if pending.early is not None:  # answered, timed out or failed while sending
            self._taken(pending)
            return _value(pending.take().unwrap())
        # Only a caller waiting alone reads for itself: with others waiting the
        # reading task wakes them all from one read anyway (tested here, before
        # the hook: one Python call less per call when callers are concurrent).
        if (
            self._read_own is not None
            and len(self._calls) == 1
            and (reading := self._read_own(pending)) is not None
        ):
            try:
                await reading
            except BaseException:  # cancelled (or worse) while holding the reading role
                if self._calls.pop(call_id, None) is not None:
                    self._send_cancel(call_id)
                self._taken(pending)
                raise
            if pending.settled() is not None:  # (a call: the read may have settled it)
                self._taken(pending)
                return _value(pending.take().unwrap())
            # Handed the reading role back before the outcome: wait for the reader.
        pending.parked = True

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            # Cancelled by the caller's own scope, or interrupted (Ctrl-C
            # reaches a parked task this way too): forget the call; the peer
            # is told below, once we are running again.
            del self._calls[call_id]
            pending.parked = False
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            result: Result = await trio.lowlevel.wait_task_rescheduled(abort)
        except BaseException:
            if pending.parked:  # woken by us with an error: counted in ``waking``
                self._resumed()
            else:  # abort() succeeded: never woken by us, so not counted
                self._send_cancel(call_id)
            self._taken(pending)
            raise
        self._resumed()
        if pending.held:  # (_taken, inline: a large result is rare)
            self._in_hand.release(pending.held)
        if result.ok:  # _value's common case, inline
            return result.value
        raise RPCError(result.error or "remote call failed", result.code or "error")

    def register(
        self,
        call_id: int,
        method: str,
        timeout: float | None,
        done: Callable[[outcome.Outcome[Result]], None],
        now: float,
    ) -> None:
        """Register ``call_id`` for a caller that is no Trio task: ``done`` gets its outcome.

        ``now`` is Trio's clock, which the caller has just read (as for :meth:`wait`).

        For the asyncio shim's calls (:mod:`conduit._host_rpc`), made between
        guest ticks on the loop's thread: ``done`` runs there too (from the
        reading task, the timer, or :meth:`fail_all`), exactly once, unless
        :meth:`forget` came first.
        """
        if self._state.phase is _CLOSED:
            raise ConnectionClosed(self._state.close_reason or "connection closed")
        self._calls[call_id] = PendingCall(None, method, timeout, done)
        if timeout is not None:
            self._add_deadline(now + timeout, call_id)

    def forget(self, call_id: int) -> bool:
        """The caller of a :meth:`register`-ed call gave up; whether it was still waiting."""
        return self._calls.pop(call_id, None) is not None

    def _taken(self, pending: PendingCall) -> None:
        """``pending``'s caller took its outcome (or gave up on it): what its
        result held in hand is released."""
        if pending.held:
            self._in_hand.release(pending.held)
            pending.held = 0

    def _resumed(self) -> None:
        self.waking -= 1
        if not self.waking:
            self._all_woken()

    def _wake(self, pending: PendingCall, result: outcome.Outcome[Result]) -> None:
        if pending.deliver(result):
            self.waking += 1

    def resolve(self, event: ResultReceived) -> None:
        """A RESULT arrived: wake its caller (unknown ids were given up on; ignore them).

        The connection's handler for :class:`ResultReceived` itself (no
        wrapper method between): this runs once per call.
        """
        pending = self._calls.pop(event.call_id, None)
        if pending is None:
            # (The machine decodes only awaited RESULTs: a caller gone
            # meanwhile, by some path that did not pop it first.)
            if event.held:
                self._in_hand.release(event.held)
            return
        # Released when the caller takes it (see wait), at once for a callback.
        pending.held = event.held
        if pending.parked:
            # PendingCall.deliver's common case, inline: a parked Trio caller.
            _reschedule(pending.task, outcome.Value(event.result))  # type: ignore[arg-type]
            self.waking += 1
        elif pending.deliver(outcome.Value(event.result)):
            self.waking += 1
        elif pending.done is not None:
            self._taken(pending)

    def fail_all(self, reason: str) -> None:
        """The connection ended: every waiting caller gets ConnectionClosed."""
        calls = list(self._calls.values())
        self._calls.clear()
        for pending in calls:
            self._wake(pending, outcome.Error(ConnectionClosed(reason)))

    def _add_deadline(self, deadline: float, call_id: int) -> None:
        heapq.heappush(self._deadlines, (deadline, call_id))
        if self._start_timer is not None:
            start, self._start_timer = self._start_timer, None
            start()
        # Deadlines of answered calls stay in the heap until they come up;
        # rebuild it when they outnumber the live ones, so memory stays bounded.
        if len(self._deadlines) > 2 * len(self._calls) + 64:
            self._deadlines = [entry for entry in self._deadlines if entry[1] in self._calls]
            heapq.heapify(self._deadlines)
        # The scope's deadline, kept as a float: reading CancelScope.deadline
        # (a property) on every call costs more than the heap push.
        scope = self._timer_scope
        if scope is not None and deadline < self._timer_deadline:
            scope.deadline = self._timer_deadline = deadline

    async def run_timer(self) -> None:
        """Fail calls whose timeout passed. Runs from the first deadline to the connection's end."""
        while True:
            deadline = self._deadlines[0][0] if self._deadlines else float("inf")
            with trio.CancelScope(deadline=deadline) as scope:
                self._timer_scope = scope
                self._timer_deadline = deadline
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
                self._wake(pending, outcome.Error(error))
                self._send_cancel(call_id)
