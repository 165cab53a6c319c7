"""Driving the sans-IO handshake over a Trio stream.

The caller bounds each function with its own timeout; these only move bytes
between the socket and :mod:`conduit.protocol.handshake`.
"""

from __future__ import annotations

import contextlib

import attrs
import trio

from .errors import ConnectionClosed, RemoteProtocolError
from .protocol import (
    ClientHandshake,
    Frame,
    FrameKind,
    FrameReader,
    FrameWriter,
    ServerHandshake,
    SessionKeys,
)
from .protocol.codec import decode_body, encode_frame, structure_from_wire, unpack
from .protocol.handshake import refusal_frame
from .protocol.messages import Resume, Welcome

_CHUNK = 4096


@attrs.define
class Established:
    """A finished handshake: the keyed reader/writer and what the peer told us."""

    reader: FrameReader
    writer: FrameWriter
    keys: SessionKeys
    peer_name: str
    #: Server side: the client announced a resume token (read it with :func:`read_resume`).
    resuming: bool = False


async def _next_frame(stream: trio.abc.Stream, reader: FrameReader) -> Frame:
    while (frame := reader.next_frame()) is None:
        data = await stream.receive_some(_CHUNK)
        if not data:
            raise ConnectionClosed("peer closed the connection during the handshake")
        reader.feed(data)
    return frame


async def client_handshake(
    stream: trio.abc.Stream,
    handshake: ClientHandshake,
    max_frame_size: int,
    resume_token: bytes = b"",
) -> tuple[Established, Welcome]:
    """Authenticate to the server; return the session and its WELCOME.

    With a ``resume_token`` (the ``handshake`` must have been made with
    ``resume=True``), present it sealed, first thing, to get the old client id
    back.
    """
    reader, writer = FrameReader(), FrameWriter()
    await stream.send_all(handshake.start())
    while handshake.keys is None:
        reply = handshake.receive(await _next_frame(stream, reader))
        if reply:
            await stream.send_all(reply)
    keys = handshake.keys
    reader.start_decryption(keys.receive_key, max_frame_size)
    writer.start_encryption(keys.send_key, keys.peer_max_frame_size)
    if resume_token:
        (record,) = writer.write_frames(
            [(encode_frame(FrameKind.MESSAGE, 0, Resume(resume_token)),)]
        )
        await stream.send_all(record)
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
    return Established(reader, writer, keys, handshake.client_name, handshake.client_resuming)


async def read_resume(stream: trio.abc.Stream, established: Established) -> bytes:
    """The resume token an authenticated client announced (its first sealed frame)."""
    frame = await _next_frame(stream, established.reader)
    if frame.kind is not FrameKind.MESSAGE:
        raise RemoteProtocolError(f"expected the resume token, got {frame.kind.name}")
    # A MESSAGE frame in form (the one kind a sealed channel may open with),
    # but only ever read here, before the connection's state machine runs.
    return structure_from_wire(unpack(frame.payload), Resume, what="resume token").token


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
    "read_resume",
    "refuse",
    "server_handshake",
    "welcome_record",
]
