"""Security properties over real loopback sockets.

What an eavesdropper sees, what tampering does, wrong passwords, throttling,
unauthenticated connections, garbage and replays.
"""

import base64
import contextlib
import hashlib
import struct
from typing import Any

import pytest
import trio

from conduit import (
    AuthenticationError,
    Client,
    ConduitError,
    ConnectionClosed,
    HandshakeTimeout,
    Peer,
    Server,
)
from conduit.protocol import ClientHandshake, FrameDecoder, FrameKind
from conduit.protocol.frames import HEADER
from conftest import (
    LOOPBACK,
    PASSWORD,
    ClientFactory,
    Direction,
    FlipByte,
    ProxyFactory,
    ServerFactory,
    Tamper,
    client_descriptor,
    split_clear_frames,
    wait_until,
)
from hostile_helpers import handshake_reply

METHOD = "quetzal_ledger_reconcile_v7"
PAYLOAD = "PAYLOAD:aardvark-zeppelin-0xC0FFEE-\N{SNOWMAN}-7f3e19b2"


def register_echo(server: Server) -> None:
    @server.rpc(name=METHOD)
    async def reconcile(text: str) -> str:
        return text

    @server.rpc
    async def ping() -> str:
        return "pong"


def forbidden_needles(secret: bytes) -> dict[str, bytes]:
    """Encodings of ``secret`` that must never appear on the wire."""
    needles = {"raw": secret}
    for name in ("sha256", "sha1", "md5"):
        digest = hashlib.new(name, secret).digest()
        needles[f"{name} digest"] = digest
        needles[f"{name} hex"] = digest.hex().encode()
        needles[f"{name} HEX"] = digest.hex().upper().encode()
    needles["base64"] = base64.b64encode(secret)
    needles["base64 unpadded"] = base64.b64encode(secret).rstrip(b"=")
    needles["urlsafe base64"] = base64.urlsafe_b64encode(secret).rstrip(b"=")
    needles["hex"] = secret.hex().encode()
    return needles


def tampering(**by_direction: Tamper) -> tuple[Any, list[Tamper]]:
    """A proxy tamper factory applying the given tampers to the first connection only."""
    used: list[Tamper] = []

    def factory(direction: Direction) -> Tamper | None:
        tamper = by_direction.get(direction)
        if tamper is None or tamper in used:
            return None
        used.append(tamper)
        return tamper

    return factory, used


