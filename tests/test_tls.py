"""TLS on top of the password handshake, with certificates from a throwaway trustme CA.

The descriptor's TLS settings (``tls_certfile``, ``tls=True``, ``ssl_context``)
apply to the TCP listeners and connections conduit opens itself, so the tests
of those settings and of certificate checks run over loopback sockets. What
TLS does for the conduit handshake on top of it (the password is still
checked, a clear-text client gets nowhere, nothing readable crosses) does not
depend on the socket: those tests run TLS over in-memory streams
(``Server.serve`` with a ``trio.SSLListener``, ``Client.connect(stream=...)``
with a ``trio.SSLStream``) on the autojump clock.
"""

import logging
import re
import ssl
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trustme

from conduit import (
    AuthenticationError,
    Client,
    ConduitError,
    Server,
    ServerDescriptor,
)
from conduit.protocol.handshake import shared_secret
from conftest import (
    LOOPBACK,
    PASSWORD,
    ClientFactory,
    MemoryListener,
    PassThroughStream,
    ServerFactory,
    client_descriptor,
    serve_until_cancelled,
    server_descriptor,
)
from cutting_proxy import CuttingProxy


@attrs.frozen
class Pki:
    ca_file: str
    cert_file: str
    key_file: str
    other_ca_file: str
    server_context: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory: Path = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", LOOPBACK)
    ca_file = directory / "ca.pem"
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    other_ca_file = directory / "other-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    for blob in cert.cert_chain_pems:
        blob.write_to_path(str(cert_file), append=True)
    trustme.CA().cert_pem.write_to_path(str(other_ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return Pki(str(ca_file), str(cert_file), str(key_file), str(other_ca_file), context)


def register(server: Server) -> None:
    @server.rpc
    async def add(a: int, b: int) -> int:
        return a + b

    @server.rpc
    async def echo(value: bytes) -> bytes:
        return value


async def tls_server(server_factory: ServerFactory, pki: Pki, **fields: object) -> Server:
    return await server_factory(
        register=register, tls_certfile=pki.cert_file, tls_keyfile=pki.key_file, **fields
    )


async def memory_tls_server(
    nursery: trio.Nursery, pki: Pki, **fields: object
) -> tuple[Server, MemoryListener]:
    """A server behind TLS over a memory listener (the TLS layer wrapped by hand)."""
    server = Server(server_descriptor(**fields))
    register(server)
    listener = MemoryListener()
    tls = trio.SSLListener(listener, pki.server_context, https_compatible=False)
    await nursery.start(server.serve, [tls])
    return server, listener


def tls_client_stream(transport: trio.abc.Stream, pki: Pki) -> trio.SSLStream[trio.abc.Stream]:
    context = ssl.create_default_context(cafile=pki.ca_file)
    return trio.SSLStream(transport, context, server_hostname="localhost", https_compatible=False)


@attrs.define(eq=False)
class RecordingStream(PassThroughStream):
    """Passes everything through; keeps a copy of what was sent."""

    sent: bytearray = attrs.field(factory=bytearray)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data
        await self.inner.send_all(data)


async def test_rpc_over_tls(
    server_factory: ServerFactory, client_factory: ClientFactory, pki: Pki
) -> None:
    server = await tls_server(server_factory, pki)
    client = await client_factory(
        server, tls=True, tls_ca_file=pki.ca_file, tls_server_hostname="localhost"
    )
    assert await client.call("add", a=40, b=2) == 42
    big = bytes(range(256)) * 1024  # 256 KiB: many TLS records
    assert await client.call("echo", value=big) == big
    assert client.id is not None
    peer = server.clients[client.id]
    assert peer.address is not None
    assert peer.address[0] == LOOPBACK


async def test_tls_with_ssl_context_fields(
    server_factory: ServerFactory, client_factory: ClientFactory, pki: Pki
) -> None:
    server = await server_factory(register=register, ssl_context=pki.server_context)
    client_context = ssl.create_default_context(cafile=pki.ca_file)
    client = await client_factory(
        server, ssl_context=client_context, tls_server_hostname="localhost"
    )
    assert await client.call("add", a=1, b=2) == 3


async def test_tls_certificate_matches_ip_address(
    server_factory: ServerFactory, client_factory: ClientFactory, pki: Pki
) -> None:
    server = await tls_server(server_factory, pki)
    # No override: the certificate is checked against server_host, 127.0.0.1.
    client = await client_factory(server, tls=True, tls_ca_file=pki.ca_file)
    assert await client.call("add", a=2, b=2) == 4


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 20:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


@pytest.mark.parametrize("trust", ["system", "other-ca"])
async def test_untrusted_certificate_is_refused(
    server_factory: ServerFactory, client_factory: ClientFactory, pki: Pki, trust: str
) -> None:
    server = await tls_server(server_factory, pki)
    ca_file = None if trust == "system" else pki.other_ca_file
    client = await client_factory(
        server,
        connect=False,
        tls=True,
        tls_ca_file=ca_file,
        tls_server_hostname="localhost",
    )
    with trio.fail_after(5), pytest.raises((ConduitError, OSError)) as raised:
        await client.connect()
    assert not client.connected
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in _chain(raised.value)), (
        f"no certificate error behind {raised.value!r}"
    )
    assert server.clients == {}
    # The server survives the failed TLS handshake.
    good = await client_factory(
        server, tls=True, tls_ca_file=pki.ca_file, tls_server_hostname="localhost"
    )
    assert await good.call("add", a=1, b=1) == 2


async def test_untrusted_certificate_error_is_a_conduit_error(
    server_factory: ServerFactory, client_factory: ClientFactory, pki: Pki
) -> None:
    """One ``except ConduitError`` is enough, and the message says what went wrong."""
    server = await tls_server(server_factory, pki)
    client = await client_factory(server, connect=False, tls=True, tls_ca_file=pki.other_ca_file)
    with trio.fail_after(5), pytest.raises(ConduitError) as raised:
        await client.connect()
    assert "certificate" in str(raised.value).lower()


async def test_wrong_hostname_is_refused(
    server_factory: ServerFactory, client_factory: ClientFactory, pki: Pki
) -> None:
    server = await tls_server(server_factory, pki)
    client = await client_factory(
        server,
        connect=False,
        tls=True,
        tls_ca_file=pki.ca_file,
        tls_server_hostname="not-the-server.example",
    )
    with trio.fail_after(5), pytest.raises((ConduitError, OSError)) as raised:
        await client.connect()
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in _chain(raised.value))


