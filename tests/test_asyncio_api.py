"""Every public coroutine method of every public class, driven under ``asyncio.run``.

The list of methods is found by introspection; each needs an entry in
``DRIVERS``, so a method added later without a driver (and so, probably,
without a bridge) fails here. Each driver awaits the method from asyncio code
and checks what it returned.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import sniffio
import trio

import conduit
from conduit import (
    Client,
    ClientDescriptor,
    FileTransferHandler,
    Peer,
    RPCError,
    RPCProxy,
    Server,
    ServerDescriptor,
    asyncio_callback,
    is_asyncio_hosted,
    run_in_trio,
    trio_callback,
)
from conftest import asyncio_until, connected


def public_async_methods() -> set[tuple[str, str]]:
    """(class name, method name) for every coroutine method of every public class."""
    found = set()
    for name in conduit.__all__:
        obj = getattr(conduit, name)
        if not inspect.isclass(obj) or issubclass(obj, BaseException):
            continue
        for attr, value in inspect.getmembers(obj):
            public = not attr.startswith("_") or attr in ("__aenter__", "__aexit__")
            if public and inspect.iscoroutinefunction(value):
                found.add((name, attr))
    return found


def public_async_functions() -> set[str]:
    """Every coroutine function among the package's public names."""
    return {name for name in conduit.__all__ if inspect.iscoroutinefunction(getattr(conduit, name))}


@attrs.define
class World:
    """Everything the drivers need, built under asyncio."""

    tmp: Path
    server: Server
    client: Client
    server_transfer: FileTransferHandler
    client_transfer: FileTransferHandler
    events: list[Any] = attrs.field(factory=list)

    @property
    def peer(self) -> Peer:
        assert self.client.id is not None
        return self.server.clients[self.client.id]


Driver = Callable[[World], Awaitable[None]]


async def _client_connect(w: World) -> None:
    await w.client.disconnect()
    assert not connected(w.client)
    # The drivers check what each method returned: True here, as declared
    # (netconduit's code tests it).
    assert await w.client.connect() is True
    assert connected(w.client)
    # Over a stream the caller opened (in the loop's Trio guest run).
    stream = await run_in_trio(trio.open_tcp_stream, "127.0.0.1", w.server.port)
    other = Client(ClientDescriptor(server_port=1, password="pw"))
    assert await other.connect(stream=stream) is True
    assert await other.call("add", a=3, b=4) == 7
    await other.disconnect()


async def _client_call(w: World) -> None:
    assert await w.client.call("add", a=1, b=2) == 3
    with pytest.raises(RPCError):
        await w.client.call("missing")


async def _client_send(w: World) -> None:
    await w.client.send("note", "from client")
    await asyncio_until(lambda: "from client" in w.events)


async def _client_aenter_aexit(w: World) -> None:
    other = Client(ClientDescriptor(server_port=w.server.port, password="pw"))
    async with other as entered:
        assert entered is other
        assert await other.call("add", a=2, b=2) == 4
    assert not other.connected


async def _client_wait_closed(w: World) -> None:
    other = Client(ClientDescriptor(server_port=w.server.port, password="pw"))
    await other.connect()
    assert other.id is not None
    await _served(w, other)
    await w.server.clients[other.id].close("bye")
    await asyncio.wait_for(other.wait_closed(), 5)
    assert not other.connected


async def _client_close(w: World) -> None:
    other = Client(ClientDescriptor(server_port=w.server.port, password="pw"))
    await other.connect()
    await other.close()
    assert not other.connected


async def _client_disconnect(w: World) -> None:
    await _client_close(w)  # close is disconnect; both are driven
    other = Client(ClientDescriptor(server_port=w.server.port, password="pw"))
    await other.connect()
    await other.disconnect()
    assert not other.connected


async def _proxy_call(w: World) -> None:
    assert await w.client.rpc.call("add", a=1, b=1) == {"success": True, "data": 2}


