"""The handshake state machines (SPAKE2 and SPAKE2+), driven against each other with no network."""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import sys
import types
from collections.abc import Callable
from typing import Any

import attrs
import msgpack
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
    pake,
)
from conduit.protocol.codec import decode_body, encode_frame
from conduit.protocol.frames import HEADER_SIZE, MAGIC, PROTOCOL_VERSION
from conduit.protocol.handshake import (
    ACCOUNTS_REFUSAL,
    ProverCache,
    account_verifier,
    hello_username,
    peer_version,
    refusal_frame,
    version_refusal,
)
from conduit.protocol.messages import AuthFailed, ClientHello, Confirm, ServerHello
from conduit.protocol.pake import StretchParams, Verifier

WINDOW = 4 << 20


def _client(password: str = "correct horse") -> ClientHandshake:
    return ClientHandshake(
        password, name="c", max_frame_size=DEFAULT_MAX_FRAME_SIZE, receive_window=WINDOW
    )


def _server(password: str = "correct horse") -> ServerHandshake:
    return ServerHandshake(
        password, name="s", max_frame_size=DEFAULT_MAX_FRAME_SIZE, receive_window=WINDOW
    )


def _state(side: ClientHandshake | ServerHandshake) -> HandshakeState:
    """The machine's state now (a call: receive() changes it behind a type checker's back)."""
    return side.state


def _precompute_due(server: ServerHandshake) -> bool:
    """Whether the server has a precomputation due now (read afresh at each call)."""
    return server.precompute_due


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
                assert _state(side) is HandshakeState.FAILED


# --- Accounts mode (SPAKE2+), and what both modes share --------------------------------------

FAST = StretchParams(opslimit=1, memlimit=8 * 1024)


@attrs.frozen
class _Record:
    salt: bytes
    stretch: StretchParams
    verifier: Verifier


def _record(username: str, password: str, salt: bytes | None = None) -> _Record:
    salt = salt if salt is not None else os.urandom(16)
    return _Record(salt, FAST, account_verifier(password, username, salt, FAST))


class _Directory:
    """An account lookup over a dict, with deterministic fakes (like Accounts)."""

    def __init__(self, **passwords: str) -> None:
        self.records = {name: _record(name, password) for name, password in passwords.items()}

    def __call__(self, username: str) -> _Record:
        fake_salt = hashlib.sha256(b"fake" + username.encode()).digest()[:16]
        fake = _Record(
            fake_salt, FAST, Verifier(pake.random_scalar(), pake.base_mul(pake.random_scalar()))
        )
        return self.records.get(username, fake)


def _account_client(
    username: str = "alice", password: str = "alice's password", cache: ProverCache | None = None
) -> ClientHandshake:
    return ClientHandshake(
        password,
        name="c",
        max_frame_size=DEFAULT_MAX_FRAME_SIZE,
        receive_window=WINDOW,
        username=username,
        cache=cache,
    )


def _account_server(directory: _Directory | None = None) -> ServerHandshake:
    return ServerHandshake(
        None,
        name="s",
        max_frame_size=DEFAULT_MAX_FRAME_SIZE,
        receive_window=WINDOW,
        accounts=directory if directory is not None else _Directory(alice="alice's password"),
    )


def test_accounts_mode_agrees_on_keys_and_names_the_user() -> None:
    directory = _Directory(alice="alice's password")
    client, server = _account_client(), _account_server(directory)
    _run(client, server)
    assert client.state is server.state is HandshakeState.DONE
    assert client.keys is not None and server.keys is not None
    assert client.keys.send_key == server.keys.receive_key
    assert client.keys.receive_key == server.keys.send_key
    assert client.keys.send_key != client.keys.receive_key
    assert server.username == "alice"
    assert server.account is directory.records["alice"]


