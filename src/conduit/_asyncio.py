"""The asyncio shim: run whole Trio operations from asyncio code.

conduit's core is pure Trio. When a public coroutine is awaited from asyncio, the
whole operation (one RPC, one transfer, ``Server.run``) is handed to a Trio *guest
run* hosted on the running asyncio loop (:func:`trio.lowlevel.start_guest_run`):
Trio's scheduler then runs as callbacks of the asyncio loop, in the same thread,
and only Trio's I/O wait happens in a worker thread. There is one guest run per
asyncio loop. It starts lazily on the first bridged call and ends when the loop
ends (``asyncio.run`` cancelling its leftover tasks, or closing its async
generators).

The pieces:

* :func:`run_in_trio` (asyncio side) runs one Trio coroutine function in this
  loop's guest run and returns its result, with exceptions and cancellation
  crossing in both directions;
* importing this module installs its ``_submit`` / ``_unwind`` as the way
  :func:`conduit._bridge.bridged` methods awaited from asyncio reach the guest
  (both they and :func:`run_in_trio` await a call through
  :func:`conduit._bridge.run_on_guest`);
* each guest run sets :data:`conduit._callbacks.HOST_LOOP`, which tells Trio
  code that its user lives in asyncio, so user callbacks can be run there;
* :func:`get_guest_token` gives the guest run's :class:`trio.lowlevel.TrioToken`.

This module is the only one that starts guest runs. Nothing in the package
imports it but the public namespace (``conduit/__init__.py``, which exports
:func:`run_in_trio`): the feature modules know only :mod:`conduit._bridge` and
:mod:`conduit._callbacks`, which this module depends on.

Calls are the hot path. Each runs in a long-lived worker task of the guest's
service nursery (no task spawn, no cancel scope per call; cancelling a call
retires its worker), and an idle worker stays runnable while calls keep
finishing, so a caller that submits its next call right away does not have to
wake Trio's I/O thread (see :func:`_spin`).

See ``docs/trio-and-asyncio.md`` for costs and limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import functools
import sys
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Generic, TypeVar, TypeVarTuple

import outcome
import trio

from . import _bridge, _host_rpc
from ._callbacks import BRIDGE_NURSERY, HOST_LOOP
from ._groups import FATAL, first_leaf
from ._sigint_guard import SIGINT, SigintGuard, getsignal

__all__ = [
    "get_guest_token",
    "run_in_trio",
]

T = TypeVar("T")
ArgsT = TypeVarTuple("ArgsT")


class _State(enum.Enum):
    STARTING = "starting"  # start_guest_run returned; the root task has not run yet
    RUNNING = "running"  # the service nursery is open
    CLOSING = "closing"  # the root scope is cancelled; no new calls
    DONE = "done"  # the done callback ran; the thread may host a new run


class _Worker:
    """One long-lived Trio task of the service nursery that runs bridged calls.

    A worker runs one call at a time and then waits for the next one, so the
    hot path spawns no task and enters no cancel scope: both belong to the
    worker's whole life. Cancelling a call cancels its worker's scope; that
    worker then ends instead of taking another call, and a fresh one is
    spawned when needed.
    """

    __slots__ = ("base_context", "call", "idle", "retired", "scope", "spinning", "task")

    def __init__(self, idle: list[_Worker]) -> None:
        self.idle = idle
        # Created up front, so a call can be cancelled before its worker has
        # even started (a scope cancelled before it is entered is cancelled on
        # entry).
        self.scope = trio.CancelScope()
        # Set when a call's cancellation cancelled ``scope``: the worker must
        # not take another call. (A flag, because ``scope.cancel_called``
        # reads the clock.)
        self.retired = False
        self.task: trio.lowlevel.Task | None = None
        # The call handed to this worker while it sat on the idle stack.
        self.call: _Call[Any] | None = None
        # True while the worker is idle but still runnable (see _spin): a call
        # handed to it then needs no reschedule.
        self.spinning = False
        # What the worker runs in between calls; each call runs in a copy of
        # its caller's context instead (see _Guest.submit).
        self.base_context = contextvars.Context()

    def abort(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        """Cancelled while parked idle (the guest run is ending): leave the stack."""
        self.idle.remove(self)
        return trio.lowlevel.Abort.SUCCEEDED


class _Call(Generic[T]):
    """One :func:`run_in_trio` call: shared by the asyncio caller and its worker."""

    __slots__ = (
        "args",
        "context",
        "finished",
        "fn",
        "future",
        "kwargs",
        "late_error",
        "unwound",
        "worker",
    )

    def __init__(
        self,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        future: asyncio.Future[T],
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        # Settled by the worker, in the loop's thread, during a guest tick;
        # the caller's wake-up is then an ordinary call_soon, not another hop.
        self.future = future
        # The worker running (or about to run) this call: cancelling the call
        # cancels its scope. Set by _Guest.submit.
        self.worker: _Worker | None = None
        # Only for calls queued before the service nursery exists.
        self.context: contextvars.Context | None = None
        self.finished = False
        # Created only on the cancellation path, so the fast path pays nothing.
        self.unwound: asyncio.Future[None] | None = None
        self.late_error: BaseException | None = None

    def settle_finished(self, crash: BaseException | None = None) -> None:
        """Called once the Trio side is over (or will never run).

        ``crash``: the guest run crashed under the call (see :func:`_crashed_error`).
        """
        self.finished = True
        if crash is not None and not self.future.done():
            self.future.set_exception(_crashed_error(crash))
        if not self.future.done():
            # The call ended by a BaseException (Cancelled from a guest
            # shutdown, KeyboardInterrupt, ...) or never ran: the caller gets
            # CancelledError.
            self.future.cancel()
        if self.unwound is not None and not self.unwound.done():
            self.unwound.set_result(None)


class _Guest:
    """One Trio guest run hosted on one asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.state = _State.STARTING
        # Created up front so shutdown can be requested before the root task runs.
        self.root_scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self.pending: list[_Call[Any]] = []
        self.calls: set[_Call[Any]] = set()
        # Workers waiting for a call, most recently used last (reused first).
        self.idle: list[_Worker] = []
        # The idle worker keeping a guest tick due (see _spin), and the count of
        # calls finished, by which it sees whether calls keep finishing.
        self.spinner: _Worker | None = None
        self.completed = 0
        # How many ticks in a row without a call finishing the spinner waits
        # before it parks (learnt, see _spin), how many times in a row it
        # parked for nothing, and how many more times until it next waits
        # the longest it may (a probe).
        self.spin_budget = 1
        self.spin_misses = 0
        self.spin_probe_in = 0
        # Set by the done callback; awaited (never cancelled) by the keeper.
        self.finished: asyncio.Future[None] = loop.create_future()
        self.keeper: asyncio.Task[None] | None = None
        self.sentinel: AsyncGenerator[None, None] | None = None
        self.sentinel_closing = False
        # KeyboardInterrupt / SystemExit that ended the run (delivered by Trio to
        # the root task): re-raised on the asyncio side, see _reraise.
        self.fatal: BaseException | None = None
        # The async-generator hooks the guest run installed (see tick).
        self.hooks: Any = None
        # Keeps asyncio.run's second Ctrl-C out of Trio's own code.
        self.sigint = SigintGuard(loop, _Guest.tick.__code__)

    # -- guest ticks --------------------------------------------------------------

    def tick(self, tick: Callable[[], object]) -> None:
        """Run a guest tick with the guest run's async-generator hooks in place
        (and asyncio's SIGINT handler guarded: see :mod:`conduit._sigint_guard`).

        Trio installs its hooks once, when the guest starts, but asyncio's
        ``run_forever`` puts back the hooks it found each time it returns and
        installs the loop's own each time it starts: after the first
        ``asyncio.Runner.run`` (or a ``run_until_complete`` on a loop kept
        across tests), and during ``asyncio.run``'s shutdown, Trio code would
        start its async generators under asyncio's hooks, which finalise them
        in an asyncio task, where their ``finally`` cannot await Trio.
        """
        # Per tick, so only C calls and comparisons while nothing changed.
        hooks = self.hooks
        if hooks is not None and sys.get_asyncgen_hooks().firstiter is not hooks.firstiter:
            sys.set_asyncgen_hooks(*hooks)
        sigint = self.sigint
        if sigint.active and getsignal(SIGINT) is not sigint.seen:
            sigint.follow()
        thread = threading.get_ident()
        ticking = _bridge.ticking_threads
        entered = thread not in ticking  # (ticks do not nest; if one did, the outer leaves)
        ticking.add(thread)
        try:
            tick()
        finally:
            if entered:
                ticking.discard(thread)

    # -- asyncio side, between guest ticks ------------------------------------

    def submit(self, call: _Call[Any]) -> None:
        """Hand ``call`` to an idle worker, or to a new one.

        Runs in the caller's task, between guest ticks. Guest mode allows
        scheduling Trio tasks from the host thread then (the runner stays
        installed in the thread), and Trio wakes its I/O thread only if no
        guest tick is already due: calls submitted in the same asyncio
        iteration share one wake-up.
        """
        self.calls.add(call)
        idle = self.idle
        if idle:
            worker = idle.pop()
            worker.call = call
            call.worker = worker
            task = worker.task
            assert task is not None
            # The worker's next step runs in a copy of the caller's context
            # (Trio runs each step of a task in ``task.context``): asyncio-side
            # contextvars are visible to the Trio operation, and whatever it
            # sets stays in this call, as with a task per call.
            task.context = contextvars.copy_context()
            if not worker.spinning:
                trio.lowlevel.reschedule(task, outcome.Value(call))
            # else: the worker is runnable already and picks the call up on
            # its next step, with no wake-up at all.
            return
        worker = call.worker = _Worker(idle)
        if self.nursery is None:
            call.context = contextvars.copy_context()
            self.pending.append(call)
        else:
            # The new task copies the caller's context.
            self.spawn(worker, call)

    def spawn_pending(self) -> None:
        """Start the calls submitted before the service nursery existed."""
        pending, self.pending = self.pending, []
        for call in pending:
            context, call.context = call.context, None
            assert context is not None
            assert call.worker is not None
            # Each in its caller's context, as if spawned by submit().
            context.run(self.spawn, call.worker, call)

    def spawn(self, worker: _Worker, call: _Call[Any]) -> None:
        """Start ``worker``'s task, which runs ``call`` first (in the current context)."""
        assert self.nursery is not None
        self.nursery.start_soon(_worker, self, worker, call, name=_WORKER_NAME)

    def shutdown(self) -> None:
        """Ask the guest run to end: cancel the root scope. Idempotent.

        A Ctrl-C is held from now on until the run has ended (see
        :mod:`conduit._sigint_guard`).
        """
        if self.state in (_State.STARTING, _State.RUNNING):
            self.state = _State.CLOSING
            self.sigint.shutting_down()
            self.root_scope.cancel()

    # -- called by Trio --------------------------------------------------------

    def on_done(self, run_outcome: outcome.Outcome[None]) -> None:
        """The guest's done callback: runs in the loop's thread after the run ended."""
        self.state = _State.DONE
        held_interrupt = self.sigint.release()
        with _registry_lock:
            if _guests.get(self.loop) is self:
                del _guests[self.loop]
        crash = None
        if isinstance(run_outcome, outcome.Error):
            self.fatal = first_leaf(run_outcome.error, FATAL)
            if self.fatal is None:
                crash = run_outcome.error
                # Every conduit object of the run is gone with it: a fresh
                # run started by the next call would let them fail deep in
                # Trio instead, so later calls on this loop get a clear error.
                _crashes[self.loop] = repr(crash)
        if held_interrupt and self.fatal is None:
            # A Ctrl-C held while the run ended (see _sigint_guard): out now.
            self.fatal = KeyboardInterrupt()
        # Normally empty (the service nursery waited for every worker), but a
        # crashed root may leave queued calls behind: never leave a caller hanging.
        for call in [*self.calls, *self.pending]:
            call.settle_finished(crash)
        self.calls.clear()
        self.pending.clear()
        if not self.finished.done():
            self.finished.set_result(None)
        self._close_sentinel()
        if crash is not None:
            self.loop.call_exception_handler(
                {"message": "conduit: the Trio guest run crashed", "exception": crash}
            )
        elif self.fatal is not None and (self.keeper is None or self.keeper.done()):
            self.loop.call_soon(_reraise, self.fatal)
        # Otherwise the keeper re-raises a fatal error once it has finished:
        # raising here could interrupt asyncio.run's shutdown with the keeper pending.

    def _close_sentinel(self) -> None:
        sentinel, self.sentinel = self.sentinel, None
        if sentinel is None or self.sentinel_closing:
            return
        # The sentinel's finally sees DONE and returns without awaiting, so its
        # aclose() completes synchronously; closing it here keeps asyncio's
        # finalizer from scheduling an aclose() on a loop that may be closed.
        with contextlib.suppress(StopIteration):
            sentinel.aclose().send(None)


