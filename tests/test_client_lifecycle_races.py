"""A client's lifecycle when its own calls overlap: connect() racing connect(),
disconnect() during a connect(), what a disconnected client's transfers do,
the final progress each file reports, and a hook still running when
asyncio.run() ends.

Real loopback sockets throughout (the fixtures of conftest.py, a silent TCP
listener for a server that never answers, a :class:`CuttingProxy` for a lost
link); the asyncio cases run the guide's way, under ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from conduit import Client, ConnectionClosed, FileTransferHandler, Peer, Server, TransferProgress
from conduit.protocol.handshake import shared_secret
from conftest import (
    LOOPBACK,
    PASSWORD,
    ClientFactory,
    ServerFactory,
    client_descriptor,
    server_descriptor,
    wait_until,
)
from cutting_proxy import CuttingProxy


def connected(client: Client) -> bool:
    """``client.connected`` read afresh (a type checker must not assume it unchanged)."""
    return client.connected


def reconnecting(client: Client) -> bool:
    """``client.reconnecting`` read afresh."""
    return client.reconnecting


@attrs.define
class Sessions:
    """What a server saw: the ids it served, and the Peers that went away."""

    connects: list[str] = attrs.field(factory=list)
    gone: list[Peer] = attrs.field(factory=list)

    def watch(self, server: Server) -> None:
        """Count ``server``'s sessions from now on."""
        server.on_client_connect(lambda peer: self.connects.append(peer.id))
        server.on_client_disconnect(self.gone.append)


@pytest.fixture(autouse=True)
def _stretched() -> None:
    # The shared password's Argon2id stretch, paid once here, outside the
    # tests' deadlines (a first connect() pays it otherwise, in a thread).
    shared_secret(PASSWORD)


# ----------------------------------------------------------- connect() racing connect()


async def test_concurrent_connects_make_one_session(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    sessions = Sessions()
    server = await server_factory(register=sessions.watch)
    client = await client_factory(server, connect=False)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.connect)
            nursery.start_soon(client.connect)
        assert connected(client)
        await wait_until(lambda: client.id in server.clients)
        await client.disconnect()
        await wait_until(lambda: not server.clients and len(sessions.gone) > 0)
    # One handshake, one session, ended by the disconnect: none left behind.
    assert sessions.connects == [client.id]
    assert [peer.id for peer in sessions.gone] == [client.id]
    assert not connected(client) and not reconnecting(client)


async def test_a_connect_that_waited_for_a_failed_one_tries_itself(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    sessions = Sessions()
    server = await server_factory(register=sessions.watch)
    client = await client_factory(server, connect=False)
    # The first connect() talks to a "server" that hangs up after the hello.
    ours, theirs = trio.testing.memory_stream_pair()
    first: list[BaseException] = []

    async def connect_first() -> None:
        try:
            await client.connect(stream=ours)
        except ConnectionClosed as exc:
            first.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect_first)
            assert await theirs.receive_some()  # its hello: it is in the handshake
            nursery.start_soon(client.connect)  # waits for the first one
            await trio.testing.wait_all_tasks_blocked()
            assert not sessions.connects
            await theirs.aclose()
        assert len(first) == 1
        # The second connect() did not give up with the first: it dialled.
        assert connected(client)
        await wait_until(lambda: len(sessions.connects) > 0)
        assert sessions.connects == [client.id]


