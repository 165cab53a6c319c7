"""A record's frames, with each run of consecutive DATA frames of one stream as one item.

Bulk data arrives as records of up to 1 MiB holding sixteen 64 KiB DATA frames
of the same stream. Handled frame by frame, each one is a :class:`Frame`
object, a pass through :meth:`ConnectionState.receive_frame
<conduit.protocol.connection.ConnectionState.receive_frame>`, a credit check,
an event and a wake-up of the stream's consumer: sixteen of each per megabyte,
for bytes that all go to the same place. :func:`split_record` groups such a run
into one :class:`DataRun`, so the state machine checks the credit of the whole
run at once and the engine sees one event per record. Every header is still
parsed and validated; the END frame (which carries the trailer) and every
other kind stay single frames, in their place in the record.

On the sending side, :func:`lay_out` builds such a record before the data is
there: the frame headers written and the payloads left as slots, so a worker
thread can read the file straight into them and the connection's writer seals
the whole buffer as it is (no join of sixteen frames on the event loop). A
sender's large records are laid out in :class:`RecordBuffers`, page mappings
reused once the writer has sealed them, instead of a fresh zero-filled
megabyte per record.
"""

from __future__ import annotations

import mmap
from typing import NamedTuple

import attrs

from .codec import data_header, frame_spans
from .frames import HEADER_SIZE, Frame, FrameKind
from .records import MAPPED_KEEP, MAPPED_MIN, REUSABLE, anonymous_buffer, has_views

_DATA = FrameKind.DATA


@attrs.define  # as Frame: not frozen (see frames.py)
class DataRun(Frame):
    """Two or more consecutive DATA frames of one stream (none of them the END) in one record.

    It is a :class:`Frame` of kind ``DATA`` so that it travels wherever a frame
    does; its own ``payload`` is empty and the frames' payloads, views of the
    decrypted record in their order, are :attr:`payloads`.
    """

    #: Each frame's payload, in order.
    payloads: list[memoryview]
    #: Bytes of payload in all of them.
    size: int


def _run_item(stream_id: int, payloads: list[memoryview], size: int) -> Frame:
    if len(payloads) == 1:
        return Frame(_DATA, stream_id, 0, payloads[0])
    return DataRun(_DATA, stream_id, 0, b"", payloads, size)


def split_record(record: bytes | bytearray | memoryview, max_frame_size: int) -> list[Frame]:
    """Split one decrypted record into its frames and runs, without copying payloads.

    A sealed record always holds whole frames, so a leftover is a protocol error,
    as is any header :func:`~conduit.protocol.codec.parse_header` refuses
    (the walk is :func:`~conduit.protocol.codec.frame_spans`, shared with ``iter_frames``).
    """
    view = memoryview(record)
    items: list[Frame] = []
    run: list[memoryview] = []
    run_stream = -1
    run_size = 0
    for kind, stream_id, flags, start, end in frame_spans(record, max_frame_size):
        if kind is _DATA and not flags:
            if stream_id != run_stream and run:
                items.append(_run_item(run_stream, run, run_size))
                run, run_size = [], 0
            run_stream = stream_id
            run.append(view[start:end])
            run_size += end - start
            continue
        if run:
            items.append(_run_item(run_stream, run, run_size))
            run, run_size, run_stream = [], 0, -1
        items.append(Frame(kind, stream_id, flags, view[start:end]))
    if run:
        items.append(_run_item(run_stream, run, run_size))
    return items


class DataRecord(NamedTuple):
    """Consecutive DATA frames of one stream laid out in one buffer, sealed as one record."""

    #: The frames, header then payload each, exactly as they go in the record
    #: (a view of a :class:`RecordBuffers` mapping: it is reused once this
    #: view and every view of it are gone).
    buffer: bytearray | memoryview
    #: Bytes of payload in them.
    payload: int
    #: How many frames.
    frames: int


class RecordBuffers:
    """One sender's buffers for large laid-out records, reused once the writer is done.

    A fresh ``bytearray`` per record is a megabyte zero-filled (and often
    page-faulted in) holding the GIL, only for the file read to overwrite it.
    These are page mappings, each reused once no view of it is left (the
    record's buffer, its slots and the writer's piece are all views of it;
    the test is exact, see :func:`~conduit.protocol.records.has_views`), so
    a record being filled, queued or sealed is never handed out again. At most
    :data:`~conduit.protocol.records.MAPPED_KEEP` are kept (a window of
    records in flight and the block being read); more at once are one-off
    mappings, unmapped with their last view. All are unmapped once the sender
    drops this object and the writer has sealed the last record.
    """

    def __init__(self) -> None:
        """No buffers yet: they are mapped as records need them."""
        self._kept: list[mmap.mmap] = []

    def take(self, size: int, full: int) -> bytearray | memoryview:
        """A buffer of ``size`` bytes; a new one is mapped ``full`` bytes long (for reuse)."""
        if size < MAPPED_MIN or not REUSABLE:
            return bytearray(size)
        for buffer in self._kept:
            if len(buffer) >= size and not has_views(buffer):
                return memoryview(buffer)[:size]
        buffer = anonymous_buffer(max(size, full))
        if len(self._kept) < MAPPED_KEEP:
            self._kept.append(buffer)
        return memoryview(buffer)[:size]


def lay_out(
    stream_id: int,
    size: int,
    frame_size: int,
    per_record: int,
    buffers: RecordBuffers | None = None,
) -> tuple[list[DataRecord], list[memoryview]]:
    """Buffers for ``size`` bytes of DATA on ``stream_id``, and the payload slots to fill.

    Frames carry ``frame_size`` bytes (the last one the rest), at most
    ``per_record`` of them per buffer. The headers are written; the slots
    (views of the buffers, in stream order) are for the caller to fill, e.g.
    with one ``readv``. Nothing is sent until every slot is filled. The
    buffers come from ``buffers`` if given, else they are fresh.
    """
    records: list[DataRecord] = []
    slots: list[memoryview] = []
    full_header = data_header(stream_id, frame_size)
    full = per_record * (frame_size + HEADER_SIZE)
    remaining = size
    while remaining > 0:
        frames = min(per_record, -(-remaining // frame_size))
        payload = min(remaining, frames * frame_size)
        length = payload + frames * HEADER_SIZE
        buffer = bytearray(length) if buffers is None else buffers.take(length, full)
        view = memoryview(buffer)
        position = 0
        left = payload
        for _ in range(frames):
            length = min(frame_size, left)
            header = full_header if length == frame_size else data_header(stream_id, length)
            view[position : position + HEADER_SIZE] = header
            position += HEADER_SIZE
            slots.append(view[position : position + length])
            position += length
            left -= length
        records.append(DataRecord(buffer, payload, frames))
        remaining -= payload
    return records, slots


__all__ = ["DataRecord", "DataRun", "RecordBuffers", "lay_out", "split_record"]