async def _proxy_invoke(w: World) -> None:
    assert await w.client.rpc.invoke("add", {"a": 5, "b": 5}) == 10


async def _peer_call(w: World) -> None:
    assert await w.peer.call("double", x=21) == 42


async def _peer_send(w: World) -> None:
    await w.peer.send("news", "from server")
    await asyncio_until(lambda: "from server" in w.events)


async def _peer_close(w: World) -> None:
    other = Client(ClientDescriptor(server_port=w.server.port, password="pw"))
    await other.connect()
    assert other.id is not None
    await _served(w, other)
    await w.server.clients[other.id].close()
    await asyncio.wait_for(other.wait_closed(), 5)


async def _server_broadcast(w: World) -> None:
    assert await w.server.broadcast("news", "to everyone") >= 1
    await asyncio_until(lambda: "to everyone" in w.events)


async def _server_run(w: World) -> None:
    # run() is what the fixture started under asyncio; also start a second one.
    other = Server(ServerDescriptor(host="127.0.0.1", port=0, password="pw"))
    task = asyncio.create_task(other.run())
    await asyncio_until(lambda: other.is_running)
    await other.close()
    await asyncio.wait_for(task, 5)
    assert task.result() is None


async def _server_serve(w: World) -> None:
    other = Server(ServerDescriptor(password="pw"))

    @other.rpc
    def where() -> str:
        return "served"

    listeners = await run_in_trio(functools.partial(trio.open_tcp_listeners, 0, host="127.0.0.1"))
    task = asyncio.create_task(other.serve(listeners))
    await asyncio_until(lambda: other.is_running)
    client = Client(ClientDescriptor(server_port=other.port, password="pw"))
    async with client:
        assert await client.call("where") == "served"
    await other.close()
    await asyncio.wait_for(task, 5)
    assert task.result() is None


async def _server_close(w: World) -> None:
    await _server_run(w)  # drives close() too


async def _server_wait_listening(w: World) -> None:
    assert await w.server.wait_listening() == w.server.port
    other = Server(ServerDescriptor(host="127.0.0.1", port=0, password="pw"))
    task = asyncio.create_task(other.run())
    port = await asyncio.wait_for(other.wait_listening(), 5)
    assert port == other.port
    await other.close()
    await asyncio.wait_for(task, 5)


async def _server_stop(w: World) -> None:
    other = Server(ServerDescriptor(host="127.0.0.1", port=0, password="pw"))
    task = asyncio.create_task(other.run())
    await asyncio_until(lambda: other.is_running)
    await other.stop()
    await asyncio.wait_for(task, 5)


async def _send_to_server(w: World) -> None:
    source = w.tmp / "up.bin"
    source.write_bytes(os.urandom(100_000))
    result = await w.client_transfer.send_to_server(w.client, source)
    assert result["success"] is True
    assert (w.server_transfer.storage_dir / "up.bin").read_bytes() == source.read_bytes()


async def _send_files_to_server(w: World) -> None:
    small, large = w.tmp / "batch-small.txt", w.tmp / "batch-large.bin"
    small.write_bytes(b"small")
    large.write_bytes(os.urandom(300_000))
    results = await w.client_transfer.send_files_to_server(
        w.client, [small, (large, "sub/large.bin"), w.tmp / "missing.txt"]
    )
    assert [result["success"] for result in results] == [True, True, False]
    storage = w.server_transfer.storage_dir
    assert (storage / "batch-small.txt").read_bytes() == b"small"
    assert (storage / "sub" / "large.bin").read_bytes() == large.read_bytes()


async def _send_to_client(w: World) -> None:
    source = w.tmp / "push.bin"
    source.write_bytes(os.urandom(50_000))
    assert w.client.id is not None
    result = await w.server_transfer.send_to_client(w.server, w.client.id, source)
    assert result["success"] is True
    assert (w.client_transfer.storage_dir / "push.bin").read_bytes() == source.read_bytes()


