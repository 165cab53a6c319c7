"""Keep a Ctrl-C under ``asyncio.run`` from raising inside Trio's own code.

``asyncio.Runner.run`` (so ``asyncio.run``) installs a SIGINT handler of its
own: the first Ctrl-C cancels the main task, the second raises
``KeyboardInterrupt`` at once, in whatever the main thread runs. With a guest
run on the loop that can be Trio's scheduler, in a guest tick: Trio, which
guards its own code from ``KeyboardInterrupt`` with a handler of its own, does
not install it when asyncio's is there, so the run crashes (``TrioInternalError``)
or the tick that raised is never followed by the next one and the program hangs
until a third Ctrl-C.

While such a handler is installed, :class:`SigintGuard` puts a wrapper in front
of it. A signal that lands in a guest tick, or anywhere in Trio's or conduit's
own code, reaches the handler from the next turn of the loop instead, where
asyncio lets ``KeyboardInterrupt`` out as when the signal lands in its
``select()``; anywhere else (the application's code, asyncio's) the handler
runs at once, as without conduit. Not only Trio's scheduler: everything a tick
runs is a library's inside (conduit's tasks, the Trio code handed to
``run_in_trio``), and so is what conduit does on the asyncio side (the calls
of the fast path wake and start Trio tasks from there), whose state a
``KeyboardInterrupt`` between two of its steps would leave half-changed (a
task scheduled and not yet on the run queue, say) for the unwinding that
follows to trip over: a review of 2026-12-07 found a second Ctrl-C that
landed in a cancelled call's clean-up on the asyncio side hang the program
until a third. The delay is at most the rest of that step: a tick runs each
runnable Trio task up to its next ``await``.

A deferred Ctrl-C that finds the run's main task done is dropped: the run is
already ending (for the Ctrl-C before it, or because its work is done), and
raised in the loop's shutdown it stopped that shutdown and left the guest run
abandoned (or turned the run's ``KeyboardInterrupt`` into a ``RuntimeError``).

The wrapper steps aside before ``asyncio.Runner.run`` returns (its main task is
done, or its handler raises), because the runner puts back Python's default
handler only if it finds its own installed. Then the loop shuts down
(``asyncio.run`` cancels its tasks, and with the keeper the guest run), under
Python's default handler, which would raise anywhere, Trio's scheduler
included. So once the runner has put it back, while the guest run ends, a
handler of ours holds a Ctrl-C: the run ends whole, then the
``KeyboardInterrupt`` comes out of the loop (:meth:`SigintGuard.release` says
so to the guest's done callback). A second Ctrl-C meanwhile is raised at once:
whoever presses it twice wants out, whatever it leaves unfinished. Other
handlers (Trio's own, which Trio installs in place of Python's default, or an
application's) are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import threading
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

try:
    from _signal import getsignal as _c_getsignal  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - interpreters without CPython's module
    _c_getsignal = signal.getsignal

#: ``signal.getsignal`` without its conversion to an enum (over 1 µs; this one,
#: CPython's C function, about 10 ns): guest ticks call it.
getsignal: Callable[[int], Any] = _c_getsignal

#: SIGINT as a plain int, for :func:`getsignal`.
SIGINT = int(signal.SIGINT)

#: ``asyncio.Runner``'s SIGINT handler method (a ``functools.partial`` of it,
#: with the run's ``main_task``, is what ``Runner.run`` installs).
_RUNNER_ON_SIGINT = getattr(asyncio.Runner, "_on_sigint", None)


def _runner_main_task(handler: Any) -> asyncio.Future[Any] | None:
    """The main task of the ``asyncio.Runner.run`` whose SIGINT handler this is, or None."""
    if (
        _RUNNER_ON_SIGINT is None
        or not isinstance(handler, functools.partial)
        or getattr(handler.func, "__func__", None) is not _RUNNER_ON_SIGINT
    ):
        return None
    task = handler.keywords.get("main_task")
    return task if isinstance(task, asyncio.Future) else None


class SigintGuard:
    """The SIGINT wrapper of one guest run (see the module docstring).

    At each guest tick the caller compares ``getsignal(SIGINT)`` with
    :attr:`seen` (one C call) and calls :meth:`follow` when they differ.
    :meth:`release` runs when the guest run ends.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_code: CodeType) -> None:
        self.loop = loop
        #: The code of the function every guest tick runs in.
        self.tick_code = tick_code
        #: Signal handlers can only be set from the main thread.
        self.active = threading.current_thread() is threading.main_thread()
        #: The SIGINT handler last seen installed (the wrapper, once installed).
        self.seen: object = None
        self._wrapper: Any = None
        self._wrapped: Any = None
        #: The main task of the runner whose handler was wrapped last.
        self._main_task: asyncio.Future[Any] | None = None
        #: The handler that holds a Ctrl-C while the loop shuts down, once installed.
        self._holder: Any = None
        self._held = False
        #: The guest run has ended (:meth:`release`): nothing of ours goes in again.
        self._released = False

    def follow(self) -> None:
        """At a guest tick: wrap a newly installed ``asyncio.Runner`` handler."""
        if not self.active or self._released:
            return
        current = getsignal(SIGINT)
        if current is self.seen:
            return
        self.seen = current
        main_task = _runner_main_task(current)
        if main_task is None or main_task.done():
            if current is signal.default_int_handler and self._ended(self._main_task):
                self._hold_while_shutting_down()
            return
        wrapper = self._wrap(current, main_task)
        signal.signal(SIGINT, wrapper)
        self.seen, self._wrapper, self._wrapped = wrapper, wrapper, current
        self._main_task = main_task
        main_task.add_done_callback(lambda _task: self._step_aside(ending=True))

    @staticmethod
    def _ended(task: asyncio.Future[Any] | None) -> bool:
        return task is not None and task.done()

    def _step_aside(self, *, ending: bool = False) -> None:
        """Put back the handler wrapped, if the wrapper is still installed.

        ``ending``: the run's main task is done. The runner then puts back
        Python's default handler before the loop runs again, for its shutdown:
        the first thing that shutdown runs (queued now, so before the tasks it
        cancels take their steps) is the holder's installation.
        """
        wrapper, wrapped = self._wrapper, self._wrapped
        self._wrapper = self._wrapped = None
        if wrapper is not None and getsignal(SIGINT) is wrapper:
            signal.signal(SIGINT, wrapped)
        if ending:
            self.loop.call_soon(self._hold_if_shutting_down)

    def _hold_if_shutting_down(self) -> None:
        """The first step of the loop after its run: hold Ctrl-C if it shuts down."""
        current = getsignal(SIGINT)
        if self._released or current is self.seen or current is not signal.default_int_handler:
            return
        self.seen = current
        if self._ended(self._main_task):
            self._hold_while_shutting_down()

    def _hold_while_shutting_down(self) -> None:
        """The runner put back Python's default handler: its loop is shutting
        down, the guest run with it. Hold a Ctrl-C until the run has ended."""

        def holder(signum: int, frame: FrameType | None) -> None:
            self._hold()

        signal.signal(SIGINT, holder)
        self.seen = self._holder = holder

    def _hold(self) -> None:
        """Hold a Ctrl-C until the guest run has ended; a second is raised at once
        (and any once the loop is closed: a run abandoned would never end)."""
        if self._held or self.loop.is_closed():
            self._put_back_default()
            raise KeyboardInterrupt
        self._held = True

    def _put_back_default(self) -> None:
        holder, self._holder = self._holder, None
        if holder is not None and getsignal(SIGINT) is holder:
            signal.signal(SIGINT, signal.default_int_handler)

    def release(self) -> bool:
        """The guest run has ended: put back what was there before us. Whether a
        Ctrl-C was held meanwhile (the caller raises ``KeyboardInterrupt`` then)."""
        self._released = True
        self._step_aside()
        self._put_back_default()
        held, self._held = self._held, False
        return held

    def _wrap(self, handler: Any, main_task: asyncio.Future[Any]) -> Any:
        def call_handler(signum: int, frame: FrameType | None) -> None:
            try:
                handler(signum, frame)
            except KeyboardInterrupt:
                # Runner.run is about to end: step aside, so that it finds its
                # own handler and puts back Python's default.
                self.release()
                raise

        def deferred(signum: int) -> None:
            if main_task.done():
                self._hold()  # the run is ending already: see the module docstring
            else:
                call_handler(signum, None)

        def wrapper(signum: int, frame: FrameType | None) -> None:
            if main_task.done():
                # Its handler would raise at once, in the loop's callbacks
                # while the runner's own (its done callback) waits to run,
                # which then stops the shutdown's loop (a RuntimeError, and
                # the guest run abandoned): held as in the shutdown.
                self._hold()
            elif self._in_library_code(frame):
                with contextlib.suppress(RuntimeError):  # a loop closed meanwhile
                    self.loop.call_soon_threadsafe(deferred, signum)
            else:
                call_handler(signum, frame)

        return wrapper

    def _in_library_code(self, frame: FrameType | None) -> bool:
        """Whether ``frame`` (where the signal landed) or a frame that called it is
        a guest tick, or Trio's or conduit's code."""
        while frame is not None:
            if frame.f_code is self.tick_code or _is_library_module(
                frame.f_globals.get("__name__")
            ):
                return True
            frame = frame.f_back
        return False


def _is_library_module(name: object) -> bool:
    """Whether ``name`` is a module of Trio's or of conduit's."""
    if not isinstance(name, str):
        return False
    top = name.partition(".")[0]
    return top == "trio" or top == "conduit"


__all__ = ["SIGINT", "SigintGuard", "getsignal"]
