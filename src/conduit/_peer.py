"""The handle on the other end of a connection.

On a server, ``server.clients[client_id]`` is a :class:`Peer`; the same class is
what handlers receive as the caller, and ``client.server`` on a client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._bridge import RunBinding, RunBound, bridged
from ._connection import Connection
from ._rpc_proxy import RPCProxy, message_data

if TYPE_CHECKING:
    from .accounts import AccountRecord


class Peer(RunBound):
    """The other end of one connection, as seen from this side."""

    def __init__(
        self,
        connect: Callable[[Peer], Connection],
        *,
        peer_id: str,
        name: str,
        address: tuple[str, int] | None,
        default_timeout: float | None,
        username: str | None = None,
        account: AccountRecord | None = None,
    ) -> None:
        """``connect(peer)`` builds the connection's engine, its dispatcher bound to this peer.

        The Peer comes first so that every call and message the connection
        delivers already knows its caller (see ``Handlers.bound_to``).
        """
        #: On a server with accounts: the user this client authenticated as
        #: (None in shared-password mode, and on the client side).
        self.username = username
        #: On a server with accounts: that user's :class:`~conduit.accounts.AccountRecord`
        #: (its ``root``, ``quota``, ``read_only``) as it was when the client logged in.
        self.account = account
        #: The client id the server assigned (the same on both sides).
        self.id = peer_id
        #: The name the peer announced in its handshake.
        self.name = name
        #: The peer's socket address, ``(host, port)``; None when unknown (a
        #: connection over a stream that is not a socket, such as
        #: ``Client(stream=...)`` or a listener of another kind).
        self.address = address
        #: ``time.time()`` when the connection was authenticated.
        self.connected_at = time.time()
        self._connection = connection = connect(self)
        self._thread_of_run = threading.get_ident()  # made in its connection's run
        # The connection, not this peer, in the closure: the peer and its
        # proxy in a reference cycle would outlive every connection until
        # Python's cycle collector ran.
        #: ``peer.rpc.call(...)`` / ``peer.rpc.invoke(...)`` call the peer's methods.
        self.rpc = RPCProxy(lambda: connection, default_timeout)  # its binding: the connection's

    def _run_binding(self) -> RunBinding | None:
        return self._connection.binding

    def __repr__(self) -> str:
        user = f" username={self.username!r}" if self.username is not None else ""
        return f"<Peer id={self.id!r} name={self.name!r}{user} address={self.address!r}>"

    @property
    def connected(self) -> bool:
        """Whether the connection is still open."""
        return self._connection.is_open

    @property
    def close_reason(self) -> str | None:
        """Why the connection closed or is closing (``"peer silent for 45.0s
        (heartbeat timeout)"``, ``"account 'alice' was removed"``, the peer's
        goodbye); None while it is open. What an ``on_client_disconnect``
        hook or a log line would say of it."""
        return self._connection.close_reason

    @property
    def connection(self) -> Connection:
        """The engine carrying this peer (for features built on streams)."""
        return self._connection

    @bridged
    async def call(
        self, method: str, args: Any = None, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Call ``method`` on this peer and return the value, or raise (see ``RPCProxy.invoke``)."""
        return await self.rpc.invoke(method, args, timeout, **kwargs)

    @bridged
    async def send(self, event: str, data: Any = None) -> None:
        """Send a one-way message to this peer."""
        await self._connection.send_message(event, message_data(data))

    @bridged
    async def close(self, reason: str = "closed by the server") -> None:
        """Close this connection gracefully and wait until it is closed.

        The client does not reconnect by itself (``server.close()``, which
        says the server is going away, lets its clients come back).

        From a handler of this same connection it returns once the goodbye
        is on its way: the connection ends after the handler has returned.
        """
        await self._connection.close(reason)


__all__ = ["Peer"]
