"""The server's accept loops: :func:`trio.serve_listeners`, minus one close per connection.

Trio's version closes each stream after its handler returns, with
``aclose_forcefully``; the server's per-connection task closes its stream
itself, last thing, so that second close (a cancel scope and a Cancelled
raised and caught, for every connection) is left out here. A listener that
also tells who connected (``accept_with_address``, as
:class:`conduit._gatekeeper.ScreenedListener` does, from the ``accept`` call
itself) passes that address to the handler, which then asks the socket for
nothing. Everything else is Trio's: each listener is closed when serving
ends, and an ``accept`` failing for lack of resources (file descriptors,
memory) is retried after :data:`SLEEP_TIME`, not fatal; it is logged
within a budget (:class:`~conduit._log_limit.LimitedLog`: five lines, then
one every 10 s, saying how many were left out), without a traceback, which
says nothing an errno does not (until 2026-12-07, ten lines of traceback a
second for as long as the descriptors ran out).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ._log_limit import LimitedLog

#: ``accept`` errors that mean the system is overloaded (Trio's list).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Seconds to wait after one of those.
SLEEP_TIME = 0.1

log = logging.getLogger("conduit.server")
_limited = LimitedLog(log)

#: ``handler(stream, address)``: the peer's (host, port), or None when unknown.
Handler = Callable[[Any, "tuple[str, int] | None"], Awaitable[object]]


async def _serve_one(
    listener: trio.abc.Listener[Any], nursery: trio.Nursery, handler: Handler
) -> None:
    accept_with_address = getattr(listener, "accept_with_address", None)
    async with listener:
        while True:
            try:
                if accept_with_address is not None:
                    stream, address = await accept_with_address()
                else:
                    stream, address = await listener.accept(), None
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                _limited.error(
                    "accept",
                    trio.current_time(),
                    "accept returned %s (%s); retrying in %s seconds",
                    errno.errorcode[exc.errno],
                    os.strerror(exc.errno),
                    SLEEP_TIME,
                )
                await trio.sleep(SLEEP_TIME)
            else:
                nursery.start_soon(handler, stream, address)


async def serve_listeners(
    handler: Handler,
    listeners: Sequence[trio.abc.Listener[Any]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``handler(stream, address)`` in a new task for each connection, until cancelled.

    ``handler`` must close the stream it is given. Reports started once every
    listener accepts.
    """
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_serve_one, listener, nursery, handler)
        task_status.started()


__all__ = ["ACCEPT_CAPACITY_ERRNOS", "SLEEP_TIME", "serve_listeners"]
