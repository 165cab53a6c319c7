"""The server: listens, authenticates, keeps the client registry, serves RPC."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import attrs
import trio

from ._bridge import RunBinding, bridged
from ._call_shares import CallShares
from ._callbacks import calling_task
from ._endpoint import HOOK_TIMEOUT, Endpoint, address_of, format_address
from ._gatekeeper import Gatekeeper, Refused
from ._groups import beside, collapsed
from ._handshake_io import (
    Established,
    VersionMismatch,
    read_resume,
    refuse,
    send_bytes,
    welcome_record,
)
from ._heartbeats import Heartbeats
from ._log_limit import LimitedLog
from ._peer import Peer
from ._resume import ResumeTokens, new_token, token_digest
from ._rpc_proxy import message_data
from ._serve_loop import serve_listeners
from ._socket_io import close_now
from ._stored_errors import detached
from ._throttle import address_key, owner_key
from .descriptors import ServerDescriptor
from .errors import AuthenticationError, ConduitError, ConnectionClosed, ProtocolError
from .protocol.messages import Welcome

if TYPE_CHECKING:
    from ._connection import Connection
    from .cluster._node import ClusterNode

log = logging.getLogger("conduit.server")

#: How often a cluster session first looks whether it has heard from its
#: resumed client, and at most (see Server._spend_when_heard): the client
#: pings right after a resumed WELCOME, so most sessions look once or twice.
_HEARD_POLL_FIRST = 0.001
_HEARD_POLL_MAX = 1.0

#: Seconds a broadcast waits for a client whose queue is full and which has
#: taken none of our bytes meanwhile, before that client misses it. Longer than
#: a slow reader's pause between two writes the kernel lets through (a few
#: seconds, see docs/security.md), far shorter than the heartbeat's timeout.
BROADCAST_PATIENCE = 5.0

F = TypeVar("F", bound=Callable[..., Any])
#: ``hook(peer)``, sync or ``async``.
ClientHook = TypeVar("ClientHook", bound=Callable[[Peer], object])
#: A one-way message's handler: ``handler(peer, data)``, sync or ``async``.
MessageHandler = TypeVar("MessageHandler", bound=Callable[[Peer, Any], object])


@attrs.frozen
class _Arrival:
    """Who is at the other end of a new connection, as far as the server can tell."""

    #: The remote (host, port), when the stream is a socket.
    address: tuple[str, int] | None
    #: The key of the password-failure throttle and the per-address socket cap:
    #: an IPv6 peer's /64, not its address (see :func:`address_key`). Worked
    #: out once: every step of the connection's admission asks for it.
    host: str = attrs.field(init=False)

    @host.default
    def _host(self) -> str:
        return address_key(self.address[0]) if self.address else "unknown"

    @property
    def label(self) -> str:
        """For log lines: host:port ([host]:port for IPv6), as people read them."""
        return format_address(self.address)

    def owner(self, username: str | None) -> str:
        """Whom this client counts against: its account, or with a shared
        password the address it came from (see :func:`~conduit._throttle.owner_key`)."""
        return owner_key(username, self.host)


async def _offer_patiently(connection: Connection, event: str, data: Any) -> bool:
    """Queue a broadcast's message for one client, waiting for room while the
    client reads; False once it has read nothing for :data:`BROADCAST_PATIENCE`."""
    while not connection.offer_message(event, data):
        if connection.stalled_for(trio.current_time()) >= BROADCAST_PATIENCE:
            return False
        # Looked at again now and then: the stall is measured by the
        # connection, which wakes nobody when it passes the patience.
        with trio.move_on_after(BROADCAST_PATIENCE / 10):
            await connection.wait_for_message_room()
    return True


def _listener_address(listener: trio.abc.Listener[Any]) -> tuple[str, int] | None:
    inner = getattr(listener, "transport_listener", listener)
    socket = getattr(inner, "socket", None)
    if socket is None:
        return None
    sockname = socket.getsockname()
    return str(sockname[0]), int(sockname[1])


@attrs.define(eq=False)
class _Run:
    """One :meth:`Server.run` (or :meth:`Server.serve`), from its claim to its end."""

    #: Covers the whole run, binding and preparing included: cancelled by a
    #: close() that comes before the run is serving (nothing to say goodbye to).
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: Set by close(): the decision to stop, which nothing can take back.
    stop: trio.Event = attrs.field(factory=trio.Event)
    #: The goodbye the clients get (the first close()'s).
    reason: str = "server shutting down"
    #: Whether that goodbye says the server is going away (its clients come
    #: back), or ends their connections for good (the first close()'s).
    going_away: bool = True
    #: Accepting connections (the accept loops own the listeners).
    serving: bool = False
    #: The nursery the run serves in (its connections, hooks and handlers run
    #: below it): a task there must not wait for the run to end.
    nursery: trio.Nursery | None = None
    #: Set last, once the run is over: listeners closed, clients gone.
    stopped: trio.Event = attrs.field(factory=trio.Event)
    #: The task of the run that asked it to stop (a handler's close()), if one
    #: did: its connection's goodbye waits for that handler's answer.
    stopped_by: trio.lowlevel.Task | None = None


@attrs.define(eq=False)
class _Startup:
    """How a run got on, for :meth:`Server.wait_listening`: listening, or ended first."""

    #: Set when the run listens (``port``) or ends without having listened.
    over: trio.Event = attrs.field(factory=trio.Event)
    #: It listened ...
    listening: bool = False
    #: ... on this port (None when it serves no socket listener).
    port: int | None = None
    #: Why it ended before listening: the error it raised, if any (detached) ...
    error: Exception | None = None
    #: ... and in words (an error, a close(), a cancellation).
    why: str = ""


@attrs.define(eq=False)
class _HeldToken:
    """A resume token a reconnecting client presented, held by the session it
    opens until that session hears from the client (see ``conduit._resume``).

    Called: whether it has. ``connection`` is set once the session has one.
    """

    handle: bytes
    #: Whom the client counts against (:meth:`_Arrival.owner`): in a cluster,
    #: the bound on the bus the token leaves when spent.
    counted_against: str
    connection: Connection | None = None
    #: In a cluster: whether it was spent on the bus (see Server._spend_held).
    spent: bool = False

    def __call__(self) -> bool:
        """Whether the session has heard from its client (who then has its WELCOME)."""
        return self.connection is not None and self.connection.heard_from_peer

    def settle(self, tokens: ResumeTokens) -> None:
        """The session ended, or never began: the token is spent, or good again.

        (In a cluster the local table no longer has it: the bus holds it.)"""
        tokens.settle(self.handle, trio.current_time(), self)


class Server(Endpoint):
    """A conduit server.

    ::

        server = Server(ServerDescriptor(password="secret", port=8080))

        @server.rpc
        async def add(a: int, b: int) -> int:
            return a + b

        trio.run(server.run)            # or asyncio.run(server.run())

    In Trio, ``await nursery.start(server.run)`` returns once the port is
    bound (read it from :attr:`port`). To serve other transports (a Unix
    socket, an in-memory listener in tests), pass listeners to :meth:`serve`.
    """

    def __init__(self, descriptor: ServerDescriptor) -> None:
        super().__init__(descriptor, message_handler_takes_peer=True)
        #: The settings this server was made with.
        self.descriptor = descriptor
        #: Authenticated clients by client id.
        self.clients: dict[str, Peer] = {}
        self._gate = Gatekeeper(descriptor, log)
        self._open_sockets = 0
        self._addresses: list[tuple[str, int]] = []
        # The run in progress (claimed, binding, or serving), or None.
        self._run: _Run | None = None
        # The serving nursery's scope, while serving: what close() cancels
        # once the clients have had their goodbye.
        self._cancel_scope: trio.CancelScope | None = None
        # What wait_listening() waits for: the run in progress or the next one.
        self._startup = _Startup()
        # Set by close(): connections arriving now are refused.
        self._closing = False
        self._resume_tokens = ResumeTokens()
        # Each user's share of the call memory (user_call_budget), which its
        # connections count in beside the server's memory (server_call_budget).
        memory = self._settings.call_memory
        assert memory is not None  # settings_from makes one for every server
        self._call_shares = CallShares(memory, descriptor.call_budget_per_user)
        # One heartbeat timer for every client's connection, while serving.
        self._heartbeats: Heartbeats | None = None
        # Set when a client's session has ended, hooks included (a reconnect
        # that replaces a stale connection waits for it); woken on each arrival.
        self._sessions_over: dict[str, trio.Event] = {}
        self._arrivals = trio.lowlevel.ParkingLot()
        # Broadcasts a client misses for reading too slowly: a few lines per
        # client, then one per period (a broadcast may come many times a second).
        self._broadcast_warnings = LimitedLog(log)
        #: This server's node in the cluster when ``descriptor.cluster_url`` is
        #: set (see :doc:`cluster`), else None.
        self.cluster: ClusterNode | None = None
        if descriptor.cluster_url is not None:
            # Imported only here: a server without a cluster never loads redis.
            try:
                from .cluster._node import ClusterNode
            except ImportError as exc:
                from ._extras import install_hint

                raise ValueError(
                    f"cluster_url={descriptor.cluster_url!r} needs the cluster extra: "
                    f"{install_hint('cluster')} ({exc})"
                ) from None
            self.cluster = ClusterNode(self, descriptor)

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

    def on(self, event: str) -> Callable[[MessageHandler], MessageHandler]:
        """Handle one-way messages from clients:
        ``@server.on("news") async def h(peer, data): ...``."""

        def decorator(function: MessageHandler) -> MessageHandler:
            self._handlers.add_event(event, function)
            return function

        return decorator

    def on_client_connect(self, function: ClientHook) -> ClientHook:
        """Call ``function(peer)`` after each client authenticates."""
        self._connect_hooks.append(function)
        return function

    def on_client_disconnect(self, function: ClientHook) -> ClientHook:
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

    async def _wait_for_client(self, client_id: str, timeout: float) -> Peer | None:
        """The client ``client_id`` once it is connected (again), or None after ``timeout``.

        Also None as soon as the client resumed its session on another node
        of the cluster (``self.cluster.moved_away``), and once the server is
        closing or stopped: no client comes back to it.
        """
        with trio.move_on_after(timeout):
            while (peer := self.clients.get(client_id)) is None or not peer.connected:
                if self._closing or self._run is None:
                    return None
                if self.cluster is not None and self.cluster.moved_away(client_id) is not None:
                    return None
                await self._arrivals.park()
            return peer
        return None

    @property
    def is_running(self) -> bool:
        """Whether :meth:`run` (or :meth:`serve`) is serving."""
        return self._run is not None and self._run.serving

    # ---------------------------------------------------------------- lifecycle

    def _run_binding(self) -> RunBinding | None:
        # It lives in the run of its run() or serve(), while that runs.
        return self._binding if self._run is not None else None

    def _claim(self) -> _Run:
        """Mark the server as running, for the run() or serve() calling this.

        Synchronous, and the caller's first step: of two runs started together
        the second fails at once, and a close() from now on reaches this run.
        """
        if self._run is not None:
            raise RuntimeError("this server is already running")
        run = self._run = _Run()
        self._closing = False
        # The run this server now lives in: its connections' tasks run there.
        self._binding = RunBinding.current()
        self._thread_of_run = self._binding.thread
        if self._startup.over.is_set():
            # The last run's outcome, which no wait_listening() asked for: the
            # calls from now on are about this run.
            self._startup = _Startup()
        return run

    @bridged
    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the descriptor's host and port and serve until :meth:`close` or cancellation.

        Reports the bound port through ``task_status``. A :meth:`close` that
        comes before the server listens ends it without serving (then
        ``nursery.start(server.run)`` raises, as for any task that ends
        before it started).
        """
        run = self._claim()
        await self._run_claimed(run, None, lambda: task_status.started(self.port))

    @bridged
    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        *,
        task_status: trio.TaskStatus[list[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the connections ``listeners`` accept until :meth:`close` or cancellation.

        What :meth:`run` does once it has opened its TCP listeners, for any
        :class:`trio.abc.Listener` of :class:`trio.abc.Stream`\\ s: a
        ``trio.SocketListener`` of your own, a ``trio.SSLListener`` (the
        descriptor's TLS settings are not applied here: wrap the listener
        yourself), an in-memory listener in tests. As with
        :func:`trio.serve_listeners`, the listeners are closed when serving
        ends (also when it fails or is cancelled before it starts), and
        ``await nursery.start(server.serve, listeners)`` returns the
        listeners once they accept. :attr:`port` and :attr:`addresses` report
        the socket listeners among them.
        """
        chosen = list(listeners)
        run = self._claim()
        await self._run_claimed(run, chosen, lambda: task_status.started(chosen))

    async def _bind(self) -> list[trio.abc.Listener[Any]]:
        """The descriptor's TCP listeners, TLS-wrapped if it says so."""
        descriptor = self.descriptor
        # Built before binding: a bad TLS setting fails with no port bound.
        ssl_context = descriptor.build_ssl_context()
        tcp_listeners = await trio.open_tcp_listeners(descriptor.port, host=descriptor.host or None)
        if ssl_context is None:
            return list(tcp_listeners)
        return [trio.SSLListener(lst, ssl_context, https_compatible=False) for lst in tcp_listeners]

    async def _run_claimed(
        self,
        run: _Run,
        given: list[trio.abc.Listener[Any]] | None,
        report_started: Callable[[], None],
    ) -> None:
        """run() and serve() once claimed: bind (unless ``given`` listeners), prepare, serve.

        Whichever way it ends (an error, a cancellation, a close() before
        serving), the listeners the accept loops do not own yet are closed,
        wait_listening() gets its answer and the claim is released.
        """
        startup = self._startup
        listeners = given if given is not None else []
        try:
            with run.scope:
                try:
                    if given is None:
                        listeners = await self._bind()
                    await self._serve(run, startup, listeners, report_started)
                except BaseExceptionGroup as group:
                    # Our nurseries' groups are no business of the caller's:
                    # Ctrl-C comes out as a KeyboardInterrupt, a handler's
                    # sys.exit(3) as SystemExit(3), one failure as itself.
                    single = collapsed(group)
                    if single is group:
                        # Raised on, the group's traceback holds this frame,
                        # which must not hold the group (a reference cycle
                        # holding every connection it ended: see
                        # conduit._stored_errors).
                        del single
                        raise
                    for other in beside(group, single):
                        # A Ctrl-C or sys.exit() raised alone would hide them.
                        log.error(
                            "besides %r, which ends the server: %r", single, other, exc_info=other
                        )
                    # Raised with its own cause and context as they were:
                    # `raise ... from None` would erase them.
                    cause, context = single.__cause__, single.__context__
                    suppress = single.__suppress_context__
                    try:
                        raise single
                    finally:
                        single.__cause__, single.__context__ = cause, context
                        single.__suppress_context__ = suppress
                        # As above: its traceback holds this frame.
                        del single, cause, context
        except Exception as exc:
            if not startup.over.is_set():
                # Kept detached: the error itself, raised on from here, carries
                # this frame (and so the server) in its traceback.
                startup.error, startup.why = detached(exc), f"it failed: {exc!r}"
            raise
        except BaseException:
            if not startup.over.is_set():
                startup.why = "it was cancelled"
            raise
        finally:
            if not run.serving:
                # Bound (or given) but never handed to the accept loops: nobody
                # else closes them, and a leaked listener keeps the port bound.
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
            if not startup.over.is_set():
                startup.why = startup.why or "close() was called first"
                startup.over.set()
            elif self._startup is startup and startup.listening:
                # It listened and is over: later calls wait for the next run.
                self._startup = _Startup()
            self._cancel_scope = None
            self._heartbeats = None
            self._addresses = []
            if self._run is run:
                self._run = None
            self._arrivals.unpark_all()  # pushes waiting for a client: none comes back
            run.stopped.set()

    async def _serve(
        self,
        run: _Run,
        startup: _Startup,
        listeners: list[trio.abc.Listener[Any]],
        report_started: Callable[[], None],
    ) -> None:
        self._addresses = [
            address for address in map(_listener_address, listeners) if address is not None
        ]
        await self._gate.prepare()
        async with trio.open_nursery() as nursery:
            self._cancel_scope = nursery.cancel_scope
            run.nursery = nursery
            # First thing in the nursery: a close() from here on is carried out
            # by this task, which nothing outside the run can cancel.
            nursery.start_soon(self._stop_when_asked, run, nursery.cancel_scope)
            if self.cluster is not None:
                # Joined before the first client, whose id the cluster registers.
                await nursery.start(self.cluster.run)
            if self.descriptor.heartbeat_interval > 0:
                self._heartbeats = Heartbeats(self.descriptor.heartbeat_interval)
                nursery.start_soon(self._heartbeats.run)
            if self._gate.accounts is not None:
                nursery.start_soon(self._gate.watch_accounts, self._end_changed_sessions)
            screened = [self._gate.screen(listener) for listener in listeners]
            await nursery.start(serve_listeners, self._serve_connection, screened)
            # The accept loops own the listeners now: they close them when they end.
            run.serving = True
            log.info("conduit server %r listening on %s", self.descriptor.name, self._addresses)
            startup.listening = True
            startup.port = self._addresses[0][1] if self._addresses else None
            startup.over.set()
            report_started()

    def _end_changed_sessions(self) -> None:
        """The accounts changed: end the sessions of the users whose record did
        (removed, a new password, root, quota or access), with a goodbye that
        says why. A changed user logs in again under the new record."""
        for peer in list(self.clients.values()):
            reason = self._gate.account_change(peer.account)
            if reason is None:
                continue
            log.info("client %s: %s: ending its session", peer.id, reason)
            try:
                # From a task of its own connection: close() returns once the
                # goodbye is queued, and the connection ends after it.
                peer.connection.spawn(peer.connection.close, reason)
            except ConnectionClosed:
                # Closing or over already: its goodbye is under way (grace
                # bounds it), and an abort would drop it. Not running yet
                # (the client is replacing a stale connection): ended before
                # it serves anything.
                if peer.connection.is_open:
                    peer.connection.abort(reason)

    async def _stop_when_asked(self, run: _Run, scope: trio.CancelScope) -> None:
        """Once close() has asked: goodbye to every client (best effort), then end the run.

        Done here, in a task of the run, not in close(): close() can be
        cancelled midway (a timeout around it; or it runs in an RPC handler,
        on one of the connections closed here), and the run must end all the
        same. The goodbyes are bounded; the cancel comes whatever they do.
        """
        await run.stop.wait()
        try:
            with trio.move_on_after(2):
                async with trio.open_nursery() as nursery:
                    for peer in list(self.clients.values()):
                        nursery.start_soon(
                            self._say_goodbye, peer, run.reason, run.going_away, run.stopped_by
                        )
        finally:
            scope.cancel()

    @staticmethod
    async def _say_goodbye(
        peer: Peer, reason: str, going_away: bool, stopped_by: trio.lowlevel.Task | None = None
    ) -> None:
        """Close one client's connection gracefully; an error there stops no other goodbye.

        ``stopped_by``: the handler that closed the server. On its connection
        the goodbye waits for its answer (the handler of an asyncio RPC, whose
        Trio task sends that answer a few steps after its close() returned).
        """
        try:
            if stopped_by is not None:
                await peer.connection.wait_answered(stopped_by)
            await peer.connection.close(reason, 1.0, going_away=going_away)
        except Exception:
            log.exception("error closing the connection of client %s", peer.id)

    @staticmethod
    def _called_from(run: _Run) -> bool:
        """Whether the calling task runs below the run's serving nursery (a
        handler, a hook, a task a handler started): the run waits for it.

        Not any task below the task that called run(): a sibling of the run
        in the caller's own nursery is not waited for by the run, and its
        close() must wait for the goodbyes as any other caller's does.
        """
        if run.nursery is None:
            return False
        nursery = calling_task().parent_nursery
        while nursery is not None:
            if nursery is run.nursery:
                return True
            nursery = nursery.parent_task.parent_nursery
        return False

    @bridged
    async def wait_listening(self) -> int:
        """Wait until :meth:`run` has bound its port; return the port.

        The asyncio way to know a server started with ``asyncio.create_task(
        server.run())`` is ready (Trio code can use ``nursery.start`` instead).
        Raises :exc:`RuntimeError` (chained to the run's error, if any: a
        copy without its traceback, which would hold the server; ``run()``
        raises the original) when
        the run ends before it listens: it failed (the port is in use, the
        accounts file is unreadable, ...), was cancelled, or :meth:`close`
        came first. The calls waiting then get that error, or else the next
        call does; after that, a call waits for the next run.
        """
        startup = self._startup
        await startup.over.wait()
        if startup.listening:
            # Its port, even if it has stopped since (self.port raises when
            # the run serves no socket listener).
            return self.port if startup.port is None else startup.port
        if self._startup is startup:
            # Reported: the next call is about the next run.
            self._startup = _Startup()
        raise RuntimeError(f"the server stopped before listening: {startup.why}") from startup.error

    @bridged
    async def close(self, reason: str = "server shutting down", *, going_away: bool = True) -> None:
        """Say goodbye to every client, stop listening, and wait for :meth:`run` to end.

        The goodbye says the server is going away (it may be restarting):
        clients with automatic reconnect try to come back, with their usual
        backoff. ``going_away=False`` ends their connections for good instead
        (a server retired, not restarted: its clients do not spend a minute
        trying to come back). To end one client's connection for good, use
        ``peer.close()``.

        A run that is not serving yet (still binding or preparing) ends
        without serving. Cancelling close() (a timeout around it) does not
        stop the shutdown, only the wait for it. Called from a task of the
        server itself (an RPC handler, a connect hook; under the asyncio
        shim an ``async def`` one too, whose close() the bridge runs on its
        behalf), close() returns at once: the run cannot end before that
        task has, and it ends once it has. A close() before :meth:`run` was
        called does nothing.
        """
        run = self._run
        if run is None:
            # A run() started just before (asyncio: create_task(server.run()),
            # then close(); Trio: start_soon) may not have taken its first
            # step, the claim, yet. Two checkpoints let it: the first puts this
            # task in the same batch as every task runnable now, whose order
            # Trio shuffles; the second comes after that whole batch.
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            run = self._run
            if run is None:
                return
        # The decision to stop comes first, before any checkpoint: a cancel of
        # this call from here on (a timeout around it, the close of the
        # connection it runs in) cannot keep the run from ending.
        self._closing = True
        self._arrivals.unpark_all()  # pushes waiting for a client: none comes back
        if not run.stop.is_set():
            run.reason = reason
            run.going_away = going_away
            run.stop.set()
        if not run.serving:
            # Binding or preparing: no client to say goodbye to, nor a task of
            # the run to say it (see _stop_when_asked).
            run.scope.cancel()
        if self._called_from(run):
            # The run waits for this task to end: waiting for the run here
            # would wait for ever.
            if run.stopped_by is None:
                run.stopped_by = calling_task()
            return
        await run.stopped.wait()

    stop = close

    @bridged
    async def broadcast(self, event: str, data: Any = None, exclude: Iterable[str] = ()) -> int:
        """Send a one-way message to every connected client; return how many got it.

        In a cluster (``cluster_url``), the clients of every other node get it
        too (best effort, as for local clients); the count is this node's.
        """
        skip = set(exclude)
        sent = await self._broadcast_local(event, data, skip)
        if self.cluster is not None:
            await self.cluster.broadcast(event, data, skip)
        return sent

    async def _broadcast_local(self, event: str, data: Any, skip: Iterable[str]) -> int:
        """Send to this server's own clients (not those of other cluster nodes).

        A client with 8 MiB of messages and answers queued and unread is
        waited for while it reads (a broadcast goes at the pace of the
        slowest client that keeps up); one that has read nothing for
        :data:`BROADCAST_PATIENCE` misses the broadcast, with a warning,
        rather than hold up the others or grow the server. Cancelled before
        the first client's copy is queued, nothing is sent; cancelled while
        it waits for a slow client, the clients before it got the message.
        """
        skip = set(skip)
        wire = message_data(data)
        sent = 0
        await trio.lowlevel.checkpoint_if_cancelled()
        for peer in list(self.clients.values()):
            if peer.id in skip:
                continue
            try:
                if await _offer_patiently(peer.connection, event, wire):
                    sent += 1
                else:
                    self._broadcast_warnings.warning(
                        peer.id,
                        trio.current_time(),
                        "broadcast %r not sent to client %s: it has not read the "
                        "messages queued for it",
                        event,
                        peer.id,
                    )
            except ConnectionClosed:
                continue
        # Every client's copy is queued: report the count, not a cancellation.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return sent

    # ---------------------------------------------------------------- per connection

    async def _serve_connection(
        self, stream: trio.abc.Stream, address: tuple[str, int] | None = None
    ) -> None:
        # The accept loop knows the address of a TCP connection (see ScreenedListener).
        arrival = _Arrival(address if address is not None else address_of(stream))
        self._open_sockets += 1
        admitted = False
        try:
            if not await self._refused(stream, arrival):
                admitted = True
                session = await self._authenticate(stream, arrival)
                self._gate.release(arrival.host)
                admitted = False
                if session is not None:
                    await self._serve_client(stream, arrival, *session)
        except Exception:  # one connection's bug must never take the server down
            log.exception("internal error serving %s", arrival.label)
        finally:
            if admitted:
                self._gate.release(arrival.host)
            self._gate.end_session(stream)
            self._open_sockets -= 1
            # Closed here, last thing, whatever happened (the accept loop does not).
            if not close_now(stream):
                await trio.aclose_forcefully(stream)

    async def _refused(self, stream: trio.abc.Stream, arrival: _Arrival) -> bool:
        """Refuse the connection before any handshake when the server cannot take it.

        When it returns False the socket has been admitted (counted by the gatekeeper).
        """
        descriptor = self.descriptor
        warn = self._gate.warnings.warning
        now = trio.current_time()
        if self._closing:
            await refuse(stream, "shutting_down", "the server is shutting down")
            return True
        if self._open_sockets > descriptor.max_connections:
            warn(
                arrival.host,
                now,
                "refused %s: max_connections (%d) reached",
                arrival.label,
                descriptor.max_connections,
            )
            await refuse(
                stream, "busy", f"the server is at max_connections ({descriptor.max_connections})"
            )
            return True
        wait = self._gate.throttle.retry_after(arrival.host, now)
        if wait > 0:
            # Locked out already: refused at once, before even reading the hello.
            warn(arrival.host, now, "refused %s: too many failed password attempts", arrival.label)
            await refuse(
                stream,
                "throttled",
                f"locked out: too many failed password attempts from {arrival.host}; "
                f"retry in {wait:.0f}s",
                wait,
            )
            return True
        reason = self._gate.admit(arrival.host)
        if reason is not None:
            warn(arrival.host, now, "refused %s: %s", arrival.label, reason)
            await refuse(stream, "busy", reason)
            return True
        return False

    async def _authenticate(
        self, stream: trio.abc.Stream, arrival: _Arrival
    ) -> tuple[Established, str, _HeldToken | None] | None:
        """Run the handshake and welcome the client: its session, id and the
        resume token it redeemed (held: see ``conduit._resume``), or None (logged)."""
        descriptor = self.descriptor

        def warn(message: str, *args: object) -> None:
            self._gate.warnings.warning(arrival.host, trio.current_time(), message, *args)

        try:
            with trio.fail_after(descriptor.auth_timeout):
                if isinstance(stream, trio.SSLStream):
                    await stream.do_handshake()
                established = await self._gate.handshake(
                    stream, arrival.host, None if self.cluster is not None else self._welcome
                )
                welcomed = established.welcomed
                if welcomed is not None:
                    # Sent with our early confirmation; its promises hold from
                    # now. The token is kept only as its digest, as any other.
                    established.welcomed = None
                    client_id = welcomed.client_id
                    self._resume_tokens.issue(
                        client_id,
                        established.username,
                        welcomed.resume_token,
                        owner=arrival.owner(established.username),
                    )
                    return established, client_id, None
                client_id, held = await self._client_id_for(stream, established, arrival)
                try:
                    if established.past_share:
                        stale = self.clients.get(client_id)
                        await self._gate.admit_resumed(
                            stream, None if stale is None else stale.connection.stream
                        )
                    token = new_token()
                    if self.cluster is not None:
                        await self.cluster.share_resume_token(
                            token,
                            client_id,
                            established.username,
                            arrival.owner(established.username),
                        )
                    welcome = Welcome(
                        client_id, descriptor.name, descriptor.heartbeat_interval, token
                    )
                    await send_bytes(stream, welcome_record(established, welcome), established.io)
                    # Valid only once the WELCOME is out (no await in between),
                    # as on the early path above: a token whose WELCOME was never
                    # sent would stay valid for ever, its clock being started only
                    # by the end of a session (which never began).
                    self._resume_tokens.issue(
                        client_id,
                        established.username,
                        token,
                        owner=arrival.owner(established.username),
                    )
                except BaseException:
                    if held is not None:  # its WELCOME, with the next token, never went
                        held.settle(self._resume_tokens)
                    await self._release_client_id(client_id)
                    raise
        except trio.TooSlowError:
            warn(
                "dropped %s: no handshake within auth_timeout (%gs)",
                arrival.label,
                descriptor.auth_timeout,
            )
            return None
        except Refused as exc:
            warn("refused %s: %s", arrival.label, exc.reason)
            return None
        except AuthenticationError as exc:
            warn("authentication failed from %s: %s", arrival.label, exc)
            return None
        except VersionMismatch as exc:
            warn("refused %s: %s", arrival.label, exc)
            return None
        except (ProtocolError, ConduitError) as exc:
            warn("dropped %s during the handshake: %s", arrival.label, exc)
            return None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # Before its hello a peer can cause this at will (connect, write,
            # reset), uncounted by the throttle: rate-limited as the warnings.
            self._gate.warnings.info(
                arrival.host,
                trio.current_time(),
                "connection from %s lost during the handshake: %s",
                arrival.label,
                exc,
            )
            return None
        return established, client_id, held

    def _welcome(self) -> Welcome:
        """A new client's WELCOME, made before it has confirmed: a fresh id and
        token that nothing knows yet (registered once it has; see
        :func:`~conduit._handshake_io.server_handshake`). Not in a cluster,
        where an id is registered on the bus when it is made."""
        descriptor = self.descriptor
        return Welcome(
            secrets.token_hex(8), descriptor.name, descriptor.heartbeat_interval, new_token()
        )

    async def _client_id_for(
        self, stream: trio.abc.Stream, established: Established, arrival: _Arrival
    ) -> tuple[str, _HeldToken | None]:
        """A reconnecting client's old id if its sealed, single-use token is good; else a new id.

        With the token redeemed, held until the session hears from its
        client (None when none was).
        """
        if established.resuming:
            if established.past_share and self.cluster is not None:
                # Redeeming the token moves the id here, which closes the
                # client's connection on its node: not for a refusal. A
                # stale connection on this node is not told apart.
                await self._gate.refuse_past_share(stream)
            token = await read_resume(stream, established, confirm=not established.past_share)
            if token is None:  # an older client: its token comes after our confirmation
                await self._gate.refuse_past_share(stream)
            held: _HeldToken | None = _HeldToken(
                token_digest(token), arrival.owner(established.username)
            )
            if self.cluster is not None:
                # The bus decides and holds it: the token may be another
                # node's (the local entry is spent, the bus entry is the one).
                self._resume_tokens.redeem(token, trio.current_time(), established.username)
                client_id = await self.cluster.resume_client_id(token, established.username)
            else:
                client_id = self._resume_tokens.redeem(
                    token, trio.current_time(), established.username, held_by=held
                )
            if client_id is None:
                held = None
            if client_id is not None:
                log.info("client %s is back, from %s", client_id, arrival.label)
                return client_id, held
            log.info("unknown or expired resume token from %s: new client id", arrival.label)
        return await self._new_client_id(), None

    async def _new_client_id(self) -> str:
        """A fresh client id: random, and registered in the cluster when there is one."""
        if self.cluster is not None:
            return await self.cluster.new_client_id()
        return secrets.token_hex(8)

    def _settle_tokens(self, token: bytes | None, held: _HeldToken | None) -> None:
        """A session that never ran: its token's clock starts, the one it redeemed is back."""
        self._resume_tokens.start_expiry(token, trio.current_time())
        if held is not None:
            held.settle(self._resume_tokens)

    async def _spend_when_heard(self, held: _HeldToken) -> None:
        """In a cluster: spend the redeemed token on the bus once the session
        hears from its client (then the only holder of the next token).

        Looks with a growing pause rather than a hook on every record read:
        the client pings right after a resumed WELCOME.
        """
        pause = _HEARD_POLL_FIRST
        while not held():
            await trio.sleep(pause)
            pause = min(pause * 2, _HEARD_POLL_MAX)
        await self._spend_held(held)

    async def _spend_held(self, held: _HeldToken) -> None:
        """Spend ``held`` on the bus, once (shielded, bounded, never raises)."""
        assert self.cluster is not None
        if not held.spent:
            held.spent = True
            await self.cluster.spend_resume_token(held.handle, held.counted_against)

    async def _release_client_id(
        self,
        client_id: str,
        *,
        forgotten_token: bytes | None = None,
        counted_against: str | None = None,
    ) -> None:
        """A connection given this id ended: release it in the cluster (bounded, never raises).

        Called once per id :meth:`_client_id_for` handed out;
        ``forgotten_token``: the handle of the token of a connection whose
        client said goodbye for good, which goes too, out of the bound of
        ``counted_against`` (whom it counted against).
        """
        if self.cluster is not None:
            await self.cluster.release_client_id(
                client_id, forgotten_token=forgotten_token, counted_against=counted_against
            )

    async def _serve_client(
        self,
        stream: trio.abc.Stream,
        arrival: _Arrival,
        established: Established,
        client_id: str,
        held: _HeldToken | None,
    ) -> None:
        """Serve an authenticated client until its connection ends.

        ``held``: the resume token it redeemed, good until this session hears
        from it (or again if it never does: its WELCOME may have been lost).
        """
        token = self._resume_tokens.current(client_id)
        changed = self._gate.account_change(established.account)
        if changed is not None:
            # The record it authenticated with changed since (after the sweep
            # of _end_changed_sessions, which ended the sessions it had):
            # ended as they were. Nothing awaits from this check to the
            # registration below, so no change slips in between unseen.
            log.info("client %s: %s: not served", client_id, changed)
            self._settle_tokens(token, held)
            await self._release_client_id(client_id)
            await trio.aclose_forcefully(stream)
            return
        try:
            peer = self._open_session(
                stream,
                established,
                is_client=False,
                peer_id=client_id,
                name=established.peer_name,
                address=arrival.address,
                default_timeout=self.descriptor.rpc_timeout,
                label=f"client {client_id} {arrival.label}",
                heartbeats=self._heartbeats,
                call_memory=self._call_shares.of(arrival.owner(established.username)),
            )
        except BaseException:
            # Welcomed but never served: as in the finally below, its token
            # must start to expire and its id be released.
            self._settle_tokens(token, held)
            await self._release_client_id(client_id)
            raise
        if held is not None:
            held.connection = peer.connection
        stale = self.clients.get(client_id)
        ending = self._sessions_over.get(client_id)
        over: trio.Event | None = None
        expiring = False

        def started() -> None:
            if held is not None and self.cluster is not None:
                # The bus cannot ask this session whether it has heard from
                # its client, as the local table does: it is told.
                peer.connection.spawn(self._spend_when_heard, held)

        def ended() -> None:
            nonlocal expiring
            expiring = True
            if peer.connection.peer_left_for_good:
                # It said goodbye for good, and forgot its token (see
                # Client.disconnect): nobody presents it again, and it would
                # take its place in the table for RESUME_TTL.
                self._resume_tokens.retire(token, trio.current_time())
            else:
                self._resume_tokens.start_expiry(token, trio.current_time())
            if self.clients.get(client_id) is peer:
                del self.clients[client_id]
            log.info("client %s disconnected: %s", client_id, peer.connection.close_reason)

        # Everything from the registration on is inside the try: a cancel while
        # a stale connection is being replaced (server.close() during a
        # reconnect) must not leave this never-run peer registered, its id
        # held in the cluster, or its token valid for ever.
        try:
            # Registered before the stale connection (if any) is closed, so that
            # its end neither unregisters the id nor releases it in the cluster.
            self.clients[client_id] = peer
            if stale is not None:
                # Only the holder of the token gets here: its old connection is a
                # dead one we have not noticed yet. Close it, and let its session
                # end (disconnect hooks too) before the new one starts.
                log.info("client %s reconnected: closing its stale connection", client_id)
                await stale.connection.close("replaced by the client's reconnect", grace=0.5)
                if ending is not None:
                    with trio.move_on_after(HOOK_TIMEOUT + 1):
                        await ending.wait()
            over = self._sessions_over[client_id] = trio.Event()
            self._arrivals.unpark_all()
            user = f" as user {peer.username!r}" if peer.username is not None else ""
            log.info(
                "client %s (%r) connected from %s%s", client_id, peer.name, arrival.label, user
            )
            await self._run_session(peer, (peer,), on_started=started, on_ended=ended)
        finally:
            if held is not None:
                held.settle(self._resume_tokens)
                if self.cluster is not None and held():
                    # Heard from its client before the watcher could spend it.
                    await self._spend_held(held)
            if not expiring:  # the session never ran: ended() did not see it out
                self._resume_tokens.start_expiry(token, trio.current_time())
                # Nor did its connection, which the application may have used
                # meanwhile (it was registered): calls made on it must fail,
                # not wait for ever for answers nobody will read.
                peer.connection.abort("closed before its session started")
            if self.clients.get(client_id) is peer:
                del self.clients[client_id]
            if over is not None:
                over.set()
                if self._sessions_over.get(client_id) is over:
                    del self._sessions_over[client_id]
            # Each connection releases the id it was given; the cluster counts
            # them, so a newer connection of the same client keeps holding it.
            # (Shielded, bounded; the bus's copy of the token goes with it when
            # the client said goodbye for good.)
            forgotten = token if peer.connection.peer_left_for_good else None
            await self._release_client_id(
                client_id,
                forgotten_token=forgotten,
                counted_against=arrival.owner(established.username),
            )


__all__ = ["Server"]
