"""The Trio connection engine over in-memory streams: calls, credit, heartbeats, close."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from conduit import ServerDescriptor
from conduit._call_workers import MAX_IDLE_FOLLOWERS
from conduit._connection import (
    BURST_RECORD_FRAMES,
    ROUND_TRIPS_KEPT,
    Connection,
    ConnectionSettings,
    settings_from,
)
from conduit._receive_memory import RECHECK_INTERVAL, SharedReceiveMemory
from conduit._result_gate import ResultGate
from conduit._streams import IncomingStream
from conduit.errors import ConnectionClosed, RPCError, RPCTimeoutError, StreamReset
from conduit.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_COST,
    ClientHandshake,
    FrameReader,
    FrameWriter,
    OutFrame,
    ServerHandshake,
    SessionKeys,
)
from conduit.protocol import connection as protocol_connection
from conduit.protocol.codec import (
    data_header,
    decode_result,
    encode_call,
    encode_frame,
    encode_value,
    iter_frames,
)
from conduit.protocol.connection import Buffer, Phase
from conduit.protocol.frames import HEADER_SIZE, FrameKind
from conduit.protocol.messages import Message, Ping
from conduit.protocol.records import RecordOpener
from conduit.protocol.records_io import RECORD_SLACK
from conduit.protocol.window_tuning import EPOCH_ROUND_TRIPS
from conduit.transfer import _engine
from conduit.transfer._engine import receive_file
from conduit.transfer._progress import ProgressReporter
from conduit.transfer._wire import Trailer
from conftest import PassThroughStream, wait_until

WINDOW = 256 * 1024


def _settings(**overrides: Any) -> ConnectionSettings:
    values: dict[str, Any] = {
        "max_frame_size": DEFAULT_MAX_FRAME_SIZE,
        "receive_window": WINDOW,
        "heartbeat_interval": 0,
        "heartbeat_timeout": 10,
        "idle_timeout": None,
        "max_concurrent_calls": 16,
        # Windows that stay what they open at, unless a test is about their
        # growth: in memory, a round trip is as quick as the consumer.
        "max_receive_window": WINDOW,
    }
    values.update(overrides)
    return ConnectionSettings(**values)


def _keys(
    client: ConnectionSettings | None = None, server: ConnectionSettings | None = None
) -> tuple[SessionKeys, SessionKeys]:
    """Session keys of a handshake whose sides announce the receive windows and
    largest frames of their settings (the defaults of :func:`_settings`)."""
    client, server = client or _settings(), server or _settings()
    client_side = ClientHandshake(
        "pw",
        name="c",
        max_frame_size=client.max_frame_size,
        receive_window=client.receive_window,
    )
    server_side = ServerHandshake(
        "pw",
        name="s",
        max_frame_size=server.max_frame_size,
        receive_window=server.receive_window,
    )

    def one(data: bytes) -> Any:
        reader = FrameReader()
        reader.feed(data)
        return reader.next_frame()

    reply = server_side.receive(one(client_side.start()))
    confirm = client_side.receive(one(reply))
    client_side.receive(one(server_side.receive(one(confirm))))
    assert client_side.keys is not None and server_side.keys is not None
    return client_side.keys, server_side.keys


def _endpoint(
    keys: SessionKeys, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> tuple[FrameReader, FrameWriter]:
    reader, writer = FrameReader(), FrameWriter()
    reader.start_decryption(keys.receive_key, max_frame_size)
    writer.start_encryption(keys.send_key, keys.peer_max_frame_size)
    return reader, writer


@attrs.define
class RecordingDispatcher:
    """Handlers for tests: ``methods`` by name; messages are recorded."""

    methods: dict[str, Any] = attrs.field(factory=dict)
    messages: list[tuple[str, Any]] = attrs.field(factory=list)
    # The connection this dispatcher is bound to (set once it is built).
    connection: Connection | None = None

    async def handle_call(self, method: str, args: dict[str, Any]) -> Any:
        if method not in self.methods:
            raise RPCError(f"no method {method}", "not_found")
        return await self.methods[method](self.connection, **args)

    async def handle_message(self, event: str, data: Any) -> None:
        self.messages.append((event, data))


@attrs.define
class Pair:
    client: Connection
    server: Connection
    client_dispatch: RecordingDispatcher
    server_dispatch: RecordingDispatcher
    #: The client's frame reader and writer, for a test that drives the client
    #: side by hand instead of running ``client``.
    client_frames: tuple[FrameReader, FrameWriter]


def _pair(
    client_stream: trio.abc.Stream,
    server_stream: trio.abc.Stream,
    client_settings: ConnectionSettings | None = None,
    server_settings: ConnectionSettings | None = None,
) -> Pair:
    client_settings = client_settings or _settings()
    server_settings = server_settings or _settings()
    client_keys, server_keys = _keys(client_settings, server_settings)
    cd, sd = RecordingDispatcher(), RecordingDispatcher()
    cr, cw = _endpoint(client_keys, client_settings.max_frame_size)
    sr, sw = _endpoint(server_keys, server_settings.max_frame_size)
    client = Connection(
        client_stream,
        cr,
        cw,
        client_keys,
        is_client=True,
        settings=client_settings,
        dispatcher=cd,
        label="client",
    )
    server = Connection(
        server_stream,
        sr,
        sw,
        server_keys,
        is_client=False,
        settings=server_settings,
        dispatcher=sd,
        label="server",
    )
    cd.connection, sd.connection = client, server
    return Pair(client, server, cd, sd, (cr, cw))


@contextlib.asynccontextmanager
async def _running_pair(
    client_settings: ConnectionSettings | None = None, **server_overrides: Any
) -> AsyncIterator[Pair]:
    """A connected pair over memory streams, both running; the server's
    settings with ``server_overrides``. Cancelled on exit."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server_settings = _settings(**server_overrides) if server_overrides else None
    p = _pair(client_stream, server_stream, client_settings, server_settings)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.client.run)
        nursery.start_soon(p.server.run)
        yield p
        nursery.cancel_scope.cancel()


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    async with _running_pair() as p:
        yield p


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_in_a_parked_caller_leaves_the_next_calls_sent_at_once() -> None:
    """Ctrl-C reaches a caller parked for its result through the same abort as
    a cancellation: its call is forgotten (and cancelled at the peer), and the
    count of callers being woken, which holds new calls back to send them
    together, is left as it was. Before, it went to -1, and from then on every
    call waited to be sent until eight were queued or something else was."""

    async def main() -> None:
        async with _running_pair() as p:
            gate = trio.Event()

            async def slow(_c: Connection) -> str:
                await gate.wait()
                return "slow"

            async def echo(_c: Connection, x: int) -> int:
                return x

            p.server_dispatch.methods.update(slow=slow, echo=echo)
            timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            try:
                with pytest.raises(KeyboardInterrupt), trio.fail_after(10):
                    await p.client.call("slow", {}, None)  # parked: Ctrl-C lands here
            finally:
                timer.cancel()
            assert p.client._pending.waking == 0
            with trio.fail_after(5):
                assert await p.client.call("echo", {"x": 2}, 2.0) == 2
            gate.set()

    # Python's handler, even when the tests were started with SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        trio.run(main)
    finally:
        signal.signal(signal.SIGINT, previous)


_REQUEST_USER: contextvars.ContextVar[str] = contextvars.ContextVar("request_user", default="-")


async def test_each_call_has_its_own_contextvars(pair: Pair) -> None:
    """A handler runs in the task that read its call (and, once it blocks,
    goes on there), but with its own copy of the context: what it sets is seen
    by itself, across its waits, and by no later call."""

    async def login(_c: Connection, name: str, block: bool) -> str:
        _REQUEST_USER.set(name)
        if block:
            await trio.sleep(0.01)  # blocked: finished off the reading path
        return _REQUEST_USER.get()

    async def whoami(_c: Connection) -> str:
        return _REQUEST_USER.get()

    pair.server_dispatch.methods.update(login=login, whoami=whoami)
    with trio.fail_after(10):
        assert await pair.client.call("login", {"name": "alice", "block": False}, None) == "alice"
        assert await pair.client.call("whoami", {}, None) == "-"
        assert await pair.client.call("login", {"name": "bob", "block": True}, None) == "bob"
        assert await pair.client.call("whoami", {}, None) == "-"


async def test_calls_both_ways(pair: Pair) -> None:
    async def add(_c: Connection, a: int, b: int) -> int:
        return a + b

    pair.server_dispatch.methods["add"] = add
    pair.client_dispatch.methods["add"] = add
    with trio.fail_after(5):
        assert await pair.client.call("add", {"a": 2, "b": 3}, None) == 5
        assert await pair.server.call("add", {"a": 20, "b": 3}, None) == 23
        with pytest.raises(RPCError) as info:
            await pair.client.call("missing", {}, None)
    assert info.value.code == "not_found"


async def test_slow_handler_does_not_delay_other_calls(pair: Pair) -> None:
    release = trio.Event()
    finished: list[str] = []

    async def slow(_c: Connection) -> str:
        await release.wait()
        finished.append("slow")
        return "slow"

    async def fast(_c: Connection) -> str:
        finished.append("fast")
        return "fast"

    pair.server_dispatch.methods.update(slow=slow, fast=fast)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.client.call, "slow", {}, None)
            await trio.testing.wait_all_tasks_blocked()
            assert await pair.client.call("fast", {}, None) == "fast"
            assert finished == ["fast"]
            release.set()
    assert finished == ["fast", "slow"]


