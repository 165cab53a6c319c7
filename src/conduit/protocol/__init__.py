"""The sans-IO wire protocol: frames, bodies, handshake and sealed records.

Nothing in this package imports trio, touches a socket or a file: every piece
can be driven with plain bytes, which is how the tests and the fuzzers use it.
"""

from .codec import FrameDecoder, converter, decode_body, encode_frame, iter_frames
from .frames import (
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_END,
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    PROTOCOL_VERSION,
    Frame,
    FrameKind,
)
from .handshake import ClientHandshake, HandshakeState, ServerHandshake, SessionKeys
from .session import FrameReader, FrameWriter, OutFrame

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FLAG_END",
    "HEADER_SIZE",
    "MAX_FRAME_SIZE",
    "MIN_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "ClientHandshake",
    "Frame",
    "FrameDecoder",
    "FrameKind",
    "FrameReader",
    "FrameWriter",
    "HandshakeState",
    "OutFrame",
    "ServerHandshake",
    "SessionKeys",
    "converter",
    "decode_body",
    "encode_frame",
    "iter_frames",
]
