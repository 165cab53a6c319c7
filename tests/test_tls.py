"""TLS on top of the password handshake, with certificates from a throwaway trustme CA."""

import ssl
from pathlib import Path

import attrs
import pytest
import trio
import trustme

from conduit import AuthenticationError, ConduitError, Server, ServerDescriptor
from conftest import (
    LOOPBACK,
    PASSWORD,
    ClientFactory,
    ProxyFactory,
    ServerFactory,
    wait_until,
)


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
    server_factory: ServerFactory, client_factory: ClientFactory, pki: Pki
) -> None:
    server = await tls_server(server_factory, pki)
    client = await client_factory(
        server,
        connect=False,
        tls=True,
        tls_ca_file=pki.ca_file,
        tls_server_hostname="localhost",
        password="right certificate, wrong password",
    )
    with trio.fail_after(1), pytest.raises(AuthenticationError) as raised:
        await client.connect()
    assert "password" in str(raised.value).lower()
    assert not client.connected
    assert server.clients == {}


async def test_plaintext_client_cannot_talk_to_tls_server(
    server_factory: ServerFactory, client_factory: ClientFactory, pki: Pki
) -> None:
    # OpenSSL reads the clear hello as an SSLv2 record header and waits for more
    # bytes, so the server only drops it at auth_timeout: keep that short.
    server = await tls_server(server_factory, pki, auth_timeout=0.5)
    client = await client_factory(server, connect=False, connect_timeout=5.0)
    with trio.fail_after(10), pytest.raises(ConduitError):
        await client.connect()
    assert not client.connected
    await wait_until(lambda: not server.clients)


async def test_tls_hides_even_the_handshake(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    proxy_factory: ProxyFactory,
    pki: Pki,
) -> None:
    server = await tls_server(server_factory, pki)
    proxy = await proxy_factory(server.port)
    client = await client_factory(
        proxy.port,
        tls=True,
        tls_ca_file=pki.ca_file,
        tls_server_hostname="localhost",
        name="distinctive-client-name",
    )
    assert await client.call("add", a=1, b=2) == 3
    await client.disconnect()
    await wait_until(lambda: all(c.done.is_set() for c in proxy.connections))
    # Without TLS the client name travels in the clear hello; with TLS it does not.
    assert b"distinctive-client-name" not in proxy.c2s
    assert b"\xc0\xd1" + bytes([1, 1]) not in proxy.c2s[:64]
    assert PASSWORD.encode() not in proxy.c2s


def test_server_descriptor_builds_tls_context(pki: Pki) -> None:
    descriptor = ServerDescriptor(
        password=PASSWORD, tls_certfile=pki.cert_file, tls_keyfile=pki.key_file
    )
    context = descriptor.build_ssl_context()
    assert isinstance(context, ssl.SSLContext)
    assert ServerDescriptor(password=PASSWORD).build_ssl_context() is None