async def test_password_still_required_over_tls(
    nursery: trio.Nursery, pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    wrong = "right certificate, wrong password"
    # A password's first use costs a real Argon2id stretch (0.1-0.4 s) in a worker
    # thread; the autojump clock would leap past auth_timeout and fail_after while
    # it runs. Stretch it here, outside the timed part (the result is memoised).
    shared_secret(wrong)
    server, listener = await memory_tls_server(nursery, pki)
    client = Client(client_descriptor(1, password=wrong))
    stream = tls_client_stream(await listener.connect(), pki)
    with trio.fail_after(1), pytest.raises(AuthenticationError) as raised:
        await client.connect(stream=stream)
    assert "password" in str(raised.value).lower()
    assert not client.connected
    assert server.clients == {}


async def test_plaintext_client_cannot_talk_to_tls_server(
    nursery: trio.Nursery, pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    # OpenSSL reads the clear hello as an SSLv2 record header and waits for more
    # bytes, so the server only drops it at auth_timeout: keep that short.
    server, listener = await memory_tls_server(nursery, pki, auth_timeout=0.5)
    dropped = trio.Event()

    @server.on_client_disconnect
    def gone(_peer: object) -> None:
        dropped.set()  # must never fire: the client never authenticates

    client = Client(client_descriptor(1, connect_timeout=5.0))
    with trio.fail_after(10), pytest.raises(ConduitError):
        await client.connect(stream=await listener.connect())
    assert not client.connected
    assert server.clients == {}
    assert not dropped.is_set()


async def test_tls_hides_even_the_handshake(
    nursery: trio.Nursery, pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    _server, listener = await memory_tls_server(nursery, pki)
    wire = RecordingStream(await listener.connect())
    client = Client(client_descriptor(1, name="distinctive-client-name"))
    await client.connect(stream=tls_client_stream(wire, pki))
    assert await client.call("add", a=1, b=2) == 3
    await client.disconnect()
    assert wire.sent, "nothing was recorded"
    # Without TLS the client name travels in the clear hello; with TLS it does not.
    assert b"distinctive-client-name" not in wire.sent
    assert b"\xc0\xd1" + bytes([1, 1]) not in wire.sent[:64]
    assert PASSWORD.encode() not in wire.sent


def test_server_descriptor_builds_tls_context(pki: Pki) -> None:
    descriptor = ServerDescriptor(
        password=PASSWORD, tls_certfile=pki.cert_file, tls_keyfile=pki.key_file
    )
    context = descriptor.build_ssl_context()
    assert isinstance(context, ssl.SSLContext)
    assert ServerDescriptor(password=PASSWORD).build_ssl_context() is None


def test_an_encrypted_key_is_refused_saying_so_without_asking(pki: Pki, tmp_path: Path) -> None:
    """A key that needs a passphrase: OpenSSL asked for it on the terminal
    (twice under ``conduit serve``, which checks the context before serving),
    and without one failed with a bare ``[Errno 22] Invalid argument`` that
    named no file. Found by a review of the TLS layer. Now a ValueError says
    which key and what to do, and nothing is asked."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(pki.key_file).read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase"),
        )
    )
    descriptor = ServerDescriptor(
        password=PASSWORD, tls_certfile=pki.cert_file, tls_keyfile=str(encrypted)
    )
    with pytest.raises(
        ValueError, match=f"the TLS key in {re.escape(str(encrypted))} is encrypted"
    ):
        descriptor.build_ssl_context()


def test_tls_settings_that_would_be_ignored_are_refused(pki: Pki, tmp_path: Path) -> None:
    """Settings that would leave a connection in plain TCP, or serve another
    certificate, without a word are refused when the descriptor is made; a CA
    bundle that cannot be used is refused then too, by name, not at connect()."""
    with pytest.raises(ValueError, match="tls_keyfile needs tls_certfile"):
        ServerDescriptor(password=PASSWORD, tls_keyfile=pki.key_file)
    with pytest.raises(ValueError, match="ssl_context or tls_certfile"):
        ServerDescriptor(
            password=PASSWORD,
            tls_certfile=pki.cert_file,
            ssl_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
        )
    # A host name to check is a request for TLS.
    named = client_descriptor(1, tls_server_hostname="localhost")
    assert isinstance(named.build_ssl_context(), ssl.SSLContext)
    assert client_descriptor(1).build_ssl_context() is None
    missing = str(tmp_path / "no-such-ca.pem")
    with pytest.raises(ValueError, match=re.escape(f"tls_ca_file '{missing}' cannot be used")):
        client_descriptor(1, tls_ca_file=missing)
    key_only = re.escape(f"tls_ca_file '{pki.key_file}' cannot be used")
    with pytest.raises(ValueError, match=key_only):
        client_descriptor(1, tls_ca_file=pki.key_file)  # a key, not a certificate


async def test_a_reconnect_reuses_the_clients_ssl_context(
    server_factory: ServerFactory, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building a context loads its CAs (tens of milliseconds for the
    system's): a Client builds it once, not at every connect."""
    server = await tls_server(server_factory, pki)
    with CuttingProxy(server.port) as proxy:
        descriptor = client_descriptor(
            proxy.port,
            tls_ca_file=pki.ca_file,
            tls_server_hostname="localhost",
            reconnect_delay=0.05,
        )
        built: list[ssl.SSLContext] = []
        real_build = ssl.create_default_context

        def counting_build(*args: Any, **kwargs: Any) -> ssl.SSLContext:
            built.append(real_build(*args, **kwargs))
            return built[-1]

        monkeypatch.setattr(ssl, "create_default_context", counting_build)
        client = Client(descriptor)
        back = trio.Event()
        client.on_reconnect(back.set)
        with trio.fail_after(20):
            await client.connect()
            proxy.legs[0].close()
            await back.wait()
            assert await client.call("add", a=1, b=2) == 3
            await client.disconnect()
    assert proxy.accepted == 2
    assert len(built) == 1


async def test_a_tls_server_run_cancelled_from_outside_says_it_is_going_away(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A TLS server's run() cancelled (Ctrl-C on ``trio.run(server.run)``)
    ends its connections with a GOODBYE saying it is going away, as on a
    plain socket (TLS cannot send without awaiting): a client with automatic
    reconnect comes back once the server is up again."""
    caplog.set_level(logging.INFO, logger="conduit.client")

    def tls_server_on(port: int) -> Server:
        server = Server(
            server_descriptor(port=port, tls_certfile=pki.cert_file, tls_keyfile=pki.key_file)
        )
        register(server)
        return server

    with trio.fail_after(20):
        async with trio.open_nursery() as old_run:
            run_scope, port = await serve_until_cancelled(old_run, tls_server_on(0))
            client = Client(
                client_descriptor(
                    port,
                    tls=True,
                    tls_ca_file=pki.ca_file,
                    tls_server_hostname="localhost",
                    reconnect_delay=0.1,
                    reconnect_attempts=8,
                )
            )
            back = trio.Event()
            client.on_reconnect(back.set)
            await client.connect()
            assert await client.call("add", a=40, b=2) == 42
            run_scope.cancel()
        restarted = tls_server_on(port)
        async with trio.open_nursery() as nursery:
            await nursery.start(restarted.run)
            await back.wait()
            assert await client.call("add", a=1, b=2) == 3
            await client.disconnect()
            await restarted.close()
    assert "disconnected: peer closed the connection: server shutting down" in caplog.text
