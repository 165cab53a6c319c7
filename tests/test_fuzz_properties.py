"""Property-based fuzzing of the sans-IO protocol layer (no sockets, no Trio).

What must hold for *any* input, however hostile:

* the frame decoder, the sealed-record reader and every body decoder raise
  nothing but ``conduit.errors.ProtocolError`` (``IntegrityError`` for records
  that fail authentication), never ``TypeError``, ``RecursionError``,
  ``MemoryError``, ``struct.error``...;
* memory is bounded by what was fed: the decoder never buffers more than it
  received, a length field over the limit is refused as soon as the header is
  complete (nothing is buffered for it), and a decoded body never holds more
  data than its payload carried (the *amplification oracle* in
  ``hostile_helpers.check_amplification``, shared with the atheris harnesses
  in ``fuzz/``);
* the handshake state machines, fed arbitrary frame sequences in every state,
  end in FAILED with a ``ConduitError`` or keep waiting, and never complete.

Sealed records are generated *valid* (a real key, a real sealer) around
arbitrary plaintexts, so the frame parser that sits behind the AEAD, which a
network attacker without the key can never reach, is exercised too: an
authenticated peer can.

Each regression test at the end pins one finding of the fuzzers.
"""

from __future__ import annotations

import copy
import itertools
import os
import struct
import tracemalloc
import typing
from typing import Any

import attrs
import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conduit.errors import ConduitError, IntegrityError, ProtocolError, RemoteProtocolError
from conduit.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    ClientHandshake,
    Frame,
    FrameDecoder,
    FrameKind,
    FrameReader,
    FrameWriter,
    HandshakeState,
    ServerHandshake,
    encode_frame,
)
from conduit.protocol.codec import decode_body
from conduit.protocol.data_runs import DataRun
from conduit.protocol.handshake import HANDSHAKE_MAX_FRAME
from conduit.protocol.messages import BODY_TYPES, Call, Credit, Message, Ping, Result
from conduit.protocol.records import RecordSealer
from conduit.protocol.records_io import RECORD_SLACK
from conftest import HANDSHAKE_LIMITS
from hostile_helpers import (
    AmplificationError,
    check_amplification,
    decode_checked,
    hostile,
    nested_msgpack,
    raw_header,
)

ALL_KINDS = list(FrameKind)
BODY_KINDS = [kind for kind in ALL_KINDS if kind in BODY_TYPES]
#: ``CONDUIT_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz_properties.py`` for a deep run.
EXAMPLES = int(os.environ.get("CONDUIT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

# --------------------------------------------------------------------------- strategies

#: Anything msgpack can carry, including the extremes of every type.
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24)
    | st.binary(max_size=24)
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=16,
)


@st.composite
def body_shaped(draw: st.DrawFn, kind: FrameKind) -> dict[str, Any]:
    """A map with (some of) the field names of ``kind``'s body, holding anything."""
    body_type = BODY_TYPES.get(kind)
    names = [field.name for field in attrs.fields(body_type)] if body_type else ["x"]
    chosen = draw(st.lists(st.sampled_from(names), unique=True)) if names else []
    body: dict[Any, Any] = {name: draw(values) for name in chosen}
    if draw(st.booleans()):
        body[draw(st.text(max_size=6))] = draw(values)
    return body


@st.composite
def payloads(draw: st.DrawFn, kind: FrameKind) -> bytes:
    """A payload for ``kind``: raw bytes, any msgpack value, or a body-shaped map."""
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return draw(st.binary(max_size=256))
    value = draw(values) if choice == 1 else draw(body_shaped(kind))
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


@st.composite
def valid_frames(draw: st.DrawFn, max_payload: int = 2048) -> bytes:
    """One well-formed frame of any kind (bodies may still be nonsense)."""
    kind = draw(st.sampled_from(ALL_KINDS))
    stream_id = draw(st.integers(0, 2**32 - 1))
    flags = draw(st.sampled_from([0, 1]))
    payload = (
        draw(st.binary(max_size=max_payload)) if kind is FrameKind.DATA else draw(payloads(kind))
    )
    return raw_header(kind, stream_id, len(payload), flags) + payload


