"""The sans-IO wire protocol: frames, bodies, handshake and sealed records.

Nothing in this package imports trio, touches a socket or a file: every piece
can be driven with plain bytes, which is how the tests and the fuzzers use it.
"""

from .codec import FrameDecoder, converter, decode_body, encode_frame, iter_frames
from .frames import (
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_END,
    FRAME_COST,
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    MAX_STREAM_ID,
    MAX_WINDOW,
    MIN_FRAME_SIZE,
    MIN_WINDOW,
    PROTOCOL_VERSION,
    Frame,
    FrameKind,
    is_valid_stream_id,
)
from .handshake import ClientHandshake, HandshakeState, ServerHandshake, SessionKeys
from .records_io import FrameReader, FrameWriter, OutFrame

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FLAG_END",
    "FRAME_COST",
    "HEADER_SIZE",
    "MAX_FRAME_SIZE",
    "MAX_STREAM_ID",
    "MAX_WINDOW",
    "MIN_FRAME_SIZE",
    "MIN_WINDOW",
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
    "is_valid_stream_id",
    "iter_frames",
]