async def _receive_from_server(w: World) -> None:
    (w.server_transfer.storage_dir / "down.bin").write_bytes(b"x" * 70_000)
    result = await w.client_transfer.receive_from_server(w.client, "down.bin", w.tmp / "dl")
    assert result["success"] is True
    assert (w.tmp / "dl" / "down.bin").read_bytes() == b"x" * 70_000


async def _receive_files_from_server(w: World) -> None:
    storage = w.server_transfer.storage_dir
    (storage / "many").mkdir(exist_ok=True)
    (storage / "many" / "a.txt").write_bytes(b"a")
    (storage / "many" / "b.bin").write_bytes(b"b" * 300_000)
    results = await w.client_transfer.receive_files_from_server(
        w.client, ["many/a.txt", "many/b.bin", "many/missing.txt"], w.tmp / "several"
    )
    assert [result["success"] for result in results] == [True, True, False]
    assert (w.tmp / "several" / "many" / "b.bin").read_bytes() == b"b" * 300_000


async def _list_files(w: World) -> None:
    (w.server_transfer.storage_dir / "listed.txt").write_bytes(b"hi")
    names = {entry["name"] for entry in await w.client_transfer.list_files(w.client)}
    assert "listed.txt" in names


async def _list_all_files(w: World) -> None:
    (w.server_transfer.storage_dir / "all-listed.txt").write_bytes(b"hi")
    listing = await w.client_transfer.list_all_files(w.client)
    assert "all-listed.txt" in {entry["name"] for entry in listing}
    assert listing.truncated is False


async def _delete(w: World) -> None:
    (w.server_transfer.storage_dir / "doomed.txt").write_bytes(b"bye")
    result = await w.client_transfer.delete(w.client, "doomed.txt")
    assert result == {"success": True, "path": "doomed.txt"}
    assert not (w.server_transfer.storage_dir / "doomed.txt").exists()


async def _rename(w: World) -> None:
    (w.server_transfer.storage_dir / "old.txt").write_bytes(b"moved")
    result = await w.client_transfer.rename(w.client, "old.txt", "sub/new.txt")
    assert result == {"success": True, "old": "old.txt", "path": "sub/new.txt"}
    assert (w.server_transfer.storage_dir / "sub" / "new.txt").read_bytes() == b"moved"


DRIVERS: dict[tuple[str, str], Driver] = {
    ("Client", "connect"): _client_connect,
    ("Client", "disconnect"): _client_disconnect,
    ("Client", "close"): _client_close,
    ("Client", "call"): _client_call,
    ("Client", "send"): _client_send,
    ("Client", "wait_closed"): _client_wait_closed,
    ("Client", "__aenter__"): _client_aenter_aexit,
    ("Client", "__aexit__"): _client_aenter_aexit,
    ("RPCProxy", "call"): _proxy_call,
    ("RPCProxy", "invoke"): _proxy_invoke,
    ("Peer", "call"): _peer_call,
    ("Peer", "send"): _peer_send,
    ("Peer", "close"): _peer_close,
    ("Server", "run"): _server_run,
    ("Server", "serve"): _server_serve,
    ("Server", "close"): _server_close,
    ("Server", "stop"): _server_stop,
    ("Server", "wait_listening"): _server_wait_listening,
    ("Server", "broadcast"): _server_broadcast,
    ("FileTransferHandler", "send_to_server"): _send_to_server,
    ("FileTransferHandler", "send_files_to_server"): _send_files_to_server,
    ("FileTransferHandler", "send_to_client"): _send_to_client,
    ("FileTransferHandler", "receive_from_server"): _receive_from_server,
    ("FileTransferHandler", "receive_files_from_server"): _receive_files_from_server,
    ("FileTransferHandler", "list_files"): _list_files,
    ("FileTransferHandler", "list_all_files"): _list_all_files,
    ("FileTransferHandler", "delete"): _delete,
    ("FileTransferHandler", "rename"): _rename,
}


