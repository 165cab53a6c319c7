"""Running user callbacks from Trio code, in whichever world the user lives in.

RPC handlers, message handlers, hooks and progress callbacks are user code. The
library calls them from Trio tasks through :func:`invoke`, which picks where each
one runs:

* a plain function is called directly, in the Trio task (it blocks both worlds
  while it runs, as any synchronous code on the loop's thread does);
* an ``async def`` callback (or a coroutine a plain function returns) runs as an
  **asyncio task on the host loop** when the Trio run is one of our guest runs on
  an asyncio loop (the user called us from ``asyncio.run``), so it may await
  asyncio things; under a plain ``trio.run`` it is awaited in Trio;
* :func:`trio_callback` marks a callback that must run in Trio even when
  asyncio-hosted (library-internal handlers, Trio code mixed into an asyncio
  program); :func:`asyncio_callback` marks one that must run in an asyncio task
  (a plain function that needs ``asyncio.current_task()``, say).

Whether "the user lives in asyncio" is the host-loop registry kept here:
:data:`HOST_LOOP` is set by the asyncio shim (:mod:`conduit._asyncio`) in each
guest run it starts, and read through :func:`current_host_loop`. The shim
depends on this module, never the other way round, so RPC dispatch and the
transfer code can ask the question without importing the shim.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar, cast

import outcome
import trio

from .errors import CallbackCancelledError

__all__ = [
    "BRIDGE_NURSERY",
    "HOST_LOOP",
    "asyncio_callback",
    "callback_world",
    "calling_task",
    "current_host_loop",
    "invoke",
    "is_asyncio_hosted",
    "trio_callback",
    "wants_an_argument",
]

F = TypeVar("F", bound=Callable[..., Any])
World = Literal["trio", "asyncio"]

_WORLD_ATTRIBUTE = "__conduit_callback_world__"

#: In an asyncio callback run by :func:`invoke` (and in what it calls through
#: the bridge, which copies the caller's contextvars): the Trio task that
#: awaits the callback. See :func:`calling_task`.
_AWAITED_BY: contextvars.ContextVar[trio.lowlevel.Task | None] = contextvars.ContextVar(
    "conduit_awaited_by", default=None
)

#: The asyncio loop hosting this Trio run. Set by the shim inside each of its
#: guest runs, and only there: a RunVar is per Trio run, so it is absent under a
#: plain ``trio.run`` and in a guest run some other library started.
HOST_LOOP: trio.lowlevel.RunVar[asyncio.AbstractEventLoop | None] = trio.lowlevel.RunVar(
    "conduit_host_loop", default=None
)
#: The nursery whose tasks run the bridged calls of asyncio code (the shim's
#: workers), set by the shim in each of its guest runs as :data:`HOST_LOOP`.
BRIDGE_NURSERY: trio.lowlevel.RunVar[trio.Nursery | None] = trio.lowlevel.RunVar(
    "conduit_bridge_nursery", default=None
)


def calling_task() -> trio.lowlevel.Task:
    """The Trio task on whose behalf the calling Trio code runs.

    The current task, except in code that an asyncio callback calls through
    the bridge (an ``async def`` RPC handler's ``await peer.close()`` under
    the asyncio shim runs in a worker task of the guest run): there, the task
    that awaits the callback (the handler's own, in the connection). Code that
    asks "is this one of the connection's own tasks?" asks it of this task.
    Raises RuntimeError outside a Trio task, as ``current_task()`` does.
    """
    task = trio.lowlevel.current_task()
    awaited_by = _AWAITED_BY.get()
    # Only a bridge worker runs on another task's behalf: the tasks a bridged
    # call starts (a client's own, say) inherit the contextvars too, and are
    # themselves.
    if awaited_by is not None and task.parent_nursery is BRIDGE_NURSERY.get():
        return awaited_by
    return task


def current_host_loop() -> asyncio.AbstractEventLoop | None:
    """From Trio code: the asyncio loop hosting this Trio run, or ``None``.

    ``None`` under a plain ``trio.run`` and outside Trio tasks. Asyncio code on a
    hosting loop also gets ``None``: it can use :func:`asyncio.get_running_loop`.
    """
    # Between guest ticks the guest's runner is still installed in the thread, so
    # asyncio code could read the RunVar too; ``in_trio_task`` limits the answer to
    # Trio code, as documented.
    if not trio.lowlevel.in_trio_task():
        return None
    return HOST_LOOP.get()


def is_asyncio_hosted() -> bool:
    """From Trio code: ``True`` when this Trio run is a conduit guest run on an asyncio loop.

    That means the user of the current operation lives in asyncio, so their
    ``async def`` callbacks are asyncio coroutines. ``False`` under a plain
    ``trio.run`` (and outside Trio tasks).
    """
    return current_host_loop() is not None


def _mark(fn: F, world: World) -> F:
    try:
        setattr(fn, _WORLD_ATTRIBUTE, world)
    except (AttributeError, TypeError):
        function = getattr(fn, "__func__", None)  # a bound method: mark its function
        if function is not None:
            setattr(function, _WORLD_ATTRIBUTE, world)
            return fn

        # Objects that take no attributes (builtins, slotted callables): wrap.
        # The wrapper is a plain function, so an async callable still returns
        # its coroutine and invoke() treats it the same way.
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        setattr(wrapper, _WORLD_ATTRIBUTE, world)
        return cast(F, wrapper)
    return fn


def trio_callback(fn: F) -> F:
    """Mark ``fn`` to run in Trio, even when the user lives in asyncio.

    For library-internal handlers and for Trio code registered by an asyncio
    program. Returns ``fn`` itself (marked) whenever it accepts attributes.
    """
    return _mark(fn, "trio")


def asyncio_callback(fn: F) -> F:
    """Mark ``fn`` to run inside an asyncio task on the host loop.

    Useful for a plain function that needs to be in an asyncio task
    (``asyncio.current_task()``, ``asyncio.create_task``). Only valid when the
    Trio run is hosted on asyncio; under a plain ``trio.run``, :func:`invoke`
    raises ``RuntimeError`` for it.
    """
    return _mark(fn, "asyncio")


def callback_world(callback: Callable[..., Any]) -> World | None:
    """The world ``callback`` was marked for, or ``None`` when unmarked.

    Looks through :func:`functools.partial` layers and bound methods (whose
    attributes are their function's).
    """
    target: object = callback
    while True:
        world = getattr(target, _WORLD_ATTRIBUTE, None)
        if world is not None:
            return cast(World, world)
        if isinstance(target, functools.partial):
            target = target.func
            continue
        return None


def wants_an_argument(callback: Callable[..., Any]) -> bool:
    """Whether ``callback`` has a required positional parameter: a client's
    lifecycle hook written as ``async def on_connect(client)`` (netconduit's
    form) rather than ``async def on_connect()``. Decided once, when the hook
    is registered; a callable whose signature cannot be read wants none."""
    try:
        parameters = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional and p.default is p.empty for p in parameters)


async def invoke(callback: Callable[..., Any], *args: Any) -> Any:
    """Run a user callback from Trio code and return its result.

    Must be awaited from a Trio task. ``callback(*args)`` is called in the Trio
    task; if it returns an awaitable (an ``async def`` callback does), that is
    awaited:

    * in an asyncio task on the host loop when this Trio run is asyncio-hosted
      (see :func:`is_asyncio_hosted`) and the callback is not
      marked :func:`trio_callback`. The Trio task waits without blocking Trio's
      scheduler; exceptions come back with their types; cancelling the Trio
      task cancels the asyncio task and waits for it to finish;
    * in Trio otherwise.

    A callback marked :func:`asyncio_callback` is called inside the asyncio task
    as well (sync or async).

    Raises:
        RuntimeError: outside a Trio task, or for an ``asyncio_callback`` under a
            plain ``trio.run``.
        CallbackCancelledError: the asyncio task was cancelled by someone else.
    """
    if not trio.lowlevel.in_trio_task():
        raise RuntimeError("invoke() must be awaited from a Trio task")
    world = callback_world(callback)
    loop = current_host_loop()
    if world == "asyncio":
        if loop is None:
            raise RuntimeError(
                f"{callback!r} is marked @asyncio_callback, but this Trio run is not "
                "hosted on an asyncio loop (use it from asyncio.run, or unmark it)"
            )
        return await _await_on_host(loop, _call_in_task(callback, args))
    result = callback(*args)
    if not inspect.isawaitable(result):
        return result
    if world == "trio" or loop is None:
        return await result
    try:
        return await _await_on_host(loop, result)
    finally:
        # An asyncio future the callback returned keeps the error raised
        # here, whose traceback holds this frame (see conduit._stored_errors).
        del result


async def _call_in_task(callback: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    result = callback(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


class _Exit:
    """A SystemExit or KeyboardInterrupt of a callback's asyncio task, carried out as its value."""

    __slots__ = ("error",)

    def __init__(self, error: SystemExit | KeyboardInterrupt) -> None:
        self.error = error


async def _exits_returned(awaitable: Awaitable[Any]) -> Any:
    """Await ``awaitable`` as an asyncio task's coroutine, a SystemExit or
    KeyboardInterrupt returned as an :class:`_Exit`.

    asyncio's ``Task`` re-raises those two straight out of the loop's
    ``run_forever`` (besides keeping them as its result): the conduit task
    awaiting the callback would never get it, the asyncio caller of the
    operation under way would see its task cancelled instead, and the error
    would come out of ``asyncio.run`` beside the one conduit raises from the
    application's next call (twice in all). Returned, it goes where it does
    under Trio.
    """
    try:
        return await awaitable
    except (SystemExit, KeyboardInterrupt) as exc:
        return _Exit(exc)


async def _await_on_host(loop: asyncio.AbstractEventLoop, awaitable: Awaitable[Any]) -> Any:
    """Await ``awaitable`` in an asyncio task on ``loop``, from the current Trio task."""
    future: asyncio.Future[Any]
    if asyncio.isfuture(awaitable):
        future = awaitable
    else:
        coro: Coroutine[Any, Any, Any] = _exits_returned(awaitable)
        # asyncio.Task directly, not loop.create_task: an eager task factory
        # (Python 3.12+) would run the first step right here, inside Trio's
        # scheduler tick, where sniffio says "trio" and Trio's current task is
        # ours. The task copies this Trio task's contextvars, and with them
        # which Trio task awaits it (see calling_task).
        token = _AWAITED_BY.set(trio.lowlevel.current_task())
        try:
            future = asyncio.Task(coro, loop=loop)
        finally:
            _AWAITED_BY.reset(token)
    task = trio.lowlevel.current_task()
    cancel_requested = False

    def on_done(done: asyncio.Future[Any]) -> None:
        # An asyncio callback, in the loop's thread between guest ticks: the guest
        # runner is installed there, and rescheduling wakes the guest's I/O wait.
        trio.lowlevel.reschedule(task, outcome.Value(done))

    def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
        nonlocal cancel_requested
        cancel_requested = True
        future.cancel()
        # FAILED: stay blocked until the asyncio task has really finished (its
        # finally blocks ran); on_done reschedules us then.
        return trio.lowlevel.Abort.FAILED

    future.add_done_callback(on_done)
    await trio.lowlevel.wait_task_rescheduled(abort)

    if future.cancelled():
        if inspect.iscoroutine(awaitable):
            # Cancelled before its first step, the task closed only the
            # wrapper (_exits_returned): close the callback's coroutine too,
            # or it is reported as never awaited. (A no-op once it ran.)
            awaitable.close()
        if cancel_requested:
            # Raise a genuine trio.Cancelled: our scope is cancelled, so this
            # checkpoint raises it.
            await trio.lowlevel.checkpoint()
        raise CallbackCancelledError(f"the asyncio task running {awaitable!r} was cancelled")
    error = future.exception()  # marks it retrieved: no "never retrieved" log
    if error is not None:
        # An error while unwinding replaces the cancellation, as in Trio.
        try:
            raise error
        finally:
            # Its traceback holds this frame: neither the error nor the future
            # that keeps it may stay in it (a cycle, see conduit._stored_errors),
            # nor the awaitable, when it is that future.
            del error, future, awaitable
    value = future.result()
    if type(value) is _Exit:
        try:
            raise value.error
        finally:
            del value, future, awaitable  # its traceback holds this frame (as above)
    if cancel_requested:
        # The task finished anyway (ignored or missed the cancellation); the Trio
        # caller asked to be cancelled, so honour that rather than return.
        await trio.lowlevel.checkpoint()
    return value
