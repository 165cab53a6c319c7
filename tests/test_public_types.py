"""The public API's types, as an application type-checked with ``mypy --strict`` sees them.

The hooks below are checked twice: at runtime here (they are called, with
the arguments their types promise), and by the ``typecheck`` session, which
runs ``mypy`` over this file. Each registration of a hook of the wrong shape
carries ``# type: ignore[type-var]``: with ``warn_unused_ignores`` (part of
``--strict``) an ignore that is not needed fails that session, so a hook
type that stopped rejecting such a callback is caught there.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import trio

from conduit import Client, FileTransferHandler, Peer, Server, TransferProgress
from conduit._asyncio import run_in_trio
from conftest import (
    ClientFactory,
    MemoryListener,
    ServerFactory,
    client_descriptor,
    served,
    server_descriptor,
    wait_until,
)


def register_documented_hooks(
    server: Server, client: Client, handler: FileTransferHandler, seen: list[str]
) -> None:
    """Every hook in the shapes the docs give, sync and ``async``: mypy accepts them."""

    @server.on_client_connect
    async def joined(peer: Peer) -> None:
        assert peer.address is not None  # a socket's peer: (host, port)
        host, port = peer.address
        seen.append(f"joined {host} {port > 0}")

    @server.on_client_disconnect
    def left(peer: Peer) -> None:
        seen.append("left")

    @server.on("note")
    async def note_on_server(peer: Peer, data: Any) -> None:
        seen.append(f"note {data}")

    @client.on("note")
    def note_on_client(data: Any) -> None:
        seen.append(f"client note {data}")

    @client.on_connect
    async def connected() -> None:
        seen.append("connected")

    @client.on_disconnect
    def disconnected(of: Client) -> None:
        seen.append(f"disconnected {of is client}")

    @client.on_reconnecting
    def reconnecting(attempt: int, delay: float) -> None:
        seen.append(f"reconnecting {attempt}")

    @handler.on_file_received
    async def received(peer: Peer, filepath: str, metadata: dict[str, Any]) -> None:
        seen.append(f"received {metadata['filename']}")

    @handler.on_progress
    def progress(peer: Peer, report: TransferProgress) -> None:
        seen.append(f"progress {report.percent:.0f}")

    @handler.on_file_served
    def served_file(peer: Peer, name: str, metadata: dict[str, Any]) -> None:
        seen.append(f"served {name} {metadata['success']}")


def register_hooks_of_wrong_shapes(
    server: Server, client: Client, handler: FileTransferHandler
) -> None:
    """Hooks the docs do not describe: mypy refuses each (see the module's docstring).

    Never called: registering them on real objects would only show that Python
    does not check annotations.
    """

    def progress_only(report: TransferProgress) -> None: ...

    def three_ints(a: int, b: int, c: int) -> None: ...

    def nothing() -> None: ...

    def int_and_str(a: int, b: str) -> None: ...

    def one_str(attempt: str) -> None: ...

    def data_only(data: Any) -> None: ...

    def peer_and_data(peer: Peer, data: Any) -> None: ...

    handler.on_file_received(progress_only)  # type: ignore[type-var]
    handler.on_progress(three_ints)  # type: ignore[type-var]
    handler.on_file_served(nothing)  # type: ignore[type-var]
    server.on_client_connect(int_and_str)  # type: ignore[type-var]
    client.on_connect(int_and_str)  # type: ignore[type-var]
    client.on_reconnecting(one_str)  # type: ignore[type-var]
    server.on("note")(nothing)  # type: ignore[type-var]
    server.on("note")(data_only)  # type: ignore[type-var]
    client.on("note")(peer_and_data)  # type: ignore[type-var]


async def wrong_arguments_for_run_in_trio() -> None:
    """``run_in_trio`` checks the arguments against the function (never called)."""

    async def takes_an_int(value: int) -> int:
        return value

    await run_in_trio(takes_an_int, "not an int")  # type: ignore[arg-type]


async def test_documented_hooks_are_called_as_their_types_say(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    seen: list[str] = []
    handler = FileTransferHandler(storage_dir=tmp_path / "server")
    server = await server_factory(handler.register_server_handlers)
    client = await client_factory(server, connect=False)
    register_documented_hooks(server, client, handler, seen)
    source = tmp_path / "a.txt"
    source.write_bytes(b"x" * 100)
    with trio.fail_after(10):
        await client.connect()
        await served(server, client)
        result = await handler.send_to_server(client, str(source))
        assert result["success"], result
        fetched = await handler.receive_from_server(client, "a.txt", str(tmp_path / "back"))
        assert fetched["success"], fetched
        await client.send("note", 1)
        assert client.id is not None
        await server.clients[client.id].send("note", 2)
        await wait_until(lambda: "client note 2" in seen and "note 1" in seen)
        await wait_until(lambda: any(entry.startswith("served") for entry in seen))
        await client.disconnect()
        await wait_until(lambda: "left" in seen)
    assert "joined 127.0.0.1 True" in seen
    assert "connected" in seen and "disconnected True" in seen
    assert "received a.txt" in seen and "progress 100" in seen
    assert "served a.txt True" in seen
    assert "note 1" in seen and "client note 2" in seen


async def test_a_download_already_here_has_every_key_of_one_that_moved_bytes(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    handler = FileTransferHandler(storage_dir=tmp_path / "server")
    server = await server_factory(handler.register_server_handlers)
    client = await client_factory(server)
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "a.bin").write_bytes(b"y" * 5000)
    local = tmp_path / "local"
    with trio.fail_after(10):
        moved = await handler.receive_from_server(client, "a.bin", str(local))
        kept = await handler.receive_from_server(client, "a.bin", str(local))
    assert moved["success"] and "skipped" not in moved, moved
    assert kept["success"] and kept["skipped"] and kept["reason"] == "already_there", kept
    assert set(moved) <= set(kept), set(moved) - set(kept)
    assert (kept["resumed_from"], kept["elapsed"], kept["speed"]) == (0, 0.0, 0.0)
    assert kept["path"] == moved["path"] and kept["checksum"] == moved["checksum"]


async def test_a_peer_address_is_none_over_a_stream_that_is_not_a_socket(
    nursery: trio.Nursery,
) -> None:
    """``Peer.address`` is ``tuple[str, int] | None``: None where no socket tells it."""
    seen: list[tuple[str, int] | None] = []
    server = Server(server_descriptor())

    @server.on_client_connect
    def joined(peer: Peer) -> None:
        seen.append(peer.address)

    listener = MemoryListener()
    await nursery.start(server.serve, [listener])
    client = Client(client_descriptor(1))  # the port is never dialled
    with trio.fail_after(10):
        await client.connect(stream=await listener.connect())
        await served(server, client)
        assert client.server is not None and client.server.address is None
        await client.disconnect()
        await server.close()
    assert seen == [None]


def test_run_in_trio_passes_its_arguments_on() -> None:
    async def add(a: int, b: int) -> int:
        await trio.lowlevel.checkpoint()
        return a + b

    async def main() -> int:
        return await run_in_trio(add, 2, 3)

    assert asyncio.run(main()) == 5
