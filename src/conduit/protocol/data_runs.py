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
"""

from __future__ import annotations

import attrs

from .codec import frame_spans
from .frames import Frame, FrameKind

_DATA = FrameKind.DATA


@attrs.frozen
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


def split_record(record: bytes | memoryview, max_frame_size: int) -> list[Frame]:
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


__all__ = ["DataRun", "split_record"]