@st.composite
def frame_soup(draw: st.DrawFn) -> bytes:
    """Valid frames, mangled frames and garbage, concatenated."""
    parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 6))):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            parts.append(draw(st.binary(max_size=64)))
        elif choice == 1:
            frame = bytearray(draw(valid_frames()))
            position = draw(st.integers(0, len(frame) - 1))
            frame[position] ^= draw(st.integers(1, 255))
            parts.append(bytes(frame))
        elif choice == 2:
            whole = draw(valid_frames())
            parts.append(whole[: draw(st.integers(0, len(whole)))])
        else:
            parts.append(draw(valid_frames()))
    return b"".join(parts)


def _payloads(frame: Frame) -> list[memoryview] | list[bytes | memoryview]:
    """The payloads a frame from FrameReader stands for (a DataRun stands for several)."""
    return frame.payloads if isinstance(frame, DataRun) else [frame.payload]


def _drain_decoder(decoder: FrameDecoder, limit: int) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        assert len(frame.payload) <= limit
        frames.append(frame)
        if frame.kind is not FrameKind.DATA:
            decode_checked(frame)
    return frames


# --------------------------------------------------------------------------- FrameDecoder


@hostile(
    "fuzz-decoder-bytes",
    area="sans-IO fuzzing",
    attack="arbitrary byte streams, mangled and truncated frames, fed to FrameDecoder (limits "
    "16 B to 1 MiB) and to a clear-text FrameReader in arbitrary chunk sizes; every body decoded",
    behaviour="only ProtocolError escapes; buffered bytes never exceed what was fed, nor one "
    "header plus the limit; no decoded body is larger than its payload",
)
@FUZZ
@given(
    st.one_of(st.binary(max_size=4096), frame_soup()),
    st.integers(1, 97),
    st.sampled_from([16, 512, HANDSHAKE_MAX_FRAME, DEFAULT_MAX_FRAME_SIZE]),
)
def test_decoder_only_raises_protocol_errors(data: bytes, step: int, limit: int) -> None:
    decoder = FrameDecoder(limit)
    fed = 0
    try:
        for start in range(0, len(data), step):
            chunk = data[start : start + step]
            decoder.feed(chunk)
            fed += len(chunk)
            _drain_decoder(decoder, limit)
            assert decoder.buffered <= fed
            assert decoder.buffered < HEADER_SIZE + limit
            # The internal buffer is compacted: it never holds more than was fed either.
            assert len(decoder._buffer) <= fed
    except ProtocolError:
        pass
    # The same bytes through FrameReader in clear-text mode (the handshake's reader,
    # with its fixed 4 KiB limit).
    reader = FrameReader()
    fed = 0
    try:
        for start in range(0, len(data), step):
            chunk = data[start : start + step]
            reader.feed(chunk)
            fed += len(chunk)
            while (frame := reader.next_frame()) is not None:
                assert len(frame.payload) <= HANDSHAKE_MAX_FRAME
                if frame.kind is not FrameKind.DATA:
                    decode_checked(frame)
            assert reader._clear is not None and reader._clear.buffered <= fed
    except ProtocolError:
        pass


@hostile(
    "fuzz-decoder-roundtrip",
    area="sans-IO fuzzing",
    attack="well-formed frame sequences split at arbitrary points",
    behaviour="decoded exactly, in order, whatever the split; nothing left buffered",
)
@FUZZ
@given(st.lists(valid_frames(), min_size=1, max_size=6), st.lists(st.integers(0, 20_000)))
def test_decoder_round_trips_any_split(frames: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(frames)
    points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    decoder = FrameDecoder(1 << 16)
    decoded: list[Frame] = []
    for start, end in itertools.pairwise(points):
        decoder.feed(wire[start:end])
        while (frame := decoder.next_frame()) is not None:
            decoded.append(frame)
    assert decoder.buffered == 0
    assert [
        raw_header(f.kind, f.stream_id, len(f.payload), f.flags) + bytes(f.payload) for f in decoded
    ] == frames


@hostile(
    "fuzz-length-over-limit",
    area="sans-IO fuzzing",
    attack="a header whose length field is anything above the limit, up to 2^32-1 "
    "(clear text), or a record length prefix above the record limit (sealed)",
    behaviour="refused with RemoteProtocolError as soon as the 14-byte header (4-byte prefix) "
    "is complete, before any payload byte is buffered",
)
@FUZZ
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([16, HANDSHAKE_MAX_FRAME, 1 << 20]),
    st.sampled_from(ALL_KINDS),
)
def test_length_over_the_limit_is_refused_from_the_header_alone(
    length: int, limit: int, kind: FrameKind
) -> None:
    decoder = FrameDecoder(limit)
    decoder.feed(raw_header(kind, 1, length))
    if length > limit:
        with pytest.raises(RemoteProtocolError, match="exceeds the negotiated limit"):
            decoder.next_frame()
    else:
        frame = decoder.next_frame()
        assert (frame is None) == (length > 0)
    assert decoder.buffered <= HEADER_SIZE
    # Sealed records: the 4-byte length prefix alone decides.
    reader = FrameReader()
    reader.start_decryption(os.urandom(32), limit)
    reader.feed(struct.pack("!I", length))
    if length > limit + HEADER_SIZE + RECORD_SLACK + 16 or length < 16:
        with pytest.raises(RemoteProtocolError, match="outside the limit"):
            reader.next_frame()
    else:
        assert reader.next_frame() is None
    assert reader._opener is not None and reader._opener.buffered == 4


