"""A client's connect() returns before its connection's task has started.

The connection's system task opens its nursery two scheduling passes after
the handshake ends; connect() no longer waits for it (Connection.will_run).
Until then the connection takes calls and spawns, and a close says goodbye
and waits for the end; a connection closed before its task starts never
starts its reading, its writer, its timers or its reading role.
"""

from __future__ import annotations

import trio

from conduit import Client, Peer
from conduit._connection import Connection
from conftest import ServerFactory, client_descriptor, wait_until
from test_connection import _pair, _settings, _socket_pair


class _Spawns(trio.abc.Instrument):
    """The names of the tasks started while it is installed."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)


async def test_a_close_before_the_connections_task_starts_says_goodbye_and_waits_for_the_end() -> (
    None
):
    """Closed after will_run() and before run() has run: the GOODBYE goes out
    (the peer ends on it, as a close on purpose), close() returns once run()
    has ended the connection (socket closed), and run() started neither the
    heartbeat, the idle check, the writer nor the reading role; a task spawned
    before still started (its first lines ran), cancelled at once."""
    client_stream, server_stream = _socket_pair()
    p = _pair(
        client_stream,
        server_stream,
        client_settings=_settings(heartbeat_interval=30.0, heartbeat_timeout=60.0, idle_timeout=60),
    )
    began: list[str] = []

    async def queued() -> None:
        began.append("began")
        await trio.sleep_forever()

    spawns = _Spawns()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.server.run)
            p.client.will_run()
            p.client.spawn(queued)
            trio.lowlevel.add_instrument(spawns)
            try:
                nursery.start_soon(p.client.run)
                await p.client.close("bye")
                assert p.client.closed.is_set()
                await p.server.closed.wait()
            finally:
                trio.lowlevel.remove_instrument(spawns)
    assert p.server.close_reason == "peer closed the connection: bye"
    assert p.server.closed_on_purpose
    assert began == ["began"]
    assert p.client.stream.socket.fileno() == -1  # type: ignore[attr-defined]
    assert p.client._role is None
    never = ("_heartbeat_loop", "_idle_task", "_send_task", "run_timer")
    assert [name for name in spawns.names if name.endswith(never)] == []
    assert any(name.endswith("Connection.run") for name in spawns.names)  # it did run


async def test_connect_returns_before_the_task_and_a_disconnect_right_after_releases_everything(
    server_factory: ServerFactory,
) -> None:
    """connect() returns with its connection's task not yet started; a
    disconnect() right after says goodbye (the server ends on it, as a close on
    purpose, with the reason) and returns once the connection has ended,
    having taken no heartbeat entry and no reading-role descriptors."""
    server = await server_factory()
    ended: list[Peer] = []
    server.on_client_disconnect(ended.append)
    client = Client(client_descriptor(server.port))
    with trio.fail_after(10):
        await client.connect()
        connection = client.server.connection
        assert connection._nursery is None  # its task has not run yet
        assert client.id is not None
        await client.disconnect()
        assert connection.closed.is_set()
        # The server (which confirmed first, so connect() returned before it
        # had checked our confirmation) serves the client, then ends on its
        # GOODBYE.
        await wait_until(lambda: bool(ended))
    (peer,) = ended
    assert peer.id == client.id
    on_server = peer.connection
    assert on_server.close_reason == "peer closed the connection: client disconnected"
    assert on_server.closed_on_purpose
    assert connection.stream.socket.fileno() == -1  # type: ignore[attr-defined]
    assert connection._role is None
    assert connection._heartbeat_entry is None
    assert not connection.owned
    assert not client.connected


async def test_calls_spawns_and_hooks_right_after_connect_are_served(
    server_factory: ServerFactory,
) -> None:
    """What a caller does right after connect(), before the connection's task
    has started: a call gets its answer, a spawned task runs, and the
    on_connect hook runs even when disconnect() follows at once."""
    server = await server_factory()

    async def echo(value: int) -> int:
        return value

    server.register_rpc(echo, "echo")
    client = Client(client_descriptor(server.port))
    hooks: list[str] = []
    client.on_connect(lambda: hooks.append("connected"))
    ran = trio.Event()

    async def task() -> None:
        ran.set()

    with trio.fail_after(10):
        await client.connect()
        connection: Connection = client.server.connection
        connection.spawn(task)
        assert (await client.rpc.call("echo", value=5))["data"] == 5
        await ran.wait()
        await client.disconnect()
        assert hooks == ["connected"]
        await client.connect()
        await client.disconnect()
    assert hooks == ["connected", "connected"]
