"""The Trio engine of one authenticated connection.

The rules live in the sans-IO :class:`~conduit.protocol.connection.ConnectionState`
(as HTTP's live in h11): this module feeds it frames, looks the event it returns
up in an event -> handler table (as trio-websocket drives wsproto), and sends
the frames it produces. One nursery per connection owns:

* the **reading task** (one at a time holds the role, see
  :mod:`conduit._call_workers`; first the task running :meth:`Connection.run`):
  socket -> :class:`~conduit.protocol.FrameReader` -> state machine -> handler.
  It never blocks on a consumer: data goes into credit-bounded stream inboxes,
  results wake their callers, and calls run
  right there; a call whose handler blocks takes its task off reading and a
  follower reads on. Only one-way messages go through a bounded memory
  channel, whose backpressure is the point: they are delivered in order to one
  message task. On a server it also stops before a read while the streams of
  all connections hold more than the server's receive budget and this
  connection has one coming in (:mod:`conduit._receive_memory`).
* the **send task**: :class:`~conduit._outbox.Outbox` -> sealed records ->
  socket, control frames before data, many frames per record; started with
  the first frame that cannot go out directly.
* the **heartbeat**: pings on a Trio timer and the idle/peer-silence checks
  (:meth:`Connection.beat`); a task of its own, or a shared timer task: a
  server's for all its connections, the run's for clients
  (:mod:`conduit._heartbeats`).
* the **call timer** (:mod:`conduit._pending_calls`): one deadline heap for
  every call this side waits on.
* the **followers** (:mod:`conduit._call_workers`): tasks finishing calls that
  blocked, then waiting to read again, so a slow handler never delays the
  others and a handler may call back into its peer.

When any of them fails, :meth:`Connection.abort` cancels the nursery with a
reason (unless every task ends by itself, the common end); nothing outlives
:meth:`Connection.run`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import attrs
import outcome
import trio

from ._bridge import RunBinding
from ._call_workers import Blocked, CallRunners
from ._callbacks import calling_task
from ._heartbeats import Entry, Heartbeats
from ._host_reader import HostReader, Received
from ._outbox import Outbox, OutboxClosed
from ._pending_calls import PendingCall, PendingCalls
from ._reading_role import ReadingRole
from ._receive_buffer import ReceiveBuffer
from ._receive_memory import RECHECK_INTERVAL, SharedReceiveMemory
from ._result_gate import ResultGate
from ._socket_io import SocketIO, close_now, linger, peer_has_closed, unacknowledged_bytes
from ._streams import IncomingStream, OutgoingStream
from .descriptors import window_limit
from .errors import (
    CallbackCancelledError,
    ConnectionClosed,
    IntegrityError,
    ProtocolError,
)
from .protocol import Frame, FrameKind, FrameReader, FrameWriter, SessionKeys
from .protocol.codec import decode_message_sized
from .protocol.connection import (
    UNCOUNTED_CALL_BYTES,
    CallCancelled,
    CallMemory,
    CallReceived,
    CallRefused,
    ConnectionState,
    GoodbyeReceived,
    MessageReceived,
    Phase,
    PingReceived,
    PongReceived,
    ResultMustWait,
    ResultReceived,
    StreamWasReset,
)
from .protocol.messages import Result
from .protocol.records_io import SCRATCH_MIN
from .protocol.window_tuning import WindowTuner, waited_in_a_queue

# Enum members are class attribute lookups (~0.1 us each); these run per call.
_OPEN = Phase.OPEN
_CLOSING = Phase.CLOSING
_CLOSED = Phase.CLOSED
_CALL = FrameKind.CALL
_MESSAGE = FrameKind.MESSAGE

log = logging.getLogger("conduit.connection")

# Large reads: one receive per sealed record at full speed (measured ~9% less
# receiver CPU per GiB than 256 KiB reads), and idle connections allocate nothing.
# Room for a whole 1 MiB record and its framing (see _receive_buffer), and no
# more: a larger read would grow the record opener's buffer, and peak RSS, with it.
RECEIVE_SIZE = 1024 * 1024 + 8 * 1024
# What the messages queued for, or being handled by, the message task hold
# decoded (codec.unpack_sized's bound, whatever their size: 4 KiB of empty
# maps holds 290 KB; and at least _MESSAGE_CHARGE each). The reader waits for
# room beyond it (a lone message of any size is let in). Large, so that a
# handler awaiting a call on the same connection (whose answer the reader must
# read) rarely finds it waiting: a reader that waits reads nothing else. A
# bound of 64 messages, as before, made that wait as soon as a burst of 64
# small notifications queued behind a handler that called back.
_MESSAGE_QUEUE_BYTES = 32 * 1024 * 1024
# What a message counts at least: a small one queued holds about 400 bytes (its
# event object, its decoded data; a small map measured), so the byte bound
# also bounds how many are queued (32,768), with room to spare.
_MESSAGE_CHARGE = 1024
# Seconds the reader may wait for room in the message queue before it says
# why it stopped (see _wait_for_message_room).
_MESSAGE_STALL_WARNING = 5.0
# Once a connection sends records this large (bulk data), its socket may hold
# this much unsent (see SocketIO.allow_unsent): a 1 MiB record then takes about
# two writes instead of six, and an RPC behind it waits for at most a quarter
# record more than with Trio's 16 KiB (a whole record measured worse in `hol`).
_BULK_RECORD = 256 * 1024
_BULK_UNSENT = 256 * 1024
# A send that must wait goes out in slices this large on streams other than a
# plain socket (TLS, memory): each slice sent is progress that beat() sees, so a
# peer that takes a slice per heartbeat_timeout (2.9 KB/s at the defaults) is
# not taken for one that stopped reading, even when a whole 1 MiB record takes
# it longer than that. On a plain socket each write the socket takes is
# progress, and Linux lets one through only once a good part of the send
# buffer has drained: a loopback reader taking 160 KiB/s after a fast start
# (the buffer grown to 4 MiB) got no write for 8-10 s, 1.3-1.6 MB. So a peer that
# reads slower than ~30-35 KB/s after a fast start can be dropped at the 45 s
# default. A slow link keeps a small buffer, and so a fine grain.
_SEND_SLICE = 128 * 1024
#: The most frames a burst of calls (the next calls of the callers woken by one
#: record of results) waits to send in one record. Fewer records cost less CPU
#: per call; records of a whole burst make the two peers take turns, each idle
#: while the other works on the burst. Eight measured best of 4, 6, 8 and 16
#: at 16 callers on two cores, and no worse at 64 (docs/benchmark-journal.md, RPC,
#: "Eighth round"). On a plain socket with an idle writer each record leaves
#: as it fills; otherwise the writer takes what is queued when it runs.
BURST_RECORD_FRAMES = 8
# Well above any burst of replies (a result may be up to max_frame_size), so
# only a peer that keeps sending without ever reading meets it.
_CONTROL_BACKLOG = 8 * 1024 * 1024
# How many heartbeat timeouts a stream of ours may wait for credit from a peer
# that sends nothing but PINGs and takes none of our bytes (see beat). More than
# one: on a slow link whose buffers hold a whole window, the peer's credit comes
# once per record it receives (1 MiB), and its PONGs wait behind our data; at
# twice the default 45 s, a link of 12 KB/s or more keeps its transfer.
_CREDIT_PATIENCE = 2
#: Seconds late after which a heartbeat counts as held up by our own process,
#: not the peer (see Connection.beat); an event loop merely busy is late by
#: milliseconds.
STALL_TOLERANCE = 1.0
# How long the GOODBYE of a run cancelled from outside may take to go out on a
# stream that cannot send without awaiting (TLS): a socket with room takes it
# at once, and a teardown must not wait on a peer that does not read.
_TEARDOWN_SEND_GRACE = 0.5
#: Round trips kept for :meth:`Connection.round_trips_since`: a growing
#: window's epoch asks for one a round trip, eight or so.
ROUND_TRIPS_KEPT = 32


@attrs.frozen
class ConnectionSettings:
    """Per-connection limits and timers, taken from a descriptor."""

    max_frame_size: int
    receive_window: int
    heartbeat_interval: float
    heartbeat_timeout: float
    idle_timeout: float | None
    max_concurrent_calls: int
    send_buffer: int = 4 * 1024 * 1024
    #: Data streams open at once (both directions); None for no limit.
    max_streams: int | None = None
    #: Sum of the receive windows of all inbound streams; None for no limit.
    receive_budget: int | None = None
    #: The most an inbound stream's window grows to (see
    #: :mod:`conduit.protocol.window_tuning`); None: it never grows.
    max_receive_window: int | None = None
    #: What the inbound streams of all the endpoint's connections may hold
    #: together (a server's ``server_receive_budget``); None for no bound.
    receive_memory: SharedReceiveMemory | None = attrs.field(default=None, eq=False)
    #: What the large calls and queued messages of all the endpoint's
    #: connections may hold decoded together (a server's
    #: ``server_call_budget``); None for no bound beyond each connection's.
    call_memory: CallMemory | None = attrs.field(default=None, eq=False)
    #: What the large RESULTs decoded for the endpoint's callers hold until
    #: they take them: one for all its connections, as the endpoint makes
    #: its settings once (see :class:`~conduit._result_gate.ResultGate`).
    results_in_hand: ResultGate = attrs.field(factory=ResultGate, eq=False)


def settings_from(descriptor: Any) -> ConnectionSettings:
    """The per-connection settings a Server- or ClientDescriptor asks for.

    A server's settings carry its :class:`SharedReceiveMemory` and its
    :class:`~conduit.protocol.connection.CallMemory`, made here: one each per
    endpoint, as the endpoint makes its settings once.
    """
    server_budget: int | None = getattr(descriptor, "server_receive_budget", None)
    call_budget: int | None = getattr(descriptor, "server_call_budget", None)
    return ConnectionSettings(
        max_frame_size=descriptor.max_frame_size,
        receive_window=descriptor.receive_window,
        heartbeat_interval=descriptor.heartbeat_interval,
        heartbeat_timeout=descriptor.heartbeat_timeout,
        idle_timeout=descriptor.idle_timeout,
        max_concurrent_calls=descriptor.max_concurrent_calls,
        max_streams=descriptor.max_streams_per_connection,
        receive_budget=descriptor.connection_receive_budget,
        max_receive_window=window_limit(descriptor.receive_window, descriptor.max_receive_window),
        receive_memory=None if server_budget is None else SharedReceiveMemory(server_budget),
        call_memory=None if call_budget is None else CallMemory(call_budget),
    )


class Dispatcher(Protocol):
    """What a connection hands incoming calls and messages to.

    Bound to the connection's peer when the connection is built (see
    ``conduit._rpc.PeerDispatcher``), so it needs no connection argument.
    """

    async def handle_call(self, method: str, args: dict[str, Any]) -> Any:
        """Run the RPC ``method`` and return its (unstructured) result."""

    async def handle_message(self, event: str, data: Any) -> None:
        """Deliver a one-way message."""


class _Closed:
    """The dispatcher of a connection that is over (see Connection._unlink)."""

    async def handle_call(self, method: str, args: dict[str, Any]) -> Any:
        raise ConnectionClosed("the connection is over")

    async def handle_message(self, event: str, data: Any) -> None:
        raise ConnectionClosed("the connection is over")


_OVER = _Closed()


def _only_cancellation(exc: BaseException) -> bool:
    """Whether ``exc``, what ends :meth:`Connection.run`, is cancellation
    only (Trio's Cancelled or a KeyboardInterrupt, alone or grouped), not a failure."""
    cancellation = (trio.Cancelled, KeyboardInterrupt)
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(cancellation)[1] is None
    return isinstance(exc, cancellation)


class Connection:
    """An authenticated, encrypted link, after the handshake.

    Create it with the reader/writer the handshake used (they hold the keys and
    any bytes already buffered), then ``await run()`` in a nursery. The rules
    (what a frame means, what may be sent) are the sans-IO
    :class:`~conduit.protocol.connection.ConnectionState`'s; this class owns the
    tasks, the clock and the waiting.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        reader: FrameReader,
        writer: FrameWriter,
        keys: SessionKeys,
        *,
        is_client: bool,
        settings: ConnectionSettings,
        dispatcher: Dispatcher,
        label: str,
        heartbeats: Heartbeats | None = None,
        socket_io: SocketIO | None = None,
    ) -> None:
        self.stream = stream
        #: The Trio run this connection's tasks run in (see _bridge.RunBound);
        #: None once it is closed, its tasks over (it lives nowhere then).
        self.binding: RunBinding | None = RunBinding.current()
        #: Plain sockets skip Trio's per-operation overhead (see _socket_io);
        #: the handshake's, when given, knows whether its last read drained the socket.
        self._socket_io = socket_io if socket_io is not None else SocketIO.of(stream)
        self._receive_buffer = ReceiveBuffer(RECEIVE_SIZE, self._socket_io)
        #: Under the asyncio shim, a client's socket is read by the loop (see _host_reader).
        self.host_reader = HostReader.of(
            stream, self._receive_buffer, self._drain_on_host, is_client=is_client
        )
        # A frame the loop's callback, or a caller holding the reading role,
        # left for the reading task (a CALL or MESSAGE).
        self._held_frame: Frame | None = None
        #: Callers may read their own replies (see _reading_role): client
        #: connections on plain sockets, made when run() starts (two descriptors
        #: for the connection's life, so not on a server's many connections).
        self._role: ReadingRole | None = None
        self._role_possible = is_client and self.host_reader is None and self._socket_io is not None
        #: The reading task waits in ReadingRole.wait_idle: a caller may take the role.
        self._reader_parked = False
        self.keys = keys
        self.settings = settings
        self.label = label
        self.is_client = is_client
        self._reader = reader
        # Records the handshake opened: heard_from_peer counts the ones after.
        self._records_at_start = reader.records_opened
        self._writer = writer
        self._dispatcher = dispatcher
        self._state = state = ConnectionState(
            is_client=is_client,
            receive_window=settings.receive_window,
            peer_receive_window=keys.peer_receive_window,
            peer_max_frame_size=keys.peer_max_frame_size,
            max_concurrent_calls=settings.max_concurrent_calls,
            max_streams=settings.max_streams,
            receive_budget=settings.receive_budget,
            call_memory=settings.call_memory,
            results_in_hand=settings.results_in_hand,
        )
        self._results_in_hand = settings.results_in_hand
        self._outbox = Outbox(settings.send_buffer, state, self._start_writer)
        self._pending = PendingCalls(
            state,
            self._send_cancel,
            self._all_callers_woken,
            self._start_timer,
            self._own_reading if self._role_possible else None,
        )
        self._calls = CallRunners(
            self._read,
            dispatcher.handle_call,
            self._queue_result,
            self._queue_value,
            self._send_result,
            state.call_finished,
            self._spawn_follower,
            label,
        )
        # The event -> handler table, looked up by the event's exact class.
        # CallReceived and MessageReceived are not here: the reader runs the
        # call itself (CallRunners.start) and awaits the message queue.
        self._handlers: dict[type[Any], Callable[[Any], None]] = {
            IncomingStream: self._on_stream_data,
            OutgoingStream: self._on_credit,
            ResultReceived: self._pending.resolve,
            CallRefused: self._on_reply_needed,
            PingReceived: self._on_reply_needed,
            PongReceived: self._on_pong,
            CallCancelled: self._on_call_cancelled,
            StreamWasReset: self._on_stream_reset,
            GoodbyeReceived: self._on_goodbye,
        }
        # Made with the message task (see _drain_reader).
        self._messages_in: trio.MemorySendChannel[MessageReceived]
        self._nursery: trio.Nursery | None = None
        # run() is started in a task that has not run yet (see will_run): until
        # it opens the nursery, spawn() queues here and close() waits for it.
        self._run_expected = False
        self._spawn_queue: list[tuple[contextvars.Context, Callable[..., Awaitable[Any]], Any]] = []
        # run() is calling on_started for a connection closed before it
        # started: its tasks (connect hooks) still start, cancelled at once.
        self._starting = False
        # The message task and the call timer start with the first message or
        # deadline: most connections (a connect, a few calls) need neither, and
        # each task costs every connection its start and its cancellation.
        self._message_task_started = False
        self._message_bytes = 0  # see _MESSAGE_QUEUE_BYTES
        self._message_room: trio.Event | None = None
        # The server's call memory, where the messages count too (see
        # _queue_message), if any; and whether a message was let in past its
        # limit, into its overdraft, while answers were awaited, since the
        # queue was last empty.
        self._call_memory = settings.call_memory
        self._message_overdraft = False
        self._timer_wanted = False
        # Likewise the writer: results and calls go out directly while it is
        # idle, so it starts with the first frame that must wait (see Outbox).
        self._writer_wanted = False
        self._writer_started = False
        # The task running run() while it takes part in reading (see run).
        self._body_task: trio.lowlevel.Task | None = None
        self._task_context = contextvars.copy_context()
        # The heartbeat and idle tasks wait here between their timers: abort()
        # wakes them, so that they end without a cancellation (see abort).
        self._timers_parked = trio.lowlevel.ParkingLot()
        # A shared heartbeat timer (a server's), else a task of our own beats.
        self._heartbeats = heartbeats
        self._heartbeat_entry: Entry | None = None
        now = trio.current_time()
        self._last_received = now
        self._last_activity = now
        # When the peer last sent something besides PINGs (a PONG to ours, or
        # anything else: ConnectionState.frames_besides_pings moved), as seen
        # by the heartbeat.
        self._heard_reading = now
        self._frames_seen = 0
        # When the next beat is due, and whether the last one put its verdict
        # off (see beat: a beat that comes late was held up by our own process).
        self._beat_due = now + settings.heartbeat_interval
        self._verdict_put_off = False
        # The smallest round trip timed (see round_trip), and when the PING
        # being timed went out (None: none is).
        self._round_trip: float | None = None
        self._ping_sent_at: float | None = None
        # The latest round trips, (sent at, took), the smallest of all being
        # _round_trip: a growing window asks whether a queue stood behind
        # its bytes over its last epoch (one a round trip or so). Kept only
        # once a growing window asked for one (probe_round_trip): an idle
        # connection's heartbeats would fill it for nothing.
        self._round_trips: deque[tuple[float, float]] | None = None
        # The socket's unacknowledged bytes at the last beat (None: unknown).
        self._unacked_seen: int | None = None
        #: The server's receive memory (see _wait_for_receive_memory), if any.
        self._receive_memory = settings.receive_memory
        # Reading stopped for it: the peer's silence (and idleness) is not
        # counted meanwhile.
        self._reading_paused = False
        # Our GOODBYE went out whole: the socket lingers before it closes
        # (see conduit._socket_io.linger).
        self._goodbye_out = False
        # The handlers whose answers a deferred GOODBYE waits for (see
        # close); None unless one is deferred.
        self._goodbye_waits_for: set[trio.lowlevel.Task] | None = None
        # The peer closed its side while we were not reading it: it sends
        # nothing more, so what it sent before its end (bounded by the
        # socket's buffers) is read, and the end seen, whatever the budget.
        self._read_to_the_end = False
        # While a send waits for room: when the peer last took any of our
        # bytes (None when no send waits). beat() ends a peer that keeps
        # sending but stopped reading, whose silence check stays fresh.
        self._send_waiting_since: float | None = None
        # A send left a record part way (see _send_waiting): nothing more may
        # be written to the stream, not even a GOODBYE (see _goodbye_on_teardown).
        self._record_cut = False
        #: Set once :meth:`run` has finished: every task is gone.
        self.closed = trio.Event()
        #: Either side said goodbye: the close was meant, not a lost link
        #: (a client reconnects only after a lost link, or a server's
        #: goodbye that says it is going away: see ``_on_goodbye``).
        self.closed_on_purpose = False
        #: This side, a client, said GOODBYE for good (not ``going_away``): it
        #: will not come back on this session's resume token.
        self.left_for_good = False
        #: The peer said GOODBYE for good (not ``going_away``): to a server, a
        #: client that forgot its resume token (see ``Server``'s sessions).
        self.peer_left_for_good = False
        #: State other layers keep for this connection (the transfer registry,
        #: budgets), keyed by its owner. Owned here, not in a registry keyed by
        #: the connection, so that it cannot outlive the connection: it is
        #: emptied when :meth:`run` ends, however it ends.
        self.owned: dict[object, Any] = {}

    # ------------------------------------------------------------------ lifetime

    @property
    def is_open(self) -> bool:
        """Whether the connection can still carry traffic."""
        return self._state.phase is _OPEN

    def ping_now(self) -> None:
        """Queue a PING (ahead of data, as the heartbeat's): the peer hears from
        us at once. ``ConnectionClosed`` once closing."""
        self._outbox.put_control((self._state.ping(),))
        self._ping_sent_at = trio.current_time()

    @property
    def round_trip(self) -> float | None:
        """The smallest round trip measured so far (a PING to its PONG), in seconds; None
        before the first PONG."""
        return self._round_trip

    def round_trips_since(self, start: float) -> list[float]:
        """The round trips, in seconds, of the PINGs sent at ``start`` or later
        (of the last :data:`ROUND_TRIPS_KEPT` since :meth:`probe_round_trip`
        was first called), the one out now counted at how long it has been
        out once that makes it late (``waited_in_a_queue``: a queue no PONG
        has come back through yet is still a queue; before that, all its
        time says is how late it is at least)."""
        kept = self._round_trips or ()
        found = [took for sent, took in kept if sent >= start]
        sent_at, smallest = self._ping_sent_at, self._round_trip
        if sent_at is not None and smallest is not None and sent_at >= start:
            out = trio.current_time() - sent_at
            if waited_in_a_queue(out, smallest):
                found.append(out)
        return found

    def probe_round_trip(self) -> None:
        """Time a round trip now (a PING), unless one is being timed or the
        connection is closing: a growing window's look at the queue behind
        its bytes (:meth:`IncomingStream._widen`), from which on the
        connection keeps its round trips."""
        if self._round_trips is None:
            self._round_trips = deque(maxlen=ROUND_TRIPS_KEPT)
        if self._ping_sent_at is None:
            with contextlib.suppress(ConnectionClosed):
                self.ping_now()

    def _on_pong(self, event: PongReceived) -> None:
        # Only the last PING is timed (a PONG to an older one arrives late
        # by design): the smallest such time is the link's, where the
        # larger ones waited behind bytes in a queue.
        if event.nonce == self._state.last_ping and self._ping_sent_at is not None:
            sample = trio.current_time() - self._ping_sent_at
            if self._round_trips is not None:
                self._round_trips.append((self._ping_sent_at, sample))
            self._ping_sent_at = None
            if self._round_trip is None or sample < self._round_trip:
                self._round_trip = sample

    @property
    def heard_from_peer(self) -> bool:
        """Whether a sealed record from the peer arrived since this connection
        was made (after its handshake): a client that sent one has its WELCOME."""
        return self._reader.records_opened > self._records_at_start

    @property
    def close_reason(self) -> str | None:
        """Why the connection closed or is closing; None while it is open."""
        return self._state.close_reason

    def will_run(self) -> None:
        """Declare that :meth:`run` has been started in a task that has not run yet.

        A client's ``connect()`` returns once its handshake is done, without
        waiting for its connection's task to start (two scheduling passes on
        the connect's critical path). Until that task opens the connection's
        nursery, :meth:`spawn` queues the tasks it is given for it, and
        :meth:`close` says goodbye and waits for :meth:`run` to end the
        connection, as it does once it runs.
        """
        self._run_expected = True

    async def run(self, on_started: Callable[[], None] | None = None) -> None:
        """Serve the connection until it closes. Never raises for network failures.

        A connection already closed when this starts (closed after
        :meth:`will_run`, before its task ran) starts no reading, no writer
        and no timers, and takes no reading-role descriptors: it only ends.
        ``on_started`` and the tasks spawned before still start (cancelled at
        once), as they would have before a close that followed the start.
        """
        released = socket_closed = False
        # Whether cancellation alone ends it (not the exception itself: kept in
        # this frame, which its traceback holds, it would make a reference
        # cycle holding the whole connection; see conduit._stored_errors).
        only_cancelled = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._task_context = contextvars.copy_context()
                closed_early = self._state.phase is _CLOSED
                if not closed_early:
                    self._start_tasks(nursery)
                if on_started is not None:
                    self._starting = closed_early
                    try:
                        on_started()
                    finally:
                        self._starting = False
                queued, self._spawn_queue = self._spawn_queue, []
                for context, fn, args in queued:
                    context.run(nursery.start_soon, fn, *args)
                if closed_early:
                    if nursery.child_tasks:
                        nursery.cancel_scope.cancel()
                else:
                    # The reading role starts in this task, not a new one (the
                    # followers are tasks of the nursery): a task fewer per connection.
                    self._body_task = trio.lowlevel.current_task()
                    await self._calls.run()
                    self._body_task = None
                if not nursery.child_tasks:
                    # The common end (no task left): close here, so that the
                    # scheduling pass the nursery's exit makes when it has
                    # nothing to wait for is also the close's (below), one
                    # pass per connection's end instead of two.
                    released = True
                    self._release()
                    if self._goodbye_out:
                        await linger(self.stream)
                    socket_closed = close_now(self.stream)
        except BaseException as exc:
            only_cancelled = _only_cancellation(exc)
            raise
        finally:
            # Every task of the connection is over, its handlers too: what they
            # counted in the server's call memory leaves it first, before
            # anything below can fail (a leak would stay for the process's life).
            self._release_call_memory()
            goodbye = None
            try:
                if not released:
                    if self._state.phase is _OPEN and only_cancelled:
                        goodbye = self._goodbye_on_teardown()
                    self._release()
                if goodbye is not None:
                    await self._send_at_teardown(goodbye)
            finally:  # whatever failed above: the stream is closed all the same
                if self._goodbye_out and not socket_closed:
                    await linger(self.stream)
                if socket_closed:
                    pass  # the nursery's exit made the pass
                elif close_now(self.stream):
                    # The scheduling pass aclose() ends with (other tasks see
                    # the connection closed before it is reported closed: the
                    # transfer layer's partials rely on it), minus its cancel
                    # scopes and the Cancelled raised and caught under them.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                else:
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(self.stream)
                try:
                    self.owned.clear()
                    self._unlink()
                finally:  # whatever failed: the connection is closed
                    # It lives nowhere now, not before: until its tasks are
                    # over another thread's call would touch them (a review).
                    self.binding = None
                    self.closed.set()

    def _goodbye_on_teardown(self) -> bytes | bytearray | None:
        """:meth:`run` is cancelled from outside with the connection still
        OPEN (a server's run() stopped by Ctrl-C, ``asyncio.run()`` ending
        with a client left connected). Say GOODBYE if it can go out at once:
        a peer that sees only the socket close takes it for a lost connection
        and reconnects, or waits for its transfers to resume. Not when run()
        fails: a server that crashed may be restarted, and its clients then
        reconnect and resume. (A run() cancelled because a task beside it
        crashed cannot be told from Ctrl-C here: it says GOODBYE too.)

        Only between records: a record the writer left part
        way would take the GOODBYE's bytes for its own (the peer then fails
        to open it, and sees a lost connection, as without this). On a plain
        socket it goes here, in one non-blocking write. Returns the sealed
        record when the stream cannot send without awaiting (TLS): the
        caller sends it with :meth:`_send_at_teardown`, once the session is
        released (nothing else may use the connection while that awaits).
        """
        if self._outbox.sealed_queued or self._record_cut:
            return None
        # A server going away may be restarting: its clients come back. A
        # client's run ending is its application's end, as a disconnect():
        # the server does not wait for it (a push to it fails at once).
        goodbye = self._state.goodbye(
            "client shutting down" if self.is_client else "server shutting down",
            going_away=not self.is_client,
        )
        if goodbye is None:
            return None
        self.closed_on_purpose = True
        self.left_for_good = self.is_client
        (record,) = self._writer.write_frames([(goodbye,)])
        io = self._socket_io
        if io is None:
            return record
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._goodbye_out = io.send_now(record) == len(record)
        return None

    async def _send_at_teardown(self, record: bytes | bytearray) -> None:
        """Send the teardown's GOODBYE ``record`` on a stream that must await to
        send, shielded for at most :data:`_TEARDOWN_SEND_GRACE` seconds: a peer
        that does not read cannot hold the teardown. A failure is no reason
        to stop it either (the stream is closed next, whatever happens)."""
        try:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + _TEARDOWN_SEND_GRACE
                await self.stream.send_all(record)
            self._goodbye_out = not scope.cancelled_caught
        except Exception as exc:
            log.debug("%s: the GOODBYE of the teardown was not sent: %r", self.label, exc)

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        """What a running connection needs besides its reading: the reading
        role, the writer and call timer if already wanted, the heartbeat, the
        idle check."""
        if self._role_possible:
            self._role = ReadingRole.of(self.stream)
        if self._writer_wanted:  # frames queued before run()
            self._writer_started = True
            nursery.start_soon(self._send_task)
        if self._timer_wanted:  # a call with a timeout made before run()
            nursery.start_soon(self._pending.run_timer)
        if self.settings.heartbeat_interval > 0:
            now = trio.current_time()
            self._beat_due = now + self.settings.heartbeat_interval
            if self._heartbeats is not None:
                self._heartbeat_entry = self._heartbeats.add(self.beat, now)
            else:
                nursery.start_soon(self._heartbeat_loop)
        if self.settings.idle_timeout is not None:
            nursery.start_soon(self._idle_task, self.settings.idle_timeout)

    def _release(self) -> None:
        """The end of the session, before its socket is closed: no more beats,
        every waiter failed, the reading role's descriptors gone."""
        if self._heartbeat_entry is not None:
            Heartbeats.remove(self._heartbeat_entry)
        self._shutdown(self.close_reason or "connection closed")
        if self._role is not None:
            self._role.close()

    def _release_call_memory(self) -> None:
        """What the calls and queued messages still counted in the server's
        call memory leaves it (run()'s teardown, after every task of the
        connection, its handlers included, is over)."""
        self._state.release_calls()
        memory = self._call_memory
        if memory is not None and self._message_bytes:
            memory.release(self._message_bytes)
        self._message_bytes = 0

    def _unlink(self) -> None:
        """Drop the links from this connection's parts back to it, now that it is over.

        The parts hold its bound methods (the event table, the call runners,
        the pending calls) and the dispatcher its peer, which holds it: some
        ninety objects a connection in reference cycles, freed only by
        Python's cycle collector, whose passes then cost every connection.
        Unlinked, they go as soon as the last reference does.

        Its buffers go now too (the socket reads' mapping, the record buffers
        kept for reuse, frames opened and not taken): whatever still holds
        this object after its end, a reference cycle not yet collected say,
        holds none of them (a view a consumer still holds keeps its own).
        """
        self._handlers.clear()
        self._calls.detach()
        self._pending.detach()
        self._dispatcher = _OVER
        if self.host_reader is not None:
            self.host_reader.unlink()
        self._held_frame = None
        self._receive_buffer.release()
        self._reader.release_buffers()
        self._writer.release_buffers()

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a task that lives no longer than this connection.

        Before :meth:`run` has opened the connection's nursery (see
        :meth:`will_run`) the task waits to be started by it, from the
        caller's context; it then starts even if the connection was closed
        meanwhile (cancelled at once), as every task Trio was asked to start
        does: the caller may rely on its first lines running.
        """
        if not (self.is_open or self._starting):
            raise ConnectionClosed(self.close_reason or "connection closed")
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)
        elif self._run_expected:
            self._spawn_queue.append((contextvars.copy_context(), fn, args))
        else:
            raise ConnectionClosed("connection is not running")

    def abort(self, reason: str) -> None:
        """Close at once: cancel every task of this connection.

        Unless every task ends by itself anyway: the common end (the reader
        meets the peer's GOODBYE or end of stream while the writer and the
        timers wait for work) then costs no cancellation, no Cancelled raised
        in each task, caught and grouped by the nursery.
        """
        if self._state.close_reason is None:
            log.debug("%s: closing: %s", self.label, reason)
        self._state.close(reason)
        # Parked in take(), which close() ends.
        writer_waits = self._writer_started and self._outbox.writer_idle
        self._outbox.close()
        self._timers_parked.unpark_all()
        if trio.lowlevel.in_trio_task():  # (not the asyncio host's callback: see _release)
            # Callers waiting for answers and streams waiting for data hear it
            # now, not when every task of the connection has ended: a handler
            # in a worker thread holds run() as long as the thread runs, and
            # the call timer that would end their waits goes with the nursery.
            self._fail_waiters()
        if self._nursery is not None and not self._ends_by_itself(writer_waits):
            self._nursery.cancel_scope.cancel()

    def _ends_by_itself(self, writer_waits: bool) -> bool:
        """Whether every task of the nursery now ends without being cancelled.

        True when they are the calling task (the reader, which returns once the
        state is CLOSED), the writer woken from take() and the timers woken
        from their lot; any other task (a follower in a handler, the message
        task, a hook) may be waiting anywhere, and is cancelled. The task of
        :meth:`run` reads first: when another task reads, it must have left
        the reading role's tasks (else it may be a follower, or in a handler).
        """
        assert self._nursery is not None
        children = self._nursery.child_tasks
        try:
            task = trio.lowlevel.current_task()
        except RuntimeError:  # the asyncio host's callback (see _drain_on_host)
            return False
        expected = writer_waits + len(self._timers_parked)
        if task is not self._body_task:
            if self._body_task is not None or task not in children:
                return False
            expected += 1
        return len(children) == expected

    async def close(
        self, reason: str = "closed by this side", grace: float = 2.0, *, going_away: bool = False
    ) -> None:
        """Say goodbye, let queued frames go out, then close. Waits until closed.

        ``going_away``: this side is shutting down, not ending this one
        connection; a client told so reconnects (see
        :class:`~conduit.protocol.messages.Goodbye`). From a client: it comes
        back on its resume token, which the server then keeps.

        Also before :meth:`run` has started, if it will (:meth:`will_run`):
        the GOODBYE goes out from here, or from the writer that run() then
        starts, and run() ends the connection (it starts nothing else).

        Called from a task of this connection (an RPC or message handler
        closing its own connection: a "logout"), it cannot wait for the end,
        which waits for that very task: it returns once the GOODBYE is queued,
        and the connection ends once the handler has returned and the peer
        has answered (or after ``grace``). Frames queued before the writer
        sends the GOODBYE go ahead of it: a handler that returns right after
        its close gets its answer out.
        """
        running = self._nursery is not None or self._run_expected
        inside = self._nursery is not None and self._called_from_inside()
        if self.is_open and running:
            # Not past frames queued without waking the writer (the answers of
            # a burst of calls, say): the GOODBYE goes after them, or the peer,
            # which ignores what follows it, loses answers already made. Nor
            # from inside: the writer sends it once the handler's step is
            # over, so that a "logout" returning right after its close gets
            # its answer out ahead of the GOODBYE.
            direct = (
                not inside
                and self._socket_io is not None
                and self._can_send_directly()
                and not self._outbox.control_queued
            )
            goodbye = self._state.goodbye(reason, going_away=going_away)
            self.closed_on_purpose = True
            self.left_for_good = self.is_client and goodbye is not None and not going_away
            if goodbye is not None and direct:
                # Nothing queued: sent from here (see _goodbye_now).
                waits = not self._goodbye_now(goodbye)
            else:
                if goodbye is not None:
                    closing = self._closing_call_runner() if inside else None
                    if closing is not None:
                        # A handler whose call blocked and is not answered
                        # yet (every async one under the asyncio shim, whose
                        # close comes through the bridge; a Trio one that
                        # awaited before its close): the goodbye goes once
                        # that answer is sent (grace bounds the wait).
                        assert self._nursery is not None
                        self._goodbye_waits_for = {closing}
                        self._outbox.expect_last()
                        self._nursery.start_soon(self._goodbye_once_answered, goodbye)
                    else:
                        # CLOSING: the writer sends what is queued, this last, then stops.
                        self._outbox.put_last((goodbye,))
                waits = True
            if waits:
                if inside:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._abort_after, grace, reason)
                    return
                with trio.move_on_after(grace):
                    await self.closed.wait()
        elif running and self._state.phase is _CLOSING:
            # Another close is under way (a user's racing server.close(), a
            # handler closing twice, two handlers closing), its GOODBYE
            # perhaps still queued or still to come: the same grace for it
            # to go out, not an abort that drops it (the peer would take the
            # end for a lost connection and try to reconnect).
            if inside:
                closing = self._closing_call_runner()
                if self._goodbye_waits_for is not None and closing is not None:
                    # The GOODBYE still waits for an answer: this one goes
                    # ahead of it too.
                    self._goodbye_waits_for.add(closing)
                assert self._nursery is not None
                self._nursery.start_soon(self._abort_after, grace, reason)
                return
            with trio.move_on_after(grace):
                await self.closed.wait()
        self.abort(reason)
        if running and not inside:
            await self.closed.wait()

    def _called_from_inside(self) -> bool:
        """Whether the calling task is this connection's: the task of :meth:`run`,
        or one started in its nursery (or below one), which run() waits for."""
        try:
            task: trio.lowlevel.Task | None = calling_task()
        except RuntimeError:  # the asyncio host's callback (see _drain_on_host)
            return False
        while task is not None:
            if task is self._body_task:
                return True
            nursery = task.parent_nursery
            if nursery is None:
                return False
            if nursery is self._nursery:
                return True
            task = nursery.parent_task
        return False

    async def wait_answered(self, task: trio.lowlevel.Task) -> None:
        """Wait until ``task``, if it runs a call of this connection that
        blocked, has sent that call's answer (at once when it runs none)."""
        await self._calls.wait_answered(task)

    def _closing_call_runner(self) -> trio.lowlevel.Task | None:
        """The task running the call whose handler is closing this connection,
        if that call has blocked and its answer is not sent yet; else None."""
        try:
            task = calling_task()
        except RuntimeError:
            return None
        return task if self._calls.answering(task) else None

    async def _goodbye_once_answered(self, goodbye: bytes) -> None:
        """Queue ``goodbye`` once every handler in ``_goodbye_waits_for`` has answered."""
        waits_for = self._goodbye_waits_for
        assert waits_for is not None
        while waits_for:  # (a handler closing meanwhile adds itself)
            await self.wait_answered(waits_for.pop())
        self._goodbye_waits_for = None
        with contextlib.suppress(ConnectionClosed):  # ended meanwhile (grace, the peer)
            self._outbox.put_last((goodbye,))

    async def _abort_after(self, grace: float, reason: str) -> None:
        """A close from inside (see :meth:`close`): the end it could not wait for."""
        await trio.sleep(grace)
        self.abort(reason)

    def _goodbye_now(self, goodbye: bytes) -> bool:
        """Send the GOODBYE from the closing task; whether it is done (went
        out whole, or the connection is lost), else the writer sends the rest.

        Only when nothing is queued and the writer is idle (or was never
        started: a connect, a few calls, a disconnect): the writer would
        send it and then stop the connection, exactly as :meth:`close` then
        does, but waking (or first starting) that task costs a disconnect a
        task, a cancel scope for the grace period and a scheduling pass. What
        the socket does not take at once (it always has room for one small
        record here in practice) goes to the writer as sealed bytes, and the
        close waits for it as before.
        """
        assert self._socket_io is not None
        (record,) = self._writer.write_frames([(goodbye,)])
        try:
            sent = self._socket_io.send_now(record)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.abort(self.close_reason or f"connection lost: {exc or type(exc).__name__}")
            return True
        if sent == len(record):
            self._goodbye_out = True
            return True
        self._outbox.put_sealed([memoryview(record)[sent:]])
        self._outbox.wake_writer()
        return False

    def _shutdown(self, reason: str) -> None:
        self._state.close(reason)
        self._outbox.close()
        self._fail_waiters()

    def _fail_waiters(self) -> None:
        """Every caller waiting for an answer, and every stream, fails: the
        connection is over (once: the calls and streams are dropped)."""
        reason = self.close_reason or "connection closed"
        self._pending.fail_all(reason)
        for stream in self._state.drop_streams():
            stream.fail(ConnectionClosed(reason))
        self._memory_freed()

    # ------------------------------------------------------------------ tasks

    async def _read(self) -> Blocked | None:
        """Hold the reading role: read and handle frames until a call blocks or the end.

        Run by one task at a time (:class:`~conduit._call_workers.CallRunners`):
        returns the call whose handler blocked, which its caller then finishes
        while a follower reads on, or None once the connection is over.
        """
        reader = self._reader
        try:
            while True:
                blocked = await self._drain_reader()
                if blocked is not None:
                    return blocked
                # Results of the calls just run go out together, in one record.
                self._flush_control()
                if self._state.phase is _CLOSED:
                    return None  # aborted: its task ends without a cancellation
                if self._outbox.control_bytes > _CONTROL_BACKLOG:
                    # A peer that sends PINGs (or calls) but never reads would make
                    # us queue answers forever: stop reading until they have gone
                    # out, then handle the frames already read (_drain_reader
                    # stopped at the backlog, holding the next one).
                    await self._wait_for_backlog()
                    continue
                if self._held_frame is not None:
                    # _drain_reader stopped at the backlog, which the flush
                    # just sent: handle the rest before reading any more.
                    continue
                memory = self._receive_memory
                if (
                    memory is not None
                    and memory.held > memory.limit
                    and self._state.incoming
                    and not self._read_to_the_end
                ):
                    await self._wait_for_receive_memory(memory)
                    continue
                role = self._role
                # Idle: wait where a caller can take over the socket; True if a
                # caller left us a frame.
                if (
                    role is not None
                    and self._receive_buffer.would_wait
                    and self._role_open()
                    and await self._wait_idle(role)
                ):
                    continue
                data = await self._receive()
                if data is not None:  # None: the host reader fed it (see _drain_on_host)
                    if not data:
                        self.abort(self.close_reason or "peer closed the connection")
                        return None
                    self._last_received = trio.current_time()
                    reader.feed(data)
        except IntegrityError as exc:
            self.abort(exc.reason)
        except ConnectionClosed:
            pass  # we are closing; a reply had nowhere to go
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.abort(self.close_reason or f"connection lost: {exc or type(exc).__name__}")
        return None

    async def _wait_for_backlog(self) -> None:
        """Read nothing until what is queued for the peer fits the backlog again.

        Our pause, not the peer's silence: what fills the backlog may be ours
        (a burst of broadcasts to a slow reader), and a peer we do not read
        cannot be heard. The pause counts neither as its silence nor as its
        idleness; a peer that reads nothing meanwhile is ended by the heartbeat
        all the same, as the send that waits for it makes no progress.
        """
        with self._our_pause():
            await self._outbox.wait_control_below(_CONTROL_BACKLOG)

    @contextlib.contextmanager
    def _our_pause(self) -> Iterator[None]:
        """This side stops reading for the block: the peer's silence and
        idleness are not counted meanwhile (a peer we do not read cannot be
        heard), and both start again after it."""
        self._reading_paused = True
        try:
            yield
        finally:
            self._reading_paused = False
            self._last_received = self._last_activity = trio.current_time()

    async def _wait_for_receive_memory(self, memory: SharedReceiveMemory) -> None:
        """The server's streams hold more than its budget: read nothing until
        they hold less, or this connection has no stream coming in.

        A peer we do not read cannot be heard either: the time spent here does
        not count as its silence or idleness (both start again after). Its
        end cannot be read either: a peer that closed its side (or a
        connection that failed) is looked for at each look at the budget, and
        then read to its end (it sends nothing more), so that it ends as any
        other and a client resuming elsewhere does not find its upload still
        held here.
        """
        state = self._state
        stream = self.stream

        def still_needed() -> bool:
            if not state.incoming or state.phase is _CLOSED:
                return False
            if peer_has_closed(stream):
                self._read_to_the_end = True
                return False
            return True

        with self._our_pause():
            await memory.wait_for_room(still_needed)

    async def _drain_reader(self) -> Blocked | None:
        next_frame = self._reader.next_frame
        receive_frame = self._state.receive_frame
        handlers = self._handlers
        outbox = self._outbox
        held, self._held_frame = self._held_frame, None
        while (frame := next_frame() if held is None else held) is not None:
            held = None
            if outbox.control_bytes > _CONTROL_BACKLOG:
                # Answers back up: this frame (and the rest of one read, up to
                # a MiB of PINGs or calls) waits until they have gone out.
                self._held_frame = frame
                return None
            event = receive_frame(frame)
            if event is None:
                continue
            if type(event) is CallReceived:
                # Run right here; only a handler that blocks leaves the reading path.
                self._last_activity = self._last_received
                blocked = self._calls.start(event)
                if blocked is not None:
                    return blocked
                continue
            handler = handlers.get(type(event))
            if handler is not None:
                handler(event)
            elif type(event) is ResultMustWait:
                # Read again once the results in hand have been taken.
                held = frame
                await self._wait_for_results_taken()
            elif isinstance(event, MessageReceived):
                # Not a table entry: the queue's backpressure holds the reader.
                self._last_activity = self._last_received
                self._flush_control()
                if self._state.phase is _CLOSED:
                    # The flush found the link gone and closed us: no task
                    # may start now (abort() judged that the nursery's
                    # tasks end by themselves; a message task would wait for
                    # good, and the connection with it). While merely
                    # closing (our GOODBYE queued), messages still arrive.
                    return None
                if not self._message_task_started:
                    self._message_task_started = True
                    assert self._nursery is not None  # the reader runs in it
                    # Unbounded in count: _queue_message bounds what it holds.
                    self._messages_in, messages_out = trio.open_memory_channel[MessageReceived](
                        math.inf
                    )
                    self._task_context.run(
                        self._nursery.start_soon, self._message_task, messages_out
                    )
                await self._queue_message(event, frame.payload)
        return None

    async def _queue_message(self, message: MessageReceived, body: bytes | memoryview) -> None:
        """Queue ``message`` for the message task once it fits this connection's
        queue (a lone one always does) and, when it must (see
        :meth:`_held_by_call_memory`), the server's call memory.

        A large one (holding over :data:`UNCOUNTED_CALL_BYTES` decoded, as
        for calls) waits as ``body``, its frame's payload, its decoded data
        dropped, and is decoded again once it fits: what it holds decoded,
        up to 72 times its bytes, is what the waits bound (until 2026-12-07
        each waiting connection held one beside the bounds). The payload
        lies in the reader's buffer, which the reader keeps while it waits
        anyway. A smaller one waits decoded, as a small call runs
        uncounted: decoding each message of a flood twice would cost more.
        A connection that ends while its message waits drops it (what the
        peer sent is not read on).
        """
        charge = max(message.size, _MESSAGE_CHARGE)
        memory = self._call_memory
        waited = set_aside = False
        while True:
            own = self._message_bytes
            if own and own + charge > _MESSAGE_QUEUE_BYTES:
                room = self._message_room = trio.Event()
                wait: Callable[[], Awaitable[None]] = room.wait
                full = "the message queue has been full"
            elif memory is not None and self._held_by_call_memory(memory, charge):
                wait = functools.partial(self._wait_for_call_memory, memory, charge)
                full = (
                    "the call memory (server_call_budget, or the user's share of it, "
                    "user_call_budget) has been full"
                )
            else:
                break
            if not waited and charge > UNCOUNTED_CALL_BYTES:
                message.data, set_aside = None, True  # decoded again below
            waited = True
            await self._wait_for_message_room(wait, full)
        if waited:
            if self._state.phase is _CLOSED:
                return
            if set_aside:
                message.data = decode_message_sized(body)[0].data
        if memory is not None:
            if self._message_bytes and not memory.admits(charge):
                # Let in past the limit behind messages of its own: the one
                # allowance while answers are awaited (see _held_by_call_memory).
                self._message_overdraft = True
            memory.take(charge)
        self._message_bytes += charge
        self._messages_in.send_nowait(message)  # unbounded: the bytes bound it

    def _held_by_call_memory(self, memory: CallMemory, charge: int) -> bool:
        """Whether the reader must wait before it queues a message of ``charge``
        bytes: it does not fit the server's call memory (or its user's share
        of it), nor, where waiting could hold up what this connection's own
        handlers wait for, the memory's overdraft.

        Waiting could hold them up in two cases, and the message is then let
        in past the limit, into the overdraft (``admits_overdraft``: up to
        twice the limit, what this connection holds itself not counted, since
        only its own end frees that). The connection has no message queued:
        its own large call may be what fills the memory, with a handler that
        waits for this very message. Or calls of ours wait for answers (a
        handler calling its peer back, a message handler's say, needs this
        reader to read the answer, which may come behind this message): one
        message, and no more until the connection's queue has emptied
        (``_message_overdraft``). A peer that sends more than that before
        it answers waits, and the log says so after
        :data:`_MESSAGE_STALL_WARNING` seconds; so does one whose message
        does not fit what others hold even then, until they release some or
        its calls' timeout ends the wait. So the server holds at most twice
        its limit plus what one connection holds itself (its large calls, 32
        MiB or one larger call, and its messages, 32 MiB or one larger
        message, each up to 72 times the largest frame by the count), however
        many connections it has (until 2026-12-07 the two messages were let
        in past any bound). Not once the connection is over.
        """
        if self._state.phase is _CLOSED or memory.admits(charge):
            return False
        if not self._message_bytes or (not self._message_overdraft and len(self._pending)):
            own = self._state.large_call_bytes + self._message_bytes
            return not memory.admits_overdraft(charge, own)
        return True

    async def _wait_for_results_taken(self) -> None:
        """Read nothing until the results in hand (see
        :class:`~conduit._result_gate.ResultGate`) have been taken by their
        callers, which were woken already: a pass of the scheduler or two.

        Our pause, as for the receive memory: it counts neither as the
        peer's silence nor as its idleness.
        """
        with self._our_pause():
            await self._results_in_hand.wait_taken()

    async def _wait_for_call_memory(self, memory: CallMemory, charge: int) -> None:
        """Read nothing until the message task has handled one of this
        connection's messages, or the reader need not wait any more (see
        :meth:`_held_by_call_memory`: looked at every :data:`RECHECK_INTERVAL`,
        since what other connections release or a callback started are not
        announced here).

        Our pause, as for the receive memory (:meth:`_wait_for_receive_memory`):
        it counts neither as the peer's silence nor as its idleness. A peer
        that closes its side meanwhile (seen at the same looks) ends the
        connection: it sends nothing more, and what it sent before its end
        would otherwise be read on past the limit, or wait for good.
        """
        own = self._message_bytes
        stream = self.stream
        with self._our_pause():
            while self._message_bytes == own and self._held_by_call_memory(memory, charge):
                room = self._message_room = trio.Event()
                with trio.move_on_after(RECHECK_INTERVAL):
                    await room.wait()
                if peer_has_closed(stream):
                    self.abort(self.close_reason or "peer closed the connection")

    async def _wait_for_message_room(
        self,
        wait: Callable[[], Awaitable[None]],
        full: str = "the message queue has been full",
    ) -> None:
        """``wait()`` for room in the message queue (or, as ``full`` says, in
        the server's call memory), saying so if it takes long.

        While it waits the reader reads nothing, answers included: a message
        handler that awaits a call on this same connection then waits for
        good (until a heartbeat timeout or the call's own). That cannot be
        told from a merely slow handler, so after
        :data:`_MESSAGE_STALL_WARNING` seconds with calls of ours waiting for
        answers it is logged, once per wait, with the way out.
        """
        with trio.move_on_after(_MESSAGE_STALL_WARNING):
            await wait()
            return
        if len(self._pending):
            log.warning(
                "%s: %s for %g s, so this connection "
                "reads nothing, while %d call(s) of ours wait for answers: a message "
                "handler that awaits a call on its own connection cannot get the "
                "answer until the queue drains (run such work in a task of its own)",
                self.label,
                full,
                _MESSAGE_STALL_WARNING,
                len(self._pending),
            )
        await wait()  # (an Event's wait may be cancelled and started again)

    async def _wait_idle(self, role: ReadingRole) -> bool:
        """Until the socket has bytes and no caller holds the role (False), or a caller
        left a frame in ``_held_frame`` (True)."""
        while True:
            self._reader_parked = True
            try:
                await role.wait_idle()
            except trio.ClosedResourceError:
                if role.closed:
                    raise
            finally:
                self._reader_parked = False
            if self._held_frame is not None:
                return True
            if not role.held:
                self._receive_buffer.woke()
                return False

    def _own_reading(self, pending: PendingCall) -> Awaitable[None] | None:
        """A caller about to park: its own read of the socket, if the reader idles.

        PendingCalls' ``read_own`` hook, asked only for a caller waiting alone:
        with others waiting the reading task wakes them all from one read
        anyway, and a holder would hand it the rest of a burst (measured: 16
        callers, ~1 us more CPU per call with any caller reading).
        """
        role = self._role
        if role is None or not self._reader_parked or role.held or self._held_frame is not None:
            return None
        if not self._role_open():
            return None
        return self._read_own_result(pending, role)

    def _role_open(self) -> bool:
        """Whether callers may read for themselves: not while data streams are open.

        Beside bulk data the reading task keeps the socket and waits on it
        directly, as before the role existed (measured in `hol`: RPC p99 during
        an upload was worse in most pairs with the role; see docs/benchmark-journal.md).
        """
        state = self._state
        return not (state.outgoing or state.incoming)

    async def _read_own_result(self, pending: PendingCall, role: ReadingRole) -> None:
        """Hold the reading role until ``pending`` has an outcome (:mod:`conduit._reading_role`).

        Reads and handles what the reading task would, for the frames whose
        handlers never wait; returns early (the caller then parks as usual)
        when a CALL or MESSAGE arrives (left for the reading task), bulk data
        flows, replies back up, or the connection ends.
        """
        role.take()
        buffer = self._receive_buffer
        interrupt = role.interrupt_holder
        try:
            while pending.settled() is None:
                pending.interrupt = interrupt
                try:
                    await role.wait_own()
                except trio.ClosedResourceError:
                    if role.closed:
                        return
                    continue  # interrupted: the call has its outcome
                finally:
                    pending.interrupt = None
                if pending.settled() is not None:
                    return
                data = buffer.read_now()
                if data is None:
                    if buffer.mapped:
                        return
                    continue
                if not data:
                    self.abort(self.close_reason or "peer closed the connection")
                    return
                self._last_received = trio.current_time()
                self._reader.feed(data)
                if not self._drain_to_call():
                    return
                self._flush_control()
                if buffer.mapped or self._outbox.control_bytes > _CONTROL_BACKLOG:
                    return
        except IntegrityError as exc:
            self.abort(exc.reason)
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.abort(self.close_reason or f"connection lost: {exc or type(exc).__name__}")
        finally:
            role.release()
            if self._held_frame is not None:
                role.wake_idle()

    def _drain_to_call(self) -> bool:
        """Handle the frames read so far whose handlers never wait.

        Stops at the first CALL or MESSAGE, at a RESULT that must wait for
        the results in hand to be taken, or once the answers queued back up
        past the backlog, leaving that frame in ``_held_frame`` for the reading
        task (False); True when every frame was handled.
        """
        next_frame = self._reader.next_frame
        receive_frame = self._state.receive_frame
        handlers = self._handlers
        outbox = self._outbox
        while (frame := next_frame()) is not None:
            kind = frame.kind
            if kind is _CALL or kind is _MESSAGE or outbox.control_bytes > _CONTROL_BACKLOG:
                self._held_frame = frame
                return False
            event = receive_frame(frame)
            if event is not None and (handler := handlers.get(type(event))) is not None:
                handler(event)
            elif type(event) is ResultMustWait:
                # The reading task waits for room, then reads it again.
                self._held_frame = frame
                return False
        return True

    async def _receive(self) -> Received:
        if self.host_reader is not None:
            return await self.host_reader.receive()
        # The rest of a bulk record, if one is partly here, comes in one read,
        # behind the record's start: the opener decrypts it from the read.
        reader = self._reader
        return await self._receive_buffer.receive(self.stream, reader.missing, reader)

    def _drain_on_host(self, data: bytes) -> bool:
        """The host reader's callback: handle ``data`` on the asyncio loop, between guest ticks.

        Does what the reading task does after a read, for the frames whose
        handlers never wait (the event table's); stops at the first CALL or
        MESSAGE, which it leaves for the reading task. Returns whether
        everything was handled (False: wake the reading task). Errors are
        raised to the host reader, which hands them to the reading task.
        """
        self._last_received = trio.current_time()
        self._reader.feed(data)
        if not self._drain_to_call():
            return False
        self._flush_control()
        return self._outbox.control_bytes <= _CONTROL_BACKLOG

    async def _send_task(self) -> None:
        writer = self._writer
        io = self._socket_io
        bulk = False
        budget = max(self._writer.record_limit, 256 * 1024)
        try:
            while True:
                frames = await self._outbox.take(budget)
                for chunk in self._outbox.take_sealed():
                    await self._write(chunk)
                for record in writer.iter_records(frames):
                    if not bulk and io is not None and len(record) > _BULK_RECORD:
                        io.allow_unsent(_BULK_UNSENT)
                        bulk = True
                    await self._write(record)
        except OutboxClosed:
            # CLOSING, not CLOSED: the outbox ended after our GOODBYE went
            # out (an abort closes the machine first).
            self._goodbye_out = self._state.phase is _CLOSING
            self.abort(self.close_reason or "closed")
        except ConnectionClosed:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.abort(self.close_reason or f"connection lost: {exc or type(exc).__name__}")
        except Exception as exc:  # a bug here must end this connection, not the server
            log.exception("%s: writer failed", self.label)
            self.abort(f"internal error in the writer: {exc}")

    def _start_writer(self) -> None:
        # The outbox needs its writer for the first time; before run() it starts there.
        if self._nursery is None:
            self._writer_wanted = True
        else:
            self._writer_started = True
            self._task_context.run(self._nursery.start_soon, self._send_task)

    def _start_timer(self) -> None:
        # The first call with a timeout; before run() it starts there.
        if self._nursery is None:
            self._timer_wanted = True
        else:
            self._task_context.run(self._nursery.start_soon, self._pending.run_timer)

    async def _write(self, record: bytes | bytearray | memoryview) -> None:
        """The writer's send of one record (or the rest of one).

        On a plain socket a record first goes out with one non-blocking write;
        only what the socket did not take goes through :meth:`_send_waiting`
        (which waits for room). Trio's ``send_all`` would end with a scheduler
        pass, one per burst of calls or results; a small record needs no such
        pass to be fair, because the writer parks as soon as the outbox is
        empty. A bulk
        record the socket took whole keeps one pass: a writer fed as fast as
        the socket drains could otherwise keep the loop to itself.
        """
        io = self._socket_io
        if io is not None:
            sent = io.send_now(record)
            if sent == len(record):
                if sent >= SCRATCH_MIN:
                    # Bulk data the socket took whole: a writer fed faster than
                    # the socket drains would otherwise never let others run.
                    await trio.lowlevel.checkpoint()
                return
            record = memoryview(record)[sent:]
        await self._send_waiting(record)

    async def _send_waiting(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting for room: the peer reads slower than we write.

        Notes in ``_send_waiting_since`` when the peer last took any of it, so
        that :meth:`beat` can tell a slow reader (whose progress keeps moving
        the mark) from one that stopped reading. On a plain socket each wait
        for room is followed by one write; other streams send in slices of
        :data:`_SEND_SLICE`, so that a slow link still shows progress within
        a record.
        """
        io = self._socket_io
        view = memoryview(data)
        self._send_waiting_since = trio.current_time()
        try:
            while view:
                if io is not None:
                    sent = await io.send_when_writable(view)
                else:
                    sent = min(len(view), _SEND_SLICE)
                    await self.stream.send_all(view[:sent])
                if sent:
                    view = view[sent:]
                    self._send_waiting_since = trio.current_time()
        finally:
            self._send_waiting_since = None
            if view:  # left part way (cancelled): no record may follow on this stream
                self._record_cut = True

    async def _message_task(self, messages: trio.MemoryReceiveChannel[MessageReceived]) -> None:
        async for message in messages:
            try:
                await self._dispatcher.handle_message(message.event, message.data)
            except CallbackCancelledError:  # asyncio's shutdown: see CallRunners._failure
                log.debug("%s: handler for message %r was cancelled", self.label, message.event)
            except Exception:
                log.exception("%s: handler for message %r failed", self.label, message.event)
            finally:
                charge = max(message.size, _MESSAGE_CHARGE)
                self._message_bytes -= charge
                if self._call_memory is not None:
                    self._call_memory.release(charge)
                if not self._message_bytes:
                    self._message_overdraft = False  # see _held_by_call_memory
                room = self._message_room
                if room is not None:
                    self._message_room = None
                    room.set()
                del message  # what it decoded goes now, not with the next one

    def _shows_reading(self, sending: bool) -> bool:
        """For :meth:`beat`: whether nothing says the peer has stopped reading.

        Judged only while we wait for something of the peer's that its
        reading would bring: credit for a stream of ours, or the answer to a
        call of ours (a peer that reads nothing while we wait for nothing
        costs nothing, and its own heartbeat judges us). And only while we
        read the connection (the peer's answers cannot reach us otherwise)
        and no send of ours waits (its progress judges it). The peer shows
        it reads when it sends anything besides PINGs (its PONGs to ours; on
        a slow link our PONG may wait behind its data or a large result), or
        when its kernel took some of our bytes (the socket's unacknowledged
        bytes went down: our PING may wait behind our own data on a slow
        link). Until 2026-12-07 the answers of calls were not judged: a
        server that still sent PINGs but read nothing (a link down one way)
        left every call to time out, the connection up, and no reconnect
        (a review). A call alone is judged only while the socket shows bytes
        of ours unacknowledged (or cannot tell): see below.
        """
        frames = self._state.frames_besides_pings
        credit = self._waiting_for_credit()
        judged = not sending and not self._reading_paused and (credit or len(self._pending) > 0)
        # The socket is asked only while it matters (not at every beat of every
        # idle connection).
        unacked = unacknowledged_bytes(self.stream) if judged else None
        if not credit and unacked == 0:
            # Only a call of ours waits, and the peer's kernel took every byte
            # we sent, our PINGs too: a peer that paused its reading (its
            # message queue or memory full while its handlers run) is alive,
            # and its calls' own timeouts bound the wait (the review of this
            # rule's diff found such a server ended after twice the timeout).
            # A link down one way leaves our bytes unacknowledged.
            judged = False
        took = (
            unacked is not None and self._unacked_seen is not None and unacked < self._unacked_seen
        )
        heard = frames != self._frames_seen or took
        self._frames_seen, self._unacked_seen = frames, unacked
        return heard or not judged

    def _waiting_for_credit(self) -> bool:
        """Whether a stream of ours waits for the peer's credit now."""
        return any(
            isinstance(stream, OutgoingStream) and stream.waiting_for_credit
            for stream in self._state.outgoing.values()
        )

    async def _heartbeat_loop(self) -> None:
        while not await self._sleep_unless_closed(self._beat_due):
            if not self.beat(trio.current_time()):
                return

    def beat(self, now: float) -> bool:
        """One heartbeat at ``now``: ping, or end a silent or idle connection.

        Returns False once the connection needs no more beats.

        A beat that comes more than :data:`STALL_TOLERANCE` (or half an
        interval) after it was due was held up by our own process: suspended
        (SIGSTOP, a laptop's lid, a paused VM) or its event loop blocked.
        What the peer sent meanwhile waits unread in our socket's buffers, so
        the silence is ours: such a beat pings but puts every verdict off to
        the next beat, by when our readers have caught up. Once only: a loop
        late at every beat still judges every other one.
        """
        if self._state.phase is _CLOSED:
            return False
        settings = self.settings
        late = now - self._beat_due
        self._beat_due = now + settings.heartbeat_interval
        if (
            late > min(STALL_TOLERANCE, settings.heartbeat_interval / 2)
            and not self._verdict_put_off
        ):
            self._verdict_put_off = True
            return self._ping()
        self._verdict_put_off = False
        silent = now - self._last_received
        if silent > settings.heartbeat_timeout and not self._reading_paused:
            self.abort(f"peer silent for {silent:.1f}s (heartbeat timeout)")
            return False
        waiting = self._send_waiting_since
        if self._shows_reading(waiting is not None):
            self._heard_reading = now
        elif now - self._heard_reading > _CREDIT_PATIENCE * settings.heartbeat_timeout:
            # A stream of ours waits for its credit, or a call of ours for its
            # answer, and the peer sends nothing but PINGs, answers none of
            # ours and takes none of our bytes: it reads nothing (a download
            # it stopped taking, a link down one way), which no send of ours
            # would ever show.
            self.abort(
                f"peer read nothing for {now - self._heard_reading:.1f}s: it sent only "
                "PINGs and answered none of ours (heartbeat timeout)"
            )
            return False
        if waiting is not None and now - waiting > settings.heartbeat_timeout:
            # It still sends (so it is not silent) but has taken none of our
            # bytes: a send stuck for good would hold this connection forever.
            self.abort(
                f"peer read nothing for {now - waiting:.1f}s while we had bytes for it "
                "(heartbeat timeout)"
            )
            return False
        if (
            settings.idle_timeout is not None
            and now - self._last_activity > settings.idle_timeout
            and not self._reading_paused
        ):
            # A graceful close waits (for the goodbye to go out): in a task.
            with contextlib.suppress(ConnectionClosed):
                self.spawn(self.close, f"idle for more than {settings.idle_timeout:g}s")
            return False
        return self._ping()

    def _ping(self) -> bool:
        """The beat's ping, and the idle buffers let go; False if the connection closed."""
        try:
            self.ping_now()
        except ConnectionClosed:
            return False
        # An idle connection must not keep a bulk transfer's megabytes.
        self._writer.release_idle_buffers()
        self._reader.release_idle_buffers()
        self._receive_buffer.release_idle()
        return True

    async def _idle_task(self, idle_timeout: float) -> None:
        # Sleep until the moment the connection would become idle; activity in
        # the meantime moves that moment, so check again when we wake.
        while True:
            deadline = self._last_activity + idle_timeout
            if trio.current_time() >= deadline:
                if self._reading_paused:
                    # We are the ones not reading it: not idle. Looked at
                    # again after idle_timeout; the pause's end counts as activity.
                    deadline = trio.current_time() + idle_timeout
                else:
                    await self.close(f"idle for more than {idle_timeout:g}s")
                    return
            if await self._sleep_unless_closed(deadline):
                return

    async def _sleep_unless_closed(self, deadline: float) -> bool:
        """Sleep until ``deadline``; True (at once) when the connection closed meanwhile."""
        with trio.move_on_at(deadline):
            if self._state.phase is not _CLOSED:
                await self._timers_parked.park()
            return True
        return False

    # ------------------------------------------------------------------ event handlers

    def _on_stream_data(self, stream: IncomingStream) -> None:
        self._last_activity = self._last_received
        stream.wake()

    def _on_credit(self, stream: OutgoingStream) -> None:
        # The peer took data of ours (a download it reads): not idle, though
        # it sends nothing else. (A CREDIT for no stream of ours is no event.)
        self._last_activity = self._last_received
        stream.wake()

    def _on_reply_needed(self, event: CallRefused | PingReceived) -> None:
        self._outbox.put_control((event.reply,))

    def _on_call_cancelled(self, event: CallCancelled) -> None:
        self._calls.cancel(event.call_id)

    def _on_stream_reset(self, event: StreamWasReset) -> None:
        if event.incoming is not None:
            event.incoming.fail(event.error)
            self._memory_freed()
        if event.outgoing is not None:
            event.outgoing.fail(event.error)

    def _on_goodbye(self, event: GoodbyeReceived) -> None:
        # A peer going away (a server shutting down, to restart or not) did
        # not end this connection for our sake: to a client with automatic
        # reconnect it is lost, not closed on purpose, and it comes back.
        # (A close of ours that crossed it stays on purpose.)
        self.closed_on_purpose = self.closed_on_purpose or not event.going_away
        self.peer_left_for_good = not event.going_away
        self.abort(f"peer closed the connection: {event.reason}")

    # ------------------------------------------------------------------ calls

    def _send_cancel(self, call_id: int) -> None:
        frame = self._state.cancel_call(call_id)
        if frame is not None:
            with contextlib.suppress(ConnectionClosed):
                self._outbox.put_control((frame,))

    def _queue_result(self, call_id: int, result: Result) -> None:
        # A call the reader ran inline: the reader sends what it queued once
        # the record is done (_flush_control), several results in one record.
        # try/except, not contextlib.suppress: no context manager object per call.
        try:
            self._outbox.queue_control((self._state.result_frame(call_id, result),))
        except ConnectionClosed:
            return  # closing: the result has nowhere to go
        if self._state.unsendable_results:
            self._log_unsendable()

    def _queue_value(self, call_id: int, value: Any) -> None:
        # The same for a call that returned ``value``, whose id it also frees
        # (finish_value: call_finished and value_frame in one): no Result
        # object, no shared helper for the queueing (Python calls per call).
        try:
            self._outbox.queue_control((self._state.finish_value(call_id, value),))
        except ConnectionClosed:
            return
        if self._state.unsendable_results:
            self._log_unsendable()

    async def _send_result(self, call_id: int, result: Result) -> None:
        frame = self._state.result_frame(call_id, result)
        if self._state.unsendable_results:
            self._log_unsendable()
        with contextlib.suppress(ConnectionClosed):
            await self._send_soon(frame)

    def _log_unsendable(self) -> None:
        """Log the results the protocol could not encode (answered ``bad_result``):
        the handler's doing, which its caller only sees as the code (until
        2026-12-07 only those cattrs refused were logged, a review found)."""
        unsendable = self._state.unsendable_results
        while unsendable:
            call_id, why = unsendable.popleft()
            log.error(
                "%s: the result of an RPC handler (call %d) cannot be sent: %s",
                self.label,
                call_id,
                why,
            )

    def _spawn_follower(self, fn: Callable[[], Awaitable[None]]) -> None:
        # Not spawn(): the reading role must pass on while CLOSING too, or the
        # peer's last frames would never be read.
        # Started from the context the connection's tasks started with, not
        # the reader's: its handler is blocked mid-call, with whatever it set.
        assert self._nursery is not None
        self._task_context.run(self._nursery.start_soon, fn)

    def _can_send_directly(self) -> bool:
        # writer_idle also means nothing is queued for it (sealed bytes included).
        return self._outbox.writer_idle and self._state.phase is _OPEN

    def _all_callers_woken(self) -> None:
        # The callers woken by one batch of results have all run: what they
        # queued (their next calls, see _send_soon) goes out now, in one record.
        if self._outbox.control_queued:
            self._outbox.wake_writer()

    async def _send_soon(self, frame: bytes) -> None:
        """Send a control frame: directly when the writer is idle, else through it.

        Going direct saves waking the writer task, a full scheduler pass, on
        every call and every reply. Frames queued meanwhile go first, in the
        same record. While other callers woken by the same batch of results
        have yet to run, the frame waits for theirs instead (the last of them
        wakes the writer): a burst of calls costs one record and one send, up
        to :data:`BURST_RECORD_FRAMES` frames. A longer burst goes out in
        records of that many, as its callers make them: the peer then works on
        the first calls while this side makes the rest, instead of the two
        processes taking turns over whole bursts.
        """
        outbox = self._outbox
        if self._pending.waking:
            outbox.queue_control((frame,))
            if outbox.control_count < BURST_RECORD_FRAMES:
                return
            # A long burst goes out in records of BURST_RECORD_FRAMES: the peer
            # starts on these while the rest of the burst is made.
            if not self._can_send_directly():
                outbox.wake_writer()
                return
            frames = outbox.take_control()
        elif not self._can_send_directly():
            outbox.put_control((frame,))
            return
        else:
            frames = outbox.take_control() if outbox.control_queued else []
            frames.append((frame,))
        records: list[Any] = self._writer.write_frames(frames)
        io = self._socket_io
        if io is not None and len(records) == 1:
            # The common case, without a coroutine: one write the socket
            # takes whole (nothing else runs meanwhile, so no flag is needed).
            (record,) = records
            try:
                sent = io.send_now(record)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.abort(self.close_reason or f"connection lost: {exc or type(exc).__name__}")
                raise ConnectionClosed(self.close_reason or "connection lost") from exc
            if sent == len(record):
                return
            records = [memoryview(record)[sent:]]
        # What the socket did not take at once (or a stream that cannot write
        # without waiting: TLS, memory) goes to the writer, first, and the
        # caller goes on to wait for its answer: that wait has the call's
        # deadline and the caller's cancel scope. A caller that sent the rest
        # itself had to be shielded (a record cut in half corrupts the
        # stream), so a peer that stopped reading held it past both.
        self._outbox.put_sealed(records)

    def _flush_control(self) -> None:
        """Send the control frames queued without waking the writer (see Outbox.queue_control).

        Called by the reader (and by a stream's consumer handing credit back),
        which must never wait on the socket: if the peer
        stopped reading while it keeps sending, a reader stuck in a send would
        stop us reading too, and two such peers would wait on each other. So
        the reader only writes what the socket takes at once; the writer sends
        the rest.
        """
        outbox = self._outbox
        if not outbox.control_queued:
            return
        # _can_send_directly, inline: the reader runs this after every read.
        if self._socket_io is None or not outbox.writer_idle or self._state.phase is not _OPEN:
            outbox.wake_writer()
            return
        records: list[Any] = self._writer.write_frames(outbox.take_control())
        try:
            for index, record in enumerate(records):
                sent = self._socket_io.send_now(record)
                if sent < len(record):
                    outbox.put_sealed([memoryview(record)[sent:], *records[index + 1 :]])
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.abort(self.close_reason or f"connection lost: {exc or type(exc).__name__}")
        except ConnectionClosed:
            pass

    # ------------------------------------------------------------------ API

    def call(self, method: str, args: dict[str, Any], timeout: float | None) -> Awaitable[Any]:
        """Call ``method`` on the peer: await the value; a failure raises RPCError.

        Not an ``async def``: it returns :meth:`PendingCalls.wait`'s coroutine
        itself, so a woken caller resumes one coroutine layer less (the CALL
        is encoded when this is called, the awaiting sends it).
        """
        if self._state.phase is not _OPEN:  # is_open, without the property call
            raise ConnectionClosed(self.close_reason or "connection closed")
        call_id, frame = self._state.start_call(method, args)
        self._last_activity = now = trio.current_time()
        return self._pending.wait(call_id, method, timeout, now, self._send_soon, frame)

    def call_nowait(
        self,
        method: str,
        args: dict[str, Any],
        timeout: float | None,
        done: Callable[[outcome.Outcome[Result]], None],
        *,
        send: bool = True,
    ) -> int:
        """Send a call for a caller that is no Trio task; ``done`` gets its result.

        The asyncio shim's fast path (:mod:`conduit._host_rpc`), run on the
        hosting loop's thread between guest ticks: what :meth:`call` does,
        without waiting. Returns the call id, for :meth:`forget_call`. With
        ``send=False`` the frame only joins the queue, for a burst of calls
        the caller then sends with :meth:`send_queued`, in one record (or
        several of :data:`BURST_RECORD_FRAMES` frames, the last one there).
        """
        if self._state.phase is not _OPEN:  # is_open, without the property call
            raise ConnectionClosed(self.close_reason or "connection closed")
        call_id, frame = self._state.start_call(method, args)
        # One clock read for the activity stamp and the deadline, as in call().
        self._last_activity = now = trio.current_time()
        self._pending.register(call_id, method, timeout, done, now)
        self._outbox.queue_control((frame,))
        if send or self._outbox.control_count >= BURST_RECORD_FRAMES:
            # A held burst goes out in records of BURST_RECORD_FRAMES, as _send_soon's.
            self.send_queued()
        return call_id

    def send_queued(self) -> None:
        """Send the control frames queued, without waiting (see :meth:`call_nowait`)."""
        if not self._pending.waking:
            # Else the last Trio caller woken by a batch of results sends them.
            self._flush_control()

    def forget_call(self, call_id: int) -> None:
        """The caller of :meth:`call_nowait` gave up: tell the peer, if it still waited."""
        if self._pending.forget(call_id):
            self._send_cancel(call_id)

    async def send_message(self, event: str, data: Any) -> None:
        """Send a one-way message.

        Waits while the control frames queued for the peer hold more than
        ``_CONTROL_BACKLOG`` (8 MiB): a peer that reads slower than it is
        sent to, or not at all, must not grow this side's memory without
        bound. ``ConnectionClosed`` if the connection ends meanwhile.
        Cancelled means not sent: a cancellation is taken before the message
        is queued, never after.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.offer_message(event, data):
            await self.wait_for_message_room()
        # Queued, so it goes: this schedule point must not then report a
        # cancellation, or a caller that retries would send it twice.
        await trio.lowlevel.cancel_shielded_checkpoint()

    def offer_message(self, event: str, data: Any) -> bool:
        """Queue a one-way message unless ``_CONTROL_BACKLOG`` is queued for
        the peer already; whether it was queued. Never waits (a broadcast
        decides how long to wait for room: see :meth:`wait_for_message_room`)."""
        if self._outbox.control_bytes > _CONTROL_BACKLOG:
            return False
        frame = self._state.message_frame(event, data)
        self._last_activity = trio.current_time()
        self._outbox.put_control((frame,))
        return True

    async def wait_control_below(self, limit: int) -> None:
        """Until the control frames queued for the peer (answers, messages) take at
        most ``limit`` bytes: a handler about to answer with many bytes waits for
        the answers before it to go (``ConnectionClosed`` if the connection ends)."""
        await self._outbox.wait_control_below(limit)

    async def wait_for_message_room(self) -> None:
        """Until :meth:`offer_message` may queue a message (``ConnectionClosed``
        if the connection ends first)."""
        await self._outbox.wait_control_below(_CONTROL_BACKLOG)

    def stalled_for(self, now: float) -> float:
        """Seconds the peer has taken none of the bytes a send of ours waits to
        give it (0 when no send waits): what tells a stalled reader from a slow one."""
        since = self._send_waiting_since
        return 0.0 if since is None else now - since

    def open_incoming_stream(self) -> IncomingStream:
        """Allocate a stream id that the peer may send data on."""
        if not self.is_open:
            raise ConnectionClosed(self.close_reason or "connection closed")
        grant = self._grant_credit
        max_frame_size = self.settings.max_frame_size
        budget = self._state.receive_budget
        room = self._receive_room if budget is not None else None
        memory = self._receive_memory
        window = self._state.receive_window
        limit = self.settings.max_receive_window or window
        # Grown windows leave half the budget (at least a window) to the
        # streams that open later, which a full budget would refuse.
        reserve = 0 if budget is None else max(window, budget // 2)
        if budget is not None:
            limit = min(limit, budget - reserve)
        tuned = limit > window
        if tuned and self._round_trip is None and self._ping_sent_at is None:
            # The window grows with the link's round trip: time one now,
            # before the stream's own bytes queue ahead of the PONG.
            self.ping_now()

        def make(stream_id: int, window: int) -> IncomingStream:
            return IncomingStream(
                stream_id,
                window,
                grant,
                max_frame_size=max_frame_size,
                room=room,
                memory=memory,
                tuner=WindowTuner(limit, trio.current_time()) if tuned else None,
                round_trips=self,
                growth_reserve=reserve,
                reading_paused=self._is_reading_paused,
            )

        return self._state.open_inbound(make)

    def _is_reading_paused(self) -> bool:
        """Whether this side has stopped reading the socket for now (see _reading_paused)."""
        return self._reading_paused

    def _receive_room(self) -> int:
        """Bytes the receive budget has left beyond what the inbound streams may
        hold (``ConnectionState.receive_committed``)."""
        state = self._state
        return (state.receive_budget or 0) - state.receive_committed()

    def check_outgoing_stream_id(self, stream_id: int) -> None:
        """``RPCError`` (``invalid_arguments``) unless the peer may give us
        ``stream_id`` to send on (see ``ConnectionState.check_peer_stream_id``)."""
        self._state.check_peer_stream_id(stream_id)

    def open_outgoing_stream(self, stream_id: int) -> OutgoingStream:
        """Start sending on a stream id the peer allocated for us."""
        if not self.is_open:
            raise ConnectionClosed(self.close_reason or "connection closed")
        put_data = self._outbox.put_data
        return self._state.open_outbound(
            stream_id,
            lambda stream_id, window, max_payload: OutgoingStream(
                stream_id, window, max_payload, put_data
            ),
        )

    def close_stream(
        self, stream: IncomingStream | OutgoingStream, *, reset: tuple[str, str] | None = None
    ) -> None:
        """Forget a stream; with ``reset=(code, reason)`` tell the peer to abort it."""
        frame = self._state.close_stream(stream, reset)
        self._memory_freed()
        if frame is not None:
            with contextlib.suppress(ConnectionClosed):
                self._outbox.put_control((frame,))

    def _memory_freed(self) -> None:
        # A stream was forgotten: what it held left the server's receive memory.
        memory = self._receive_memory
        if memory is not None:
            memory.freed()

    def _grant_credit(self, stream_id: int, amount: int) -> None:
        frame = self._state.credit_frame(stream_id, amount)
        if frame is not None:
            with contextlib.suppress(ConnectionClosed):
                # Straight out when the writer is idle (one grant per megabyte
                # of bulk data would otherwise wake it: a scheduler pass each).
                self._outbox.queue_control((frame,))
                self._flush_control()


__all__ = ["Connection", "ConnectionSettings", "Dispatcher", "settings_from"]
