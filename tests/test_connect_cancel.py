"""A cancelled connect() does not count against its own address.

The server reserves a password attempt when it reads a hello, and a
handshake the client leaves half-way counts as a failed guess (once the
server has confirmed first, a guesser that leaves has tested its guess). A
connect() cancelled by its caller (a Trio scope, ``asyncio.wait_for``) after
its hello went out therefore finishes its handshake alone and says goodbye,
which the server counts as a success; a later connect() of the same Client
takes that handshake over instead of starting another.

The timing is made, not waited for: a relay in front of the server holds
back the server's bytes from the moment its confirmation has come behind its
hello, until the caller's connect() has been cancelled; then it lets them
through.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import Awaitable, Callable

import attrs
import pytest
import trio
import trio.testing

import conduit.client
from conduit import Client, Peer, Server
from conduit.protocol.handshake import shared_secret
from conftest import (
    LOOPBACK,
    PASSWORD,
    ClientFactory,
    ServerFactory,
    client_descriptor,
    serve_on_loopback,
    server_descriptor,
    wait_until,
)

#: Clear-text handshake frames: a 14-byte header, the payload's length at offset 10.
_HEADER_SIZE = 14
_LENGTH = struct.Struct("!I")
_LENGTH_AT = 10

#: More cancelled connects than the server's per-address failure limit.
FAILURE_LIMIT = 2
CANCELLED_CONNECTS = FAILURE_LIMIT + 1


@pytest.fixture(autouse=True)
def _stretched() -> None:
    # The shared password's Argon2id stretch, paid once here, outside the
    # tests' deadlines (a first connect() pays it otherwise, in a thread).
    shared_secret(PASSWORD)


def _past_first_frame(data: bytes | bytearray) -> bool:
    """Whether ``data`` holds more than its first clear-text frame: the
    server's hello, and the start of what it sent behind it (its confirmation,
    when it confirms first)."""
    if len(data) < _HEADER_SIZE:
        return False
    length: int = _LENGTH.unpack_from(data, _LENGTH_AT)[0]
    return len(data) > _HEADER_SIZE + length


@attrs.define
class Sessions:
    """The sessions a server served, and those that ended with a goodbye."""

    connects: list[str] = attrs.field(factory=list)
    goodbyes: int = 0
    gone: int = 0

    def watch(self, server: Server) -> None:
        server.on_client_connect(lambda peer: self.connects.append(peer.id))
        server.on_client_disconnect(self._gone)

    def _gone(self, peer: Peer) -> None:
        self.gone += 1
        self.goodbyes += peer.connection.closed_on_purpose


@attrs.define(eq=False)
class HoldingRelay:
    """A TCP relay in front of ``target_port``: on each connection, once more
    than the server's first frame has come (or what ``holds_at`` says of the
    server's bytes so far), it holds the server's bytes, awaits
    ``on_hold()``, then lets them through and relays on."""

    target_port: int
    on_hold: Callable[[], Awaitable[None]]
    holds_at: Callable[[bytes | bytearray], bool] = _past_first_frame
    port: int = 0
    #: Connections relayed, and those over (both directions ended); the
    #: connections whose client side has ended (its socket closed).
    connections: int = 0
    ended: int = 0
    client_ends: int = 0

    async def handle(self, downstream: trio.SocketStream) -> None:
        """Relay one connection (served by :func:`conftest.serve_on_loopback`)."""
        self.connections += 1
        upstream = await trio.open_tcp_stream(LOOPBACK, self.target_port)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, downstream, upstream, False)
                nursery.start_soon(self._pipe, upstream, downstream, True)
        finally:
            await trio.aclose_forcefully(downstream)
            await trio.aclose_forcefully(upstream)
            self.ended += 1

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream, hold: bool) -> None:
        from_client = not hold
        held = bytearray()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await source.receive_some(65536):
                if hold:
                    held += data
                    if not self.holds_at(held):
                        continue
                    hold = False
                    await self.on_hold()
                    data, held = bytes(held), bytearray()
                await sink.send_all(data)
            if from_client:
                self.client_ends += 1
            if held:  # the server hung up before confirming (a refusal)
                await sink.send_all(held)
            # A half-close, as the ends did: the other direction drains.
            await sink.send_eof()


async def _start_relay(
    nursery: trio.Nursery, server: Server, on_hold: Callable[[], Awaitable[None]]
) -> HoldingRelay:
    relay = HoldingRelay(server.port, on_hold)
    relay.port = await nursery.start(serve_on_loopback, relay.handle)
    return relay


@attrs.define(eq=False)
class CancelledConnect:
    """A connect() that the relay's hold cancels: :meth:`run` makes it and
    checks it was cancelled; :meth:`cancel` (from the hold) cancels it and
    returns once it has raised."""

    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    unwound: trio.Event = attrs.Factory(trio.Event)

    async def run(self, client: Client) -> None:
        with self.scope:
            try:
                await client.connect()
            finally:
                self.unwound.set()
        assert self.scope.cancelled_caught, "connect() was not cancelled"

    async def cancel(self) -> None:
        self.scope.cancel()
        await self.unwound.wait()


@attrs.define(eq=False)
class ActingAfterCancel:
    """A Client behind a :class:`HoldingRelay` whose first connect() the hold
    cancels; then, still in the hold, ``action`` starts on the Client in the
    background and the hold waits until every task is blocked."""

    client: Client
    first: CancelledConnect
    relay: HoldingRelay
    #: Set when ``action`` returned.
    done: trio.Event
    #: Whether ``action`` had returned when the hold ended (the server's
    #: answer still held until then).
    done_in_hold: list[bool]


async def _act_after_cancel(
    nursery: trio.Nursery, server: Server, action: Callable[[Client], Awaitable[object]]
) -> ActingAfterCancel:
    first = CancelledConnect()
    done = trio.Event()
    done_in_hold: list[bool] = []
    clients: list[Client] = []

    async def act() -> None:
        await action(clients[0])
        done.set()

    async def cancel_then_act() -> None:
        await first.cancel()
        nursery.start_soon(act)
        await trio.testing.wait_all_tasks_blocked()
        done_in_hold.append(done.is_set())

    relay = await _start_relay(nursery, server, cancel_then_act)
    clients.append(Client(client_descriptor(relay.port)))
    return ActingAfterCancel(clients[0], first, relay, done, done_in_hold)


async def test_connects_cancelled_after_the_servers_confirmation_do_not_lock_the_address_out(
    server_factory: ServerFactory, nursery: trio.Nursery
) -> None:
    sessions = Sessions()
    server = await server_factory(
        register=sessions.watch, auth_failure_limit=FAILURE_LIMIT, auth_lockout=60
    )
    # The connect() under way.
    current: list[CancelledConnect] = []

    async def cancel_the_connect() -> None:
        await current[-1].cancel()

    relay = await _start_relay(nursery, server, cancel_the_connect)
    with trio.fail_after(20):
        for _ in range(CANCELLED_CONNECTS):
            client = Client(client_descriptor(relay.port))
            current.append(CancelledConnect())
            await current[-1].run(client)
            assert not client.connected
            # Its handshake ended (the next one must not queue behind it).
            await wait_until(lambda: relay.ended == relay.connections)
        # Each one finished alone and said goodbye: successes to the server.
        await wait_until(lambda: sessions.gone == CANCELLED_CONNECTS)
        assert sessions.goodbyes == CANCELLED_CONNECTS
        # The right password still gets in, straight and through the relay.
        client = Client(client_descriptor(server.port))
        await client.connect()
        assert client.connected
        await client.disconnect()


async def test_a_connect_after_a_cancelled_one_takes_its_handshake_over(
    server_factory: ServerFactory, nursery: trio.Nursery
) -> None:
    sessions = Sessions()
    server = await server_factory(register=sessions.watch)
    # The retry waits for the first handshake, still under way.
    acting = await _act_after_cancel(nursery, server, lambda client: client.connect())
    client, relay = acting.client, acting.relay
    with trio.fail_after(20):
        await acting.first.run(client)
        await acting.done.wait()
        assert client.connected
        # One handshake served both calls: the first's, finished for the retry.
        assert relay.connections == 1
        await wait_until(lambda: client.id in server.clients and len(sessions.connects) > 0)
        assert sessions.connects == [client.id]
        assert sessions.gone == 0
        await client.disconnect()


async def test_a_cancelled_reconnect_finished_alone_keeps_the_client_id_for_the_next(
    server_factory: ServerFactory, nursery: trio.Nursery
) -> None:
    """A client whose connection was lost connects again, and that connect()
    is cancelled: its handshake, finished alone, resumed the client id, and
    its GOODBYE says the client comes back (``going_away``), so the server
    keeps the new token the next connect() presents: the same id again. (A
    GOODBYE for good makes the server forget the token: the next connect()
    then got a new id.)"""
    server = await server_factory()
    pending: list[CancelledConnect] = []

    async def on_hold() -> None:
        if pending:  # the connect() to cancel, its hello out: the server answered it
            await pending.pop().cancel()

    # From the server's first bytes: a reconnect's handshake sends no more
    # before the client's next flight.
    relay = HoldingRelay(server.port, on_hold, holds_at=bool)
    relay.port = await nursery.start(serve_on_loopback, relay.handle)
    client = Client(client_descriptor(relay.port, reconnect_enabled=False))
    with trio.fail_after(30):
        await client.connect()
        first_id = client.id
        assert client._peer is not None
        client._peer.connection.abort("the link is lost")  # no goodbye: the token is kept
        await wait_until(lambda: first_id not in server.clients and relay.ended == 1)
        cancelled = CancelledConnect()
        pending.append(cancelled)
        await cancelled.run(client)
        await wait_until(lambda: relay.ended == 2)  # the handshake went on, and said goodbye
        await client.connect()
        assert client.id == first_id
        await client.disconnect()


async def test_a_disconnect_waits_for_the_handshake_going_on_alone(
    server_factory: ServerFactory, nursery: trio.Nursery
) -> None:
    """A disconnect() after a cancelled connect() returns only once that
    handshake has ended: not cut (a failed attempt to the server), finished,
    said goodbye to and closed."""
    sessions = Sessions()
    server = await server_factory(register=sessions.watch)
    acting = await _act_after_cancel(nursery, server, lambda client: client.disconnect())
    client, relay = acting.client, acting.relay
    with trio.fail_after(20):
        await acting.first.run(client)
        await acting.done.wait()
        # The server's answer was still held: the handshake could not have ended.
        assert acting.done_in_hold == [False]
        assert not client.connected
        # Its handshake finished (a success to the server) and said goodbye;
        # the disconnect() won: the session was not installed.
        await wait_until(lambda: sessions.gone == 1)
        assert sessions.goodbyes == 1
        assert relay.connections == 1
        # Its socket is closed: the relay's both directions end.
        await wait_until(lambda: relay.ended == 1)


async def test_a_disconnect_cuts_a_handshake_going_on_alone_that_does_not_end(
    server_factory: ServerFactory, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handshake of a cancelled connect() whose server never answers, with
    no connect_timeout to end it: disconnect() waits ALONE_DISCONNECT_WAIT for
    it, then cuts it and returns (before, it would have waited for ever)."""
    monkeypatch.setattr(conduit.client, "ALONE_DISCONNECT_WAIT", 0.3)
    server = await server_factory()
    first = CancelledConnect()

    async def cancel_and_hold_for_ever() -> None:
        await first.cancel()
        await trio.sleep_forever()  # the server's answer never comes through

    relay = await _start_relay(nursery, server, cancel_and_hold_for_ever)
    client = Client(client_descriptor(relay.port, connect_timeout=math.inf))
    with trio.fail_after(20):
        await first.run(client)
        started = trio.current_time()
        await client.disconnect()
        assert trio.current_time() - started >= 0.3
        assert not client.connected
        # Its socket is closed: the relay's way from the client to the server ends.
        await wait_until(lambda: relay.client_ends == 1)