async def test_a_burst_of_calls_runs_each_once_and_each_gets_its_own_outcome(pair: Pair) -> None:
    # Calls that return, raise an RPCError, raise anything else, or block
    # (and then return or raise), made together so that they travel and are
    # run together: each runs once, the ones that do not block are answered
    # while the others still wait, and each outcome is its own.
    release = trio.Event()
    ran: list[int] = []

    async def work(_c: Connection, n: int, how: str) -> int:
        ran.append(n)
        if how.startswith("block"):
            await release.wait()
        if how.endswith("rpc_error"):
            raise RPCError(f"refused {n}", "refused")
        if how.endswith("crash"):
            raise ValueError(f"bad {n}")
        return n * 10

    pair.server_dispatch.methods["work"] = work
    kinds = ["ok", "rpc_error", "crash", "block", "block_rpc_error", "block_crash"]
    calls = [(n, kinds[n % len(kinds)]) for n in range(24)]
    outcomes: dict[int, Any] = {}

    async def caller(n: int, how: str) -> None:
        try:
            outcomes[n] = await pair.client.call("work", {"n": n, "how": how}, None)
        except RPCError as exc:
            outcomes[n] = exc.code

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for n, how in calls:
                nursery.start_soon(caller, n, how)
            await trio.testing.wait_all_tasks_blocked()
            # Every call ran once (the blocked ones up to their wait); the
            # ones that did not block are answered already.
            assert sorted(ran) == [n for n, _ in calls]
            assert outcomes == {
                n: {"ok": n * 10, "rpc_error": "refused", "crash": "handler_error"}[how]
                for n, how in calls
                if not how.startswith("block")
            }
            release.set()
    expected = {"ok": None, "rpc_error": "refused", "crash": "handler_error"}
    for n, how in calls:
        want = expected[how.removeprefix("block_") if how != "block" else "ok"]
        assert outcomes[n] == (n * 10 if want is None else want)


class _CountingGate(ResultGate):
    """A :class:`ResultGate` that records how many results were in hand at most."""

    __slots__ = ("in_hand", "most")

    def __init__(self) -> None:
        super().__init__()
        self.in_hand = self.most = 0

    def take(self, size: int) -> None:
        super().take(size)
        self.in_hand += 1
        self.most = max(self.most, self.in_hand)

    def release(self, size: int) -> None:
        self.in_hand -= 1
        super().release(size)


