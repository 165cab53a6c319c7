"""The server's early confirmation: SERVER_HELLO, then SERVER_CONFIRM and a
sealed WELCOME before the client's confirmation (shared-password mode, and
accounts mode when the client's hello carries its share), and what it must
not change.

The machines are driven against each other with no network; the server's
side over real loopback sockets with a hand-driven client, and over a
memory stream whose sends are recorded (the hello goes alone, first); the
client's side over a socket pair with a hand-driven server (it reads the
early confirmation without waiting for it).
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from conduit import Accounts, AuthenticationError, Client, LockedOut, RemoteProtocolError, Server
from conduit._gatekeeper import LoopShare
from conduit._handshake_io import client_handshake, read_hello, server_handshake
from conduit.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    ClientHandshake,
    Frame,
    FrameKind,
    FrameReader,
    FrameWriter,
    HandshakeState,
    ServerHandshake,
    SessionKeys,
    pake,
)
from conduit.protocol.codec import decode_body, encode_frame
from conduit.protocol.handshake import ACCOUNTS_REFUSAL, SHARED_MISMATCH, ProverCache
from conduit.protocol.messages import ClientHello, Confirm, Welcome
from conftest import (
    LOOPBACK,
    PASSWORD,
    PassThroughStream,
    ProxyFactory,
    ServerFactory,
    client_descriptor,
    competing_handshake,
    served,
    split_clear_frames,
    wait_until,
)
from test_auth import login
from test_handshake import (
    FAST,
    WINDOW,
    _account_client,
    _account_server,
    _client,
    _Directory,
    _frames,
    _record,
    _rewrite,
    _server,
)


def _keys(server: ServerHandshake) -> SessionKeys | None:
    """The server's trusted keys now (a call: receive() sets them behind a type checker's back)."""
    return server.keys


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
    keys = _keys(server)
    assert server.state is HandshakeState.DONE and keys == server.unconfirmed_keys
    assert keys.send_key == client.keys.receive_key
    assert keys.receive_key == client.keys.send_key


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


def test_accounts_mode_keeps_the_usual_order_on_a_first_login() -> None:
    """The verifier needs the prover's share, which comes with its confirmation."""
    client, server = _account_client(), _account_server()
    (hello,) = _frames(client.start())
    assert decode_body(hello, ClientHello).pake == b""
    server.receive(hello)
    assert not server.can_confirm_first
    with pytest.raises(RuntimeError):
        server.confirm_first()


def _login(client: ClientHandshake, server: ServerHandshake) -> None:
    """A whole exchange in the usual order; AuthenticationError if refused."""
    (hello,) = _frames(client.start())
    (server_hello,) = _frames(server.receive(hello))
    (confirm,) = _frames(client.receive(server_hello))
    (answer,) = _frames(server.receive(confirm))
    client.receive(answer)


def _early_hello(client: ClientHandshake) -> tuple[Frame, ClientHello]:
    (hello,) = _frames(client.start())
    return hello, decode_body(hello, ClientHello)


def test_a_returning_account_client_sends_its_share_and_the_server_confirms_first() -> None:
    directory, cache = _Directory(alice="alice's password"), ProverCache()
    _login(_account_client(cache=cache), _account_server(directory))
    record = directory.records["alice"]

    client, server = _account_client(cache=cache), _account_server(directory)
    hello, body = _early_hello(client)
    # RFC 9383's order: shareP first, with the stretch it was made with.
    assert len(body.pake) == 32 and body.salt == record.salt
    assert (body.opslimit, body.memlimit) == (record.stretch.opslimit, record.stretch.memlimit)
    (server_hello,) = _frames(server.receive(hello))
    assert server.can_confirm_first
    (server_confirm,) = _frames(server.confirm_first())
    (confirm,) = _frames(client.receive(server_hello))
    assert decode_body(confirm, Confirm).share == b""  # the one share was in the hello
    assert client.receive(server_confirm) == b""
    assert client.state is HandshakeState.DONE and client.keys is not None
    assert server.keys is None  # nothing trusted before the client's confirmation
    assert server.receive(confirm) == b""
    keys = _keys(server)
    assert keys is not None and server.username == "alice"
    assert keys.send_key == client.keys.receive_key
    assert len(cache) == 1  # no second stretch


