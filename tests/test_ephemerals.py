"""Work taken off a connect's critical path: the server's random pairs made
ahead (:class:`conduit.protocol.pake.Ephemerals`) and a dial that does not park.

The stock's rules (each pair once, never across a fork, an empty stock makes
one on the spot), the server's machine taking its pair from it, the server
refilling it while its client works (real loopback), and
:func:`conduit.client.open_tcp` on its paths (connected within the
``connect`` call, refused, and waiting for a connection that completes or is
cancelled).
"""

from __future__ import annotations

import os
import socket

import pytest
import trio

from conduit import Client, Server
from conduit.client import open_tcp
from conduit.protocol import DEFAULT_MAX_FRAME_SIZE, ServerHandshake, pake
from conduit.protocol.codec import decode_body
from conduit.protocol.handshake import shared_secret
from conduit.protocol.messages import ServerHello
from conftest import (
    LOOPBACK,
    PASSWORD,
    ServerFactory,
    client_descriptor,
    open_descriptors,
    opened_since,
    served,
)
from test_handshake import WINDOW, _account_client, _client, _Directory, _frames

# --------------------------------------------------------------------------- the stock


def test_an_empty_stock_makes_a_pair_on_the_spot() -> None:
    stock = pake.Ephemerals()
    x, x_p = stock.take()
    assert x_p == pake.base_mul(x)
    assert len(stock) == 0


def test_refill_stops_at_capacity_and_each_pair_is_taken_once() -> None:
    stock = pake.Ephemerals(capacity=2)
    assert stock.refill() is True
    assert stock.refill() is True
    assert stock.refill() is False
    assert len(stock) == 2
    pairs = [stock.take(), stock.take()]
    assert len(stock) == 0
    for x, x_p in pairs:
        assert x_p == pake.base_mul(x)
    assert pairs[0] != pairs[1]
    third = stock.take()  # empty again: a new one, not a stocked one again
    assert third not in pairs