async def test_large_results_wait_unread_until_those_in_hand_are_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Results read together whose callers have not run yet are not all
    decoded at once: past RESULTS_IN_HAND_BYTES (1 MiB here), the reader
    waits until the callers woken took theirs. Every caller gets its own
    value, and nothing is left counted once they have."""
    monkeypatch.setattr(protocol_connection, "RESULTS_IN_HAND_BYTES", 1024 * 1024)
    gate = _CountingGate()
    release = trio.Event()
    started: list[int] = []
    got: dict[int, int] = {}

    async def maps(_c: Connection, n: int) -> list[dict[str, int]]:
        started.append(n)
        await release.wait()  # all answered together, in one read or few
        return [{}] * n  # 20 KB on the wire, ~1.4 MB decoded

    with trio.fail_after(10):
        async with _running_pair(_settings(results_in_hand=gate)) as p:
            p.server_dispatch.methods["maps"] = maps

            async def caller(index: int) -> None:
                got[index] = len(await p.client.call("maps", {"n": 20_000 + index}, None))

            async with trio.open_nursery() as callers:
                for index in range(8):
                    callers.start_soon(caller, index)
                await wait_until(lambda: len(started) == 8)
                release.set()
    assert got == {index: 20_000 + index for index in range(8)}
    assert gate.most == 1 and gate.held == 0 and gate.in_hand == 0


async def test_handler_may_call_back_into_its_peer(pair: Pair) -> None:
    async def outer(conn: Connection) -> int:
        return int(await conn.call("inner", {}, None)) + 1

    async def inner(_c: Connection) -> int:
        return 41

    pair.server_dispatch.methods["outer"] = outer
    pair.client_dispatch.methods["inner"] = inner
    with trio.fail_after(5):
        assert await pair.client.call("outer", {}, None) == 42


@pytest.mark.parametrize("autojump", [True])
async def test_timeout_cancels_the_remote_handler(
    pair: Pair, autojump_clock: trio.testing.MockClock, autojump: bool
) -> None:
    cancelled = trio.Event()

    async def forever(_c: Connection) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    pair.server_dispatch.methods["forever"] = forever
    with pytest.raises(RPCTimeoutError):
        await pair.client.call("forever", {}, 3)
    with trio.fail_after(5):
        await cancelled.wait()


async def test_messages_arrive_in_order(pair: Pair) -> None:
    for i in range(100):
        await pair.client.send_message("tick", i)
    with trio.fail_after(5):
        await trio.testing.wait_all_tasks_blocked()
    assert [data for _, data in pair.server_dispatch.messages] == list(range(100))


async def _consume(stream: IncomingStream, sink: bytearray) -> bytes:
    while True:
        chunks, trailer = await stream.receive()
        for chunk in chunks:
            sink += chunk
        if trailer is not None:
            return trailer


async def test_stream_transfers_bytes_exactly(pair: Pair) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    incoming = pair.server.open_incoming_stream()
    outgoing = pair.client.open_outgoing_stream(incoming.stream_id)
    received = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                for start in range(0, len(payload), 100_000):
                    await outgoing.send([payload[start : start + 100_000]])
                await outgoing.finish(b"trailer")

            nursery.start_soon(send)
            assert await _consume(incoming, received) == b"trailer"
    assert bytes(received) == payload


async def _send_chunk_by_chunk(outgoing: Any, payload: bytes, chunk: int) -> None:
    """Send ``payload`` one chunk at a time, letting the receiver run between chunks."""
    for start in range(0, len(payload), chunk):
        await outgoing.send([payload[start : start + chunk]])
        await trio.testing.wait_all_tasks_blocked()
    await outgoing.finish(b"end")


@pytest.mark.parametrize("at_least", [100_000, 64 * 1024 * 1024])
async def test_receive_at_least_returns_batches_of_that_size(at_least: int) -> None:
    """Chunks trickling in one by one come out in batches of ``at_least`` bytes
    (frame costs included), capped at half the window so the sender can always
    fill one; the last batch is whatever came before the END."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    # The server accepts frames of up to 16 KiB: a sender blocked on credit
    # leaves at most that (+ FRAME_COST) of the window unsent.
    p = _pair(client_stream, server_stream, server_settings=_settings(max_frame_size=16 * 1024))
    payload = os.urandom(1024 * 1024 + 17)
    incoming = p.server.open_incoming_stream()
    outgoing = p.client.open_outgoing_stream(incoming.stream_id)
    wanted = min(at_least, WINDOW // 2)
    batches: list[list[bytes]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.client.run)
            nursery.start_soon(p.server.run)
            nursery.start_soon(_send_chunk_by_chunk, outgoing, payload, 16 * 1024)
            while True:
                chunks, trailer = await incoming.receive(at_least, patience=60)
                batches.append([bytes(chunk) for chunk in chunks])
                if trailer is not None:
                    break
            nursery.cancel_scope.cancel()
    assert trailer == b"end"
    assert b"".join(b"".join(batch) for batch in batches) == payload
    for batch in batches[:-1]:
        assert sum(map(len, batch)) + FRAME_COST * len(batch) >= wanted
    assert len(batches) < len(payload) // (16 * 1024)


@pytest.mark.parametrize(
    ("frame", "piece"), [(16 * 1024, 16 * 1024), (WINDOW - FRAME_COST, WINDOW)]
)
async def test_receive_at_least_never_waits_for_more_than_a_blocked_sender_leaves(
    frame: int, piece: int
) -> None:
    """The sender's frames as large as the receiver allows: a batch of half the
    window would wait for bytes the sender has no credit to send (frames of a
    whole window: no batching at all). Ends, with every byte, instead of hanging."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    p = _pair(client_stream, server_stream, server_settings=_settings(max_frame_size=frame))
    payload = os.urandom(3 * WINDOW + 100)
    incoming = p.server.open_incoming_stream()
    outgoing = p.client.open_outgoing_stream(incoming.stream_id)
    received = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.client.run)
            nursery.start_soon(p.server.run)
            # A piece of a whole window goes as a frame and a 64-byte rest;
            # the next frame then needs the whole window's credit while the
            # rest sits here, below half the window.
            nursery.start_soon(_send_chunk_by_chunk, outgoing, payload, piece)
            while True:
                chunks, trailer = await incoming.receive(WINDOW, patience=60)
                for chunk in chunks:
                    received += chunk
                if trailer is not None:
                    break
            nursery.cancel_scope.cancel()
    assert bytes(received) == payload


async def test_receive_at_least_hands_over_what_came_before_a_reset(pair: Pair) -> None:
    """A stream the sender aborts below the threshold: the bytes that did arrive
    are returned first (a receiver keeps them for a resume), then the reset."""
    incoming = pair.server.open_incoming_stream()
    outgoing = pair.client.open_outgoing_stream(incoming.stream_id)
    with trio.fail_after(10):
        await outgoing.send([b"k" * 5000])
        await trio.testing.wait_all_tasks_blocked()
        pair.client.close_stream(outgoing, reset=("cancelled", "sender gave up"))
        chunks, trailer = await incoming.receive(WINDOW, patience=60)
        assert b"".join(chunks) == b"k" * 5000 and trailer is None
        with pytest.raises(StreamReset, match="sender gave up"):
            await incoming.receive(WINDOW, patience=60)


async def test_receive_at_least_waits_no_longer_than_its_patience(pair: Pair) -> None:
    """A sender that pauses below the threshold: what came is handed over after
    ``patience``, not when (if ever) the batch fills."""
    incoming = pair.server.open_incoming_stream()
    outgoing = pair.client.open_outgoing_stream(incoming.stream_id)
    with trio.fail_after(10):
        await outgoing.send([b"p" * 5000])
        chunks, trailer = await incoming.receive(WINDOW, patience=0.05)
        assert b"".join(chunks) == b"p" * 5000 and trailer is None


async def _hold_each_batch(p: Pair, payload: bytes, *, ahead: bool) -> int:
    """Send ``payload`` on a new stream; the consumer holds each batch until the
    sender is blocked again. Checks every byte arrives in order; returns the most
    bytes sent but not yet consumed (what the receiving side held) at any time."""
    incoming = p.server.open_incoming_stream()
    outgoing = p.client.open_outgoing_stream(incoming.stream_id)
    received = bytearray()
    most_held = 0
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await outgoing.send([payload])
                await outgoing.finish(b"end")

            nursery.start_soon(send)
            while True:
                # The sender runs until it is blocked on credit (or done).
                await trio.testing.wait_all_tasks_blocked()
                chunks, trailer = await incoming.receive(ahead=ahead)
                await trio.testing.wait_all_tasks_blocked()
                # Still holding ``chunks``: what did the sender get to send?
                most_held = max(most_held, outgoing.bytes_sent - len(received))
                assert incoming.buffered_cost + sum(map(len, chunks)) <= 2 * WINDOW
                for chunk in chunks:
                    received += chunk
                if trailer is not None:
                    break
    assert trailer == b"end"
    assert bytes(received) == payload
    return most_held


async def test_receive_ahead_returns_credit_before_the_batch_is_consumed(pair: Pair) -> None:
    """``receive(ahead=True)``: the credit of the consumer's whole batch (up to
    a window) goes back when it takes it, so the sender refills the window
    while the consumer still holds a full one; but never more: what the
    stream buffers plus what the consumer holds stays within two windows,
    however long the consumer holds it."""
    most_held = await _hold_each_batch(pair, os.urandom(6 * WINDOW + 123), ahead=True)
    assert WINDOW + WINDOW // 2 < most_held <= 2 * WINDOW


async def test_receive_ahead_stays_within_the_connection_receive_budget() -> None:
    """A connection whose receive budget is one window has no room for credit
    returned ahead: the sender is held to one window, as without ``ahead``."""
    async with _running_pair(receive_budget=WINDOW) as p:
        assert await _hold_each_batch(p, os.urandom(3 * WINDOW), ahead=True) <= WINDOW


async def test_receive_ahead_holds_batches_of_many_frames_within_two_windows() -> None:
    """The same with frames much smaller than the window (a batch of many
    frames, as a file transfer's 64 KiB chunks make): the credit of all of them
    goes back when the batch is taken."""
    async with _running_pair(max_frame_size=16 * 1024) as p:
        most_held = await _hold_each_batch(p, os.urandom(6 * WINDOW + 123), ahead=True)
        assert WINDOW + WINDOW // 2 < most_held <= 2 * WINDOW


async def _delay_line(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.SendStream,
    delay: float,
    rate: float | None = None,
) -> None:
    """Forward what ``source`` sends to ``sink`` ``delay`` seconds later, in order,
    without waiting for anything in between: one way of a long link. With
    ``rate`` (bytes per second), the link carries no more: bytes queue at its
    narrowest point and leave it in slices of 64 KiB, as packets would."""
    send_channel, receive_channel = trio.open_memory_channel[tuple[float, bytes]](math.inf)
    free_at = 0.0

    async def forward() -> None:
        async for due, data in receive_channel:
            await trio.sleep_until(due)
            await sink.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(forward)
        while data := await source.receive_some():
            view = memoryview(data)
            while view:
                cut = 64 * 1024 if rate is not None else len(view)
                piece, view = view[:cut], view[cut:]
                leaves = trio.current_time()
                if rate is not None:
                    free_at = max(free_at, leaves) + len(piece) / rate
                    leaves = free_at
                send_channel.send_nowait((leaves + delay, bytes(piece)))
        send_channel.close()


@contextlib.asynccontextmanager
async def _running_pair_over_a_link(
    round_trip: float,
    *,
    rate: float | None = None,
    server_settings: ConnectionSettings | None = None,
) -> AsyncIterator[Pair]:
    """A connected pair, both running, through a link of ``round_trip``
    seconds, half of it each way, carrying at most ``rate`` bytes per second
    if given (see :func:`_delay_line`). Cancelled on exit."""
    client_stream, client_end = trio.testing.memory_stream_pair()
    server_end, server_stream = trio.testing.memory_stream_pair()
    p = _pair(client_stream, server_stream, server_settings=server_settings)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_delay_line, client_end, server_end, round_trip / 2, rate)
        nursery.start_soon(_delay_line, server_end, client_end, round_trip / 2, rate)
        nursery.start_soon(p.client.run)
        nursery.start_soon(p.server.run)
        yield p
        nursery.cancel_scope.cancel()


@attrs.define
class _LongLinkRun:
    """What :func:`_upload_over_a_long_link` saw."""

    took: float
    pair: Pair
    streams: list[IncomingStream]
    #: By how much the bytes one stream held at most (buffered and in its
    #: consumer's batch) exceeded two of its windows at the time.
    most_over: int = 0
    #: The most the server's inbound streams had committed of its receive budget.
    most_committed: int = 0
    #: The fewest more streams that could open, sampled from ``count_openings_at``
    #: seconds in until the transfers ended.
    openable: int | None = None


async def _upload_over_a_long_link(
    payload: bytes,
    round_trip: float,
    *,
    rate: float | None = None,
    streams: int = 1,
    consumer_pause: float = 0.0,
    write_time: float | None = None,
    count_openings_at: float | None = None,
    **server: Any,
) -> _LongLinkRun:
    """Send ``payload`` on each of ``streams`` streams at once from the client
    to the server through a link of ``round_trip`` seconds (carrying at most
    ``rate`` bytes per second, if given: see :func:`_delay_line`); each consumer takes
    every batch at once (or after ``consumer_pause``), or, with ``write_time``
    (seconds per window), keeps up to two batches for a writer as the file
    receiver does. From ``count_openings_at`` seconds on, count how many more
    streams the server could open."""
    async with _running_pair_over_a_link(
        round_trip, rate=rate, server_settings=_settings(**server)
    ) as p:
        run = _LongLinkRun(0.0, p, [])

        async def carry(incoming: IncomingStream) -> None:
            outgoing = p.client.open_outgoing_stream(incoming.stream_id)

            async def send() -> None:
                # As an upload's sender, which starts when the call that opened
                # the stream is answered: after the PING its opening sent.
                await trio.sleep(round_trip)
                await outgoing.send([payload])
                await outgoing.finish(b"end")

            received = bytearray()
            kept = trio.Semaphore(2)
            to_writer, batches = trio.open_memory_channel[int](math.inf)

            async def writer() -> None:
                async for size in batches:
                    assert write_time is not None
                    await trio.sleep(write_time * size / WINDOW)
                    incoming.release()
                    kept.release()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(writer)
                while True:
                    if write_time is None:
                        chunks, trailer = await incoming.receive(ahead=True)
                    else:
                        await kept.acquire()
                        chunks, trailer = await incoming.receive(
                            WINDOW // 2, patience=0.005, ahead=True, keep=True
                        )
                        to_writer.send_nowait(sum(map(len, chunks)))
                    held = incoming.buffered_cost + sum(map(len, chunks))
                    # What a stream holds stays within two of its windows, grown or not.
                    run.most_over = max(run.most_over, held - 2 * incoming.window)
                    committed = p.server._state.receive_committed()
                    run.most_committed = max(run.most_committed, committed)
                    received += b"".join(chunks)
                    if trailer is not None:
                        break
                    if consumer_pause:
                        await trio.sleep(consumer_pause)
                to_writer.close()
            assert received == payload

        run.streams = [p.server.open_incoming_stream() for _ in range(streams)]
        started = trio.current_time()

        async def count_openings(at: float) -> None:
            await trio.sleep_until(started + at)
            while True:
                opened = []
                with contextlib.suppress(RPCError):
                    for _ in range(1000):
                        opened.append(p.server.open_incoming_stream())
                found = len(opened)
                run.openable = found if run.openable is None else min(run.openable, found)
                for stream in opened:
                    p.server.close_stream(stream, reset=None)
                await trio.sleep(0.1)

        async with trio.open_nursery() as carriers:
            if count_openings_at is not None:
                carriers.start_soon(count_openings, count_openings_at)
            async with trio.open_nursery() as transfers:
                for incoming in run.streams:
                    transfers.start_soon(carry, incoming)
            carriers.cancel_scope.cancel()
        run.took = trio.current_time() - started
    return run


async def test_a_window_grows_to_what_a_long_round_trip_needs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A window per round trip caps a stream at window / round trip: over a link
    of 100 ms, a stream whose window may grow moves its bytes in well under half
    the time of one whose window stays, and its window reaches its limit; what
    the receiving side holds stays within two of its windows all the while."""
    payload = os.urandom(48 * WINDOW)
    pinned = await _upload_over_a_long_link(payload, 0.1)
    grown = await _upload_over_a_long_link(payload, 0.1, max_receive_window=4 * WINDOW)
    assert pinned.streams[0].window == WINDOW
    assert grown.streams[0].window == 4 * WINDOW
    assert grown.took < pinned.took / 2, (grown.took, pinned.took)
    assert grown.most_over <= 0
    assert grown.pair.server.round_trip == pytest.approx(0.1, abs=0.01)


async def test_a_descriptor_lets_windows_grow_unless_told_not_to(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A server descriptor's settings, as a connection is given them: by
    default a window may grow to eight times its opening size, and over a
    link of 100 ms it does; with ``max_receive_window=receive_window`` it
    stays where it opens. (A client descriptor's default is the same: see
    tests/test_descriptor_checks.py.)"""
    payload = os.urandom(96 * WINDOW)
    windows = []
    defaults = ServerDescriptor(password="x", receive_window=WINDOW)
    for descriptor in (defaults, attrs.evolve(defaults, max_receive_window=WINDOW)):
        settings = settings_from(descriptor)
        run = await _upload_over_a_long_link(
            payload, 0.1, max_receive_window=settings.max_receive_window
        )
        windows.append(run.streams[0].window)
    assert windows == [8 * WINDOW, WINDOW]


async def test_a_window_stays_where_the_consumer_is_the_slower_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same link, but a consumer that takes a batch only every half second
    (a slow disk): the window is not what paces the stream, and it stays."""
    payload = os.urandom(16 * WINDOW)
    run = await _upload_over_a_long_link(
        payload, 0.1, consumer_pause=0.5, max_receive_window=8 * WINDOW
    )
    assert run.streams[0].window == WINDOW


async def test_a_growing_window_reads_the_round_trips_timed_since_its_epoch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``round_trips_since``: the round trips of the PINGs sent since (the last
    ``ROUND_TRIPS_KEPT``, kept from the first ``probe_round_trip`` on), the
    one still out counted at how long it has been out once that makes it
    late (a queue no PONG has come back through yet is still a queue);
    ``probe_round_trip`` sends none while one is out."""
    autojump_clock.autojump_threshold = 0  # nothing here runs in a thread
    # A slow link: 100 KB ahead of a PONG make it 100 ms late.
    async with _running_pair_over_a_link(0.05, rate=1e6) as p:
        started = trio.current_time()
        assert p.server.round_trips_since(started) == []
        p.server.probe_round_trip()
        await trio.sleep(0.03)
        # Out for 30 ms, but no round trip was timed yet to be late against.
        assert p.server.round_trips_since(started) == []
        p.server.probe_round_trip()  # one is out: its PONG is still timed
        await trio.sleep(0.03)
        first = p.server.round_trip
        assert first == pytest.approx(0.05, abs=0.001)
        assert p.server.round_trips_since(started) == [first]
        assert p.server.round_trips_since(started + 0.001) == []

        # 100 KB from the client ahead of the next PONG: a queue.
        incoming = p.server.open_incoming_stream()
        outgoing = p.client.open_outgoing_stream(incoming.stream_id)
        await outgoing.send([os.urandom(100_000)])
        queued = trio.current_time()
        p.server.probe_round_trip()
        await trio.sleep(0.06)
        assert p.server.round_trips_since(queued) == []  # not late yet
        await trio.sleep(0.01)  # 70 ms: over 1.25 times the smallest (50)
        assert p.server.round_trips_since(queued) == [pytest.approx(0.07)]
        await trio.sleep(0.1)
        # Behind the 75 KB still queued when the PING reached the client.
        [took] = p.server.round_trips_since(queued)
        assert took == pytest.approx(0.05 + 0.075, abs=0.002)
        assert p.server.round_trip == first

        # The connection keeps the last ROUND_TRIPS_KEPT round trips, no more,
        # and no fewer than an epoch asks for.
        for _ in range(ROUND_TRIPS_KEPT + 8):
            p.server.probe_round_trip()
            await trio.sleep(0.06)
        assert EPOCH_ROUND_TRIPS <= len(p.server.round_trips_since(started)) == ROUND_TRIPS_KEPT
        # The client, whose windows never asked for one, keeps none.
        p.client.ping_now()
        await trio.sleep(0.06)
        assert p.client.round_trip is not None
        assert p.client.round_trips_since(started) == []


async def test_a_window_that_fills_the_link_stops_growing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Over 47 ms at 100 MB/s a window of 4 MiB leaves the link idle at times:
    it doubles. At 8 MiB the link is full and what the window holds beyond it
    waits in the link's queue: every PONG comes back 63-73 ms after its PING
    (over 1.25 times 47), and the window stays. By the credit alone it would
    double again (4.4-4.7 MB came back per round trip, over half of 8 MiB,
    4.19 MB), putting another 8 MiB, 84 ms, in the queue ahead of every call.
    """
    autojump_clock.autojump_threshold = 0  # nothing here runs in a thread
    window, rate, round_trip = 4 * 1024 * 1024, 100e6, 0.047
    payload = os.urandom(32 * window)
    run = await _upload_over_a_long_link(
        payload,
        round_trip,
        rate=rate,
        receive_window=window,
        max_receive_window=8 * window,
        receive_budget=32 * window,
    )
    assert run.streams[0].window == 2 * window
    assert run.pair.server.round_trip == pytest.approx(round_trip, abs=0.001)
    # At the link's rate but for the first epoch: 1.13 times the link's
    # time (a window of 4 MiB took 1.80 times it).
    link_time = len(payload) / rate + round_trip
    assert run.took < link_time * 1.2, (run.took, link_time)


async def test_a_window_grows_until_the_link_is_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Over 80 ms at 100 MB/s (8 MB per round trip) a window of 4 MiB leaves
    the link half idle: it doubles, and at 8 MiB (8.39 MB, the link nearly
    full: PONGs come back on time or 10.5 ms late, a record behind, under
    the tolerance of 20) doubles again; the stream takes 0.56 times as long as
    with the window that stays (1.66 s against 2.96, the first epochs at the
    smaller windows included)."""
    autojump_clock.autojump_threshold = 0  # nothing here runs in a thread
    window, rate, round_trip = 4 * 1024 * 1024, 100e6, 0.08
    payload = os.urandom(24 * window)
    settings: dict[str, Any] = {"receive_window": window, "receive_budget": 32 * window}
    pinned = await _upload_over_a_long_link(
        payload, round_trip, rate=rate, max_receive_window=window, **settings
    )
    grown = await _upload_over_a_long_link(
        payload, round_trip, rate=rate, max_receive_window=8 * window, **settings
    )
    assert grown.streams[0].window == 4 * window
    assert pinned.took > len(payload) * round_trip / window  # a window per round trip
    assert grown.took < pinned.took * 0.7, (grown.took, pinned.took)


async def test_grown_windows_leave_half_the_budget_to_streams_yet_to_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Growth comes out of the connection's receive budget, and windows never
    shrink: two streams that could each grow to four windows of a budget of
    eight share half of it, and while they run, four more streams can still
    open (with a window's reserve only, they took five or six windows and
    three could: transfers beside them were refused ``too_many_streams``)."""
    budget = 8 * WINDOW
    payload = os.urandom(48 * WINDOW)
    run = await _upload_over_a_long_link(
        payload,
        0.1,
        streams=2,
        count_openings_at=2.2,
        max_receive_window=4 * WINDOW,
        receive_budget=budget,
    )
    windows = [stream.window for stream in run.streams]
    assert max(windows) > WINDOW, windows  # grown
    assert sum(windows) <= budget // 2, windows
    assert run.openable is not None and run.openable >= 4, run.openable
    assert run.most_over <= 0


async def test_the_batches_of_grown_windows_leave_their_half_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A writer keeping two batches, as the file receiver does: the credit a
    grown window returns early for them comes out of its own half of the
    budget too (it took all but one window: one more stream could open, of
    the eight the other half holds)."""
    budget = 16 * WINDOW
    run = await _upload_over_a_long_link(
        os.urandom(60 * WINDOW),
        0.08,
        streams=2,
        write_time=0.04,
        count_openings_at=1.5,
        max_receive_window=8 * WINDOW,
        receive_budget=budget,
    )
    assert max(stream.window for stream in run.streams) > WINDOW  # grown
    assert run.openable is not None and run.openable >= 8, run.openable
    assert run.most_committed <= budget // 2


@attrs.define
class _MemorySink:
    """A partial file in memory, for :func:`receive_file`: written as it is awaited."""

    data: bytearray = attrs.field(factory=bytearray)
    blocking_write: Callable[[Sequence[Buffer]], None] | None = None

    @property
    def offset(self) -> int:
        return len(self.data)

    async def write(self, chunks: Sequence[Buffer]) -> None:
        for chunk in chunks:
            self.data += chunk


async def _receive_a_file_over_a_link(size: int, round_trip: float, rate: float) -> float:
    """Seconds :func:`receive_file` takes for ``size`` bytes from the client,
    sent in 64 KiB chunks through a link of ``round_trip`` seconds carrying
    ``rate`` bytes per second, into memory, with windows of 4 MiB (the
    default); every byte checked."""
    window = 4 * 1024 * 1024
    payload = os.urandom(size)
    settings = _settings(receive_window=window, max_receive_window=window)
    sink = _MemorySink()
    async with (
        _running_pair_over_a_link(round_trip, rate=rate, server_settings=settings) as p,
        trio.open_nursery() as nursery,
    ):
        incoming = p.server.open_incoming_stream()
        outgoing = p.client.open_outgoing_stream(incoming.stream_id)
        trailer = Trailer(size, hashlib.sha256(payload).digest())
        started = trio.current_time()

        async def send() -> None:
            view = memoryview(payload)
            for offset in range(0, size, 64 * 1024):
                await outgoing.send([view[offset : offset + 64 * 1024]])
            await outgoing.finish(trailer.pack())

        nursery.start_soon(send)
        reporter = ProgressReporter(None, filename="f", direction="upload", total_size=size)
        assert await receive_file(incoming, sink, size=size, reporter=reporter) == trailer
        took = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert sink.data == payload
    return took


async def test_the_file_receiver_keeps_a_link_its_window_covers_busy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The file receiver batches its writes (``WRITE_BATCH``), but the credit
    of what arrived goes back only when it takes the batch, so it waits for one
    no longer than ``WRITE_PATIENCE``: over a link of 20 ms and 100 MB/s, which
    a window of 4 MiB covers twice over, 64 MiB arrive within 5 % of the
    link's own time. Waiting 20 ms, as it did, took 18 % longer (0.80 s
    against the link's 0.68)."""
    # Nothing here runs in a thread (the sink writes as it is awaited, records
    # are sealed and opened on the loop), so the clock may jump the moment all
    # tasks wait: with the fixture's threshold, each of the link's ~1,200
    # idle spells would cost 20 ms of real time.
    autojump_clock.autojump_threshold = 0
    size, rate, round_trip = 64 * 1024 * 1024, 100e6, 0.02
    took = await _receive_a_file_over_a_link(size, round_trip, rate)
    link_time = size / rate + round_trip / 2
    assert took <= link_time * 1.05, (took, link_time)


async def test_the_file_receiver_waits_for_no_batch_a_slow_link_brings_apart(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 100 MB/s a record of 1 MiB arrives every 10.5 ms, further apart than
    ``WRITE_PATIENCE``: a wait for the rest of a batch would run out every
    time, holding the credit of what arrived back for 5 ms a record. Over a
    link of 40 ms, which the default window barely covers, the file arrives
    as fast as with a receiver that never waits (patience 0; waiting every
    time took 9 % longer)."""
    autojump_clock.autojump_threshold = 0  # nothing here runs in a thread
    size, rate, round_trip = 64 * 1024 * 1024, 100e6, 0.04
    took = await _receive_a_file_over_a_link(size, round_trip, rate)
    monkeypatch.setattr(_engine, "WRITE_PATIENCE", 0.0)
    impatient = await _receive_a_file_over_a_link(size, round_trip, rate)
    assert took <= impatient * 1.01, (took, impatient)


async def test_receive_waits_for_a_batch_only_while_data_comes_close_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``receive(at_least, patience=...)`` waits for the rest of a batch while
    one of the last two gaps between DATA events was at most ``patience``:
    after one long gap (a sender pausing between pairs of records, a late
    record) it still waits; after two, it returns what is there at once; and
    once data comes close together again, it waits again."""
    # Frames of 16 KiB at most: a batch of half the window can be waited for.
    async with _running_pair(max_frame_size=16 * 1024) as p:
        incoming = p.server.open_incoming_stream()
        outgoing = p.client.open_outgoing_stream(incoming.stream_id)

        async def send_after(pause: float, *chunks: bytes) -> None:
            await trio.sleep(pause)
            for chunk in chunks:
                await outgoing.send([chunk])
                await trio.testing.wait_all_tasks_blocked()

        async def receive() -> tuple[int, float]:
            """Bytes returned, and seconds waited for them."""
            before = trio.current_time()
            chunks, _ = await incoming.receive(WINDOW // 2, patience=0.5)
            return sum(map(len, chunks)), trio.current_time() - before

        await send_after(0, b"a" * 1000, b"b" * 1000)  # a moment apart
        assert await receive() == pytest.approx((2000, 0.5))
        await send_after(1, b"c" * 1000)  # one long gap: it still waits
        assert await receive() == pytest.approx((1000, 0.5))
        await send_after(1, b"d" * 1000)  # two: it does not
        assert await receive() == (1000, 0)
        await send_after(1, b"e" * 1000, b"f" * 1000)  # close together again
        assert await receive() == pytest.approx((2000, 0.5))


async def test_credit_returned_ahead_leaves_room_for_one_more_stream() -> None:
    """Early credit never takes the last window of the receive budget: with a
    budget of two and a half windows, a consumer holding most of a window still
    leaves room to open a second stream (early credit for all of it would not)."""
    budget = 2 * WINDOW + WINDOW // 2
    async with _running_pair(receive_budget=budget) as p, trio.open_nursery() as nursery:
        first = p.server.open_incoming_stream()
        outgoing = p.client.open_outgoing_stream(first.stream_id)
        with trio.fail_after(10):
            nursery.start_soon(outgoing.send, [os.urandom(3 * WINDOW)])
            await trio.testing.wait_all_tasks_blocked()
            chunks, _ = await first.receive(ahead=True)  # held: not consumed yet
            assert sum(map(len, chunks)) > WINDOW // 2
            assert first.ahead <= WINDOW // 2
            second = p.server.open_incoming_stream()
            assert p.server._state.receive_committed() <= budget
            p.server.close_stream(second, reset=None)
        nursery.cancel_scope.cancel()


async def _keep_two_batches(p: Pair, payload: bytes) -> tuple[int, int]:
    """Send ``payload`` on a new stream to a consumer that writes behind, as
    ``receive_file`` does: it takes each batch with ``receive(ahead=True,
    keep=True)`` and queues it for a writer task, which releases it once
    "written" (after everyone else has run as far as they can); the next
    batch is taken once at most one is left with the writer, so at most two
    are kept. Checks every byte arrives in
    order and ``ahead`` never exceeds the kept batches; returns the most bytes
    held on the receiving side (sent but not released) and the most early
    credit outstanding."""
    incoming = p.server.open_incoming_stream()
    outgoing = p.client.open_outgoing_stream(incoming.stream_id)
    received = bytearray()
    kept: list[int] = []  # bytes of each batch kept, oldest first
    kept_cost: list[int] = []  # and their credit (bytes and frame costs)
    released = most_held = most_ahead = 0
    queue_in, queue_out = trio.open_memory_channel[int](0)

    memory = p.server.settings.receive_memory

    def look() -> None:
        nonlocal most_held, most_ahead
        most_held = max(most_held, outgoing.bytes_sent - released)
        most_ahead = max(most_ahead, incoming.ahead)
        assert incoming.ahead <= sum(kept_cost)
        assert p.server._state.receive_committed() == incoming.window + incoming.ahead
        if memory is not None:
            # Early credit leaves the kept bytes counted: sent and not yet
            # granted back, plus granted back early and still kept.
            assert memory.held == incoming.window - incoming.available + incoming.ahead

    async def send() -> None:
        await outgoing.send([payload])
        await outgoing.finish(b"end")

    async def write() -> None:
        nonlocal released
        async for size in queue_out:
            await trio.testing.wait_all_tasks_blocked()
            look()
            released += kept.pop(0)
            kept_cost.pop(0)
            assert size >= 0
            incoming.release()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(write)
            async with queue_in:
                while True:
                    assert len(kept) <= 1
                    chunks, trailer = await incoming.receive(ahead=True, keep=True)
                    kept.append(sum(map(len, chunks)))
                    kept_cost.append(kept[-1] + len(chunks) * FRAME_COST)
                    for chunk in chunks:
                        received += chunk
                    look()
                    await queue_in.send(kept[-1])
                    if trailer is not None:
                        break
    assert trailer == b"end"
    assert bytes(received) == payload
    assert not kept and incoming.ahead == 0
    return most_held, most_ahead


async def test_kept_batches_stay_counted_until_released(pair: Pair) -> None:
    """``receive(keep=True)``: a consumer may keep two batches (one being
    written, the next queued behind it); their early credit stays counted
    against the connection's receive budget (``ahead``) until each is
    released, and the sender refills the window all the while. The stream and
    its consumer then hold at most a window and the batches kept."""
    most_held, most_ahead = await _keep_two_batches(pair, os.urandom(8 * WINDOW + 123))
    assert 2 * WINDOW < most_held <= 3 * WINDOW
    assert WINDOW < most_ahead <= 2 * WINDOW


async def test_the_servers_receive_memory_counts_kept_batches_until_released() -> None:
    """A server's receive memory (``server_receive_budget``) counts what a
    stream holds, not the credit it has returned: a batch kept by a writer
    stays counted though its credit went back early, until it is released;
    the stream's end and close leave nothing counted."""
    memory = SharedReceiveMemory(1 << 30)
    async with _running_pair(receive_memory=memory) as p:
        most_held, most_ahead = await _keep_two_batches(p, os.urandom(8 * WINDOW + 123))
        assert most_ahead > WINDOW  # early credit was returned for kept batches
        assert 2 * WINDOW < most_held <= 3 * WINDOW
        (stream,) = p.server._state.incoming.values()
        assert isinstance(stream, IncomingStream)
        p.server.close_stream(stream)
        assert memory.held == 0


async def test_a_reader_waits_for_room_in_the_servers_receive_memory(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``wait_for_room`` returns at once when something taken out makes room
    (``freed``), within ``RECHECK_INTERVAL`` when a decrease was not
    announced, and as soon as the reader no longer needs room (its streams
    are gone); never while the budget is exceeded and room is needed."""
    memory = SharedReceiveMemory(100)
    needed = True
    returned: list[float] = []

    async def reader() -> None:
        await memory.wait_for_room(lambda: needed)
        returned.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for change in ("freed", "unannounced", "not needed"):
            memory.held, needed = 150, True
            returned.clear()
            nursery.start_soon(reader)
            # Halfway between two of its looks, so that one not woken shows.
            await trio.sleep(5.5 * RECHECK_INTERVAL)
            assert returned == [], change
            start = trio.current_time()
            if change == "not needed":
                needed = False
            else:
                memory.held = 100
            if change == "freed":
                memory.freed()
            await trio.sleep(2 * RECHECK_INTERVAL)
            assert len(returned) == 1, change
            waited = returned[0] - start
            assert waited == 0 if change == "freed" else 0 < waited <= RECHECK_INTERVAL, change


async def test_kept_batches_stay_within_the_connection_receive_budget() -> None:
    """With a budget of three windows, keeping batches earns no more early
    credit than the budget's room beyond one more window (one window here):
    the sender is held to two windows, though the consumer keeps two."""
    async with _running_pair(receive_budget=3 * WINDOW) as p:
        most_held, most_ahead = await _keep_two_batches(p, os.urandom(6 * WINDOW))
        assert WINDOW < most_held <= 2 * WINDOW
        assert WINDOW // 2 < most_ahead <= WINDOW


async def test_a_release_returns_credit_to_a_consumer_parked_for_data() -> None:
    """With no room for early credit, a kept batch's credit returns only when
    it is released, even while the consumer is parked in ``receive`` (a
    writer thread releases it): the sender, blocked on that credit, goes on."""
    async with _running_pair(receive_budget=WINDOW) as p, trio.open_nursery() as nursery:
        incoming = p.server.open_incoming_stream()
        outgoing = p.client.open_outgoing_stream(incoming.stream_id)
        payload = os.urandom(2 * WINDOW)
        with trio.fail_after(10):
            nursery.start_soon(outgoing.send, [payload])
            await trio.testing.wait_all_tasks_blocked()
            first, _ = await incoming.receive(ahead=True, keep=True)
            assert incoming.ahead == 0  # no room beyond one window: nothing early
            taken = sum(map(len, first))

            async def release_later() -> None:
                await trio.testing.wait_all_tasks_blocked()
                incoming.release()  # as the writer's callback does, from outside receive

            nursery.start_soon(release_later)
            second, _ = await incoming.receive(ahead=True, keep=True)
            assert b"".join([*first, *second]) == payload[: taken + sum(map(len, second))]
            assert sum(map(len, second)) > 0
        nursery.cancel_scope.cancel()


async def test_receive_without_keep_consumes_the_batches_kept(pair: Pair) -> None:
    """A call without ``keep`` consumes every batch kept so far: their early
    credit no longer counts, and a release after it is a no-op."""
    incoming = pair.server.open_incoming_stream()
    outgoing = pair.client.open_outgoing_stream(incoming.stream_id)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outgoing.send, [os.urandom(3 * WINDOW)])
            await trio.testing.wait_all_tasks_blocked()
            await incoming.receive(ahead=True, keep=True)
            assert incoming.ahead > 0
            await trio.testing.wait_all_tasks_blocked()
            await incoming.receive(ahead=False)
            assert incoming.ahead == 0
            incoming.release()
            assert incoming.ahead == 0
            nursery.cancel_scope.cancel()


async def test_receive_without_ahead_holds_the_sender_to_one_window(pair: Pair) -> None:
    """The default: a batch's credit returns only when the consumer comes back."""
    assert await _hold_each_batch(pair, os.urandom(3 * WINDOW), ahead=False) <= WINDOW


async def test_slow_consumer_stalls_only_its_own_stream(pair: Pair) -> None:
    """Stream A's consumer never reads; stream B and RPCs still flow."""
    stalled = pair.server.open_incoming_stream()
    flowing = pair.server.open_incoming_stream()
    out_stalled = pair.client.open_outgoing_stream(stalled.stream_id)
    out_flowing = pair.client.open_outgoing_stream(flowing.stream_id)

    async def echo(_c: Connection, x: int) -> int:
        return x

    pair.server_dispatch.methods["echo"] = echo
    blob = os.urandom(WINDOW * 4)
    async with trio.open_nursery() as nursery:
        # Sends one window's worth, then blocks waiting for credit forever.
        nursery.start_soon(out_stalled.send, [blob])
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked()
            assert out_stalled.bytes_sent < WINDOW + 1
            received = bytearray()

            async def send_flowing() -> None:
                await out_flowing.send([blob])
                await out_flowing.finish()

            nursery.start_soon(send_flowing)
            await _consume(flowing, received)
            assert bytes(received) == blob
            assert await pair.client.call("echo", {"x": 7}, None) == 7
        nursery.cancel_scope.cancel()


async def test_peer_exceeding_credit_is_disconnected() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    p = _pair(client_stream, server_stream)
    incoming = p.server.open_incoming_stream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.client.run)
        nursery.start_soon(p.server.run)
        await trio.testing.wait_all_tasks_blocked()
        # Bypass OutgoingStream's accounting: push more than the window.
        chunk = b"x" * (64 * 1024)
        frames: list[tuple[OutFrame, int]] = [
            ((data_header(incoming.stream_id, len(chunk)), chunk), len(chunk))
            for _ in range(WINDOW // len(chunk) + 1)
        ]
        await p.client._outbox.put_data(frames)
        with trio.fail_after(5):
            await p.server.closed.wait()
        assert p.server.close_reason is not None
        assert "credit window" in p.server.close_reason
        nursery.cancel_scope.cancel()
    assert FRAME_COST > 0


async def test_data_for_unopened_stream_is_a_protocol_error() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    p = _pair(client_stream, server_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.client.run)
        nursery.start_soon(p.server.run)
        await trio.testing.wait_all_tasks_blocked()
        await p.client._outbox.put_data([((data_header(2002, 3), b"abc"), 3)])
        with trio.fail_after(5):
            await p.server.closed.wait()
        assert "never opened" in (p.server.close_reason or "")
        nursery.cancel_scope.cancel()


async def test_silent_peer_hits_the_heartbeat_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    p = _pair(
        client_stream,
        server_stream,
        server_settings=_settings(heartbeat_interval=1.0, heartbeat_timeout=3.0),
    )
    # Only the server runs: the client never answers pings.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.server.run)
        with trio.fail_after(30):
            await p.server.closed.wait()
    assert "heartbeat timeout" in (p.server.close_reason or "")
    assert trio.current_time() < 10


async def test_a_beat_held_up_by_our_own_stall_does_not_judge_the_peer() -> None:
    """A process suspended (SIGSTOP, a paused VM) or with its event loop blocked
    wakes with its beat long overdue and the peer's PINGs unread in its socket:
    that silence is its own. The late beat pings and puts its verdict off to
    the next beat, once: that one judges even if it is late too (a loop late
    at every beat still judges every other one), and this peer, never driven,
    is silent."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    p = _pair(
        client_stream,
        server_stream,
        server_settings=_settings(heartbeat_interval=1.0, heartbeat_timeout=3.0),
    )
    server = p.server
    stalled = trio.current_time() + 1.0 + 10.0  # the beat comes 10 s after it was due
    assert server.beat(stalled)
    assert server.close_reason is None
    assert not server.beat(stalled + 1.0 + 2.0)  # late again: judged all the same
    assert "peer silent for 14.0s" in (server.close_reason or ""), server.close_reason


async def _ping_every(
    stream: trio.abc.SendStream, writer: FrameWriter, interval: float, until: trio.Event
) -> None:
    """A hand-driven peer's heartbeat: a PING every ``interval`` until ``until`` (at most 1,000)."""
    ping = encode_frame(FrameKind.PING, 0, Ping(1))
    for _ in range(1000):
        if until.is_set():
            return
        try:
            for record in writer.write_frames([(ping,)]):
                await stream.send_all(record)
        except trio.BrokenResourceError:
            return  # the other side closed
        await trio.sleep(interval)


async def test_a_peer_that_sends_but_never_reads_hits_the_heartbeat_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Lockstep: every send waits until the peer has read it. The peer pings
    # (so it is never silent) and reads nothing: the server's own first PING
    # can never go out.
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    p = _pair(
        client_stream,
        server_stream,
        server_settings=_settings(heartbeat_interval=1.0, heartbeat_timeout=3.0),
    )
    _reader, writer = p.client_frames
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.server.run)
        nursery.start_soon(_ping_every, client_stream, writer, 0.5, p.server.closed)
        with trio.fail_after(60):
            await p.server.closed.wait()
    assert "read nothing" in (p.server.close_reason or ""), p.server.close_reason
    assert trio.current_time() < 10


async def test_a_slow_reader_is_not_taken_for_one_that_stopped_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A 960 KiB result read at 32 KiB per 0.4 s (82 KB/s) takes 12 s, over
    # four heartbeat timeouts: each slice the peer takes is progress, and
    # only a send that makes none for the timeout ends the connection.
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    p = _pair(
        client_stream,
        server_stream,
        server_settings=_settings(heartbeat_interval=1.0, heartbeat_timeout=3.0),
    )
    payload = os.urandom(960 * 1024)  # one frame (max_frame_size is 1 MiB)

    async def blob(_c: Connection) -> bytes:
        return payload

    p.server_dispatch.methods["blob"] = blob
    reader, writer = p.client_frames
    got_result = trio.Event()
    results: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.server.run)
        for record in writer.write_frames([(encode_call(1, "blob", {}),)]):
            await client_stream.send_all(record)
        nursery.start_soon(_ping_every, client_stream, writer, 1.0, got_result)
        with trio.fail_after(120):
            for _ in range(1000):
                reader.feed(await client_stream.receive_some(32 * 1024))
                while (frame := reader.next_frame()) is not None:
                    if frame.kind is FrameKind.RESULT:
                        results.append(decode_result(frame.payload))
                        got_result.set()
                if got_result.is_set():
                    break
                await trio.sleep(0.4)
        assert p.server.is_open, p.server.close_reason
        nursery.cancel_scope.cancel()
    assert [(r.ok, r.value) for r in results] == [(True, payload)]
    assert trio.current_time() > 3 * 3.0  # the read took over three timeouts


async def test_idle_connection_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    p = _pair(
        client_stream,
        server_stream,
        client_settings=_settings(heartbeat_interval=1.0, heartbeat_timeout=5.0),
        server_settings=_settings(heartbeat_interval=1.0, heartbeat_timeout=5.0, idle_timeout=4.0),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.client.run)
        nursery.start_soon(p.server.run)
        with trio.fail_after(60):
            await p.client.closed.wait()
            await p.server.closed.wait()
    # Pings alone kept the link alive but did not count as activity.
    assert "idle" in (p.client.close_reason or "")


async def test_graceful_close_fails_pending_calls_with_the_reason(pair: Pair) -> None:
    async def forever(_c: Connection) -> None:
        await trio.sleep_forever()

    pair.server_dispatch.methods["forever"] = forever
    async with trio.open_nursery() as nursery:

        async def caller() -> None:
            with pytest.raises(ConnectionClosed, match="maintenance"):
                await pair.client.call("forever", {}, None)

        nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            await pair.server.close("maintenance")
    with trio.fail_after(5):
        await pair.client.closed.wait()
    assert not pair.client.is_open


async def test_lockstep_streams_work() -> None:
    """Every send waits for the matching receive: no hidden buffering assumptions."""
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    p = _pair(client_stream, server_stream)

    async def echo(_c: Connection, x: Any) -> Any:
        return x

    p.server_dispatch.methods["echo"] = echo
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.client.run)
        nursery.start_soon(p.server.run)
        with trio.fail_after(5):
            for i in range(20):
                assert await p.client.call("echo", {"x": [i, "x" * i]}, None) == [i, "x" * i]
        nursery.cancel_scope.cancel()


async def test_blocking_handlers_hand_the_reading_over() -> None:
    """Calls run in the task that read them; each one that blocks passes reading on.

    More blocked calls than idle followers are kept, twice over: fast calls are
    answered while they all wait, and every one of them is answered in the end.
    """
    client_stream, server_stream = trio.testing.memory_stream_pair()
    pair = _pair(client_stream, server_stream, server_settings=_settings(max_concurrent_calls=100))
    async with trio.open_nursery() as connections:
        connections.start_soon(pair.client.run)
        connections.start_soon(pair.server.run)
        await _blocking_rounds(pair)
        connections.cancel_scope.cancel()


async def _blocking_rounds(pair: Pair) -> None:
    release = trio.Event()

    async def wait(_c: Connection, n: int) -> int:
        await release.wait()
        return n

    async def fast(_c: Connection, n: int) -> int:
        return -n

    pair.server_dispatch.methods.update(wait=wait, fast=fast)
    blocked = MAX_IDLE_FOLLOWERS + 8
    for _round in range(2):
        release = trio.Event()
        answers: dict[int, int] = {}

        async def call(method: str, n: int, into: dict[int, int]) -> None:
            into[n] = await pair.client.call(method, {"n": n}, None)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for n in range(blocked):
                    nursery.start_soon(call, "wait", n, answers)
                await trio.testing.wait_all_tasks_blocked()
                fast_answers: dict[int, int] = {}
                async with trio.open_nursery() as fast_calls:
                    for n in range(10):
                        fast_calls.start_soon(call, "fast", n, fast_answers)
                assert fast_answers == {n: -n for n in range(10)}
                assert answers == {}
                release.set()
        assert answers == {n: n for n in range(blocked)}


async def test_cancelling_a_blocked_call_ends_only_that_call(
    pair: Pair, autojump_clock: trio.testing.MockClock
) -> None:
    cancelled = trio.Event()

    async def forever(_c: Connection) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async def echo(_c: Connection, x: int) -> int:
        return x

    pair.server_dispatch.methods.update(forever=forever, echo=echo)
    for attempt in range(3):
        cancelled = trio.Event()
        with pytest.raises(RPCTimeoutError):
            await pair.client.call("forever", {}, 1)
        with trio.fail_after(5):
            await cancelled.wait()
            assert await pair.client.call("echo", {"x": attempt}, None) == attempt


def _socket_pair(send_buffer: int | None = None) -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = socket.socketpair()
    if send_buffer is not None:
        for sock in (left, right):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, send_buffer)
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(left)),
        trio.SocketStream(trio.socket.from_stdlib_socket(right)),
    )


