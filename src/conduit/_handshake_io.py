"""Driving the sans-IO handshake over a Trio stream.

The caller bounds each function with its own timeout; these only move bytes
between the socket and :mod:`conduit.protocol.handshake`.
"""

from __future__ import annotations

import contextlib

import attrs
import trio

from .errors import ConnectionClosed, HandshakeError, RemoteProtocolError
from .protocol import (
    ClientHandshake,
    Frame,
    FrameKind,
    FrameReader,
    FrameWriter,
    ServerHandshake,
    SessionKeys,
)
from .protocol.codec import decode_body, encode_frame
from .protocol.handshake import refusal_frame
from .protocol.messages import Welcome

_CHUNK = 4096


@attrs.define
class Established:
    """A finished handshake: the keyed reader/writer and what the peer told us."""

    reader: FrameReader
    writer: FrameWriter
    keys: SessionKeys
    peer_name: str


async def _next_frame(stream: trio.abc.Stream, reader: FrameReader) -> Frame:
    while (frame := reader.next_frame()) is None:
        data = await stream.receive_some(_CHUNK)
        if not data:
            raise ConnectionClosed("peer closed the connection during the handshake")
        reader.feed(data)
    return frame


_TLS_HINT = "use --tls / tls=True"


def _looks_like_tls(data: bytes | bytearray) -> bool:
    """Whether ``data`` starts with a TLS record header (alert or handshake, version 3.x)."""
    return len(data) >= 2 and data[0] in (0x15, 0x16) and data[1] == 0x03


async def _first_reply(stream: trio.abc.Stream, reader: FrameReader) -> None:
    """Read the server's first bytes, recognising a TLS server spoken to in plain text.

    A TLS server answers our HELLO with a TLS record (an alert) or just hangs up;
    either way the user needs one hint, not a timeout or a bare "closed".
    """
    data = await stream.receive_some(_CHUNK)
    if not data:
        raise ConnectionClosed(
            f"the server closed the connection without answering (if it speaks TLS, {_TLS_HINT})"
        )
    if _looks_like_tls(data):
        raise HandshakeError(f"the server speaks TLS; {_TLS_HINT}")
    reader.feed(data)


async def client_handshake(
    stream: trio.abc.Stream, handshake: ClientHandshake, max_frame_size: int
) -> tuple[Established, Welcome]:
    """Authenticate to the server; return the session and its WELCOME."""
    reader, writer = FrameReader(), FrameWriter()
    await stream.send_all(handshake.start())
    await _first_reply(stream, reader)
    while handshake.keys is None:
        reply = handshake.receive(await _next_frame(stream, reader))
        if reply:
            await stream.send_all(reply)
    keys = handshake.keys
    reader.start_decryption(keys.receive_key, max_frame_size)
    writer.start_encryption(keys.send_key, keys.peer_max_frame_size)
    frame = await _next_frame(stream, reader)
    if frame.kind is not FrameKind.WELCOME:
        raise RemoteProtocolError(f"expected WELCOME, got {frame.kind.name}")
    welcome = decode_body(frame, Welcome)
    return Established(reader, writer, keys, handshake.server_name), welcome


async def server_handshake(
    stream: trio.abc.Stream, handshake: ServerHandshake, max_frame_size: int
) -> Established:
    """Check the client's password proof; raise AuthenticationError if it is wrong."""
    reader, writer = FrameReader(), FrameWriter()
    while handshake.keys is None:
        reply = handshake.receive(await _next_frame(stream, reader))
        if reply:
            await stream.send_all(reply)
        if handshake.error is not None:
            raise handshake.error
    keys = handshake.keys
    reader.start_decryption(keys.receive_key, max_frame_size)
    writer.start_encryption(keys.send_key, keys.peer_max_frame_size)
    return Established(reader, writer, keys, handshake.client_name)


def welcome_record(writer: FrameWriter, welcome: Welcome) -> bytes | bytearray:
    """The first sealed record the server sends."""
    (record,) = writer.write_frames([(encode_frame(FrameKind.WELCOME, 0, welcome),)])
    return record


async def refuse(stream: trio.abc.Stream, code: str, reason: str, retry_after: float = 0.0) -> None:
    """Tell a connecting client why it is turned away, best effort, then close."""
    with trio.move_on_after(1):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(refusal_frame(code, reason, retry_after))
    await trio.aclose_forcefully(stream)


__all__ = [
    "Established",
    "client_handshake",
    "refuse",
    "server_handshake",
    "welcome_record",
]
