"""Turning frames into bytes and bytes into frames.

:class:`FrameDecoder` is incremental and sans-IO: feed it whatever the socket
returned, pull complete frames out. It never allocates for a payload before the
header's length has been checked against the limit.
"""

from __future__ import annotations

import reprlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, overload

import cattrs
import msgpack
from cattrs.preconf.msgpack import make_converter

from ..errors import LocalProtocolError, RemoteProtocolError
from .frames import (
    HEADER,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAGIC,
    PROTOCOL_VERSION,
    Frame,
    FrameKind,
    check_version,
    encode_header,
)
from .messages import BODY_TYPES, Body, Call, Credit, Message, Result

#: The converter of RPC data (a handler's arguments, from their annotations):
#: cattrs' msgpack preset, converting as it does (``docs/rpc.md``), bytes
#: excepted (below).
converter = make_converter()
#: The converter of the protocol's own bodies (frames, handshake): every field
#: must hold its own type (:func:`_structure_exactly`). Not the RPC data's:
#: its conversions (an ``IntEnum`` from an int, a ``str`` Enum's check of its
#: members) are what a handler's annotations ask for (the review of this
#: change's own diff found them lost when one converter did both).
body_converter = make_converter()


def _structure_bytes(value: Any, _type: Any) -> bytes:
    # cattrs' default is bytes(value): an integer N would allocate N zero bytes.
    if isinstance(value, bytes):
        return value
    raise TypeError(f"expected bytes, got {type(value).__name__}")


converter.register_structure_hook(bytes, _structure_bytes)
body_converter.register_structure_hook(bytes, _structure_bytes)


def _structure_exactly(kind: type[Any]) -> Callable[[Any, Any], Any]:
    """A hook that takes a value of ``kind`` as it is and refuses anything else.

    cattrs' defaults convert: ``int("77")``, ``str([1])``, ``bool("no")``
    (True: a GOODBYE's ``going_away`` decides whether a client comes back),
    ``int(1e308)`` (a PING's nonce that no PONG can carry). A peer's body
    must hold what its field says (a fuzzing review, 2026-12-07), as the
    hand-written bodies of calls and data below already demand.
    """
    name = kind.__name__

    def structure(value: Any, _type: Any) -> Any:
        if type(value) is kind:
            return value
        raise TypeError(f"expected {name}, got {type(value).__name__}")

    return structure


def _structure_float(value: Any, _type: Any) -> float:
    # An integer is a number of seconds as good as a float (msgpack keeps 1.0 a float).
    if type(value) is float or type(value) is int:
        return float(value)
    raise TypeError(f"expected float, got {type(value).__name__}")


for _kind in (int, str, bool):
    body_converter.register_structure_hook(_kind, _structure_exactly(_kind))
body_converter.register_structure_hook(float, _structure_float)

T = TypeVar("T")
B = TypeVar("B", bound=Body)

# Bodies nest user data (RPC arguments); msgpack's own depth limit (its C stack)
# stops pathological nesting, and unpackb bounds every length by the payload's.


# msgpack.packb builds a Packer per call (~1.8 us of a ~2.6 us pack): keep one
# per thread instead (handshakes also encode in worker threads). A Packer
# resets its buffer when a pack fails, so one bad value spoils nothing.
_packers = threading.local()


