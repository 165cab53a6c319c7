"""How a connection ends when its own side ends it: the GOODBYE goes after what
was queued before it, and a run cancelled from outside still says it.

A peer ignores whatever follows a GOODBYE, and takes an end without one, or
with one that says its sender is going away (a server shutting down), for a
lost connection (it reconnects, and waits for its transfers to resume).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from conduit import Client, ClientDescriptor, FileTransferHandler, Server, ServerDescriptor
from conftest import PassThroughStream, count_reconnects, serve_until_cancelled

PASSWORD = "graceful-ends"


def _server_with_hello(port: int = 0) -> Server:
    server = Server(ServerDescriptor(host="127.0.0.1", port=port, password=PASSWORD))

    @server.rpc
    def hello() -> str:
        return "hi"

    return server


def _client_of(port: int) -> Client:
    # Quick attempts: the restarts below take a moment each.
    return Client(
        ClientDescriptor(
            server_port=port, password=PASSWORD, reconnect_delay=0.1, reconnect_attempts=8
        )
    )


async def _listener_with_small_buffers() -> tuple[trio.SocketListener, int]:
    """A loopback listener whose sockets hold little unsent: a slow link, on
    which a download's last frames still wait in the outbox when it is served
    (loopback would otherwise take megabytes at once)."""
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 16 * 1024)
    await sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return trio.SocketListener(sock), sock.getsockname()[1]


async def _slow_reading_stream(port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 16 * 1024)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


@attrs.define(eq=False)
class _SlowReads(PassThroughStream):
    """A client's stream that, once :attr:`slow`, reads 16 KiB every 2 ms
    at most (8 MB/s): a slow link, whatever the machine's speed, on which
    the server's last frames still wait in its outbox when it has served
    them (a fast loopback reader sometimes took them all at once)."""

    slow: bool = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.slow:
            await trio.sleep(0.002)
            max_bytes = min(max_bytes or _SLOW_READ, _SLOW_READ)
        return await self.inner.receive_some(max_bytes)


_SLOW_READ = 16 * 1024


async def test_a_close_right_after_a_download_was_served_lets_its_last_frames_out(
    tmp_path: Path,
) -> None:
    """The server closes as soon as a download is served (an operator's
    shutdown racing its end), while the file's last frames still wait in the
    outbox. The GOODBYE goes after them: the client gets the whole file.
    Before, it overtook them: the download the server reported served failed
    on the client with ``connection_closed``, its partial left behind."""
    (tmp_path / "served").mkdir()
    data = os.urandom(3 * 1024 * 1024)
    (tmp_path / "served" / "big.bin").write_bytes(data)
    server = Server(ServerDescriptor(host="127.0.0.1", port=0, password=PASSWORD))
    handler = FileTransferHandler(storage_dir=tmp_path / "served")
    handler.register_server_handlers(server)
    queued_when_served: list[int] = []

    @handler.on_file_served
    async def served(client: Any, name: str, metadata: dict[str, Any]) -> None:
        (peer,) = server.clients.values()
        queued_when_served.append(peer.connection._outbox.data_bytes)
        await server.close()

    listener, port = await _listener_with_small_buffers()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, [listener])
            client = Client(ClientDescriptor(server_port=port, password=PASSWORD))
            wire = _SlowReads(await _slow_reading_stream(port))
            await client.connect(stream=wire)
            wire.slow = True
            downloads = FileTransferHandler(storage_dir=tmp_path / "client-side")
            result = await downloads.receive_from_server(client, "big.bin", tmp_path / "got")
            await client.wait_closed()
            nursery.cancel_scope.cancel()
    assert queued_when_served and queued_when_served[0] > 0  # the race this is about
    assert result["success"], result
    got = (tmp_path / "got" / "big.bin").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


async def _the_client_comes_back(stop: str, caplog: pytest.LogCaptureFixture) -> None:
    """A client of a server stopped by ``stop`` ("cancel" its run, or
    "close" it) comes back to the server started again on the same port."""
    caplog.set_level(logging.INFO, logger="conduit.client")
    first = _server_with_hello()
    with trio.fail_after(20):
        async with trio.open_nursery() as old_run:
            run_scope, port = await serve_until_cancelled(old_run, first)
            client = _client_of(port)
            back = trio.Event()
            client.on_reconnect(back.set)
            await client.connect()
            assert await client.call("hello") == "hi"
            if stop == "close":
                await first.close()
            else:
                run_scope.cancel()
        # The first server is gone; the same port serves again.
        restarted = _server_with_hello(port)
        async with trio.open_nursery() as nursery:
            await nursery.start(restarted.run)
            await back.wait()
            assert await client.call("hello") == "hi"
            await client.disconnect()
            await restarted.close()
    assert "disconnected: peer closed the connection: server shutting down" in caplog.text


async def test_a_server_run_cancelled_from_outside_says_it_is_going_away(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server's run() cancelled (what Ctrl-C does to ``trio.run(server.run)``)
    ends its connections with a GOODBYE that says the server is going away:
    a client with automatic reconnect comes back once a server listens there
    again (a restart), as netconduit's clients do. Before, the goodbye made
    every close look meant, and a restarted server's clients stayed away.
    (A server closing one connection, ``peer.close()``, is not going away:
    its client does not come back, see test_server_client.py.)"""
    await _the_client_comes_back("cancel", caplog)


