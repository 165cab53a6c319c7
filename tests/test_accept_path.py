"""The server's accept path: its own accept loop and how connections are closed.

- an ``accept`` that fails for lack of resources (EMFILE) is retried, as
  :func:`trio.serve_listeners` does; any other failure ends serving;
- the per-connection task closes its stream, last thing, however the
  connection ended (:func:`conduit._socket_io.close_now` for plain sockets).
"""

from __future__ import annotations

import errno
import logging

import pytest
import trio
import trio.testing

from conduit import Client, Server
from conduit._socket_io import close_now
from conftest import (
    LOOPBACK,
    MemoryListener,
    ServerFactory,
    client_descriptor,
    open_descriptors,
    opened_since,
    server_descriptor,
    wait_until,
)


class _FailingListener(MemoryListener):
    """A memory listener whose first ``accept`` calls fail with ``errors``."""

    def __init__(self, *errors: int) -> None:
        super().__init__()
        self.errors = list(errors)

    async def accept(self) -> trio.abc.Stream:
        if self.errors:
            await trio.lowlevel.checkpoint()
            code = self.errors.pop(0)
            raise OSError(code, "simulated accept failure")
        return await super().accept()


async def test_an_accept_out_of_file_descriptors_is_retried(nursery: trio.Nursery) -> None:
    listener = _FailingListener(errno.EMFILE, errno.ENOBUFS)
    server = Server(server_descriptor())
    await nursery.start(server.serve, [listener])
    client = Client(client_descriptor(0))
    with trio.fail_after(10):
        await client.connect(stream=await listener.connect())
    assert client.connected and not listener.errors
    await client.disconnect()
    await server.close()


def test_accepts_failing_for_long_are_logged_within_a_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """300 accepts out of file descriptors in a row (30 s of retries, on a
    clock that jumps): five lines, then one every 10 s, each without a
    traceback (until 2026-12-07, one line and its traceback per retry: ten
    a second for as long as the descriptors ran out)."""
    caplog.set_level(logging.ERROR, logger="conduit.server")
    listener = _FailingListener(*([errno.EMFILE] * 300))

    async def main() -> None:
        server = Server(server_descriptor())
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, [listener])
            await trio.sleep(31)  # the retries' 30 s, on the jumping clock
            await server.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    lines = [r for r in caplog.records if "accept returned EMFILE" in r.getMessage()]
    assert not listener.errors and 5 <= len(lines) <= 10, len(lines)
    assert all(r.exc_info is None for r in lines)
    assert "similar lines from this source suppressed" in lines[-1].getMessage()


async def test_any_other_accept_failure_ends_serving() -> None:
    server = Server(server_descriptor())
    # The failure itself, not a group of the server's own nurseries.
    with pytest.raises(OSError, match="simulated accept failure"), trio.fail_after(10):
        await server.serve([_FailingListener(errno.EBADF)])
    assert not server.is_running


async def test_the_server_closes_a_socket_that_never_authenticates(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(auth_timeout=5.0)
    before = open_descriptors()
    for data in (b"GET / HTTP/1.0\r\n\r\n", b"CD\x01" + bytes(40), b""):
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(LOOPBACK, server.port)
            if data:
                await stream.send_all(data)
            else:
                await stream.send_eof()
            # Whatever the server answers, it then closes: end of stream.
            while await stream.receive_some(4096):
                pass
            await stream.aclose()
    await wait_until(lambda: not server._open_sockets and not opened_since(before))


async def test_the_server_closes_the_socket_of_a_client_that_left(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory()
    before = open_descriptors()
    for _ in range(3):
        client = Client(client_descriptor(server.port))
        with trio.fail_after(10):
            await client.connect()
        assert server._open_sockets == 1
        await client.disconnect()
        # Both ends are in this process: every descriptor is given back.
        try:
            await wait_until(
                lambda: not server._open_sockets and not server.clients and not opened_since(before)
            )
        except trio.TooSlowError:
            raise AssertionError(
                f"after the client left: {server._open_sockets} open sockets, clients "
                f"{list(server.clients)}, still open since: {dict(opened_since(before))}"
            ) from None


async def test_close_now_closes_plain_sockets_and_leaves_other_streams() -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        client = await trio.open_tcp_stream(LOOPBACK, port)
        server_end = await listeners[0].accept()
        blocked: list[BaseException] = []

        async def receive() -> None:
            try:
                await server_end.receive_some(10)
            except trio.ClosedResourceError as exc:
                blocked.append(exc)

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        assert close_now(server_end)
        assert server_end.socket.fileno() == -1
        with trio.fail_after(5):
            assert await client.receive_some(10) == b""  # the peer sees the close
        await trio.testing.wait_all_tasks_blocked()
        assert len(blocked) == 1  # a task waiting on it is woken, as by aclose
        assert close_now(server_end)  # twice is harmless
        await client.aclose()
    for listener in listeners:
        await listener.aclose()

    memory_end, other_end = trio.testing.memory_stream_pair()
    assert not close_now(memory_end)
    await memory_end.send_all(b"still open")
    assert await other_end.receive_some(10) == b"still open"