# One guest per loop. The lock only guards insertions and removals (loops in
# different threads each have their own guest); lookups are plain dict reads.
_guests: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Guest] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()
# What crashed the guest run of a loop, by its repr: the exception itself
# (logged with its traceback by the loop's exception handler) would keep the
# loop alive through its frames. Each loop's own thread writes its entry.
_crashes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, str] = weakref.WeakKeyDictionary()


def _crashed_error(crash: BaseException | str) -> RuntimeError:
    """What a call on a loop whose guest run crashed raises (``crash`` as its
    cause when the call was in flight, else what it was)."""
    what = crash if isinstance(crash, str) else repr(crash)
    error = RuntimeError(
        f"conduit's Trio guest run on this event loop crashed ({what}); "
        "every conduit object of that run (clients, servers, connections) went "
        "with it. This is a bug in conduit or in Trio code it ran: please report "
        "it. To use conduit again, start a new event loop (a new asyncio.run)."
    )
    if isinstance(crash, BaseException):
        error.__cause__ = crash
    return error


async def _guest_root(guest: _Guest) -> None:
    """The guest run's main task: owns the service nursery every call runs in."""
    HOST_LOOP.set(guest.loop)
    try:
        with guest.root_scope:
            async with trio.open_nursery() as nursery:
                guest.nursery = nursery
                BRIDGE_NURSERY.set(nursery)
                if guest.state is _State.STARTING:
                    guest.state = _State.RUNNING
                guest.spawn_pending()
                await trio.sleep_forever()
    finally:
        # From here on the nursery is (being) closed: refuse new calls.
        if guest.state is not _State.DONE:
            guest.state = _State.CLOSING