def test_the_guides_upload_run_twice_with_gather_under_asyncio(tmp_path: Path) -> None:
    sources = [tmp_path / "one.bin", tmp_path / "two.bin"]
    for path in sources:
        path.write_bytes(os.urandom(3 << 20))  # streamed, not one small call

    async def main() -> None:
        server = Server(server_descriptor())
        FileTransferHandler(tmp_path / "store").register_server_handlers(server)
        sessions = Sessions()
        sessions.watch(server)
        running = asyncio.create_task(server.run())
        port = await asyncio.wait_for(server.wait_listening(), 10)
        client = Client(client_descriptor(port))
        transfer = FileTransferHandler(tmp_path / "unused")

        async def upload_file(path: Path) -> bool:
            # The guide's function: connect, then send.
            await client.connect()
            result = await transfer.send_to_server(client, path)
            return bool(result.get("success"))

        uploads = asyncio.gather(*(upload_file(path) for path in sources))
        assert await asyncio.wait_for(uploads, 30) == [True, True]
        await asyncio.wait_for(client.disconnect(), 10)
        for _ in range(500):
            if not server.clients:
                break
            await asyncio.sleep(0.01)
        assert not server.clients, "a session was left behind on the server"
        assert sessions.connects == [client.id]
        await server.close()
        await asyncio.wait_for(running, 10)

    asyncio.run(main())


# ----------------------------------------------------------- disconnect() during connect()


async def test_disconnect_during_the_handshake_wins() -> None:
    # A "server" that accepts and never answers: connect() waits in its handshake.
    (listener,) = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listener.socket.getsockname()[1]
    client = Client(client_descriptor(port, connect_timeout=60.0))
    outcome: list[BaseException] = []

    async def connect() -> None:
        try:
            await client.connect()
        except ConnectionClosed as exc:
            outcome.append(exc)

    async with listener:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connect)
                far = await listener.accept()
                assert await far.receive_some()  # the hello: in the handshake
                await client.disconnect()
                # It has lost already, when disconnect() returns.
                assert len(outcome) == 1 and not connected(client)
            # And it closed its socket.
            while await far.receive_some():
                pass
            await far.aclose()
    assert "disconnect" in str(outcome[0])
    assert not connected(client) and not reconnecting(client)