def test_an_early_share_made_with_an_old_salt_is_ignored() -> None:
    directory, cache = _Directory(alice="alice's password"), ProverCache()
    _login(_account_client(cache=cache), _account_server(directory))
    # The same password set again: a new salt, so the cached stretch is stale.
    directory.records["alice"] = _record("alice", "alice's password")
    client, server = _account_client(cache=cache), _account_server(directory)
    hello, body = _early_hello(client)
    assert body.pake
    (server_hello,) = _frames(server.receive(hello))
    assert not server.can_confirm_first
    (confirm,) = _frames(client.receive(server_hello))
    share = decode_body(confirm, Confirm).share
    assert share and share != body.pake  # a new share: the early one is never reused
    (answer,) = _frames(server.receive(confirm))
    client.receive(answer)
    assert client.keys is not None and server.username == "alice"


def test_a_mismatch_after_an_early_share_reads_as_any_refusal() -> None:
    directory, cache = _Directory(alice="alice's password"), ProverCache()
    _login(_account_client(cache=cache), _account_server(directory))
    # The record changed under the same salt (a server holding another
    # verifier): the early share is used, the server confirms first, and its
    # confirmation does not match ours.
    old = directory.records["alice"]
    directory.records["alice"] = _record("alice", "another password", salt=old.salt)
    client, server = _account_client(cache=cache), _account_server(directory)
    hello, body = _early_hello(client)
    assert body.pake
    (server_hello,) = _frames(server.receive(hello))
    (server_confirm,) = _frames(server.confirm_first())
    confirm = client.receive(server_hello)
    with pytest.raises(AuthenticationError) as raised:
        client.receive(server_confirm)
    # The same message as a wrong username or a refusal by the server.
    assert str(raised.value) == ACCOUNTS_REFUSAL
    (confirm_frame,) = _frames(confirm)
    (refusal,) = _frames(server.receive(confirm_frame))
    assert refusal.kind is FrameKind.AUTH_FAILED and server.keys is None


def test_the_stretch_is_remembered_only_once_the_servers_confirmation_checks() -> None:
    """A SERVER_HELLO alone (unauthenticated: a man in the middle could write
    it) teaches the client nothing about early shares."""
    directory, cache = _Directory(alice="alice's password"), ProverCache()
    with pytest.raises(AuthenticationError):
        _login(_account_client(password="guess", cache=cache), _account_server(directory))
    _, body = _early_hello(_account_client(password="guess", cache=cache))
    assert body.pake == b""  # a failed login: no hint
    _login(_account_client(cache=cache), _account_server(directory))
    _, body = _early_hello(_account_client(cache=cache))
    assert body.pake  # a login whose confirmation checked: the hint


def test_an_exchange_that_ends_before_the_servers_hello_drops_the_early_share() -> None:
    """An older server refuses an accounts hello with a share without a word:
    the next hello goes without one instead of piling up failed attempts."""
    directory, cache = _Directory(alice="alice's password"), ProverCache()
    _login(_account_client(cache=cache), _account_server(directory))
    client = _account_client(cache=cache)
    _, body = _early_hello(client)
    assert body.pake
    client.abandon()  # what the I/O layer does when the exchange ends in error
    _, body = _early_hello(_account_client(cache=cache))
    assert body.pake == b"" and body.salt == b""
    # Abandoning after the server's hello (a wrong password, say) keeps it.
    _login(_account_client(cache=cache), _account_server(directory))
    client, server = _account_client(cache=cache), _account_server(directory)
    hello, _ = _early_hello(client)
    (server_hello,) = _frames(server.receive(hello))
    client.receive(server_hello)
    client.abandon()
    _, body = _early_hello(_account_client(cache=cache))
    assert body.pake


def test_an_early_share_is_the_connections_one_guess() -> None:
    directory, cache = _Directory(alice="alice's password"), ProverCache()
    _login(_account_client(cache=cache), _account_server(directory))
    client, server = _account_client(cache=cache), _account_server(directory)
    hello, _ = _early_hello(client)
    (server_hello,) = _frames(server.receive(hello))
    (confirm,) = _frames(client.receive(server_hello))
    # A second share in the confirmation would be a second password guess.
    stranger = pake.prover_secret("another guess", bytes(16), FAST, b"alice", b"conduit-server")
    _, second_share = pake.spake2plus_prover_share(stranger)
    with pytest.raises(RemoteProtocolError, match="second SPAKE2"):
        server.receive(_rewrite(confirm, share=second_share))
    assert server.state is HandshakeState.FAILED and server.keys is None


