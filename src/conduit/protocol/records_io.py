"""Bytes in, frames out (and back): clear text for the handshake, sealed records after.

:class:`FrameReader` and :class:`FrameWriter` are the whole wire for the Trio
engine: it feeds the reader what the socket returned and writes what the
writer produced. Neither does I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

from ..errors import LocalProtocolError
from .codec import FrameDecoder, parse_header
from .data_runs import split_record
from .frames import HEADER_SIZE, Frame
from .handshake import HANDSHAKE_MAX_FRAME
from .records import LENGTH, TAG_SIZE, RecordOpener, RecordSealer

#: Bytes a sealed record adds to its plaintext: the length prefix and the tag.
RECORD_OVERHEAD = LENGTH.size + TAG_SIZE

#: A record's plaintext may exceed the largest frame by this much, so that a
#: full megabyte of 64 KiB chunks (16 payloads plus 16 headers) and a few control
#: frames fit in one record: one seal and one send per megabyte, not two.
RECORD_SLACK = 4096

#: Records with at least this much plaintext are sealed into the writer's
#: reused buffers (bulk data); smaller ones are allocated as before.
SCRATCH_MIN = 64 * 1024


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

    @property
    def records_opened(self) -> int:
        """Sealed records opened so far (0 before :meth:`start_decryption`)."""
        return self._opener.opened if self._opener is not None else 0

    @property
    def missing(self) -> int:
        """Bytes still to come before the next sealed record is whole (0: unknown or none)."""
        return self._opener.missing if self._opener is not None else 0

    def partial(self) -> memoryview:
        """The start of the sealed record begun (see :meth:`RecordOpener.partial`)."""
        assert self._opener is not None, "only sealed records are read in parts"
        return self._opener.partial()

    def discard_partial(self) -> None:
        """Forget :meth:`partial`'s bytes: they are fed again with the rest of the record."""
        assert self._opener is not None, "only sealed records are read in parts"
        self._opener.discard_partial()

    def release_idle_buffers(self) -> None:
        """Unmap the opener's kept record buffers unless used since the previous call."""
        if self._opener is not None:
            self._opener.release_idle_buffers()

    def release_buffers(self) -> None:
        """Drop every buffer now, and the frames opened but not taken (views
        of them): the connection is over (nothing more is read)."""
        self._pending.clear()
        if self._opener is not None:
            self._opener.release_buffers()

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed.

        Consecutive DATA frames of one stream in a record come as one
        :class:`~conduit.protocol.data_runs.DataRun` (see :func:`split_record`).
        """
        if self._pending:
            return self._pending.popleft()
        if self._opener is None:
            assert self._clear is not None
            return self._clear.next_frame()
        # An empty record is valid but holds no frame: look at the next one, or
        # a whole record already buffered would wait for unrelated bytes.
        while True:
            record = self._opener.next_record()
            if record is None:
                return None
            size = len(record)
            if size >= HEADER_SIZE:
                # A record of one frame (a call, a result): no list, no queue.
                kind, stream_id, flags, length = parse_header(record, 0, self._max_frame_size)
                if HEADER_SIZE + length == size:
                    return Frame(kind, stream_id, flags, memoryview(record)[HEADER_SIZE:])
            frames = split_record(record, self._max_frame_size)
            if frames:
                self._pending.extend(frames)
                return self._pending.popleft()


#: An outgoing frame as the pieces to concatenate: ``(header_and_body,)`` or
#: ``(header, payload)``.
OutFrame = tuple[bytes | bytearray | memoryview, ...]


class FrameWriter:
    """Turns encoded frames into what goes on the socket."""

    def __init__(self) -> None:
        self._sealer: RecordSealer | None = None
        self.record_limit = HANDSHAKE_MAX_FRAME
        # Reused by iter_records for large records; None until bulk data flows.
        self._plain: bytearray | None = None
        self._sealed: bytearray | None = None
        self._buffers_used = False

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
        sealer = self._sealer
        if len(frames) == 1 and len(frames[0]) == 1:
            # One encoded control frame (a call, a result): it is the plaintext.
            (piece,) = frames[0]
            if len(piece) > self.record_limit:
                raise LocalProtocolError(
                    f"frame of {len(piece)} bytes exceeds the peer's limit {self.record_limit}"
                )
            return [sealer.seal(piece)]
        return [sealer.seal(b"".join(batch)) for batch, _ in self._batches(frames)]

    def iter_records(self, frames: Sequence[OutFrame]) -> Iterator[bytes | bytearray | memoryview]:
        """Like :meth:`write_frames`, one record at a time, for the connection's writer.

        A large record is sealed into buffers this writer keeps and reuses, so
        it is only valid until the next record is asked for: send each one
        before advancing. Small records (calls, results, credit) are fresh
        objects and never make the writer hold a megabyte.
        """
        if self._sealer is None:
            yield from self.write_frames(frames)
            return
        sealer = self._sealer
        for batch, size in self._batches(frames):
            if size < SCRATCH_MIN:
                yield sealer.seal(batch[0] if len(batch) == 1 else b"".join(batch))
                continue
            if self._sealed is None:
                self._sealed = bytearray(self.record_limit + RECORD_OVERHEAD)
            self._buffers_used = True
            if len(batch) == 1:
                # Already one buffer (a sender that laid out its DATA frames
                # itself, data_runs.lay_out): sealed as it is, no join.
                yield sealer.seal_into(batch[0], self._sealed)
                continue
            if self._plain is None:
                self._plain = bytearray(self.record_limit)
            plain = self._plain
            position = 0
            for piece in batch:
                end = position + len(piece)
                plain[position:end] = piece
                position = end
            with memoryview(plain) as view:
                yield sealer.seal_into(view[:size], self._sealed)

    def release_idle_buffers(self) -> None:
        """Drop the reusable record buffers unless used since the previous call.

        The connection calls this on every heartbeat, so a connection that has
        stopped sending bulk data holds them for one interval at most.
        """
        if not self._buffers_used:
            self._plain = self._sealed = None
        self._buffers_used = False

    def release_buffers(self) -> None:
        """Drop the reusable record buffers now: the connection is over."""
        self._plain = self._sealed = None

    def _batches(
        self, frames: Sequence[OutFrame]
    ) -> Iterator[tuple[list[bytes | bytearray | memoryview], int]]:
        batch: list[bytes | bytearray | memoryview] = []
        size = 0
        limit = self.record_limit
        for frame in frames:
            frame_size = sum(map(len, frame))
            if frame_size > limit:
                raise LocalProtocolError(
                    f"frame of {frame_size} bytes exceeds the peer's limit {limit}"
                )
            if size + frame_size > limit and batch:
                yield batch, size
                batch, size = [], 0
            batch.extend(frame)
            size += frame_size
        if batch:
            yield batch, size