def test_connects_timed_out_by_asyncio_wait_for_do_not_lock_the_address_out() -> None:
    """The reviewer's case: ``asyncio.wait_for(client.connect(), short)``
    retried with the right password; the server's answer comes only after the
    caller has given up."""

    async def main() -> None:
        server = Server(server_descriptor(auth_failure_limit=FAILURE_LIMIT, auth_lockout=60))
        sessions = Sessions()
        sessions.watch(server)
        running = asyncio.create_task(server.run())
        port = await asyncio.wait_for(server.wait_listening(), 10)
        timed_out = asyncio.Event()
        relay = _AsyncioHoldingRelay(port, timed_out.wait)
        listening = await asyncio.start_server(relay.handle, LOOPBACK, 0)
        relay_port = listening.sockets[0].getsockname()[1]
        try:
            for _ in range(CANCELLED_CONNECTS):
                timed_out.clear()
                client = Client(client_descriptor(relay_port))
                # The relay holds the server's answer until the timeout: 1 s
                # leaves a loaded machine ample time to send the hello first.
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(client.connect(), 1.0)
                timed_out.set()
                assert not client.connected
                # Its handshake ended (the next one must not queue behind it).
                await _until(lambda: relay.ended == relay.connections)
            await _until(lambda: sessions.gone >= CANCELLED_CONNECTS)
            assert sessions.goodbyes == CANCELLED_CONNECTS
            client = Client(client_descriptor(port))
            await asyncio.wait_for(client.connect(), 10)
            assert client.connected
            await asyncio.wait_for(client.disconnect(), 10)
        finally:
            listening.close()
            await asyncio.wait_for(server.close(), 10)
            await asyncio.wait_for(running, 10)

    asyncio.run(main())