# --------------------------------------------------------------------------- bodies


@hostile(
    "fuzz-decode-body",
    area="sans-IO fuzzing",
    attack="decode_body of every frame kind with arbitrary bytes, arbitrary msgpack values "
    "(extreme integers, NaN, nested maps) and maps shaped like the kind's body with "
    "wrong-typed fields",
    behaviour="either a body of the right class or RemoteProtocolError; never another "
    "exception; no bytes field longer than the payload",
    found="cattrs builds `bytes` fields with bytes(value): an integer N in CLIENT_HELLO.pake or "
    "*_CONFIRM.mac allocates N zero bytes (finding 1)",
)
@FUZZ
@example(sample=(FrameKind.CLIENT_CONFIRM, msgpack.packb({"mac": 100})))
@given(sample=st.sampled_from(ALL_KINDS).flatmap(lambda k: st.tuples(st.just(k), payloads(k))))
def test_decode_body_only_raises_protocol_errors(sample: tuple[FrameKind, bytes]) -> None:
    kind, payload = sample
    frame = Frame(kind, 1, 0, payload)
    body = decode_checked(frame)  # raises anything but ProtocolError, or AmplificationError
    if body is not None:
        assert isinstance(body, BODY_TYPES[kind])


@pytest.mark.parametrize("kind", BODY_KINDS, ids=lambda k: k.name)
@hostile(
    "fuzz-body-every-kind",
    area="sans-IO fuzzing",
    attack="for each kind with a body: every field set to each of None, True, -1, 4096, 2^64-1, "
    "1e308, NaN, '', 'x'*300, b'', [], {}, and a 200-deep list",
    behaviour="RemoteProtocolError or a body; never another exception; no amplification",
    found="same as fuzz-decode-body (bytes from an integer)",
)
def test_every_body_field_with_every_wrong_type(kind: FrameKind) -> None:
    names = [field.name for field in attrs.fields(BODY_TYPES[kind])]
    deep: Any = None
    for _ in range(200):
        deep = [deep]
    samples: list[Any] = [
        None,
        True,
        -1,
        4096,
        2**64 - 1,
        1e308,
        float("nan"),
        "",
        "x" * 300,
        b"",
        [],
        {},
        deep,
    ]
    hints = typing.get_type_hints(BODY_TYPES[kind])
    for name in names or [""]:
        for sample in samples:
            payload = msgpack.packb({name: sample} if name else sample, use_bin_type=True)
            body = decode_checked(Frame(kind, 1, 0, payload))
            if body is not None:
                assert isinstance(body, BODY_TYPES[kind])
                _assert_fields_hold_their_types(body, hints)


def _assert_fields_hold_their_types(body: Any, hints: dict[str, Any]) -> None:
    """Every plain field holds a value of its own type, not one converted from
    another (cattrs' defaults made "77" a nonce of 77 and "no" a True
    ``going_away``: a fuzzing review, 2026-12-07)."""
    for field in attrs.fields(type(body)):
        kind = hints[field.name]
        if kind in (int, str, bool, bytes, float):
            value = getattr(body, field.name)
            assert type(value) is kind, (type(body).__name__, field.name, value)