def _refusal_of(wire: list[bytes]) -> AuthFailed:
    (refusal,) = _frames(wire[-1])
    assert refusal.kind is FrameKind.AUTH_FAILED
    return decode_body(refusal, AuthFailed)


def _server_calls(run: Callable[[], object]) -> list[str]:
    """Every conduit function the server side called while ``run`` ran, in order."""
    calls: list[str] = []

    def profile(frame: types.FrameType, event: str, _arg: object) -> None:
        if event == "call" and "conduit" in frame.f_code.co_filename:
            calls.append(frame.f_code.co_qualname)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


def _traced(record: list[str], run: Callable[[], bytes], replies: list[bytes]) -> None:
    record.extend(_server_calls(lambda: replies.append(run())))


def test_a_wrong_user_and_a_wrong_password_look_and_run_the_same() -> None:
    directory = _Directory(alice="alice's password")
    seen = []
    for username, password in [("alice", "wrong"), ("mallory", "alice's password")]:
        client, server = _account_client(username, password), _account_server(directory)
        (hello,) = _frames(client.start())
        calls: list[str] = []
        replies: list[bytes] = []
        _traced(calls, functools.partial(server.receive, hello), replies)
        (server_hello,) = _frames(replies[-1])
        body = decode_body(server_hello, ServerHello)
        assert len(body.salt) == 16
        assert (body.opslimit, body.memlimit) == (FAST.opslimit, FAST.memlimit)
        (confirm,) = _frames(client.receive(server_hello))
        _traced(calls, functools.partial(server.receive, confirm), replies)
        assert isinstance(server.error, AuthenticationError)
        assert server.keys is None and server.username is None and server.account is None
        refusal = _refusal_of(replies)
        with pytest.raises(AuthenticationError) as info:
            client.receive(_frames(replies[-1])[0])
        seen.append((calls, refusal, str(info.value)))
    # The same server code ran, in the same order, and the client got the same answer.
    assert seen[0][0] == seen[1][0]
    assert "spake2plus_verifier_z" in " ".join(seen[0][0])
    assert seen[0][1:] == seen[1][1:]
    assert seen[0][2] == ACCOUNTS_REFUSAL


def test_a_client_stretches_once_for_many_connections() -> None:
    directory = _Directory(alice="alice's password")
    cache = ProverCache()
    first = _server_calls(lambda: _run(_account_client(cache=cache), _account_server(directory)))
    second = _server_calls(lambda: _run(_account_client(cache=cache), _account_server(directory)))
    assert any("prover_secret" in name for name in first)
    assert not any("prover_secret" in name for name in second)
    assert len(cache) == 1


def test_the_client_cache_is_bounded() -> None:
    cache = ProverCache(maxsize=2)
    for salt in (b"a" * 16, b"b" * 16, b"c" * 16):
        cache.secret("pw", "alice", salt, FAST)
    assert len(cache) == 2


def test_mode_mismatch_is_a_clear_authentication_error() -> None:
    client, server = _account_client(), _server()
    (hello,) = _frames(client.start())
    (refusal,) = _frames(server.receive(hello))
    assert isinstance(server.error, AuthenticationError) and server.state is HandshakeState.FAILED
    with pytest.raises(AuthenticationError, match="shared password, not user accounts"):
        client.receive(refusal)
    client = _client()
    server = _account_server()
    (hello,) = _frames(client.start())
    (refusal_frame_,) = _frames(server.receive(hello))
    assert isinstance(server.error, AuthenticationError) and server.state is HandshakeState.FAILED
    with pytest.raises(AuthenticationError, match="connect with a username"):
        client.receive(refusal_frame_)


def _rewrite(frame: Frame, **changes: Any) -> Frame:
    body = decode_body(frame)
    (rewritten,) = _frames(encode_frame(frame.kind, 0, attrs.evolve(body, **changes)))
    return rewritten


