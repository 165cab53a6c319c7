"""The client: connect, authenticate, call, be called."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import socket
import ssl
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import attrs
import trio

from . import _heartbeats as heartbeats
from . import _threads
from ._bridge import RunBinding, bridged
from ._callbacks import calling_task, invoke, wants_an_argument
from ._connect_error import describe_connect_error
from ._connection import Connection
from ._endpoint import Endpoint
from ._groups import FATAL, first_leaf
from ._handshake_io import ClientRun, Established, client_handshake, open_tls
from ._peer import Peer
from ._rpc_proxy import RPCProxy
from ._stored_errors import detached
from .descriptors import ClientDescriptor
from .errors import (
    AuthenticationError,
    CallbackCancelledError,
    ConduitError,
    ConnectionClosed,
    HandshakeTimeout,
    LockedOut,
)
from .protocol import ClientHandshake
from .protocol.handshake import ProverCache, shared_secret, shared_secret_ready
from .protocol.messages import Welcome

log = logging.getLogger("conduit.client")

#: A lifecycle hook: ``hook()`` or ``hook(client)``, sync or ``async``.
LifecycleHook = TypeVar("LifecycleHook", bound="Callable[[], object] | Callable[[Client], object]")
#: ``hook(attempt, delay)``, sync or ``async``.
ReconnectingHook = TypeVar("ReconnectingHook", bound=Callable[[int, float], object])
#: A one-way message's handler: ``handler(data)``, sync or ``async``.
MessageHandler = TypeVar("MessageHandler", bound=Callable[[Any], object])

#: Seconds a disconnect() gives the handshake of a cancelled connect(), going
#: on alone, to finish and say goodbye before it cuts it (less if its
#: connect_timeout ends sooner): a server answers a handshake within
#: milliseconds, and a connect_timeout may be long, or infinite.
ALONE_DISCONNECT_WAIT = 5.0
#: Longest a reconnect waits out a server's lock-out (``LockedOut.retry_after``,
#: which arrives before authentication: a value past this, or not a positive
#: number, is taken as the reconnect's own backoff instead).
MAX_LOCKOUT_WAIT = 3600.0


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host``:``port``.

    An IP address is dialled directly: one socket and one non-blocking
    ``connect``. :func:`trio.open_tcp_stream` would resolve it again and race
    its single address happy-eyeballs style, in a nursery with a task per
    attempt and their cancel scopes (~0.35 ms more client CPU per connect on
    the benchmark machine, on the connect's critical path). A host name goes
    to :func:`trio.open_tcp_stream`: its resolver (in a worker thread) and its
    race between the addresses the name has are worth their cost there.
    """
    try:
        # AI_NUMERICHOST: never a DNS query; a name fails at once.
        targets = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        )
    except socket.gaierror:
        return await trio.open_tcp_stream(host, port)
    await trio.lowlevel.checkpoint_if_cancelled()
    family, kind, proto, _, address = targets[0]
    raw = socket.socket(family, kind, proto)
    try:
        raw.setblocking(False)
        await _connect(raw, address)
        return trio.SocketStream(trio.socket.from_stdlib_socket(raw))
    except BaseException:
        raw.close()
        raise


async def _connect(raw: socket.socket, address: Any) -> None:
    """``connect`` the non-blocking ``raw`` socket, waiting only if it has to.

    A connection that completes within the ``connect`` call (on loopback it
    always does: the kernel answers the SYN in the same call) is used at
    once. :meth:`trio.socket.SocketType.connect` parks the task until the
    socket reports writable even then: a scheduler pass, an ``epoll``
    registration and an ``epoll_wait`` (~0.1-0.2 ms per connect here, on
    the connect's critical path).
    """
    try:
        raw.connect(address)
        return
    except BlockingIOError:
        pass  # in progress (EINPROGRESS, or WSAEWOULDBLOCK on Windows)
    try:
        raw.getpeername()  # connected already (ENOTCONN while in progress)
        return
    except OSError:
        pass
    await trio.lowlevel.wait_writable(raw)
    code = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code != 0:
        raise OSError(code, f"connect to {address!r} failed: {os.strerror(code)}")


@attrs.define(eq=False)
class _Connecting:
    """A :meth:`Client.connect` on its way: the one a concurrent ``connect()``
    waits for (one connect at a time), and the one ``disconnect()`` cancels.
    Also a background reconnect on its way, which ``disconnect()`` cancels
    and waits for likewise; and the handshake of a cancelled ``connect()``,
    going on alone (:attr:`alone`), which a later ``connect()`` or
    ``disconnect()`` waits for (neither cancels it).
    """

    #: The task doing it.
    task: trio.lowlevel.Task
    #: Around the connect's work (taking over from a reconnect, dialling, the
    #: handshake) or the reconnect's attempts: cancelled by disconnect(),
    #: which must win. Once :attr:`alone`, around the handshake's task, with
    #: the connect_timeout's deadline, which disconnect() brings closer.
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    #: Set once that connect has returned or raised (or, :attr:`alone`, once
    #: its handshake has ended).
    done: trio.Event = attrs.Factory(trio.Event)
    #: Its connect() was cancelled after the hello went out, and its
    #: handshake goes on in a task of its own (Client._finish_alone).
    alone: bool = False
    #: connect() calls waiting for it: a handshake going on alone that ends
    #: with some waiting installs its session for them, instead of closing it.
    waiters: int = 0


