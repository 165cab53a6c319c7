"""Frame layout: a fixed binary header followed by a payload.

::

    offset size field
    0      2    magic      b"\\xc0\\xd1"
    2      1    version    PROTOCOL_VERSION
    3      1    kind       FrameKind
    4      1    flags      bit 0 = END (last frame of a data stream)
    5      1    reserved   must be zero
    6      4    stream id  call id for CALL/RESULT/CANCEL, stream id for data
    10     4    length     payload length, checked against the limit *before*
                           any buffer is allocated

Control frames carry a msgpack body (see :mod:`conduit.protocol.messages`);
``DATA`` frames carry raw bytes.
"""

from __future__ import annotations

import enum
import struct

import attrs

from ..errors import RemoteProtocolError

MAGIC = b"\xc0\xd1"
PROTOCOL_VERSION = 2
HEADER = struct.Struct("!2sBBBxII")
HEADER_SIZE = HEADER.size

#: Smallest and largest frame payload a peer may negotiate.
MIN_FRAME_SIZE = 16 * 1024
MAX_FRAME_SIZE = 16 * 1024 * 1024
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024

#: Smallest and largest receive window (bytes of credit per stream) a peer may announce.
MIN_WINDOW = 64 * 1024
MAX_WINDOW = 1 << 30

#: Stream and call ids are unsigned 32-bit header fields; 0 means "the connection".
MAX_STREAM_ID = 2**32 - 1

#: Credit charged per DATA frame on top of its payload, so that a flood of tiny
#: frames is bounded by the window too (it bounds per-frame bookkeeping).
FRAME_COST = 64

#: Flag bit on a DATA frame: this is the last frame of the stream and its
#: payload is the stream's trailer.
FLAG_END = 0x01
KNOWN_FLAGS = FLAG_END


class FrameKind(enum.IntEnum):
    """Every frame kind on the wire. Numbers are part of the protocol."""

    # Handshake, sent in clear before keys exist.
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    CLIENT_CONFIRM = 3
    SERVER_CONFIRM = 4
    AUTH_FAILED = 5
    # Everything below is only ever sent inside sealed records.
    WELCOME = 10
    CALL = 11
    RESULT = 12
    CANCEL = 13
    MESSAGE = 14
    DATA = 15
    CREDIT = 16
    RESET = 17
    PING = 18
    PONG = 19
    GOODBYE = 20


HANDSHAKE_KINDS = frozenset(
    {
        FrameKind.CLIENT_HELLO,
        FrameKind.SERVER_HELLO,
        FrameKind.CLIENT_CONFIRM,
        FrameKind.SERVER_CONFIRM,
        FrameKind.AUTH_FAILED,
    }
)

_KIND_VALUES = frozenset(int(k) for k in FrameKind)


# Not frozen: one is built per frame received, on both sides of every call,
# and attrs' frozen __init__ (``object.__setattr__`` per field) costs ~250 ns
# more (docs/benchmark-journal.md, "Frames and results built unfrozen").
# Treat it as read-only: a payload may be a view of a record buffer.
@attrs.define
class Frame:
    """One decoded frame (read-only by convention: never assign its fields).

    ``payload`` is the raw payload: msgpack for control frames (decode it with
    :func:`conduit.protocol.codec.decode_body`), file bytes for ``DATA``. It may be
    a ``memoryview`` into a decrypted record, so the bytes are never copied on
    their way to the disk.
    """

    kind: FrameKind
    stream_id: int
    flags: int
    payload: bytes | memoryview

    @property
    def is_end(self) -> bool:
        """True for the last frame of a data stream."""
        return bool(self.flags & FLAG_END)


def encode_header(kind: FrameKind, stream_id: int, flags: int, length: int) -> bytes:
    """Pack a frame header. Raises ``struct.error`` for out-of-range fields."""
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, flags, stream_id, length)


def is_valid_stream_id(stream_id: int) -> bool:
    """Whether ``stream_id`` can name a stream (1 to :data:`MAX_STREAM_ID`)."""
    return 0 < stream_id <= MAX_STREAM_ID


def check_version(version: int) -> None:
    """Refuse a peer that speaks another protocol version."""
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"peer speaks protocol version {version}, this side speaks {PROTOCOL_VERSION}"
        )


def is_known_kind(value: int) -> bool:
    """Whether ``value`` is a frame kind this version understands."""
    return value in _KIND_VALUES
