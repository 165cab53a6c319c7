"""What a Server and a Client share: the handler registry, hooks, and running one session.

A *session* is one authenticated connection and the :class:`~conduit.Peer` at its
other end. Both endpoints build it the same way once their handshake is done
(:meth:`Endpoint._open_session`) and run it the same way
(:meth:`Endpoint._run_session`): connect hooks start with the connection,
disconnect hooks run after it ends, however it ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ._bridge import RunBinding, RunBound
from ._callbacks import invoke
from ._connection import Connection, ConnectionSettings, settings_from
from ._handshake_io import Established
from ._heartbeats import Heartbeats
from ._peer import Peer
from ._rpc import Handlers
from .errors import CallbackCancelledError
from .protocol.connection import CallMemory

#: How long disconnect hooks may take, all together, once a session has ended.
HOOK_TIMEOUT = 10.0


def address_of(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """The remote (host, port) of a socket stream (through TLS); ``None`` for other streams."""
    inner = getattr(stream, "transport_stream", stream)
    socket = getattr(inner, "socket", None)
    if socket is None:
        return None
    try:
        host, port, *_ = socket.getpeername()
    except OSError:
        return None
    return str(host), int(port)


def format_address(address: tuple[str, int] | None) -> str:
    """``host:port`` (``[host]:port`` for IPv6), as people read them in logs."""
    if address is None:
        return "unknown address"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Endpoint(RunBound):
    """The base of :class:`~conduit.Server` and :class:`~conduit.Client`."""

    def __init__(self, descriptor: Any, *, message_handler_takes_peer: bool) -> None:
        #: The Trio run this endpoint last started in (a server's run(), a
        #: client's connect()): see :class:`._bridge.RunBound`.
        self._binding: RunBinding | None = None
        self._handlers = Handlers(message_handler_takes_peer=message_handler_takes_peer)
        self._connect_hooks: list[Callable[..., Any]] = []
        self._disconnect_hooks: list[Callable[..., Any]] = []
        self._settings: ConnectionSettings = settings_from(descriptor)
        self._log = logging.getLogger(type(self).__module__)

    # ---------------------------------------------------------------- registry

    def register_rpc(self, function: Callable[..., Any], name: str | None = None) -> None:
        """Register an RPC method the peer may call, without decorator syntax."""
        self._handlers.add_method(function, name)

    # ---------------------------------------------------------------- sessions

    def _open_session(
        self,
        stream: trio.abc.Stream,
        established: Established,
        *,
        is_client: bool,
        peer_id: str,
        name: str,
        address: tuple[str, int] | None,
        default_timeout: float | None,
        label: str,
        heartbeats: Heartbeats | None = None,
        call_memory: CallMemory | None = None,
    ) -> Peer:
        """The Peer of a finished handshake, with its connection (not running yet).

        ``heartbeats``: a timer shared with other connections (a server's, or
        the run's for clients: :func:`conduit._heartbeats.shared`), else the
        connection beats in a task of its own. ``call_memory``: where the
        connection counts its large calls and queued messages, in place of
        the settings' (a server gives its user's share of its own).
        """
        settings = self._settings
        if call_memory is not None:
            settings = attrs.evolve(settings, call_memory=call_memory)

        def connect(peer: Peer) -> Connection:
            return Connection(
                stream,
                established.reader,
                established.writer,
                established.keys,
                is_client=is_client,
                settings=settings,
                dispatcher=self._handlers.bound_to(peer),
                label=label,
                heartbeats=heartbeats,
                socket_io=established.io,
            )

        return Peer(
            connect,
            peer_id=peer_id,
            name=name,
            address=address,
            default_timeout=default_timeout,
            username=established.username,
            account=established.account,
        )

    async def _run_session(
        self,
        peer: Peer,
        hook_args: tuple[Any, ...],
        *,
        on_started: Callable[[], None] | None = None,
        on_ended: Callable[[], None] | None = None,
    ) -> None:
        """Run ``peer``'s connection until it closes, with the hooks around it.

        ``on_started`` runs once the connection's tasks are up, before the
        connect hooks start; ``on_ended`` runs when it has closed, before the
        disconnect hooks run (shielded: they run even when we are cancelled).
        """
        connection = peer.connection

        def started() -> None:
            if on_started is not None:
                on_started()
            for hook in self._connect_hooks:
                connection.spawn(self._run_hook, hook, hook_args, "connect")

        try:
            await connection.run(on_started=started)
        finally:
            if on_ended is not None:
                on_ended()
            if self._disconnect_hooks:  # the scopes cost every connection otherwise
                with trio.CancelScope(shield=True), trio.move_on_after(HOOK_TIMEOUT) as limit:
                    for hook in self._disconnect_hooks:
                        await self._run_hook(hook, hook_args, "disconnect")
                if limit.cancelled_caught:
                    # Else a hook cut off, and the ones after it, left no trace.
                    self._log.warning(
                        "disconnect hooks for client %s cut off: together they may take "
                        "%.0f s (HOOK_TIMEOUT)",
                        peer.id,
                        HOOK_TIMEOUT,
                    )

    async def _run_hook(self, hook: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        about = f" for client {args[0].id}" if args else ""
        try:
            await invoke(hook, *args)
        except CallbackCancelledError:
            # Its asyncio task was cancelled from the asyncio side: most often
            # asyncio.run() ending with the hook still running, a normal
            # shutdown and no bug of the hook's.
            self._log.debug("%s hook %r was cancelled by asyncio%s", what, hook, about)
        except Exception:  # a hook's bug is the application's; log it, keep serving
            self._log.exception("%s hook %r failed%s", what, hook, about)


__all__ = ["HOOK_TIMEOUT", "Endpoint", "address_of", "format_address"]
