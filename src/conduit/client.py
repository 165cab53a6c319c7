"""The client: connect, authenticate, call, be called."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import trio

from ._bridge import bridged
from ._connection import Connection
from ._endpoint import Endpoint
from ._handshake_io import client_handshake
from ._offload import run_sync
from ._peer import Peer
from ._rpc_proxy import RPCProxy
from .descriptors import ClientDescriptor
from .errors import ConnectionClosed, HandshakeTimeout
from .protocol import ClientHandshake
from .protocol.handshake import ProverCache, shared_secret, shared_secret_ready

log = logging.getLogger("conduit.client")

F = TypeVar("F", bound=Callable[..., Any])


class Client(Endpoint):
    """A conduit client.

    ::

        client = Client(ClientDescriptor(server_host="localhost", server_port=8080,
                                         password="secret"))
        await client.connect()
        result = await client.rpc.call("add", a=1, b=2)   # {"success": True, "data": 3}
        await client.disconnect()

    ``async with client:`` connects and disconnects. Methods are the same
    under Trio and asyncio.
    """

    def __init__(self, descriptor: ClientDescriptor) -> None:
        super().__init__(descriptor, message_handler_takes_peer=False)
        self.descriptor = descriptor
        self._peer: Peer | None = None
        # The stretched password, kept for the life of this Client: reconnects
        # pay no Argon2id (accounts mode; shared mode memoises per process).
        self._prover_cache = ProverCache()
        #: ``client.rpc.call(...)`` / ``client.rpc.invoke(...)`` call the server;
        #: ``@client.rpc`` registers methods the server may call.
        self.rpc = RPCProxy(self._current_connection, descriptor.rpc_timeout, self._handlers)

    # ---------------------------------------------------------------- registry

    def on_connect(self, function: F) -> F:
        """Call ``function()`` after each successful connect."""
        self._connect_hooks.append(function)
        return function

    def on_disconnect(self, function: F) -> F:
        """Call ``function()`` after the connection ends, however it ends."""
        self._disconnect_hooks.append(function)
        return function

    # ---------------------------------------------------------------- state

    @property
    def id(self) -> str | None:
        """The id the server assigned (the key of ``server.clients``); None when never connected."""
        return self._peer.id if self._peer is not None else None

    @property
    def connected(self) -> bool:
        """Whether the connection is open."""
        return self._peer is not None and self._peer.connected

    @property
    def server(self) -> Peer:
        """The server as a :class:`Peer` (for streams and advanced use)."""
        if self._peer is None:
            raise ConnectionClosed("not connected")
        return self._peer

    def _current_connection(self) -> Connection:
        if self._peer is None:
            raise ConnectionClosed("not connected: call connect() first")
        connection = self._peer.connection
        if not connection.is_open:
            raise ConnectionClosed(connection.close_reason or "connection closed")
        return connection

    # ---------------------------------------------------------------- lifecycle

    @bridged
    async def connect(self, *, stream: trio.abc.Stream | None = None) -> None:
        """Connect and authenticate.

        Raises :class:`~conduit.AuthenticationError` for a wrong password,
        :class:`~conduit.HandshakeTimeout` (a ``TimeoutError``) when the server
        does not answer within ``connect_timeout``, ``OSError`` when nothing
        listens there. The connection then runs in the background until
        :meth:`disconnect`.

        ``stream``: authenticate over this already-open :class:`trio.abc.Stream`
        instead of dialling ``server_host:server_port`` (a Unix socket, an SSH
        tunnel, an in-memory stream in tests). It is used as it is: the
        descriptor's TLS settings are not applied (wrap it in
        :class:`trio.SSLStream` yourself), and it is closed when the connection
        ends or the handshake fails.
        """
        if self.connected:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            return
        descriptor = self.descriptor
        given = stream is not None
        where = (
            "the given stream" if given else f"{descriptor.server_host}:{descriptor.server_port}"
        )
        if descriptor.username is None and not shared_secret_ready(descriptor.password):
            # The shared password's stretch (memoised), off the event loop and
            # outside connect_timeout: it is this process's one-time cost.
            await run_sync(shared_secret, descriptor.password)
        try:
            with trio.fail_after(descriptor.connect_timeout):
                if stream is None:
                    stream = await self._open_stream()
                try:
                    handshake = ClientHandshake(
                        descriptor.password,
                        name=descriptor.name,
                        max_frame_size=descriptor.max_frame_size,
                        receive_window=descriptor.receive_window,
                        username=descriptor.username,
                        cache=self._prover_cache,
                    )
                    established, welcome = await client_handshake(
                        stream,
                        handshake,
                        descriptor.max_frame_size,
                        offload=descriptor.username is not None,
                    )
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except trio.TooSlowError:
            raise HandshakeTimeout(
                f"no answer from {where} within connect_timeout ({descriptor.connect_timeout:g}s)"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"connection lost during the handshake: {exc}") from exc
        peer = self._peer = self._open_session(
            stream,
            established,
            is_client=True,
            peer_id=welcome.client_id,
            name=welcome.server_name,
            address=None if given else (descriptor.server_host, descriptor.server_port),
            default_timeout=descriptor.rpc_timeout,
            label=f"server {where}",
        )
        # The connection outlives this call, so it cannot live in the caller's
        # nursery: it runs as a system task of the current Trio run (under the
        # asyncio shim, of the loop's guest run) and ends with disconnect().
        started = trio.Event()
        trio.lowlevel.spawn_system_task(self._run_connection, peer, started)
        await started.wait()
        log.info("connected to %r as client %s", welcome.server_name, welcome.client_id)

    async def _open_stream(self) -> trio.abc.Stream:
        descriptor = self.descriptor
        stream: trio.abc.Stream = await trio.open_tcp_stream(
            descriptor.server_host, descriptor.server_port
        )
        ssl_context = descriptor.build_ssl_context()
        if ssl_context is not None:
            ssl_stream = trio.SSLStream(
                stream,
                ssl_context,
                server_hostname=descriptor.tls_server_hostname or descriptor.server_host,
                https_compatible=False,
            )
            try:
                await ssl_stream.do_handshake()
            except trio.BrokenResourceError as exc:
                await trio.aclose_forcefully(ssl_stream)
                # trio's error has no text of its own; the SSL error is its cause.
                raise ConnectionClosed(f"TLS handshake failed: {exc.__cause__ or exc}") from exc
            except BaseException:
                await trio.aclose_forcefully(ssl_stream)
                raise
            stream = ssl_stream
        return stream

    async def _run_connection(self, peer: Peer, started: trio.Event) -> None:
        def ended() -> None:
            started.set()
            log.info("disconnected: %s", peer.connection.close_reason)

        try:
            await self._run_session(peer, (), on_started=started.set, on_ended=ended)
        except Exception:  # a system task must never raise; the reason is logged
            log.exception("connection to the server failed")
        finally:
            started.set()

    @bridged
    async def disconnect(self, reason: str = "client disconnected") -> None:
        """Close the connection gracefully; a no-op when not connected."""
        if self._peer is not None:
            await self._peer.connection.close(reason)

    close = disconnect

    @bridged
    async def wait_closed(self) -> None:
        """Wait until the connection ends (for clients that just serve the server's calls)."""
        if self._peer is not None:
            await self._peer.connection.closed.wait()

    @bridged
    async def call(
        self, method: str, args: Any = None, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Call ``method`` on the server; return its value or raise :class:`~conduit.RPCError`."""
        return await self.rpc.invoke(method, args, timeout, **kwargs)

    @bridged
    async def send(self, event: str, data: Any = None) -> None:
        """Send a one-way message to the server."""
        await self.server.send(event, data)

    @bridged
    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    @bridged
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.disconnect()


__all__ = ["Client"]