_WORKER_NAME = "conduit: asyncio bridge worker"

#: Idle workers kept for reuse; a worker finishing a call while this many are
#: idle ends instead. Not a limit on concurrent calls: a call that finds no idle
#: worker always gets a new one, so long calls (``Server.run``) never delay others.
_MAX_IDLE_WORKERS = 256

#: The most ticks in a row without a call finishing that the spinner waits
#: before it parks (see _spin): an idle tick costs ~5 us of CPU, a wake-up of
#: the guest's I/O thread ~30 us (two thread hand-offs) or more.
_MAX_SPIN_TICKS = 6

#: The spinner waits _MAX_SPIN_TICKS ticks once every this many times it parks
#: for nothing, to find out whether calls would come a little later.
_SPIN_PROBE_EVERY = 16

#: Whether Trio lets us set ``Task.context`` (it runs each step of a task in
#: ``task.context``). If a future Trio refuses, every call gets its own task
#: again (workers run one call and end), which is slower but equivalent.
_context_swap_works = True


async def _worker(guest: _Guest, worker: _Worker, call: _Call[Any]) -> None:
    """A worker task: run ``call``, then the calls handed to it, until retired."""
    global _context_swap_works
    task = worker.task = trio.lowlevel.current_task()
    idle = guest.idle
    with worker.scope:
        while True:
            # -- run one call (inlined: this is the hot path) ------------------
            future = call.future
            crashing = False
            try:
                value = await call.fn(*call.args, **call.kwargs)
                if not future.done():
                    future.set_result(value)
                del value
            except BaseException as exc:
                propagate = _deliver_error(guest, call, exc, closed=not _stepping(task))
                # A Cancelled re-raised here ends the worker: either its call
                # was cancelled (the worker's scope absorbs it) or the guest run
                # is ending: by shutdown, or crashing (cancelled by nobody of
                # ours; on_done then tells the caller what crashed it).
                crashing = (
                    propagate is not None and not worker.retired and guest.state is _State.RUNNING
                )
                if propagate is exc:
                    raise
                if propagate is not None:
                    raise propagate from None
            finally:
                if not crashing:
                    guest.calls.discard(call)
                    call.finished = True
                    if call.unwound is not None or not future.done():
                        call.settle_finished()
            # Keep nothing of this call while idle (its arguments, its result).
            del call, future
            worker.call = None
            guest.completed += 1

            # -- wait for the next call -----------------------------------------
            if worker.retired or len(idle) >= _MAX_IDLE_WORKERS:
                # A cancelled call retires its worker (its scope stays
                # cancelled); so does a surplus worker.
                return
            if not _context_swap_works:
                return
            try:
                task.context = worker.base_context  # drop the caller's context
            except Exception:  # pragma: no cover - a Trio whose Task is frozen
                _context_swap_works = False
                return
            idle.append(worker)
            handed = await _spin(guest, worker) if guest.spinner is None else None
            if handed is None:
                # Still on the idle stack: park until submit() hands us a call
                # (it reschedules us with that call).
                handed = await trio.lowlevel.wait_task_rescheduled(worker.abort)
            call = handed
            del handed  # the call is deleted once over (above): no other name may keep it


