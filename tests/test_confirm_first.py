"""The server's early confirmation: SERVER_HELLO, SERVER_CONFIRM and a sealed
WELCOME in one reply (shared-password mode), and what it must not change.

The machines are driven against each other with no network; the server's
side over real loopback sockets with a hand-driven client.
"""

from __future__ import annotations

import pytest
import trio

from conduit import AuthenticationError, LockedOut, Server
from conduit.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    ClientHandshake,
    Frame,
    FrameKind,
    FrameReader,
    HandshakeState,
    ServerHandshake,
)
from conduit.protocol.codec import decode_body
from conduit.protocol.handshake import SHARED_MISMATCH
from conduit.protocol.messages import Welcome
from conftest import LOOPBACK, PASSWORD, ServerFactory, wait_until
from test_auth import login
from test_handshake import _account_client, _account_server, _client, _frames, _server


def _early(client: ClientHandshake, server: ServerHandshake) -> tuple[Frame, Frame, bytes]:
    """Hello in, the server's hello and early confirmation out: (SERVER_HELLO,
    SERVER_CONFIRM, the client's CLIENT_CONFIRM made from the first)."""
    (hello,) = _frames(client.start())
    (server_hello,) = _frames(server.receive(hello))
    assert server.can_confirm_first
    (server_confirm,) = _frames(server.confirm_first())
    confirm = client.receive(server_hello)
    return server_hello, server_confirm, confirm


def test_the_client_is_done_before_the_server_has_checked_it() -> None:
    client, server = _client(), _server()
    _, server_confirm, confirm = _early(client, server)
    assert server.unconfirmed_keys is not None and server.keys is None
    # The client checks our confirmation with our hello: done, one round trip.
    assert client.receive(server_confirm) == b""
    assert client.state is HandshakeState.DONE and client.keys is not None
    # The server trusts nothing until the client's confirmation checks; then
    # it has nothing more to send, and the keys mirror the client's.
    (confirm_frame,) = _frames(confirm)
    assert server.receive(confirm_frame) == b""
    assert server.state is HandshakeState.DONE and server.keys == server.unconfirmed_keys
    assert server.keys.send_key == client.keys.receive_key
    assert server.keys.receive_key == client.keys.send_key


def test_a_wrong_password_shows_at_the_clients_check_and_the_server_still_refuses() -> None:
    client, server = _client("not the password"), _server()
    _, server_confirm, confirm = _early(client, server)
    with pytest.raises(AuthenticationError, match="wrong password") as raised:
        client.receive(server_confirm)
    assert str(raised.value) == SHARED_MISMATCH
    assert client.state is HandshakeState.FAILED and client.keys is None
    # The confirmation the client sent first still reaches the server: it is
    # refused (and counted) there as in the usual order.
    (confirm_frame,) = _frames(confirm)
    (refusal,) = _frames(server.receive(confirm_frame))
    assert refusal.kind is FrameKind.AUTH_FAILED
    assert isinstance(server.error, AuthenticationError) and server.keys is None


def test_confirm_first_is_one_step_at_one_moment() -> None:
    client, server = _client(), _server()
    assert not server.can_confirm_first
    with pytest.raises(RuntimeError):
        server.confirm_first()  # before the hello
    _early(client, server)
    assert not server.can_confirm_first
    with pytest.raises(RuntimeError):
        server.confirm_first()  # twice


def test_accounts_mode_keeps_the_usual_order() -> None:
    """The verifier needs the prover's share, which comes with its confirmation."""
    client, server = _account_client(), _account_server()
    (hello,) = _frames(client.start())
    server.receive(hello)
    assert not server.can_confirm_first
    with pytest.raises(RuntimeError):
        server.confirm_first()


async def _hello_and_early_reply(
    port: int, password: str = PASSWORD, source: str = LOOPBACK
) -> tuple[trio.SocketStream, ClientHandshake, bytes, Welcome]:
    """Send a CLIENT_HELLO and read the server's one reply, sending nothing
    else: its hello, its confirmation and the WELCOME, opened with the keys.
    Returns the stream, the machine, the CLIENT_CONFIRM still to send, the WELCOME."""
    handshake = ClientHandshake(
        password, name="by hand", max_frame_size=DEFAULT_MAX_FRAME_SIZE, receive_window=4 << 20
    )
    stream = await trio.open_tcp_stream(LOOPBACK, port, local_address=source)
    await stream.send_all(handshake.start())
    reader = FrameReader()
    frames: list[Frame] = []
    with trio.fail_after(10):
        while len(frames) < 2:
            data = await stream.receive_some(4096)
            assert data, "the server closed before its confirmation"
            reader.feed(data)
            while len(frames) < 2 and (frame := reader.next_frame()) is not None:
                frames.append(frame)
        assert [frame.kind for frame in frames] == [
            FrameKind.SERVER_HELLO,
            FrameKind.SERVER_CONFIRM,
        ]
        confirm = handshake.receive(frames[0])
        assert handshake.receive(frames[1]) == b""
        keys = handshake.keys
        assert keys is not None
        reader.start_decryption(keys.receive_key, DEFAULT_MAX_FRAME_SIZE)
        while (frame := reader.next_frame()) is None:
            data = await stream.receive_some(4096)
            assert data, "the server closed before its WELCOME"
            reader.feed(data)
    assert frame.kind is FrameKind.WELCOME
    return stream, handshake, confirm, decode_body(frame, Welcome)


async def test_the_welcome_comes_with_the_servers_confirmation_and_holds_once_confirmed(
    server_factory: ServerFactory,
) -> None:
    server: Server = await server_factory()
    stream, _, confirm, welcome = await _hello_and_early_reply(server.port)
    # A promise only, until the client has confirmed: no client, no token.
    await trio.sleep(0.2)
    assert server.clients == {} and len(server._resume_tokens) == 0
    await stream.send_all(confirm)
    await wait_until(lambda: welcome.client_id in server.clients)
    assert len(server._resume_tokens) == 1
    assert server._resume_tokens.current(welcome.client_id) is not None
    await stream.aclose()
    await wait_until(lambda: not server.clients)


async def test_a_client_that_never_confirms_leaves_nothing_and_counts_as_a_failure(
    server_factory: ServerFactory,
) -> None:
    server: Server = await server_factory(auth_failure_limit=1, auth_lockout=60)
    stream, _, _, welcome = await _hello_and_early_reply(server.port, source="127.0.0.5")
    await stream.aclose()
    throttle = server._gate.throttle
    await wait_until(lambda: throttle.retry_after("127.0.0.5", trio.current_time()) > 0)
    assert welcome.client_id not in server.clients and len(server._resume_tokens) == 0
    with pytest.raises(LockedOut):
        await login(server, None, PASSWORD, source="127.0.0.5")


async def test_a_wrong_password_over_the_network_is_refused_and_counted(
    server_factory: ServerFactory,
) -> None:
    server: Server = await server_factory(auth_failure_limit=1, auth_lockout=60)
    with trio.fail_after(10), pytest.raises(AuthenticationError, match="wrong password"):
        await login(server, None, "not the password", source="127.0.0.6")
    with pytest.raises(LockedOut):
        await login(server, None, PASSWORD, source="127.0.0.6")
    assert server.clients == {}
