"""Bytes in, frames out (and back): clear text for the handshake, sealed records after.

:class:`FrameReader` and :class:`FrameWriter` are the whole wire for the Trio
engine: it feeds the reader what the socket returned and writes what the
writer produced. Neither does I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from ..errors import LocalProtocolError
from .codec import FrameDecoder, iter_frames
from .frames import HEADER_SIZE, Frame
from .handshake import HANDSHAKE_MAX_FRAME
from .records import RecordOpener, RecordSealer

#: A record's plaintext may exceed the largest frame by this much, so that a
#: full megabyte of 64 KiB chunks (16 payloads plus 16 headers) and a few control
#: frames fit in one record: one seal and one send per megabyte, not two.
RECORD_SLACK = 4096


class FrameReader:
    """Incremental reader; switch to sealed records with :meth:`start_decryption`."""

    def __init__(self) -> None:
        self._clear: FrameDecoder | None = FrameDecoder(HANDSHAKE_MAX_FRAME)
        self._opener: RecordOpener | None = None
        self._max_frame_size = HANDSHAKE_MAX_FRAME
        self._pending: deque[Frame] = deque()

    @property
    def encrypted(self) -> bool:
        """Whether records are being opened."""
        return self._opener is not None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes from the socket."""
        if self._opener is not None:
            self._opener.feed(data)
        else:
            assert self._clear is not None
            self._clear.feed(data)

    def start_decryption(self, key: bytes, max_frame_size: int) -> None:
        """From the next byte on, the peer sends sealed records.

        Bytes already buffered past the last handshake frame belong to the first
        record, so they move over to the opener.
        """
        assert self._clear is not None, "decryption already started"
        leftover = self._clear.take_remaining()
        self._clear = None
        self._max_frame_size = max_frame_size
        self._opener = RecordOpener(key, max_frame_size + HEADER_SIZE + RECORD_SLACK, leftover)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        if self._pending:
            return self._pending.popleft()
        if self._opener is None:
            assert self._clear is not None
            return self._clear.next_frame()
        # An empty record is valid but holds no frame: look at the next one, or
        # a whole record already buffered would wait for unrelated bytes.
        while not self._pending:
            record = self._opener.next_record()
            if record is None:
                return None
            self._pending.extend(iter_frames(record, self._max_frame_size))
        return self._pending.popleft()


#: An outgoing frame as the pieces to concatenate: ``(header_and_body,)`` or
#: ``(header, payload)``.
OutFrame = tuple[bytes | bytearray | memoryview, ...]


class FrameWriter:
    """Turns encoded frames into what goes on the socket."""

    def __init__(self) -> None:
        self._sealer: RecordSealer | None = None
        self.record_limit = HANDSHAKE_MAX_FRAME

    def start_encryption(self, key: bytes, peer_max_frame_size: int) -> None:
        """Seal everything written from now on."""
        self.record_limit = peer_max_frame_size + HEADER_SIZE + RECORD_SLACK
        self._sealer = RecordSealer(key, self.record_limit)

    @property
    def encrypted(self) -> bool:
        """Whether output is being sealed."""
        return self._sealer is not None

    def write_frames(self, frames: Sequence[OutFrame]) -> list[bytes | bytearray]:
        """Pack whole frames into as few records as the peer's limit allows.

        Each frame is given as its pieces (a header, then maybe a payload) so
        file data is copied once, into the record, and never split across two.
        In clear-text mode (the handshake) this is a plain join.
        """
        if self._sealer is None:
            return [b"".join(piece for frame in frames for piece in frame)]
        out: list[bytes | bytearray] = []
        batch: list[bytes | bytearray | memoryview] = []
        size = 0
        for frame in frames:
            frame_size = sum(len(piece) for piece in frame)
            if frame_size > self.record_limit:
                raise LocalProtocolError(
                    f"frame of {frame_size} bytes exceeds the peer's limit {self.record_limit}"
                )
            if size + frame_size > self.record_limit and batch:
                out.append(self._sealer.seal(b"".join(batch)))
                batch, size = [], 0
            batch.extend(frame)
            size += frame_size
        if batch:
            out.append(self._sealer.seal(b"".join(batch)))
        return out