def test_no_early_share_to_a_server_that_did_not_offer_it() -> None:
    """An older server refuses a share in an accounts hello: a client sends one
    only after a SERVER_HELLO that said ``early_share``."""
    directory, cache = _Directory(alice="alice's password"), ProverCache()
    client, server = _account_client(cache=cache), _account_server(directory)
    (hello,) = _frames(client.start())
    (server_hello,) = _frames(server.receive(hello))
    older = _rewrite(server_hello, early_share=False)
    with contextlib.suppress(AuthenticationError, RemoteProtocolError):
        client.receive(older)  # (the rewrite spoils the transcript; beside the point)
    assert len(cache) == 1  # stretched and kept, yet:
    assert client._hint is None  # nothing to remember, even had it confirmed
    _, body = _early_hello(_account_client(cache=cache))
    assert body.pake == b"" and body.salt == b""


def _by_hand(
    password: str = PASSWORD, username: str | None = None, cache: ProverCache | None = None
) -> ClientHandshake:
    """A client machine driven by the test over a raw socket."""
    return ClientHandshake(
        password,
        name="by hand",
        max_frame_size=DEFAULT_MAX_FRAME_SIZE,
        receive_window=WINDOW,
        username=username,
        cache=cache,
    )


async def _next_frame(stream: trio.SocketStream, reader: FrameReader) -> Frame:
    """The server's next frame on ``stream``; fails the test if it closes first."""
    while (frame := reader.next_frame()) is None:
        data = await stream.receive_some(4096)
        assert data, "the server closed the connection"
        reader.feed(data)
    return frame


async def _hello_and_early_reply(
    port: int,
    password: str = PASSWORD,
    source: str = LOOPBACK,
    handshake: ClientHandshake | None = None,
) -> tuple[trio.SocketStream, ClientHandshake, bytes, Welcome]:
    """Send a CLIENT_HELLO and read the server's one reply, sending nothing
    else: its hello, its confirmation and the WELCOME, opened with the keys.
    Returns the stream, the machine, the CLIENT_CONFIRM still to send, the WELCOME."""
    if handshake is None:
        handshake = _by_hand(password)
    stream = await trio.open_tcp_stream(LOOPBACK, port, local_address=source)
    await stream.send_all(handshake.start())
    reader = FrameReader()
    with trio.fail_after(10):
        frames = [await _next_frame(stream, reader) for _ in range(2)]
        assert [frame.kind for frame in frames] == [
            FrameKind.SERVER_HELLO,
            FrameKind.SERVER_CONFIRM,
        ]
        confirm = handshake.receive(frames[0])
        assert handshake.receive(frames[1]) == b""
        keys = handshake.keys
        assert keys is not None
        reader.start_decryption(keys.receive_key, DEFAULT_MAX_FRAME_SIZE)
        frame = await _next_frame(stream, reader)
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