async def test_real_socket_calls_results_larger_than_the_socket_buffer_and_a_stream() -> None:
    """Over a real socket (the SocketIO fast path): a result the socket cannot take
    at once is finished by a shielded send, concurrent calls and a data stream
    share the connection, and the peer closing ends it cleanly."""
    client_stream, server_stream = _socket_pair(send_buffer=16 * 1024)
    p = _pair(client_stream, server_stream)
    big = os.urandom(900 * 1024)

    async def blob(_c: Connection, n: int) -> bytes:
        return big[n:]

    async def echo(_c: Connection, x: int) -> int:
        return x

    p.server_dispatch.methods.update(blob=blob, echo=echo)
    payload = os.urandom(2 * 1024 * 1024 + 5)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.client.run)
            nursery.start_soon(p.server.run)
            # Alone on the connection: sent directly, more than the socket takes at once.
            assert await p.client.call("blob", {"n": 0}, None) == big
            incoming = p.server.open_incoming_stream()
            outgoing = p.client.open_outgoing_stream(incoming.stream_id)
            received = bytearray()

            async def send() -> None:
                await outgoing.send([payload])
                await outgoing.finish(b"end")

            nursery.start_soon(send)
            results: dict[int, Any] = {}

            async def call(n: int) -> None:
                results[n] = await p.client.call(
                    "blob" if n % 4 == 0 else "echo", {"n": n} if n % 4 == 0 else {"x": n}, None
                )

            async with trio.open_nursery() as calls:
                for n in range(32):
                    calls.start_soon(call, n)
            assert await _consume(incoming, received) == b"end"
            assert bytes(received) == payload
            assert results == {n: big[n:] if n % 4 == 0 else n for n in range(32)}
            await p.server.close("done")
            await p.client.closed.wait()
    assert p.client.closed_on_purpose