@hostile(
    "fuzz-body-field-types",
    area="sans-IO fuzzing",
    attack="PING / PONG nonces of '77', 1e308 and True; a RESET reason of [1]; a GOODBYE's "
    "going_away of 'no' and 1",
    behaviour="RemoteProtocolError ('malformed ... body'): every field holds its own type, "
    "nothing is converted",
    found="cattrs converted them: a going_away of 'no' became True (a client told not to "
    "come back reconnected), a nonce of 1e308 an integer no PONG could carry, which ended "
    "the connection as a fault of ours (a fuzzing review, 2026-12-07)",
)
@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (FrameKind.PING, {"nonce": "77"}),
        (FrameKind.PING, {"nonce": 1e308}),
        (FrameKind.PING, {"nonce": True}),
        (FrameKind.PONG, {"nonce": "77"}),
        (FrameKind.RESET, {"code": "x", "reason": [1]}),
        (FrameKind.GOODBYE, {"reason": "bye", "going_away": "no"}),
        (FrameKind.GOODBYE, {"reason": "bye", "going_away": 1}),
    ],
)
def test_a_field_of_another_type_is_refused_not_converted(
    kind: FrameKind, body: dict[str, Any]
) -> None:
    """Checked, not coerced: a GOODBYE's ``going_away: "no"`` became True (a
    client reconnected that was told not to), a PING's nonce of 1e308 an
    integer no PONG could carry (the connection then ended as if by a fault
    of ours)."""
    payload = msgpack.packb(body, use_bin_type=True)
    with pytest.raises(RemoteProtocolError, match="malformed"):
        decode_body(Frame(kind, 0, 0, payload))


# --------------------------------------------------------------------------- sealed records


@st.composite
def plaintexts(draw: st.DrawFn) -> bytes:
    """What an authenticated (or key-holding) peer could put inside a record."""
    if draw(st.booleans()):
        return draw(frame_soup())
    return b"".join(draw(st.lists(valid_frames(max_payload=512), min_size=1, max_size=5)))


@hostile(
    "fuzz-sealed-reader",
    area="sans-IO fuzzing",
    attack="valid AEAD records (real key) around arbitrary plaintexts: garbage, mangled and "
    "truncated frames, bodies of every kind; optionally one byte of the sealed stream flipped",
    behaviour="only RemoteProtocolError / IntegrityError escape; record buffer never exceeds "
    "what was fed; frames from intact valid records come out in order",
)
@FUZZ
@given(
    st.lists(plaintexts(), min_size=1, max_size=4),
    st.integers(1, 5000),
    st.none() | st.integers(0, 2**20),
    st.binary(max_size=40),
)
def test_sealed_reader_only_raises_protocol_errors(
    records: list[bytes], step: int, flip: int | None, clear_prefix: bytes
) -> None:
    key = os.urandom(32)
    limit = 1 << 16
    sealer = RecordSealer(key, limit + HEADER_SIZE)
    wire = bytearray(b"".join(bytes(sealer.seal(p)) for p in records))
    if flip is not None:
        wire[flip % len(wire)] ^= 0x5A
    # Bytes that arrived with the last handshake frame move over to the opener.
    reader = FrameReader()
    reader.feed(clear_prefix)
    reader.start_decryption(key, limit)
    fed = len(clear_prefix)
    try:
        for start in range(0, len(wire), step):
            chunk = bytes(wire[start : start + step])
            reader.feed(chunk)
            fed += len(chunk)
            while (frame := reader.next_frame()) is not None:
                assert all(len(payload) <= limit for payload in _payloads(frame))
                if frame.kind is not FrameKind.DATA:
                    decode_checked(frame)
            assert reader._opener is not None and reader._opener.buffered <= fed
    except (ProtocolError, IntegrityError):
        pass


