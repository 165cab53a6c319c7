"""A record's consecutive DATA frames of one stream handled as one run (protocol/data_runs.py).

Sans-IO: records are built by hand or sealed by :class:`FrameWriter`, split by
:func:`split_record` or opened by :class:`FrameReader`, and fed to a
:class:`ConnectionState`. What a run must not change: the order of bytes and
frames, the credit and END rules, the refusal of anything malformed.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conduit._streams import OutgoingStream
from conduit.errors import IntegrityError, RemoteProtocolError
from conduit.protocol import FLAG_END, FRAME_COST, FrameKind, FrameReader, FrameWriter
from conduit.protocol.codec import data_header, encode_frame, iter_frames
from conduit.protocol.connection import ConnectionState, InboundStream
from conduit.protocol.data_runs import DataRun, RecordBuffers, lay_out, split_record
from conduit.protocol.messages import Credit, Ping

MAX_FRAME = 1024 * 1024
KEY = bytes(range(32))


def machine(window: int = 4 * 1024 * 1024) -> ConnectionState:
    """A server machine after the handshake."""
    return ConnectionState(
        is_client=False,
        receive_window=window,
        peer_receive_window=window,
        peer_max_frame_size=MAX_FRAME,
        max_concurrent_calls=8,
    )


def data(stream_id: int, payload: bytes, *, end: bool = False) -> bytes:
    return data_header(stream_id, len(payload), FLAG_END if end else 0) + payload


def ping(nonce: int) -> bytes:
    return encode_frame(FrameKind.PING, 0, Ping(nonce))


def credit(stream_id: int, amount: int) -> bytes:
    return encode_frame(FrameKind.CREDIT, stream_id, Credit(amount))


def deliver(state: ConnectionState, record: bytes) -> list[object]:
    return [state.receive_frame(frame) for frame in split_record(record, MAX_FRAME)]


# ------------------------------------------------------------------ splitting


def test_a_record_mixing_two_streams_and_control_frames_keeps_its_order() -> None:
    record = b"".join(
        [
            data(2, b"a1"),
            data(2, b"a2"),
            data(4, b"b1"),
            ping(7),
            data(4, b"b2"),
            data(4, b"b3"),
            data(4, b"b4"),
            credit(2, 100),
            data(2, b"a3"),
            data(2, b"a4", end=True),
        ]
    )
    items = split_record(record, MAX_FRAME)
    shapes = [(type(item).__name__, item.kind, item.stream_id, item.flags) for item in items]
    assert shapes == [
        ("DataRun", FrameKind.DATA, 2, 0),
        ("Frame", FrameKind.DATA, 4, 0),
        ("Frame", FrameKind.PING, 0, 0),
        ("DataRun", FrameKind.DATA, 4, 0),
        ("Frame", FrameKind.CREDIT, 2, 0),
        ("Frame", FrameKind.DATA, 2, 0),
        ("Frame", FrameKind.DATA, 2, FLAG_END),  # the END is never part of a run
    ]
    first, _, _, second = items[0], items[1], items[2], items[3]
    assert isinstance(first, DataRun) and isinstance(second, DataRun)
    assert [bytes(p) for p in first.payloads] == [b"a1", b"a2"] and first.size == 4
    assert [bytes(p) for p in second.payloads] == [b"b2", b"b3", b"b4"] and second.size == 6
    assert bytes(items[1].payload) == b"b1"
    assert bytes(items[6].payload) == b"a4"


@pytest.mark.parametrize("as_view", [False, True], ids=["bytearray", "memoryview"])
def test_payloads_are_views_of_the_record_not_copies(as_view: bool) -> None:
    record = bytearray(data(2, b"x" * 100) + data(2, b"y" * 100))
    (run,) = split_record(memoryview(record) if as_view else record, MAX_FRAME)
    assert isinstance(run, DataRun)
    assert all(payload.obj is record for payload in run.payloads)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (data(2, b"abc") + data(2, b"def")[:5], "record ends inside a frame header"),
        (data(2, b"abc") + data(2, b"defgh")[:-2], "record ends inside a frame payload"),
        (data(2, b"abc") + b"XX" + data(2, b"def")[2:], "bad magic"),
    ],
)
def test_a_malformed_frame_after_a_run_refuses_the_whole_record(record: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        split_record(record, MAX_FRAME)


def test_a_frame_over_the_limit_inside_a_run_is_refused() -> None:
    record = data(2, b"a" * 16) + data(2, b"b" * 17)
    with pytest.raises(RemoteProtocolError, match="exceeds the negotiated limit of 16"):
        split_record(record, 16)


frame_specs = st.lists(
    st.tuples(
        st.sampled_from(["data", "end", "ping"]),
        st.sampled_from([2, 4, 6]),
        st.binary(max_size=40),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(frame_specs)
def test_runs_flatten_back_to_the_frames_in_order(specs: list[tuple[str, int, bytes]]) -> None:
    """Whatever the mix, a record's runs hold exactly its frames, in order."""
    record = b"".join(
        ping(len(payload)) if kind == "ping" else data(sid, payload, end=kind == "end")
        for kind, sid, payload in specs
    )
    flattened: list[tuple[FrameKind, int, int, bytes]] = []
    for item in split_record(record, MAX_FRAME):
        if isinstance(item, DataRun):
            assert len(item.payloads) >= 2 and item.size == sum(map(len, item.payloads))
            flattened.extend((item.kind, item.stream_id, 0, bytes(p)) for p in item.payloads)
        else:
            flattened.append((item.kind, item.stream_id, item.flags, bytes(item.payload)))
    expected = [
        (f.kind, f.stream_id, f.flags, bytes(f.payload)) for f in iter_frames(record, MAX_FRAME)
    ]
    assert flattened == expected