def _binding_of(client: Client) -> Callable[[], RunBinding | None]:
    """``client``'s run binding, for its RPC proxy (weakly: see :func:`_connection_of`)."""
    weak = weakref.ref(client)

    def binding() -> RunBinding | None:
        current = weak()
        return None if current is None else current._run_binding()

    return binding


def _connection_of(client: Client) -> Callable[[], Connection]:
    """``client``'s current connection (its ``_current_connection()``), without
    a reference to ``client``.

    ``client.rpc`` keeps it: a bound method would tie the client and its
    proxy into a reference cycle, and a client dropped without a collection
    would keep its last connection (its socket's buffers) until Python's
    cycle collector ran. (A plain weak reference: ``weakref.WeakMethod``
    builds a bound method per call: 0.4 µs more client CPU per RPC, measured.)
    """
    weak = weakref.ref(client)

    def connection() -> Connection:
        current = weak()
        if current is None:
            raise ConnectionClosed("the client is gone")
        return current._current_connection()

    return connection


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

    A lost connection is re-established in the background (see the
    descriptor's ``reconnect_*`` fields), with the same :attr:`id`; file
    transfers in flight wait for it and resume. RPC calls in flight fail with
    ``ConnectionClosed``: they are never replayed, as they may not be
    idempotent.
    """

    def __init__(self, descriptor: ClientDescriptor) -> None:
        super().__init__(descriptor, message_handler_takes_peer=False)
        #: The settings this client was made with.
        self.descriptor = descriptor
        self._peer: Peer | None = None
        self._reconnect_hooks: list[Callable[..., Any]] = []
        self._reconnecting_hooks: list[Callable[..., Any]] = []
        #: The secret of the last WELCOME, presented on reconnect to keep our id.
        self._resume_token = b""
        #: disconnect() was called: no reconnect, whatever happens.
        self._stopping = False
        #: How many times disconnect() was called: a connect() that sees it
        #: change while it waited or worked lost to a disconnect.
        self._disconnects = 0
        #: The connect() on its way, if any (one at a time).
        self._connecting: _Connecting | None = None
        #: The background reconnect on its way, if any (the supervisor's
        #: attempts, between two connections).
        self._reconnecting: _Connecting | None = None
        #: The background task that runs the connection and reconnects it,
        #: and the event it sets once it has exited.
        self._supervisor: trio.CancelScope | None = None
        self._supervisor_exited = trio.Event()
        self._supervisor_exited.set()
        #: Whether the current connection was dialled (it can be redialled).
        self._redial = False
        #: Set when that task will not bring a connection back (any more).
        self._finished = trio.Event()
        self._finished.set()
        #: Wakes transfers waiting for a reconnect, on every change of connection.
        self._changed = trio.lowlevel.ParkingLot()
        # The stretched password, kept for the life of this Client: reconnects
        # pay no Argon2id (accounts mode; shared mode memoises per process).
        self._prover_cache = ProverCache()
        #: Why the last automatic reconnect gave up (None: it has not), for
        #: the errors of what waited for it (see :meth:`_wait_reconnected`).
        self._gave_up: str | None = None
        #: The refusal of the password that ended the automatic reconnect.
        self._refused: AuthenticationError | None = None
        #: A SystemExit or KeyboardInterrupt a handler raised, which ended the
        #: connection: raised again in the application's task (see _supervise).
        self._fatal: BaseException | None = None
        #: The SSL context of :meth:`_ssl_context`, with the descriptor it is of.
        self._built_ssl_context: tuple[ClientDescriptor, ssl.SSLContext | None] | None = None
        #: ``client.rpc.call(...)`` / ``client.rpc.invoke(...)`` call the server;
        #: ``@client.rpc`` registers methods the server may call.
        self.rpc = RPCProxy(
            _connection_of(self), descriptor.rpc_timeout, self._handlers, _binding_of(self)
        )

    # ---------------------------------------------------------------- registry

    def on(self, event: str) -> Callable[[MessageHandler], MessageHandler]:
        """Handle one-way messages from the server:
        ``@client.on("news") async def h(data): ...``."""

        def decorator(function: MessageHandler) -> MessageHandler:
            self._handlers.add_event(event, function)
            return function

        return decorator

    def on_connect(self, function: LifecycleHook) -> LifecycleHook:
        """Call ``function()`` after each successful connect.

        A ``function(client)`` that takes one argument gets this client, as
        netconduit's hooks did; so do :meth:`on_disconnect` and
        :meth:`on_reconnect`.
        """
        self._connect_hooks.append(self._lifecycle_hook(function))
        return function

    def on_disconnect(self, function: LifecycleHook) -> LifecycleHook:
        """Call ``function()`` (or ``function(client)``) after the connection
        ends, however it ends."""
        self._disconnect_hooks.append(self._lifecycle_hook(function))
        return function

    def on_reconnect(self, function: LifecycleHook) -> LifecycleHook:
        """Call ``function()`` (or ``function(client)``; sync or ``async``)
        after each automatic reconnect succeeds.

        Runs after the ``on_connect`` hooks were started, under ``asyncio.run``
        in the application's loop, like them.
        """
        self._reconnect_hooks.append(self._lifecycle_hook(function))
        return function

    def _lifecycle_hook(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` as a hook called with no arguments: given this client
        if it wants one (a required positional parameter)."""
        return functools.partial(function, self) if wants_an_argument(function) else function

    def on_reconnecting(self, function: ReconnectingHook) -> ReconnectingHook:
        """Call ``function(attempt, delay)`` before each automatic reconnect attempt.

        ``attempt`` counts from 1 (of ``descriptor.reconnect_attempts``; 0
        there means unlimited) and ``delay`` is the wait, in seconds, before
        it is made: what a progress display shows as "connection lost,
        reconnecting in 2 s, attempt 2/5". Sync or ``async``; keep it short,
        the attempt waits for it.
        """
        self._reconnecting_hooks.append(function)
        return function

    # ---------------------------------------------------------------- state

    def _run_binding(self) -> RunBinding | None:
        # It lives in a run while a connect is on its way there, or its
        # background task (the connection, the reconnects) runs there.
        if self._connecting is None and self._supervisor_exited.is_set():
            return None
        return self._binding

    @property
    def id(self) -> str | None:
        """The id the server assigned (the key of ``server.clients``); None when never connected."""
        return self._peer.id if self._peer is not None else None

    @property
    def connected(self) -> bool:
        """Whether the connection is open (False while reconnecting)."""
        return self._peer is not None and self._peer.connected

    @property
    def reconnect_refused(self) -> AuthenticationError | None:
        """The server's refusal of the password at an automatic reconnect, which
        then gave up (a password changed on the server, an account removed);
        None if that did not happen since the last session began. A copy of
        the error raised, without its traceback (which would keep the client's
        frames alive)."""
        return self._refused

    @property
    def reconnecting(self) -> bool:
        """Whether the connection was lost and is being re-established."""
        return not self._finished.is_set() and not self.connected and not self._stopping

    @property
    def server(self) -> Peer:
        """The server as a :class:`Peer` (for streams and advanced use).

        Raises :class:`~conduit.ConnectionClosed` before the first connect and
        after :meth:`disconnect`. While a lost connection is being
        re-established it is the lost session's Peer (closed): file transfers
        started then wait for the reconnect (see :attr:`reconnecting`).
        """
        self._raise_fatal()
        if self._peer is None:
            raise ConnectionClosed("not connected")
        if self._stopping:
            # The last session is over for good: a transfer started now must
            # raise, not fail on a closed connection (docs/file-transfer.md).
            raise ConnectionClosed("disconnected: call connect() first")
        return self._peer

    def _current_connection(self) -> Connection:
        self._raise_fatal()
        if self._peer is None:
            raise ConnectionClosed("not connected: call connect() first")
        connection = self._peer.connection
        if not connection.is_open:
            raise ConnectionClosed(connection.close_reason or "connection closed")
        return connection

    # ---------------------------------------------------------------- lifecycle

    @bridged
    async def connect(self, *, stream: trio.abc.Stream | None = None) -> bool:
        """Connect and authenticate; return True.

        True, never False: a failure raises. (netconduit's ``connect()``
        returned whether it connected; code written for it, ``if not await
        client.connect(): ...``, keeps taking the right branch.)
        Raises :class:`~conduit.AuthenticationError` for a wrong password,
        :class:`~conduit.HandshakeTimeout` (a ``TimeoutError``) when the server
        does not answer within ``connect_timeout``, ``OSError`` when nothing
        listens there. The connection then runs in the background until
        :meth:`disconnect`.

        The server confirms first (shared password; accounts mode from a
        ``Client``'s second connect on; not for an automatic reconnect that
        resumes its client id): ``connect()`` returns once this client has
        checked the server's confirmation and sent its own, one round trip
        after TCP's, before the server has checked it. Calls
        and messages sent at once are served after that check; in the same
        process, the server's ``clients`` lists this client a moment later
        (once a first call is answered, it does).

        ``stream``: authenticate over this already-open :class:`trio.abc.Stream`
        instead of dialling ``server_host:server_port`` (a Unix socket, an SSH
        tunnel, an in-memory stream in tests). It is used as it is: the
        descriptor's TLS settings are not applied (wrap it in
        :class:`trio.SSLStream` yourself), and it is closed when the connection
        ends or the handshake fails.

        One connect at a time: a ``connect()`` made while another is on its
        way (two tasks, or ``asyncio.gather``) waits for it, then returns if it
        connected (closing its own ``stream``, if given), or tries itself if it
        failed. :meth:`disconnect` called while a ``connect()`` is on its way
        wins: that connect (and any waiting for it) closes whatever it opened
        and raises :class:`~conduit.ConnectionClosed`.

        Cancelled (a Trio scope, ``asyncio.wait_for``) once its hello has gone
        out, ``connect()`` raises at once, but its handshake goes on in the
        background, within ``connect_timeout``: the server counts a handshake
        its client leaves half-way as a failed password attempt, so retrying
        under a short timeout would lock this address out. Finished with
        nobody waiting, it says goodbye (a success to the server) and closes;
        a ``connect()`` made meanwhile waits for it and takes its session.
        See docs/trio-and-asyncio.md for what still counts.
        """
        await self._connect_once(stream)
        return True

    async def _connect_once(self, stream: trio.abc.Stream | None) -> None:
        """:meth:`connect`'s work: connected on return, else it raised."""
        self._raise_fatal()  # a handler's sys.exit() is not undone by connecting again
        if self.connected:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            else:
                await trio.lowlevel.checkpoint()  # every path of an async API is one
            return
        disconnects = self._disconnects
        if self._connecting is not None and await self._wait_turn(stream, disconnects):
            return
        connecting = self._connecting = _Connecting(trio.lowlevel.current_task())
        # The run this client now lives in: what it starts runs there.
        self._binding = RunBinding.current()
        self._thread_of_run = self.rpc._thread_of_run = self._binding.thread
        try:
            await self._connect(stream, connecting, disconnects)
        finally:
            if not connecting.alone:  # else its handshake's task does this
                self._connecting = None
                connecting.done.set()

    async def _wait_turn(self, stream: trio.abc.Stream | None, disconnects: int) -> bool:
        """Wait for the connect() on its way; whether it connected (then
        ``stream`` is closed, unused), else it is our turn to try.

        ``disconnects``: disconnect()'s count when our connect() began; a
        disconnect() since makes it lose (ConnectionClosed) too.
        """
        try:
            while (pending := self._connecting) is not None:
                pending.waiters += 1
                try:
                    await pending.done.wait()
                finally:
                    pending.waiters -= 1
                if self._disconnects != disconnects:
                    raise ConnectionClosed("disconnect() was called during connect()")
                if self.connected:
                    if stream is not None:
                        await trio.aclose_forcefully(stream)
                    return True
                # It failed (or its connection is lost already): our turn,
                # unless another waiter took it first.
        except BaseException:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise
        return False

    async def _connect(
        self, stream: trio.abc.Stream | None, connecting: _Connecting, disconnects: int
    ) -> None:
        """connect()'s work, by the one connect() on its way (``connecting``:
        its scope is cancelled by disconnect(); ``disconnects``: the count it
        started at)."""
        peer: Peer | None = None
        with connecting.scope:
            try:
                if self._supervisor is not None:
                    # Reconnecting in the background: this call takes over.
                    self._supervisor.cancel()
                    await self._supervisor_exited.wait()
            except BaseException:
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                raise
            self._stopping = False
            peer = await self._establish(stream, connecting=(connecting, disconnects))
        if self._disconnects != disconnects:
            # disconnect() was called meanwhile: it wins. Cancelled before the
            # handshake was done, the stream is closed already; else the new
            # session is said goodbye to and closed here, never run.
            if peer is not None:
                with trio.CancelScope(shield=True):
                    await _close_unrun(peer, "client disconnected", coming_back=False)
            raise ConnectionClosed("disconnect() was called during connect()")
        assert peer is not None  # not cancelled: only disconnect() cancels the scope
        self._start(peer, redial=stream is None)

    def _start(self, peer: Peer, *, redial: bool) -> None:
        """Run the newly installed session ``peer`` in the background (and
        reconnect it when lost, if ``redial``: it was dialled)."""
        self._redial = redial
        # The connection outlives this call, so it cannot live in the caller's
        # nursery: it runs as a system task of the current Trio run (under the
        # asyncio shim, of the loop's guest run) and ends with disconnect().
        # Not waited for: the connection takes calls, spawns and a close
        # before its task has started (Connection.will_run), and waiting
        # would cost every connect two scheduling passes. Its scope and events
        # are handed to it: a later connect() replaces the attributes.
        finished = self._finished = trio.Event()
        exited = self._supervisor_exited = trio.Event()
        supervisor = self._supervisor = trio.CancelScope()
        peer.connection.will_run()
        trio.lowlevel.spawn_system_task(self._supervise, peer, supervisor, finished, exited)

    async def _establish(
        self,
        stream: trio.abc.Stream | None,
        *,
        reconnect: bool = False,
        connecting: tuple[_Connecting, int] | None = None,
    ) -> Peer | None:
        """Dial (unless given ``stream``) and authenticate; the new session's Peer.

        ``reconnect``: for the background reconnect, which returns None (and
        closes the new session) when disconnect() began meanwhile. A
        connect() always returns a Peer: it sorts out a disconnect() itself.
        ``connecting``: a connect()'s own record and disconnect()'s count when
        it began; cancelled after its hello went out, its handshake goes on
        alone (see :meth:`_finish_alone`).
        """
        descriptor = self.descriptor
        given = stream is not None
        if descriptor.username is None and not shared_secret_ready(descriptor.password):
            # The shared password's stretch (memoised), off the event loop and
            # outside connect_timeout: it is this process's one-time cost.
            await _threads.run_sync(shared_secret, descriptor.password)
        # A token is good only at the server that issued it: the descriptor's
        # target. A given stream may lead anywhere, so it gets none, and the
        # one its server sends back is not kept for the descriptor's target.
        token = b"" if given else self._resume_token
        try:
            with trio.fail_after(descriptor.connect_timeout) as timeout:
                if stream is None:
                    stream = await self._open_stream()
                established, welcome = await self._handshake(
                    stream, token, given=given, timeout=timeout, connecting=connecting
                )
        except trio.TooSlowError:
            raise HandshakeTimeout(
                f"no answer from {self._where(given)} within connect_timeout "
                f"({descriptor.connect_timeout:g}s)"
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(f"connection lost during the handshake: {exc}") from exc
        peer = self._session(stream, established, welcome, given=given)
        # No await from this check to the install below: a disconnect() that
        # began during the handshake (its last step may finish without a
        # checkpoint, so the cancellation may not have reached it) must find
        # no new session in self._peer, and no token it cleared written again.
        if reconnect and self._stopping:
            with trio.CancelScope(shield=True):
                await _close_unrun(peer, "client disconnected", coming_back=False)
            return None
        self._install(peer, welcome, token, given=given)
        return peer

    def _where(self, given: bool) -> str:
        descriptor = self.descriptor
        if given:
            return "the given stream"
        return f"{descriptor.server_host}:{descriptor.server_port}"

    async def _handshake(
        self,
        stream: trio.abc.Stream,
        token: bytes,
        *,
        given: bool,
        timeout: trio.CancelScope,
        connecting: tuple[_Connecting, int] | None,
    ) -> tuple[Established, Welcome]:
        """Authenticate over ``stream``, which is closed if that fails, unless
        a cancelled connect() hands it to :meth:`_finish_alone` (see
        :meth:`_go_on_alone`). ``timeout``: the scope of connect_timeout."""
        descriptor = self.descriptor
        on_cancel = None
        if connecting is not None:
            on_cancel = functools.partial(
                self._go_on_alone,
                token=token,
                given=given,
                timeout=timeout,
                connecting=connecting[0],
                disconnects=connecting[1],
            )
        try:
            handshake = ClientHandshake(
                descriptor.password,
                name=descriptor.name,
                max_frame_size=descriptor.max_frame_size,
                receive_window=descriptor.receive_window,
                username=descriptor.username,
                cache=self._prover_cache,
                resume=bool(token),
            )
            return await client_handshake(
                stream, handshake, descriptor.max_frame_size, token, on_cancel=on_cancel
            )
        except BaseException:
            if connecting is None or not connecting[0].alone:
                await trio.aclose_forcefully(stream)
            raise

    def _go_on_alone(
        self,
        run: ClientRun,
        *,
        token: bytes,
        given: bool,
        timeout: trio.CancelScope,
        connecting: _Connecting,
        disconnects: int,
    ) -> bool:
        """Whether the handshake of a connect() cancelled now goes on in a task
        of its own (started here), rather than being dropped with its socket.

        A handshake the client leaves once its hello has gone out is a failed
        password attempt to the server, which cannot tell a client that gave
        up from a guesser that left as soon as it could test its guess: an
        application retrying connect() under a short timeout, with the right
        password, would lock its own address out. So the handshake goes on,
        within connect_timeout, whoever stopped waiting for it (a Trio scope,
        asyncio.wait_for through the shim). Dropped as before: a handshake cut
        in a send, one whose connect_timeout is spent, and one disconnect()
        cancelled (it wins, and returns once the socket is closed).
        """
        if connecting.scope.cancel_called or timeout.cancel_called:
            return False
        alone = trio.CancelScope(deadline=timeout.deadline)
        try:
            trio.lowlevel.spawn_system_task(
                self._finish_alone, run, connecting, disconnects, token, given
            )
        except RuntimeError:  # the Trio run is ending: no task can start
            return False
        connecting.scope = alone  # the connect() holds its own scope still
        connecting.alone = True
        return True

    async def _finish_alone(
        self,
        run: ClientRun,
        connecting: _Connecting,
        disconnects: int,
        token: bytes,
        given: bool,
    ) -> None:
        """Take the handshake of a cancelled connect() to its end (within
        ``connecting.scope``: its connect_timeout, or less once disconnect()
        is called); then install its session if connect() calls wait for it
        (a retry; and no disconnect() came since its connect() began), else
        say goodbye and close it.

        A handshake that ends with its goodbye is a success to the server
        (which also forgives the failed attempts before it); until it ends,
        ``connecting`` stays this Client's connect on its way: a later
        connect() waits for it rather than start a second handshake.
        """
        try:
            with connecting.scope:
                try:
                    established, welcome = await run.run()
                except BaseException:
                    run.give_up()
                    await trio.aclose_forcefully(run.stream)
                    raise
                peer = self._session(run.stream, established, welcome, given=given)
                ours = self._disconnects == disconnects  # no disconnect() since
                if connecting.waiters and ours and not self.connected:
                    self._install(peer, welcome, token, given=given)
                    self._start(peer, redial=not given)
                    return
                keeps_id = bool(token) and ours
                if keeps_id:
                    # The token it presented is spent (single use): the WELCOME's
                    # replaces it, or the next connect() would lose our client id.
                    self._resume_token = welcome.resume_token
                log.debug("the handshake of a cancelled connect() finished; closing its session")
                await _close_unrun(peer, "connect() was cancelled", coming_back=keeps_id)
            if connecting.scope.cancelled_caught:
                log.info(
                    "the handshake of a cancelled connect() ran out of time "
                    "(its connect_timeout, or disconnect()'s wait)"
                )
        except Exception as exc:  # a system task must never raise; nobody waits for this one
            log.info("the handshake of a cancelled connect() failed: %s", exc)
            await trio.aclose_forcefully(run.stream)  # whichever step failed
        finally:
            if self._connecting is connecting:
                self._connecting = None
            connecting.done.set()

    def _session(
        self, stream: trio.abc.Stream, established: Established, welcome: Welcome, *, given: bool
    ) -> Peer:
        """The Peer of a finished handshake (not installed, not running yet)."""
        descriptor = self.descriptor
        return self._open_session(
            stream,
            established,
            is_client=True,
            peer_id=welcome.client_id,
            name=welcome.server_name,
            address=None if given else (descriptor.server_host, descriptor.server_port),
            default_timeout=descriptor.rpc_timeout,
            label=f"server {self._where(given)}",
            # The run's shared timer: no heartbeat task per connection.
            heartbeats=(
                heartbeats.shared(descriptor.heartbeat_interval)
                if descriptor.heartbeat_interval > 0
                else None
            ),
        )

    def _install(self, peer: Peer, welcome: Welcome, token: bytes, *, given: bool) -> None:
        """Make ``peer`` this Client's session (``token``: the resume token its
        handshake presented)."""
        if token and self._peer is not None and welcome.client_id != self._peer.id:
            log.warning(
                "the server did not recognise this client's resume token (it expired, or "
                "the server was restarted): client id %s is now %s",
                self._peer.id,
                welcome.client_id,
            )
        self._resume_token = b"" if given else welcome.resume_token
        self._peer = peer
        self._gave_up = None  # a new session: a reconnect given up before is history
        self._refused = None
        if token:
            # The server keeps the token we presented good until it hears from
            # us (our WELCOME may have been lost on the way): a PING now spends
            # it within a round trip, not at the next heartbeat.
            with contextlib.suppress(ConnectionClosed):
                peer.connection.ping_now()
        log.info("connected to %r as client %s", welcome.server_name, welcome.client_id)

    async def _open_stream(self) -> trio.abc.Stream:
        descriptor = self.descriptor
        stream: trio.abc.Stream = await open_tcp(descriptor.server_host, descriptor.server_port)
        ssl_context = self._ssl_context()
        if ssl_context is not None:
            stream = await open_tls(
                stream, ssl_context, descriptor.tls_server_hostname or descriptor.server_host
            )
        return stream

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The descriptor's SSL context, built once per descriptor: loading
        the system's CAs takes tens of milliseconds, at every reconnect else."""
        descriptor = self.descriptor
        if self._built_ssl_context is None or self._built_ssl_context[0] is not descriptor:
            self._built_ssl_context = (descriptor, descriptor.build_ssl_context())
        return self._built_ssl_context[1]

    async def _supervise(
        self, peer: Peer, scope: trio.CancelScope, finished: trio.Event, exited: trio.Event
    ) -> None:
        """Run the connection; when it is lost, reconnect and run the new one, until done.

        ``scope`` (cancelled to stop this), ``finished`` and ``exited`` are
        this supervisor's own, given by the connect() that started it: read
        from ``self`` when the task first runs, they may already be another's.
        """
        try:
            with scope:
                first = True
                while True:
                    await self._run_connection(peer, finished, reconnected=not first)
                    if not self._should_reconnect(peer):
                        return
                    self._changed.unpark_all()
                    new_peer = await self._reconnect()
                    if new_peer is None:
                        return
                    peer, first = new_peer, False
        except Exception:  # a system task must never raise; the reason is logged
            log.exception("connection to the server failed")
        except BaseException as exc:
            fatal = first_leaf(exc, FATAL)
            if fatal is None:
                raise  # Trio's Cancelled: the run is ending
            # A handler of ours raised it (a message handler calling
            # sys.exit(3), say). From this system task it would crash Trio
            # (TrioInternalError); the connection has ended, and the
            # application's own task gets it from its next call, send,
            # connect(), wait_closed() or disconnect() (the end of `async
            # with client`).
            log.error("a handler raised %r: the connection is closed", fatal)
            # Detached: kept until the application's next call, and its
            # traceback holds this frame, which holds the client (as the
            # local does: deleted).
            self._fatal = detached(fatal)
            del fatal
        finally:
            if self._supervisor is scope:
                self._supervisor = None
            finished.set()
            exited.set()
            self._changed.unpark_all()

    def _should_reconnect(self, peer: Peer) -> bool:
        return (
            self.descriptor.reconnect_enabled
            and self._redial
            and not self._stopping
            and not peer.connection.closed_on_purpose
        )

    async def _run_connection(self, peer: Peer, finished: trio.Event, *, reconnected: bool) -> None:
        def on_started() -> None:
            self._changed.unpark_all()
            if reconnected:
                for hook in self._reconnect_hooks:
                    peer.connection.spawn(self._run_hook, hook, (), "reconnect")

        def ended() -> None:
            log.info("disconnected: %s", peer.connection.close_reason)
            if peer.connection.left_for_good and self._peer is peer:
                # Our goodbye for good (the run we lived in ending, our
                # idle_timeout, client.server.close(): closed by this side, as
                # by disconnect()): the server forgets the token once it reads it.
                self._resume_token = b""
            if not self._should_reconnect(peer):
                # Say so now, not after the disconnect hooks: transfers waiting
                # for a reconnect give up at once.
                finished.set()
            self._changed.unpark_all()

        await self._run_session(peer, (), on_started=on_started, on_ended=ended)

    async def _reconnect(self) -> Peer | None:
        """Attempt after attempt, with backoff: the new session, or None when
        giving up or stopped by disconnect() (which cancels ``_reconnecting``)."""
        reconnecting = self._reconnecting = _Connecting(trio.lowlevel.current_task())
        try:
            with reconnecting.scope:
                return await self._reconnect_attempts()
            return None  # cancelled by disconnect()
        finally:
            if self._reconnecting is reconnecting:
                self._reconnecting = None
            reconnecting.done.set()

    async def _reconnect_attempts(self) -> Peer | None:
        descriptor = self.descriptor
        limit = descriptor.reconnect_attempts
        attempt = 0
        self._gave_up = self._refused = None
        # In words: the error itself, kept in this frame's local, would hold
        # the frame (and the client) in a cycle through its traceback.
        last: str | None = None
        while limit == 0 or attempt < limit:
            attempt += 1
            # Up to 25% less than the nominal wait, so that the clients of a
            # restarted server do not all come back in the same instant.
            delay = descriptor.reconnect_wait(attempt) * (1.0 - 0.25 * random.random())
            of = f"/{limit}" if limit else ""
            log.info("connection lost; reconnecting in %.1fs (attempt %d%s)", delay, attempt, of)
            for hook in self._reconnecting_hooks:
                try:
                    await invoke(hook, attempt, delay)
                except CallbackCancelledError:  # asyncio's shutdown, not the hook's bug
                    log.debug("on_reconnecting hook %r was cancelled by asyncio", hook)
                except Exception:  # the application's bug: log it, keep reconnecting
                    log.exception("on_reconnecting hook %r failed", hook)
            await trio.sleep(delay)
            if self._stopping:
                return None
            try:
                return await self._establish(None, reconnect=True)
            except LockedOut as exc:
                # No verdict on the password (it was not checked): the address
                # is refused for a while, by others' failures or by handshakes
                # the network cut (the server counts those too). Wait it out;
                # one attempt per lock-out is no retry storm. The wait comes
                # in clear, before authentication: only a sane one is taken.
                wait = exc.retry_after
                if not 0 < wait <= MAX_LOCKOUT_WAIT:
                    wait = min(descriptor.reconnect_wait(attempt), MAX_LOCKOUT_WAIT)
                log.warning(
                    "reconnect attempt %d%s: %s; trying again after %.1fs", attempt, of, exc, wait
                )
                await trio.sleep(wait)
            except AuthenticationError as exc:
                # Never retry a refused password: no retry storm, no lock-out
                # of the user by their own client.
                log.error("reconnect refused, giving up: %s", exc)
                self._gave_up = f"the server refused the reconnect: {exc}"
                self._refused = detached(exc)  # see conduit._stored_errors
                return None
            except (OSError, ConduitError) as exc:
                log.info("reconnect attempt %d%s failed: %s", attempt, of, exc)
                last = describe_connect_error(exc)
        log.error("could not reconnect after %d attempts; giving up", attempt)
        self._gave_up = f"{attempt} reconnect attempts failed" + (
            f", the last: {last}" if last is not None else ""
        )
        return None

    async def _wait_reconnected(self, lost: Peer) -> Peer:
        """The session that replaced ``lost`` once reconnected; ConnectionClosed if none will."""
        while True:
            peer = self._peer
            if peer is not None and peer is not lost and peer.connected:
                return peer
            if self._finished.is_set() or self._stopping:
                reason = lost.connection.close_reason or "connection closed"
                why = f": {self._gave_up}" if self._gave_up and not self._stopping else ""
                raise ConnectionClosed(f"{reason} (not reconnected{why})")
            await self._changed.park()

    @bridged
    async def disconnect(self, reason: str = "client disconnected") -> None:
        """Close the connection gracefully and stop reconnecting; a no-op when not connected.

        A :meth:`connect` on its way loses: it closes what it opened and
        raises :class:`~conduit.ConnectionClosed`; this returns once it has.
        The handshake of a cancelled ``connect()``, going on alone, is not cut
        at once (to the server, that would be a failed password attempt): this
        waits for it to end, say goodbye and close its socket, for what is left
        of its ``connect_timeout`` but at most :data:`ALONE_DISCONNECT_WAIT`
        seconds, then cuts it.
        From a handler of the connection itself (a method the server calls),
        it returns once the goodbye is on its way: the connection ends after
        the handler has returned.
        """
        self._stopping = True
        self._disconnects += 1
        self._resume_token = b""  # now, whatever may cancel the rest of this call
        # A background reconnect stops first, whatever self.connected says:
        # its handshake may finish during any await below. From here on it
        # cannot install a new session (_establish checks _stopping), and once
        # it has ended, a session it made but no longer may use is closed.
        # Called by the reconnect itself (an on_reconnecting hook), it is left
        # to stop on its own (it sees _stopping after the hook): cancelling it
        # would cancel this call, and waiting for it would wait for ever.
        reconnecting = self._reconnecting
        if reconnecting is not None and reconnecting.task is calling_task():
            reconnecting = None
        if reconnecting is not None:
            reconnecting.scope.cancel()
        try:
            connecting = self._connecting
            if connecting is not None:
                if connecting.alone:
                    # Left to finish (cut, it is a failed attempt to the
                    # server), for ALONE_DISCONNECT_WAIT at most: it sees the
                    # count of disconnects changed, and says goodbye instead
                    # of installing its session.
                    scope = connecting.scope
                    scope.deadline = min(
                        scope.deadline, trio.current_time() + ALONE_DISCONNECT_WAIT
                    )
                else:
                    connecting.scope.cancel()
                await connecting.done.wait()
            if reconnecting is not None:
                await reconnecting.done.wait()
            # After that connect: its handshake may have brought a new token.
            self._resume_token = b""
            # The session there is now is the last: a lost one (closed, whose
            # supervisor now ends without reconnecting) or an open one, which
            # says goodbye; its supervisor ends once it has closed.
            if self._peer is not None:
                await self._peer.connection.close(reason)
        finally:
            self._changed.unpark_all()
        self._raise_fatal()

    close = disconnect

    def _raise_fatal(self) -> None:
        """Raise, once, the SystemExit or KeyboardInterrupt a handler raised (see _supervise)."""
        fatal, self._fatal = self._fatal, None
        if fatal is not None:
            try:
                raise fatal
            finally:
                # Its traceback holds this frame (see conduit._stored_errors).
                del fatal

    @bridged
    async def wait_closed(self) -> None:
        """Wait until the connection ends for good (for clients that just serve the server's calls).

        A connection that is lost and re-established does not count as ended;
        nor does one whose server shut down (it may be restarting), until the
        automatic reconnect has given up (about a minute at the defaults) or
        succeeded. A server closed with ``close(going_away=False)``, a
        ``peer.close()`` or ``disconnect()`` end it at once.
        """
        if self._peer is not None:
            await self._peer.connection.closed.wait()
            await self._finished.wait()
        else:
            await trio.lowlevel.checkpoint()  # every path of an async API is one
        self._raise_fatal()

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


async def _close_unrun(peer: Peer, reason: str, *, coming_back: bool) -> None:
    """Say goodbye on ``peer``'s new connection and close it, without serving it.

    Its run() starts nothing on a connection closed before it ran (no
    reading, no hooks: see :meth:`Connection.will_run`); it only closes the
    socket, once close() has sent the GOODBYE. ``coming_back``: the client
    keeps this session's resume token for its next connect(); its GOODBYE
    then says ``going_away``, since one for good makes the server forget it.
    """
    connection = peer.connection
    connection.will_run()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        await connection.close(reason, going_away=coming_back)


__all__ = ["Client"]