def _stepping(task: trio.lowlevel.Task) -> bool:
    """Whether ``task`` is the Trio task running now (not: its coroutine is being
    closed, by the garbage collector of an abandoned run, say)."""
    try:
        return trio.lowlevel.current_task() is task
    except RuntimeError:  # outside any Trio run
        return False


def _deliver_error(
    guest: _Guest, call: _Call[Any], exc: BaseException, *, closed: bool
) -> BaseException | None:
    """Give ``call``'s caller what ``exc`` holds for it; return what Trio must see.

    Only trio.Cancelled (and a GeneratorExit when the worker's coroutine is
    being ``closed``) must keep propagating: Trio's cancel scopes absorb
    them, and a closed coroutine must not go on. A GeneratorExit the call
    raised while its worker ran (a handler's own) is the caller's, as any
    other error: until 2026-12-07 it went to Trio too, and crashed the guest
    run with every conduit object on its loop (found by a review; under
    ``trio.run`` it came out of ``server.run()`` alone, as it does now).
    Everything else goes to the caller, including
    KeyboardInterrupt and SystemExit, which asyncio then raises out of the loop
    from the caller's task as it would for any task; letting them crash the
    service nursery would end every other call too. A KeyboardInterrupt or
    SystemExit inside an exception group (raised under a nursery, as a second
    Ctrl-C lands in whatever Trio task runs) goes to the caller bare: asyncio
    lets only a bare one out of the loop, and would keep a group as the task's
    result, the Ctrl-C swallowed.
    """
    propagate, error = _split_cancelled(exc, closed=closed)
    if error is not None:
        fatal = first_leaf(error, FATAL)
        if fatal is not None and fatal is not error:
            if fatal.__context__ is None:
                fatal.__context__ = error  # the rest of the group, still shown
            error = fatal
        if call.future.done():
            # The caller was cancelled meanwhile; it chains this error onto its
            # CancelledError. A Ctrl-C must still stop the loop.
            call.late_error = error
            if fatal is not None and guest.state is _State.CLOSING:
                # The loop is ending (asyncio.run cancelled the caller with
                # every other task): raised now, it would stop that shutdown
                # with the guest run still going (abandoned, with a warning).
                # The keeper, or on_done, re-raises it once the run is over.
                if guest.fatal is None:
                    guest.fatal = fatal
            elif fatal is not None:
                call.future.get_loop().call_soon(_reraise, fatal)
        else:
            _set_exception(call.future, error)
    return propagate


