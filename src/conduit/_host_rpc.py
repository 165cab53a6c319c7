"""The asyncio shim's fast path for RPC: ``rpc.call``, ``rpc.invoke``, ``Client.call``.

A bridged call from asyncio normally runs whole in the loop's Trio guest run
(:mod:`conduit._asyncio`): a hop into Trio, the call, a hop back. For the calls
that matter most in a hot loop, the work done while the call is in flight is
all synchronous: encode the CALL frame, seal it, write it, register the
caller. So when the connection is hosted on the caller's own loop (its guest
run lives there), these run right in the caller's asyncio task, between guest
ticks (:meth:`conduit._connection.Connection.call_nowait`), and the caller
awaits an asyncio future that the result settles: from the loop's own socket
callback when the connection's reading is on the loop
(:mod:`conduit._host_reader`), otherwise from the Trio reading task. No Trio
task runs for the call.

Same behaviour as the bridged path:

* results and failures: the same result dict, the same exceptions
  (:class:`~conduit.RPCError`, :class:`~conduit.RPCTimeoutError` from the
  connection's call timer, :class:`~conduit.ConnectionClosed`), argument
  errors raised before anything is sent;
* cancelling the caller (``task.cancel()``, ``asyncio.timeout``): the call is
  forgotten and the peer told (a CANCEL frame), before ``CancelledError``
  propagates, as the Trio side's unwinding did;
* anything else (no connection yet, a connection of another loop or of a
  plain ``trio.run``) takes the bridged path unchanged.

:mod:`conduit._asyncio` installs these when it is imported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import outcome

from . import _bridge
from ._connection import Connection
from ._rpc_proxy import RPCProxy, call_arguments, checked_timeout, result_dict
from .client import Client
from .errors import ConnectionClosed, RPCError
from .protocol.messages import Result

__all__ = ["install"]


class _HostCalls:
    """The fast path's calls on one connection.

    Callers woken by one batch of results run one after the other in the same
    loop iteration, and most send their next call at once: as the Trio path
    does (``PendingCalls.waking``), those calls are queued until the last
    caller woken has resumed, then sent together, one record and one write
    for the burst (records of ``BURST_RECORD_FRAMES`` for a longer one, each
    sent as it fills: see ``Connection.call_nowait``).
    """

    __slots__ = ("connection", "held", "waking")

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        #: Callers whose future was settled and who have not resumed yet.
        self.waking = 0
        #: Whether a call was queued unsent (``send=False``) since the last
        #: send: only then has the last caller resumed something to send.
        self.held = False

    async def call(
        self,
        loop: asyncio.AbstractEventLoop,
        method: str,
        arguments: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        """What ``Connection.call`` does, awaited from asyncio on the hosting loop."""
        future: asyncio.Future[Result] = loop.create_future()

        def done(result: outcome.Outcome[Result]) -> None:
            # On the loop's thread: from the host reader, or a Trio task of the guest.
            if not future.done():
                self.waking += 1
                # By type, not isinstance: Outcome is an ABC, whose
                # isinstance is two Python-level calls per call.
                if type(result) is outcome.Error:
                    future.set_exception(result.error)
                else:
                    future.set_result(result.unwrap())

        connection = self.connection
        send = self.waking == 0
        call_id = connection.call_nowait(method, arguments, timeout, done, send=send)
        if not send:
            self.held = True
        try:
            result = await future
        except BaseException:
            if not future.done() or future.cancelled():
                # Not settled by done(), which counts the callers it wakes: this
                # one was cancelled, or its coroutine closed, before the answer.
                connection.forget_call(call_id)
                raise
            # Settled: its error, or answered while the caller was cancelled
            # (cancelled it is, asyncio's rule; the error is marked retrieved).
            future.exception()
            self._resumed()
            # The future keeps the error raised, whose traceback holds this
            # frame (see conduit._stored_errors).
            del future
            raise
        self._resumed()
        if not result.ok:
            raise RPCError(result.error or "remote call failed", result.code or "error")
        return result.value

    def _resumed(self) -> None:
        self.waking -= 1
        if not self.waking and self.held:
            # A sequential caller sent its call itself: nothing to send here
            # (two Python calls less per call).
            self.held = False
            self.connection.send_queued()


def _host_calls(proxy: RPCProxy, loop: asyncio.AbstractEventLoop) -> _HostCalls | None:
    """The fast path of ``proxy``'s connection when its reading is hosted on ``loop``."""
    try:
        connection = proxy._connection()
    except Exception:  # not connected, closed: the bridged path reports it as ever
        return None
    host_reader = connection.host_reader
    if host_reader is None or host_reader.loop is not loop:
        return None
    calls: _HostCalls | None = connection.owned.get(_HostCalls)
    if calls is None:
        calls = connection.owned[_HostCalls] = _HostCalls(connection)
    return calls


async def _rpc_call(
    calls: _HostCalls,
    loop: asyncio.AbstractEventLoop,
    method: str,
    arguments: dict[str, Any],
    timeout: float | None,
) -> dict[str, Any]:
    try:
        value = await calls.call(loop, method, arguments, timeout)
    except (RPCError, ConnectionClosed) as exc:
        return result_dict(error=exc)
    return {"success": True, "data": value}  # result_dict(value), inline: once per call


def fast_call(
    loop: asyncio.AbstractEventLoop,
    proxy: RPCProxy,
    /,
    method: str,
    args: Any = None,
    timeout: float | None = None,
    **kwargs: Any,
) -> Awaitable[dict[str, Any]] | None:
    """``RPCProxy.call`` on the loop (see the module docstring)."""
    calls = _host_calls(proxy, loop)
    if calls is None:
        return None
    arguments = call_arguments(args, kwargs)
    return _rpc_call(
        calls,
        loop,
        method,
        arguments,
        proxy.default_timeout if timeout is None else checked_timeout(timeout),
    )


def fast_invoke(
    loop: asyncio.AbstractEventLoop,
    proxy: RPCProxy,
    /,
    method: str,
    args: Any = None,
    timeout: float | None = None,
    **kwargs: Any,
) -> Awaitable[Any] | None:
    """``RPCProxy.invoke`` on the loop (see the module docstring)."""
    calls = _host_calls(proxy, loop)
    if calls is None:
        return None
    arguments = call_arguments(args, kwargs)
    return calls.call(
        loop,
        method,
        arguments,
        proxy.default_timeout if timeout is None else checked_timeout(timeout),
    )


def fast_client_call(
    loop: asyncio.AbstractEventLoop,
    client: Client,
    /,
    method: str,
    args: Any = None,
    timeout: float | None = None,
    **kwargs: Any,
) -> Awaitable[Any] | None:
    """``Client.call`` (``client.rpc.invoke``) on the loop."""
    return fast_invoke(loop, client.rpc, method, args, timeout, **kwargs)


def install() -> None:
    """Register the fast paths with :mod:`conduit._bridge` (the shim calls this once)."""
    _bridge.install_asyncio_fast_path(RPCProxy.call, fast_call)
    _bridge.install_asyncio_fast_path(RPCProxy.invoke, fast_invoke)
    _bridge.install_asyncio_fast_path(Client.call, fast_client_call)