async def test_a_server_closed_then_started_again_gets_its_clients_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``server.close()`` (an operator's restart) says the same as a cancelled
    run: its clients come back to the server started again on the port."""
    await _the_client_comes_back("close", caplog)


async def test_a_server_closed_for_good_lets_its_clients_go() -> None:
    """``server.close(going_away=False)``: a server retired, not restarted.
    Its clients end at once, without a minute of reconnect attempts."""
    server = _server_with_hello()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            client = _client_of(server.port)
            attempts = count_reconnects(client)
            await client.connect()
            assert await client.call("hello") == "hi"
            await server.close("retired", going_away=False)
            with trio.fail_after(5):  # not the 8 attempts _client_of would make
                await client.wait_closed()
    assert attempts == []
    assert not client.connected and not client.reconnecting


def test_an_asyncio_server_task_cancelled_says_it_is_going_away(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same under ``asyncio.run``, as the guide's users run a server (a
    Ctrl-C there cancels the task of ``server.run()``)."""
    caplog.set_level(logging.INFO, logger="conduit.client")

    async def main() -> None:
        server = _server_with_hello()
        task = asyncio.create_task(server.run())
        port = await asyncio.wait_for(server.wait_listening(), 5)
        client = _client_of(port)
        back = asyncio.Event()
        client.on_reconnect(back.set)
        await client.connect()
        assert await client.call("hello") == "hi"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        restarted = _server_with_hello(port)
        serving = asyncio.create_task(restarted.run())
        await asyncio.wait_for(back.wait(), 15)
        assert await client.call("hello") == "hi"
        await client.disconnect()
        await restarted.close()
        await serving

    asyncio.run(main())
    assert "disconnected: peer closed the connection: server shutting down" in caplog.text


def test_a_client_left_connected_as_asyncio_run_ends_leaves_no_resume_token() -> None:
    """``asyncio.run()`` returning with a client still connected: the end of
    its run says goodbye for good, as ``disconnect()`` does, so the client
    forgets its resume token and the server forgets it too (until 2026-12-08
    it kept it for the hour a lost client has to come back)."""
    server = _server_with_hello()
    listening = threading.Event()
    trio_token: list[trio.lowlevel.TrioToken] = []

    async def serve() -> None:
        trio_token.append(trio.lowlevel.current_trio_token())
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            listening.set()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    try:
        assert listening.wait(10)
        client = _client_of(server.port)

        async def main() -> str | None:
            await client.connect()
            assert await client.call("hello") == "hi"
            return client.id  # and asyncio.run ends, the client still connected

        client_id = asyncio.run(main())

        def server_side() -> tuple[bool, int]:
            return client_id in server.clients, len(server._resume_tokens)

        for _ in range(200):
            still_there, tokens = trio.from_thread.run_sync(server_side, trio_token=trio_token[0])
            if not still_there:
                break
            time.sleep(0.05)
        assert (still_there, tokens) == (False, 0)
        assert client._resume_token == b""
    finally:
        if trio_token:
            trio.from_thread.run(server.close, trio_token=trio_token[0])
        thread.join(10)