@hostile(
    "fuzz-sealed-roundtrip",
    area="sans-IO fuzzing",
    attack="FrameWriter packing arbitrary valid frames into records at any peer limit, "
    "read back split at arbitrary points",
    behaviour="every frame decoded exactly, in order",
)
@FUZZ
@given(
    st.lists(valid_frames(max_payload=3000), min_size=1, max_size=8),
    st.integers(1, 9000),
    st.sampled_from([4096, 16 * 1024, 1 << 20]),
)
def test_sealed_round_trip(frames: list[bytes], step: int, limit: int) -> None:
    key = os.urandom(32)
    writer, reader = FrameWriter(), FrameReader()
    writer.start_encryption(key, limit)
    reader.start_decryption(key, limit)
    frames = [f for f in frames if len(f) - HEADER_SIZE <= limit]
    wire = b"".join(writer.write_frames([(f,) for f in frames]))
    out: list[bytes] = []
    for start in range(0, len(wire), step):
        reader.feed(wire[start : start + step])
        while (frame := reader.next_frame()) is not None:
            # A run of DATA frames of one stream comes as one DataRun: its frames, in order.
            out.extend(
                raw_header(frame.kind, frame.stream_id, len(payload), frame.flags) + bytes(payload)
                for payload in _payloads(frame)
            )
    assert out == frames


# --------------------------------------------------------------------------- handshakes


PASSWORD = "property password"


def _first(data: bytes) -> Frame:
    reader = FrameReader()
    reader.feed(data)
    frame = reader.next_frame()
    assert frame is not None
    return frame


def _prepared() -> dict[str, Any]:
    client = ClientHandshake(PASSWORD, name="c", **HANDSHAKE_LIMITS)
    server = ServerHandshake(PASSWORD, name="s", **HANDSHAKE_LIMITS)
    waiting_hello = copy.deepcopy(client)
    waiting_hello.start()
    reply = server.receive(_first(client.start()))
    client.receive(_first(reply))
    return {
        "server-start": lambda: ServerHandshake(PASSWORD, name="s", **HANDSHAKE_LIMITS),
        "server-after-hello": lambda: copy.deepcopy(server),
        "client-after-start": lambda: copy.deepcopy(waiting_hello),
        "client-after-hello": lambda: copy.deepcopy(client),
    }


MACHINES = _prepared()


@st.composite
def handshake_frames(draw: st.DrawFn) -> Frame:
    kind = draw(st.sampled_from(ALL_KINDS))
    payload = draw(payloads(kind)) if kind is not FrameKind.DATA else draw(st.binary(max_size=64))
    return Frame(kind, draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([0, 1])), payload)


