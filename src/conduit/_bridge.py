"""``@bridged``: public coroutines that work when awaited from Trio or from asyncio.

The feature modules (server, client, peer, transfer) are pure Trio; they mark
their public coroutine methods ``@bridged`` and import nothing of the asyncio
shim. At call time the wrapper asks which library runs the caller: under Trio it
awaits the method directly; under asyncio it hands the whole call to the shim
(:mod:`conduit._asyncio`), which runs it in the loop's Trio guest run.

The shim registers itself here (:func:`install_asyncio_runner`) when it is
imported, and ``conduit/__init__.py`` imports it, so it is always in place
before any bridged method can be called. The dependency points from the shim to
this module, never back: this module decides, the shim executes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, ParamSpec, TypeVar

import sniffio

__all__ = [
    "AsyncioRunner",
    "asyncio_caller_loop",
    "bridged",
    "current_flavor",
    "install_asyncio_runner",
]

T = TypeVar("T")
P = ParamSpec("P")

#: Runs ``await fn(*args, **kwargs)`` in the guest run of the given loop, from
#: asyncio code, and returns its result (the shim's ``run_on_loop``).
AsyncioRunner = Callable[
    [asyncio.AbstractEventLoop, Callable[..., Awaitable[Any]], tuple[Any, ...], dict[str, Any]],
    Awaitable[Any],
]

_asyncio_runner: AsyncioRunner | None = None


def install_asyncio_runner(runner: AsyncioRunner) -> None:
    """Called once by the shim at import: how bridged calls from asyncio are run."""
    global _asyncio_runner
    _asyncio_runner = runner


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
        return None
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
        loop = asyncio_caller_loop()
        if loop is None:
            return await method(*args, **kwargs)
        if _asyncio_runner is None:  # pragma: no cover - conduit/__init__ installs it
            raise RuntimeError("conduit's asyncio shim is not loaded (import conduit)")
        result: T = await _asyncio_runner(loop, method, args, kwargs)
        return result

    return wrapper