async def test_a_returning_account_client_is_answered_at_once_over_the_network(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    store = Accounts(tmp_path / "accounts.json", stretch=FAST)
    store.add("alice", "alice's password")
    server = await server_factory(password=None, accounts=store)
    cache = ProverCache()

    def machine() -> ClientHandshake:
        return _by_hand("alice's password", username="alice", cache=cache)

    # A first login, in the usual order, teaches the client the stretch.
    stream = await trio.open_tcp_stream(LOOPBACK, server.port)
    handshake = machine()
    await stream.send_all(handshake.start())
    reader = FrameReader()
    with trio.fail_after(10):
        while handshake.keys is None:
            frame = await _next_frame(stream, reader)
            reply = (
                await trio.to_thread.run_sync(handshake.receive, frame)
                if handshake.will_stretch(frame)
                else handshake.receive(frame)
            )
            if reply:
                await stream.send_all(reply)
    await stream.aclose()
    # The next one sends its share in the hello and gets the server's hello,
    # confirmation and WELCOME before it has sent anything else.
    stream, _, confirm, welcome = await _hello_and_early_reply(server.port, handshake=machine())
    assert decode_body(_frames(confirm)[0], Confirm).share == b""
    await stream.send_all(confirm)
    await wait_until(lambda: welcome.client_id in server.clients)
    assert server.clients[welcome.client_id].username == "alice"
    await stream.aclose()
    await wait_until(lambda: not server.clients)


async def test_a_reconnecting_client_object_uses_its_early_share(
    server_factory: ServerFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    store = Accounts(tmp_path / "accounts.json", stretch=FAST)
    store.add("alice", "alice's password")
    server = await server_factory(password=None, accounts=store)
    proxy = await proxy_factory(server.port)
    client = Client(client_descriptor(proxy.port, username="alice", password="alice's password"))
    with trio.fail_after(10):
        for _ in range(2):
            await client.connect()
            await served(server, client)
            assert server.clients[client.id or ""].username == "alice"
            await client.disconnect()
        await wait_until(lambda: len(proxy.connections) == 2)
        await wait_until(lambda: proxy.connections[1].done.is_set())
    shares = []
    for connection in proxy.connections:
        hello, confirm = split_clear_frames(bytes(connection.c2s), 2)
        shares.append(
            (
                decode_body(_frames(hello)[0], ClientHello).pake,
                decode_body(_frames(confirm)[0], Confirm).share,
            )
        )
    (first_hello, first_confirm), (second_hello, second_confirm) = shares
    assert first_hello == b"" and len(first_confirm) == 32  # learning the stretch
    assert len(second_hello) == 32 and second_confirm == b""  # RFC 9383's order


async def test_a_client_that_leaves_after_the_servers_confirmation_is_logged_as_a_failure(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong password can be tested offline against the server's early
    confirmation (the connection's one guess): hanging up then is logged as
    what it may be, an authentication failure."""
    server: Server = await server_factory()
    handshake = _by_hand("a guess")
    stream = await trio.open_tcp_stream(LOOPBACK, server.port)
    await stream.send_all(handshake.start())
    reader = FrameReader()
    with trio.fail_after(10):
        kinds = [(await _next_frame(stream, reader)).kind for _ in range(2)]
    assert kinds == [FrameKind.SERVER_HELLO, FrameKind.SERVER_CONFIRM]
    await stream.aclose()  # (its guess tested offline; no confirmation sent)
    await wait_until(lambda: "the client left without confirming" in caplog.text)
    assert "authentication failed from" in caplog.text


async def test_under_a_spent_loop_share_the_server_keeps_the_usual_order(
    server_factory: ServerFactory,
) -> None:
    """A flood of hellos (the loop's share spent) gets the usual order, in
    which a hello that never confirms costs no multiplication beyond its own;
    the client is served all the same."""
    server: Server = await server_factory(auth_timeout=60.0)
    server._gate.loop_share = LoopShare(share=0.0, burst=0.0)
    handshake = _by_hand()
    async with competing_handshake(server):  # (one alone is never rationed)
        stream = await trio.open_tcp_stream(LOOPBACK, server.port)
        await stream.send_all(handshake.start())
        reader = FrameReader()
        with trio.fail_after(10):
            frame = await _next_frame(stream, reader)
            assert frame.kind is FrameKind.SERVER_HELLO
            await trio.sleep(0.2)
            assert reader.next_frame() is None  # no confirmation before ours
            await stream.send_all(handshake.receive(frame))
            while handshake.keys is None:
                handshake.receive(await _next_frame(stream, reader))
        await wait_until(lambda: len(server.clients) == 1)
        await stream.aclose()


@attrs.define(eq=False)
class _Recorded(PassThroughStream):
    """One end of a memory stream pair that notes, for each send, the bytes
    and whether the server machine had made its confirmation by then."""

    server: ServerHandshake
    sends: list[tuple[bytes, bool]] = attrs.field(factory=list)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends.append((bytes(data), self.server.unconfirmed_keys is not None))
        await self.inner.send_all(data)


@pytest.mark.parametrize("accounts", [False, True])
async def test_the_server_sends_its_hello_before_it_makes_its_confirmation(
    accounts: bool,
) -> None:
    """The SERVER_HELLO goes alone, first: the client's multiplications then
    run while the server makes its confirmation (on two machines, or two
    cores, at once); the confirmation and the sealed WELCOME follow in one
    send, before the server reads anything else, and the client is done
    with its own confirmation sent, as before."""
    if accounts:
        cache = ProverCache()
        directory = _Directory(alice="alice's password")
        first_server = _account_server(directory)
        first = _account_client(cache=cache)
        # A first login (usual order) gives the client the stretch for an early share.
        (hello,) = _frames(first.start())
        (server_hello,) = _frames(first_server.receive(hello))
        (confirm,) = _frames(first.receive(server_hello))
        first.receive(_frames(first_server.receive(confirm))[0])
        client, server = _account_client(cache=cache), _account_server(directory)
    else:
        client, server = _by_hand(), _server(PASSWORD)
    client_end, server_end = trio.testing.memory_stream_pair()
    recorded = _Recorded(server_end, server)

    async def run(frame: Frame) -> bytes:
        return server.receive(frame)

    def welcome() -> Welcome:
        return Welcome("c1", "s", 0.0, b"t" * 32)

    async def serve() -> None:
        reader, hello, _ = await read_hello(recorded)
        await server_handshake(
            recorded,
            server,
            DEFAULT_MAX_FRAME_SIZE,
            reader=reader,
            hello=hello,
            run=run,
            confirm_first=server.confirm_first,
            welcome=welcome,
        )

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client_end.send_all(client.start())
            reader = FrameReader()
            frames: list[Frame] = []
            while len(frames) < 3:
                reader.feed(await client_end.receive_some())
                while (frame := reader.next_frame()) is not None:
                    frames.append(frame)
                    if len(frames) == 1:
                        await client_end.send_all(client.receive(frame))
                    elif len(frames) == 2:
                        assert client.receive(frame) == b""
                        assert client.keys is not None
                        reader.start_decryption(client.keys.receive_key, DEFAULT_MAX_FRAME_SIZE)
    assert [frame.kind for frame in frames] == [
        FrameKind.SERVER_HELLO,
        FrameKind.SERVER_CONFIRM,
        FrameKind.WELCOME,
    ]
    assert decode_body(frames[2], Welcome).client_id == "c1"
    assert server.keys is not None and server.state is HandshakeState.DONE
    (hello_sent, confirmed), (rest_sent, confirmed_then) = recorded.sends
    assert _frames(hello_sent)[0].kind is FrameKind.SERVER_HELLO and len(_frames(hello_sent)) == 1
    assert not confirmed  # sent before the confirmation was made
    assert confirmed_then
    rest = FrameReader()  # the confirmation in clear, then the sealed WELCOME
    rest.feed(rest_sent)
    first_of_rest = rest.next_frame()
    assert first_of_rest is not None and first_of_rest.kind is FrameKind.SERVER_CONFIRM


async def test_the_client_reads_the_early_confirmation_without_waiting_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's confirmation and WELCOME follow its hello without waiting
    for the client's confirmation, so they are usually there by the time the
    client has sent it: its next read takes them at once, with no wait for
    readability first (which a drained socket otherwise gets, for answers)."""
    client, server = _by_hand(), _server(PASSWORD)
    left, right = socket.socketpair()
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(left))
    theirs = trio.SocketStream(trio.socket.from_stdlib_socket(right))
    waits: list[object] = []
    wait_readable = trio.lowlevel.wait_readable
    receive = ClientHandshake.receive

    async def counting(sock: Any) -> None:
        waits.append(sock)
        await wait_readable(sock)

    def receiving(machine: ClientHandshake, frame: Frame) -> bytes:
        reply = receive(machine, frame)
        if frame.kind is FrameKind.SERVER_HELLO:
            # While the client works on the hello, the server's confirmation
            # and WELCOME arrive; from here on, count the client's waits.
            confirmation = server.confirm_first()
            keys = server.unconfirmed_keys
            assert keys is not None
            writer = FrameWriter()
            writer.start_encryption(keys.send_key, keys.peer_max_frame_size)
            welcome = encode_frame(FrameKind.WELCOME, 0, Welcome("c1", "s", 0.0, b"t" * 32))
            (record,) = writer.write_frames([(welcome,)])
            sent = confirmation + bytes(record)
            assert os.write(theirs.socket.fileno(), sent) == len(sent)
            monkeypatch.setattr(trio.lowlevel, "wait_readable", counting)
        return reply

    monkeypatch.setattr(ClientHandshake, "receive", receiving)
    done: list[Welcome] = []

    async def connect() -> None:
        _, welcome = await client_handshake(ours, client, DEFAULT_MAX_FRAME_SIZE)
        done.append(welcome)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            reader = FrameReader()
            hello = await _next_frame(theirs, reader)
            await theirs.send_all(server.receive(hello))
            confirm = await _next_frame(theirs, reader)
    assert done[0].client_id == "c1"
    assert waits == []  # the read after the client's confirmation did not wait
    assert server.receive(confirm) == b""  # and the server accepts that confirmation
    assert server.keys is not None
    await ours.aclose()
    await theirs.aclose()