async def test_a_connection_ends_in_one_pass_after_the_peers_goodbye() -> None:
    """The common end (the peer's GOODBYE, no task of the connection left) closes
    the socket inside the nursery, so the nursery's exit is the one scheduling
    pass between the end (a pending call failed, the socket closed) and
    ``closed`` being set, as before: the task that runs ``run()`` takes two
    steps from the GOODBYE to its end, not three."""
    client_stream, server_stream = _socket_pair()
    p = _pair(client_stream, server_stream)
    blocked = trio.Event()

    async def hang(_c: Connection) -> None:
        blocked.set()
        await trio.sleep_forever()

    p.client_dispatch.methods["hang"] = hang
    server_task: trio.lowlevel.Task | None = None
    steps_after_close = 0
    failed: list[str] = []

    class Steps(trio.abc.Instrument):
        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            nonlocal steps_after_close
            if task is server_task and not p.server.is_open:
                steps_after_close += 1

    async def run_server() -> None:
        nonlocal server_task
        server_task = trio.lowlevel.current_task()
        await p.server.run()

    async def caller() -> None:
        with pytest.raises(ConnectionClosed) as raised:
            await p.server.call("hang", {}, None)
        failed.append(str(raised.value))

    instrument = Steps()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.client.run)
            nursery.start_soon(run_server)
            nursery.start_soon(caller)
            await blocked.wait()
            trio.lowlevel.add_instrument(instrument)
            try:
                await p.client.close("done", grace=5.0)
                await p.server.closed.wait()
            finally:
                trio.lowlevel.remove_instrument(instrument)
    assert steps_after_close == 2
    assert len(failed) == 1 and "done" in failed[0]