async def _spin(guest: _Guest, worker: _Worker) -> _Call[Any] | None:
    """Keep the guest ticking while calls keep finishing (one worker at a time).

    When no Trio task is runnable, the guest run waits for I/O in a worker
    thread, and handing it a call means waking that thread, which wakes the
    loop's thread back: two thread hand-offs per call. But the caller woken by a
    call's result often submits its next call at once, before the next guest
    tick (its wake-up was queued first), or a few loop iterations later
    (``asyncio.wait_for`` and ``create_task`` wrap each call in a task). So one
    idle worker stays runnable instead of parking: a guest tick stays due, and
    calls submitted meanwhile are handed over with no wake-up at all.

    It parks after ``guest.spin_budget`` ticks in a row with no call finishing,
    so an idle guest still blocks in its I/O wait. The budget is learnt, in
    ticks: once in a while (a probe) the spinner waits _MAX_SPIN_TICKS ticks
    instead, and a call caught that late raises the budget to match; parking
    for nothing twice in a row lowers it by one. A caller whose calls come too
    late to catch thus costs about one idle tick per call, not several.

    Returns the call handed to ``worker`` meanwhile, if any.
    """
    guest.spinner = worker
    worker.spinning = True
    try:
        limit = guest.spin_budget
        idle_ticks = 0
        while True:
            seen = guest.completed
            await trio.lowlevel.cancel_shielded_checkpoint()
            if worker.call is not None:
                needed = idle_ticks + 1
                if needed > guest.spin_budget:  # caught by a probe
                    guest.spin_budget = min(needed + 1, _MAX_SPIN_TICKS)
                guest.spin_misses = 0
                return worker.call
            if guest.completed != seen:
                idle_ticks = 0
                continue
            idle_ticks += 1
            if idle_ticks < limit:
                continue
            if limit != guest.spin_budget:  # a probe that caught nothing
                return None
            if guest.spin_probe_in == 0 and limit < _MAX_SPIN_TICKS:
                guest.spin_probe_in = _SPIN_PROBE_EVERY
                limit = _MAX_SPIN_TICKS
                continue
            guest.spin_probe_in = max(guest.spin_probe_in - 1, 0)
            guest.spin_misses += 1
            if guest.spin_misses >= 2 and guest.spin_budget > 1:
                guest.spin_budget -= 1
                guest.spin_misses = 0
            return None
    finally:
        worker.spinning = False
        guest.spinner = None


