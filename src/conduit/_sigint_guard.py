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
of it. A signal that lands in a guest tick reaches the handler from the next
turn of the loop instead, where asyncio lets ``KeyboardInterrupt`` out as when
the signal lands in its ``select()``; anywhere else (the asyncio side) the
handler runs at once, as without conduit. Not only Trio's scheduler: from the
asyncio side, everything a tick runs is a library's inside (conduit's tasks,
the Trio code handed to ``run_in_trio``), whose state a ``KeyboardInterrupt``
between two of its steps would leave half-changed (a task taken off a list and
not yet woken, say) for the unwinding that follows to trip over. The tick
itself returns quickly: it runs each runnable Trio task up to its next
``await``, so the delay is at most that.

The wrapper steps aside before ``asyncio.Runner.run`` returns (its main task is
done, or its handler raises), because the runner puts back Python's default
handler only if it finds its own installed. Other handlers (Trio's own, which
Trio installs in place of Python's default, or an application's) are left
alone.
"""

from __future__ import annotations

import asyncio
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

    def follow(self) -> None:
        """At a guest tick: wrap a newly installed ``asyncio.Runner`` handler."""
        if not self.active:
            return
        current = getsignal(SIGINT)
        if current is self.seen:
            return
        self.seen = current
        main_task = _runner_main_task(current)
        if main_task is None or main_task.done():
            return
        wrapper = self._wrap(current)
        signal.signal(SIGINT, wrapper)
        self.seen, self._wrapper, self._wrapped = wrapper, wrapper, current
        main_task.add_done_callback(lambda _task: self.release())

    def release(self) -> None:
        """Put back the handler wrapped, if the wrapper is still installed."""
        wrapper, wrapped = self._wrapper, self._wrapped
        self._wrapper = self._wrapped = None
        if wrapper is not None and getsignal(SIGINT) is wrapper:
            signal.signal(SIGINT, wrapped)

    def _wrap(self, handler: Any) -> Any:
        def call_handler(signum: int, frame: FrameType | None) -> None:
            try:
                handler(signum, frame)
            except KeyboardInterrupt:
                # Runner.run is about to end: step aside, so that it finds its
                # own handler and puts back Python's default.
                self.release()
                raise

        def wrapper(signum: int, frame: FrameType | None) -> None:
            if self._in_guest_tick(frame):
                self.loop.call_soon_threadsafe(call_handler, signum, None)
            else:
                call_handler(signum, frame)

        return wrapper

    def _in_guest_tick(self, frame: FrameType | None) -> bool:
        """Whether ``frame`` (where the signal landed) is part of a guest tick."""
        while frame is not None:
            if frame.f_code is self.tick_code:
                return True
            frame = frame.f_back
        return False


__all__ = ["SIGINT", "SigintGuard", "getsignal"]