def pack(value: Any) -> bytes:
    """msgpack-encode an already unstructured value."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _new_packer()
    try:
        return packer.pack(value)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise _unpackable(exc) from exc


def _new_packer() -> msgpack.Packer:
    packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer


_unpackb = msgpack.unpackb


def _unpackable(exc: Exception) -> LocalProtocolError:
    return LocalProtocolError(f"value cannot be sent: {exc}")


#: CALL bodies up to this many bytes are decoded as they are, uncounted: a
#: body of 256 bytes holds at most about 17 KB decoded (empty maps, measured;
#: 34 KB by :func:`unpack_sized`'s bound). A larger one is decoded counting
#: its lists and maps, so that what it holds can be bounded (until
#: 2026-12-07 the line was 4 KiB: 4 KiB of empty maps holds 285-293 KB, and
#: 37 MB for the 128 calls a connection runs). Which of them count is the
#: connection's choice (``connection.UNCOUNTED_CALL_BYTES``). The calls of
#: the RPC benchmarks (100-byte payloads) stay under it. MESSAGE bodies are
#: counted whatever their size: the engine queues them.
COUNTED_BODY = 256
#: What a decoded list or map, and each item in one (a map's key and value are
#: two), may take in memory beyond the item's own bytes on the wire: a list's
#: or dict's header (an empty map is 1 byte of msgpack and ~64 of Python), a
#: pointer and a 2-character string (51 + 8 bytes for 3 on the wire).
CONTAINER_OVERHEAD = 72
ITEM_OVERHEAD = 64
#: A string with a character beyond ASCII is counted as what Python holds for
#: it (``sys.getsizeof``: 1, 2 or 4 bytes a character, by its widest, and a
#: header of 73-76 bytes), less what its item is counted already: its bytes
#: on the wire, at least one a character, and ITEM_OVERHEAD less a pointer.
#: (Until 2026-12-07 it counted 3 bytes a character and 32 more beyond its
#: bytes on the wire, whatever its width: 5 times what Latin-1 text holds.)
_STRING_COUNTED = ITEM_OVERHEAD - 8
#: The most a string's header and its terminating character may take beyond
#: what ITEM_OVERHEAD counts, for strings counted together (see unpack_sized).
_STRING_HEADER_BEYOND = 76 + 4 - _STRING_COUNTED
_getsizeof = sys.getsizeof
#: What an extension value (``msgpack.ExtType``, or a ``msgpack.Timestamp``:
#: an object, its integers or bytes) may take beyond its bytes on the wire
#: and its item's overhead.
EXT_OVERHEAD = 96
_Timestamp = msgpack.Timestamp
_ExtType = msgpack.ExtType


class HoldsTooMuch(Exception):
    """:func:`unpack_sized` stopped decoding: the value holds more than its ``limit``."""

    def __init__(self, held: int) -> None:
        super().__init__(f"holds at least {held} bytes decoded")
        #: What the part decoded before it stopped held by the bound: a lower
        #: bound of what the whole value would.
        self.held = held


def unpack_sized(data: bytes | memoryview, limit: int | None = None) -> tuple[Any, int]:
    """:func:`unpack`, and a bound of the memory the value it decoded holds.

    The bound: its bytes on the wire, plus :data:`CONTAINER_OVERHEAD` per
    list or map and :data:`ITEM_OVERHEAD` per item in them; for each string
    in them with a character beyond ASCII, what Python holds for it beyond
    that (its width, 1, 2 or 4 bytes a character, and its header); for each
    extension value or timestamp in them, :data:`EXT_OVERHEAD`. 1-2.5 times
    the real size on the shapes measured (strings of ASCII, Latin-1, CJK or
    emoji, small dicts, pairs, integers, floats, bytes, empty lists and
    maps, extension values, timestamps), and more for strings of one
    character that Python shares. What is not in a
    list or map is not counted beyond its bytes: call and message bodies are
    maps. (msgpack also adds each distinct map key to Python's table of
    interned strings, whose size never shrinks: a high-water mark of the
    distinct keys alive at once, outside this bound.)

    Looking at the items costs little beside decoding them (a MiB of
    strings: 15.8 ms against 14.7; of nils, the cheapest to decode: 15 ms
    against 4; of empty maps: 104 against 109). No shape is refused (a list
    of empty lists is a valid argument): what the bound is for is admitting
    calls and queueing messages by it.

    With a ``limit``, decoding stops as soon as what is decoded so far holds
    more than it by the bound, raising :class:`HoldsTooMuch`: a value that
    would be refused for its size is not decoded whole first (a megabyte of
    empty maps takes ~0.1 s and ~75 MiB to decode). Checked as each list or
    map ends (the bound grows there), so the part decoded holds about the
    limit plus one container's items.
    """
    containers = items = beyond = extensions = 0
    # The bound's part known before decoding: the bytes on the wire.
    wire = len(data)

    def look(item: Any) -> None:
        nonlocal beyond, extensions
        kind = type(item)
        if kind is str:
            if not item.isascii():
                beyond += _getsizeof(item) - len(item) - _STRING_COUNTED
        elif kind is _Timestamp or kind is _ExtType:
            extensions += 1

    def count(container: Any) -> Any:
        nonlocal containers, items, beyond
        containers += 1
        if not container:
            return container
        if type(container) is dict:
            items += len(container) << 1
            for key, value in container.items():
                if type(key) is not str or not key.isascii():
                    look(key)
                if type(value) is not str or not value.isascii():
                    look(value)
        else:
            items += len(container)
            # At C speed where it can be: a list of strings only is joined,
            # whose flag says at once whether any is beyond ASCII (then each
            # is counted as if it were as wide as the widest, with the
            # largest header); another is looked at item by item only if it
            # holds a string or an extension value.
            try:
                joined = "".join(container)
            except TypeError:
                kinds = set(map(type, container))
                if str in kinds or _Timestamp in kinds or _ExtType in kinds:
                    for item in container:
                        look(item)
            else:
                if not joined.isascii():
                    beyond += (
                        _getsizeof(joined) - len(joined) + _STRING_HEADER_BEYOND * len(container)
                    )
        return container

    def held() -> int:
        return (
            wire
            + containers * CONTAINER_OVERHEAD
            + items * ITEM_OVERHEAD
            + beyond
            + extensions * EXT_OVERHEAD
        )

    hook: Callable[[Any], Any] = count
    if limit is not None:
        if wire > limit:
            raise HoldsTooMuch(wire)
        most: int = limit

        def count_within(container: Any) -> Any:
            count(container)
            # held(), inline: this runs once per list or map.
            if (
                wire
                + containers * CONTAINER_OVERHEAD
                + items * ITEM_OVERHEAD
                + beyond
                + extensions * EXT_OVERHEAD
                > most
            ):
                raise HoldsTooMuch(held())
            return container

        hook = count_within
    try:
        value = _unpackb(
            data,
            raw=False,
            strict_map_key=False,
            use_list=True,
            object_hook=hook,
            list_hook=hook,
        )
    except HoldsTooMuch:
        raise
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise RemoteProtocolError(f"malformed msgpack body: {exc}") from exc
    return value, held()


def unpack(data: bytes | memoryview) -> Any:
    """Decode msgpack from the network; anything malformed is a RemoteProtocolError."""
    try:
        # Keywords spelled out: a **dict is copied on every call (~0.3 us).
        return _unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise RemoteProtocolError(f"malformed msgpack body: {exc}") from exc


def encode_frame(kind: FrameKind, stream_id: int, body: Body, flags: int = 0) -> bytes:
    """Encode a control frame carrying ``body``."""
    fast = _FAST_UNSTRUCTURE.get(type(body))
    payload = pack(fast(body) if fast is not None else body_converter.unstructure(body))
    return encode_header(kind, stream_id, flags, len(payload)) + payload


# --- The frames of every call, without the generic path's lookups.
#
# A CALL and its RESULT are most of what an RPC does with the codec; these give
# exactly the bytes encode_frame gives for Call / Result bodies (tests compare
# them) and decode exactly as decode_body does, refusing the same input.

_pack_header = HEADER.pack
_CALL = FrameKind.CALL
_RESULT = FrameKind.RESULT


def encode_call(call_id: int, method: str, args: dict[str, Any]) -> bytes:
    """``encode_frame(CALL, call_id, Call(method, args))``, without the Call."""
    # pack(), inline (one Python call less per call): the same packer, the same refusal.
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _new_packer()
    try:
        payload: bytes = packer.pack({"method": method, "args": args})
    except (TypeError, ValueError, OverflowError) as exc:
        raise _unpackable(exc) from exc
    return _pack_header(MAGIC, PROTOCOL_VERSION, _CALL, 0, call_id, len(payload)) + payload


def encode_result(call_id: int, result: Result) -> bytes:
    """``encode_frame(RESULT, call_id, result)``."""
    payload = pack(
        {"ok": result.ok, "value": result.value, "error": result.error, "code": result.code}
    )
    return _pack_header(MAGIC, PROTOCOL_VERSION, _RESULT, 0, call_id, len(payload)) + payload


def encode_value(call_id: int, value: Any) -> bytes:
    """``encode_result(call_id, Result(True, value))``, without the Result (the common case)."""
    # pack(), inline, as in encode_call.
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _new_packer()
    try:
        payload: bytes = packer.pack({"ok": True, "value": value, "error": "", "code": ""})
    except (TypeError, ValueError, OverflowError) as exc:
        raise _unpackable(exc) from exc
    return _pack_header(MAGIC, PROTOCOL_VERSION, _RESULT, 0, call_id, len(payload)) + payload


def decode_call(payload: bytes | memoryview) -> tuple[str, dict[str, Any]]:
    """The method and arguments ``decode_body(frame, Call)`` gives for a CALL frame's payload.

    Without the ``Call``: the receiving side only needs its two fields, and a
    frozen attrs instance costs a call to ``object.__setattr__`` per field.
    """
    # unpack(), inline (one Python call less per call): the same refusal.
    try:
        raw = _unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise RemoteProtocolError(f"malformed msgpack body: {exc}") from exc
    return _call_fields(raw)


def decode_call_sized(
    payload: bytes | memoryview, limit: int | None = None
) -> tuple[str, dict[str, Any], int]:
    """:func:`decode_call`, and what the call holds decoded (see :func:`unpack_sized`;
    :class:`HoldsTooMuch` once it holds more than ``limit``)."""
    raw, held = unpack_sized(payload, limit)
    method, args = _call_fields(raw)
    return method, args, held


def decode_message_sized(payload: bytes | memoryview) -> tuple[Message, int]:
    """``decode_body(frame, Message)`` of a MESSAGE frame's payload, and what
    it holds decoded (see :func:`unpack_sized`)."""
    raw, held = unpack_sized(payload)
    return _structure_message(raw), held


def decode_result_sized(
    payload: bytes | memoryview, limit: int | None = None
) -> tuple[Result, int]:
    """:func:`decode_result`, and what the result holds decoded (see
    :func:`unpack_sized`; :class:`HoldsTooMuch` once it holds more than ``limit``)."""
    raw, held = unpack_sized(payload, limit)
    return _structure_result(raw), held


def decode_result(payload: bytes | memoryview) -> Result:
    """``decode_body(frame, Result)`` of a RESULT frame's payload."""
    try:  # unpack(), inline, as in decode_call
        raw = _unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:
        raise RemoteProtocolError(f"malformed msgpack body: {exc}") from exc
    return _structure_result(raw)