async def _served(w: World, client: Client) -> None:
    """Until the server serves ``client`` (connect() returns before: the
    server confirms first, see conftest.served)."""
    await asyncio_until(lambda: client.id in w.server.clients)


def test_every_public_coroutine_method_has_a_driver() -> None:
    assert public_async_methods() == set(DRIVERS)
    assert RPCProxy.__name__ in conduit.__all__


def test_every_public_coroutine_function_is_driven() -> None:
    # run_in_trio is the one; test_public_callback_helpers_under_asyncio drives it.
    assert public_async_functions() == {"run_in_trio"}


def test_public_callback_helpers_under_asyncio() -> None:
    """The documented helpers, from ``conduit``: marked handlers run where they asked."""
    seen: dict[str, Any] = {}

    async def main() -> None:
        server = Server(ServerDescriptor(host="127.0.0.1", port=0, password="pw"))

        @server.rpc
        @trio_callback
        async def in_trio() -> str:
            seen["trio_hosted"] = is_asyncio_hosted()
            await trio.lowlevel.checkpoint()
            return sniffio.current_async_library()

        @server.rpc
        @asyncio_callback
        def in_asyncio() -> bool:
            return asyncio.current_task() is not None

        task = asyncio.create_task(server.run())
        await asyncio.wait_for(server.wait_listening(), 5)
        client = Client(ClientDescriptor(server_port=server.port, password="pw"))
        async with client:
            assert await client.call("in_trio") == "trio"
            assert await client.call("in_asyncio") is True
        seen["asyncio_side_hosted"] = is_asyncio_hosted()  # asyncio code: not Trio
        # What the bridge returned: trio.sleep's None.
        assert await run_in_trio(trio.sleep, 0) is None  # type: ignore[func-returns-value]
        await server.close()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert seen == {"trio_hosted": True, "asyncio_side_hosted": False}
    with pytest.raises(conduit.CallbackCancelledError):
        raise conduit.CallbackCancelledError("importable from conduit, a ConduitError")
    assert issubclass(conduit.CallbackCancelledError, conduit.ConduitError)


async def _world(tmp: Path) -> tuple[World, asyncio.Task[None]]:
    server = Server(ServerDescriptor(host="127.0.0.1", port=0, password="pw"))
    events: list[Any] = []

    @server.rpc
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0)  # an asyncio handler, on the asyncio loop
        return a + b

    @server.on("note")
    async def note(_client: Peer, data: Any) -> None:
        events.append(data)

    task = asyncio.create_task(server.run())
    await asyncio_until(lambda: server.is_running)
    client = Client(
        ClientDescriptor(server_host="127.0.0.1", server_port=server.port, password="pw")
    )

    @client.rpc
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    @client.on("news")
    def news(data: Any) -> None:
        events.append(data)

    server_transfer = FileTransferHandler(storage_dir=tmp / "server")
    server_transfer.register_server_handlers(server)
    client_transfer = FileTransferHandler(storage_dir=tmp / "client")
    client_transfer.register_client_handlers(client)
    await client.connect()
    (tmp / "server").mkdir(exist_ok=True)
    world = World(tmp, server, client, server_transfer, client_transfer, events)
    await _served(world, client)
    return world, task


@pytest.mark.parametrize("method", sorted(DRIVERS), ids=lambda m: f"{m[0]}.{m[1]}")
def test_method_works_under_asyncio(method: tuple[str, str], tmp_path: Path) -> None:
    async def main() -> None:
        world, server_task = await _world(tmp_path)
        try:
            await asyncio.wait_for(DRIVERS[method](world), 30)
        finally:
            await world.client.disconnect()
            await world.server.close()
            await asyncio.wait_for(server_task, 10)

    asyncio.run(main())
