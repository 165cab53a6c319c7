"""The connection's rules with no sockets: two sans-IO state machines driven against each other.

In the style of h11's ``ConnectionPair``: a client and a server
:class:`~conduit.protocol.connection.ConnectionState` start as if the handshake
had just finished; whatever frames one produces are parsed the way the engine
parses a decrypted record (:func:`~conduit.protocol.codec.iter_frames`) and fed
to the other. The hostile-peer cases here were moved from
``tests/test_hostile_peers.py`` (which keeps one real-socket case per feature):
where the engine would log ``protocol error: <reason>`` and close, the machine
raises :class:`~conduit.errors.RemoteProtocolError` with that reason, before
any later frame can reach a handler.
"""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import attrs
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conduit.errors import LocalProtocolError, RemoteProtocolError, RPCError, StreamReset
from conduit.protocol import FRAME_COST, MAX_STREAM_ID, Frame, FrameKind, connection, decode_body
from conduit.protocol.codec import (
    CONTAINER_OVERHEAD,
    COUNTED_BODY,
    ITEM_OVERHEAD,
    HoldsTooMuch,
    data_header,
    iter_frames,
    unpack_sized,
)
from conduit.protocol.connection import (
    MAX_EARLY_RESETS,
    MAX_PEER_TEXT,
    SERVER_BUDGET_REFUSAL,
    UNCOUNTABLE_RESULT,
    UNCOUNTED_CALL_BYTES,
    USER_BUDGET_REFUSAL,
    CallCancelled,
    CallMemory,
    CallReceived,
    CallRefused,
    CallShare,
    ConnectionState,
    Event,
    GoodbyeReceived,
    InboundStream,
    MessageReceived,
    OutboundStream,
    Phase,
    PingReceived,
    PongReceived,
    ReceiveMemory,
    ResultMustWait,
    ResultReceived,
    ResultsInHand,
    StreamWasReset,
    peer_text,
)
from conduit.protocol.frames import HEADER_SIZE
from conduit.protocol.messages import Pong, Result
from hostile_helpers import body_frame, call_frame, raw_header

WINDOW = 64 * 1024
MAX_FRAME = 64 * 1024


def machine(*, is_client: bool, max_calls: int = 8, **limits: Any) -> ConnectionState:
    """A machine in the authenticated state, both sides with the same limits
    (``limits``: further ConnectionState limits, e.g. ``receive_budget``)."""
    return ConnectionState(
        is_client=is_client,
        receive_window=WINDOW,
        peer_receive_window=WINDOW,
        peer_max_frame_size=MAX_FRAME,
        max_concurrent_calls=max_calls,
        **limits,
    )


@attrs.define
class Pair:
    """A client and a server machine, and the wire between them."""

    client: ConnectionState
    server: ConnectionState

    def deliver(self, to: ConnectionState, *frames: bytes) -> list[Event]:
        """Feed ``frames`` (as one decrypted record) to ``to``; the events it returned."""
        events: list[Event] = []
        for frame in iter_frames(b"".join(frames), MAX_FRAME):
            event = to.receive_frame(frame)
            if event is not None:
                events.append(event)
        return events

    def deliver_one(self, to: ConnectionState, frame: bytes) -> Event | None:
        """Feed one frame; its event, or None."""
        events = self.deliver(to, frame)
        assert len(events) <= 1
        return events[0] if events else None


@pytest.fixture
def pair() -> Pair:
    return Pair(machine(is_client=True), machine(is_client=False, max_calls=4))


def protocol_error(to: ConnectionState, pair: Pair, *frames: bytes) -> str:
    """Deliver ``frames``; they must break the rules. The engine's close reason."""
    with pytest.raises(RemoteProtocolError) as info:
        pair.deliver(to, *frames)
    return f"protocol error: {info.value}"


# ------------------------------------------------------------------ calls


def test_call_and_result_round_trip(pair: Pair) -> None:
    call_id, frame = pair.client.start_call("add", {"a": 1, "b": 2})
    event = pair.deliver_one(pair.server, frame)
    assert isinstance(event, CallReceived)
    assert event.call_id == call_id == 1
    assert (event.method, event.args) == ("add", {"a": 1, "b": 2})
    pair.server.call_finished(call_id)
    reply = pair.deliver_one(pair.client, pair.server.result_frame(call_id, Result(True, 3)))
    assert reply == ResultReceived(call_id, Result(True, 3))


def test_call_ids_are_allocated_per_side(pair: Pair) -> None:
    assert [pair.client.start_call("m", {})[0] for _ in range(3)] == [1, 2, 3]
    assert [pair.server.start_call("m", {})[0] for _ in range(2)] == [1, 2]


def test_call_id_reused_while_running_is_a_protocol_error(pair: Pair) -> None:
    """Moved from test_hostile_peers: 'call id 1 is already in use', the duplicate never runs."""
    pair.deliver(pair.server, call_frame(1, "sleep", seconds=3))
    with pytest.raises(RemoteProtocolError, match="call id 1 is already in use"):
        pair.deliver(pair.server, call_frame(1, "record", tag="dup"))


def test_call_id_is_free_again_once_the_call_finished(pair: Pair) -> None:
    assert isinstance(pair.deliver_one(pair.server, call_frame(1, "a")), CallReceived)
    pair.server.call_finished(1)
    assert isinstance(pair.deliver_one(pair.server, call_frame(1, "b")), CallReceived)


def test_finish_value_frees_the_call_id_and_gives_its_result_frame(pair: Pair) -> None:
    assert isinstance(pair.deliver_one(pair.server, call_frame(1, "a")), CallReceived)
    with pytest.raises(RemoteProtocolError, match="call id 1 is already in use"):
        pair.deliver(pair.server, call_frame(1, "dup"))
    frame = pair.server.finish_value(1, {"x": 1})
    assert frame == pair.server.value_frame(1, {"x": 1})
    assert pair.deliver_one(pair.client, frame) == ResultReceived(1, Result(True, {"x": 1}))
    assert isinstance(pair.deliver_one(pair.server, call_frame(1, "b")), CallReceived)


def test_calls_over_the_concurrency_limit_are_refused_with_overloaded(pair: Pair) -> None:
    events = pair.deliver(pair.server, *(call_frame(i, "sleep") for i in range(1, 11)))
    accepted = [e for e in events if isinstance(e, CallReceived)]
    refused = [e for e in events if isinstance(e, CallRefused)]
    assert [e.call_id for e in accepted] == [1, 2, 3, 4]
    assert [e.call_id for e in refused] == list(range(5, 11))
    replies = pair.deliver(pair.client, *(e.reply for e in refused))
    assert all(isinstance(r, ResultReceived) and r.result.code == "overloaded" for r in replies)
    # A finished call makes room again.
    pair.server.call_finished(2)
    assert isinstance(pair.deliver_one(pair.server, call_frame(11, "x")), CallReceived)


def test_cancel_reaches_only_calls_still_active(pair: Pair) -> None:
    pair.deliver(pair.server, call_frame(1, "sleep"))
    cancel = pair.client.cancel_call(1)
    assert cancel is not None
    assert pair.deliver_one(pair.server, cancel) == CallCancelled(1)
    pair.server.call_finished(1)
    assert pair.deliver_one(pair.server, cancel) is None


