"""The RPC hot path's shortcuts behave exactly as the general paths they skip.

* CALL and RESULT frames are encoded and decoded without the generic codec's
  lookups (``encode_call`` / ``encode_result`` / ``decode_call`` /
  ``decode_result``): the same bytes as ``encode_frame``, the same bodies as
  ``decode_body`` (a CALL's method and arguments without the ``Call``), and the
  same malformed payloads refused with the same error.
* Records of every size open the same way: small ones (a call, a result) from
  a copy of their bytes, middle-sized ones through a view, large ones into a
  mapped buffer. The same tampering (ciphertext, length prefix, a replayed or
  reordered record, a length beyond the limit) is refused the same way by each.
* ``SocketIO.receive`` waits for readability first after a read that drained
  the socket (unless told the peer may have sent more: then it reads first);
  whatever arrives (before or after it is called, in one piece or several,
  or the end of the stream) is still returned, a closed socket is still a
  closed stream, and cancellation still works.
* The writer sends small records with one non-blocking write: what the socket
  does not take still goes out, in order.
* ``to_wire`` walks plain dicts and lists itself: it gives exactly what the
  converter gives, for attrs instances, tuples, sets and enums at any depth too.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Sequence
from typing import Any

import attrs
import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from conduit._rpc_proxy import call_arguments, to_wire
from conduit._socket_io import SocketIO
from conduit.errors import IntegrityError, RemoteProtocolError
from conduit.protocol import converter
from conduit.protocol.codec import (
    decode_body,
    decode_call,
    decode_result,
    encode_call,
    encode_frame,
    encode_result,
    encode_value,
    iter_frames,
    parse_header,
)
from conduit.protocol.connection import ConnectionState
from conduit.protocol.frames import HEADER_SIZE, PROTOCOL_VERSION, Frame, FrameKind
from conduit.protocol.messages import Call, Result
from conduit.protocol.records import MAPPED_MIN, RecordOpener, RecordSealer

#: msgpack values as a peer could send them (maps keyed by anything, nesting).
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 9), inner, max_size=4)
    ),
    max_leaves=12,
)
_ARGS = st.dictionaries(st.text(max_size=8), _VALUES, max_size=4)


@attrs.frozen
class _Point:
    x: int
    label: str


class _Colour(enum.Enum):
    RED = "red"


#: Values of every kind the converter unstructures, not only plain data.
_ANY_VALUES = st.recursive(
    _SCALARS | st.builds(_Point, st.integers(), st.text(max_size=4)) | st.just(_Colour.RED),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.frozensets(st.integers(0, 9), max_size=3)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 9), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(_ANY_VALUES, st.dictionaries(st.text(max_size=8), _ANY_VALUES, max_size=4))
def test_to_wire_gives_what_the_converter_gives(value: Any, kwargs: dict[str, Any]) -> None:
    _assert_same(to_wire(value), converter.unstructure(value))
    _assert_same(call_arguments(None, kwargs), converter.unstructure(kwargs))
    if isinstance(value, dict | list):
        assert to_wire(value) is not value  # a copy, as the converter's is


def _assert_same(ours: Any, theirs: Any) -> None:
    """Equal, and of the same type at every depth (``==`` alone takes
    ``True`` for ``1`` and ``b""`` for ``bytearray()``)."""
    assert type(ours) is type(theirs), (ours, theirs)
    if isinstance(ours, dict):
        assert list(ours) == list(theirs)
        for key in ours:
            _assert_same(key, next(k for k in theirs if k == key))
            _assert_same(ours[key], theirs[key])
    elif isinstance(ours, list | tuple):
        assert len(ours) == len(theirs)
        for mine, other in zip(ours, theirs, strict=True):
            _assert_same(mine, other)
    else:
        assert ours == theirs or (ours != ours and theirs != theirs)  # NaN is itself


def test_to_wire_refuses_what_the_converter_refuses() -> None:
    # A key the wire cannot carry (a tuple becomes a list, which no map takes).
    for unsendable in ({(0, 0): "origin"}, [{"a": {(1,): 2}}]):
        with pytest.raises(TypeError):
            converter.unstructure(unsendable)
        with pytest.raises(TypeError):
            to_wire(unsendable)
    deep: list[Any] = []
    for _ in range(5_000):
        deep = [deep]
    with pytest.raises(RecursionError):
        to_wire(deep)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 2**32 - 1), st.text(max_size=30), _ARGS)
def test_a_call_encodes_to_the_same_bytes(call_id: int, method: str, args: dict[str, Any]) -> None:
    assert encode_call(call_id, method, args) == encode_frame(
        FrameKind.CALL, call_id, Call(method, args)
    )


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 2**32 - 1), st.booleans(), _VALUES, st.text(max_size=20), st.text(max_size=9))
def test_a_result_encodes_to_the_same_bytes(
    call_id: int, ok: bool, value: Any, error: str, code: str
) -> None:
    result = Result(ok, value, error, code)
    assert encode_result(call_id, result) == encode_frame(FrameKind.RESULT, call_id, result)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 2**32 - 1), _VALUES)
def test_a_returned_value_encodes_as_its_result(call_id: int, value: Any) -> None:
    assert encode_value(call_id, value) == encode_result(call_id, Result(True, value))


def test_a_value_too_large_to_send_becomes_the_same_refusal() -> None:
    state = ConnectionState(
        is_client=False,
        receive_window=1 << 20,
        peer_receive_window=1 << 20,
        peer_max_frame_size=1024,
        max_concurrent_calls=16,
    )
    big = b"x" * 2048
    refusal = state.value_frame(7, big)
    assert refusal == state.result_frame(7, Result(True, big))
    assert decode_result(memoryview(refusal)[HEADER_SIZE:]).code == "bad_result"
    assert state.value_frame(7, b"small") == encode_value(7, b"small")
    assert state.finish_value(7, big) == refusal
    assert state.finish_value(7, b"small") == encode_value(7, b"small")


def _outcome(decode: Any, payload: bytes) -> Any:
    try:
        return ("ok", decode(payload))
    except RemoteProtocolError as exc:
        return ("refused", str(exc))


def _fields(call: Call) -> tuple[str, dict[str, Any]]:
    return call.method, call.args


def _both_ways(payload: bytes) -> None:
    call_frame = Frame(FrameKind.CALL, 1, 0, payload)
    result_frame = Frame(FrameKind.RESULT, 1, 0, payload)
    assert _outcome(decode_call, payload) == _outcome(
        lambda _: _fields(decode_body(call_frame, Call)), payload
    )
    assert _outcome(decode_result, payload) == _outcome(
        lambda _: decode_body(result_frame, Result), payload
    )


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        _VALUES.map(lambda value: msgpack.packb(value, use_bin_type=True)),
        st.fixed_dictionaries(
            {"method": _VALUES, "args": _VALUES}, optional={"extra": _VALUES}
        ).map(lambda body: msgpack.packb(body, use_bin_type=True)),
        st.fixed_dictionaries(
            {"ok": _VALUES}, optional={"value": _VALUES, "error": _VALUES, "code": _VALUES}
        ).map(lambda body: msgpack.packb(body, use_bin_type=True)),
        st.binary(max_size=40),
    )
)
def test_the_fast_decoders_accept_and_refuse_what_decode_body_does(payload: bytes) -> None:
    _both_ways(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # no body at all
        b"\xc1",  # a byte msgpack never uses
        b"\x92\x01",  # an array cut short
        msgpack.packb({"method": 5, "args": {}}),
        msgpack.packb({"method": "m", "args": {1: 2}}),  # a non-string argument name
        msgpack.packb({"method": "m", "args": []}),
        msgpack.packb({"ok": 1}),  # not a bool
        msgpack.packb({"ok": True, "error": b"bytes"}),
        msgpack.packb(["method", {}]),  # a tuple where a map belongs
        msgpack.packb({"method": "m", "args": {"x": 1}}),  # valid CALL
        msgpack.packb({"ok": False, "error": "e", "code": "c"}),  # valid RESULT
    ],
)
def test_the_same_bad_bytes_are_refused_both_ways(payload: bytes) -> None:
    _both_ways(payload)


KEY = bytes(range(32))
LIMIT = 2 << 20

#: One size per way of opening a record: copied, viewed, mapped.
SIZES = [100, 16 * 1024, MAPPED_MIN + 1000]


def _records(count: int, size: int) -> list[bytes]:
    sealer = RecordSealer(KEY, LIMIT)
    return [bytes(sealer.seal(bytes([index]) * size)) for index in range(count)]


def _open_all(data: Sequence[bytes | bytearray], *, split: int | None = None) -> list[bytes]:
    opener = RecordOpener(KEY, LIMIT)
    opened = []
    for chunk in data:
        pieces = [chunk] if split is None else [chunk[:split], chunk[split:]]
        for piece in pieces:
            opener.feed(piece)
            while (record := opener.next_record()) is not None:
                opened.append(bytes(record))
    return opened


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("split", [None, 3, 9])
def test_every_size_opens_whole_or_split(size: int, split: int | None) -> None:
    """Whole chunks (bytes, opened in place) and split ones (buffered) alike."""
    assert _open_all(list(_records(3, size)), split=split) == [bytes([i]) * size for i in range(3)]


def _flip(record: bytes, index: int) -> bytes:
    altered = bytearray(record)
    altered[index] ^= 0x01
    return bytes(altered)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("split", [None, 5])
@pytest.mark.parametrize(
    "tamper",
    ["ciphertext", "tag", "replay", "reorder", "truncated-length"],
)
def test_every_size_refuses_the_same_tampering(size: int, split: int | None, tamper: str) -> None:
    first, second = _records(2, size)
    if tamper == "ciphertext":
        stream = [_flip(first, 10)]
    elif tamper == "tag":
        stream = [_flip(first, len(first) - 1)]
    elif tamper == "replay":
        stream = [first, first]
    elif tamper == "reorder":
        stream = [second]
    else:
        # A smaller length prefix: the AEAD's associated data no longer matches.
        shorter = (int.from_bytes(first[:4], "big") - 1).to_bytes(4, "big")
        stream = [shorter + first[4:]]
    with pytest.raises(IntegrityError, match="failed authentication"):
        _open_all(stream, split=split)


@pytest.mark.parametrize("sealed_size", [LIMIT + 17, 15])
def test_a_length_outside_the_limits_is_refused_before_buffering(sealed_size: int) -> None:
    opener = RecordOpener(KEY, LIMIT)
    opener.feed(sealed_size.to_bytes(4, "big") + b"x" * 32)
    with pytest.raises(RemoteProtocolError, match="outside the limit"):
        opener.next_record()


def _socket_streams() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = socket.socketpair()
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(left)),
        trio.SocketStream(trio.socket.from_stdlib_socket(right)),
    )


async def _send_later(stream: trio.SocketStream, data: bytes) -> None:
    """Send ``data`` a moment from now: a read started meanwhile has to wait for it."""
    await trio.sleep(0.01)
    await stream.send_all(data)


def _socket_io_pair() -> tuple[SocketIO, trio.SocketStream, trio.SocketStream]:
    ours, peer = _socket_streams()
    io = SocketIO.of(ours)
    assert io is not None
    return io, ours, peer


def drained(io: SocketIO) -> bool:
    """Whether the last receive found the socket drained (read afresh at each call)."""
    return io._drained


def would_wait(io: SocketIO) -> bool:
    """Whether the next receive waits for readability first (read afresh at each call)."""
    return io.would_wait


async def test_a_drained_socket_still_returns_what_arrives_later_and_meanwhile() -> None:
    io, ours, peer = _socket_io_pair()
    with trio.fail_after(10):
        await peer.send_all(b"first")
        assert await io.receive(1024) == b"first"  # short: drained
        assert drained(io)
        # Already there when receive is called: readable at once.
        await peer.send_all(b"meanwhile")
        assert await io.receive(1024) == b"meanwhile"
        # Arrives while receive waits.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_later, peer, b"later")
            assert await io.receive(1024) == b"later"
        # A read that fills the request: the next one tries to read at once.
        await peer.send_all(b"x" * 10)
        assert await io.receive(4) == b"xxxx"
        assert not drained(io)
        assert await io.receive(1024) == b"x" * 6
        await peer.aclose()
        assert await io.receive(1024) == b""  # end of stream
    await ours.aclose()


async def _read_first(io: SocketIO, peer: trio.SocketStream, data: bytes) -> bool:
    """Whether ``io.receive`` of ``data`` (sent by ``peer`` beforehand)
    returned before another task made runnable just before it ran: always
    when the read did not yield to the scheduler; when it did, whichever Trio
    ran first (it reverses half its batches, on purpose)."""
    order: list[str] = []

    async def other() -> None:
        order.append("other")

    await peer.send_all(data)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        assert await io.receive(1024) == data
        order.append("read")
    return order == ["read", "other"]


async def test_a_just_started_task_reads_what_is_there_without_a_pass() -> None:
    # The server's hello read: the connection's task has just started and
    # the client's hello is usually there already. 20 tries: a read that
    # yielded would come first in all of them once in a million runs.
    with trio.fail_after(10):
        for _ in range(20):
            ours, peer = _socket_streams()
            io = SocketIO.of(ours, just_started=True)
            assert io is not None
            assert await _read_first(io, peer, b"hello")
            await ours.aclose()
            await peer.aclose()


async def test_only_the_first_read_of_a_just_started_task_skips_its_pass() -> None:
    ours, peer = _socket_streams()
    with trio.fail_after(10):
        io = SocketIO.of(ours, just_started=True)
        plain = SocketIO.of(peer)
        assert io is not None and plain is not None
        await peer.send_all(b"hello")
        assert await io.receive(1024) == b"hello"
        # Later reads that find bytes at once yield (the other task comes
        # first in about half of them), on a just-started stream as on any.
        later = [await _read_first(io, peer, b"x") for _ in range(20)]
        assert not all(later)
        others = [await _read_first(plain, ours, b"y") for _ in range(20)]
        assert not all(others)
        # Nothing there yet: the first read waits, as any read.
        waiting = SocketIO.of(peer, just_started=True)
        assert waiting is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_later, ours, b"late")
            assert await waiting.receive(1024) == b"late"
    await ours.aclose()
    await peer.aclose()


def _counting_waits(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The sockets ``trio.lowlevel.wait_readable`` is called with from now on."""
    waits: list[object] = []
    wait_readable = trio.lowlevel.wait_readable

    async def counting(sock: Any) -> None:
        waits.append(sock)
        await wait_readable(sock)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting)
    return waits