async def test_a_close_with_nothing_queued_sends_its_goodbye_without_the_writer_task() -> None:
    """A disconnect with nothing queued (the writer idle or never started)
    sends its GOODBYE from the closing task: no writer task is started for
    it, and the peer still ends on that GOODBYE, with its reason, as a close
    on purpose. With a frame still queued the writer sends it first, as
    before (the second half)."""
    spawned: list[object] = []  # the client's writer tasks

    async def echo(_c: Connection, x: int) -> int:
        return x

    class Spawns(trio.abc.Instrument):
        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            frame = getattr(task.coro, "cr_frame", None)
            if "_send_task" in task.name and frame is not None:
                spawned.append(frame.f_locals.get("self"))

    for queued in (False, True):
        client_stream, server_stream = _socket_pair()
        p = _pair(client_stream, server_stream)
        spawned.clear()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(p.client.run)
                nursery.start_soon(p.server.run)
                p.server_dispatch.methods["echo"] = echo
                assert await p.client.call("echo", {"x": 1}, None) == 1
                instrument = Spawns()
                trio.lowlevel.add_instrument(instrument)
                try:
                    if queued:
                        # A frame queued for the writer (which this starts).
                        p.client._outbox.put_control((encode_frame(FrameKind.PING, 0, Ping(7)),))
                    await p.client.close("bye")
                    await p.server.closed.wait()
                finally:
                    trio.lowlevel.remove_instrument(instrument)
        assert spawned.count(p.client) == (1 if queued else 0)
        assert p.server.close_reason == "peer closed the connection: bye"
        assert p.server.closed_on_purpose