# ------------------------------------------------------------------ the machine


def test_a_run_is_one_event_with_the_credit_of_all_its_frames() -> None:
    state = machine()
    stream = state.open_inbound(InboundStream)
    chunks = [os.urandom(1000) for _ in range(16)]
    events = deliver(state, b"".join(data(stream.stream_id, c) for c in chunks))
    assert events == [stream]
    assert stream.available == stream.window - 16 * (1000 + FRAME_COST)
    assert stream.bytes_received == 16_000
    taken, trailer = stream.take()
    assert [bytes(c) for c in taken] == chunks and trailer is None


def test_a_run_beyond_the_credit_is_refused_and_nothing_is_buffered() -> None:
    state = machine(window=64 * 1024)
    stream = state.open_inbound(InboundStream)
    chunk = b"z" * (16 * 1024)
    record = b"".join(data(stream.stream_id, chunk) for _ in range(4))  # 4 x (16 KiB + 64)
    with pytest.raises(
        RemoteProtocolError,
        match=rf"peer exceeded the credit window on stream {stream.stream_id} "
        rf"\({4 * (len(chunk) + FRAME_COST)} bytes in 4 frames with {64 * 1024} granted\)",
    ):
        deliver(state, record)
    assert stream.available == 64 * 1024
    assert not stream.chunks and stream.bytes_received == 0


def test_a_run_within_the_credit_after_a_grant_is_accepted() -> None:
    state = machine(window=64 * 1024)
    stream = state.open_inbound(InboundStream)
    chunk = b"z" * (16 * 1024 - FRAME_COST)
    deliver(state, b"".join(data(stream.stream_id, chunk) for _ in range(4)))  # the whole window
    assert stream.available == 0
    stream.take()
    stream.consumed()
    assert stream.credit_to_return(force=True) == 64 * 1024
    deliver(state, b"".join(data(stream.stream_id, chunk) for _ in range(4)))
    assert stream.available == 0


def test_a_run_after_the_end_of_its_stream_is_refused() -> None:
    state = machine()
    stream = state.open_inbound(InboundStream)
    deliver(state, data(stream.stream_id, b"trailer", end=True))
    with pytest.raises(
        RemoteProtocolError, match=f"data after the end of stream {stream.stream_id}"
    ):
        deliver(state, data(stream.stream_id, b"a") + data(stream.stream_id, b"b"))


def test_a_run_for_a_stream_never_opened_is_refused() -> None:
    state = machine()
    with pytest.raises(RemoteProtocolError, match="data for stream 6, which was never opened"):
        deliver(state, data(6, b"a") + data(6, b"b"))


def test_a_run_in_flight_for_a_stream_we_closed_is_ignored() -> None:
    state = machine()
    stream = state.open_inbound(InboundStream)
    state.close_stream(stream, None)
    assert deliver(state, data(stream.stream_id, b"a") + data(stream.stream_id, b"b")) == [None]


# ------------------------------------------------------------------ sealed records


def _sealed_records(frames: list[bytes]) -> list[bytes]:
    writer = FrameWriter()
    writer.start_encryption(KEY, MAX_FRAME)
    pieces = [(frame,) for frame in frames]
    return [bytes(record) for record in writer.iter_records(pieces)]


def _reader() -> FrameReader:
    reader = FrameReader()
    reader.start_decryption(KEY, MAX_FRAME)
    return reader


def test_bulk_records_through_the_reader_deliver_every_byte_in_order() -> None:
    state = machine(window=64 * 1024 * 1024)
    stream = state.open_inbound(InboundStream)
    payload = os.urandom(3 * 1024 * 1024)
    chunk = 64 * 1024
    frames = [data(stream.stream_id, payload[i : i + chunk]) for i in range(0, len(payload), chunk)]
    frames.append(data(stream.stream_id, b"the trailer", end=True))
    reader = _reader()
    received = bytearray()
    events = 0
    for record in _sealed_records(frames):
        reader.feed(record)
        while (frame := reader.next_frame()) is not None:
            events += state.receive_frame(frame) is not None
        chunks, trailer = stream.take()
        for piece in chunks:
            received += piece
    assert bytes(received) == payload and trailer == b"the trailer"
    # Three records of 16 frames plus the END: one event per record, one for the END.
    assert events == 4