def test_a_result_too_large_to_send_becomes_bad_result(pair: Pair) -> None:
    frame = pair.server.result_frame(1, Result(True, b"x" * (MAX_FRAME + 1)))
    event = pair.deliver_one(pair.client, frame)
    assert isinstance(event, ResultReceived)
    assert (event.result.ok, event.result.code) == (False, "bad_result")


def test_a_call_too_large_for_the_peer_is_refused_locally(pair: Pair) -> None:
    with pytest.raises(LocalProtocolError, match="exceeds the peer's max_frame_size"):
        pair.client.start_call("big", {"data": b"x" * (MAX_FRAME + 1)})


def test_messages(pair: Pair) -> None:
    frame = pair.client.message_frame("tick", [1, 2])
    assert pair.deliver_one(pair.server, frame) == MessageReceived("tick", [1, 2])


# ------------------------------------------------------------------ streams and credit


def inbound(state: ConnectionState) -> InboundStream:
    return state.open_inbound(InboundStream)


def outbound(state: ConnectionState, stream_id: int) -> OutboundStream:
    return state.open_outbound(stream_id, OutboundStream)


def data(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return data_header(stream_id, len(payload), flags) + payload


def test_stream_ids_are_allocated_by_the_receiver_odd_by_clients_even_by_servers(
    pair: Pair,
) -> None:
    assert [inbound(pair.client).stream_id for _ in range(3)] == [1, 3, 5]
    assert [inbound(pair.server).stream_id for _ in range(3)] == [2, 4, 6]


def test_data_and_credit_flow(pair: Pair) -> None:
    receiving = inbound(pair.server)
    sending = outbound(pair.client, receiving.stream_id)
    assert sending.credit == WINDOW
    assert sending.max_payload == WINDOW - FRAME_COST
    event = pair.deliver_one(pair.server, data(receiving.stream_id, b"abc"))
    assert event is receiving  # the stream itself is the event: nothing allocated per frame
    assert receiving.available == WINDOW - 3 - FRAME_COST
    assert receiving.take() == ([b"abc"], None)
    receiving.consumed()
    amount = receiving.credit_to_return(force=True)
    assert amount == 3 + FRAME_COST
    credit = pair.server.credit_frame(receiving.stream_id, amount)
    assert credit is not None
    sending.credit -= amount  # what OutgoingStream.send spent
    assert pair.deliver_one(pair.client, credit) is sending
    assert sending.credit == WINDOW
    end = pair.deliver_one(pair.server, data(receiving.stream_id, b"trailer", flags=1))
    assert end is receiving and receiving.finished and receiving.trailer == b"trailer"


def test_credit_returns_in_quarter_windows_unless_forced(pair: Pair) -> None:
    receiving = inbound(pair.server)
    pair.deliver(pair.server, data(receiving.stream_id, b"x" * 100))
    receiving.take()
    receiving.consumed()
    assert receiving.credit_to_return(force=False) == 0
    assert receiving.credit_to_return(force=True) == 100 + FRAME_COST


def test_data_beyond_the_credit_window(pair: Pair) -> None:
    receiving = inbound(pair.server)
    payload = b"\xab" * (WINDOW - FRAME_COST + 1)
    reason = protocol_error(pair.server, pair, data(receiving.stream_id, payload))
    assert f"peer exceeded the credit window on stream {receiving.stream_id}" in reason


def test_data_after_the_end_of_a_stream(pair: Pair) -> None:
    receiving = inbound(pair.server)
    pair.deliver(pair.server, data(receiving.stream_id, b"", flags=1))
    reason = protocol_error(pair.server, pair, data(receiving.stream_id, b"more"))
    assert f"data after the end of stream {receiving.stream_id}" in reason


@pytest.mark.parametrize("stream_id", [7, 0, MAX_STREAM_ID], ids=["odd-client-side", "zero", "max"])
def test_data_for_a_stream_never_opened(pair: Pair, stream_id: int) -> None:
    """Moved from test_hostile_peers (which keeps the 'never-opened' id over a socket)."""
    reason = protocol_error(
        pair.server, pair, data(stream_id, b"hello"), data(stream_id, b"t" * 40, flags=1)
    )
    assert f"data for stream {stream_id}, which was never opened" in reason


def test_data_for_our_closed_stream_is_ignored(pair: Pair) -> None:
    receiving = inbound(pair.server)
    assert pair.server.close_stream(receiving, None) is None
    assert pair.deliver(pair.server, data(receiving.stream_id, b"late")) == []


def test_small_payloads_are_copied_out_of_the_record_that_holds_them() -> None:
    """Credit counts payload bytes; a view would keep its whole record alive."""
    stream = InboundStream(1, 1 << 20)
    record = bytes(64 * 1024)  # a decrypted record: one byte of data, the rest padding
    stream.on_data(memoryview(record)[:1], 0)
    full = bytes(64 * 1024)  # a record of data: kept as a view, never copied
    stream.on_data(memoryview(full)[: len(full) // 2], 0)
    stream.on_data_run([memoryview(record)[10:20], memoryview(record)[20:30]], 20)
    stream.on_data_run([memoryview(full)[:30000], memoryview(full)[30000:]], len(full))
    chunks, _ = stream.take()
    assert [type(chunk) for chunk in chunks] == [bytes, memoryview, bytes, bytes] + [memoryview] * 2
    assert [len(chunk) for chunk in chunks] == [1, 32 * 1024, 10, 10, 30000, len(full) - 30000]


def test_a_runs_small_frames_are_copied_not_kept_as_views() -> None:
    """A view is an object of about 200 bytes beside its data, which a frame's
    credit (its payload + FRAME_COST, 64) does not cover: a run's frames under
    VIEW_MIN are copied (an empty one or a byte costs no allocation at all).
    Views of 10,000 empty and one-byte frames beside one filling half the
    record held 3.2 MB (tracemalloc) on a credit of 645 KB."""
    stream = InboundStream(1, 1 << 30)
    record = bytes(1 << 20)
    tiny_sizes = [i % 2 for i in range(10_000)]
    tiny_credit = sum(size + FRAME_COST for size in tiny_sizes)
    tracemalloc.start()
    try:
        # The frames' views are made here, as the record's split makes them,
        # and live on only if the stream keeps them.
        run = [memoryview(record)[: 1 << 19]]
        run += [memoryview(record)[(1 << 19) + i :][:size] for i, size in enumerate(tiny_sizes)]
        stream.on_data_run(run, sum(len(view) for view in run))
        del run
        chunks, _ = stream.take()
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert type(chunks[0]) is memoryview  # half the record: kept as it is
    assert all(type(chunk) is bytes for chunk in chunks[1:])
    assert b"".join(chunks[1:]) == bytes(sum(tiny_sizes))
    assert held < tiny_credit // 2  # the list of chunks, nothing per frame


# A record's pieces: (payload bytes, how the stream gets them); the record's
# buffer also holds padding that nothing keeps (frames of other kinds, DATA
# for a stream reset meanwhile).
_PIECE = st.tuples(st.integers(1, 40_000), st.sampled_from(["frame", "run"]))


@settings(max_examples=200, deadline=None)
@given(
    records=st.lists(
        st.tuples(st.lists(_PIECE, min_size=1, max_size=4), st.integers(0, 300_000)),
        min_size=1,
        max_size=6,
    )
)
def test_what_a_stream_keeps_alive_is_at_most_twice_its_payload(
    records: list[tuple[list[tuple[int, str]], int]],
) -> None:
    """However a peer lays out and pads its records, the buffers the kept
    payloads hold (views) or are (copies) come to at most twice the payload
    bytes. With PIN_RATIO 8 a payload of a seventh of its record was kept as
    a view, pinning seven times itself."""
    stream = InboundStream(1, 1 << 30)
    for pieces, padding in records:
        buffer = bytes(sum(size for size, _ in pieces) + padding)
        offset = 0
        for size, how in pieces:
            payload = memoryview(buffer)[offset : offset + size]
            offset += size
            if how == "frame":
                stream.on_data(payload, 0)
            else:
                stream.on_data_run([payload[: size // 2], payload[size // 2 :]], size)
    chunks, _ = stream.take()
    payload_bytes = sum(len(chunk) for chunk in chunks)
    alive = {
        id(chunk.obj): memoryview(chunk.obj).nbytes
        for chunk in chunks
        if isinstance(chunk, memoryview)
    }
    copied = sum(len(chunk) for chunk in chunks if not isinstance(chunk, memoryview))
    assert sum(alive.values()) + copied <= 2 * payload_bytes


def test_large_calls_are_admitted_by_what_they_hold_decoded(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "LARGE_CALL_BYTES", 3 * 1024 * 1024)
    strings = ["ab"] * 20_000  # 60 KB on the wire, about 1.3 MB decoded
    first, second, third = (
        pair.deliver_one(pair.server, call_frame(call_id, "store", items=strings))
        for call_id in (1, 3, 5)
    )
    assert isinstance(first, CallReceived) and isinstance(second, CallReceived)
    assert isinstance(third, CallRefused)  # 3 x 1.3 MB > 3 MiB
    refusal = decode_body(iter_frames(third.reply, MAX_FRAME)[0], Result)
    assert refusal.code == "overloaded" and "bytes of arguments are running" in refusal.error
    small = pair.deliver_one(pair.server, call_frame(7, "ping"))
    assert isinstance(small, CallReceived)  # small calls are not counted
    pair.server.call_finished(1)
    assert isinstance(
        pair.deliver_one(pair.server, call_frame(9, "store", items=strings)), CallReceived
    )
    pair.server.finish_value(3, None)
    pair.server.finish_value(9, None)
    lone = call_frame(11, "store", items=["ab"] * 21_000)
    assert isinstance(pair.deliver_one(pair.server, lone), CallReceived)  # alone: any size


def _truncated_call(call_id: int, maps: int) -> bytes:
    """A CALL whose argument is a list of ``maps`` empty maps with its last one
    missing: malformed, but only at its very end."""
    whole: bytes = msgpack.packb({"method": "store", "args": {"items": [{}] * maps}})
    body = whole[:-1]
    return raw_header(FrameKind.CALL, call_id, len(body)) + body


@pytest.mark.parametrize("limit", ["own-bound", "server-memory", "user-share"])
def test_a_call_that_will_be_refused_is_not_decoded_past_the_room_left(
    limit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While large calls hold the room (the connection's own bound, the
    server's call memory, or the user's share of it, here held by another
    connection), a large CALL is refused as soon as what it holds decoded
    passes what is left (never under UNCOUNTED_CALL_BYTES): the rest of its
    body is not decoded. This one is cut short at its end, which a full
    decoding reports as a protocol error; so it is when there is room."""
    memory: CallMemory | None = None
    if limit == "own-bound":
        monkeypatch.setattr(connection, "LARGE_CALL_BYTES", 1024 * 1024)
    elif limit == "server-memory":
        memory = CallMemory(1024 * 1024)
    else:
        memory = CallShare(1024 * 1024, CallMemory(64 * 1024 * 1024))
    holder = machine(is_client=False, call_memory=memory)
    server = holder if limit == "own-bound" else machine(is_client=False, call_memory=memory)
    wire = Pair(machine(is_client=True), server)
    holding = ["ab"] * 20_000  # 60 KB on the wire, 1.3 MB by the count: a lone call
    assert isinstance(wire.deliver_one(holder, call_frame(1, "store", items=holding)), CallReceived)
    refused = wire.deliver_one(server, _truncated_call(3, 2_000))  # 272 KB by the count
    assert isinstance(refused, CallRefused)
    refusal = decode_body(iter_frames(refused.reply, MAX_FRAME)[0], Result)
    expected = {
        "own-bound": "bytes of arguments are running",
        "server-memory": SERVER_BUDGET_REFUSAL,
        "user-share": USER_BUDGET_REFUSAL,
    }[limit]
    assert refusal.code == "overloaded" and expected in refusal.error
    # Under UNCOUNTED_CALL_BYTES a call is admitted whatever the others hold,
    # so it is decoded whole: this malformed one is found so.
    with pytest.raises(RemoteProtocolError, match="malformed msgpack body"):
        wire.deliver_one(server, _truncated_call(5, 400))
    holder.call_finished(1)
    with pytest.raises(RemoteProtocolError, match="malformed msgpack body"):
        wire.deliver_one(machine(is_client=False, call_memory=memory), _truncated_call(7, 2_000))


@pytest.mark.parametrize("case", ["own-bound-first", "share-first"])
def test_a_call_stopped_early_is_refused_for_the_reason_a_whole_one_would_be(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding stops at the room of the first limit the refusal names, not
    the smallest room: the connection's own bound while its own large calls
    hold some (then the server's call memory), a user's share while it holds
    some (then the server's). So a call over both is told the reason a whole
    decoding tells it, and the transfer code waits for what that reason
    says (its own connection's calls, or the call memory). Found by the
    review of the change that stops decoding: stopped at the smaller room,
    both calls here were told the server's call memory was full."""
    holding = ["ab"] * 20_000  # 1.3 MB by the count
    server = CallMemory(1536 * 1024 if case == "own-bound-first" else 3 * 1024 * 1024)
    if case == "own-bound-first":
        monkeypatch.setattr(connection, "LARGE_CALL_BYTES", 2 * 1024 * 1024)
        memory: CallMemory = server
    else:
        server.take(1536 * 1024)  # other users' calls
        memory = CallShare(2 * 1024 * 1024, server)
    holder = machine(is_client=False, call_memory=memory)
    wire = Pair(machine(is_client=True), holder)
    assert isinstance(wire.deliver_one(holder, call_frame(1, "store", items=holding)), CallReceived)
    # The server's room is now the smaller: 0.2 MB (0.4 MB shared), against
    # 0.8 MB left by the connection's own bound (the user's share).
    receiver = holder if case == "own-bound-first" else machine(is_client=False, call_memory=memory)
    # Maps, each counted as it ends: a decoding stopped early stops among them.
    maps: list[dict[str, int]] = [{}] * 10_000  # 1.37 MB by the count
    refused = wire.deliver_one(receiver, call_frame(3, "store", items=maps))
    assert isinstance(refused, CallRefused)
    refusal = decode_body(iter_frames(refused.reply, MAX_FRAME)[0], Result)
    expected = (
        "bytes of arguments are running" if case == "own-bound-first" else USER_BUDGET_REFUSAL
    )
    assert expected in refusal.error, refusal.error


def test_unpack_sized_stops_past_its_limit() -> None:
    """With a limit, decoding stops once the part decoded holds more than it
    by the bound (HoldsTooMuch, with what that part held); within it, the
    value and its bound are those of a decoding without one."""
    data = msgpack.packb({"a": [{}] * 10_000, "b": ["xy"] * 100})
    value, bound = unpack_sized(data)
    assert unpack_sized(data, bound) == (value, bound)
    with pytest.raises(HoldsTooMuch) as stopped:
        unpack_sized(data, 100_000)
    assert 100_000 < stopped.value.held < 100_000 + CONTAINER_OVERHEAD + ITEM_OVERHEAD
    assert stopped.value.held < bound
    with pytest.raises(HoldsTooMuch):  # its bytes alone are over
        unpack_sized(data, len(data) - 1)


def test_a_result_nobody_awaits_is_dropped_unread(pair: Pair) -> None:
    """With ``calls_in_use`` set (the engine's table of pending calls), a
    RESULT for another id (a call given up on, or never made) is dropped
    without being decoded: this one is malformed, which decoding reports.
    A machine driven alone (``calls_in_use`` None) decodes every RESULT."""
    malformed = raw_header(FrameKind.RESULT, 7, 1) + b"\xc1"  # a byte msgpack never uses
    with pytest.raises(RemoteProtocolError, match="malformed"):
        pair.deliver_one(pair.client, malformed)
    client = machine(is_client=True)
    wire = Pair(client, machine(is_client=False))
    client.calls_in_use = {5: None}
    assert wire.deliver_one(client, malformed) is None
    assert wire.deliver_one(client, body_frame(FrameKind.RESULT, 9, {"ok": True})) is None
    answered = wire.deliver_one(client, body_frame(FrameKind.RESULT, 5, {"ok": True, "value": 2}))
    assert answered == ResultReceived(5, Result(True, 2))
    with pytest.raises(RemoteProtocolError, match="malformed"):
        wire.deliver_one(client, raw_header(FrameKind.RESULT, 5, 1) + b"\xc1")


def _truncated_result(call_id: int, maps: int) -> bytes:
    """A RESULT whose value is a list of ``maps`` empty maps with its last one
    missing: malformed, but only at its very end."""
    whole: bytes = msgpack.packb({"ok": True, "value": [{}] * maps})
    body = whole[:-1]
    return raw_header(FrameKind.RESULT, call_id, len(body)) + body


def test_large_results_count_in_hand_until_taken_and_wait_past_the_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The RESULTs of one endpoint's connections (one :class:`ResultsInHand`)
    holding over UNCOUNTED_CALL_BYTES decoded count there until the engine
    releases them (their callers took them): a lone one of any size is let
    in; while others are held, one past the room left is not decoded
    further (this one is malformed at its very end, which a whole decoding
    finds) and must wait. Small ones are never counted."""
    monkeypatch.setattr(connection, "RESULTS_IN_HAND_BYTES", 1024 * 1024)
    hand = ResultsInHand()
    first, second = (machine(is_client=True, results_in_hand=hand) for _ in range(2))
    for side in (first, second):
        side.calls_in_use = {1: None, 3: None, 5: None}
    wire = Pair(first, machine(is_client=False))
    lone = wire.deliver_one(
        first, body_frame(FrameKind.RESULT, 1, {"ok": True, "value": [{}] * 20_000})
    )
    assert isinstance(lone, ResultReceived) and lone.result.value == [{}] * 20_000
    assert lone.held > 1024 * 1024 and hand.held == lone.held  # over the limit: a lone one
    small = wire.deliver_one(
        second, body_frame(FrameKind.RESULT, 3, {"ok": True, "value": "x" * 1000})
    )
    assert small == ResultReceived(3, Result(True, "x" * 1000)) and hand.held == lone.held
    assert wire.deliver_one(second, _truncated_result(5, 2_000)) == ResultMustWait(5)
    hand.release(lone.held)
    with pytest.raises(RemoteProtocolError, match="malformed msgpack body"):
        wire.deliver_one(second, _truncated_result(5, 2_000))
    whole = wire.deliver_one(
        second, body_frame(FrameKind.RESULT, 5, {"ok": True, "value": [{}] * 2_000})
    )
    assert isinstance(whole, ResultReceived) and hand.held == whole.held > UNCOUNTED_CALL_BYTES


def test_a_result_decoded_uncounted_cannot_hold_what_would_be_counted() -> None:
    """A RESULT of at most UNCOUNTABLE_RESULT bytes is decoded without
    counting: of the shapes that hold the most a byte (empty maps and lists
    in a list, strings of one character beyond ASCII), one of that size
    holds at most UNCOUNTED_CALL_BYTES by unpack_sized's bound, and one a
    byte larger may hold more."""

    def body(item: bytes, extra: int = 0) -> bytes:
        # A list of as many items as fit, then nils (1 byte each) to the size.
        room = UNCOUNTABLE_RESULT + extra - 5
        count, nils = divmod(room, len(item))
        return b"\xdd" + struct.pack("!I", count + nils) + item * count + b"\xc0" * nils

    for item in (b"\x80", b"\x90", "é".encode().join([b"\xa2", b""]), b"\xd4\x01\x01"):
        assert len(body(item)) == UNCOUNTABLE_RESULT
        assert unpack_sized(body(item))[1] <= UNCOUNTED_CALL_BYTES, item
    assert unpack_sized(body(b"\x80", 137))[1] > UNCOUNTED_CALL_BYTES


def test_large_calls_of_all_connections_share_the_servers_call_memory() -> None:
    """Connections given one :class:`CallMemory` (a server's
    ``server_call_budget``) admit large calls while all of them together hold
    at most its limit: a call that fits its own connection's bound is refused
    when the others hold the rest, and admitted once one of theirs finishes.
    What a connection's calls still hold when its engine ends leaves the
    memory (``release_calls``); small calls are not counted."""
    memory = CallMemory(3 * 1024 * 1024)
    first, second = (machine(is_client=False, call_memory=memory) for _ in range(2))
    wire = Pair(machine(is_client=True), first)
    strings = ["ab"] * 20_000  # 60 KB on the wire, about 1.3 MB decoded
    assert isinstance(wire.deliver_one(first, call_frame(1, "store", items=strings)), CallReceived)
    one = memory.held
    assert one > 1_000_000
    assert isinstance(wire.deliver_one(second, call_frame(1, "store", items=strings)), CallReceived)
    assert memory.held == 2 * one
    refused = wire.deliver_one(first, call_frame(3, "store", items=strings))
    assert isinstance(refused, CallRefused)  # first holds one: its own bound has room
    refusal = decode_body(iter_frames(refused.reply, MAX_FRAME)[0], Result)
    assert refusal.code == "overloaded"
    assert "the server's calls and messages hold" in refusal.error
    assert isinstance(wire.deliver_one(first, call_frame(5, "ping")), CallReceived)
    assert memory.held == 2 * one  # the small call is not counted
    second.finish_value(1, None)
    assert memory.held == one
    assert isinstance(wire.deliver_one(first, call_frame(7, "store", items=strings)), CallReceived)
    assert memory.held == 2 * one
    first.drop_streams()  # the connection is over; its handlers may still run
    assert memory.held == 2 * one
    first.call_finished(1)
    assert memory.held == one
    first.release_calls()  # the engine ended: call 7 never said it finished
    assert memory.held == 0
    first.call_finished(7)  # a late word changes nothing
    assert memory.held == 0


def test_a_lone_call_of_any_size_fits_the_servers_call_memory() -> None:
    """While the server holds nothing, a call larger than its whole call
    memory is admitted (the largest frame may decode to ~72 times its
    bytes); a second then waits for it."""
    memory = CallMemory(1024 * 1024)
    server = machine(is_client=False, call_memory=memory)
    wire = Pair(machine(is_client=True), server)
    strings = ["ab"] * 20_000
    assert isinstance(wire.deliver_one(server, call_frame(1, "store", items=strings)), CallReceived)
    assert memory.held > memory.limit
    other = machine(is_client=False, call_memory=memory)
    small = ["ab"] * 2_000  # over COUNTED_BODY, about 130 KB decoded
    assert isinstance(wire.deliver_one(other, call_frame(1, "store", items=small)), CallRefused)
    server.call_finished(1)
    assert isinstance(wire.deliver_one(other, call_frame(1, "store", items=small)), CallReceived)


def test_each_users_share_bounds_what_its_connections_hold() -> None:
    """Connections given one user's :class:`CallShare` of the server's
    :class:`CallMemory` admit large calls while that user's calls hold at
    most the share's limit, and while the server's hold at most its own:
    the user over its share is refused with its own reason while another
    user's calls are admitted; a server full of other users' calls refuses
    with the server's reason; a user holding nothing is let one call past
    its share. Everything taken comes back out of both."""
    memory = CallMemory(4 * 1024 * 1024 + 512 * 1024)
    strings = ["ab"] * 20_000  # 60 KB on the wire, about 1.3 MB decoded
    shares = [CallShare(3 * 1024 * 1024, memory) for _ in range(3)]
    # Two connections of the first user, one of each other user.
    first, first_again, second, third = (
        machine(is_client=False, call_memory=share)
        for share in (shares[0], shares[0], shares[1], shares[2])
    )
    wire = Pair(machine(is_client=True), first)

    def reason(event: object) -> str:
        assert isinstance(event, CallRefused)
        refusal = decode_body(iter_frames(event.reply, MAX_FRAME)[0], Result)
        assert refusal.code == "overloaded"
        return refusal.error or ""

    def store(server: ConnectionState, call_id: int) -> object:
        return wire.deliver_one(server, call_frame(call_id, "store", items=strings))

    assert isinstance(store(first, 1), CallReceived)
    one = shares[0].held
    assert 1_000_000 < one < 1_500_000 and memory.held == one
    assert isinstance(store(first_again, 1), CallReceived)  # the share holds two
    # A third from either connection of the first user: each one's own bound
    # has room, and so has the server; the user's share has not.
    assert reason(store(first_again, 3)) == USER_BUDGET_REFUSAL
    assert reason(store(first, 3)) == USER_BUDGET_REFUSAL
    assert isinstance(store(second, 1), CallReceived)  # another user's runs
    assert memory.held == 3 * one and shares[1].held == one
    # The server holds three, and a fourth is past its limit: the third
    # user, holding nothing, is refused for what the others hold.
    assert reason(store(third, 1)) == SERVER_BUDGET_REFUSAL
    first.call_finished(1)
    first_again.call_finished(1)
    assert shares[0].held == 0 and memory.held == one
    assert isinstance(store(third, 3), CallReceived)
    assert isinstance(store(second, 3), CallReceived)
    assert memory.held == 3 * one and shares[1].held == 2 * one
    second.release_calls()  # its engine ended
    third.call_finished(3)
    assert memory.held == shares[1].held == shares[2].held == 0
    # A user holding nothing is let one call of any size past its share.
    lone = CallShare(1024, memory)
    alone = machine(is_client=False, call_memory=lone)
    assert isinstance(store(alone, 1), CallReceived)
    assert lone.held == memory.held == one
    assert reason(store(alone, 3)) == USER_BUDGET_REFUSAL
    alone.call_finished(1)
    assert lone.held == memory.held == 0


def test_the_overdraft_is_twice_the_limit_of_the_share_and_of_the_server() -> None:
    """What the engine lets in past the limit (a connection's first queued
    message, one more while answers are awaited) must fit the overdraft:
    twice the limit of the user's share and of the server's memory, what
    the asking connection holds itself not counted, or anything while
    nothing else is held."""
    memory = CallMemory(1000)
    assert memory.admits_overdraft(5000, 0)  # nothing held: any size
    memory.take(900)
    assert not memory.admits(101) and memory.admits(100)
    assert memory.admits_overdraft(1100, 0) and not memory.admits_overdraft(1101, 0)
    # What the asking connection holds is left out: only its own end frees it.
    assert memory.admits_overdraft(1500, 400) and not memory.admits_overdraft(1501, 400)
    assert memory.admits_overdraft(10**9, 900)  # it holds all there is
    share = CallShare(300, memory)
    assert share.admits_overdraft(1100, 0) and not share.admits_overdraft(1101, 0)  # the server's
    share.take(500)
    assert (memory.held, share.held) == (1400, 500)
    assert not share.admits(1)
    assert share.admits_overdraft(100, 0) and not share.admits_overdraft(101, 0)  # the share's
    assert share.admits_overdraft(300, 200) and not share.admits_overdraft(301, 200)
    memory.take(590)
    assert share.admits_overdraft(10, 0) and not share.admits_overdraft(11, 0)  # the server's
    assert share.admits_overdraft(210, 200) and not share.admits_overdraft(211, 200)
    share.release(500)
    memory.release(1490)
    assert memory.held == share.held == 0


def test_small_bodies_count_what_they_hold_decoded() -> None:
    """A MESSAGE of any size counts ``unpack_sized``'s bound, not its bytes
    on the wire (200 bytes of empty maps hold about 27 KB by it); a CALL
    counts it when it is over UNCOUNTED_CALL_BYTES (1 KiB of empty maps: 137
    KB), and runs uncounted under it (a kilobyte of bytes, as a small file's
    upload)."""
    memory = CallMemory(64 * 1024 * 1024)
    server = machine(is_client=False, call_memory=memory)
    wire = Pair(machine(is_client=True), server)
    shapes: list[list[dict[str, int]]] = [[{}] * 200, [{}] * 4_000]
    for maps in shapes:
        message = body_frame(FrameKind.MESSAGE, 0, {"event": "e", "data": maps})
        event = wire.deliver_one(server, message)
        assert isinstance(event, MessageReceived) and event.data == maps
        _, bound = unpack_sized(message[HEADER_SIZE:])
        assert event.size == bound > len(maps) * CONTAINER_OVERHEAD
    upload = call_frame(1, "upload", name="a.bin", data=b"x" * 1024)
    assert len(upload) - HEADER_SIZE > COUNTED_BODY
    assert isinstance(wire.deliver_one(server, upload), CallReceived)
    assert memory.held == 0
    maps_call = call_frame(2, "m", items=[{}] * 1_000)
    held = unpack_sized(maps_call[HEADER_SIZE:])[1]
    assert len(maps_call) - HEADER_SIZE < 1_100 and held > UNCOUNTED_CALL_BYTES
    assert isinstance(wire.deliver_one(server, maps_call), CallReceived)
    assert memory.held == held
    server.call_finished(2)
    assert memory.held == 0
    # 64 KiB the line, by what a call holds: 60 KiB of bytes run uncounted,
    # with 100 short names beside them (6.4 KB more by the count) they are
    # counted; so are 20,000 characters with an emoji among them, which
    # Python keeps in 4 bytes each (80 KB).
    for call_id, args, counted in (
        (3, {"data": b"x" * 60 * 1024}, False),
        (5, {"data": b"x" * 60 * 1024, "names": ["n"] * 100}, True),
        (7, {"data": "\U0001f600" + "a" * 20_000}, True),
    ):
        frame = call_frame(call_id, "upload", **args)
        assert isinstance(wire.deliver_one(server, frame), CallReceived)
        assert (memory.held > 0) is counted, call_id
        server.call_finished(call_id)
        assert memory.held == 0
    # Uncounted, such a call still takes its id and a place among the calls
    # running (8 here): a ninth is refused, an id in use is a protocol error.
    server.call_finished(1)
    uploads = [call_frame(n, "upload", data=b"x" * 1024) for n in range(11, 20)]
    assert all(isinstance(wire.deliver_one(server, f), CallReceived) for f in uploads[:8])
    assert isinstance(wire.deliver_one(server, uploads[8]), CallRefused)
    with pytest.raises(RemoteProtocolError, match="already in use"):
        wire.deliver_one(server, uploads[0])


def test_a_large_body_of_empty_lists_is_a_valid_call(pair: Pair) -> None:
    """Counting what a body holds refuses no shape: sparse lists are ordinary data."""
    sparse = [[] if n % 2 else [n % 100] for n in range(3000)]
    event = pair.deliver_one(pair.server, call_frame(1, "graph", edges=sparse))
    assert isinstance(event, CallReceived) and event.args == {"edges": sparse}


def test_nothing_behind_a_goodbye_is_handled(pair: Pair) -> None:
    """A record may carry frames behind the GOODBYE: none of them starts anything."""
    receiving = inbound(pair.server)
    events = pair.deliver(
        pair.server,
        pair.client.goodbye("bye") or b"",
        call_frame(1, "anything"),
        data(receiving.stream_id, b"late"),
        body_frame(FrameKind.PING, 0, {"nonce": 1}),
    )
    assert [type(event) for event in events] == [GoodbyeReceived]
    assert pair.server.phase is Phase.CLOSED


@pytest.mark.parametrize("increment", [-1, 2**31 + 1, "many"])
def test_invalid_credit(pair: Pair, increment: Any) -> None:
    """Moved from test_hostile_peers (which keeps increment 0 over a socket)."""
    reason = protocol_error(
        pair.server, pair, body_frame(FrameKind.CREDIT, 2, {"increment": increment})
    )
    expected = "invalid credit increment" if isinstance(increment, int) else "malformed CREDIT body"
    assert expected in reason


def test_credit_for_an_unknown_stream_is_ignored(pair: Pair) -> None:
    assert pair.deliver(pair.server, body_frame(FrameKind.CREDIT, 9, {"increment": 5})) == []


def test_open_outbound_checks_the_stream_id(pair: Pair) -> None:
    """Out of range, or of this side's own parity: the peer allocates the ids
    we send on (a download's id of the server's parity shared it with an
    upload the server received, a review found)."""
    for side, bad in (
        (pair.client, 0),
        (pair.client, -1),
        (pair.client, MAX_STREAM_ID + 1),
        (pair.client, 1),
        (pair.server, 2),
    ):
        with pytest.raises(RPCError) as info:
            outbound(side, bad)
        assert info.value.code == "invalid_arguments"
    with pytest.raises(RPCError, match="a server allocates even ids"):
        outbound(pair.client, 3)
    outbound(pair.server, 1)
    outbound(pair.client, 2)
    with pytest.raises(LocalProtocolError, match="already being sent"):
        outbound(pair.client, 2)


# ------------------------------------------------------------------ resets


def test_reset_fails_both_ends(pair: Pair) -> None:
    receiving = inbound(pair.server)
    sending = outbound(pair.client, receiving.stream_id)
    reset = pair.server.close_stream(receiving, ("disk_full", "no space"))
    assert reset is not None
    event = pair.deliver_one(pair.client, reset)
    assert isinstance(event, StreamWasReset)
    assert event.outgoing is sending and event.incoming is None
    assert isinstance(event.error, StreamReset)
    assert event.error.code == "disk_full" and "no space" in str(event.error)
    assert receiving.stream_id not in pair.client.outgoing


def test_early_reset_is_remembered_so_the_stream_never_starts(pair: Pair) -> None:
    receiving = inbound(pair.server)
    reset = pair.server.close_stream(receiving, ("timeout", "gave up"))
    assert reset is not None
    assert pair.deliver(pair.client, reset) == []  # nothing to fail yet
    with pytest.raises(StreamReset, match="gave up"):
        outbound(pair.client, receiving.stream_id)
    outbound(pair.client, receiving.stream_id)  # remembered once only


def test_early_resets_are_bounded_oldest_first(pair: Pair) -> None:
    """The sans-IO half of test_hostile_peers::test_reset_flood_is_bounded."""
    count = MAX_EARLY_RESETS + 10
    frames = [
        body_frame(FrameKind.RESET, 2 * i + 2, {"code": "x", "reason": "y"}) for i in range(count)
    ]
    assert pair.deliver(pair.client, *frames) == []
    assert len(pair.client._early_resets) == MAX_EARLY_RESETS
    outbound(pair.client, 2)  # among the first ten: forgotten
    with pytest.raises(StreamReset):
        outbound(pair.client, 2 * (count - 1) + 2)


def test_a_peers_text_is_kept_cut_to_a_bound(pair: Pair) -> None:
    """A RESET's code and reason and a GOODBYE's reason are the peer's text, in a
    frame of up to max_frame_size: what the machine keeps and reports of them is
    cut to MAX_PEER_TEXT characters (1,024 early resets held whole were 1 GiB)."""
    long_text = "é" * 15_000  # 30 KB on the wire (the pair's frames hold 64 KiB)
    early = body_frame(FrameKind.RESET, 2, {"code": long_text, "reason": long_text})
    assert pair.deliver(pair.client, early) == []
    remembered = pair.client._early_resets[2]
    cut = f"{'é' * MAX_PEER_TEXT}... ({15_000 - MAX_PEER_TEXT} characters cut)"
    assert remembered.code == cut
    assert str(remembered) == f"peer aborted the stream: {cut}"

    goodbye = body_frame(FrameKind.GOODBYE, 0, {"reason": long_text})
    (event,) = pair.deliver(pair.client, goodbye)
    assert isinstance(event, GoodbyeReceived)
    assert event.reason == cut
    assert pair.client.close_reason == f"peer closed the connection: {cut}"
    # Text within the bound is kept as it is.
    assert peer_text("x" * MAX_PEER_TEXT) == "x" * MAX_PEER_TEXT


def test_reset_of_an_unknown_stream_of_our_own_is_not_remembered(pair: Pair) -> None:
    # Odd ids are the client's to allocate: a reset for one it never opened is noise.
    assert (
        pair.deliver(pair.client, body_frame(FrameKind.RESET, 1, {"code": "x", "reason": "y"}))
        == []
    )
    assert pair.client._early_resets == {}


# ------------------------------------------------------------------ ping, goodbye, closing


def test_ping_is_answered_with_a_pong_carrying_the_nonce(pair: Pair) -> None:
    event = pair.deliver_one(pair.server, pair.client.ping())
    assert isinstance(event, PingReceived)
    assert event.nonce == 1
    (pong,) = iter_frames(event.reply, MAX_FRAME)
    assert decode_body(pong, Pong) == Pong(1)
    assert pair.deliver(pair.client, event.reply) == [PongReceived(1)]  # the engine times it
    second = pair.deliver_one(pair.server, pair.client.ping())
    assert isinstance(second, PingReceived) and second.nonce == 2
    assert pair.client.last_ping == 2


def test_goodbye(pair: Pair) -> None:
    frame = pair.client.goodbye("done here")
    assert frame is not None
    assert pair.client.phase is Phase.CLOSING and not pair.client.is_open
    assert pair.client.close_reason == "done here"
    assert pair.client.goodbye("again") is None
    assert pair.deliver_one(pair.server, frame) == GoodbyeReceived("done here")
    assert pair.server.phase is Phase.CLOSED
    assert pair.server.close_reason == "peer closed the connection: done here"


def test_a_goodbye_says_whether_its_sender_is_going_away(pair: Pair) -> None:
    """A server shutting down (to restart, maybe) is not one ending this
    connection: its clients come back. A GOODBYE without the flag (an older
    peer's) reads as not going away."""
    frame = pair.server.goodbye("server shutting down", going_away=True)
    assert frame is not None
    assert pair.deliver_one(pair.client, frame) == GoodbyeReceived(
        "server shutting down", going_away=True
    )
    older = body_frame(FrameKind.GOODBYE, 0, {"reason": "bye"})
    other = Pair(machine(is_client=True), machine(is_client=False))
    assert other.deliver_one(other.client, older) == GoodbyeReceived("bye", going_away=False)


def test_once_closing_nothing_new_is_produced(pair: Pair) -> None:
    receiving = inbound(pair.client)
    pair.client.goodbye("bye")
    assert pair.client.cancel_call(1) is None
    assert pair.client.credit_frame(receiving.stream_id, 10) is None
    assert pair.client.close_stream(receiving, ("x", "y")) is None


def test_once_closing_no_call_received_starts(pair: Pair) -> None:
    """The peer sent these before our GOODBYE reached it: that GOODBYE fails
    them there, so none runs here, small or large, and none takes an id.
    A call already running still answers; the other frames still count."""
    assert isinstance(pair.deliver_one(pair.server, call_frame(1, "running")), CallReceived)
    receiving = inbound(pair.server)
    pair.server.goodbye("logged out")
    late = [call_frame(3, "late"), call_frame(5, "large", blob=b"x" * (COUNTED_BODY + 1))]
    events = pair.deliver(pair.server, *late, data(receiving.stream_id, b"still counted"))
    assert events == [receiving]
    assert receiving.bytes_received == len(b"still counted")
    pair.server.call_finished(1)
    assert pair.server.phase is Phase.CLOSING
    with pytest.raises(RemoteProtocolError, match="data for stream 99"):
        pair.deliver(pair.server, data(99, b"never opened"))


def test_close_keeps_the_first_reason_and_drops_streams(pair: Pair) -> None:
    receiving = inbound(pair.server)
    sending = outbound(pair.server, 1)
    pair.deliver(pair.server, call_frame(1, "x"))
    pair.server.close("connection lost")
    pair.server.close("later reason")
    assert pair.server.phase is Phase.CLOSED
    assert pair.server.close_reason == "connection lost"
    assert pair.server.drop_streams() == [receiving, sending]
    assert pair.server.incoming == {} and pair.server.outgoing == {}
    assert pair.server.drop_streams() == []


# ------------------------------------------------------------------ protocol errors


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        pytest.param(raw_header(6, 0, 0), "protocol error: unknown frame kind 6", id="kind-6"),
        pytest.param(raw_header(FrameKind.PING, 0, 0, 0x02), "unknown flags 0x02", id="flags"),
        pytest.param(
            body_frame(
                FrameKind.CLIENT_HELLO,
                0,
                {
                    "protocol_version": 1,
                    "name": "x",
                    "pake": b"A" * 33,
                    "max_frame_size": 1 << 20,
                    "receive_window": 4 << 20,
                },
            ),
            "CLIENT_HELLO frame is not allowed after the handshake",
            id="replayed-hello",
        ),
        pytest.param(
            body_frame(FrameKind.CLIENT_CONFIRM, 0, {"mac": b"m" * 32}),
            "CLIENT_CONFIRM frame is not allowed after the handshake",
            id="replayed-confirm",
        ),
        pytest.param(
            body_frame(
                FrameKind.WELCOME,
                0,
                {"client_id": "x", "server_name": "y", "heartbeat_interval": 1.0},
            ),
            "WELCOME frame is not allowed after the handshake",
            id="welcome-from-client",
        ),
    ],
)
def test_unknown_or_misplaced_kind_inside_the_session(
    pair: Pair, frame: bytes, reason: str
) -> None:
    """Moved from test_hostile_peers (which keeps kind 99 over a socket).

    The CALL after the bad frame never becomes an event: nothing runs.
    """
    assert reason in protocol_error(pair.server, pair, frame, call_frame(1, "record", tag="after"))


@pytest.mark.parametrize(
    ("kind", "body", "reason"),
    [
        (FrameKind.CALL, {"method": 5}, "malformed CALL body"),
        (FrameKind.RESULT, {"ok": "yes"}, "malformed RESULT body"),
        (FrameKind.MESSAGE, [1], "malformed MESSAGE body"),
        (FrameKind.RESET, {"code": 1}, "malformed RESET body"),
        (FrameKind.PING, {"nonce": "n"}, "malformed PING body"),
        (FrameKind.GOODBYE, {}, "malformed GOODBYE body"),
    ],
)
def test_malformed_bodies(pair: Pair, kind: FrameKind, body: Any, reason: str) -> None:
    assert reason in protocol_error(pair.server, pair, body_frame(kind, 1, body))


def test_a_body_that_is_not_msgpack(pair: Pair) -> None:
    frame = raw_header(FrameKind.PING, 0, 1) + b"\xc1"
    assert "malformed msgpack body" in protocol_error(pair.server, pair, frame)


def test_decode_body_checks_the_expected_class(pair: Pair) -> None:
    (frame,) = iter_frames(pair.client.ping(), MAX_FRAME)
    with pytest.raises(LocalProtocolError, match="does not carry a Result"):
        decode_body(frame, Result)
    assert msgpack.unpackb(bytes(frame.payload)) == {"nonce": 1}


# ------------------------------------------------------------------ any frame sequence

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_bodies = st.one_of(
    _values,
    st.fixed_dictionaries({"increment": st.integers(-5, 2**32)}),
    st.fixed_dictionaries({"code": st.text(max_size=4), "reason": st.text(max_size=4)}),
    st.fixed_dictionaries({"nonce": st.integers(0, 2**40)}),
    st.fixed_dictionaries({"method": st.text(max_size=4), "args": st.just({})}),
    st.fixed_dictionaries({"ok": st.booleans(), "value": _values}),
)


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(list(FrameKind)))
    stream_id = draw(st.integers(0, 12) | st.integers(0, MAX_STREAM_ID))
    if kind is FrameKind.DATA:
        return data(stream_id, draw(st.binary(max_size=64)), draw(st.sampled_from([0, 1])))
    return body_frame(kind, stream_id, draw(_bodies))


@settings(max_examples=300, deadline=None, database=None)
@given(st.booleans(), st.lists(_frames(), max_size=20))
def test_any_frame_sequence_only_ever_raises_remote_protocol_error(
    as_client: bool, frames: list[bytes]
) -> None:
    """Whatever an authenticated peer sends, the machine answers with events or a clear error.

    Every event is one of the documented kinds, and the bookkeeping stays
    within its bounds: at most ``max_concurrent_calls`` calls accepted.
    """
    state = machine(is_client=as_client, max_calls=4)
    for _ in range(2):
        state.open_inbound(InboundStream)
    accepted = 0
    try:
        for frame in iter_frames(b"".join(frames), MAX_FRAME):
            event = state.receive_frame(frame)
            assert event is None or isinstance(event, EVENT_CLASSES)
            accepted += isinstance(event, CallReceived)
    except RemoteProtocolError:
        return
    assert accepted <= 4


EVENT_CLASSES = (
    CallReceived,
    CallRefused,
    CallCancelled,
    ResultReceived,
    MessageReceived,
    StreamWasReset,
    PingReceived,
    PongReceived,
    GoodbyeReceived,
    InboundStream,
    OutboundStream,
)


def test_inbound_windows_come_out_of_one_connection_budget() -> None:
    state = machine(is_client=False, receive_budget=3 * WINDOW)
    streams = [state.open_inbound(InboundStream) for _ in range(3)]
    with pytest.raises(RPCError) as refused:
        state.open_inbound(InboundStream)
    assert refused.value.code == "too_many_streams"
    state.close_stream(streams[0], None)
    assert state.open_inbound(InboundStream).window == WINDOW


def only_frame(encoded: bytes) -> Frame:
    """The frame whose bytes are ``encoded``, as the engine parses it from a record."""
    (frame,) = iter_frames(encoded, MAX_FRAME)
    return frame


_MEMORY_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["open", "frame", "run", "take", "use", "credit", "end", "reset", "close"]),
        st.integers(0, 3),
        st.integers(1, 20 * 1024),
    ),
    min_size=10,
    max_size=80,
)


@settings(max_examples=200, deadline=None, database=None)
@given(_MEMORY_STEPS)
def test_one_receive_memory_counts_what_the_streams_of_two_connections_hold(
    steps: list[tuple[str, int, int]],
) -> None:
    """``ReceiveMemory.held`` is, after every step, what the inbound streams of
    both machines hold (sent and not granted back), and 0 once all are gone.

    The steps: streams opened, DATA (single frames through the machine, and
    runs), chunks taken and consumed (and their credit returned at once, or
    later), END, the peer's RESET,
    this side closing a stream; at the end both connections drop theirs.
    """
    memory = ReceiveMemory(limit=1 << 30)
    states = [machine(is_client=False), machine(is_client=False)]

    def holding() -> int:
        return sum(
            stream.window - stream.available + stream.ahead
            for state in states
            for stream in state.incoming.values()
        )

    for action, pick, size in steps:
        state = states[pick % 2]
        streams = list(state.incoming.values())
        if action == "open":
            state.open_inbound(lambda sid, window: InboundStream(sid, window, memory))
        elif streams:
            stream = streams[pick % len(streams)]
            room = stream.available - FRAME_COST
            if action == "frame" and room > 0 and not stream.finished:
                state.receive_frame(only_frame(data(stream.stream_id, bytes(min(size, room)))))
            elif action == "run" and room > 2 * FRAME_COST and not stream.finished:
                piece = min(size, room // 2 - FRAME_COST)
                stream.on_data_run([memoryview(bytes(piece))] * 2, 2 * piece)
            elif action in ("take", "use"):
                stream.take()
                stream.consumed()
                if action == "use":
                    stream.credit_to_return(force=True)
            elif action == "credit":
                stream.credit_to_return(force=True)
            elif action == "end" and room >= 0 and not stream.finished:
                state.receive_frame(only_frame(data(stream.stream_id, b"", 1)))
            elif action == "reset":
                reset = body_frame(FrameKind.RESET, stream.stream_id, {"code": "x", "reason": "y"})
                assert isinstance(state.receive_frame(only_frame(reset)), StreamWasReset)
            elif action == "close":
                state.close_stream(stream, None)
        assert memory.held == holding()
    for state in states:
        state.drop_streams()
    assert memory.held == 0


def test_credit_returned_ahead_counts_against_the_connection_budget() -> None:
    """A stream whose consumer returned credit early (still holding the bytes)
    holds more than its window: a new window must fit beside both."""
    state = machine(is_client=False, receive_budget=2 * WINDOW)
    first = state.open_inbound(InboundStream)
    first.ahead = WINDOW // 2
    assert state.receive_committed() == WINDOW + WINDOW // 2
    with pytest.raises(RPCError) as refused:
        state.open_inbound(InboundStream)
    assert refused.value.code == "too_many_streams"
    first.ahead = 0
    assert state.open_inbound(InboundStream).window == WINDOW


def test_streams_in_both_directions_count_against_max_streams() -> None:
    state = machine(is_client=True, max_streams=2)
    state.open_inbound(InboundStream)
    state.open_outbound(2, OutboundStream)
    with pytest.raises(RPCError) as refused:
        state.open_inbound(InboundStream)
    assert refused.value.code == "too_many_streams"