async def read_until_eof(stream: trio.SocketStream, *, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (a reset counts as a close)."""
    received = bytearray()
    with trio.fail_after(timeout):
        for _ in range(10_000):
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            received += data
        else:
            pytest.fail("the server kept sending")
    return bytes(received)


def frame_kinds(data: bytes) -> list[FrameKind]:
    # Header by header, whatever version each names: a peer speaking an old
    # version is answered in its own version's header.
    kinds: list[FrameKind] = []
    offset = 0
    while offset + HEADER.size <= len(data):
        _magic, _version, kind, _flags, _stream, length = HEADER.unpack_from(data, offset)
        kinds.append(FrameKind(kind))
        offset += HEADER.size + length
    return kinds


def connection_counter(server: Server) -> list[str]:
    authenticated: list[str] = []

    @server.on_client_connect
    def count(peer: Peer) -> None:
        authenticated.append(peer.id)

    return authenticated


# --------------------------------------------------------------------------- eavesdropper


async def test_wire_carries_no_password_or_plaintext(
    server_factory: ServerFactory, client_factory: ClientFactory, proxy_factory: ProxyFactory
) -> None:
    server = await server_factory(register=register_echo)
    proxy = await proxy_factory(server.port)
    for _ in range(2):
        client = await client_factory(proxy.port)
        assert await client.call(METHOD, text=PAYLOAD) == PAYLOAD
        assert await client.rpc.call(METHOD, {"text": PAYLOAD * 3}) == {
            "success": True,
            "data": PAYLOAD * 3,
        }
        await client.disconnect()
    await wait_until(lambda: all(c.done.is_set() for c in proxy.connections))
    assert len(proxy.connections) == 2

    c2s, s2c = proxy.c2s, proxy.s2c
    # Control: the recording does see what is meant to be public (the clear hello).
    assert b"conduit-client" in c2s
    assert b"conduit-server" in s2c
    assert len(c2s) > 2 * len(PAYLOAD.encode()) * 4
    assert len(s2c) > 2 * len(PAYLOAD.encode()) * 4
    needles = forbidden_needles(PASSWORD.encode())
    needles["payload"] = PAYLOAD.encode()
    needles["payload fragment"] = b"aardvark-zeppelin"
    needles["method name"] = METHOD.encode()
    for direction, captured in (("client->server", c2s), ("server->client", s2c)):
        for what, needle in needles.items():
            assert needle not in captured, f"{what} visible {direction}"

    # Nothing a replay could reuse: each session's handshake differs.
    first, second = (split_clear_frames(bytes(c.c2s), 2) for c in proxy.connections)
    assert first[0] != second[0]
    assert first[1] != second[1]


# --------------------------------------------------------------------------- tampering


@pytest.mark.parametrize(
    ("direction", "flip"),
    [
        # The first record the client sends after the handshake is the CALL.
        pytest.param("c2s", FlipByte(clear_frames=2, records=0, index=4), id="call-first-byte"),
        pytest.param("c2s", FlipByte(clear_frames=2, records=0, index=-1), id="call-tag"),
        # The server's record 0 is WELCOME; record 1 is the RESULT.
        pytest.param("s2c", FlipByte(clear_frames=2, records=1, index=12), id="result-body"),
        pytest.param("s2c", FlipByte(clear_frames=2, records=1, index=-3), id="result-tag"),
    ],
)
@pytest.mark.parametrize("form", ["dict", "raising"])
async def test_flipped_byte_after_handshake_fails_the_call(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    proxy_factory: ProxyFactory,
    direction: Direction,
    flip: FlipByte,
    form: str,
) -> None:
    flip = FlipByte(flip.clear_frames, flip.records, flip.unit, flip.index)  # fresh state
    server = await server_factory(register=register_echo)
    factory, used = tampering(**{direction: flip})
    proxy = await proxy_factory(server.port, factory)
    client = await client_factory(proxy.port, rpc_timeout=5.0)
    with trio.fail_after(10):
        if form == "dict":
            result = await client.rpc.call(METHOD, text=PAYLOAD)
            assert result["success"] is False, result
            assert result["code"] == "connection_closed", result
            assert "data" not in result
        else:
            with pytest.raises(ConnectionClosed) as raised:
                await client.call(METHOD, text=PAYLOAD)
            if direction == "s2c":
                # The client itself caught the altered record.
                assert "altered" in str(raised.value) or "authentication" in str(raised.value)
    assert used == [flip]
    assert flip.flipped_at is not None
    await wait_until(lambda: not client.connected and not server.clients)
    # The server is unharmed.
    other = await client_factory(server)
    assert await other.call("ping") == "pong"


@pytest.mark.parametrize(
    ("direction", "flip", "caught_by"),
    [
        pytest.param("c2s", FlipByte(0, unit="frame", index=0), "client", id="client-hello-magic"),
        pytest.param("c2s", FlipByte(0, unit="frame", index=-1), "client", id="client-hello-body"),
        # The server confirms first and welcomes with it: the client's connect()
        # has returned when the server finds its confirmation altered.
        pytest.param("c2s", FlipByte(1, unit="frame", index=-1), "server", id="client-confirm-mac"),
        pytest.param("s2c", FlipByte(0, unit="frame", index=-1), "client", id="server-hello-body"),
        pytest.param("s2c", FlipByte(1, unit="frame", index=-1), "client", id="server-confirm-mac"),
        pytest.param("s2c", FlipByte(2, unit="record", index=8), "client", id="welcome-record"),
    ],
)
async def test_flipped_byte_during_handshake_fails_connect(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    proxy_factory: ProxyFactory,
    direction: Direction,
    flip: FlipByte,
    caught_by: str,
) -> None:
    flip = FlipByte(flip.clear_frames, flip.records, flip.unit, flip.index)
    server = await server_factory(register=register_echo)
    authenticated = connection_counter(server)
    factory, _ = tampering(**{direction: flip})
    proxy = await proxy_factory(server.port, factory)
    client = await client_factory(
        proxy.port, connect=False, connect_timeout=5.0, reconnect_enabled=False
    )
    if caught_by == "server":
        with trio.fail_after(10):
            await client.connect()
            # The server drops it unserved: a call fails, nothing is lost silently.
            with pytest.raises(ConnectionClosed):
                await client.call(METHOD, text=PAYLOAD)
            await wait_until(lambda: not client.connected)
    else:
        with trio.fail_after(10), pytest.raises(ConduitError) as raised:
            await client.connect()
        # Detected, not merely timed out.
        assert not isinstance(raised.value, HandshakeTimeout)
    assert flip.flipped_at is not None
    assert not client.connected
    if direction == "c2s":
        assert authenticated == []
    await wait_until(lambda: not server.clients)
    # The server keeps serving, and an honest connection through the proxy works.
    good = await client_factory(proxy.port)
    assert await good.call("ping") == "pong"


# --------------------------------------------------------------------------- passwords


async def test_wrong_password_is_refused_and_the_server_serves_on(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    server = await server_factory(register=register_echo)
    authenticated = connection_counter(server)
    client = await client_factory(server, connect=False, password="not the password")
    # A hang guard, not a speed target: the refusal is an answer, never a timeout
    # (how fast it comes is the benchmarks' business).
    with trio.fail_after(20), pytest.raises(AuthenticationError) as raised:
        await client.connect()
    assert isinstance(raised.value, ConduitError)
    assert "password" in str(raised.value).lower()
    assert PASSWORD not in str(raised.value)
    assert not client.connected
    assert client.id is None
    assert server.clients == {}
    assert authenticated == []
    good = await client_factory(server)
    assert await good.call("ping") == "pong"


async def test_repeated_failures_lock_the_address_out(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    server = await server_factory(register=register_echo, auth_failure_limit=3, auth_lockout=60)

    async def attempt(password: str) -> None:
        client = await client_factory(server, connect=False, password=password)
        with trio.fail_after(5):
            await client.connect()
        await client.disconnect()

    # Below the limit, the right password still works (and clears the count).
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            await attempt("guess")
    await attempt(PASSWORD)

    for _ in range(3):
        with pytest.raises(AuthenticationError) as wrong:
            await attempt("guess")
        assert "too many" not in str(wrong.value).lower()
    with pytest.raises(AuthenticationError) as locked:
        await attempt(PASSWORD)
    assert "too many" in str(locked.value).lower()
    assert server.clients == {}


# --------------------------------------------------------------------------- unauthenticated


@pytest.mark.parametrize("sent", ["nothing", "half a hello"])
async def test_unauthenticated_socket_closed_after_auth_timeout(
    server_factory: ServerFactory, sent: str
) -> None:
    server = await server_factory(auth_timeout=0.3)
    authenticated = connection_counter(server)
    hello = ClientHandshake(
        "whatever", name="raw", max_frame_size=1 << 20, receive_window=1 << 20
    ).start()
    stream = await trio.open_tcp_stream(LOOPBACK, server.port)
    start = trio.current_time()
    if sent == "half a hello":
        await stream.send_all(hello[: len(hello) // 2])
    try:
        with trio.fail_after(5):
            for _ in range(100):
                assert server.clients == {}
                with trio.move_on_after(0.05):
                    data = await stream.receive_some(4096)
                    assert data == b"", data
                    break
            else:
                pytest.fail("the server never closed the connection")
    except trio.BrokenResourceError:
        pass  # a reset is a close too
    finally:
        await stream.aclose()
    assert trio.current_time() - start >= 0.25
    assert server.clients == {}
    assert authenticated == []


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", id="http"),
        pytest.param(b"\x00" * 64, id="zeros"),
        pytest.param(struct.pack("!2sBBBxII", b"\xc0\xd1", 1, 1, 0, 0, 1 << 31), id="huge-length"),
        pytest.param(
            struct.pack("!2sBBBxII", b"\xc0\xd1", 1, 2, 0, 0, 3) + b"abc", id="wrong-kind"
        ),
        pytest.param(
            struct.pack("!2sBBBxII", b"\xc0\xd1", 1, 1, 0, 0, 6) + b"\xc1\xc1junk", id="bad-body"
        ),
        pytest.param(bytes(range(256)) * 64, id="binary-16k"),
    ],
)
async def test_garbage_before_auth_is_dropped(
    server_factory: ServerFactory, client_factory: ClientFactory, garbage: bytes
) -> None:
    # A long auth_timeout: the close below must come from detecting the garbage.
    server = await server_factory(register=register_echo, auth_timeout=30)
    authenticated = connection_counter(server)
    stream = await trio.open_tcp_stream(LOOPBACK, server.port)
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(garbage)
    reply = await read_until_eof(stream, timeout=5)
    await stream.aclose()
    assert FrameKind.SERVER_HELLO not in frame_kinds(reply)
    assert server.clients == {}
    assert authenticated == []
    good = await client_factory(server)
    assert await good.call("ping") == "pong"


async def test_replayed_handshake_is_rejected(
    server_factory: ServerFactory, client_factory: ClientFactory, proxy_factory: ProxyFactory
) -> None:
    calls: list[str] = []

    def register(server: Server) -> None:
        @server.rpc
        async def transfer_funds(amount: int) -> str:
            calls.append(f"transfer {amount}")
            return "done"

    server = await server_factory(register=register)
    authenticated = connection_counter(server)
    proxy = await proxy_factory(server.port)
    client = await client_factory(proxy.port)
    assert await client.call("transfer_funds", amount=100) == "done"
    await client.disconnect()
    await wait_until(lambda: proxy.connections[0].done.is_set())
    recorded = bytes(proxy.connections[0].c2s)
    hello, confirm = split_clear_frames(recorded, 2)
    assert calls == ["transfer 100"]
    assert len(authenticated) == 1

    # Step by step: the recorded confirmation does not fit the new server hello.
    stream = await trio.open_tcp_stream(LOOPBACK, server.port)
    await stream.send_all(hello)
    decoder = FrameDecoder(4096)
    with trio.fail_after(5):
        while (frame := decoder.next_frame()) is None:
            data = await stream.receive_some(4096)
            assert data, "server closed before its hello"
            decoder.feed(data)
    assert frame.kind is FrameKind.SERVER_HELLO
    await stream.send_all(confirm)
    reply = await read_until_eof(stream)
    await stream.aclose()
    kinds = frame_kinds(reply)
    assert FrameKind.SERVER_CONFIRM not in kinds
    assert kinds == [FrameKind.AUTH_FAILED]

    # All at once, sealed call record included: nothing runs. The server
    # confirms its own fresh hello first and sends the WELCOME sealed with its
    # keys (worthless to a replayer: keyed from a new y and the password),
    # then refuses the recorded confirmation.
    stream = await trio.open_tcp_stream(LOOPBACK, server.port)
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(recorded)
    reply = await read_until_eof(stream)
    await stream.aclose()
    assert handshake_reply(reply) == [
        FrameKind.SERVER_HELLO,
        FrameKind.SERVER_CONFIRM,
        "record",
        FrameKind.AUTH_FAILED,
    ]

    assert calls == ["transfer 100"]
    assert len(authenticated) == 1
    assert server.clients == {}


async def test_client_refuses_a_server_with_another_password(
    server_factory: ServerFactory,
) -> None:
    """An impostor that does not know the password cannot complete the handshake."""
    impostor = await server_factory(password="impostor's guess")
    authenticated = connection_counter(impostor)
    client = Client(client_descriptor(impostor.port, connect_timeout=5.0))
    with trio.fail_after(5), pytest.raises(AuthenticationError):
        await client.connect()
    assert not client.connected
    assert authenticated == []