MODES: dict[str, tuple[Callable[[], ClientHandshake], Callable[[], ServerHandshake]]] = {
    "shared": (lambda: _client(), lambda: _server()),
    "accounts": (lambda: _account_client(), lambda: _account_server()),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("side", "changes"),
    [
        ("server", {"name": "evil"}),
        ("server", {"max_frame_size": 2 * DEFAULT_MAX_FRAME_SIZE}),
        ("client", {"name": "evil"}),
        ("client", {"receive_window": 2 * WINDOW}),
    ],
)
def test_tampered_hellos_fail_the_confirmation(
    mode: str, side: str, changes: dict[str, object]
) -> None:
    # A man in the middle rewrites a hello but cannot fix the MACs: both
    # hellos are bound into the key confirmation.
    make_client, make_server = MODES[mode]
    client, server = make_client(), make_server()
    (hello,) = _frames(client.start())
    if side == "client":
        hello = _rewrite(hello, **changes)
    (server_hello,) = _frames(server.receive(hello))
    if side == "server":
        server_hello = _rewrite(server_hello, **changes)
    (confirm,) = _frames(client.receive(server_hello))
    server.receive(confirm)
    assert isinstance(server.error, AuthenticationError) and server.keys is None


def test_a_rewritten_username_fails_even_with_the_same_password() -> None:
    directory = _Directory(alice="shared secret", bob="shared secret")
    client, server = _account_client("alice", "shared secret"), _account_server(directory)
    (hello,) = _frames(client.start())
    (server_hello,) = _frames(server.receive(_rewrite(hello, username="bob")))
    (confirm,) = _frames(client.receive(server_hello))
    server.receive(confirm)
    assert isinstance(server.error, AuthenticationError) and server.username is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", ["server share", "client confirm mac", "server confirm mac"])
def test_tampered_shares_and_confirmations_never_authenticate(mode: str, target: str) -> None:
    make_client, make_server = MODES[mode]
    client, server = make_client(), make_server()
    (hello,) = _frames(client.start())
    (server_hello,) = _frames(server.receive(hello))
    if target == "server share":
        share = decode_body(server_hello, ServerHello).pake
        server_hello = _rewrite(server_hello, pake=share[:5] + bytes([share[5] ^ 1]) + share[6:])
        try:
            (confirm,) = _frames(client.receive(server_hello))
        except RemoteProtocolError:
            return  # not a point of the group (the usual case): refused at once
        # Another point of the group (about 1 in 16): the keys differ.
        server.receive(confirm)
        assert isinstance(server.error, AuthenticationError) and server.keys is None
        return
    (confirm,) = _frames(client.receive(server_hello))
    if target == "client confirm mac":
        mac = decode_body(confirm, Confirm).mac
        confirm = _rewrite(confirm, mac=bytes([mac[0] ^ 1]) + mac[1:])
        server.receive(confirm)
        assert isinstance(server.error, AuthenticationError) and server.keys is None
        return
    (server_confirm,) = _frames(server.receive(confirm))
    mac = decode_body(server_confirm, Confirm).mac
    with pytest.raises(AuthenticationError, match="could not prove"):
        client.receive(_rewrite(server_confirm, mac=bytes([mac[0] ^ 1]) + mac[1:]))
    assert client.keys is None


# The 32 "random" bytes are fixed: random ones form a valid point now and then.
# sha256(b"not a point 0") is not a point (checked with libsodium's is_valid_point).
@pytest.mark.parametrize(
    "share", [b"", b"\x01" + b"\0" * 31, hashlib.sha256(b"not a point 0").digest()]
)
def test_invalid_client_shares_in_accounts_mode_are_protocol_errors(share: bytes) -> None:
    client, server = _account_client(), _account_server()
    (hello,) = _frames(client.start())
    (server_hello,) = _frames(server.receive(hello))
    (confirm,) = _frames(client.receive(server_hello))
    with pytest.raises(RemoteProtocolError, match="SPAKE2\\+ share"):
        server.receive(_rewrite(confirm, share=share))
    assert server.state is HandshakeState.FAILED