class _HeldConfirmation(trio.abc.Stream):
    """A TCP stream that parks the client's connect() right after its
    confirmation went out (shielded: the handshake is finished, whatever
    happens meanwhile), until ``release`` is set."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.sends = 0
        self.confirmed = trio.Event()
        self.release = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        self.sends += 1
        if self.sends == 2:  # the hello, then the confirmation
            self.confirmed.set()
            with trio.CancelScope(shield=True):
                await self.release.wait()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        # After the confirmation, shielded: the WELCOME, if it came apart.
        with trio.CancelScope(shield=self.sends >= 2):
            data = await self.inner.receive_some(max_bytes)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_disconnect_after_the_handshake_closes_the_new_session(
    server_factory: ServerFactory,
) -> None:
    sessions = Sessions()
    server = await server_factory(register=sessions.watch)
    client = Client(client_descriptor(server.port))
    stream = _HeldConfirmation(await trio.open_tcp_stream(LOOPBACK, server.port))
    outcome: list[BaseException] = []

    async def connect() -> None:
        try:
            await client.connect(stream=stream)
        except ConnectionClosed as exc:
            outcome.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            await stream.confirmed.wait()
            nursery.start_soon(client.disconnect)
            await trio.testing.wait_all_tasks_blocked()
            # disconnect() came while connect() was on its way; the
            # handshake then completes: the session must not survive it.
            stream.release.set()
        assert len(outcome) == 1 and not connected(client)
        await wait_until(lambda: len(sessions.gone) == 1)
    # The server served it, then was told goodbye (not a dropped link).
    assert len(sessions.connects) == 1
    assert sessions.gone[0].connection.closed_on_purpose
    assert not server.clients
    assert not connected(client) and not reconnecting(client)


def test_disconnect_during_connect_wins_under_asyncio() -> None:
    async def main() -> None:
        with socket.socket() as silent:
            silent.bind((LOOPBACK, 0))
            silent.listen()
            silent.setblocking(False)
            client = Client(client_descriptor(silent.getsockname()[1], connect_timeout=60.0))
            connecting = asyncio.ensure_future(client.connect())
            far = None
            for _ in range(1000):  # until it has dialled
                try:
                    far, _address = silent.accept()
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            assert far is not None
            with far:
                await asyncio.wait_for(client.disconnect(), 10)
                assert not connected(client)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(connecting, 10)
                assert not connected(client) and not reconnecting(client)

    asyncio.run(main())


def test_a_hook_still_running_when_asyncio_run_ends_is_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hook_ran = []

    async def main() -> None:
        server = Server(server_descriptor())
        running = asyncio.create_task(server.run())
        port = await asyncio.wait_for(server.wait_listening(), 10)
        client = Client(client_descriptor(port))

        @client.on_connect
        async def slow_hook() -> None:
            hook_ran.append(True)
            await asyncio.sleep(30)  # still running when main() returns

        await asyncio.wait_for(client.connect(), 10)
        for _ in range(500):
            if hook_ran:
                break
            await asyncio.sleep(0.01)
        assert hook_ran
        running.cancel()

    with caplog.at_level(logging.DEBUG, logger="conduit"):
        asyncio.run(main())  # returns without disconnect(): asyncio cancels the hook
    errors = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert errors == [], [record.getMessage() for record in errors]
    assert any("was cancelled by asyncio" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("callback", ["rpc", "message", "reconnecting"])
def test_a_client_handler_still_running_when_asyncio_run_ends_is_not_an_error(
    caplog: pytest.LogCaptureFixture, callback: str
) -> None:
    started = []
    proxies: list[CuttingProxy] = []

    async def main() -> None:
        server = Server(server_descriptor())
        running = asyncio.create_task(server.run())
        port = await asyncio.wait_for(server.wait_listening(), 10)
        # A proxy that cuts the connection for the "reconnecting" case; it
        # outlives the run, so that asyncio, not a lost link, ends the handlers.
        proxy = CuttingProxy(port).__enter__()
        proxies.append(proxy)
        client = Client(client_descriptor(proxy.port))

        @client.rpc
        async def slow() -> None:
            started.append(True)
            await asyncio.sleep(30)  # still running when main() returns

        @client.on("news")
        async def news(data: object) -> None:
            started.append(True)
            await asyncio.sleep(30)

        @client.on_reconnecting
        async def reconnecting(attempt: int, delay: float) -> None:
            started.append(True)
            await asyncio.sleep(30)

        await asyncio.wait_for(client.connect(), 10)
        for _ in range(500):  # the server registers it once its side is up
            if client.id in server.clients:
                break
            await asyncio.sleep(0.01)
        assert client.id is not None
        if callback == "rpc":
            calling = asyncio.ensure_future(server.clients[client.id].call("slow"))
        elif callback == "message":
            await server.clients[client.id].send("news", 1)
        else:
            proxy.legs[0].close()
        for _ in range(500):
            if started:
                break
            await asyncio.sleep(0.01)
        assert started
        running.cancel()
        if callback == "rpc":
            calling.cancel()

    try:
        with caplog.at_level(logging.DEBUG, logger="conduit"):
            asyncio.run(main())  # returns without disconnect(): asyncio cancels the handler
    finally:
        for proxy in proxies:
            proxy.__exit__(None, None, None)
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == [], [record.getMessage() for record in errors]
    assert any("was cancelled" in record.getMessage() for record in caplog.records)


# ----------------------------------------------------------- after disconnect()


async def test_transfers_after_disconnect_raise_connection_closed(
    tmp_path: Path, server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "there.txt").write_bytes(b"x" * 100)
    server = await server_factory(
        register=lambda s: FileTransferHandler(store).register_server_handlers(s)
    )
    client = await client_factory(server)
    source = tmp_path / "up.txt"
    source.write_bytes(b"y" * 100)
    transfer = FileTransferHandler(tmp_path / "client")
    with trio.fail_after(10):
        assert (await transfer.send_to_server(client, source))["success"]
        await client.disconnect()
        # As documented: raises when not connected, as before any connect().
        with pytest.raises(ConnectionClosed):
            await transfer.send_to_server(client, source)
        with pytest.raises(ConnectionClosed):
            await transfer.receive_from_server(client, "there.txt", tmp_path / "down")
        with pytest.raises(ConnectionClosed):
            await transfer.list_files(client)
        with pytest.raises(ConnectionClosed):
            client.server  # noqa: B018
        # A new connect() makes it usable again.
        await client.connect()
        assert (await transfer.receive_from_server(client, "there.txt", tmp_path / "down"))[
            "success"
        ]


async def test_transfers_after_the_connection_ended_for_good_raise_connection_closed(
    tmp_path: Path, server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    server = await server_factory(
        register=lambda s: FileTransferHandler(tmp_path / "store").register_server_handlers(s)
    )
    client = await client_factory(server, reconnect_enabled=False)
    source = tmp_path / "up.txt"
    source.write_bytes(b"y" * 100)
    transfer = FileTransferHandler(tmp_path / "client")
    assert client.id is not None
    with trio.fail_after(10):
        await server.clients[client.id].close("closed by the test")
        await wait_until(lambda: not connected(client) and not reconnecting(client))
        # No reconnect will come: as after disconnect(), nothing to wait for.
        with pytest.raises(ConnectionClosed, match="closed by the test"):
            await transfer.send_to_server(client, source)
        with pytest.raises(ConnectionClosed):
            await transfer.receive_from_server(client, "up.txt", tmp_path / "down")


async def test_a_transfer_started_while_reconnecting_waits_for_it(
    tmp_path: Path, server_factory: ServerFactory
) -> None:
    server = await server_factory(
        register=lambda s: FileTransferHandler(tmp_path / "store").register_server_handlers(s)
    )
    source = tmp_path / "up.bin"
    source.write_bytes(os.urandom(100_000))
    with CuttingProxy(server.port) as proxy:
        client = Client(client_descriptor(proxy.port, reconnect_delay=0.05))
        lost, go = trio.Event(), trio.Event()

        @client.on_reconnecting
        async def hold(attempt: int, delay: float) -> None:
            lost.set()
            await go.wait()

        transfer = FileTransferHandler(tmp_path / "client")
        results: list[dict[str, object]] = []

        async def send() -> None:
            results.append(await transfer.send_to_server(client, source))

        with trio.fail_after(15):
            await client.connect()
            proxy.legs[0].close()
            await lost.wait()
            assert reconnecting(client)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                # Its first attempt failed on the lost session: it waits for the next.
                await wait_until(lambda: client._changed.statistics().tasks_waiting > 0)
                assert not results
                go.set()
            assert results[0]["success"] is True, results
            assert proxy.accepted == 2
            await client.disconnect()


# ----------------------------------------------------------- progress


@pytest.mark.parametrize(
    ("layout", "size"),
    [("file", 5000), ("file", 300 * 1024), ("file", 3 * 1024 * 1024), ("directory", 5000)],
    ids=["small", "one-block", "streamed", "batch"],
)
async def test_every_file_reports_its_final_progress_once(
    tmp_path: Path,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    layout: str,
    size: int,
) -> None:
    server = await server_factory(
        register=lambda s: FileTransferHandler(tmp_path / "store").register_server_handlers(s)
    )
    client = await client_factory(server)
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    names = ["a.bin"] if layout == "file" else ["a.bin", "b.bin", "c.bin"]
    for name in names:
        (outbox / name).write_bytes(b"z" * size)
    reports: list[TransferProgress] = []
    source = outbox / "a.bin" if layout == "file" else outbox
    with trio.fail_after(30):
        result = await FileTransferHandler(tmp_path / "client").send_to_server(
            client, source, on_progress=reports.append
        )
    assert result["success"] is True, result
    # The guide's example printed "100.0%100.0%": the final count is reported
    # once per file (earlier ones as the clock allows), never twice in a row.
    for name in names:
        counts = [p.transferred for p in reports if p.filename.endswith(name)]
        assert counts and counts[-1] == size and counts.count(size) == 1, (name, counts)
