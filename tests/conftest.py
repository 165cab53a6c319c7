"""Shared fixtures: servers and clients over real loopback sockets or in memory.

* ``server_factory``: ``await server_factory(register=..., **descriptor_fields)``
  builds a :class:`~conduit.Server` on ``127.0.0.1:0``, lets ``register(server)``
  add handlers, starts it with ``await nursery.start(server.run)`` and closes it
  at teardown. (``tcp_server_factory`` is the same fixture under a name that a
  module overriding ``server_factory`` can still reach.)
* ``client_factory``: ``await client_factory(server_or_port, **descriptor_fields)``
  builds a :class:`~conduit.Client` for it, connects it (unless
  ``connect=False``) and disconnects it at teardown (``tcp_client_factory``).
* ``memory_server_factory`` / ``memory_client_factory``: the same over
  :class:`MemoryListener` (``Server.serve`` and ``Client.connect(stream=...)``),
  for tests where the socket is not the point; with ``autojump_clock`` their
  timers cost (almost) no wall-clock time.
* ``autojump_clock`` overrides pytest-trio's: a :class:`~trio.testing.MockClock`
  that jumps only after :data:`AUTOJUMP_THRESHOLD` of real idle time, so the
  library's worker threads (handshake crypto, file I/O) work under it.
* ``proxy_factory``: ``await proxy_factory(target_port)`` starts a
  :class:`TcpProxy` that records every byte in both directions and can flip a
  byte (:class:`FlipByte`), black-hole a direction or cut every connection.
* :func:`wait_until` polls a condition under a deadline, for state that changes
  on another task's schedule (a socket closing, a registry emptying).
* :func:`competing_handshake` holds a socket in a server's gate, so that the
  handshake under test competes with another (the loop share rations it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TypedDict, TypeVar

import attrs
import pytest
import trio
import trio.testing

from conduit import Accounts, Client, ClientDescriptor, Server, ServerDescriptor
from conduit.protocol import DEFAULT_MAX_FRAME_SIZE
from conduit.protocol.pake import StretchParams

PASSWORD = "correct horse battery staple \N{GREEK SMALL LETTER ALPHA} 42"
LOOPBACK = "127.0.0.1"
T = TypeVar("T")
#: The one user of the ``accounts`` fixture, "alice", logs in with this.
ALICE_PASSWORD = "alice's long passphrase"
#: The cheapest Argon2id stretch libsodium allows: accounts tests need not pay a real one.
FAST_STRETCH = StretchParams(opslimit=1, memlimit=8 * 1024)

Direction = Literal["c2s", "s2c"]

#: Clear-text handshake frames: 14-byte header, payload length at offset 10.
_FRAME_HEADER = struct.Struct("!2sBBBxII")
#: Sealed records: 4-byte big-endian length prefix, then ciphertext and tag.
_RECORD_PREFIX = struct.Struct("!I")


class HandshakeLimits(TypedDict):
    """The limits a ``ClientHandshake`` or ``ServerHandshake`` is built with, as keywords."""

    max_frame_size: int
    receive_window: int


#: The limits of handshake machines built by hand (the descriptors' defaults).
HANDSHAKE_LIMITS: HandshakeLimits = {
    "max_frame_size": DEFAULT_MAX_FRAME_SIZE,
    "receive_window": 4 << 20,
}


def connected(client: Client) -> bool:
    """Whether ``client`` is connected now (a call: a type checker must not assume it unchanged)."""
    return client.connected


#: Real seconds every task must sit blocked before ``autojump_clock`` jumps.
AUTOJUMP_THRESHOLD = 0.02


# --------------------------------------------------------------------------- clock


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """pytest-trio's ``autojump_clock``, with a small non-zero threshold.

    With ``autojump_threshold=0`` the clock jumps the moment every task is
    blocked, and a task waiting for ``trio.to_thread.run_sync`` counts as
    blocked: virtual time would leap past ``auth_timeout`` or a test's
    ``fail_after`` while a worker thread does 1 ms of SPAKE2 or a file read
    (Trio's docs call threads and a zero threshold incompatible). A threshold
    makes the clock jump only after that much real idle time, and the library
    offloads CPU work and file I/O to threads everywhere.

    Why 20 ms: a thread's work here takes 1-5 ms of CPU, and on a 2-core
    machine shared with other busy processes the scheduler can delay the
    thread, or the wake-up of the Trio thread after it, by about one
    scheduling period more (Linux's default ``sched_latency`` is 6-24 ms).
    20 ms stays above that, so no thread wait turns into a jump, while each
    jump costs only 20 ms of wall-clock time: the busiest test (a heartbeat
    every virtual second for 90 s) makes about 75 jumps, 1.5 s. A first
    Argon2id stretch (0.1-0.4 s) is longer than any sane threshold: tests
    stretch a new password before their timed part (``shared_secret``).
    """
    return trio.testing.MockClock(autojump_threshold=AUTOJUMP_THRESHOLD)


# --------------------------------------------------------------------------- polling


async def wait_until(
    predicate: Callable[[], bool], *, timeout: float = 5.0, interval: float = 0.01
) -> None:
    """Return once ``predicate()`` is true; fail the test after ``timeout`` seconds."""
    # Polling is the point: the state belongs to conduit, which offers no event for it.
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(interval)


async def asyncio_until(predicate: Callable[[], T], seconds: float = 10.0) -> T:
    """``predicate()``'s value once it is true, polled from asyncio code; fail
    the test after ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        if value := predicate():
            return value
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def served(server: Server, client: Client) -> None:
    """Return once ``server`` serves ``client`` (which has connected).

    A shared-password server confirms first and welcomes right behind its hello, so
    ``connect()`` returns once the client has checked that and sent its own
    confirmation, before the server has checked it and registered the
    client: a test that looks at ``server.clients`` waits for it.
    """
    await wait_until(lambda: client.id in server.clients)


async def served_from(client_factory: ClientFactory, server: Server, source: str) -> Client:
    """A client of ``server`` whose connection comes from ``source`` (a 127.0.0.x
    address): with a shared password, each source address is an owner."""
    client = await client_factory(server, connect=False)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port, local_address=source)
    await client.connect(stream=stream)
    await served(server, client)
    return client


@contextlib.asynccontextmanager
async def competing_handshake(server: Server) -> AsyncIterator[trio.SocketStream]:
    """A socket in ``server``'s gate (admitted, sending nothing) for the body's duration.

    A handshake alone in the gate runs inline whatever the loop share says
    (:attr:`conduit._gatekeeper.Gatekeeper.alone`); with this one waiting
    beside it, the share rations its steps, as under a flood. The server
    drops it after its ``auth_timeout``: a test whose body may take long
    gives the server a longer one. Checks on the way out that the socket was
    still there (else the body did not test what it meant to).
    """
    gate = server._gate
    before = gate._pending_total
    stream = await trio.open_tcp_stream(LOOPBACK, server.port)
    try:
        await wait_until(lambda: gate._pending_total > before)
        yield stream
        assert gate._pending_total > before, "the competing socket left the gate (auth_timeout?)"
    finally:
        await stream.aclose()


def open_descriptors() -> Counter[str]:
    """What this process's descriptors point at (Linux), counted per target.

    A target is ``socket:[inode]``, a file's path, ``anon_inode:[eventpoll]``...
    Tests compare these rather than a count of descriptors: the suite shares its
    process, and the garbage collector may close another test's leftovers (an
    asyncio loop's socket pair, say) while a test is counting.
    """
    targets: Counter[str] = Counter()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            targets[os.readlink(f"/proc/self/fd/{name}")] += 1
    return targets


def opened_since(before: Counter[str]) -> Counter[str]:
    """The descriptors open now that were not open at ``before`` (an :func:`open_descriptors`)."""
    return open_descriptors() - before


# --------------------------------------------------------------------------- server / client


ServerFactory = Callable[..., Awaitable[Server]]
ClientFactory = Callable[..., Awaitable[Client]]


def server_descriptor(**fields: Any) -> ServerDescriptor:
    """A descriptor on 127.0.0.1 with an OS-picked port and the test password."""
    values: dict[str, Any] = {"host": LOOPBACK, "port": 0, "password": PASSWORD}
    values.update(fields)
    return ServerDescriptor(**values)


def client_descriptor(port: int, **fields: Any) -> ClientDescriptor:
    """A descriptor for a server on 127.0.0.1:``port`` with the test password."""
    values: dict[str, Any] = {
        "server_host": LOOPBACK,
        "server_port": port,
        "password": PASSWORD,
        "connect_timeout": 5.0,
        "rpc_timeout": 10.0,
    }
    values.update(fields)
    return ClientDescriptor(**values)


@pytest.fixture
def accounts(tmp_path: Path) -> Accounts:
    """An accounts file with one user, "alice" (:data:`ALICE_PASSWORD`); test
    modules that need other users define their own."""
    store = Accounts(tmp_path / "accounts.json", stretch=FAST_STRETCH)
    store.add("alice", ALICE_PASSWORD)
    return store


@pytest.fixture
async def tcp_server_factory(nursery: trio.Nursery) -> AsyncIterator[ServerFactory]:
    servers: list[Server] = []

    async def make(register: Callable[[Server], None] | None = None, **fields: Any) -> Server:
        server = Server(server_descriptor(**fields))
        if register is not None:
            register(server)
        port = await nursery.start(server.run)
        assert isinstance(port, int)
        servers.append(server)
        return server

    yield make
    with trio.move_on_after(10):
        for server in servers:
            await server.close()


@pytest.fixture
async def server_factory(tcp_server_factory: ServerFactory) -> ServerFactory:
    return tcp_server_factory


@pytest.fixture
async def tcp_client_factory() -> AsyncIterator[ClientFactory]:
    clients: list[Client] = []

    async def make(
        target: Server | int,
        *,
        connect: bool = True,
        register: Callable[[Client], None] | None = None,
        **fields: Any,
    ) -> Client:
        port = target if isinstance(target, int) else target.port
        client = Client(client_descriptor(port, **fields))
        if register is not None:
            register(client)
        clients.append(client)
        if connect:
            await client.connect()
            if isinstance(target, Server):
                await served(target, client)
        return client

    yield make
    with trio.move_on_after(10):
        for client in clients:
            await client.disconnect()


@pytest.fixture
async def client_factory(tcp_client_factory: ClientFactory) -> ClientFactory:
    return tcp_client_factory


# --------------------------------------------------------------------------- in memory


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections are pairs of :func:`trio.testing.memory_stream_pair`.

    :meth:`connect` makes a pair, queues the server end for :meth:`accept` and
    returns the client end; once the listener is closed it raises
    ``ConnectionRefusedError``, as connecting to a closed port does.
    """

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](float("inf"))
        self.accepted = 0

    async def connect(self) -> trio.abc.Stream:
        """Open a connection to this listener; return the client's end."""
        await trio.lowlevel.checkpoint()
        client_end, server_end = trio.testing.memory_stream_pair()
        try:
            self._send.send_nowait(server_end)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise ConnectionRefusedError("the memory listener is closed") from None
        return client_end

    async def accept(self) -> trio.abc.Stream:
        """The server end of the next :meth:`connect`."""
        try:
            stream = await self._receive.receive()
        except trio.EndOfChannel:
            raise trio.ClosedResourceError("the memory listener is closed") from None
        self.accepted += 1
        return stream

    async def aclose(self) -> None:
        """Refuse further connections; streams already accepted stay open."""
        self._send.close()
        self._receive.close()
        await trio.lowlevel.checkpoint()


class MemoryClient(Client):
    """A Client whose ``connect()`` dials a :class:`MemoryListener` instead of TCP."""

    def __init__(self, descriptor: ClientDescriptor, listener: MemoryListener) -> None:
        super().__init__(descriptor)
        self.listener = listener

    async def connect(self, *, stream: trio.abc.Stream | None = None) -> bool:
        """Connect over a new memory connection (or ``stream``)."""
        if stream is None:
            stream = await self.listener.connect()
        return await super().connect(stream=stream)


def memory_listener_of(server: Server) -> MemoryListener:
    """The listener a ``memory_server_factory`` server serves."""
    listener = getattr(server, "memory_listener", None)
    assert isinstance(listener, MemoryListener), "not a memory_server_factory server"
    return listener


@pytest.fixture
async def memory_server_factory(nursery: trio.Nursery) -> AsyncIterator[ServerFactory]:
    servers: list[Server] = []

    async def make(register: Callable[[Server], None] | None = None, **fields: Any) -> Server:
        server = Server(server_descriptor(**fields))
        if register is not None:
            register(server)
        listener = MemoryListener()
        server.memory_listener = listener  # type: ignore[attr-defined]
        await nursery.start(server.serve, [listener])
        servers.append(server)
        return server

    yield make
    with trio.move_on_after(10):
        for server in servers:
            await server.close()


@pytest.fixture
async def memory_client_factory() -> AsyncIterator[ClientFactory]:
    clients: list[Client] = []

    async def make(
        target: Server,
        *,
        connect: bool = True,
        register: Callable[[Client], None] | None = None,
        **fields: Any,
    ) -> Client:
        # The port is never dialled; it only has to be a valid one.
        client = MemoryClient(client_descriptor(1, **fields), memory_listener_of(target))
        if register is not None:
            register(client)
        clients.append(client)
        if connect:
            await client.connect()
            await served(target, client)
        return client

    yield make
    with trio.move_on_after(10):
        for client in clients:
            await client.disconnect()


# --------------------------------------------------------------------------- proxy


class Tamper(Protocol):
    """Rewrites the bytes of one direction of one proxied connection."""

    def __call__(self, chunk: bytes) -> bytes: ...


@attrs.define
class FlipByte:
    """XOR one byte of a direction, located by the wire structure.

    Skips ``clear_frames`` clear-text handshake frames, then ``records`` sealed
    records, then flips byte ``index`` of the next ``unit`` ("frame": a
    handshake frame, header included; "record": a sealed record, length prefix
    included). A negative ``index`` counts back from the end of that unit.

    The target offset becomes known as soon as the length fields before it have
    passed, which is always before the target byte itself passes, so chunks are
    forwarded at once and unchanged until then.
    """

    clear_frames: int
    records: int = 0
    unit: Literal["frame", "record"] = "record"
    index: int = 8
    mask: int = 0x01
    seen: bytearray = attrs.field(factory=bytearray)
    flipped_at: int | None = None

    def _unit_length(self, position: int, unit: Literal["frame", "record"]) -> int | None:
        data = self.seen
        if unit == "frame":
            if len(data) < position + _FRAME_HEADER.size:
                return None
            return _FRAME_HEADER.size + int(_FRAME_HEADER.unpack_from(data, position)[-1])
        if len(data) < position + _RECORD_PREFIX.size:
            return None
        return _RECORD_PREFIX.size + int(_RECORD_PREFIX.unpack_from(data, position)[0])

    def _target(self) -> int | None:
        position = 0
        skips: tuple[tuple[Literal["frame", "record"], int], ...] = (
            ("frame", self.clear_frames),
            ("record", self.records),
        )
        for unit, count in skips:
            for _ in range(count):
                length = self._unit_length(position, unit)
                if length is None:
                    return None
                position += length
        if self.index >= 0:
            return position + self.index
        length = self._unit_length(position, self.unit)
        return None if length is None else position + length + self.index

    def __call__(self, chunk: bytes) -> bytes:
        start = len(self.seen)
        self.seen += chunk
        if self.flipped_at is not None:
            return chunk
        target = self._target()
        if target is None or not start <= target < len(self.seen):
            return chunk
        self.flipped_at = target
        out = bytearray(chunk)
        out[target - start] ^= self.mask
        return bytes(out)


def split_clear_frames(data: bytes, count: int) -> list[bytes]:
    """The first ``count`` clear-text handshake frames of a recorded direction."""
    frames: list[bytes] = []
    position = 0
    for _ in range(count):
        length = _FRAME_HEADER.unpack_from(data, position)[-1]
        end = position + _FRAME_HEADER.size + length
        frames.append(data[position:end])
        position = end
    return frames


async def serve_on_loopback(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on a free port of 127.0.0.1; ``started`` with that port."""
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


async def serve_until_cancelled(
    nursery: trio.Nursery, server: Server
) -> tuple[trio.CancelScope, int]:
    """Start ``server.run()`` in ``nursery`` under a scope of its own (cancelling
    it is what Ctrl-C does to ``trio.run(server.run)``); that scope, and the
    port once the server listens."""
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await server.run()

    nursery.start_soon(run)
    return scope, await server.wait_listening()


def count_reconnects(client: Client) -> list[int]:
    """The automatic reconnect attempts of ``client``, noted as each begins."""
    attempts: list[int] = []

    @client.on_reconnecting
    def reconnecting(attempt: int, delay: float) -> None:
        attempts.append(attempt)

    return attempts


@attrs.define(eq=False)
class PassThroughStream(trio.abc.Stream):
    """Passes every operation to ``inner``: tests subclass it to watch or
    disturb one of them."""

    inner: trio.abc.Stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@attrs.define(eq=False)
class ProxiedConnection:
    """One client connection through the proxy, and the bytes it carried."""

    downstream: trio.SocketStream
    upstream: trio.SocketStream
    c2s: bytearray = attrs.field(factory=bytearray)
    s2c: bytearray = attrs.field(factory=bytearray)
    done: trio.Event = attrs.field(factory=trio.Event)


class TcpProxy:
    """A byte-recording TCP proxy on 127.0.0.1 in front of ``target_port``.

    ``tamper_factory(direction)`` may return a :class:`Tamper` per direction of
    each new connection; ``blackhole(direction)`` makes the proxy swallow that
    direction from now on (the far side hears silence, not a close); ``cut()``
    drops every connection at once.
    """

    def __init__(
        self,
        target_port: int,
        tamper_factory: Callable[[Direction], Tamper | None] | None = None,
    ) -> None:
        self.target_port = target_port
        self.tamper_factory = tamper_factory
        self.connections: list[ProxiedConnection] = []
        self.port = 0
        self._blackholed: set[Direction] = set()

    @property
    def c2s(self) -> bytes:
        """Everything clients sent, over all connections (as received by the proxy)."""
        return b"".join(bytes(c.c2s) for c in self.connections)

    @property
    def s2c(self) -> bytes:
        """Everything the server sent, over all connections."""
        return b"".join(bytes(c.s2c) for c in self.connections)

    def blackhole(self, direction: Direction) -> None:
        self._blackholed.add(direction)

    async def cut(self) -> None:
        for connection in self.connections:
            await trio.aclose_forcefully(connection.downstream)
            await trio.aclose_forcefully(connection.upstream)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(serve_on_loopback, self._handle)
            task_status.started(self.port)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(LOOPBACK, self.target_port)
        except OSError:
            await trio.aclose_forcefully(downstream)
            return
        connection = ProxiedConnection(downstream, upstream)
        self.connections.append(connection)
        factory = self.tamper_factory
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    self._pump,
                    nursery,
                    "c2s",
                    downstream,
                    upstream,
                    connection.c2s,
                    factory("c2s") if factory else None,
                )
                nursery.start_soon(
                    self._pump,
                    nursery,
                    "s2c",
                    upstream,
                    downstream,
                    connection.s2c,
                    factory("s2c") if factory else None,
                )
        finally:
            await trio.aclose_forcefully(downstream)
            await trio.aclose_forcefully(upstream)
            connection.done.set()

    async def _pump(
        self,
        nursery: trio.Nursery,
        direction: Direction,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        record: bytearray,
        tamper: Tamper | None,
    ) -> None:
        try:
            while True:
                data = await source.receive_some(65536)
                if not data:
                    break
                record += data
                if direction in self._blackholed:
                    continue
                if tamper is not None:
                    data = tamper(data)
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as gone:
            # Under Python 3.13, Trio's translation of a socket's OSError
            # (``raise ... from None`` in a context manager) leaves that OSError
            # and the frames it went through in a reference cycle, which
            # 3.11 does not; the tests that look for cycles of frames must see
            # conduit's, not this proxy's: its traceback goes.
            _drop_tracebacks_of_causes(gone)
            del gone
        # One side is gone: drop the whole connection, like a middlebox would.
        nursery.cancel_scope.cancel()


def _drop_tracebacks_of_causes(error: BaseException) -> None:
    """Forget the tracebacks of the exceptions ``error`` was raised from or during."""
    seen: set[int] = set()
    cause = error.__cause__ or error.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        cause.__traceback__ = None
        cause = cause.__cause__ or cause.__context__


ProxyFactory = Callable[..., Awaitable[TcpProxy]]


@pytest.fixture
async def proxy_factory(nursery: trio.Nursery) -> ProxyFactory:
    async def make(
        target_port: int, tamper_factory: Callable[[Direction], Tamper | None] | None = None
    ) -> TcpProxy:
        proxy = TcpProxy(target_port, tamper_factory)
        await nursery.start(proxy.run)
        return proxy

    return make