def _small_order_point() -> bytes:
    # (0, -1), of order 2: added to a valid share, it makes a point outside the
    # prime-order group that the cheap checks on the CLIENT_HELLO let through.
    return ((2**255 - 19) - 1).to_bytes(32, "little")


def test_a_shared_password_share_outside_the_group_fails_in_precompute() -> None:
    client, server = _client(), _server()
    (hello,) = _frames(client.start())
    share = decode_body(hello, ClientHello).pake
    bad = pake.point_add(share, _small_order_point())
    (server_hello,) = _frames(server.receive(_rewrite(hello, pake=bad)))
    assert server_hello.kind is FrameKind.SERVER_HELLO and server.precompute_due
    with pytest.raises(RemoteProtocolError, match="SPAKE2 share"):
        server.precompute()
    assert server.state is HandshakeState.FAILED and server.keys is None
    # Without precompute(), the client's confirmation meets the same refusal.
    client, server = _client(), _server()
    (hello,) = _frames(client.start())
    server.receive(_rewrite(hello, pake=bad))
    with pytest.raises(RemoteProtocolError, match="SPAKE2 share"):
        server.receive(
            Frame(
                FrameKind.CLIENT_CONFIRM,
                0,
                0,
                encode_frame(FrameKind.CLIENT_CONFIRM, 0, Confirm(bytes(32)))[HEADER_SIZE:],
            )
        )
    assert server.state is HandshakeState.FAILED


@pytest.mark.parametrize("mode", ["shared", "accounts"])
@pytest.mark.parametrize("early", [True, False], ids=["precomputed", "at the confirmation"])
def test_precompute_is_optional_and_done_once(mode: str, early: bool) -> None:
    make_client, make_server = MODES[mode]
    client, server = make_client(), make_server()
    assert not server.precompute_due
    server.precompute()  # nothing due yet: nothing done, no state change
    assert server.state is HandshakeState.WAIT_CLIENT_HELLO
    (hello,) = _frames(client.start())
    (server_hello,) = _frames(server.receive(hello))
    assert _precompute_due(server)
    if early:
        server.precompute()
        assert not server.precompute_due
        server.precompute()  # a second call does nothing
    (confirm,) = _frames(client.receive(server_hello))
    (server_confirm,) = _frames(server.receive(confirm))
    assert not server.precompute_due
    client.receive(server_confirm)
    assert client.keys is not None and server.keys is not None
    assert client.keys.send_key == server.keys.receive_key
    assert client.keys.receive_key == server.keys.send_key


@pytest.mark.parametrize("mode", ["shared", "accounts"])
def test_the_clients_precompute_makes_a_share_used_once(mode: str) -> None:
    make_client, make_server = MODES[mode]
    client, server = make_client(), make_server()
    (hello,) = _frames(client.start())
    client.precompute()
    fresh = client._fresh
    assert (fresh is not None) == (mode == "accounts")
    client.precompute()  # made once
    assert client._fresh is fresh
    (server_hello,) = _frames(server.receive(hello))
    (confirm,) = _frames(client.receive(server_hello))
    if fresh is not None:
        # The share is x*P + w0*M for the x made beforehand, which is gone now.
        assert client._fresh is None
        share = decode_body(confirm, Confirm).share
        w0_m = server._record.verifier.w0_m  # type: ignore[union-attr]
        assert share == pake.point_add(fresh[1], w0_m)
    client.precompute()  # too late: nothing made
    assert client._fresh is None
    (server_confirm,) = _frames(server.receive(confirm))
    client.receive(server_confirm)
    assert client.keys is not None and server.keys is not None
    assert client.keys.send_key == server.keys.receive_key


