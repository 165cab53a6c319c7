"""A client that speaks TLS to a plain server, or plain text to a TLS one, is told at once.

The TLS server hangs up on conduit's plain HELLO without a word; a server that
answers with a TLS record (an alert) is recognised by its record header. Either
way the error names ``tls=True`` instead of leaving the user to guess. The
other way round, a plain conduit server answers a TLS ClientHello with a plain
refusal, which the client's TLS stack reads as no TLS at all.
"""

from __future__ import annotations

import functools
import ssl

import pytest
import trio
import trustme

from conduit import Client, ConnectionClosed, HandshakeError
from conftest import ServerFactory, client_descriptor

# A TLS alert record: content type 21, version 3.3, length 2, fatal handshake_failure.
TLS_ALERT = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])


async def test_plain_client_to_a_tls_server_is_told_to_use_tls(
    server_factory: ServerFactory,
) -> None:
    cert = trustme.CA().issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    server = await server_factory(ssl_context=context)
    client = Client(client_descriptor(server.port))
    with trio.fail_after(5), pytest.raises(ConnectionClosed) as caught:
        await client.connect()
    assert "tls=True" in str(caught.value)
    # A proxy whose server is down hangs up the same way: said too.
    assert "or a proxy in front of it could not reach it" in str(caught.value)


async def test_a_tls_record_in_reply_to_hello_is_recognised() -> None:
    async def answer_like_tls(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(4096)
            await stream.send_all(TLS_ALERT)
            await trio.sleep(5)  # and keep the connection open: no "closed" to go by

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, answer_like_tls, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        client = Client(client_descriptor(port))
        with trio.fail_after(5), pytest.raises(HandshakeError) as caught:
            await client.connect()
        nursery.cancel_scope.cancel()
    assert str(caught.value) == "the server speaks TLS; use --tls / tls=True"


async def test_a_tls_client_to_a_plain_server_is_told_to_drop_tls(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = await server_factory()
    client = Client(client_descriptor(server.port, tls=True))
    with trio.fail_after(5), pytest.raises(HandshakeError) as caught:
        await client.connect()
    assert str(caught.value) == (
        "the server does not speak TLS (it answered in plain TCP); connect without --tls / tls=True"
    )
    assert "the client speaks TLS; this server serves plain TCP" in caplog.text
    # The server is none the worse: a plain client gets in.
    plain = Client(client_descriptor(server.port))
    with trio.fail_after(5):
        await plain.connect()
        await plain.disconnect()