def _split_cancelled(
    exc: BaseException, *, closed: bool
) -> tuple[BaseException | None, BaseException | None]:
    """Split ``exc`` into (what Trio must see, what the caller must see); a
    GeneratorExit is Trio's only when the worker's coroutine is ``closed``."""
    trios: tuple[type[BaseException], ...] = (
        (trio.Cancelled, GeneratorExit) if closed else (trio.Cancelled,)
    )
    if isinstance(exc, trios):
        return exc, None
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trios)
    return None, exc


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except TypeError:  # asyncio refuses StopIteration; never let it crash the guest
        future.set_exception(RuntimeError(f"Trio operation raised {exc!r}"))


async def _keep_guest(guest: _Guest) -> None:
    """The keeper task: ties the guest run's life to the asyncio loop's.

    ``asyncio.run`` cancels every leftover task when its main coroutine ends; the
    keeper then cancels the Trio root scope and waits for the guest's done
    callback, so the run is over before the loop closes (an abandoned guest run
    warns, and leaves its runner installed in the thread, which breaks the next
    ``asyncio.run``).
    """
    try:
        await asyncio.shield(guest.finished)  # returns only if the run ended by itself
    except asyncio.CancelledError:
        guest.shutdown()
        await _wait_ignoring_cancel(guest.finished)
        _reraise_later(guest)
        raise
    _reraise_later(guest)


def _reraise_later(guest: _Guest) -> None:
    if guest.fatal is not None:
        # From a plain callback queued after the keeper's last step, so the keeper
        # is finished (no "Task was destroyed but it is pending") when asyncio
        # lets KeyboardInterrupt / SystemExit out of the loop.
        guest.loop.call_soon(_reraise, guest.fatal)


def _reraise(error: BaseException) -> None:
    raise error