def test_a_replayed_bulk_record_is_refused() -> None:
    frames = [data(2, os.urandom(64 * 1024)) for _ in range(32)]
    first, _ = _sealed_records(frames)
    reader = _reader()
    reader.feed(first)
    assert reader.next_frame() is not None
    reader.feed(first)  # the same record again: its nonce is already spent
    with pytest.raises(IntegrityError):
        reader.next_frame()


def test_bulk_records_out_of_order_are_refused() -> None:
    frames = [data(2, os.urandom(64 * 1024)) for _ in range(32)]
    _, second = _sealed_records(frames)
    reader = _reader()
    reader.feed(second)
    with pytest.raises(IntegrityError):
        reader.next_frame()


# --------------------------------------------------------------------------- lay_out (sending)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=40_000),
    frame_size=st.integers(min_value=1, max_value=5_000),
    per_record=st.integers(min_value=1, max_value=20),
)
def test_laid_out_records_split_back_into_the_same_bytes(
    size: int, frame_size: int, per_record: int
) -> None:
    """Filled slots, split as the receiver splits a record, give the bytes back in order."""
    payload = os.urandom(size)
    records, slots = lay_out(5, size, frame_size, per_record)
    position = 0
    for slot in slots:
        slot[:] = payload[position : position + len(slot)]
        position += len(slot)
    assert position == size
    received = b""
    for record in records:
        items = split_record(bytes(record.buffer), frame_size)
        payloads = [
            view
            for item in items
            for view in (item.payloads if isinstance(item, DataRun) else [item.payload])
        ]
        assert all(item.stream_id == 5 and not item.flags for item in items)
        assert len(payloads) == record.frames <= per_record
        assert sum(map(len, payloads)) == record.payload
        # Every frame full but the very last one.
        received += b"".join(bytes(view) for view in payloads)
    assert received == payload
    assert [len(slot) for slot in slots[:-1]] == [frame_size] * (len(slots) - 1)


@pytest.mark.parametrize("window", [64 * 1024, 100_000, 4 * 1024 * 1024])
@pytest.mark.parametrize("chunk", [1024, 16 * 1024, 64 * 1024, 1024 * 1024])
def test_a_laid_out_record_fits_one_sealed_record_and_the_window(window: int, chunk: int) -> None:
    """Whatever the window and chunk size, a record's frames fit the peer's record
    limit (its largest frame + header + slack) and its credit fits the window, so
    the sender can always send it."""
    max_frame_size = 1024 * 1024
    stream = OutgoingStream(1, window, max_frame_size, _never)
    frame, per_record = stream.record_shape(chunk)
    records, _ = lay_out(1, 3 * per_record * frame + 7, frame, per_record)
    writer = FrameWriter()
    writer.start_encryption(bytes(32), max_frame_size)
    for record in records:
        assert len(record.buffer) <= writer.record_limit
        assert record.payload + record.frames * FRAME_COST <= window
        assert record.frames <= per_record
    # Sixteen 64 KiB chunks per record with the defaults (one record per MiB).
    if window == 4 * 1024 * 1024 and chunk == 64 * 1024:
        assert (frame, per_record) == (chunk, 16)


def test_record_buffers_are_reused_only_once_nothing_refers_to_them() -> None:
    """A sender's large records are laid out in kept mappings: one is handed out
    again only when no view of it (the record, a slot, the writer's piece) is
    left, so a record queued or being sealed never changes; small ones are fresh."""
    buffers = RecordBuffers()
    frame, per_record = 64 * 1024, 16
    first, slots = lay_out(3, 2 * per_record * frame, frame, per_record, buffers)
    assert [type(record.buffer) for record in first] == [memoryview, memoryview]
    for index, slot in enumerate(slots):
        slot[:] = bytes([index]) * len(slot)
    held = first[1].buffer  # e.g. still queued for the writer
    assert isinstance(held, memoryview)
    kept = [bytes(record.buffer) for record in first]
    mappings = {id(record.buffer.obj) for record in first}  # type: ignore[union-attr]
    del first, slots
    second, slots = lay_out(3, 2 * per_record * frame, frame, per_record, buffers)
    for slot in slots:
        slot[:] = b"\xff" * len(slot)
    assert bytes(held) == kept[1]  # never handed out while held
    reused = {id(record.buffer.obj) for record in second}  # type: ignore[union-attr]
    assert id(held.obj) not in reused and len(reused & mappings) == 1
    # The records still split back into their frames and bytes.
    payload = b"".join(
        bytes(view)
        for record in second
        for item in split_record(bytes(record.buffer), frame)
        for view in (item.payloads if isinstance(item, DataRun) else [item.payload])
    )
    assert payload == b"\xff" * (2 * per_record * frame)
    # A short last record fits a kept mapping; a small one is plain bytes.
    del second, slots
    short, _ = lay_out(3, 100 * 1024, frame, per_record, buffers)
    assert id(short[0].buffer.obj) in mappings | reused  # type: ignore[union-attr]
    tiny, _ = lay_out(3, 1000, frame, per_record, buffers)
    assert type(tiny[0].buffer) is bytearray


async def _never(batch: object) -> None:
    raise AssertionError("nothing is sent here")