def data_header(stream_id: int, length: int, flags: int = 0) -> bytes:
    """Header of a DATA frame; the payload follows it on the wire unchanged."""
    return encode_header(FrameKind.DATA, stream_id, flags, length)


@overload
def decode_body(frame: Frame) -> Body: ...


@overload
def decode_body(frame: Frame, expected: type[B]) -> B: ...


def decode_body(frame: Frame, expected: type[Any] | None = None) -> Any:
    """Structure the body of a control frame into its attrs class.

    With ``expected`` (``ping = decode_body(frame, Ping)``) the result is typed
    as that class, and a frame whose kind carries another body is refused:
    the type checker then checks what used to be a cast.
    """
    if expected is not None and BODY_TYPES.get(frame.kind) is not expected:
        raise LocalProtocolError(f"a {frame.kind.name} frame does not carry a {expected.__name__}")
    fast = _FAST_STRUCTURE.get(frame.kind)
    if fast is not None:
        return fast(unpack(frame.payload))
    body_type = BODY_TYPES.get(frame.kind)
    if body_type is None:
        raise RemoteProtocolError(f"{frame.kind.name} frames carry no body")
    return structure_from_wire(unpack(frame.payload), body_type, what=frame.kind.name)


def structure_from_wire(raw: Any, cls: type[T], *, what: str) -> T:
    """Structure untrusted data, mapping every failure to RemoteProtocolError."""
    try:
        return body_converter.structure(raw, cls)
    except (cattrs.BaseValidationError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise RemoteProtocolError(f"malformed {what} body: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc)) or str(exc)
    return str(exc) or type(exc).__name__


# --- Hand-written (un)structuring for the frames of every call and chunk.
#
# cattrs costs ~1.7 us per body through its dispatch; a round trip encodes and
# decodes four bodies. These produce exactly what cattrs produces for valid
# input (the maps documented in docs/protocol.md; tests compare both paths) and
# refuse anything else with RemoteProtocolError. Their values (RPC arguments,
# results, message data) were already unstructured by the caller.


_SHOW = reprlib.Repr()
_SHOW.maxlevel = 3
_SHOW.maxstring = 60
_SHOW.maxother = 60


def _malformed(what: str, raw: Any) -> RemoteProtocolError:
    # reprlib bounds depth and length: str() of a 1000-deep list raises RecursionError.
    return RemoteProtocolError(f"malformed {what} body: {type(raw).__name__} {_SHOW.repr(raw)}")


def _call_fields(raw: Any) -> tuple[str, dict[str, Any]]:
    if type(raw) is dict:
        method = raw.get("method")
        args = raw.get("args", {})
        if type(method) is str and type(args) is dict:
            # A loop, not all(<generator>): no generator frame per call.
            for key in args:
                if type(key) is not str:
                    break
            else:
                return method, args
    raise _malformed("CALL", raw)


def _structure_call(raw: Any) -> Call:
    method, args = _call_fields(raw)
    return Call(method, args)


def _structure_result(raw: Any) -> Result:
    if type(raw) is dict:
        ok = raw.get("ok")
        error = raw.get("error", "")
        code = raw.get("code", "")
        if type(ok) is bool and type(error) is str and type(code) is str:
            return Result(ok, raw.get("value"), error, code)
    raise _malformed("RESULT", raw)


def _structure_message(raw: Any) -> Message:
    if type(raw) is dict and type(raw.get("event")) is str:
        return Message(raw["event"], raw.get("data"))
    raise _malformed("MESSAGE", raw)


def _structure_credit(raw: Any) -> Credit:
    if type(raw) is dict and type(raw.get("increment")) is int:
        return Credit(raw["increment"])
    raise _malformed("CREDIT", raw)


_FAST_UNSTRUCTURE: dict[type[Any], Callable[[Any], dict[str, Any]]] = {
    Call: lambda b: {"method": b.method, "args": b.args},
    Result: lambda b: {"ok": b.ok, "value": b.value, "error": b.error, "code": b.code},
    Message: lambda b: {"event": b.event, "data": b.data},
    Credit: lambda b: {"increment": b.increment},
}
_FAST_STRUCTURE: dict[FrameKind, Callable[[Any], Any]] = {
    FrameKind.CALL: _structure_call,
    FrameKind.RESULT: _structure_result,
    FrameKind.MESSAGE: _structure_message,
    FrameKind.CREDIT: _structure_credit,
}


class FrameDecoder:
    """Incremental frame parser: ``feed(bytes)``, then ``next_frame()`` until None.

    Used directly on the clear-text handshake and on each decrypted record.
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._offset = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the peer."""
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer) - self._offset

    def take_remaining(self) -> bytes:
        """Hand over unparsed bytes (when the stream switches to sealed records)."""
        rest = bytes(self._buffer[self._offset :])
        self._buffer.clear()
        self._offset = 0
        return rest

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None if more bytes are needed."""
        available = len(self._buffer) - self._offset
        if available < HEADER_SIZE:
            self._compact()
            return None
        kind, stream_id, flags, length = parse_header(
            self._buffer, self._offset, self.max_frame_size
        )
        end = self._offset + HEADER_SIZE + length
        if end > len(self._buffer):
            self._compact()
            return None
        payload = bytes(self._buffer[self._offset + HEADER_SIZE : end])
        self._offset = end
        return Frame(kind, stream_id, flags, payload)

    def _compact(self) -> None:
        if self._offset:
            del self._buffer[: self._offset]
            self._offset = 0


def parse_header(
    buffer: bytes | bytearray | memoryview, offset: int, max_frame_size: int
) -> tuple[FrameKind, int, int, int]:
    """Validate and unpack the header at ``offset``; raise RemoteProtocolError if bad."""
    magic, version, kind, flags, stream_id, length = HEADER.unpack_from(buffer, offset)
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad magic {bytes(magic)!r}: not a conduit peer")
    if version != PROTOCOL_VERSION:
        check_version(version)
    # One dict lookup instead of a membership test plus an enum call: this runs
    # for every frame (twice per RPC, sixteen times per megabyte of data).
    frame_kind = _KIND_BY_VALUE.get(kind)
    if frame_kind is None:
        raise RemoteProtocolError(f"unknown frame kind {kind}")
    if flags & ~KNOWN_FLAGS:
        raise RemoteProtocolError(f"unknown flags 0x{flags:02x}")
    if length > max_frame_size:
        raise RemoteProtocolError(
            f"frame of {length} bytes exceeds the negotiated limit of {max_frame_size}"
        )
    return frame_kind, stream_id, flags, length


_KIND_BY_VALUE: dict[int, FrameKind] = {kind.value: kind for kind in FrameKind}


def frame_spans(
    record: bytes | bytearray | memoryview, max_frame_size: int
) -> Iterator[tuple[FrameKind, int, int, int, int]]:
    """Walk one decrypted record's frame headers: ``(kind, stream_id, flags, start, end)``.

    ``record[start:end]`` is the frame's payload. A sealed record always holds
    whole frames, so a leftover is a protocol error, as is any header
    :func:`parse_header` refuses.
    """
    offset = 0
    total = len(record)
    unpack_header = HEADER.unpack_from
    kinds = _KIND_BY_VALUE
    while offset < total:
        if total - offset < HEADER_SIZE:
            raise RemoteProtocolError("record ends inside a frame header")
        # parse_header's checks, inline (one Python call less per frame of a
        # record of several: a burst of calls or results); any header they
        # refuse goes to parse_header itself, which raises its precise error.
        magic, version, value, flags, stream_id, length = unpack_header(record, offset)
        kind = kinds.get(value)
        if (
            kind is None
            or magic != MAGIC
            or version != PROTOCOL_VERSION
            or flags & ~KNOWN_FLAGS
            or length > max_frame_size
        ):
            kind, stream_id, flags, length = parse_header(record, offset, max_frame_size)
        start = offset + HEADER_SIZE
        offset = start + length
        if offset > total:
            raise RemoteProtocolError("record ends inside a frame payload")
        yield kind, stream_id, flags, start, offset


def iter_frames(record: bytes | bytearray | memoryview, max_frame_size: int) -> list[Frame]:
    """Split one decrypted record into its frames, without copying payloads.

    A sealed record always holds whole frames, so a leftover is a protocol error.
    """
    view = memoryview(record)
    return [
        Frame(kind, stream_id, flags, view[start:end])
        for kind, stream_id, flags, start, end in frame_spans(record, max_frame_size)
    ]