@attrs.define(eq=False)
class _FailingAfterArming(PassThroughStream):
    """A stream that, once :attr:`armed`, fails every send with a reset (not a
    broken stream): what a stream given to ``connect(stream=...)`` may raise."""

    armed: bool = False
    sends_armed: int = 0
    closed: bool = False
    #: Called at each send, once set.
    on_send: Callable[[], None] | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.on_send is not None:
            self.on_send()
        if self.armed:
            self.sends_armed += 1
            await trio.lowlevel.checkpoint()
            raise ConnectionResetError(104, "reset by the test")
        await self.inner.send_all(data)

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


@pytest.mark.parametrize("send_fails", [False, True])
async def test_a_run_cancelled_from_outside_says_goodbye_on_a_stream_that_awaits(
    send_fails: bool,
) -> None:
    """On a stream that cannot send without awaiting (TLS; here a memory
    stream), a run() cancelled from outside sends its GOODBYE at teardown,
    once the session is released (nothing else may use the connection while
    that send awaits): the peer ends on it, as a close on purpose. A send
    that fails with an error of its own still lets the teardown end: run()
    returns, the stream is closed and the connection reported closed."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    wrapped = _FailingAfterArming(client_stream)
    p = _pair(wrapped, server_stream)

    async def echo(_c: Connection, x: int) -> int:
        return x

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client_scope = trio.CancelScope()

            async def run_client() -> None:
                with client_scope:
                    await p.client.run()

            nursery.start_soon(run_client)
            nursery.start_soon(p.server.run)
            p.server_dispatch.methods["echo"] = echo
            assert await p.client.call("echo", {"x": 1}, None) == 1
            wrapped.armed = send_fails
            phases_at_send: list[Phase] = []
            wrapped.on_send = lambda: phases_at_send.append(p.client._state.phase)
            client_scope.cancel()
            await p.client.closed.wait()
            if send_fails:
                p.server.abort("the test is over")
            await p.server.closed.wait()
    assert wrapped.closed
    assert p.client.closed_on_purpose
    assert p.client.left_for_good  # its application's end: no coming back on its token
    assert phases_at_send == [Phase.CLOSED]  # one send, the GOODBYE, once released
    if send_fails:
        assert wrapped.sends_armed == 1  # the GOODBYE was tried
    else:
        assert p.server.close_reason == "peer closed the connection: client shutting down"
        assert p.server.closed_on_purpose
        assert p.server.peer_left_for_good


_SET_BY_A_HANDLER: contextvars.ContextVar[str] = contextvars.ContextVar(
    "set_by_a_handler", default="clean"
)


async def test_a_follower_does_not_inherit_what_a_blocked_handler_set(pair: Pair) -> None:
    """The follower that takes over reading starts from the connection's context."""
    release = trio.Event()

    async def sets_and_waits(_c: Connection) -> str:
        _SET_BY_A_HANDLER.set("set by the blocked handler")
        await release.wait()
        return "done"

    async def reads(_c: Connection) -> str:
        return _SET_BY_A_HANDLER.get()

    pair.server_dispatch.methods.update(sets_and_waits=sets_and_waits, reads=reads)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.client.call, "sets_and_waits", {}, None)
            await trio.testing.wait_all_tasks_blocked()
            assert await pair.client.call("reads", {}, None) == "clean"
            release.set()


