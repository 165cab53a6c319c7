"""The SPAKE2 handshake state machines, driven against each other with no network."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conduit.errors import (
    AuthenticationError,
    ConduitError,
    HandshakeError,
    HandshakeTimeout,
    ProtocolError,
    RemoteProtocolError,
)
from conduit.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    ClientHandshake,
    Frame,
    FrameKind,
    FrameReader,
    HandshakeState,
    ServerHandshake,
)
from conduit.protocol.codec import encode_frame
from conduit.protocol.handshake import refusal_frame
from conduit.protocol.messages import Confirm

WINDOW = 4 << 20


def _client(password: str = "correct horse") -> ClientHandshake:
    return ClientHandshake(
        password, name="c", max_frame_size=DEFAULT_MAX_FRAME_SIZE, receive_window=WINDOW
    )


def _server(password: str = "correct horse") -> ServerHandshake:
    return ServerHandshake(
        password, name="s", max_frame_size=DEFAULT_MAX_FRAME_SIZE, receive_window=WINDOW
    )


def _frames(data: bytes) -> list[Frame]:
    reader = FrameReader()
    reader.feed(data)
    frames = []
    while (frame := reader.next_frame()) is not None:
        frames.append(frame)
    return frames


def _run(client: ClientHandshake, server: ServerHandshake) -> list[bytes]:
    """Drive both sides to the end; return every byte string that crossed."""
    wire = [client.start()]
    (hello,) = _frames(wire[-1])
    wire.append(server.receive(hello))
    (server_hello,) = _frames(wire[-1])
    wire.append(client.receive(server_hello))
    (confirm,) = _frames(wire[-1])
    wire.append(server.receive(confirm))
    if server.error is None:
        (server_confirm,) = _frames(wire[-1])
        client.receive(server_confirm)
    return wire


def test_matching_passwords_agree_on_directional_keys() -> None:
    client, server = _client(), _server()
    _run(client, server)
    assert client.state is server.state is HandshakeState.DONE
    assert client.keys is not None and server.keys is not None
    assert client.keys.send_key == server.keys.receive_key
    assert client.keys.receive_key == server.keys.send_key
    assert client.keys.send_key != client.keys.receive_key
    assert client.keys.peer_name == "s" and server.keys.peer_name == "c"
    assert "key" not in repr(client.keys).replace("keys hidden", "")


def test_each_session_has_fresh_keys() -> None:
    first, second = _client(), _client()
    _run(first, _server())
    _run(second, _server())
    assert first.keys is not None and second.keys is not None
    assert first.keys.send_key != second.keys.send_key


def test_wrong_password_is_refused_by_the_server() -> None:
    client, server = _client("wrong"), _server()
    wire = _run(client, server)
    assert isinstance(server.error, AuthenticationError)
    assert server.keys is None
    (refusal,) = _frames(wire[-1])
    with pytest.raises(AuthenticationError, match="wrong password"):
        client.receive(refusal)
    assert client.state is HandshakeState.FAILED


def test_an_impostor_server_is_detected_by_the_client() -> None:
    # The server does not know the password; it answers the client's confirm
    # with a forged confirmation.
    client, server = _client(), _server("impostor")
    (hello,) = _frames(client.start())
    (server_hello,) = _frames(server.receive(hello))
    client.receive(server_hello)
    forged = _frames(encode_frame(FrameKind.SERVER_CONFIRM, 0, Confirm(b"\x00" * 32)))[0]
    with pytest.raises(AuthenticationError, match="could not prove"):
        client.receive(forged)


def test_replayed_client_messages_do_not_authenticate() -> None:
    # Record a successful session, then replay the client's bytes to a new server.
    client, server = _client(), _server()
    wire = _run(client, server)
    replay_server = _server()
    (hello,) = _frames(wire[0])
    replay_server.receive(hello)
    (confirm,) = _frames(wire[2])
    replay_server.receive(confirm)
    assert replay_server.keys is None
    assert isinstance(replay_server.error, AuthenticationError)


def test_reflected_hello_is_not_accepted_as_the_server() -> None:
    client = _client()
    (hello,) = _frames(client.start())
    reflected = Frame(FrameKind.SERVER_HELLO, 0, 0, hello.payload)
    # Either the body does not parse as a ServerHello, or SPAKE2 refuses
    # its own message: the client never derives keys from it.
    with pytest.raises(ProtocolError):
        client.receive(reflected)


def test_out_of_order_frames_are_protocol_errors() -> None:
    server = _server()
    confirm = _frames(encode_frame(FrameKind.CLIENT_CONFIRM, 0, Confirm(b"x" * 32)))[0]
    with pytest.raises(RemoteProtocolError, match="unexpected CLIENT_CONFIRM"):
        server.receive(confirm)
    assert server.state is HandshakeState.FAILED


def test_refusal_codes_map_to_clear_errors() -> None:
    client = _client()
    client.start()
    with pytest.raises(AuthenticationError, match="too many"):
        client.receive(_frames(refusal_frame("throttled", "too many failed attempts"))[0])
    client = _client()
    client.start()
    with pytest.raises(ConduitError, match="max_connections") as info:
        client.receive(_frames(refusal_frame("busy", "at max_connections"))[0])
    assert not isinstance(info.value, AuthenticationError)


def test_handshake_errors_say_whether_the_password_is_in_question() -> None:
    # Both end a handshake; only AuthenticationError means "check the password",
    # so a timeout must not be caught by ``except AuthenticationError``.
    assert issubclass(AuthenticationError, HandshakeError)
    assert issubclass(HandshakeTimeout, HandshakeError)
    assert issubclass(HandshakeTimeout, TimeoutError)
    assert not issubclass(HandshakeTimeout, AuthenticationError)
    assert issubclass(HandshakeError, ConduitError)
    with pytest.raises(HandshakeError):
        raise HandshakeTimeout("no answer")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(FrameKind)), st.binary(max_size=80)), max_size=5))
def test_arbitrary_frame_sequences_only_raise_conduit_errors(
    frames: list[tuple[FrameKind, bytes]],
) -> None:
    server = _server()
    client = _client()
    client.start()
    for kind, payload in frames:
        frame = Frame(kind, 0, 0, payload)
        for side in (server, client):
            if side.state in (HandshakeState.FAILED, HandshakeState.DONE):
                continue
            try:
                side.receive(frame)
            except ConduitError:
                assert side.state is HandshakeState.FAILED
