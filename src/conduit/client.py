"""The client: connect, authenticate, call, be called."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import trio

from ._asyncio import bridged
from ._callbacks import invoke
from ._connection import Connection, settings_from
from ._handshake_io import client_handshake
from ._peer import Peer, RPCProxy
from ._rpc import Handlers
from .descriptors import ClientDescriptor
from .errors import ConnectionClosed, HandshakeTimeout
from .protocol import ClientHandshake

log = logging.getLogger("conduit.client")

F = TypeVar("F", bound=Callable[..., Any])


class Client:
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
        self.descriptor = descriptor
        self._handlers = Handlers(message_handler_takes_peer=False)
        self._handlers.peer_of = self._peer_of
        self._peer: Peer | None = None
        self._connect_hooks: list[Callable[..., Any]] = []
        self._disconnect_hooks: list[Callable[..., Any]] = []
        self._settings = settings_from(descriptor)
        #: ``client.rpc.call(...)`` / ``client.rpc.invoke(...)`` call the server;
        #: ``@client.rpc`` registers methods the server may call.
        self.rpc = RPCProxy(self._current_connection, descriptor.rpc_timeout, self._handlers)

    # ---------------------------------------------------------------- registry

    def on(self, event: str) -> Callable[[F], F]:
        """Handle one-way messages from the server: ``@client.on("news") def h(data): ...``."""

        def decorator(function: F) -> F:
            self._handlers.add_event(event, function)
            return function

        return decorator

    def register_rpc(self, function: Callable[..., Any], name: str | None = None) -> None:
        """Register a method the server may call, without decorator syntax."""
        self._handlers.add_method(function, name)

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

    def _peer_of(self, connection: Connection) -> Peer:
        assert self._peer is not None
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
    async def connect(self) -> None:
        """Connect and authenticate.

        Raises :class:`~conduit.AuthenticationError` for a wrong password,
        :class:`~conduit.HandshakeTimeout` (a ``TimeoutError``) when the server
        does not answer within ``connect_timeout``, ``OSError`` when nothing
        listens there. The connection then runs in the background until
        :meth:`disconnect`.
        """
        if self.connected:
            return
        descriptor = self.descriptor
        try:
            with trio.fail_after(descriptor.connect_timeout):
                stream = await self._open_stream()
                try:
                    handshake = ClientHandshake(
                        descriptor.password,
                        name=descriptor.name,
                        max_frame_size=descriptor.max_frame_size,
                        receive_window=descriptor.receive_window,
                    )
                    established, welcome = await client_handshake(
                        stream, handshake, descriptor.max_frame_size
                    )
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except trio.TooSlowError:
            raise HandshakeTimeout(
                f"no answer from {descriptor.server_host}:{descriptor.server_port} "
                f"within connect_timeout ({descriptor.connect_timeout:g}s)"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"connection lost during the handshake: {exc}") from exc
        connection = Connection(
            stream,
            established.reader,
            established.writer,
            established.keys,
            is_client=True,
            settings=self._settings,
            dispatcher=self._handlers,
            label=f"server {descriptor.server_host}:{descriptor.server_port}",
        )
        self._peer = Peer(
            connection,
            peer_id=welcome.client_id,
            name=welcome.server_name,
            address=(descriptor.server_host, descriptor.server_port),
            default_timeout=descriptor.rpc_timeout,
        )
        # The connection outlives this call, so it cannot live in the caller's
        # nursery: it runs as a system task of the current Trio run (under the
        # asyncio shim, of the loop's guest run) and ends with disconnect().
        started = trio.Event()
        trio.lowlevel.spawn_system_task(self._run_connection, connection, started)
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

    async def _run_connection(self, connection: Connection, started: trio.Event) -> None:
        def on_started() -> None:
            started.set()
            for hook in self._connect_hooks:
                connection.spawn(self._run_hook, hook, "connect")

        try:
            await connection.run(on_started=on_started)
        except Exception:  # a system task must never raise; the reason is logged
            log.exception("connection to the server failed")
        finally:
            started.set()
            log.info("disconnected: %s", connection.close_reason)
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                for hook in self._disconnect_hooks:
                    await self._run_hook(hook, "disconnect")

    async def _run_hook(self, hook: Callable[..., Any], what: str) -> None:
        try:
            await invoke(hook)
        except Exception:
            log.exception("%s hook %r failed", what, hook)

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