async def test_readers_never_wait_on_a_full_socket() -> None:
    """Both peers call each other for results far larger than the socket buffers.

    Each reader runs the calls it reads and starts sending their results; if a
    reader waited for the socket to take the whole result, both would wait for
    the other to read, forever. Readers only write what the socket takes at
    once and leave the rest to the writer, so every call is answered.
    """
    client_stream, server_stream = _socket_pair(send_buffer=16 * 1024)
    p = _pair(client_stream, server_stream)
    big = os.urandom(900 * 1024)

    async def blob(_c: Connection, n: int) -> bytes:
        return big[n:]

    p.server_dispatch.methods["blob"] = blob
    p.client_dispatch.methods["blob"] = blob
    answers: list[bool] = []

    async def call(connection: Connection, n: int) -> None:
        answers.append(await connection.call("blob", {"n": n}, None) == big[n:])

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.client.run)
            nursery.start_soon(p.server.run)
            async with trio.open_nursery() as calls:
                for n in range(8):
                    calls.start_soon(call, p.client, n)
                    calls.start_soon(call, p.server, n)
            nursery.cancel_scope.cancel()
    assert answers == [True] * 16


async def test_the_writer_finishes_small_records_the_socket_did_not_take() -> None:
    """The writer sends a small record with one non-blocking write (no
    ``send_all``); when the peer is not reading and the socket fills, the rest
    of the record and every record after it still go out, in order."""
    client_stream, server_stream = _socket_pair(send_buffer=16 * 1024)
    p = _pair(client_stream, server_stream)
    count = 300
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.client.run)
            # One-way messages go through the writer, one small record each.
            for index in range(count):
                await p.client.send_message("m", {"i": index, "pad": bytes(1000)})
            await trio.testing.wait_all_tasks_blocked()
            assert p.client._outbox.control_queued or not p.client._outbox.writer_idle
            nursery.start_soon(p.server.run)  # now the peer reads
            for _ in range(1000):
                if len(p.server_dispatch.messages) == count:
                    break
                await trio.sleep(0.01)
            assert [data["i"] for _, data in p.server_dispatch.messages] == list(range(count))
            await p.client.close("done")


class HandDrivenPeer:
    """The server end of a real socket pair, driven by hand, so that the
    records a client :class:`Connection` sends can be counted."""

    def __init__(self) -> None:
        client_stream, self.stream = _socket_pair()
        client_keys, server_keys = _keys()
        reader, writer = _endpoint(client_keys)
        self.client = Connection(
            client_stream,
            reader,
            writer,
            client_keys,
            is_client=True,
            settings=_settings(),
            dispatcher=RecordingDispatcher(),
            label="client",
        )
        self._opener = RecordOpener(
            server_keys.receive_key, DEFAULT_MAX_FRAME_SIZE + HEADER_SIZE + RECORD_SLACK
        )
        _, self._writer = _endpoint(server_keys)

    async def calls_in_records(self, count: int) -> list[list[int]]:
        """Read records until ``count`` CALL frames came: their call ids, per record."""
        records: list[list[int]] = []
        while sum(map(len, records)) < count:
            self._opener.feed(await self.stream.receive_some(65536))
            while (record := self._opener.next_record()) is not None:
                frames = iter_frames(record, DEFAULT_MAX_FRAME_SIZE)
                assert all(frame.kind is FrameKind.CALL for frame in frames)
                records.append([frame.stream_id for frame in frames])
        return records

    async def answer(self, records: list[list[int]]) -> None:
        """Every result in one record: one read wakes all their callers at once."""
        call_ids = [call_id for record in records for call_id in record]
        (record,) = self._writer.write_frames(
            [(encode_value(call_id, call_id),) for call_id in call_ids]
        )
        await self.stream.send_all(record)


@pytest.mark.parametrize(("count", "shape"), [(4, [4]), (8, [8]), (9, [8, 1]), (20, [8, 8, 4])])
async def test_callers_woken_by_one_record_of_results_send_their_next_calls_in_few_records(
    count: int, shape: list[int]
) -> None:
    """Callers woken by one record of results queue their next calls behind
    each other, and the burst goes out in records of at most
    ``BURST_RECORD_FRAMES`` calls (one seal, one write each), the last
    caller's own call included."""
    assert BURST_RECORD_FRAMES == 8  # the shapes below are written for it
    peer = HandDrivenPeer()
    answers: list[Any] = []

    async def caller() -> None:
        for _ in range(2):
            answers.append(await peer.client.call("echo", {}, None))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.client.run)
            async with trio.open_nursery() as callers:
                for _ in range(count):
                    callers.start_soon(caller)
                first = await peer.calls_in_records(count)
                await peer.answer(first)
                burst = await peer.calls_in_records(count)
                await peer.answer(burst)
            nursery.cancel_scope.cancel()
    # Sending the burst from the last caller before its own call gave [3, 1]:
    # measured slower at load 4, see docs/benchmark-journal.md (wave 7, rpc). Whole
    # bursts of 16 or 64 made the two processes take turns (eighth round, rpc).
    assert [len(record) for record in burst] == shape
    assert sorted(answers) == sorted(c for record in first + burst for c in record)


async def test_a_held_burst_of_calls_without_tasks_goes_out_in_records_of_eight() -> None:
    """``call_nowait(send=False)`` (the asyncio shim's burst) holds calls
    until :meth:`Connection.send_queued`, but never more than
    ``BURST_RECORD_FRAMES`` of them: the peer gets each full record at once."""
    peer = HandDrivenPeer()
    results: list[Any] = []
    all_answered = trio.Event()

    def done(result: Any) -> None:
        results.append(result)
        if len(results) == BURST_RECORD_FRAMES + 3:
            all_answered.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.client.run)
            # The connection's tasks are up and idle: nothing but the calls
            # below (and send_queued) sends anything.
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(BURST_RECORD_FRAMES + 3):
                peer.client.call_nowait("echo", {}, None, done, send=False)
            full = await peer.calls_in_records(BURST_RECORD_FRAMES)
            assert [len(record) for record in full] == [BURST_RECORD_FRAMES]
            await trio.testing.wait_all_tasks_blocked()
            assert peer.client._outbox.control_count == 3  # held until asked
            peer.client.send_queued()
            rest = await peer.calls_in_records(3)
            assert [len(record) for record in rest] == [3]
            await peer.answer(full + rest)
            await all_answered.wait()
            nursery.cancel_scope.cancel()
    assert sorted(result.unwrap().value for result in results) == sorted(
        c for record in full + rest for c in record
    )


async def test_messages_that_arrive_while_closing_are_delivered() -> None:
    """A handler closes its own connection (a "logout") and is still
    answering: the connection is closing, its GOODBYE behind that answer, and
    it still reads. Messages the peer sent before it saw the GOODBYE are
    delivered: a fix for a reset (the connection closed by its own flush)
    dropped them while merely closing, and left the rest of their read for
    the next one (found by the review of that fix)."""
    a, b = socket.socketpair()
    client_stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    server_stream = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    p = _pair(client_stream, server_stream)
    _reader, writer = p.client_frames
    answered = trio.Event()

    async def logout(conn: Connection) -> str:
        await trio.sleep(0.05)  # blocks: the reader goes on without it
        await conn.close("logout", grace=3.0)  # waits for this handler's answer
        await answered.wait()
        return "bye"

    p.server_dispatch.methods["logout"] = logout

    async def send(*frames: bytes) -> None:
        for record in writer.write_frames([frames]):
            await client_stream.send_all(record)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.server.run)
        with trio.fail_after(10):
            await send(encode_frame(FrameKind.MESSAGE, 0, Message("m", 1)))
            await wait_until(lambda: len(p.server_dispatch.messages) == 1)
            await send(encode_call(1, "logout", {}))
            await wait_until(lambda: p.server._state.phase is Phase.CLOSING)
            await send(
                encode_frame(FrameKind.MESSAGE, 0, Message("m", 2)),
                encode_frame(FrameKind.MESSAGE, 0, Message("m", 3)),
            )
            await wait_until(lambda: len(p.server_dispatch.messages) == 3)
        assert p.server_dispatch.messages == [("m", 1), ("m", 2), ("m", 3)]
        answered.set()
        nursery.cancel_scope.cancel()