async def test_a_peer_that_may_have_sent_more_is_read_before_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    io, ours, peer = _socket_io_pair()
    with trio.fail_after(10):
        await peer.send_all(b"hello")
        assert await io.receive(1024) == b"hello"
        assert would_wait(io)  # drained: an answer to us cannot be there yet
        # But the peer sends on without waiting for us (its next message is
        # no answer): it is there, and read without waiting for readability.
        await peer.send_all(b"and more")
        io.may_have_more()
        assert not would_wait(io)
        waits = _counting_waits(monkeypatch)
        assert await io.receive(1024) == b"and more"
        assert waits == []
        # Nothing there after all: a failed read, then the wait, as always.
        io.may_have_more()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_later, peer, b"late")
            assert await io.receive(1024) == b"late"
        assert len(waits) == 1
    await ours.aclose()
    await peer.aclose()


async def test_a_drained_socket_can_be_cancelled_and_closed() -> None:
    io, ours, peer = _socket_io_pair()
    with trio.fail_after(10):
        await peer.send_all(b"one")
        assert await io.receive(1024) == b"one"
        with trio.move_on_after(0.01) as scope:
            await io.receive(1024)
        assert scope.cancelled_caught
        # Nothing was lost by the cancellation.
        await peer.send_all(b"two")
        assert await io.receive(1024) == b"two"
        await ours.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await io.receive(1024)
    await peer.aclose()


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (0, 0x00, "bad magic"),
        (2, PROTOCOL_VERSION + 1, "protocol version"),
        (3, 99, "unknown frame kind 99"),
        (4, 0x80, "unknown flags 0x80"),
        (10, 0x01, "exceeds the negotiated limit"),
    ],
)
def test_a_bad_header_inside_a_record_of_calls_gets_parse_headers_refusal(
    offset: int, value: int, reason: str
) -> None:
    """frame_spans checks headers inline; what it refuses, parse_header explains."""
    second = bytearray(encode_call(2, "echo", {"data": b"y"}))
    second[offset] = value
    record = encode_call(1, "echo", {"data": b"x"}) + bytes(second)
    with pytest.raises(RemoteProtocolError, match=reason) as refused:
        iter_frames(record, 1024)
    with pytest.raises(RemoteProtocolError) as direct:
        parse_header(bytes(second), 0, 1024)
    assert str(refused.value) == str(direct.value)