def test_one_guess_per_connection() -> None:
    client, server = _account_client(password="guess 1"), _account_server()
    wire = _run(client, server)
    assert isinstance(server.error, AuthenticationError)
    (confirm,) = _frames(wire[2])
    with pytest.raises(RemoteProtocolError):
        server.receive(confirm)


def test_a_reflected_hello_is_refused_in_accounts_mode() -> None:
    client = _account_client()
    (hello,) = _frames(client.start())
    with pytest.raises(ProtocolError):
        client.receive(Frame(FrameKind.SERVER_HELLO, 0, 0, hello.payload))


@pytest.mark.parametrize(
    "params", [(0, 8 * 1024), (1, 4 << 30), (100, 64 << 20)], ids=["weak", "huge", "slow"]
)
def test_a_hostile_servers_stretch_parameters_are_refused(params: tuple[int, int]) -> None:
    client, server = _account_client(), _account_server()
    (hello,) = _frames(client.start())
    (server_hello,) = _frames(server.receive(hello))
    opslimit, memlimit = params
    with pytest.raises(RemoteProtocolError, match="stretch parameters"):
        client.receive(_rewrite(server_hello, opslimit=opslimit, memlimit=memlimit))


def test_a_hello_of_another_protocol_version_is_refused_by_name() -> None:
    client, server = _client(), _server()
    (hello,) = _frames(client.start())
    with pytest.raises(RemoteProtocolError, match="protocol version 1, this side speaks 2"):
        server.receive(_rewrite(hello, protocol_version=1))


def test_an_old_client_gets_a_refusal_it_can_read() -> None:
    # What a version-1 client reads: its own header version, an AUTH_FAILED
    # body laid out as in version 1, a reason naming the protocol version.
    assert PROTOCOL_VERSION == 2
    data = version_refusal(1)
    magic, version, kind, flags, stream_id, length = struct.unpack_from("!2sBBBxII", data)
    assert (magic, version, kind, flags, stream_id) == (MAGIC, 1, 5, 0, 0)
    body = msgpack.unpackb(data[HEADER_SIZE:])
    assert body["code"] == "protocol_version" and len(data) == HEADER_SIZE + length
    assert "protocol version 2" in body["reason"] and "version 1" in body["reason"]
    assert peer_version(data) == 1
    assert peer_version(_client().start()) == PROTOCOL_VERSION
    assert peer_version(b"GET / HTTP/1.1") is None


def test_machines_never_print_secrets() -> None:
    client, server = _account_client(), _account_server()
    _run(client, server)
    assert server.account is not None
    for text in (repr(server.account.verifier), repr(client.keys), repr(server.keys)):
        assert "hidden" in text
        assert server.account.verifier.w0.hex() not in text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(FrameKind)), st.binary(max_size=80)), max_size=5))
def test_arbitrary_frames_to_the_accounts_machines_only_raise_conduit_errors(
    frames: list[tuple[FrameKind, bytes]],
) -> None:
    server = _account_server(_FUZZ_DIRECTORY)
    client = _account_client(cache=_FUZZ_CACHE)
    client.start()
    for kind, payload in frames:
        frame = Frame(kind, 0, 0, payload)
        for side in (server, client):
            if side.state in (HandshakeState.FAILED, HandshakeState.DONE):
                continue
            try:
                side.receive(frame)
            except ConduitError:
                assert _state(side) is HandshakeState.FAILED


_FUZZ_DIRECTORY = _Directory(alice="alice's password")
_FUZZ_CACHE = ProverCache()


def test_the_server_can_read_the_username_before_any_work() -> None:
    (hello,) = _frames(_account_client("alice").start())
    assert hello_username(hello) == "alice"
    (hello,) = _frames(_client().start())
    assert hello_username(hello) == ""
    with pytest.raises(RemoteProtocolError):
        hello_username(_rewrite(hello, username="x" * 129))
    with pytest.raises(RemoteProtocolError):
        hello_username(Frame(FrameKind.CLIENT_HELLO, 0, 0, b"\xc1"))