async def _loop_end_sentinel(guest: _Guest) -> AsyncGenerator[None, None]:
    """An async generator registered with the loop, as a second way to see it end.

    ``asyncio.run`` closes every live async generator (``shutdown_asyncgens``)
    *after* cancelling its tasks. If the guest was started by a task that was
    itself being cancelled during that shutdown, the keeper was created too late
    to be cancelled: closing this generator cancels it then.
    """
    try:
        yield
    finally:
        if guest.state is not _State.DONE and guest.keeper is not None:
            guest.sentinel_closing = True
            guest.keeper.cancel()
            # Wait for the keeper itself, not just the done callback, so the loop
            # does not close with the keeper still pending.
            await asyncio.wait([guest.keeper])


async def _wait_ignoring_cancel(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, whatever cancellations arrive meanwhile.

    The caller raises the CancelledError it caught afterwards, so the
    cancellations swallowed here are not lost.
    """
    while not future.done():
        # asyncio.wait never cancels the future it waits on, nor raises its
        # exception.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future])


def _start_guest(loop: asyncio.AbstractEventLoop) -> _Guest:
    guest = _Guest(loop)

    # Register the sentinel first, while asyncio's async-generator hooks are the
    # thread's hooks (a running guest installs Trio's).
    sentinel = _loop_end_sentinel(guest)
    try:
        sentinel.asend(None).send(None)
    except StopIteration:
        guest.sentinel = sentinel
    except Exception:  # e.g. the loop already ran shutdown_asyncgens: go without
        guest.sentinel = None

    try:
        # An empty context: the guest's system and root tasks must not inherit
        # whatever contextvars the first caller happened to have set.
        contextvars.Context().run(
            trio.lowlevel.start_guest_run,
            _guest_root,
            guest,
            # Every tick runs in guest.tick; partial, not a method, so that
            # scheduling one costs no Python frame. (mypy cannot follow a
            # partial of call_soon's variadic signature.)
            run_sync_soon_threadsafe=functools.partial(
                loop.call_soon_threadsafe,
                guest.tick,  # type: ignore[arg-type]
            ),
            run_sync_soon_not_threadsafe=functools.partial(
                loop.call_soon,
                guest.tick,  # type: ignore[arg-type]
            ),
            done_callback=guest.on_done,
            # asyncio owns signal.set_wakeup_fd (add_signal_handler, the Windows
            # proactor, uvloop): Trio must not replace it, or asyncio's signal
            # handlers stop firing, and Trio would put back a stale fd at exit.
            # Ctrl-C still works: asyncio.run's SIGINT handler cancels the main
            # task, which cancels the Trio scope of the call it awaits.
            host_uses_signal_set_wakeup_fd=True,
        )
    except RuntimeError as exc:
        guest.state = _State.DONE
        guest._close_sentinel()
        raise RuntimeError(
            "cannot start conduit's Trio guest run: another Trio run is active in this "
            "thread (run_in_trio() is for asyncio code; under Trio await the function "
            "directly). If an earlier event loop in this thread was closed without "
            "asyncio.run()'s cleanup, its guest run was abandoned."
        ) from exc
    guest.token = trio.lowlevel.current_trio_token()
    guest.hooks = sys.get_asyncgen_hooks()  # the guest run's, installed as it started
    with _registry_lock:
        _guests[loop] = guest
    # asyncio.Task itself, not loop.create_task: a task factory written before
    # Python 3.11 takes no context, and failing here would leave the guest
    # running with no keeper to end it.
    guest.keeper = asyncio.Task(
        _keep_guest(guest),
        loop=loop,
        name="conduit: Trio guest run keeper",
        context=contextvars.Context(),
    )
    # If the keeper ends without having shut the guest down (cancelled before its
    # first step, so its except clause never ran), still ask the guest to end.
    guest.keeper.add_done_callback(
        lambda _task: guest.shutdown(),
        # Not the first caller's context: the keeper lives as long as the loop.
        context=contextvars.Context(),
    )
    return guest


def get_guest_token(
    loop: asyncio.AbstractEventLoop | None = None,
) -> trio.lowlevel.TrioToken | None:
    """The :class:`trio.lowlevel.TrioToken` of ``loop``'s guest run, or ``None``.

    ``loop`` defaults to the running loop (``RuntimeError`` when none is
    running). ``None`` when no guest run is alive on it (none started yet, or it
    already ended). The token lets other threads reach the guest
    (``trio.from_thread.run(..., trio_token=token)``).
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    guest = _guests.get(loop)
    if guest is None or guest.state is _State.DONE:
        return None
    return guest.token


async def run_in_trio(fn: Callable[[*ArgsT], Awaitable[T]], *args: *ArgsT) -> T:
    """Run ``await fn(*args)`` in this asyncio loop's Trio guest run; return its result.

    Must be awaited from asyncio. The first call on a loop starts the guest run;
    later calls reuse it, and concurrent calls share its scheduler ticks. The
    call runs in a worker task of the guest's service nursery (an idle one is
    reused, else a new one starts: calls never wait for each other), in a copy
    of the caller's contextvars.

    * Exceptions raised by ``fn`` reach the caller as themselves (same object,
      Trio frames kept in the traceback).
    * Cancelling the caller (``task.cancel()``, ``asyncio.wait_for``,
      ``asyncio.timeout``) cancels the call's Trio cancel scope and waits until
      the Trio side has unwound (its ``finally`` blocks have run), then raises
      :class:`asyncio.CancelledError`. An exception raised by the Trio side
      while unwinding is chained as its ``__cause__``.
    * When the guest run is shutting down (the loop is ending), the call raises
      :class:`asyncio.CancelledError`.

    Raises:
        RuntimeError: when awaited from Trio code (under ``trio.run`` or inside a
            guest run): await ``fn(*args)`` directly there, or use
            :func:`bridged`, which picks the right path.
    """
    loop = _bridge.asyncio_caller_loop()
    if loop is None:
        raise RuntimeError(
            "run_in_trio() must be awaited from asyncio code; this is already Trio "
            "code, so await the function directly (a @bridged method does that itself)"
        )
    return await _bridge.run_on_guest(loop, fn, args, {})


def _submit(
    loop: asyncio.AbstractEventLoop,
    fn: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> _Call[T]:
    """Start ``fn(*args, **kwargs)`` in ``loop``'s guest run (asyncio side)."""
    guest = _guests.get(loop)
    if guest is None:
        crash = _crashes.get(loop)
        if crash is not None:
            raise _crashed_error(crash)
        if getattr(loop, "_asyncgens_shutdown_called", False):
            # The loop's last steps (asyncio.run closing the async generators
            # left open, whose finally blocks may call us): a guest run started
            # now would outlive the loop, nothing would end it, and it would
            # break the next asyncio.run in this thread. (asyncio's own flag,
            # which uvloop keeps too; where it is missing, nothing changes.)
            raise asyncio.CancelledError("conduit: the event loop is ending")
        guest = _start_guest(loop)
    elif guest.state is _State.CLOSING:
        # The loop is ending (asyncio.run is cancelling its tasks): a caller
        # arriving now is a task being cancelled, running its cleanup.
        raise asyncio.CancelledError("conduit: the Trio guest run is shutting down")
    call: _Call[T] = _Call(fn, args, kwargs, loop.create_future())
    guest.submit(call)
    return call


async def _unwind(call: _Call[Any]) -> None:
    """The caller of ``call`` was cancelled: cancel the Trio side, wait until it is over."""
    if not call.finished:
        worker = call.worker
        assert worker is not None
        worker.retired = True
        worker.scope.cancel()
        if call.unwound is None:
            call.unwound = call.future.get_loop().create_future()
        await _wait_ignoring_cancel(call.unwound)
    # The Trio side may have settled the future before the cancellation got
    # through: retrieve what it holds, or asyncio logs "exception was never
    # retrieved".
    if call.future.done() and not call.future.cancelled():
        call.future.exception()
    # The Trio side's Cancelled, raised from the cancel above in this frame,
    # holds it; an error raised while unwinding has that Cancelled as its
    # context and is kept on the call (see conduit._stored_errors).
    del call


_bridge.install_asyncio_runner(_submit, _unwind)
_host_rpc.install()