def test_a_stock_holds_at_least_one_pair() -> None:
    with pytest.raises(ValueError, match="at least one"):
        pake.Ephemerals(capacity=0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_uses_its_parents_pairs() -> None:
    stock = pake.Ephemerals(capacity=1)
    stock.refill()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it takes, then leave at once
        try:
            os.close(read_end)
            x, _ = stock.take()
            os.write(write_end, x + len(stock).to_bytes(1, "big"))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as reader:
            reported = reader.read()
    finally:
        os.waitpid(pid, 0)
    child_x, child_left = reported[:32], reported[32]
    parent_x, _ = stock.take()  # the parent still has its own pair
    assert child_x != parent_x
    assert child_left == 0


# --------------------------------------------------------------------------- the machines


def _server(stock: pake.Ephemerals | None, accounts: _Directory | None = None) -> ServerHandshake:
    """A server machine (the shared password, or ``accounts``) taking its pairs from ``stock``."""
    return ServerHandshake(
        PASSWORD if accounts is None else None,
        name="s",
        max_frame_size=DEFAULT_MAX_FRAME_SIZE,
        receive_window=WINDOW,
        accounts=accounts,
        ephemerals=stock,
    )


def test_the_shared_password_server_takes_its_pair_from_its_stock() -> None:
    stock = pake.Ephemerals(capacity=1)
    stock.refill()
    (_, y_p) = stock._stock[0]
    client, server = _client(PASSWORD), _server(stock)
    (hello,) = _frames(client.start())
    server_hello, confirm = _frames(server.receive(hello) + server.confirm_first())
    assert len(stock) == 0
    secret = shared_secret(PASSWORD)
    assert decode_body(server_hello, ServerHello).pake == pake.point_add(y_p, secret.w_n)
    (client_confirm,) = _frames(client.receive(server_hello))
    assert client.receive(confirm) == b""
    assert server.receive(client_confirm) == b""
    assert client.keys is not None and server.keys is not None
    assert client.keys.send_key == server.keys.receive_key
    assert client.keys.receive_key == server.keys.send_key


def test_the_accounts_server_takes_its_pair_from_its_stock() -> None:
    server_stock = pake.Ephemerals(capacity=1)
    server_stock.refill()
    (_, y_p) = server_stock._stock[0]
    directory = _Directory(alice="alice's password")
    server = _server(server_stock, accounts=directory)
    client = _account_client()
    (hello,) = _frames(client.start())
    (server_hello,) = _frames(server.receive(hello))
    record = directory("alice")
    share = decode_body(server_hello, ServerHello).pake
    assert share == pake.point_add(y_p, record.verifier.w0_n)
    assert len(server_stock) == 0
    (client_confirm,) = _frames(client.receive(server_hello))
    server_confirm = server.receive(client_confirm)
    (confirm,) = _frames(server_confirm)
    assert client.receive(confirm) == b""
    assert server.username == "alice"


def test_without_a_stock_the_server_makes_its_own_pair() -> None:
    client, server = _client(PASSWORD), _server(None)
    (hello,) = _frames(client.start())
    server_hello, confirm = _frames(server.receive(hello) + server.confirm_first())
    (client_confirm,) = _frames(client.receive(server_hello))
    client.receive(confirm)
    server.receive(client_confirm)
    assert client.keys is not None and server.keys is not None


# --------------------------------------------------------------------------- over loopback


async def test_the_server_refills_its_stock_while_its_client_works(
    tcp_server_factory: ServerFactory,
) -> None:
    server = await tcp_server_factory()
    stock = server._gate.ephemerals
    assert len(stock) == 0
    for _ in range(3):
        client = Client(client_descriptor(server.port))
        await client.connect()
        await served(server, client)
        # The one this handshake took was made by the last one's wait (or on
        # the spot, the first time); its own wait made the next one's.
        assert len(stock) == 1
        await client.disconnect()


# --------------------------------------------------------------------------- the dial


def _listening(backlog: int) -> socket.socket:
    """A loopback listening socket; backlog 0 holds one connection, so the
    next connect stays in progress (its SYN unanswered) until there is room."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(backlog)
    return listener


async def test_a_dial_completed_in_the_connect_call_is_used_at_once() -> None:
    with _listening(8) as listener:
        stream = await open_tcp(LOOPBACK, listener.getsockname()[1])
        accepted, _ = listener.accept()
        with accepted:
            await stream.send_all(b"ping")
            assert accepted.recv(4) == b"ping"
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await stream.aclose()


async def test_a_refused_dial_raises_and_leaves_no_descriptor() -> None:
    probe = socket.socket()
    probe.bind((LOOPBACK, 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    before = open_descriptors()
    for _ in range(20):
        with pytest.raises(ConnectionRefusedError, match="refused"):
            await open_tcp(LOOPBACK, port)
    assert not opened_since(before)


async def test_a_dial_that_must_wait_completes_once_the_server_takes_it() -> None:
    # A listening socket whose accept queue is full (backlog 0 holds one):
    # the next SYN gets no answer, so that connect stays in progress until
    # the queue has room and the SYN is sent again (~1 s).
    with _listening(0) as listener:
        port = listener.getsockname()[1]
        first = await open_tcp(LOOPBACK, port)
        result: list[trio.SocketStream] = []
        dialled = trio.Event()

        async def dial() -> None:
            result.append(await open_tcp(LOOPBACK, port))
            dialled.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dial)
            await trio.sleep(0.2)
            assert not result  # waiting: the queue is full
            queued, _ = listener.accept()  # room again
            queued.close()
            with trio.fail_after(10):
                await dialled.wait()
        second, _ = listener.accept()
        with second:
            await result[0].send_all(b"late")
            assert second.recv(4) == b"late"
        await result[0].aclose()
        await first.aclose()


async def test_a_waiting_dial_is_cancelled_and_closes_its_socket() -> None:
    with _listening(0) as listener:
        port = listener.getsockname()[1]
        first = await open_tcp(LOOPBACK, port)
        before = open_descriptors()
        with trio.move_on_after(0.2) as scope:
            await open_tcp(LOOPBACK, port)
        assert scope.cancelled_caught
        assert not opened_since(before)
        await first.aclose()


async def test_a_client_connects_through_the_dial(tcp_server_factory: ServerFactory) -> None:
    server: Server = await tcp_server_factory()
    client = Client(client_descriptor(server.port))
    await client.connect()
    await served(server, client)
    assert client.connected
    await client.disconnect()
