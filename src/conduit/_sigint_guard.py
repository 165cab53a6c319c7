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

Where the signal landed is decided as Trio decides its own protection: a
guest tick anywhere in the stack, else the innermost frame that is not the
standard library's (nor a helper library's Trio calls into). An
application's ``async def`` handler that conduit called gets its Ctrl-C at
once, as without conduit (the review of the first version, which asked
every frame, found a busy one could not be stopped).

A Ctrl-C that comes once the run's main task is done is dropped: the run is
already returning (for the Ctrl-C before it, or because its work is done),
and raised among the loop's last callbacks it stopped the shutdown's loop (a
``RuntimeError``, the guest run abandoned). One that came while the main
task ran, deferred past its end, is held: raised once the guest run has
ended, or delivered to the next run of a reused ``asyncio.Runner`` that
wakes the guest run.

The wrapper steps aside before ``asyncio.Runner.run`` returns (its main task is
done, or its handler raises), because the runner puts back Python's default
handler only if it finds its own installed. Then the loop shuts down
(``asyncio.run`` cancels its tasks, and with the keeper the guest run), under
Python's default handler, which would raise anywhere, Trio's scheduler
included. So once the guest run is asked to end (:meth:`SigintGuard.shutting_down`,
over Python's default handler only), a handler of ours holds a Ctrl-C: the
run ends whole, then the
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
import sys
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


#: Libraries Trio and conduit call into, whose frames say nothing of whose
#: code runs (as the standard library's): the frame that called them decides.
_PASSED_THROUGH = frozenset(
    {"outcome", "sniffio", "attr", "attrs", "cattrs", "sortedcontainers", "exceptiongroup"}
)


class SigintGuard:
    """The SIGINT wrapper of one guest run (see the module docstring).

    At each guest tick the caller compares ``getsignal(SIGINT)`` with
    :attr:`seen` (one C call) and calls :meth:`follow` when they differ.
    :meth:`shutting_down` runs when the guest run is asked to end,
    :meth:`release` when it has ended.
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
        #: The handler that holds a Ctrl-C while the guest run ends, once installed.
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
            return
        wrapper, deliver = self._wrap(current, main_task)
        signal.signal(SIGINT, wrapper)
        self.seen, self._wrapper, self._wrapped = wrapper, wrapper, current
        main_task.add_done_callback(lambda _task: self._step_aside())
        if self._held and self._holder is None:
            # A Ctrl-C that came as the run before this one ended (see
            # _wrap): this run's, as if pressed now (a reused Runner).
            self._held = False
            self.loop.call_soon(deliver, SIGINT, None)

    def _step_aside(self) -> None:
        """Put back the handler wrapped, if the wrapper is still installed (and
        never wrap it again: a tick between its ``KeyboardInterrupt`` and the
        run's end, as the exception crosses Trio's side, found it new and
        wrapped it, and the runner then left its own handler installed)."""
        wrapper, wrapped = self._wrapper, self._wrapped
        self._wrapper = self._wrapped = None
        if wrapper is not None and getsignal(SIGINT) is wrapper:
            signal.signal(SIGINT, wrapped)
            self.seen = wrapped

    def shutting_down(self) -> None:
        """The guest run is asked to end (the loop's shutdown cancelled it, say):
        from now on a Ctrl-C is held until it has (see the module docstring).

        Only over Python's default handler, which the runner puts back before
        its shutdown: a wrapper of ours still in place defers as it does, and
        an application's own handler is left alone.
        """
        if not self.active or self._released or self._holder is not None:
            return
        if getsignal(SIGINT) is not signal.default_int_handler:
            return

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

    def _wrap(
        self, handler: Any, main_task: asyncio.Future[Any]
    ) -> tuple[Callable[[int, FrameType | None], None], Callable[[int, FrameType | None], None]]:
        """The wrapper of ``handler``, and what delivers a Ctrl-C to it."""

        def call_handler(signum: int, frame: FrameType | None) -> None:
            if main_task.done():
                # Deferred, and the main task ended meanwhile: the Ctrl-C came
                # while it ran, and is not lost (a review found it was):
                # held, for the next run of a reused Runner (follow) or the
                # guest run's end (release), which raise it where it cannot
                # stop a shutdown. Its handler would raise among the loop's
                # last callbacks, before the runner's own done callback, which
                # then stopped the shutdown's loop (a RuntimeError, the guest
                # run abandoned).
                self._held = True
                return
            try:
                handler(signum, frame)
            except KeyboardInterrupt:
                # Runner.run is about to end: step aside, so that it finds its
                # own handler and puts back Python's default.
                self._step_aside()
                raise

        def wrapper(signum: int, frame: FrameType | None) -> None:
            if main_task.done():
                # The run is returning already (its KeyboardInterrupt, if this
                # is the Ctrl-C after one): dropped, as the runner would not
                # act on it either before its done callback ran.
                return
            if self._in_library_code(frame):
                with contextlib.suppress(RuntimeError):  # a loop closed meanwhile
                    self.loop.call_soon_threadsafe(call_handler, signum, None)
            else:
                call_handler(signum, frame)

        return wrapper, call_handler

    def _in_library_code(self, frame: FrameType | None) -> bool:
        """Whether the signal landed in a guest tick, or in Trio's or conduit's
        code on the asyncio side.

        A guest tick anywhere in the stack decides (everything it runs is a
        library's inside). Otherwise the innermost frame that is not the
        standard library's decides, as Trio's own protection does: an
        application's callback that conduit called (an ``async def`` RPC
        handler, a hook, a progress callback) gets its Ctrl-C at once, and a
        loop in it can be stopped (the review of the first version found
        every frame of the stack asked, and conduit's below the callback
        held a Ctrl-C until it next awaited, for ever in a busy loop).
        """
        deciding: str | None = None
        while frame is not None:
            if frame.f_code is self.tick_code:
                return True
            if deciding is None:
                name = frame.f_globals.get("__name__")
                top = name.partition(".")[0] if isinstance(name, str) else ""
                if top not in sys.stdlib_module_names and top not in _PASSED_THROUGH:
                    deciding = top
            frame = frame.f_back
        return deciding in ("trio", "conduit")


__all__ = ["SIGINT", "SigintGuard", "getsignal"]