async def _until(predicate: Callable[[], bool]) -> None:
    """Return once ``predicate()`` holds, within 10 s (asyncio)."""
    async with asyncio.timeout(10):
        # Polling: the relay and the server offer no event for these.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@attrs.define(eq=False)
class _AsyncioHoldingRelay:
    """:class:`HoldingRelay` on an asyncio loop (a stream server's handler)."""

    target_port: int
    on_hold: Callable[[], Awaitable[object]]
    connections: int = 0
    ended: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, hold=False),
                self._pipe(up_reader, writer, hold=True),
            )
        finally:
            writer.close()
            up_writer.close()
            self.ended += 1

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, hold: bool
    ) -> None:
        held = b""
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if hold:
                    held += data
                    if not _past_first_frame(held):
                        continue
                    hold = False
                    await self.on_hold()
                    data, held = held, b""
                sink.write(data)
                await sink.drain()
            sink.write(held)
            if sink.can_write_eof():
                sink.write_eof()


async def test_every_path_of_connect_and_wait_closed_is_a_checkpoint(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    # Trio's rule for an async API: a cancelled scope around it is honoured on
    # every path, the quick ones too (connect() when connected, wait_closed()
    # before any connect returned without one).
    server = await server_factory()
    client = await client_factory(server)
    never = Client(client_descriptor(server.port))
    for operation in (client.connect, never.wait_closed):
        with trio.CancelScope() as scope:
            scope.cancel()
            await operation()
        assert scope.cancelled_caught, operation


async def test_a_client_being_disconnected_is_not_reconnecting(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    # The body of `async with client` cancelled: its disconnect() goes on, in
    # the background; meanwhile the client says it is not coming back.
    server = await server_factory()
    client = await client_factory(server, connect=False)
    with trio.move_on_after(0.2):
        async with client:
            await trio.sleep_forever()
    assert not client.connected and not client.reconnecting
    with trio.fail_after(10):
        await client.wait_closed()
