"""Worker-thread calls whose errors make no reference cycle.

When a function run by ``trio.to_thread.run_sync`` raises, Trio hands the
error back inside outcome objects that stay referenced from frames of its
thread machinery (trio 0.35: the thread cache's ``_handle_job`` keeps the
outcome in a local, ``report_back_in_trio_thread_fn`` in a closure cell), and
the error's traceback reaches those frames: the worker-side frames' ``f_back``
leads to them. A reference cycle, then, which also holds every frame the
error passed through on the Trio side until it was caught (a handler's, with
its connection), freed only by a full pass of the cycle collector (see
:mod:`conduit._stored_errors`). A peer asking for missing files makes one per
call.

:func:`run_sync` never lets an error out of the thread: the function's error
is returned (:class:`Raised`) with the worker-side tracebacks dropped, and
raised again in the Trio thread, from frames that keep no reference to it.
The worker-side traceback of an error that is not an ``OSError`` or one of
conduit's own (a bug, most likely) is kept as a note on it, as text.
:func:`returned` and :func:`unwrap` are the two halves, for a thread started
by other means (:mod:`conduit.transfer._stoppable`'s). (:mod:`conduit._worker_hop`
keeps no outcome in its threads' frames: it hands its outcome over instead.)
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple

import trio

from .errors import ConduitError

R = TypeVar("R")
Ts = TypeVarTuple("Ts")


class Raised:
    """What :func:`returned` gives back in place of the error ``function`` raised."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def returned(function: Callable[[*Ts], R], *args: *Ts) -> R | Raised:
    """In the worker thread: ``function(*args)``, or its error as a :class:`Raised`.

    The error and every error it leads to (cause, context, a group's members)
    lose their traceback (their frames are this thread's, and reach the
    thread machinery's, see the module docstring); an unexpected one keeps
    it as a note.
    """
    try:
        return function(*args)
    except BaseException as exc:
        _drop_tracebacks(exc)
        return Raised(exc)


def _drop_tracebacks(exc: BaseException) -> None:
    """Drop the traceback of ``exc`` and of every error it leads to.

    Its cause *and* its context (an error raised ``from`` one while handling
    another has both, and either's frames make the cycle), and a group's
    members; each error once, however they are linked. One that is neither an
    ``OSError`` nor conduit's own (a bug, most likely) keeps its traceback as
    a note, as text.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if error.__traceback__ is not None and not isinstance(error, (OSError, ConduitError)):
            lines = traceback.format_tb(error.__traceback__)
            error.add_note("in a worker thread:\n" + "".join(lines))
        error.__traceback__ = None
        pending.extend(e for e in (error.__cause__, error.__context__) if e is not None)
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)


def unwrap(result: R | Raised) -> R:
    """In the Trio thread: the value :func:`returned` gave, or its error raised."""
    if type(result) is not Raised:
        return result  # type: ignore[return-value]
    error = result.error
    del result
    try:
        raise error
    finally:
        # This frame is in the error's traceback: it must not hold the error.
        del error


async def run_sync(
    function: Callable[[*Ts], R],
    *args: *Ts,
    limiter: trio.CapacityLimiter | None = None,
    abandon_on_cancel: bool = False,
) -> R:
    """``trio.to_thread.run_sync(function, *args, ...)``, without the cycle its errors make."""
    return unwrap(
        await trio.to_thread.run_sync(
            returned, function, *args, limiter=limiter, abandon_on_cancel=abandon_on_cancel
        )
    )


__all__ = ["Raised", "returned", "run_sync", "unwrap"]
