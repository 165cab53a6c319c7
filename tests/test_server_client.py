"""Server and Client: lifecycle, RPC, messages, limits, leaks.

In this module ``server_factory`` / ``client_factory`` are the in-memory ones
(``Server.serve`` over a :class:`~conftest.MemoryListener`,
``Client.connect(stream=...)``), driven by Trio's autojump clock, so timeouts
and idle timers cost no wall-clock time and nothing waits on a scheduler.
Where the socket is the point (binding a port, closing it, a silent TCP peer,
file descriptors) the tests ask for ``tcp_server_factory`` /
``tcp_client_factory``, real loopback sockets.
"""

import asyncio
import contextlib
import enum
import functools
import logging
import socket
import sys
import threading
from typing import Any, Literal

import attrs
import pytest
import trio
import trio.testing

import conduit
from conduit import (
    Client,
    ConduitError,
    ConnectionClosed,
    HandshakeTimeout,
    LocalProtocolError,
    Peer,
    RPCError,
    RPCTimeoutError,
    Server,
    _connection,
    _heartbeats,
)
from conduit import _connection as _connection_module
from conduit._connection import _CONTROL_BACKLOG
from conduit._endpoint import HOOK_TIMEOUT
from conduit._groups import beside, collapsed
from conduit.protocol.frames import FrameKind
from conftest import (
    LOOPBACK,
    PASSWORD,
    ClientFactory,
    MemoryClient,
    MemoryListener,
    ProxyFactory,
    ServerFactory,
    client_descriptor,
    connected,
    count_reconnects,
    memory_listener_of,
    open_descriptors,
    opened_since,
    served,
    server_descriptor,
    wait_until,
)
from hostile_helpers import RawPeer, call_frame


@pytest.fixture
async def server_factory(memory_server_factory: ServerFactory) -> ServerFactory:
    return memory_server_factory


@pytest.fixture
async def client_factory(memory_client_factory: ClientFactory) -> ClientFactory:
    return memory_client_factory


@attrs.define
class Point:
    x: int
    y: int


@attrs.define
class Span:
    start: int
    end: int
    label: str = "span"


@attrs.define
class Secret:
    """A class with a private field: its alias is "secret", the map's key "_secret"."""

    _secret: int


@attrs.define
class Inbox:
    """What handlers received, with a way to wait for it that does not poll."""

    items: list[Any] = attrs.field(factory=list)
    changed: trio.Event = attrs.field(factory=trio.Event)

    def append(self, item: Any) -> None:
        self.items.append(item)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Any]:
        """Wait until ``count`` items have arrived; return them all."""
        with trio.fail_after(timeout):
            while len(self.items) < count:
                await self.changed.wait()
        return self.items


def register_basics(server: Server) -> None:
    @server.rpc
    async def add(a: int, b: int) -> int:
        return a + b

    @server.rpc
    def sync_add(a: int, b: int) -> int:
        return a + b

    @server.rpc
    async def boom() -> None:
        raise ValueError("kaboom")

    @server.rpc
    async def forbidden() -> None:
        raise RPCError("you may not", "forbidden")

    @server.rpc
    async def echo(value: Any) -> Any:
        return value


def id_of(client: Client) -> str | None:
    """The client's id now (read afresh at each call)."""
    return client.id


def running(server: Server) -> bool:
    """Whether the server is running now (read afresh at each call)."""
    return server.is_running


def _task_count() -> int:
    """Every task alive in this Trio run."""
    count = 0
    root = trio.lowlevel.current_root_task()
    assert root is not None
    todo = [root]
    while todo:
        task = todo.pop()
        count += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return count


# --------------------------------------------------------------------------- lifecycle


async def test_run_reports_bound_port(nursery: trio.Nursery) -> None:
    server = Server(server_descriptor())
    with pytest.raises(RuntimeError):
        _ = server.port
    port = await nursery.start(server.run)
    assert isinstance(port, int)
    assert port > 0
    assert server.port == port
    assert server.is_running
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    await stream.aclose()
    with trio.fail_after(5):
        await server.close()
    assert not server.is_running


