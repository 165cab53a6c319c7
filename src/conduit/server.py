"""The server: listens, authenticates, keeps the client registry, serves RPC."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

import trio

from ._asyncio import bridged
from ._callbacks import invoke
from ._connection import Connection, settings_from
from ._handshake_io import refuse, server_handshake, welcome_record
from ._peer import Peer
from ._rpc import Handlers
from ._throttle import AuthThrottle
from .descriptors import ServerDescriptor
from .errors import AuthenticationError, ConduitError, ConnectionClosed, ProtocolError
from .protocol import ServerHandshake
from .protocol.messages import Welcome

log = logging.getLogger("conduit.server")

F = TypeVar("F", bound=Callable[..., Any])

_HOOK_TIMEOUT = 10.0


def _address_of(stream: trio.abc.Stream) -> tuple[str, int] | None:
    inner = getattr(stream, "transport_stream", stream)
    socket = getattr(inner, "socket", None)
    if socket is None:
        return None
    try:
        host, port, *_ = socket.getpeername()
    except OSError:
        return None
    return str(host), int(port)


def _format_address(address: tuple[str, int] | None) -> str:
    if address is None:
        return "unknown address"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    """A conduit server.

    ::

        server = Server(ServerDescriptor(password="secret", port=8080))

        @server.rpc
        async def add(a: int, b: int) -> int:
            return a + b

        trio.run(server.run)            # or asyncio.run(server.run())

    In Trio, ``await nursery.start(server.run)`` returns once the port is
    bound (read it from :attr:`port`).
    """

    def __init__(self, descriptor: ServerDescriptor) -> None:
        self.descriptor = descriptor
        #: Authenticated clients by client id.
        self.clients: dict[str, Peer] = {}
        self._handlers = Handlers(message_handler_takes_peer=True)
        self._handlers.peer_of = self._peer_of
        self._peers_by_connection: dict[Connection, Peer] = {}
        self._connect_hooks: list[Callable[..., Any]] = []
        self._disconnect_hooks: list[Callable[..., Any]] = []
        self._throttle = AuthThrottle(
            descriptor.auth_failure_limit, descriptor.auth_failure_window, descriptor.auth_lockout
        )
        self._settings = settings_from(descriptor)
        self._open_sockets = 0
        self._addresses: list[tuple[str, int]] = []
        self._cancel_scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None
        self._listening = trio.Event()
        self._closing = False

    # ---------------------------------------------------------------- registry

    @overload
    def rpc(self, function: F, *, name: str | None = None) -> F: ...
    @overload
    def rpc(self, function: None = None, *, name: str | None = None) -> Callable[[F], F]: ...
    def rpc(self, function: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
        """Register an RPC method: ``@server.rpc`` or ``@server.rpc(name="x")``.

        Parameters are bound from the call's arguments by name and structured
        into their annotations; a parameter annotated :class:`~conduit.Peer`
        receives the calling client.
        """
        return self._handlers.decorator(function, name=name)

    def register_rpc(self, function: Callable[..., Any], name: str | None = None) -> None:
        """Register an RPC method without decorator syntax."""
        self._handlers.add_method(function, name)

    def on(self, event: str) -> Callable[[F], F]:
        """Handle one-way messages: ``@server.on("chat") async def h(client, data): ...``."""

        def decorator(function: F) -> F:
            self._handlers.add_event(event, function)
            return function

        return decorator

    def on_client_connect(self, function: F) -> F:
        """Call ``function(peer)`` after each client authenticates."""
        self._connect_hooks.append(function)
        return function

    def on_client_disconnect(self, function: F) -> F:
        """Call ``function(peer)`` after each authenticated client goes away."""
        self._disconnect_hooks.append(function)
        return function

    # ---------------------------------------------------------------- state

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``). Raises before ``run()`` has bound."""
        if not self._addresses:
            raise RuntimeError("the server is not listening yet")
        return self._addresses[0][1]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every bound (host, port)."""
        return list(self._addresses)

    @property
    def is_running(self) -> bool:
        """Whether :meth:`run` is serving."""
        return self._cancel_scope is not None

    # ---------------------------------------------------------------- lifecycle

    @bridged
    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until :meth:`close` or cancellation.

        Reports the bound port through ``task_status``.
        """
        if self._cancel_scope is not None:
            raise RuntimeError("this server is already running")
        descriptor = self.descriptor
        host: str | None = descriptor.host or None
        listeners: list[Any] = list(await trio.open_tcp_listeners(descriptor.port, host=host))
        self._addresses = [
            (str(sockname[0]), int(sockname[1]))
            for sockname in (listener.socket.getsockname() for listener in listeners)
        ]
        ssl_context = descriptor.build_ssl_context()
        if ssl_context is not None:
            listeners = [
                trio.SSLListener(lst, ssl_context, https_compatible=False) for lst in listeners
            ]
        self._stopped = trio.Event()
        self._closing = False
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                await nursery.start(trio.serve_listeners, self._serve_connection, listeners)
                log.info("conduit server %r listening on %s", descriptor.name, self._addresses)
                self._listening.set()
                task_status.started(self.port)
        finally:
            self._cancel_scope = None
            self._addresses = []
            self._listening = trio.Event()
            self._stopped.set()

    @bridged
    async def wait_listening(self) -> int:
        """Wait until :meth:`run` has bound its port; return the port.

        The asyncio way to know a server started with ``asyncio.create_task(
        server.run())`` is ready (Trio code can use ``nursery.start`` instead).
        """
        await self._listening.wait()
        return self.port

    @bridged
    async def close(self, reason: str = "server shutting down") -> None:
        """Say goodbye to every client, stop listening, and wait for :meth:`run` to end."""
        if self._cancel_scope is None or self._stopped is None:
            return
        self._closing = True
        with trio.move_on_after(2):
            async with trio.open_nursery() as nursery:
                for peer in list(self.clients.values()):
                    nursery.start_soon(peer.connection.close, reason, 1.0)
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        await self._stopped.wait()

    stop = close

    @bridged
    async def broadcast(self, event: str, data: Any = None, exclude: Iterable[str] = ()) -> int:
        """Send a one-way message to every connected client; return how many got it."""
        skip = set(exclude)
        sent = 0
        for peer in list(self.clients.values()):
            if peer.id in skip:
                continue
            try:
                await peer.send(event, data)
                sent += 1
            except ConnectionClosed:
                continue
        return sent

    # ---------------------------------------------------------------- per connection

    def _peer_of(self, connection: Connection) -> Peer:
        return self._peers_by_connection[connection]

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        peer_address = _address_of(stream)
        host = peer_address[0] if peer_address else "unknown"
        # For log lines: host:port ([host]:port for IPv6), as people read them.
        address = _format_address(peer_address)
        self._open_sockets += 1
        try:
            await self._serve_authenticated(stream, peer_address, address, host)
        except Exception:  # one connection's bug must never take the server down
            log.exception("internal error serving %s", address)
        finally:
            self._open_sockets -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_authenticated(
        self,
        stream: trio.abc.Stream,
        peer_address: tuple[str, int] | None,
        address: str,
        host: str,
    ) -> None:
        descriptor = self.descriptor
        if self._closing:
            await refuse(stream, "shutting_down", "the server is shutting down")
            return
        if self._open_sockets > descriptor.max_connections:
            log.warning(
                "refused %s: max_connections (%d) reached", address, descriptor.max_connections
            )
            await refuse(
                stream, "busy", f"the server is at max_connections ({descriptor.max_connections})"
            )
            return
        wait = self._throttle.retry_after(host, trio.current_time())
        if wait > 0:
            log.warning("refused %s: too many failed password attempts", address)
            await refuse(
                stream,
                "throttled",
                f"too many failed password attempts from {host}; retry in {wait:.0f}s",
                wait,
            )
            return
        handshake = ServerHandshake(
            descriptor.password,
            name=descriptor.name,
            max_frame_size=descriptor.max_frame_size,
            receive_window=descriptor.receive_window,
        )
        try:
            with trio.fail_after(descriptor.auth_timeout):
                if isinstance(stream, trio.SSLStream):
                    await stream.do_handshake()
                established = await server_handshake(stream, handshake, descriptor.max_frame_size)
                client_id = secrets.token_hex(8)
                welcome = Welcome(client_id, descriptor.name, descriptor.heartbeat_interval)
                await stream.send_all(welcome_record(established.writer, welcome))
        except trio.TooSlowError:
            log.warning(
                "dropped %s: no handshake within auth_timeout (%gs)",
                address,
                descriptor.auth_timeout,
            )
            return
        except AuthenticationError as exc:
            self._throttle.record_failure(host, trio.current_time())
            log.warning("authentication failed from %s: %s", address, exc)
            return
        except (ProtocolError, ConduitError) as exc:
            log.warning("dropped %s during the handshake: %s", address, exc)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("connection from %s lost during the handshake: %s", address, exc)
            return
        self._throttle.record_success(host)
        connection = Connection(
            stream,
            established.reader,
            established.writer,
            established.keys,
            is_client=False,
            settings=self._settings,
            dispatcher=self._handlers,
            label=f"client {client_id} {address}",
        )
        peer = Peer(
            connection,
            peer_id=client_id,
            name=established.peer_name,
            address=peer_address,
            default_timeout=descriptor.rpc_timeout,
        )
        self._peers_by_connection[connection] = peer
        self.clients[client_id] = peer
        log.info("client %s (%r) connected from %s", client_id, peer.name, address)

        def started() -> None:
            for hook in self._connect_hooks:
                connection.spawn(self._run_hook, hook, peer, "connect")

        try:
            await connection.run(on_started=started)
        finally:
            del self.clients[client_id]
            del self._peers_by_connection[connection]
            log.info("client %s disconnected: %s", client_id, connection.close_reason)
            with trio.CancelScope(shield=True), trio.move_on_after(_HOOK_TIMEOUT):
                for hook in self._disconnect_hooks:
                    await self._run_hook(hook, peer, "disconnect")

    async def _run_hook(self, hook: Callable[..., Any], peer: Peer, what: str) -> None:
        try:
            await invoke(hook, peer)
        except Exception:
            log.exception("%s hook %r failed for client %s", what, hook, peer.id)