@hostile(
    "fuzz-handshake",
    area="sans-IO fuzzing",
    attack="arbitrary frame sequences (every kind, arbitrary bodies) fed to the server and "
    "client handshakes in each of their waiting states",
    behaviour="a ConduitError with the machine in FAILED, or a refusal frame; never another "
    "exception, never a completed handshake",
)
@settings(
    max_examples=max(50, EXAMPLES * 2 // 3),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.sampled_from(sorted(MACHINES)), st.lists(handshake_frames(), min_size=1, max_size=4))
def test_handshakes_fed_arbitrary_frames(state: str, frames: list[Frame]) -> None:
    machine = MACHINES[state]()
    try:
        for frame in frames:
            machine.receive(frame)
            if isinstance(machine, ServerHandshake) and machine.error is not None:
                assert machine.state is HandshakeState.FAILED
                return
    except ConduitError:
        assert machine.state is HandshakeState.FAILED
        return
    assert machine.keys is None
    assert machine.state is not HandshakeState.DONE


# --------------------------------------------------------------------------- regressions


@hostile(
    "bytes-from-int",
    area="sans-IO fuzzing (finding)",
    attack="CLIENT_HELLO whose pake is the integer 64 Mi, or CLIENT_CONFIRM whose mac is; "
    "both accepted before authentication",
    behaviour="refused as malformed without allocating (tracemalloc peak < 1 MiB)",
    found="cattrs structures bytes fields with bytes(int), allocating the integer's value in "
    "zero bytes: a 9-byte pre-auth frame makes the server allocate up to ~4 GiB (finding 1)",
)
@pytest.mark.parametrize(
    ("kind", "field"),
    [
        (FrameKind.CLIENT_HELLO, "pake"),
        (FrameKind.CLIENT_CONFIRM, "mac"),
        (FrameKind.SERVER_HELLO, "pake"),
        (FrameKind.SERVER_CONFIRM, "mac"),
    ],
)
def test_bytes_fields_are_not_built_from_integers(kind: FrameKind, field: str) -> None:
    body: dict[str, Any] = (
        {"protocol_version": 1, "name": "x", "max_frame_size": 1 << 20, "receive_window": 4 << 20}
        if "HELLO" in kind.name
        else {}
    )
    body[field] = 64 * 1024 * 1024
    frame = Frame(kind, 0, 0, msgpack.packb(body))
    tracemalloc.start()
    try:
        try:
            decoded = decode_body(frame)
        except RemoteProtocolError:
            decoded = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"decoding a {len(frame.payload)}-byte body allocated {peak} bytes"
    assert decoded is None, "an integer was accepted where bytes belong"


@hostile(
    "bytes-from-int-handshake",
    area="sans-IO fuzzing (finding)",
    attack="ServerHandshake fed a CLIENT_HELLO whose pake is the integer 64 Mi",
    behaviour="refused with RemoteProtocolError, the server allocates nothing for it",
    found="finding 1 reached through the real server state machine",
)
def test_server_handshake_hello_with_integer_pake() -> None:
    hello = {
        "protocol_version": 1,
        "name": "x",
        "pake": 64 * 1024 * 1024,
        "max_frame_size": 1 << 20,
        "receive_window": 4 << 20,
    }
    server = ServerHandshake(PASSWORD, name="s", **HANDSHAKE_LIMITS)
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            server.receive(Frame(FrameKind.CLIENT_HELLO, 0, 0, msgpack.packb(hello)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert server.state is HandshakeState.FAILED
    assert peak < 1024 * 1024, f"a 60-byte hello made the server allocate {peak} bytes"


@hostile(
    "deep-nesting-fast-path",
    area="sans-IO fuzzing (finding)",
    attack="CALL / RESULT / MESSAGE / CREDIT body that is a list nested 990-1024 deep "
    "(msgpack's own limit is 1024)",
    behaviour="RemoteProtocolError('malformed ... body')",
    found="the hand-written fast decoders format the raw value with str() for the error "
    "message; str() of a ~1000-deep list raises RecursionError, which escapes decode_body "
    "(finding 2)",
)
@pytest.mark.parametrize("depth", [990, 1000, 1024])
@pytest.mark.parametrize(
    "kind",
    [FrameKind.CALL, FrameKind.RESULT, FrameKind.MESSAGE, FrameKind.CREDIT],
    ids=lambda k: k.name,
)
def test_deeply_nested_bodies_are_protocol_errors(kind: FrameKind, depth: int) -> None:
    frame = Frame(kind, 1, 0, nested_msgpack(depth))
    with pytest.raises(RemoteProtocolError):
        decode_body(frame)


@hostile(
    "empty-record-stall",
    area="sans-IO fuzzing (finding)",
    attack="a valid sealed record with an empty plaintext, followed in the same read by a "
    "record holding a CALL",
    behaviour="the CALL is returned by the next next_frame() calls",
    found="FrameReader.next_frame returns None after an empty record although a whole record "
    "is buffered, so the connection stops draining and the CALL waits for unrelated bytes "
    "(finding 3)",
)
def test_empty_record_does_not_hide_the_next_one() -> None:
    key = os.urandom(32)
    sealer = RecordSealer(key, 1 << 20)
    call = encode_frame(FrameKind.CALL, 1, Call("ping", {}))
    reader = FrameReader()
    reader.start_decryption(key, 1 << 20)
    reader.feed(bytes(sealer.seal(b"")) + bytes(sealer.seal(call)))
    # Drained the way the connection drains it: None means "feed me more bytes".
    frames = []
    while (frame := reader.next_frame()) is not None:
        frames.append(frame)
    assert [f.kind for f in frames] == [FrameKind.CALL]


@hostile(
    "oracle-self-check",
    area="sans-IO fuzzing",
    attack="(self-check) the amplification oracle used by the properties and the atheris "
    "harnesses, on known-good and known-bad bodies",
    behaviour="flags a bytes field longer than its payload; passes every sane body",
)
def test_amplification_oracle_catches_what_it_should() -> None:
    """The oracle itself: a bytes field longer than the payload is flagged, sane bodies are not."""
    from conduit.protocol.messages import Confirm

    check_amplification(Confirm(b"x" * 32), 40)
    with pytest.raises(AmplificationError):
        check_amplification(Confirm(b"\0" * 300), 9)
    for body in (Call("m", {"a": 1}), Result(True, [1]), Message("e", None), Credit(5), Ping(1)):
        check_amplification(body, len(msgpack.packb(attrs.asdict(body))))
