"""``@bridged``: public coroutines that work when awaited from Trio or from asyncio.

The feature modules (server, client, peer, transfer) are pure Trio; they mark
their public coroutine methods ``@bridged`` and import nothing of the asyncio
shim. At call time the wrapper asks which library runs the caller: under Trio it
awaits the method directly; under asyncio it hands the whole call to the shim
(:mod:`conduit._asyncio`), which runs it in the loop's Trio guest run.

The shim registers its hooks here (:func:`install_asyncio_runner`) when it is
imported, and ``conduit/__init__.py`` imports it, so it is always in place
before any bridged method can be called. The dependency points from the shim to
this module, never back: this module decides, the shim executes.

An object that lives in one Trio run (a running :class:`~conduit.Server`, a
connected :class:`~conduit.Client`, their peers and RPC proxies: each a
:class:`RunBound`) is refused, with a ``RuntimeError`` that says where to
await it, to a caller in another thread while that run lives. Its methods
touch that run's nurseries and tasks; awaited from another thread's run (a
server served by one thread's ``asyncio.run``, awaited from another's) they
corrupted both runs, after seeming to work (found by a review on
2026-12-07).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

import attrs
import sniffio
import trio

__all__ = [
    "BridgedCall",
    "RunBinding",
    "RunBound",
    "Submit",
    "Unwind",
    "asyncio_caller_loop",
    "bridged",
    "current_flavor",
    "install_asyncio_fast_path",
    "install_asyncio_runner",
    "run_on_guest",
]

T = TypeVar("T")
P = ParamSpec("P")


class BridgedCall(Protocol):
    """One call handed to the shim: settled by the Trio side, awaited by the asyncio caller."""

    #: Settled with the call's result or exception (cancelled if it never ran).
    future: asyncio.Future[Any]
    #: An error the Trio side raised while unwinding after the caller was cancelled.
    late_error: BaseException | None


@attrs.frozen
class RunBinding:
    """The Trio run an object lives in: its thread, and its token to ask whether it still runs."""

    thread: int
    token: trio.lowlevel.TrioToken

    @classmethod
    def current(cls) -> RunBinding:
        """The run of the calling Trio task."""
        return cls(threading.get_ident(), trio.lowlevel.current_trio_token())

    def is_alive(self) -> bool:
        """Whether this run still runs."""
        try:
            # Thread-safe by design; a no-op in that run if it lives.
            self.token.run_sync_soon(_nothing)
        except trio.RunFinishedError:
            return False
        return True


def _nothing() -> None:
    """Run in another Trio run to learn that it lives."""


class RunBound:
    """An object whose bridged methods must be awaited in the run it lives in (see above)."""

    #: The thread of the run it last lived in (0: none yet). A quick filter,
    #: looked at on every call: a caller in another thread is then checked
    #: with :meth:`_run_binding`, which decides.
    _thread_of_run: int = 0

    def _run_binding(self) -> RunBinding | None:
        """The run this object lives in; None while it lives in none (not running,
        not connected: its last run over)."""
        return None


_this_thread = threading.get_ident


def _refuse_if_foreign(arg: RunBound) -> None:
    """``RuntimeError`` if ``arg`` lives in a run of another thread that still runs."""
    binding = arg._run_binding()
    if binding is not None and binding.thread != _this_thread() and binding.is_alive():
        raise RuntimeError(
            f"this {type(arg).__name__} lives in a Trio run (or an asyncio event loop's, "
            "under the shim) of another thread, which still runs: await its methods "
            "there, not from this thread (from asyncio code: await asyncio.wrap_future("
            "asyncio.run_coroutine_threadsafe(coroutine, its_loop)); from a Trio task: "
            "await trio.to_thread.run_sync(functools.partial(trio.from_thread.run, "
            "function, trio_token=its_token)))"
        )


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    """The objects passed by keyword (``client=``): see :func:`bridged`."""
    for arg in kwargs.values():
        if isinstance(arg, RunBound) and arg._thread_of_run:
            _refuse_if_foreign(arg)


#: Starts ``fn(*args, **kwargs)`` in the guest run of the given loop (the shim's
#: ``_submit``), from asyncio code running on that loop.
Submit = Callable[
    [asyncio.AbstractEventLoop, Callable[..., Awaitable[Any]], tuple[Any, ...], dict[str, Any]],
    BridgedCall,
]
#: Cancels a submitted call's Trio side and waits until it has unwound (``_unwind``).
Unwind = Callable[[Any], Awaitable[None]]

_submit: Submit | None = None
_unwind: Unwind | None = None
#: The threads running a guest tick now (the shim's ``_Guest.tick`` adds and
#: discards its own): in no other thread can an asyncio task step where
#: sniffio says "trio" (see ``_stepping_asyncio_loop``), and while it is empty
#: nothing more is asked on the hot path.
ticking_threads: set[int] = set()

#: A bridged method's asyncio-native implementation: called with the caller's
#: loop and the call's arguments, it returns an awaitable to await instead of
#: handing the call to the guest run, or None when it does not apply.
FastPath = Callable[..., Awaitable[Any] | None]

# By the bridged method (the undecorated function), see install_asyncio_fast_path.
_fast_paths: dict[Callable[..., Any], FastPath] = {}


def install_asyncio_runner(submit: Submit, unwind: Unwind) -> None:
    """Called once by the shim at import: how bridged calls from asyncio are run.

    The shim starts a call and unwinds a cancelled one; :func:`run_on_guest`
    awaits it, for bridged methods and ``run_in_trio`` alike.
    """
    global _submit, _unwind
    _submit, _unwind = submit, unwind


async def run_on_guest(
    loop: asyncio.AbstractEventLoop,
    fn: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> T:
    """``fn(*args, **kwargs)`` in ``loop``'s Trio guest run, awaited from asyncio on that loop.

    Its result or exception comes back as it is. Cancelling the caller cancels
    the Trio side and waits until it has unwound, then raises the
    ``CancelledError``, chained to an error the Trio side raised meanwhile.
    """
    if _submit is None or _unwind is None:  # pragma: no cover - conduit/__init__ installs it
        raise RuntimeError("conduit's asyncio shim is not loaded (import conduit)")
    call = _submit(loop, fn, args, kwargs)
    cancelled: asyncio.CancelledError | None = None
    try:
        try:
            result: T = await call.future
            return result
        except asyncio.CancelledError as cancel:
            cancelled = cancel
        # Unwound out of the except clause: in it, the Trio side's Cancelled
        # (raised by _unwind's cancel) would take this CancelledError as its
        # context, and an error raised while unwinding takes that Cancelled
        # as its own, chained below as this one's cause: a cycle.
        await _unwind(call)
        if call.late_error is not None:
            raise cancelled from call.late_error
        raise cancelled
    finally:
        # The call keeps the error raised (its future's, or the late one
        # chained), whose traceback holds this frame, as the CancelledError's
        # does (see conduit._stored_errors).
        del call, cancelled


def install_asyncio_fast_path(wrapper: Callable[..., Any], fast_path: FastPath) -> None:
    """Give the ``@bridged`` method ``wrapper`` an asyncio-native implementation.

    Called by the shim at import, for hot calls it can run on the asyncio
    loop's thread without a hop into the guest run. ``fast_path(loop, *args,
    **kwargs)`` must keep the method's documented behaviour exactly (results,
    exception types, cancellation); returning None falls back to the hop.
    Its own leading parameters (the loop, the method's ``self``) must be
    positional-only: keyword arguments are the caller's, and may have any name.
    """
    _fast_paths[wrapper.__wrapped__] = fast_path  # type: ignore[attr-defined]


def current_flavor() -> Literal["trio", "asyncio"]:
    """Return which async library is running the calling code: ``"trio"`` or ``"asyncio"``.

    Detection is sniffio's, so Trio code running inside one of our guest runs says
    ``"trio"`` and asyncio tasks on the hosting loop say ``"asyncio"``.

    Raises:
        RuntimeError: when called outside async code, or under another library
            (curio, ...), which conduit does not support.
    """
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        raise RuntimeError(
            "conduit's async API must be awaited from a Trio or asyncio task "
            "(no async library is running here)"
        ) from None
    if library == "trio":
        return "trio"
    if library == "asyncio":
        return "asyncio"
    raise RuntimeError(f"conduit supports Trio and asyncio, not {library!r}")


def asyncio_caller_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop when the caller is asyncio code; ``None`` under Trio.

    What :func:`current_flavor` decides, minus a system call: the common case
    goes through the asyncio task itself (``asyncio.get_running_loop`` calls
    ``getpid()`` on every use in Python 3.11), the rest through sniffio.
    """
    name = sniffio.thread_local.name
    if name == "trio":  # set by Trio while it runs (trio.run, guest ticks)
        return _stepping_asyncio_loop() if ticking_threads else None
    if name is None and sniffio.current_async_library_cvar.get() is None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop: let current_flavor() explain
            task = None
        if task is not None:
            return task.get_loop()
    if current_flavor() == "trio":  # raises outside Trio and asyncio
        return None
    return asyncio.get_running_loop()


def _stepping_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """Where sniffio says Trio runs: the asyncio loop whose task is stepping there
    anyway, if one is; None when it is Trio's own code.

    An asyncio task can take a step inside a Trio guest tick: one a plain
    callback conduit runs there creates, under Python 3.12's
    ``asyncio.eager_task_factory``, takes its first step at once. sniffio
    still says "trio", and a bridged call awaited there as Trio code failed
    ("Task got bad yield: WaitTaskRescheduled", found by a review of 3.12 and
    3.13). Only in a guest tick of this thread (``ticking_threads``): a
    ``trio.run`` started from an asyncio task is Trio's code, whatever
    another thread hosts (counting guest runs over the process took it for
    asyncio's, a review found).
    """
    if _this_thread() not in ticking_threads:
        return None
    loop = asyncio._get_running_loop()
    if loop is None or asyncio.current_task(loop) is None:
        return None
    return loop


def bridged(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Make an ``async def`` method (or function) awaitable from Trio and from asyncio.

    The wrapper keeps the name, docstring and signature (:func:`functools.wraps`)
    and is itself an ``async def``. At call time it asks which library runs the
    caller (as :func:`current_flavor` does): under Trio it awaits ``method``
    directly; under asyncio it runs the whole call in the loop's Trio guest run,
    exactly as :func:`conduit.run_in_trio` does. Bridge whole operations: each
    asyncio call costs one asyncio-to-Trio hop.
    """

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        # An object living in another thread's run is refused (see RunBound):
        # the method's own object, or a transfer's client or peer, the first
        # of the two that can live in a run; else one passed by keyword. On
        # every call: inline, and only a caller in another thread than the
        # object's last run is looked at closer.
        for arg in args[:2]:
            if isinstance(arg, RunBound):
                thread = arg._thread_of_run
                if thread and thread != _this_thread():
                    _refuse_if_foreign(arg)
                break
        else:
            if kwargs:
                _check_kwargs(kwargs)
        # asyncio_caller_loop()'s first test, inline: under Trio (the common
        # case) this runs on every call, and a Python call is ~0.1 us.
        if sniffio.thread_local.name == "trio" and (
            not ticking_threads or _stepping_asyncio_loop() is None
        ):
            return await method(*args, **kwargs)
        loop = asyncio_caller_loop()
        if loop is None:
            return await method(*args, **kwargs)
        fast = _fast_paths.get(method)
        if fast is not None:
            awaitable = fast(loop, *args, **kwargs)
            if awaitable is not None:
                return await awaitable  # type: ignore[no-any-return]
        return await run_on_guest(loop, method, args, kwargs)

    return wrapper