async def test_client_id_is_the_key_in_server_clients(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = await server_factory()
    client = await client_factory(server, connect=False, name="alice")
    assert id_of(client) is None
    assert not connected(client)
    await client.connect()
    assert connected(client)
    assert client.id is not None
    await served(server, client)
    assert list(server.clients) == [client.id]
    peer = server.clients[client.id]
    assert isinstance(peer, Peer)
    assert peer.id == client.id
    assert peer.name == "alice"
    assert peer.connected

    other = await client_factory(server)
    assert other.id != client.id
    assert set(server.clients) == {client.id, other.id}


async def test_async_with_connects_and_disconnects(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = await server_factory(register=register_basics)
    client = await client_factory(server, connect=False)
    async with client as entered:
        assert entered is client
        assert connected(client)
        assert await client.call("add", a=2, b=3) == 5
        client_id = client.id
        assert client_id in server.clients
    assert not connected(client)
    await wait_until(lambda: client_id not in server.clients)


async def test_server_close_with_connected_clients_is_prompt(
    tcp_server_factory: ServerFactory, tcp_client_factory: ClientFactory
) -> None:
    server = await tcp_server_factory(register=register_basics)
    clients = [await tcp_client_factory(server) for _ in range(5)]
    assert len(server.clients) == 5
    with trio.fail_after(5):
        await server.close()
    assert not server.is_running
    assert server.clients == {}
    for client in clients:
        await wait_until(lambda: not client.connected)  # noqa: B023 (awaited at once)
        result = await client.rpc.call("add", a=1, b=2)
        assert result["success"] is False
        assert result["code"] == "connection_closed"
        assert isinstance(result["error"], str)
        with pytest.raises(ConnectionClosed):
            await client.call("add", a=1, b=2)
    with pytest.raises(OSError):
        await trio.open_tcp_stream(LOOPBACK, clients[0].descriptor.server_port)


async def test_cancelling_the_nursery_stops_the_server(tcp_client_factory: ClientFactory) -> None:
    server = Server(server_descriptor())
    register_basics(server)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            client = await tcp_client_factory(server)
            assert await client.call("add", a=1, b=1) == 2
            nursery.cancel_scope.cancel()
    assert not server.is_running
    await wait_until(lambda: not client.connected)
    assert server.clients == {}
    with pytest.raises(OSError):
        await trio.open_tcp_stream(LOOPBACK, port)


async def test_connect_to_a_closed_port_raises_oserror(tcp_client_factory: ClientFactory) -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    client = await tcp_client_factory(port, connect=False)
    with trio.fail_after(5), pytest.raises(OSError):
        await client.connect()
    assert not client.connected


async def test_client_dials_a_host_name_and_an_address(
    tcp_server_factory: ServerFactory, tcp_client_factory: ClientFactory
) -> None:
    # An IP address is dialled directly, a name through Trio's resolver
    # (client.open_tcp): both reach the same server.
    server = await tcp_server_factory(register=register_basics)
    by_address = await tcp_client_factory(server)
    by_name = await tcp_client_factory(server, server_host="localhost")
    assert await by_address.call("add", a=1, b=2) == 3
    assert await by_name.call("add", a=2, b=2) == 4
    assert len(server.clients) == 2


async def test_connect_timeout_when_the_server_never_answers(
    nursery: trio.Nursery, tcp_client_factory: ClientFactory
) -> None:
    accepted: list[trio.SocketStream] = []

    async def mute(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, mute, 0, host=LOOPBACK))
    port = listeners[0].socket.getsockname()[1]
    client = await tcp_client_factory(port, connect=False, connect_timeout=0.3)
    with trio.fail_after(5), pytest.raises(HandshakeTimeout) as raised:
        await client.connect()
    assert isinstance(raised.value, TimeoutError)
    assert isinstance(raised.value, ConduitError)
    assert len(accepted) == 1
    assert not client.connected


async def test_connect_timeout_over_a_mute_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    client = Client(client_descriptor(1, connect_timeout=30.0))
    with trio.fail_after(60), pytest.raises(HandshakeTimeout) as raised:
        await client.connect(stream=client_end)
    assert "the given stream" in str(raised.value)
    assert isinstance(raised.value, TimeoutError)
    assert not client.connected
    # The client closed the stream it was given: the other end sees EOF.
    with trio.fail_after(1):
        while await server_end.receive_some():
            pass


async def test_serve_takes_any_listeners_and_closes_them(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = Server(server_descriptor())
    register_basics(server)
    listener = MemoryListener()
    started = await nursery.start(server.serve, [listener])
    assert started == [listener]
    assert running(server)
    with pytest.raises(RuntimeError):
        _ = server.port  # no socket among the listeners
    client = MemoryClient(client_descriptor(1), listener)
    async with client:
        assert await client.call("add", a=20, b=22) == 42
        assert client.id in server.clients
    with trio.fail_after(5):
        await server.close()
    assert not running(server)
    with pytest.raises(ConnectionRefusedError):
        await listener.connect()


async def test_serve_a_socket_listener(
    nursery: trio.Nursery, tcp_client_factory: ClientFactory
) -> None:
    server = Server(server_descriptor())
    register_basics(server)
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    await nursery.start(server.serve, listeners)
    assert server.port == listeners[0].socket.getsockname()[1]
    client = await tcp_client_factory(server)
    assert await client.call("add", a=1, b=2) == 3
    assert client.id is not None
    address = server.clients[client.id].address
    assert address is not None and address[0] == LOOPBACK
    with trio.fail_after(5):
        await server.close()
    with pytest.raises(OSError):
        await trio.open_tcp_stream(LOOPBACK, listeners[0].socket.getsockname()[1])


async def test_memory_clients_share_one_listener(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = await server_factory(register=register_basics)
    first = await client_factory(server)
    second = await client_factory(server)
    assert memory_listener_of(server).accepted == 2
    assert {first.id, second.id} == set(server.clients)
    assert server.clients[first.id or ""].address is None  # no socket address in memory


# --------------------------------------------------------------------------- RPC results


async def test_rpc_call_result_dict_shapes(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = await server_factory(register=register_basics)
    client = await client_factory(server)

    assert await client.rpc.call("add", a=1, b=2) == {"success": True, "data": 3}
    assert await client.rpc.call("sync_add", {"a": 4}, b=5) == {"success": True, "data": 9}
    assert await client.rpc.call("echo", value=None) == {"success": True, "data": None}
    nested = {"k": [1, 2.5, "s", b"\x00\xff", {"inner": True}]}
    assert await client.rpc.call("echo", value=nested) == {"success": True, "data": nested}

    cases = {
        "not_found": ("no_such_method", {}),
        "invalid_arguments": ("add", {"a": 1}),
        "handler_error": ("boom", {}),
        "forbidden": ("forbidden", {}),
    }
    for code, (method, args) in cases.items():
        result = await client.rpc.call(method, args)
        assert set(result) == {"success", "error", "code"}, result
        assert result["success"] is False
        assert result["code"] == code
        assert isinstance(result["error"], str)
        assert result["error"]
    boom = await client.rpc.call("boom")
    assert "kaboom" in boom["error"]
    assert "no_such_method" in (await client.rpc.call("no_such_method"))["error"]
    unexpected = await client.rpc.call("add", a=1, b=2, c=3)
    assert unexpected["code"] == "invalid_arguments"
    assert "'c'" in unexpected["error"]
    wrong_type = await client.rpc.call("add", a="not a number", b=2)
    assert wrong_type["code"] == "invalid_arguments"
    assert "'a'" in wrong_type["error"]


async def test_raising_call_forms(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = await server_factory(register=register_basics)
    client = await client_factory(server)
    assert await client.call("add", a=20, b=22) == 42
    assert await client.rpc.invoke("add", a=1, b=1) == 2
    with pytest.raises(RPCError) as not_found:
        await client.call("no_such_method")
    assert not_found.value.code == "not_found"
    assert isinstance(not_found.value, ConduitError)
    with pytest.raises(RPCError) as handler:
        await client.rpc.invoke("boom")
    assert handler.value.code == "handler_error"
    assert "kaboom" in handler.value.message
    with pytest.raises(RPCError) as custom:
        await client.call("forbidden")
    assert custom.value.code == "forbidden"
    assert custom.value.message == "you may not"
    with pytest.raises(RPCError) as invalid:
        await client.rpc.invoke("add", a=1)
    assert invalid.value.code == "invalid_arguments"


async def test_rpc_timeout(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    handler_cancelled = trio.Event()

    def register(server: Server) -> None:
        register_basics(server)

        @server.rpc
        async def hang() -> None:
            try:
                await trio.sleep_forever()
            finally:
                handler_cancelled.set()

    server = await server_factory(register=register)
    client = await client_factory(server)
    with trio.fail_after(5):
        with pytest.raises(RPCTimeoutError) as raised:
            await client.call("hang", timeout=0.2)
    assert raised.value.code == "timeout"
    assert isinstance(raised.value, TimeoutError)
    assert isinstance(raised.value, RPCError)
    with trio.fail_after(5):
        result = await client.rpc.call("hang", timeout=0.2)
    assert result["success"] is False
    assert result["code"] == "timeout"
    assert isinstance(result["error"], str)
    # The server is told to stop working on an abandoned call.
    with trio.fail_after(5):
        await handler_cancelled.wait()
    # The connection is still good afterwards.
    assert await client.call("add", a=1, b=2) == 3


async def test_descriptor_rpc_timeout_is_the_default(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    def register(server: Server) -> None:
        @server.rpc
        async def hang() -> None:
            await trio.sleep_forever()

    server = await server_factory(register=register)
    client = await client_factory(server, rpc_timeout=0.2)
    with trio.fail_after(5), pytest.raises(RPCTimeoutError):
        await client.rpc.invoke("hang")


# --------------------------------------------------------------------------- argument binding


async def test_arguments_are_structured_from_annotations(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: dict[str, Any] = {}

    def register(server: Server) -> None:
        @server.rpc
        def total(numbers: list[int]) -> int:
            seen["numbers"] = numbers
            return sum(numbers)

        @server.rpc
        def shift(point: Point, dx: int) -> Point:
            seen["point"] = point
            return Point(point.x + dx, point.y)

        @server.rpc
        def length(span: Span) -> int:
            # The only data parameter is an attrs class: it takes the whole args.
            seen["span"] = span
            return span.end - span.start

        @server.rpc
        def scale(factor: int, point: Point | None = None) -> list[int]:
            return [] if point is None else [point.x * factor, point.y * factor]

    server = await server_factory(register=register)
    client = await client_factory(server)

    assert await client.call("total", numbers=[1, 2, 3]) == 6
    assert seen["numbers"] == [1, 2, 3]
    assert all(type(n) is int for n in seen["numbers"])

    assert await client.call("shift", point={"x": 1, "y": 2}, dx=10) == {"x": 11, "y": 2}
    assert seen["point"] == Point(1, 2)
    # An attrs instance passed as an argument is unstructured on the way out.
    assert await client.call("shift", point=Point(5, 6), dx=-5) == {"x": 0, "y": 6}
    assert seen["point"] == Point(5, 6)

    # Whole-args attrs parameter: from keywords, from an attrs instance, or by name.
    assert await client.call("length", start=3, end=10) == 7
    assert seen["span"] == Span(3, 10)
    assert await client.call("length", Span(1, 4, "x")) == 3
    assert seen["span"] == Span(1, 4, "x")
    assert await client.call("length", span={"start": 0, "end": 2}) == 2
    assert seen["span"] == Span(0, 2)

    assert await client.call("scale", factor=2) == []
    assert await client.call("scale", factor=2, point={"x": 1, "y": 3}) == [2, 6]

    bad_list = await client.rpc.call("total", numbers=["a", "b"])
    assert bad_list["code"] == "invalid_arguments"
    bad_attrs = await client.rpc.call("shift", point={"x": 1}, dx=1)
    assert bad_attrs["code"] == "invalid_arguments"
    assert "point" in bad_attrs["error"]


class _Colour(enum.StrEnum):
    RED = "red"
    GREEN = "green"


class _Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


async def test_enum_arguments_are_members_and_others_are_refused(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """A parameter annotated with an Enum built on ``str`` or ``int`` gets the
    member, and a value that is none is refused ``invalid_arguments``. The
    strict types of the protocol's own bodies, given to the converter of RPC
    data too, made these a plain str and int and let any value through (the
    review of that change's diff, 2026-12-07)."""
    server = await server_factory()

    @server.rpc
    async def paint(colour: _Colour, level: _Level) -> str:
        return f"{type(colour).__name__}.{colour.name} {type(level).__name__}.{level.name}"

    client = await client_factory(server)
    assert await client.call("paint", colour="red", level=2) == "_Colour.RED _Level.HIGH"
    wrongs: list[dict[str, Any]] = [{"colour": "blue", "level": 1}, {"colour": "red", "level": 99}]
    for wrong in wrongs:
        with pytest.raises(RPCError) as refused:
            await client.call("paint", wrong)
        assert refused.value.code == "invalid_arguments", refused.value


async def test_binding_cases_a_review_found(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by a review on 2026-12-07, each checked here:

    * one annotation that cannot be resolved (a type imported only under
      TYPE_CHECKING) left every annotation of the handler a string, which
      turned off the structuring and checking of all its arguments; now only
      that parameter's values pass unchecked, and a warning says so;
    * a parameter of an attrs class that takes the whole arguments, with a
      default, got an object made of {} (or a refusal) instead of its default;
    * a value outside a ``Literal`` came back ``handler_error``, logged as the
      handler's failure, instead of ``invalid_arguments``.
    """

    def register(server: Server) -> None:
        @server.rpc
        def typed(point: "Point", note: "NotImportedAtRunTime | None" = None) -> list[Any]:  # type: ignore[name-defined]  # noqa: F821
            return [type(point).__name__, note]

        @server.rpc
        def ranged(span: Span = Span(0, 5)) -> int:  # noqa: B008
            return span.end - span.start

        @server.rpc
        def pick(kind: Literal["a", "b"]) -> str:
            return kind

    with caplog.at_level(logging.WARNING, logger="conduit.rpc"):
        server = await server_factory(register=register)
    assert any(
        "'NotImportedAtRunTime | None' of parameter 'note' cannot be resolved" in r.getMessage()
        for r in caplog.records
    )
    client = await client_factory(server)
    with trio.fail_after(10):
        assert await client.call("typed", point={"x": 1, "y": 2}, note="n") == ["Point", "n"]
        refused = await client.rpc.call("typed", point="garbage")
        assert refused["code"] == "invalid_arguments", refused
        assert await client.call("ranged") == 5
        assert await client.call("ranged", start=1, end=3) == 2
        assert await client.call("pick", kind="b") == "b"
        outside = await client.rpc.call("pick", kind="c")
        assert outside["code"] == "invalid_arguments", outside
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_disconnect_hooks_share_one_time_limit_and_a_cut_is_logged(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two disconnect hooks of 0.6 x HOOK_TIMEOUT each: the second is cut off
    at HOOK_TIMEOUT, all together, and a warning says so (it left no trace
    until 2026-12-07, and the docs said each hook had the whole time)."""
    ended: list[str] = []

    def register(server: Server) -> None:
        @server.on_client_disconnect
        async def first(_peer: Peer) -> None:
            await trio.sleep(0.6 * HOOK_TIMEOUT)
            ended.append("first")

        @server.on_client_disconnect
        async def second(_peer: Peer) -> None:
            await trio.sleep(0.6 * HOOK_TIMEOUT)
            ended.append("second")

    server = await server_factory(register=register)
    client = await client_factory(server)
    with caplog.at_level(logging.WARNING, logger="conduit.server"):
        await client.disconnect()
        await trio.sleep(2 * HOOK_TIMEOUT)
    assert ended == ["first"]
    assert any("cut off" in r.getMessage() for r in caplog.records), caplog.records


async def test_every_message_handler_runs_whatever_the_one_before_did(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two handlers of one event, the first raising: the second still gets the
    message, and the failure is logged (the first failure stopped the rest
    until 2026-12-07, a review found)."""
    seen = Inbox()

    def register(server: Server) -> None:
        @server.on("chat")
        def first(_peer: Peer, _data: Any) -> None:
            raise ValueError("the first handler fails")

        @server.on("chat")
        def second(_peer: Peer, data: Any) -> None:
            seen.append(data)

    server = await server_factory(register=register)
    client = await client_factory(server)
    with trio.fail_after(10):
        await client.send("chat", 1)
        await client.send("chat", 2)
        assert await seen.wait_for(2) == [1, 2]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "handler test_every_message_handler_runs_whatever_the_one_before_did.<locals>."
        "register.<locals>.first for message 'chat' failed"
    ] * 2


async def test_unions_of_primitives_are_strict(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``str | None`` takes a str or None as it is: never a coerced 123, never a
    nested list (which cattrs' union path turned into a handler's RecursionError
    and a logged traceback per call when deep enough)."""

    def register(server: Server) -> None:
        @server.rpc
        def greet(name: str | None = None) -> str:
            return f"hello {name}"

    server = await server_factory(register=register)
    client = await client_factory(server)
    nested: Any = "leaf"
    for _ in range(200):
        nested = [nested]
    with trio.fail_after(10):
        assert await client.call("greet", name="ann") == "hello ann"
        assert await client.call("greet", name=None) == "hello None"
        for value, kind in ((123, "int"), (nested, "list")):
            refused = await client.rpc.call("greet", name=value)
            assert refused["code"] == "invalid_arguments", refused
            assert f"expected str | None, got {kind}" in refused["error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_handler_receives_the_calling_peer(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    def register(server: Server) -> None:
        @server.rpc
        async def whoami(caller: Peer) -> str:
            assert isinstance(caller, Peer)
            return caller.id

        @server.rpc
        async def greet(greeting: str, caller: Peer) -> str:
            return f"{greeting}, {caller.name}"

        @server.rpc
        async def whoami_ctx() -> str:
            return conduit.current_peer().id

        @server.rpc
        async def whoami_extra(caller: Peer, **options: Any) -> str:
            assert isinstance(caller, Peer)
            return caller.id

    server = await server_factory(register=register)
    alice = await client_factory(server, name="alice")
    bob = await client_factory(server, name="bob")
    assert await alice.call("whoami") == alice.id
    assert await bob.call("whoami") == bob.id
    assert await alice.call("whoami_ctx") == alice.id
    assert await bob.call("whoami_ctx") == bob.id
    assert await bob.call("greet", greeting="hi") == "hi, bob"
    # The Peer parameter is never taken from the wire, even by a handler
    # that takes any other argument (**options).
    for method in ("whoami", "whoami_extra"):
        spoofed = await alice.rpc.call(method, caller="mallory")
        assert spoofed["success"] is False and spoofed["code"] == "invalid_arguments", spoofed
        assert "'caller' is the calling peer" in spoofed["error"]
    assert await alice.call("whoami_extra", colour="blue") == alice.id
    assert await alice.call("whoami") == alice.id
    with pytest.raises(RuntimeError):
        conduit.current_peer()


async def test_rpc_registered_under_a_custom_name(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    def register(server: Server) -> None:
        @server.rpc(name="math.multiply")
        def multiply(a: int, b: int) -> int:
            return a * b

        server.register_rpc(lambda a, b: a - b, name="math.subtract")

    server = await server_factory(register=register)
    client = await client_factory(server)
    assert await client.call("math.multiply", a=6, b=7) == 42
    assert await client.call("math.subtract", a=6, b=7) == -1
    assert (await client.rpc.call("multiply", a=6, b=7))["code"] == "not_found"


# --------------------------------------------------------------------------- both directions


async def test_server_calls_the_client(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    def register_client(client: Client) -> None:
        @client.rpc
        async def client_add(a: int, b: int) -> int:
            return a + b

        @client.rpc(name="client.fail")
        def fail() -> None:
            raise RuntimeError("client side failure")

    server = await server_factory()
    client = await client_factory(server, register=register_client)
    assert client.id is not None
    peer = server.clients[client.id]
    assert await peer.call("client_add", a=2, b=40) == 42
    assert await peer.rpc.call("client_add", a=1, b=1) == {"success": True, "data": 2}
    failed = await peer.rpc.call("client.fail")
    assert failed["success"] is False
    assert failed["code"] == "handler_error"
    assert "client side failure" in failed["error"]
    with pytest.raises(RPCError) as missing:
        await peer.call("nope")
    assert missing.value.code == "not_found"


async def test_a_handler_that_closes_its_own_connection_ends_it(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """A "logout" method closes the connection it was called on: the close
    cannot wait for the end (which waits for the handler), so it returns once
    the goodbye is queued; the answer the handler then returns goes out ahead
    of it, and the connection ends: the server forgets the client. Before, the
    handler and the connection waited for each other for good."""
    returned = trio.Event()

    def register_server(server: Server) -> None:
        @server.rpc
        async def logout() -> str:
            await conduit.current_peer().close("logged out")
            returned.set()
            return "bye"

    server = await server_factory(register=register_server, heartbeat_interval=0)
    client = await client_factory(server)
    assert client.id is not None
    with trio.fail_after(10):
        assert await client.call("logout") == "bye"
        await returned.wait()
        await wait_until(lambda: client.id not in server.clients, timeout=10)
        await client.wait_closed()
        with pytest.raises(ConnectionClosed, match="logged out"):
            await client.call("logout")  # the end was the server's goodbye


async def test_a_handler_that_waited_before_closing_its_connection_still_answers(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """A handler that had awaited something before its close (its call runs
    off the reading path then) may await more after it: the goodbye waits for
    its answer. Before, the writer sent the goodbye as soon as it ran, and
    the caller saw ConnectionClosed."""

    def register_server(server: Server) -> None:
        @server.rpc
        async def logout() -> str:
            await trio.sleep(0.01)
            await conduit.current_peer().close("logged out")
            await trio.sleep(0.05)
            return "bye"

    server = await server_factory(register=register_server, heartbeat_interval=0)
    client = await client_factory(server)
    with trio.fail_after(10):
        assert await client.call("logout") == "bye"
        await client.wait_closed()


async def test_a_second_close_from_inside_keeps_the_goodbye(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """A handler that closes its connection twice (a clean-up path closing
    again), or two handlers that each close it: the second close waits for
    the first one's goodbye (``grace`` at most), as a close from outside
    does, and a goodbye still waiting for the first handler's answer waits
    for the second's too. Before, the second close aborted the connection:
    the goodbye queued or still to come was dropped, the callers saw a lost
    connection and the client reconnected."""

    running = 0
    all_running = trio.Event()
    closes = 0

    def register_server(server: Server) -> None:
        @server.rpc
        async def logout(times: int, together: int = 1) -> str:
            nonlocal running, closes
            running += 1
            if running == together:
                all_running.set()
            await all_running.wait()  # blocked: the goodbye waits for this answer
            for _ in range(times):
                await conduit.current_peer().close("logged out")
            closes += 1
            # The second to close answers well after the first.
            await trio.sleep(0.05 if closes == 1 else 0.3)
            return "bye"

    server = await server_factory(register=register_server, heartbeat_interval=0)
    client = await client_factory(server)
    reconnects = count_reconnects(client)
    with trio.fail_after(10):
        assert await client.call("logout", times=2) == "bye"
        await client.wait_closed()
    assert reconnects == []

    # Two handlers, both running when the first closes: the goodbye waits
    # for both answers.
    client = await client_factory(server)
    reconnects = count_reconnects(client)
    running = 0
    all_running = trio.Event()
    closes = 0
    answers: list[str] = []

    async def logout() -> None:
        answers.append(await client.call("logout", times=1, together=2))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(logout)
            nursery.start_soon(logout)
        await client.wait_closed()
    assert answers == ["bye", "bye"]
    assert reconnects == []


async def test_answers_sent_while_a_goodbye_waits_do_not_end_the_connection_without_it(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """While the goodbye of a handler's close waits for that handler's
    answer, the writer may run out of frames: another call answered
    meanwhile. It then waits for the goodbye. Before, it stopped there (the
    connection was closing and nothing was queued), so the connection ended
    without its goodbye: the closing handler's caller saw ConnectionClosed
    and the client, taking the end for a lost connection, reconnected. Seen
    as a directory upload that a server closed mid-way, then resumed in
    full on the new connection."""
    other_running = trio.Event()
    release_other = trio.Event()

    def register_server(server: Server) -> None:
        @server.rpc
        async def other() -> str:
            other_running.set()
            await release_other.wait()
            return "done"

        @server.rpc
        async def logout() -> str:
            await trio.lowlevel.checkpoint()  # blocked: the goodbye waits for this answer
            await conduit.current_peer().close("logged out")
            release_other.set()
            await trio.sleep(0.05)  # the writer sends other's answer, then has nothing
            return "bye"

    server = await server_factory(register=register_server, heartbeat_interval=0)
    client = await client_factory(server)
    reconnects = count_reconnects(client)
    answers: dict[str, str] = {}

    async def call(method: str) -> None:
        answers[method] = await client.call(method)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "other")
            await other_running.wait()
            nursery.start_soon(call, "logout")
        await client.wait_closed()
    assert answers == {"other": "done", "logout": "bye"}
    assert reconnects == []


def test_an_asyncio_handler_that_closes_its_own_connection_still_answers() -> None:
    """The same "logout" under the asyncio shim, on both sides: the ``async
    def`` handler runs in an asyncio task, its close (or disconnect) in a
    task of the guest run on its behalf. It returns at once, and the goodbye
    waits for the handler's answer. Before, the close was taken for an
    outside one: it closed at once, the handler was cancelled at its await
    and the caller saw ConnectionClosed."""
    log: list[str] = []

    async def main() -> None:
        server = Server(server_descriptor(heartbeat_interval=0))

        @server.rpc
        async def logout() -> str:
            await conduit.current_peer().close("logged out")
            log.append("server: close() returned")
            return "bye"

        serving = asyncio.create_task(server.run())
        port = await asyncio.wait_for(server.wait_listening(), 10)
        client = Client(client_descriptor(port, reconnect_enabled=False, heartbeat_interval=0))

        @client.rpc
        async def leave() -> str:
            await client.disconnect("left")
            log.append("client: disconnect() returned")
            return "bye"

        try:
            await client.connect()
            assert await asyncio.wait_for(client.call("logout"), 10) == "bye"
            await asyncio.wait_for(client.wait_closed(), 10)
            await client.connect()
            for _ in range(500):
                if server.clients:
                    break
                await asyncio.sleep(0.01)
            (peer,) = server.clients.values()
            assert await asyncio.wait_for(peer.call("leave"), 10) == "bye"
            await asyncio.wait_for(client.wait_closed(), 10)
        finally:
            await client.disconnect()
            await server.close()
            await asyncio.wait_for(serving, 10)

    asyncio.run(main())
    assert log == ["server: close() returned", "client: disconnect() returned"]


async def test_answers_already_made_go_out_before_the_goodbye(
    tcp_server_factory: ServerFactory,
) -> None:
    """Two calls in one record: the first answered at once (its RESULT queued
    with the burst's), the second a logout that closes the connection before
    returning. The GOODBYE goes after the RESULT already made, or the peer,
    which ignores what follows a GOODBYE, would see a call that succeeded fail."""

    def register_server(server: Server) -> None:
        @server.rpc
        def quick() -> int:
            return 1

        @server.rpc
        async def logout() -> None:
            await conduit.current_peer().close("logged out")

    server = await tcp_server_factory(register=register_server, heartbeat_interval=0)
    peer = await RawPeer.authenticated(server.port, PASSWORD)
    try:
        await peer.send_sealed(call_frame(1, "quick"), call_frame(3, "logout"))
        frames = await peer.expect_closed()
    finally:
        await peer.aclose()
    kinds = [(frame.kind, frame.stream_id) for frame in frames if frame.kind != FrameKind.PING]
    assert (FrameKind.RESULT, 1) in kinds, kinds
    assert kinds.index((FrameKind.RESULT, 1)) < kinds.index((FrameKind.GOODBYE, 0)), kinds


async def test_two_closes_at_once_still_say_goodbye(
    tcp_server_factory: ServerFactory,
) -> None:
    """Two closes of one connection at once (a user's close racing
    server.close(), say) while answers still wait to go out to a peer that is
    slow to read: the second waits for the first's grace, as the first does,
    and the peer gets its answers and the GOODBYE. Before, the second aborted
    at once, dropping them: the peer saw a lost connection, not a goodbye."""

    def register_server(server: Server) -> None:
        @server.rpc
        def echo(value: bytes) -> bytes:
            return value

    server = await tcp_server_factory(register=register_server, heartbeat_interval=0)
    peer = await RawPeer.authenticated(server.port, PASSWORD)
    try:
        # Answers enough to fill the socket buffers while the peer reads
        # nothing, and fewer than the backlog at which the server stops
        # reading a peer that never reads: past it the rest of the calls
        # would stay in this task's send, and the test would wait for good.
        payload = b"x" * (900 * 1024)
        calls = 8
        assert calls * len(payload) < _CONTROL_BACKLOG
        with trio.fail_after(10):
            await peer.send_sealed(
                *(call_frame(2 * n + 1, "echo", value=payload) for n in range(calls))
            )
        await trio.sleep(0.3)
        (connection,) = [p.connection for p in server.clients.values()]
        assert connection._outbox.control_queued  # the answers wait for the peer

        async def close() -> None:
            await connection.close("going away", grace=5.0)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(close)
                nursery.start_soon(close)
                await trio.sleep(0.2)
                frames = await peer.expect_closed()
    finally:
        await peer.aclose()
    kinds = [frame.kind for frame in frames]
    assert FrameKind.GOODBYE in kinds, kinds
    assert kinds.count(FrameKind.RESULT) == calls, kinds


async def test_a_client_handler_that_disconnects_its_client_ends_the_connection(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """The client's side of the same: a method the server calls disconnects;
    its answer reaches the server ahead of the goodbye."""
    returned = trio.Event()
    holder: list[Client] = []

    def register_client(client: Client) -> None:
        holder.append(client)

        @client.rpc
        async def shutdown() -> str:
            await holder[0].disconnect("told to")
            returned.set()
            return "ok"

    server = await server_factory(heartbeat_interval=0)
    client = await client_factory(server, register=register_client)
    assert client.id is not None
    peer = server.clients[client.id]
    with trio.fail_after(10):
        assert await peer.call("shutdown") == "ok"
        await returned.wait()
        await client.wait_closed()
        assert not client.connected
        await client.disconnect()  # again: a no-op, at once


async def test_callers_hear_the_end_while_a_handler_still_runs_in_a_thread(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """The server says goodbye while one of the client's handlers is in a worker
    thread (which no cancellation stops): the client's own call, waiting for its
    answer, fails with ConnectionClosed at once, not when the thread returns (its
    timeout could not end the wait either: the call timer goes with the
    connection's other tasks)."""
    in_thread, release = threading.Event(), threading.Event()
    outcome: list[BaseException] = []

    def register_server(server: Server) -> None:
        @server.rpc
        async def hang() -> None:
            await trio.sleep_forever()

    def register_client(client: Client) -> None:
        def work() -> None:  # a hash of a large file, say
            in_thread.set()
            release.wait(30)

        @client.rpc
        async def crunch() -> None:
            await trio.to_thread.run_sync(work)

    server = await server_factory(register=register_server)
    client = await client_factory(server, register=register_client)
    assert client.id is not None
    peer = server.clients[client.id]

    async def ask_the_client() -> None:
        with contextlib.suppress(ConnectionClosed):
            await peer.call("crunch")

    async def call_the_server(task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await client.call("hang", timeout=20)
        except ConnectionClosed as exc:
            outcome.append(exc)

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask_the_client)
                await trio.to_thread.run_sync(in_thread.wait, 10)
                await nursery.start(call_the_server)
                await peer.connection.close("server going away", 0.5)
                await wait_until(lambda: bool(outcome), timeout=10)
                assert not release.is_set()  # the thread still runs: the call did not wait
    finally:
        release.set()
    assert "server going away" in str(outcome[0])


async def test_handler_calls_back_into_its_caller(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    def register_server(server: Server) -> None:
        @server.rpc
        async def relay(x: int, caller: Peer) -> int:
            doubled: int = await caller.call("double", x=x)
            return doubled + 1

    def register_client(client: Client) -> None:
        @client.rpc
        async def double(x: int) -> int:
            # And back again, three levels deep.
            if x < 100:
                return 2 * x
            relayed: int = await conduit.current_peer().call("relay", x=x // 100)
            return 2 * relayed

    server = await server_factory(register=register_server)
    client = await client_factory(server, register=register_client)
    with trio.fail_after(5):
        assert await client.call("relay", x=5) == 11
        assert await client.call("relay", x=500) == 2 * 11 + 1


async def test_a_handler_whose_relay_target_left_answers_connection_closed(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """ConnectionClosed from another connection is the handler's failure, not this one's end."""
    asked = trio.Event()
    relays: dict[str, Peer] = {}

    def register_server(server: Server) -> None:
        @server.rpc
        async def relay() -> None:
            await relays["target"].call("wait_here")

        @server.rpc
        def relay_now() -> None:  # fails before its first checkpoint: the inline path
            raise ConnectionClosed("the relay target is gone")

    def register_target(client: Client) -> None:
        @client.rpc
        async def wait_here() -> None:
            asked.set()
            await trio.sleep_forever()

    server = await server_factory(register=register_server)
    caller = await client_factory(server)
    target = await client_factory(server, register=register_target)
    assert target.id is not None
    relays["target"] = server.clients[target.id]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def drop_target() -> None:
                await asked.wait()
                await target.disconnect()

            nursery.start_soon(drop_target)
            answer = await caller.rpc.call("relay")
        assert answer["success"] is False and answer["code"] == "connection_closed", answer
        with pytest.raises(RPCError) as inline:
            await caller.call("relay_now")
        assert inline.value.code == "connection_closed"
        assert "the relay target is gone" in str(inline.value)
    assert caller.connected


async def test_ordinary_large_arguments_and_messages_are_not_held_up(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """What the bounds on decoded bodies must let through: concurrent calls of
    50,000 short strings each (0.5 MB on the wire), and a message handler that
    awaits a call on its own connection while a second large message arrives."""
    strings = [f"s{n % 100}" for n in range(50_000)]
    released = trio.Event()
    acks: list[int] = []

    def register_server(server: Server) -> None:
        @server.rpc
        async def store(items: list[str]) -> int:
            await released.wait()
            return len(items)

        @server.rpc
        def ack(n: int) -> None:
            acks.append(n)

    def register_client(client: Client) -> None:
        @client.on("update")
        async def update(data: list[str]) -> None:
            await client.call("ack", n=len(data))

    server = await server_factory(register=register_server)
    client = await client_factory(server, register=register_client)
    assert client.id is not None
    with trio.fail_after(20):
        results: list[int] = []
        async with trio.open_nursery() as nursery:

            async def store_one() -> None:
                results.append(await client.call("store", items=strings))

            for _ in range(8):
                nursery.start_soon(store_one)
            peer = server.clients[client.id]
            running = peer.connection._state._large_calls  # all eight at once
            await wait_until(lambda: len(running) == 8)
            released.set()
        assert results == [50_000] * 8
        for _ in range(2):
            await peer.send("update", strings)
        await wait_until(lambda: len(acks) == 2)
    assert acks == [50_000, 50_000]


async def test_slow_handler_does_not_delay_other_calls(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    slow_started = trio.Event()

    def register(server: Server) -> None:
        @server.rpc
        async def slow() -> str:
            slow_started.set()
            await gate.wait()
            return "slow done"

        @server.rpc
        def fast(n: int) -> int:
            return n

    server = await server_factory(register=register)
    client = await client_factory(server)
    results: list[Any] = []

    async def call_slow() -> None:
        results.append(await client.call("slow"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_slow)
            await slow_started.wait()
            for n in range(5):
                assert await client.call("fast", n=n) == n
            assert results == []
            gate.set()
    assert results == ["slow done"]


# --------------------------------------------------------------------------- messages


async def test_messages_both_ways(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    to_server = Inbox()
    to_client = Inbox()

    def register_server(server: Server) -> None:
        @server.on("chat")
        async def on_chat(peer: Peer, data: Any) -> None:
            to_server.append((peer.id, data))

    def register_client(client: Client) -> None:
        @client.on("news")
        def on_news(data: Any) -> None:
            to_client.append(data)

    server = await server_factory(register=register_server)
    client = await client_factory(server, register=register_client)
    await client.send("chat", {"text": "hello"})
    await client.send("chat", [1, 2, 3])
    await client.send("unhandled", "dropped quietly")
    assert await to_server.wait_for(2) == [(client.id, {"text": "hello"}), (client.id, [1, 2, 3])]

    assert client.id is not None
    peer = server.clients[client.id]
    await peer.send("news", "first")
    await peer.send("news", {"n": 2})
    assert await to_client.wait_for(2) == ["first", {"n": 2}]
    # Unhandled messages did not break the connection.
    assert client.connected
    assert peer.connected


async def test_message_handlers_that_call_back_get_their_answers_behind_a_burst(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """A burst of 1,000 notifications whose handler asks the sender for details
    (a call on its own connection): the answers travel behind the notifications
    still queued, so the reader must take those in to reach them. It does: they
    hold far less than the queue's bytes (a bound of 64 messages, before, made
    the first handler wait for good and the connection die of a heartbeat)."""
    handled: list[int] = []

    def register_server(server: Server) -> None:
        @server.rpc
        def details(n: int) -> int:
            return n

    def register_client(client: Client) -> None:
        @client.on("news")
        async def on_news(n: int) -> None:
            await trio.sleep(0.001)  # some work first, so the burst queues up
            handled.append(await conduit.current_peer().call("details", n=n))

    server = await server_factory(register=register_server)
    client = await client_factory(server, register=register_client)
    assert client.id is not None
    peer = server.clients[client.id]
    with trio.fail_after(60):
        for n in range(1000):
            await peer.send("news", n)
        await wait_until(lambda: len(handled) == 1000, timeout=60)
    assert handled == list(range(1000))
    assert client.connected


async def test_a_message_handler_awaiting_its_own_connection_is_reported(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the queue's bytes (shrunk here to 64 small messages), a message
    handler that awaits a call on its own connection cannot get the answer: the
    reader, waiting for room in the queue, reads nothing, the answer included.
    The wait cannot be told from a slow handler, but it is logged after a few
    seconds with the way out, rather than passing in silence until a heartbeat
    timeout."""
    monkeypatch.setattr(_connection, "_MESSAGE_QUEUE_BYTES", 64 * _connection._MESSAGE_CHARGE)
    monkeypatch.setattr(_connection, "_MESSAGE_STALL_WARNING", 0.5)
    handled: list[int] = []

    def register_server(server: Server) -> None:
        @server.on("event")
        async def on_event(peer: Peer, n: int) -> None:
            handled.append(await peer.call("details", n=n))

    def register_client(client: Client) -> None:
        @client.rpc
        def details(n: int) -> int:
            return n

    server = await server_factory(register=register_server)
    client = await client_factory(server, register=register_client)
    with caplog.at_level(logging.WARNING, logger="conduit.connection"):
        for n in range(100):
            await client.send("event", n)
        await wait_until(
            lambda: any("awaits a call on its own connection" in r.message for r in caplog.records),
            timeout=30,
        )
    assert handled == list(range(len(handled))) and len(handled) < 100  # one waits for good
    await client.disconnect()


async def test_broadcast_with_exclude(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    inboxes = [Inbox(), Inbox(), Inbox()]

    def listener(inbox: Inbox) -> Any:
        def register(client: Client) -> None:
            @client.on("news")
            async def on_news(data: Any) -> None:
                inbox.append(data)

        return register

    server = await server_factory()
    clients = [await client_factory(server, register=listener(inbox)) for inbox in inboxes]
    everyone = await server.broadcast("news", "to all")
    assert everyone == 3
    for inbox in inboxes:
        assert await inbox.wait_for(1) == ["to all"]

    excluded = clients[2].id
    assert excluded is not None
    sent = await server.broadcast("news", {"only": "two"}, exclude=[excluded])
    assert sent == 2
    await inboxes[0].wait_for(2)
    await inboxes[1].wait_for(2)
    # Messages arrive in order: once "direct" is in, the broadcast would be too.
    await server.clients[excluded].send("news", "direct")
    await inboxes[2].wait_for(2)
    assert inboxes[0].items == inboxes[1].items == ["to all", {"only": "two"}]
    assert inboxes[2].items == ["to all", "direct"]


async def test_a_cancelled_send_or_broadcast_sent_nothing(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Trio's rule: Cancelled means it did not happen. A caller that retries
    a cancelled send must not deliver the message twice."""
    to_server, to_client = Inbox(), Inbox()

    def register_server(server: Server) -> None:
        @server.on("note")
        async def on_note(peer: Peer, data: Any) -> None:
            to_server.append(data)

    def register_client(client: Client) -> None:
        @client.on("note")
        async def on_note(data: Any) -> None:
            to_client.append(data)

    server = await server_factory(register=register_server)
    client = await client_factory(server, register=register_client)
    assert client.id is not None
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.send("note", "cancelled")
    with trio.CancelScope() as scope:
        scope.cancel()
        await server.clients[client.id].send("note", "cancelled")
    with trio.CancelScope() as scope:
        scope.cancel()
        await server.broadcast("note", "cancelled broadcast")
    # In order: once these are in, the cancelled ones would have been too.
    await client.send("note", "sent")
    assert await server.broadcast("note", "sent") == 1
    assert await to_server.wait_for(1) == ["sent"]
    assert await to_client.wait_for(1) == ["sent"]


async def test_connect_and_disconnect_hooks(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    events = Inbox()
    reasons: list[str | None] = []

    def register_server(server: Server) -> None:
        @server.on_client_connect
        async def connected(peer: Peer) -> None:
            events.append(("server connect", peer.id))

        @server.on_client_disconnect
        def disconnected(peer: Peer) -> None:
            events.append(("server disconnect", peer.id))
            reasons.append(peer.close_reason)

    def register_client(client: Client) -> None:
        @client.on_connect
        def connected() -> None:
            events.append(("client connect", client.id))

        @client.on_disconnect
        async def disconnected() -> None:
            events.append(("client disconnect", client.id))

    server = await server_factory(register=register_server)
    client = await client_factory(server, register=register_client)
    assert sorted(await events.wait_for(2)) == [
        ("client connect", client.id),
        ("server connect", client.id),
    ]
    await client.disconnect()
    assert sorted((await events.wait_for(4))[2:]) == [
        ("client disconnect", client.id),
        ("server disconnect", client.id),
    ]

    # The server ending the connection fires the same hooks.
    events.items.clear()
    await client.connect()
    await events.wait_for(2)
    assert client.id is not None
    await server.clients[client.id].close("tidying up")
    assert sorted((await events.wait_for(4))[2:]) == [
        ("client disconnect", client.id),
        ("server disconnect", client.id),
    ]
    assert not client.connected
    # Each hook can say why (Peer.close_reason): the client's goodbye, then ours.
    assert len(reasons) == 2 and all(reasons), reasons
    assert "tidying up" in (reasons[1] or "") and "tidying up" in (client.server.close_reason or "")


# --------------------------------------------------------------------------- limits and timers


async def test_max_connections_refuses_extra_client(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = await server_factory(
        register=register_basics, max_connections=2, max_connections_per_user=2
    )
    first = await client_factory(server)
    await client_factory(server)
    extra = await client_factory(server, connect=False)
    with trio.fail_after(5), pytest.raises(ConduitError) as refused:
        await extra.connect()
    assert "max_connections" in str(refused.value)
    assert not connected(extra)
    assert len(server.clients) == 2

    # A freed slot can be taken again (the server frees it a moment after the close).
    await first.disconnect()
    with trio.fail_after(5):
        for _ in range(100):
            try:
                await extra.connect()
                break
            except ConduitError:
                await trio.sleep(0.05)
    assert connected(extra)
    assert await extra.call("add", a=1, b=2) == 3


async def test_idle_timeout_closes_quiet_connections(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = await server_factory(
        register=register_basics, idle_timeout=0.5, heartbeat_interval=0.05
    )
    busy = await client_factory(server)
    quiet = await client_factory(server)
    # Calls every 50 ms keep one connection busy for well over the idle timeout.
    with trio.fail_after(10):
        for i in range(24):
            assert await busy.call("add", a=i, b=0) == i
            await trio.sleep(0.05)
    assert busy.connected
    with trio.fail_after(5):
        await quiet.wait_closed()
    assert quiet.id not in server.clients
    assert busy.id in server.clients


async def test_idle_timeout_without_fast_heartbeats(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """idle_timeout is honoured on its own, not only at the next heartbeat tick (15 s)."""
    server = await server_factory(idle_timeout=0.3)
    client = await client_factory(server)
    with trio.fail_after(5):
        await client.wait_closed()
    assert server.clients == {}


@pytest.mark.parametrize("silent", ["client", "server"])
async def test_heartbeat_timeout_closes_silent_peer(
    tcp_server_factory: ServerFactory,
    tcp_client_factory: ClientFactory,
    proxy_factory: ProxyFactory,
    silent: str,
) -> None:
    if silent == "client":
        # The server pings; the client answers, until the proxy swallows its answers.
        server = await tcp_server_factory(heartbeat_interval=0.05, heartbeat_timeout=0.5)
        proxy = await proxy_factory(server.port)
        client = await tcp_client_factory(proxy.port, heartbeat_interval=0)
    else:
        server = await tcp_server_factory(heartbeat_interval=0)
        proxy = await proxy_factory(server.port)
        client = await tcp_client_factory(
            proxy.port, heartbeat_interval=0.05, heartbeat_timeout=0.5
        )
    # Pings and pongs keep an otherwise silent connection alive well past the timeout.
    await trio.sleep(1.5)
    assert client.connected
    assert len(server.clients) == 1
    proxy.blackhole("c2s" if silent == "client" else "s2c")
    await wait_until(lambda: not client.connected and not server.clients, timeout=5)


async def test_clients_of_one_run_share_one_heartbeat_timer(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    # No timer task per connection: the run's timer of that interval beats them all.
    server = await server_factory(register=register_basics)
    timer = _heartbeats.shared(7.0)
    assert _heartbeats.shared(7.0) is timer
    assert _heartbeats.shared(8.0) is not timer
    first = await client_factory(server, heartbeat_interval=7.0, heartbeat_timeout=21.0)
    second = await client_factory(server, heartbeat_interval=7.0, heartbeat_timeout=21.0)
    assert await first.call("add", a=1, b=1) == await second.call("add", a=0, b=2) == 2
    assert len(timer) == 2


@attrs.define
class Gate(trio.abc.Stream):
    """A stream that can start swallowing one direction, as a dead route would."""

    inner: trio.abc.Stream
    drop_sends: bool = False
    drop_receives: bool = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.drop_sends:
            await trio.lowlevel.checkpoint()
        else:
            await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        while True:
            data = await self.inner.receive_some(max_bytes)
            if not data or not self.drop_receives:
                return data

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("silent", ["client", "server"])
async def test_heartbeat_timeout_closes_silent_peer_in_memory(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
    silent: str,
) -> None:
    """The same as over TCP above, on the autojump clock: a minute of silence costs ~1 s."""
    if silent == "client":
        server = await server_factory(heartbeat_interval=1, heartbeat_timeout=10)
        client = await client_factory(server, connect=False, heartbeat_interval=0)
    else:
        server = await server_factory(heartbeat_interval=0)
        client = await client_factory(
            server, connect=False, heartbeat_interval=1, heartbeat_timeout=10
        )
    gate = Gate(await memory_listener_of(server).connect())
    await client.connect(stream=gate)
    # Pings and pongs keep an otherwise silent connection alive well past the timeout.
    await trio.sleep(60)
    assert client.connected
    assert len(server.clients) == 1
    if silent == "client":
        gate.drop_sends = True
    else:
        gate.drop_receives = True
    with trio.fail_after(30):
        await client.wait_closed()
    await wait_until(lambda: not server.clients)


async def test_a_server_that_pings_but_reads_nothing_ends_a_call_waiting_for_it(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The link goes down from the client to the server only: the server still
    sends its PINGs (so it is not silent) and its own heartbeat is long, but
    it reads nothing, so it answers neither the client's PINGs nor its call.
    The client, waiting for that answer, ends the connection after twice its
    heartbeat timeout, and the call fails with it, long before the call's own
    timeout. Only a stream waiting for credit was judged so until 2026-12-07:
    every call timed out, the connection stayed up, and the client never
    reconnected (a review). A call that takes long on a link that works (the
    server answering PINGs meanwhile) keeps the connection."""
    server = await server_factory(
        register=register_basics, heartbeat_interval=1, heartbeat_timeout=3600
    )

    @server.rpc
    async def slow(seconds: float) -> str:
        await trio.sleep(seconds)
        return "done"

    client = await client_factory(server, connect=False, heartbeat_interval=1, heartbeat_timeout=10)
    gate = Gate(await memory_listener_of(server).connect())
    await client.connect(stream=gate)
    assert await client.call("slow", seconds=120, timeout=600) == "done"
    assert client.connected
    gate.drop_sends = True
    started = trio.current_time()
    with trio.fail_after(60), pytest.raises(ConnectionClosed):
        await client.call("add", a=1, b=1, timeout=3600)
    assert trio.current_time() - started <= 2 * 10 + 2 * 1 + 1
    with trio.fail_after(1):
        await client.wait_closed()
    reason = client.server.close_reason or ""
    assert "peer read nothing" in reason, reason


async def test_a_server_that_paused_its_reading_keeps_a_call_waiting_for_it(
    tcp_server_factory: ServerFactory,
    tcp_client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server stops reading a client whose messages fill its queue while
    a slow message handler runs (here 4 s, four times the client's heartbeat
    timeout); it sends its PINGs and its kernel takes every byte of ours. A
    call of the client's waits meanwhile: it is answered when the server reads
    again, and the connection stays. The rule above (a call waiting on a peer
    that reads nothing) ended it after twice the heartbeat timeout, the
    review of that rule's diff found: a paused peer is told from a cut one by
    the socket, whose bytes the paused one's kernel acknowledges. (The queue
    is made 1 MiB, so that what waits behind it fits the sockets' buffers: a
    send of ours stuck for the heartbeat timeout is ended by another rule.)"""
    monkeypatch.setattr(_connection_module, "_MESSAGE_QUEUE_BYTES", 1024 * 1024)
    first = trio.Event()

    def register(server: Server) -> None:
        @server.on("load")
        async def load(_peer: Peer, _data: Any) -> None:
            if not first.is_set():
                first.set()
                await trio.sleep(4)

        register_basics(server)

    server = await tcp_server_factory(
        register=register, heartbeat_interval=0.3, heartbeat_timeout=3600
    )
    client = await tcp_client_factory(server, heartbeat_interval=0.3, heartbeat_timeout=1.0)
    blob = b"x" * 400_000
    with trio.fail_after(60):
        for _ in range(3):  # the first in the handler, the third past the queue's 1 MiB
            await client.send("load", blob)
        assert await client.call("add", a=1, b=1, timeout=60) == 2
    assert client.connected


# --------------------------------------------------------------------------- leaks


async def test_no_task_or_socket_leaks_after_many_connections(
    tcp_server_factory: ServerFactory,
) -> None:
    server = await tcp_server_factory(register=register_basics)

    async def cycle(i: int) -> None:
        client = Client(client_descriptor(server.port))
        if i % 2:
            async with client:
                assert await client.call("add", a=i, b=1) == i + 1
        else:
            await client.connect()
            assert await client.call("add", a=i, b=1) == i + 1
            await client.disconnect()
        assert not client.connected

    # Warm up lazily created resources before taking the baseline.
    await cycle(0)
    await wait_until(lambda: not server.clients)
    await trio.sleep(0.1)
    before = open_descriptors()
    tasks = _task_count()

    with trio.fail_after(30):
        for i in range(40):
            await cycle(i)
        # Some at once, too.
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(cycle, i)

    await wait_until(lambda: not server.clients)
    await wait_until(lambda: not opened_since(before))
    await wait_until(lambda: _task_count() <= tasks)


# --------------------------------------------------------------------------- oversized values

TOO_BIG = 2 * 1024 * 1024  # over the default 1 MiB max_frame_size


async def test_oversized_result_fails_that_call_only(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    def register(server: Server) -> None:
        register_basics(server)

        @server.rpc
        async def huge() -> bytes:
            return b"x" * TOO_BIG

    server = await server_factory(register=register)
    client = await client_factory(server)
    bystander = await client_factory(server)
    with trio.fail_after(10):
        result = await client.rpc.call("huge")
    assert result["success"] is False
    assert result["code"] != "connection_closed", result
    # The caller's connection, the other clients and the server all carry on.
    assert server.is_running
    assert await client.call("add", a=1, b=2) == 3
    assert await bystander.call("add", a=2, b=2) == 4


async def test_oversized_arguments_fail_that_call_only(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = await server_factory(register=register_basics)
    client = await client_factory(server)
    with trio.fail_after(10), pytest.raises(ConduitError) as raised:
        await client.call("echo", value=b"x" * TOO_BIG)
    assert not isinstance(raised.value, ConnectionClosed), raised.value
    assert client.connected
    assert await client.call("add", a=1, b=2) == 3


@pytest.mark.parametrize("flavor", ["call", "invoke"])
async def test_a_call_that_cannot_be_sent_raises_before_anything_is_sent(
    server_factory: ServerFactory, client_factory: ClientFactory, flavor: str
) -> None:
    """A method name that is no str raises TypeError, an argument that cannot
    go on the wire LocalProtocolError, before anything is sent: the server
    would take either for a protocol error (it ended the connection when the
    method was an int) or never see it."""
    server = await server_factory(register=register_basics)
    client = await client_factory(server)
    send = client.rpc.call if flavor == "call" else client.rpc.invoke
    with trio.fail_after(10):
        with pytest.raises(TypeError, match="a method name is a str, not int"):
            await send(123)  # type: ignore[arg-type]
        # cattrs makes the tuple key a list, which no dict takes.
        with pytest.raises(LocalProtocolError, match="value cannot be sent"):
            await send("echo", value={(1, 2): 3})
        with pytest.raises(LocalProtocolError, match="value cannot be sent"):
            await send("echo", args={"value": {(1, 2): 3}})
        assert client.connected
        assert await client.call("add", a=1, b=2) == 3


async def test_a_message_that_cannot_be_sent_raises_as_a_call_does(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """``send`` and ``broadcast`` of data that cannot go on the wire raise
    ``LocalProtocolError`` as a call's arguments do (a bare ``TypeError``
    until 2026-12-07, a review found), and the connection lives on."""
    server = await server_factory(register=register_basics)
    client = await client_factory(server)
    with trio.fail_after(10):
        for send in (
            lambda: client.send("news", {(1, 2): 3}),
            lambda: server.broadcast("news", {(1, 2): 3}),
        ):
            with pytest.raises(LocalProtocolError, match="value cannot be sent"):
                await send()
        assert await client.call("add", a=1, b=2) == 3


async def test_oversized_message_fails_that_send_only(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = await server_factory(register=register_basics)
    client = await client_factory(server)
    assert client.id is not None
    peer = server.clients[client.id]
    with trio.fail_after(10), pytest.raises(ConduitError):
        await peer.send("news", b"x" * TOO_BIG)
    assert server.is_running
    assert client.connected
    assert await client.call("add", a=1, b=2) == 3


# ------------------------------------------------------------------- a peer that stops reading


@attrs.define(eq=False)
class StallingProxy:
    """A proxy on 127.0.0.1 in front of ``target_port`` with small socket buffers
    that stops reading what the client sends while ``reading`` is clear."""

    target_port: int
    reading: trio.Event = attrs.field(factory=trio.Event)
    port: int = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the accepted inherit it
        await listener.bind((LOOPBACK, 0))
        listener.listen()
        self.port = listener.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, [trio.SocketListener(listener)])
            task_status.started(self.port)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream(LOOPBACK, self.target_port)

        async def pump(source: trio.SocketStream, sink: trio.SocketStream, stalls: bool) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:
                    if stalls:
                        await self.reading.wait()
                    data = await source.receive_some(65536)
                    if not data:
                        return
                    await sink.send_all(data)

        async with downstream, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(pump, downstream, upstream, True)
            nursery.start_soon(pump, upstream, downstream, False)


async def test_a_call_waiting_for_socket_room_keeps_its_deadline_and_cancel_scope(
    tcp_server_factory: ServerFactory, nursery: trio.Nursery
) -> None:
    # A call whose bytes the socket cannot take at once, to a peer that has
    # stopped reading: the caller's cancel scope and the call's deadline hold.
    # (The rest of a record was sent from the caller's task, shielded, until
    # the heartbeat timeout; for ever with heartbeats off.)
    server = await tcp_server_factory(register=register_basics)
    proxy = StallingProxy(server.port)
    await nursery.start(proxy.run)
    proxy.reading.set()
    client = Client(client_descriptor(proxy.port, heartbeat_interval=0, rpc_timeout=1.0))
    stream = await trio.open_tcp_stream(LOOPBACK, proxy.port)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with trio.fail_after(10):
        await client.connect(stream=stream)
        assert await client.call("echo", value=1) == 1
        proxy.reading = trio.Event()  # the peer stops reading
        blob = bytes(1000 * 1000)  # within a frame; far more than the buffers hold
        with trio.move_on_after(0.5) as scope:
            await client.call("echo", value=blob)
        assert scope.cancelled_caught
        with pytest.raises(RPCTimeoutError):
            await client.call("echo", value=blob)
        # Nothing was cut: once the peer reads again, the calls go through.
        proxy.reading.set()
        assert await client.call("echo", value=2) == 2
    await client.disconnect()


# --------------------------------------------------------------------------- what ends a program


def test_our_nurseries_groups_come_out_as_the_one_exception_they_hold() -> None:
    def cancelled() -> trio.Cancelled:
        return trio.Cancelled._create()

    only_cancelled = BaseExceptionGroup("g", [cancelled(), BaseExceptionGroup("h", [cancelled()])])
    assert collapsed(only_cancelled) is only_cancelled  # Trio's scopes find theirs in it
    error = OSError(9, "Bad file descriptor")
    assert collapsed(BaseExceptionGroup("g", [BaseExceptionGroup("h", [error])])) is error
    interrupt = KeyboardInterrupt()
    both = BaseExceptionGroup("g", [cancelled(), error, BaseExceptionGroup("h", [interrupt])])
    assert collapsed(both) is interrupt  # Ctrl-C ends the program whatever else failed
    assert beside(both, interrupt) == [error]  # for the server to log
    several = ExceptionGroup("g", [error, ValueError("other")])
    assert collapsed(several) is several


class _FailingListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose accept raises ``error`` (after a checkpoint)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def accept(self) -> trio.abc.Stream:
        await trio.lowlevel.cancel_shielded_checkpoint()
        raise self.error

    async def aclose(self) -> None:
        await trio.lowlevel.cancel_shielded_checkpoint()


async def test_a_failure_beside_a_ctrl_c_is_logged_not_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # server.run raises the KeyboardInterrupt alone (the program ends anyway);
    # the other failure that ended it at the same time is in the log.
    server = Server(server_descriptor())
    interrupt, failure = KeyboardInterrupt(), OSError(22, "Invalid argument")
    listeners: list[trio.abc.Listener[Any]] = [
        _FailingListener(interrupt),
        _FailingListener(failure),
    ]
    with (
        caplog.at_level(logging.ERROR, logger="conduit.server"),
        pytest.raises(KeyboardInterrupt) as raised,
        trio.fail_after(10),
    ):
        await server.serve(listeners)
    assert raised.value is interrupt
    logged = [record for record in caplog.records if record.exc_info is not None]
    assert [record.exc_info[1] for record in logged if record.exc_info] == [failure]
    assert "which ends the server" in logged[0].getMessage()


async def test_a_handler_calling_sys_exit_ends_server_run_with_that_exit(
    nursery: trio.Nursery,
) -> None:
    server = Server(server_descriptor())

    @server.rpc
    async def shutdown() -> None:
        sys.exit(3)

    ended: list[BaseException] = []

    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await server.run(task_status=task_status)
        except BaseException as exc:  # what a `trio.run(server.run)` would raise
            ended.append(exc)

    await nursery.start(run)
    client = Client(client_descriptor(server.port, reconnect_enabled=False))
    with trio.fail_after(10):
        await client.connect()
        with pytest.raises(ConnectionClosed):
            await client.call("shutdown")
        await wait_until(lambda: bool(ended))
        await client.disconnect()
    # Not a group of groups of one (the server's nurseries are its own).
    assert type(ended[0]) is SystemExit and ended[0].code == 3, repr(ended[0])


@pytest.mark.parametrize("next_step", ["call", "connect"])
async def test_a_client_handler_calling_sys_exit_reaches_the_application(
    server_factory: ServerFactory, client_factory: ClientFactory, next_step: str
) -> None:
    server = await server_factory(register=register_basics)

    def quit_now(data: Any) -> None:
        sys.exit(3)

    client = await client_factory(server, register=lambda c: c.on("quit")(quit_now))
    with trio.fail_after(10):
        await server.broadcast("quit", None)
        await wait_until(lambda: not client.connected)
        # Raised in the application's own task (from a system task, it crashed
        # Trio with TrioInternalError), once.
        # (connect: an application that only connects again.)
        step = client.connect() if next_step == "connect" else client.call("echo", value=1)
        with pytest.raises(SystemExit) as exited:
            await step
        assert exited.value.code == 3
        with pytest.raises(ConnectionClosed):
            await client.call("echo", value=1)


async def test_server_run_raises_a_lone_failure_with_its_own_cause() -> None:
    class _Broken(trio.abc.Listener[trio.abc.Stream]):
        async def accept(self) -> trio.abc.Stream:
            try:
                raise OSError("the device went away")
            except OSError as exc:
                raise RuntimeError("cannot accept") from exc

        async def aclose(self) -> None:
            pass

    server = Server(server_descriptor())
    with pytest.raises(RuntimeError, match="cannot accept") as raised, trio.fail_after(10):
        await server.serve([_Broken()])
    assert isinstance(raised.value.__cause__, OSError), repr(raised.value.__cause__)


async def test_unsendable_results_are_logged_and_the_whole_args_style_refuses_extras(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by a review on 2026-12-07: a result msgpack cannot carry (an int
    past 64 bits, a plain object) was answered ``bad_result`` with no log line
    (only what cattrs refused was logged); and a handler taking one attrs
    class and the peer took ``caller=`` and unknown names among the class's
    fields, where the other style refuses them."""

    def register(server: Server) -> None:
        @server.rpc
        def huge() -> int:
            return 2**70

        @server.rpc
        def place(point: Point, caller: Peer) -> list[int]:
            return [point.x, point.y]

    server = await server_factory(register=register)
    client = await client_factory(server)
    with trio.fail_after(10), caplog.at_level(logging.ERROR):
        answer = await client.rpc.call("huge")
        assert answer["code"] == "bad_result", answer
        assert await client.call("place", x=1, y=2) == [1, 2]
        for extra in ({"caller": "me"}, {"bogus": 9}):
            refused = await client.rpc.call("place", x=1, y=2, **extra)
            assert refused["code"] == "invalid_arguments", refused
    assert any("cannot be sent" in r.getMessage() for r in caplog.records), caplog.records


async def test_the_whole_args_style_takes_a_private_fields_name(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The converter reads the map by the fields' names ("_secret"), and so
    does the check of unexpected arguments (it used their aliases, and
    refused every call of such a handler, the second review found); a
    result larger than the frames the peer announced is answered
    ``bad_result`` without a log line (the peer's own doing: logged, it was
    a line per call that the peer could make)."""

    def register(server: Server) -> None:
        @server.rpc
        def reveal(secret: Secret) -> int:
            return secret._secret

        @server.rpc
        def blob() -> bytes:
            return b"x" * 100_000

    server = await server_factory(register=register)
    client = await client_factory(server, max_frame_size=16 * 1024)
    with trio.fail_after(10), caplog.at_level(logging.WARNING):
        assert await client.call("reveal", _secret=7) == 7
        refused = await client.rpc.call("reveal", secret=7)
        assert refused["code"] == "invalid_arguments", refused
        for _ in range(3):
            too_large = await client.rpc.call("blob")
            assert too_large["code"] == "bad_result", too_large
    assert not [r for r in caplog.records if "cannot be sent" in r.getMessage()]
