"""The rules of an authenticated connection, decided from frames and state alone.

:class:`ConnectionState` is to conduit what ``h11.Connection`` is to HTTP: the
Trio engine (:mod:`conduit._connection`) feeds it every frame it reads with
:meth:`~ConnectionState.receive_frame` and gets back a typed event (or None when
the frame needs nothing from the engine); for what this side wants to do it
asks the machine for the frame to send (:meth:`~ConnectionState.start_call`,
:meth:`~ConnectionState.ping`, :meth:`~ConnectionState.goodbye`...). A frame
that breaks the rules raises :class:`~conduit.errors.RemoteProtocolError` and
the connection is over.

What it owns: frame-kind dispatch, stream-id parity and allocation, early
resets, the per-stream credit counters and their checks (and the count of what
the inbound streams hold, in a :class:`ReceiveMemory` that many connections
may share), call-id allocation and
uniqueness, the concurrency limit and what large calls hold decoded (in a
:class:`CallMemory` that many connections may share too, and a
:class:`CallShare` of it per user), PING -> PONG,
GOODBYE and the closing state.
What it does not: time (heartbeats, idleness, call timeouts), waiting, tasks.

The hot path is DATA: it allocates nothing per frame, and the consecutive DATA
frames of one stream in a record come as one
:class:`~conduit.protocol.data_runs.DataRun` (one credit check, one event). The
event for DATA is the :class:`InboundStream` that took the bytes, and for a CREDIT frame
the :class:`OutboundStream` that got the credit; the engine's subclasses of
both add only the waking.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable, Collection, Sequence, Sized
from typing import Any, TypeVar, cast

import attrs

from ..errors import LocalProtocolError, RemoteProtocolError, RPCError, StreamReset
from .codec import (
    CONTAINER_OVERHEAD,
    COUNTED_BODY,
    ITEM_OVERHEAD,
    HoldsTooMuch,
    decode_body,
    decode_call,
    decode_call_sized,
    decode_message_sized,
    decode_result,
    decode_result_sized,
    encode_call,
    encode_frame,
    encode_result,
    encode_value,
)
from .data_runs import DataRun
from .frames import (
    FLAG_END,
    FRAME_COST,
    HEADER_SIZE,
    MAX_STREAM_ID,
    Frame,
    FrameKind,
    is_valid_stream_id,
)
from .messages import Body, Cancel, Credit, Goodbye, Message, Ping, Pong, Reset, Result

# Enum members as module constants: ``FrameKind.CALL`` is a ~0.1 us class
# attribute lookup, and receive_frame tests the kind of every frame.
_DATA = FrameKind.DATA
_CALL = FrameKind.CALL
_RESULT = FrameKind.RESULT

#: A DATA payload (or a record's run of them) is a view of its decrypted
#: record, which it keeps alive until the consumer has used it; credit counts
#: the payload. One smaller than the record's buffer divided by this is copied
#: out, so that what the peer's credit lets it pin is at most this many times
#: the credit (a 1-byte DATA beside a megabyte of padding pinned the megabyte).
#: Each view kept is at least half of its buffer, so a buffer is at most twice
#: what is kept of it. Bulk records are full of data and are never copied;
#: what is copied is a file's last record (or a file's only one) when under
#: half the record buffer, and every record of a stream whose receive window
#: is under about half a megabyte (the sender's records are that small, and
#: the buffers of bulk records hold the largest one).
#: (It was 8: a peer that padded its records with frames nothing keeps, such
#: as DATA for a stream it had reset, pinned 8 times its credit.)
PIN_RATIO = 2

#: The smallest payload of a run's DATA frames kept as a view of its record:
#: a smaller one is copied. A view is an object of about 200 bytes beside the
#: data, which FRAME_COST (64) does not cover; a small copy is its data plus
#: 33. (Views of a run's tiny or empty frames, beside one frame filling half
#: the record, held 2.8 times their credit.)
VIEW_MIN = 1024

#: A CALL whose body is over COUNTED_BODY is decoded counting what it holds
#: (codec.unpack_sized's bound); one that holds at most this runs uncounted,
#: as one at or under COUNTED_BODY does (whose bound is at most 34 KB: 256
#: bytes of empty maps). So the calls a connection runs uncounted hold at most
#: max_concurrent_calls (128) x 64 KiB by the bound (4 KiB of empty maps
#: holds 557 KB by it, and ran uncounted until 2026-12-07), while the calls of
#: ordinary size (a file of up to ~63 KiB, a batch of 60 names) are never
#: refused for what others hold.
UNCOUNTED_CALL_BYTES = 64 * 1024

#: How a call refused by the server's call memory (``server_call_budget``)
#: is told so: the room is other connections', and comes back as their
#: handlers end, so a client may wait for it (the transfer code does).
SERVER_BUDGET_REFUSAL = (
    "the server's calls and messages hold all that its server_call_budget allows; "
    "try again when they are done"
)
#: How a call refused by its user's share of the call memory
#: (``user_call_budget``: see :class:`CallShare`) is told so: the room is
#: held by that user's own calls and messages, on this connection or
#: another, and comes back as their handlers end.
USER_BUDGET_REFUSAL = (
    "your calls and messages hold all of the server's call memory that one user "
    "may (user_call_budget); try again when they are done"
)

#: What the calls counted (over UNCOUNTED_CALL_BYTES) queued or running at
#: once may hold decoded, for as long as their handlers run:
#: one more is refused with ``overloaded``; a lone call of any size is admitted
#: (a frame of the largest size may hold ~72 times its bytes: a megabyte of
#: empty maps). Eight calls of 50,000 short strings each (0.5 MB on the wire,
#: 3.7 MB by the bound) fit, as do batches of small files (1 MiB of bytes each).
LARGE_CALL_BYTES = 32 * 1024 * 1024

#: The largest RESULT body that cannot hold over UNCOUNTED_CALL_BYTES by
#: codec.unpack_sized's bound, whose most for one byte on the wire is an
#: empty map in a list (the byte, a container and an item): decoded without
#: counting, which costs ~1 us less (a CALL's line is COUNTED_BODY).
UNCOUNTABLE_RESULT = UNCOUNTED_CALL_BYTES // (1 + CONTAINER_OVERHEAD + ITEM_OVERHEAD)

#: What the RESULTs decoded but not yet taken by their callers may hold
#: together, beyond those that hold at most UNCOUNTED_CALL_BYTES: over all
#: the connections of an endpoint (see :class:`ResultsInHand`). A lone
#: result of any size is let in.
RESULTS_IN_HAND_BYTES = 32 * 1024 * 1024

#: The largest call id: the header's 32-bit stream id field. Call ids run from
#: 1 to this and start again at 1, skipping those of this side's calls still
#: awaiting their result (:attr:`ConnectionState.calls_in_use`).
MAX_CALL_ID = MAX_STREAM_ID

#: Early resets remembered at most (the oldest are forgotten first), so a peer
#: resetting stream ids we never use cannot grow our memory.
MAX_EARLY_RESETS = 1024

#: The most characters of a peer's text (a RESET's code and reason, a
#: GOODBYE's reason) the connection keeps or reports: the rest is cut (see
#: :func:`peer_text`). Such text is for people, and the frame that carries it
#: may be as large as ``max_frame_size``: kept whole, 1,024 early resets of a
#: megabyte each held a gigabyte per connection, and each GOODBYE put its
#: megabyte into the log.
MAX_PEER_TEXT = 256

Buffer = bytes | bytearray | memoryview


class Phase(enum.Enum):
    """Where a connection stands; the one record of whether it is closing."""

    #: Carries traffic both ways.
    OPEN = "open"
    #: We said GOODBYE: queued frames still go out, nothing new starts.
    CLOSING = "closing"
    #: Over; :attr:`ConnectionState.close_reason` says why.
    CLOSED = "closed"


_OPEN = Phase.OPEN  # tested for every CALL received
_CLOSED = Phase.CLOSED  # tested for every frame received (see _DATA)


def peer_text(text: str, limit: int = MAX_PEER_TEXT) -> str:
    """``text`` from the peer, cut to ``limit`` characters (saying how many were cut)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} characters cut)"


# ---------------------------------------------------------------------- events
# Plain slotted classes (not frozen): an instance per call or result is on the
# RPC hot path, and attrs' frozen __init__ is slower.


@attrs.define(slots=True)
class CallReceived:
    """The peer calls ``method`` with ``args``; answer with :meth:`ConnectionState.value_frame`
    or :meth:`ConnectionState.result_frame`, then :meth:`ConnectionState.call_finished`.

    The call's two fields, not a :class:`~conduit.protocol.messages.Call`: no
    frozen instance to build per call.
    """

    call_id: int
    method: str
    args: dict[str, Any]


@attrs.define(slots=True)
class CallRefused:
    """A call over the concurrency limit: send ``reply`` (an "overloaded" RESULT)."""

    call_id: int
    reply: bytes


@attrs.define(slots=True)
class CallCancelled:
    """The peer gave up on call ``call_id``, which may be queued or running."""

    call_id: int


@attrs.define(slots=True)
class ResultReceived:
    """The outcome of a call this side made, which its caller awaits."""

    call_id: int
    result: Result
    #: What it holds decoded (``codec.unpack_sized``'s bound), counted in the
    #: endpoint's :class:`ResultsInHand` until its caller has taken it; 0
    #: for a small one, not counted (see :data:`UNCOUNTED_CALL_BYTES`).
    held: int = 0


@attrs.define(slots=True)
class ResultMustWait:
    """A RESULT holding more than the room its endpoint's
    :class:`ResultsInHand` has left: not decoded past that room. The engine
    keeps the frame and hands it to :meth:`ConnectionState.receive_frame`
    again once the results in hand have been taken by their callers (with
    none in hand, one of any size is let in)."""

    call_id: int


@attrs.define(slots=True)
class MessageReceived:
    """A one-way message."""

    event: str
    data: Any
    #: What it holds decoded (``codec.unpack_sized``'s bound): what the
    #: engine's queue counts.
    size: int = attrs.field(default=0, eq=False)


@attrs.define(slots=True)
class StreamWasReset:
    """The peer aborted a stream: fail whichever ends of it we hold with ``error``."""

    error: StreamReset
    incoming: InboundStream | None
    outgoing: OutboundStream | None


@attrs.define(slots=True)
class PingReceived:
    """A liveness probe; send ``reply`` (the PONG)."""

    nonce: int
    reply: bytes


@attrs.define(slots=True)
class PongReceived:
    """The answer to our PING ``nonce`` (the engine times its round trip)."""

    nonce: int


@attrs.define(slots=True)
class GoodbyeReceived:
    """The peer closed the connection; the machine is now CLOSED."""

    reason: str
    #: The peer is going away (see :class:`~conduit.protocol.messages.Goodbye`).
    going_away: bool = False


# ---------------------------------------------------------------------- streams


class ReceiveMemory:
    """The bytes that the inbound streams of many connections hold together.

    One for all the connections of a server (``server_receive_budget``):
    every :class:`InboundStream` given it counts in :attr:`held` what it
    holds, the bytes the peer sent that have not been granted back as credit
    yet, plus the credit granted back early for bytes its consumer still has
    (``window - available + ahead``), and takes all of it out when it is
    forgotten. That is what the peers' data costs this side's memory, however
    many windows are open: a stream its peer leaves idle holds nothing. The
    engine stops reading the connections that have inbound streams while
    :attr:`held` is over :attr:`limit` (this class only counts).
    """

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        #: What :attr:`held` may reach before the engine stops reading streams' connections.
        self.limit = limit
        #: What the streams counting here hold now.
        self.held = 0


class ResultsInHand:
    """What the RESULTs decoded for this side's callers hold, until the callers take them.

    One for all the connections of an endpoint (a server's, or a client's
    connection after connection). A RESULT for an awaited call is decoded
    as soon as it is read, and its caller runs only later (in the next pass
    of the scheduler): the RESULTs read meanwhile, on this connection or
    any other, are all held at once. A megabyte of empty maps holds ~75 MiB
    decoded, so a hundred clients answering a server's pushes that way at
    once held gigabytes (until 2026-12-07: "decoded uncounted, as the
    application asked for them"). So the RESULTs holding over
    :data:`UNCOUNTED_CALL_BYTES` count here from their decoding until their
    callers have taken them; one that does not fit is not decoded past the
    room left (:class:`ResultMustWait`), and its connection reads on once
    the results in hand have been taken, which their callers do in their
    next step. What the results in hand hold is so at most
    :data:`RESULTS_IN_HAND_BYTES`, or one larger result, plus what the
    uncounted ones hold. What a caller does with its result after taking it
    is the application's.
    """

    __slots__ = ("held",)

    def __init__(self) -> None:
        #: What the counted results not yet taken by their callers hold.
        self.held = 0

    def room(self) -> int | None:
        """What a result may hold decoded and be let in now (None: any size,
        while nothing is held); never under :data:`UNCOUNTED_CALL_BYTES`,
        which a result holds uncounted."""
        held = self.held
        if not held:
            return None
        return max(RESULTS_IN_HAND_BYTES - held, UNCOUNTED_CALL_BYTES)

    def take(self, size: int) -> None:
        """A result holding ``size`` bytes decoded was handed to its caller."""
        self.held += size

    def release(self, size: int) -> None:
        """The caller of a result that held ``size`` bytes has taken it."""
        self.held -= size


class CallMemory:
    """What the large calls and queued messages of many connections hold decoded.

    One for all the connections of a server (``server_call_budget``): each
    connection's CALLs holding over :data:`UNCOUNTED_CALL_BYTES` decoded
    (``codec.unpack_sized``'s bound) count here what they hold from
    their admission until they finish, and the engine counts here the
    messages its message task has queued or is handling. Each connection's
    own share is bounded apart (:data:`LARGE_CALL_BYTES`, the engine's message
    queue); this bounds all of them together, whatever the number of
    connections. A large call that does not fit is refused (``overloaded``),
    unless the whole server holds nothing, so that a lone call of any size
    still runs. A message that does not fit waits, its connection unread
    (the engine's ``_queue_message``), except that a connection's first
    queued message, and one more while answers of its peer's are awaited,
    are let in past the limit, into the overdraft (:meth:`admits_overdraft`):
    waiting could hold up what the connection's own handlers wait for. So
    the server holds at most twice the limit plus what one connection holds
    itself (its own bounds: large calls, 32 MiB or one larger call, and
    messages, 32 MiB or one larger message, each up to 72 times the largest
    frame by the count). Each user's connections count here through
    that user's :class:`CallShare`.
    """

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        #: What :attr:`held` may reach (see :meth:`admits`).
        self.limit = limit
        #: What the calls and messages counting here hold now.
        self.held = 0

    def admits(self, size: int) -> bool:
        """Whether ``size`` more bytes fit (always, while nothing is held)."""
        held = self.held
        return not held or held + size <= self.limit

    def room(self) -> int | None:
        """What a call may hold and fit the limit :meth:`refusal` names first
        (None: none applies, while nothing is held). A call over it is refused,
        and named so; one within it fits this limit, but may not fit one
        behind it (a share's server's)."""
        held = self.held
        return self.limit - held if held else None

    def admits_overdraft(self, size: int, own: int) -> bool:
        """Whether ``size`` more bytes fit the overdraft: up to twice the
        limit, not counting ``own``, what the asking connection holds here
        itself (always, while nothing else is held).

        For the messages the engine lets in past the limit, so that a
        connection's handler waiting for its peer is not held up by what
        only its own end frees. Until 2026-12-07 they had no bound but the
        number of connections: one or two messages each, of up to 72 times
        the largest frame decoded, so 250 connections of one user could
        make the server hold 36 GiB by the count.
        """
        others = self.held - own
        return not others or others + size <= 2 * self.limit

    def take(self, size: int) -> None:
        """A call or message holding ``size`` bytes decoded was let in."""
        self.held += size

    def release(self, size: int) -> None:
        """A call or message that held ``size`` bytes is over."""
        self.held -= size

    def refusal(self, size: int) -> str:
        """What a call of ``size`` bytes that :meth:`admits` refused is told."""
        return SERVER_BUDGET_REFUSAL


class CallShare(CallMemory):
    """One user's part of the server's :class:`CallMemory` (``user_call_budget``).

    What the large calls and queued messages of one user's connections hold
    (one address's, in shared-password mode) counts here and in the server's
    memory at once, and a call or message fits when it fits both. Without
    it one user could hold the whole server's budget, with calls to a
    handler that waits, say, and so keep every other user's large calls
    refused and their messages waiting for as long as it liked; with it a
    user holds at most twice its limit plus what one connection holds
    itself (as the server does: the rules are the same, with this limit).

    The server keeps one per user while any connection of the user's holds
    it (:class:`conduit._call_shares.CallShares`).
    """

    __slots__ = ("__weakref__", "server")

    def __init__(self, limit: int, server: CallMemory) -> None:
        super().__init__(limit)
        #: The server's memory, which counts what this share does.
        self.server = server

    def admits(self, size: int) -> bool:
        """Whether ``size`` more bytes fit both this share (always, while it
        holds nothing) and the server's memory."""
        held = self.held
        return (not held or held + size <= self.limit) and self.server.admits(size)

    def room(self) -> int | None:
        """This share's room while it holds something (:meth:`refusal` names
        it first), else the server's (see :meth:`CallMemory.room`)."""
        held = self.held
        return self.limit - held if held else self.server.room()

    def admits_overdraft(self, size: int, own: int) -> bool:
        """Whether ``size`` more bytes fit the overdraft of both this share
        and the server's memory (see :meth:`CallMemory.admits_overdraft`)."""
        others = self.held - own
        return (not others or others + size <= 2 * self.limit) and self.server.admits_overdraft(
            size, own
        )

    def take(self, size: int) -> None:
        """A call or message holding ``size`` bytes decoded was let in."""
        self.held += size
        self.server.take(size)

    def release(self, size: int) -> None:
        """A call or message that held ``size`` bytes is over."""
        self.held -= size
        self.server.release(size)

    def refusal(self, size: int) -> str:
        """The user's own refusal when its share is what is full, else the server's."""
        held = self.held
        if held and held + size > self.limit:
            return USER_BUDGET_REFUSAL
        return SERVER_BUDGET_REFUSAL


def _held(view: memoryview) -> int:
    """Bytes of the buffer ``view`` keeps alive (its record, or the mapping it was opened in)."""
    # bytes (a small record), an mmap (a bulk one): both sized.
    return len(cast("Sized", view.obj))


class InboundStream:
    """The credit and buffer of a stream the peer sends on.

    The machine calls :meth:`on_data` for each DATA frame; the consumer takes
    the chunks with :meth:`take` and hands credit back with :meth:`credit_to_return`.
    """

    def __init__(self, stream_id: int, window: int, memory: ReceiveMemory | None = None) -> None:
        self.stream_id = stream_id
        self.window = window
        self.available = window  # credit the peer still holds
        #: Where this stream counts what it holds, until it is forgotten (see
        #: :class:`ReceiveMemory`): every change of ``available`` or ``ahead``
        #: below moves its ``held`` by as much.
        self.memory = memory
        self.chunks: deque[Buffer] = deque()
        self.taken_cost = 0  # consumed but not yet granted back
        # Credit granted back for chunks the consumer still holds (returned
        # ahead of their use): counted against the connection's receive budget.
        self.ahead = 0
        self.pending_cost = 0  # handed to the consumer by the last take()
        self.buffered_cost = 0
        self.trailer: bytes | None = None
        self.error: BaseException | None = None
        self.bytes_received = 0

    @property
    def finished(self) -> bool:
        """True once the END frame has arrived."""
        return self.trailer is not None

    def on_data(self, payload: Buffer, flags: int) -> None:
        """Account for a DATA frame and buffer its payload; refuse one beyond the credit."""
        if self.trailer is not None:
            raise RemoteProtocolError(f"data after the end of stream {self.stream_id}")
        cost = len(payload) + FRAME_COST
        if cost > self.available:
            raise RemoteProtocolError(
                f"peer exceeded the credit window on stream {self.stream_id} "
                f"({cost} bytes with {self.available} granted)"
            )
        self.available -= cost
        if self.memory is not None:
            self.memory.held += cost
        self.buffered_cost += cost
        if flags & FLAG_END:
            self.trailer = bytes(payload)
        else:
            if type(payload) is memoryview and len(payload) * PIN_RATIO < _held(payload):
                payload = bytes(payload)
            self.chunks.append(payload)
            self.bytes_received += len(payload)

    def on_data_run(self, payloads: list[memoryview], size: int) -> None:
        """Account for a run of DATA frames (none the END) at once; refuse it beyond the credit.

        The same checks as :meth:`on_data` frame by frame: a run that the
        credit does not cover is refused whole, as its first uncovered frame
        would have been (either way the connection is over).
        """
        if self.trailer is not None:
            raise RemoteProtocolError(f"data after the end of stream {self.stream_id}")
        cost = size + len(payloads) * FRAME_COST
        if cost > self.available:
            raise RemoteProtocolError(
                f"peer exceeded the credit window on stream {self.stream_id} "
                f"({cost} bytes in {len(payloads)} frames with {self.available} granted)"
            )
        self.available -= cost
        if self.memory is not None:
            self.memory.held += cost
        self.buffered_cost += cost
        self.bytes_received += size
        if not payloads:
            return
        kept: Sequence[Buffer]
        if min(map(len, payloads)) >= VIEW_MIN:  # bulk data: every frame a view
            viewed, kept = size, payloads
        else:
            viewed = size - sum(len(payload) for payload in payloads if len(payload) < VIEW_MIN)
            kept = [payload if len(payload) >= VIEW_MIN else bytes(payload) for payload in payloads]
        # What is kept as views must be at least half the record, or all is copied.
        if viewed * PIN_RATIO < _held(payloads[0]):
            self.chunks.extend(bytes(payload) for payload in payloads)
        else:
            self.chunks.extend(kept)

    def fail(self, exc: BaseException) -> None:
        """End the stream with an error (reset by the peer, or connection lost)."""
        if self.error is None and self.trailer is None:
            self.error = exc

    def consumed(self) -> None:
        """The chunks of the last :meth:`take` were used up: their credit may return."""
        self.taken_cost += self.pending_cost
        self.pending_cost = 0

    def take(self) -> tuple[list[Buffer], bytes | None]:
        """Every buffered chunk, and the trailer once the stream has ended."""
        chunks = list(self.chunks)
        self.chunks.clear()
        self.pending_cost = self.buffered_cost
        self.buffered_cost = 0
        return chunks, self.trailer

    def credit_to_return(self, *, force: bool) -> int:
        """Credit to grant the peer now (0 for none); counted as granted.

        Without ``force``, credit goes back in quarter-window steps, so a fast
        stream costs one CREDIT frame per quarter window, not one per chunk.
        """
        amount = self.taken_cost
        if amount and self.trailer is None and (force or amount >= self.window // 4):
            self.taken_cost = 0
            self.available += amount
            if self.memory is not None:
                self.memory.held -= amount
            return amount
        return 0

    def grow(self, amount: int) -> None:
        """Widen the window by ``amount``, granted to the peer as credit by the caller."""
        self.window += amount
        self.available += amount

    def forgotten(self) -> None:
        """The connection no longer holds this stream: what it counted leaves its memory."""
        memory, self.memory = self.memory, None
        if memory is not None:
            memory.held -= self.window - self.available + self.ahead


class OutboundStream:
    """The credit of a stream this side sends on."""

    def __init__(self, stream_id: int, window: int, max_payload: int) -> None:
        self.stream_id = stream_id
        self.credit = window
        # A frame must fit in the window even when all of it is free.
        self.max_payload = max(1, min(max_payload, window - FRAME_COST))
        self.error: BaseException | None = None
        self.bytes_sent = 0
        self.finished = False

    def grant(self, increment: int) -> None:
        """Credit arrived from the peer."""
        self.credit += increment

    def fail(self, exc: BaseException) -> None:
        """The peer reset the stream or the connection ended."""
        if self.error is None:
            self.error = exc


#: What :meth:`ConnectionState.receive_frame` returns. ``InboundStream`` is the
#: event for DATA ("these bytes arrived"), ``OutboundStream`` for CREDIT.
Event = (
    CallReceived
    | CallRefused
    | CallCancelled
    | ResultReceived
    | ResultMustWait
    | MessageReceived
    | StreamWasReset
    | PingReceived
    | PongReceived
    | GoodbyeReceived
    | InboundStream
    | OutboundStream
)


IS = TypeVar("IS", bound=InboundStream)
OS = TypeVar("OS", bound=OutboundStream)


# ---------------------------------------------------------------------- machine


class ConnectionState:
    """The sans-IO state of one authenticated connection (see the module docstring)."""

    def __init__(
        self,
        *,
        is_client: bool,
        receive_window: int,
        peer_receive_window: int,
        peer_max_frame_size: int,
        max_concurrent_calls: int,
        max_streams: int | None = None,
        receive_budget: int | None = None,
        call_memory: CallMemory | None = None,
        results_in_hand: ResultsInHand | None = None,
    ) -> None:
        self.is_client = is_client
        self.receive_window = receive_window
        #: Data streams (both directions) open at once; None for no limit.
        self.max_streams = max_streams
        #: Bytes of credit all inbound streams together may have outstanding
        #: (the sum of their windows); None for no limit. This, not the window
        #: alone, bounds the memory a peer can make this side buffer.
        self.receive_budget = receive_budget
        self.peer_receive_window = peer_receive_window
        self.peer_max_frame_size = peer_max_frame_size
        self.max_concurrent_calls = max_concurrent_calls
        self.phase = Phase.OPEN
        self.close_reason: str | None = None
        #: The results of incoming calls answered ``bad_result`` because they
        #: could not be encoded (call id, why), for the engine to log and
        #: take out (the last 16 at most).
        self.unsendable_results: deque[tuple[int, str]] = deque(maxlen=16)
        #: The ids of this side's calls still awaiting their result, which a
        #: call id must not reuse once the ids start again at 1, and whose
        #: RESULTs are the only ones decoded: one for another id (a call
        #: given up on, or never made) is dropped unread, so a peer cannot
        #: make this side decode what nobody waits for. The engine sets it to
        #: its table of pending calls (``PendingCalls`` does, a view, not a
        #: copy: nothing per call). None, for a machine driven alone: no id
        #: is skipped, and every RESULT is decoded and reported.
        self.calls_in_use: Collection[int] | None = None
        # The next call ids, and the first of them that may be in use (once
        # they wrapped): start_call's common case is next() and one comparison.
        self._call_ids = itertools.count(1)
        self._call_id_end = MAX_CALL_ID + 1
        self._ping_ids = itertools.count(1)
        #: The nonce of the last PING made (0: none yet).
        self.last_ping = 0
        #: Frames received other than PINGs. A peer that sends nothing but PINGs
        #: for long, answering none of ours with a PONG, reads nothing of what
        #: we send (the engine's heartbeat ends it); one that sends anything
        #: else may have our PONG queued behind it on a slow link.
        self.frames_besides_pings = 0
        self._active_calls: set[int] = set()  # incoming calls queued or running
        # Those of them counted (holding over UNCOUNTED_CALL_BYTES): what each holds decoded
        # (codec.unpack_sized's bound).
        self._large_calls: dict[int, int] = {}
        self._large_call_bytes = 0
        #: Where the large calls count what they hold, beside this
        #: connection's own count, until they finish (see :class:`CallMemory`);
        #: None for no bound beyond the connection's.
        self.call_memory = call_memory
        #: Where the large RESULTs count what they hold until their callers
        #: take them (the engine releases it then); a machine of its own if
        #: none is given.
        self.results_in_hand = ResultsInHand() if results_in_hand is None else results_in_hand
        # Stream ids are allocated by the receiving side: odd by clients, even
        # by servers, so the two never collide.
        self._stream_ids = itertools.count(1 if is_client else 2, 2)
        self._last_stream_id = 0
        self.incoming: dict[int, InboundStream] = {}
        self.outgoing: dict[int, OutboundStream] = {}
        self._early_resets: dict[int, StreamReset] = {}

    # ------------------------------------------------------------ closing

    @property
    def is_open(self) -> bool:
        """Whether new calls, messages and streams may start."""
        return self.phase is Phase.OPEN

    def goodbye(self, reason: str, *, going_away: bool = False) -> bytes | None:
        """Start an orderly close: the GOODBYE frame to send, or None if already closing.

        ``going_away``: this side is going away (shutting down), rather than
        ending this one connection (see :class:`Goodbye`).
        """
        if self.phase is not Phase.OPEN:
            return None
        self.phase = Phase.CLOSING
        self.close_reason = reason
        return encode_frame(FrameKind.GOODBYE, 0, Goodbye(reason, going_away))

    def close(self, reason: str) -> None:
        """The connection is over; the first reason given (or GOODBYE's) sticks."""
        if self.close_reason is None:
            self.close_reason = reason
        self.phase = Phase.CLOSED

    def drop_streams(self) -> list[InboundStream | OutboundStream]:
        """The connection ended: forget every open stream and incoming call; return the streams."""
        streams: list[InboundStream | OutboundStream] = [*self.incoming.values()]
        for stream in self.incoming.values():
            stream.forgotten()
        streams.extend(self.outgoing.values())
        self.incoming.clear()
        self.outgoing.clear()
        self._active_calls.clear()
        return streams

    @property
    def large_call_bytes(self) -> int:
        """What this connection's large calls queued or running hold decoded
        (counted in :attr:`call_memory` too)."""
        return self._large_call_bytes

    def release_calls(self) -> None:
        """The engine has ended: no handler runs any more, so what the large
        calls still counted (those whose end :meth:`call_finished` was not
        told) leaves :attr:`call_memory`. Until then a handler still running
        after the connection ended (a cancelled one finishing) holds its
        arguments, and they count."""
        memory = self.call_memory
        if memory is not None:
            memory.release(self._large_call_bytes)
        self._large_calls.clear()
        self._large_call_bytes = 0

    # ------------------------------------------------------------ receiving

    def receive_frame(self, frame: Frame) -> Event | None:
        """Apply one frame from the peer; return what the engine must act on, if anything.

        Nothing once the connection is closed: a record may carry frames behind
        the peer's GOODBYE (or behind what closed it here), and a CALL among
        them would start a handler in a connection that is ending. Nor for a
        CALL once closing: the peer sent it before our GOODBYE reached it, and
        that GOODBYE, which follows, fails the call there (``ConnectionClosed``:
        it never ran). A handler that closes its own connection may hold the
        GOODBYE until its answer is sent; calls started meanwhile would keep
        the connection serving for as long.
        """
        phase = self.phase
        if phase is _CLOSED:
            return None
        self.frames_besides_pings += 1  # taken back below for a PING
        kind = frame.kind
        if kind is _DATA:  # first: it is most of the traffic
            stream = self.incoming.get(frame.stream_id)
            if stream is None:
                if self._is_our_closed_stream(frame.stream_id):
                    return None  # in flight when we closed it; harmless
                raise RemoteProtocolError(
                    f"data for stream {frame.stream_id}, which was never opened"
                )
            if type(frame) is DataRun:  # a record's run of frames (data_runs.py)
                stream.on_data_run(frame.payloads, frame.size)
            else:
                stream.on_data(frame.payload, frame.flags)
            return stream
        if kind is _CALL:
            if phase is not _OPEN:
                return None
            payload = frame.payload
            if len(payload) > COUNTED_BODY:
                return self._sized_call(frame.stream_id, payload)
            method, args = decode_call(payload)
            call_id = frame.stream_id
            active = self._active_calls
            # The common case here, the rest in _refuse_call: one Python call less per call.
            if call_id not in active and len(active) < self.max_concurrent_calls:
                active.add(call_id)
                return CallReceived(call_id, method, args)
            return self._refuse_call(call_id)
        if kind is _RESULT:
            awaited = self.calls_in_use
            if awaited is not None and frame.stream_id not in awaited:
                # Given up on (timed out, cancelled) or never made: nobody
                # reads it, so it is not decoded (a megabyte of empty maps
                # takes ~0.1 s and ~75 MiB to decode).
                return None
            payload = frame.payload
            if len(payload) <= UNCOUNTABLE_RESULT:
                return ResultReceived(frame.stream_id, decode_result(payload))
            return self._sized_result(frame.stream_id, payload)
        if kind is FrameKind.CREDIT:
            return self._on_credit(frame.stream_id, decode_body(frame, Credit))
        if kind is FrameKind.MESSAGE:
            # Counted whatever its size: the engine queues messages by what
            # they hold decoded, and 4 KiB of empty maps holds 288 KB (a
            # queue counted by the bytes on the wire held 70 times its bound).
            message, held = decode_message_sized(frame.payload)
            return MessageReceived(message.event, message.data, held)
        if kind is FrameKind.CANCEL:
            decode_body(frame, Cancel)
            if frame.stream_id in self._active_calls:
                return CallCancelled(frame.stream_id)
            return None  # already answered
        if kind is FrameKind.RESET:
            return self._on_reset(frame.stream_id, decode_body(frame, Reset))
        if kind is FrameKind.PING:
            self.frames_besides_pings -= 1
            ping = decode_body(frame, Ping)
            return PingReceived(ping.nonce, self.encode(FrameKind.PONG, 0, Pong(ping.nonce)))
        if kind is FrameKind.PONG:
            return PongReceived(decode_body(frame, Pong).nonce)
        if kind is FrameKind.GOODBYE:
            goodbye = decode_body(frame, Goodbye)
            reason = peer_text(goodbye.reason)
            self.close(f"peer closed the connection: {reason}")
            return GoodbyeReceived(reason, goodbye.going_away)
        raise RemoteProtocolError(f"{kind.name} frame is not allowed after the handshake")

    def _sized_result(
        self, call_id: int, payload: bytes | memoryview
    ) -> ResultReceived | ResultMustWait:
        """A RESULT larger than :data:`UNCOUNTABLE_RESULT`, decoded counting what it
        holds: one holding over :data:`UNCOUNTED_CALL_BYTES` is counted in
        :attr:`results_in_hand` (the engine releases it once its caller has
        taken it), or, past the room left there, not decoded further
        (:class:`ResultMustWait`)."""
        hand = self.results_in_hand
        try:
            result, size = decode_result_sized(payload, hand.room())
        except HoldsTooMuch:
            return ResultMustWait(call_id)
        if size <= UNCOUNTED_CALL_BYTES:
            return ResultReceived(call_id, result)
        hand.take(size)
        return ResultReceived(call_id, result, size)

    def _refuse_call(self, call_id: int, error: str | None = None) -> CallRefused:
        """A CALL whose id is in use (a protocol error), over the concurrency
        limit, or (``error``) over the large calls' bytes."""
        if call_id in self._active_calls:
            raise RemoteProtocolError(f"call id {call_id} is already in use")
        refusal = Result(
            False,
            error=error or f"too many concurrent calls (limit {self.max_concurrent_calls})",
            code="overloaded",
        )
        return CallRefused(call_id, encode_frame(FrameKind.RESULT, call_id, refusal))

    def _sized_call(self, call_id: int, payload: bytes | memoryview) -> CallReceived | CallRefused:
        """A CALL larger than :data:`COUNTED_BODY`, decoded counting what it
        holds (``codec.unpack_sized``'s bound). Up to :data:`UNCOUNTED_CALL_BYTES`
        it is admitted as a small one; a larger (a large call) while what the
        large calls queued or running hold stays within :data:`LARGE_CALL_BYTES`
        (a lone one always is), and within :attr:`call_memory`'s limit for
        those of all the connections sharing it."""
        held = self._large_call_bytes
        memory = self.call_memory
        try:
            method, args, size = decode_call_sized(payload, self._large_call_room(held, memory))
        except HoldsTooMuch as exc:
            # It holds more than would be admitted: refused without decoding the rest.
            refused = self._large_call_refusal(call_id, held, exc.held, memory)
            assert refused is not None  # (_large_call_room's limit is what it refuses past)
            return refused
        active = self._active_calls
        if size <= UNCOUNTED_CALL_BYTES:
            if call_id not in active and len(active) < self.max_concurrent_calls:
                active.add(call_id)
                return CallReceived(call_id, method, args)
            return self._refuse_call(call_id)
        refused = self._large_call_refusal(call_id, held, size, memory)
        if refused is not None:
            return refused
        if call_id in active or len(active) >= self.max_concurrent_calls:
            return self._refuse_call(call_id)
        active.add(call_id)
        self._large_calls[call_id] = size
        self._large_call_bytes = held + size
        if memory is not None:
            memory.take(size)
        return CallReceived(call_id, method, args)

    def _large_call_refusal(
        self, call_id: int, held: int, size: int, memory: CallMemory | None
    ) -> CallRefused | None:
        """The refusal of a large call holding ``size`` bytes decoded, if
        what the others hold leaves it no room (None: it fits)."""
        if held and held + size > LARGE_CALL_BYTES:
            # Dropped at once (the peer hears why): the arguments held by the
            # calls already running are what the limit is about.
            return self._refuse_call(
                call_id,
                f"calls holding {held} bytes of arguments are running (limit "
                f"{LARGE_CALL_BYTES}); try again when they are done",
            )
        if memory is not None and not memory.admits(size):
            # The user's calls and messages hold its share, or everyone's hold
            # the server's. (How much is not said: that is other users' business.)
            return self._refuse_call(call_id, memory.refusal(size))
        return None

    @staticmethod
    def _large_call_room(held: int, memory: CallMemory | None) -> int | None:
        """What a call may hold decoded before :meth:`_large_call_refusal`'s
        first limit that applies refuses it (None: none applies), so that
        decoding one that will be refused stops there. Not the smallest of the
        limits: a call refused by a later one then would be told the wrong
        reason, and the transfer code waits differently for each (the
        connection's own calls, or the call memory). Never under
        :data:`UNCOUNTED_CALL_BYTES`: up to that, a call is admitted whatever
        the others hold."""
        if held:
            room: int | None = LARGE_CALL_BYTES - held
        else:
            room = None if memory is None else memory.room()
        return None if room is None else max(room, UNCOUNTED_CALL_BYTES)

    def _release_large_call(self, call_id: int) -> None:
        size = self._large_calls.pop(call_id, 0)
        self._large_call_bytes -= size
        memory = self.call_memory
        if memory is not None and size:
            memory.release(size)

    def _on_credit(self, stream_id: int, credit: Credit) -> OutboundStream | None:
        if not 0 < credit.increment <= 1 << 31:
            raise RemoteProtocolError(f"invalid credit increment {credit.increment}")
        stream = self.outgoing.get(stream_id)
        if stream is not None:
            stream.grant(credit.increment)
        return stream

    def _on_reset(self, stream_id: int, reset: Reset) -> StreamWasReset | None:
        error = StreamReset(
            f"peer aborted the stream: {peer_text(reset.reason)}", code=peer_text(reset.code)
        )
        incoming = self.incoming.pop(stream_id, None)
        if incoming is not None:
            incoming.forgotten()
        outgoing = self.outgoing.pop(stream_id, None)
        if incoming is None and outgoing is None:
            if not self._is_our_stream_id(stream_id):
                # The peer gave up on a stream we have not started sending on
                # yet (e.g. its request timed out while we prepared): remember,
                # so we never start. Bounded: the oldest entries go first.
                early = self._early_resets
                early[stream_id] = error
                while len(early) > MAX_EARLY_RESETS:
                    del early[next(iter(early))]
            return None
        return StreamWasReset(error, incoming, outgoing)

    def _is_our_stream_id(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self.is_client

    def _is_our_closed_stream(self, stream_id: int) -> bool:
        return self._is_our_stream_id(stream_id) and 0 < stream_id <= self._last_stream_id

    # ------------------------------------------------------------ calls

    def start_call(self, method: str, args: dict[str, Any]) -> tuple[int, bytes]:
        """Allocate a call id; return it with the CALL frame to send.

        Ids run from 1 to :data:`MAX_CALL_ID` (the header holds 32 bits), then
        start again at 1, skipping ids in :attr:`calls_in_use`: an id is never
        reused while its call awaits its result. A ``method`` that is no str
        raises ``TypeError``: the peer would take the CALL for a protocol
        error and end the connection.
        """
        if type(method) is not str and not isinstance(method, str):
            raise TypeError(f"a method name is a str, not {type(method).__name__}")
        call_id = next(self._call_ids)
        if call_id >= self._call_id_end:  # past the last id, or at one that may be in use
            call_id = self._free_call_id(call_id)
        frame = encode_call(call_id, method, args)
        if len(frame) - HEADER_SIZE <= self.peer_max_frame_size:  # _checked's test, inline
            return call_id, frame
        return call_id, self._checked(_CALL, frame)

    def _free_call_id(self, call_id: int) -> int:
        """The first call id from ``call_id`` on (wrapping past :data:`MAX_CALL_ID`
        to 1) that is not in :attr:`calls_in_use`; the counter goes on after it.

        Until the next id in use above it, the ids that follow are free: the
        ids added to :attr:`calls_in_use` meanwhile are the ones handed out,
        all below the counter. So this runs once at each wrap and once per
        call outstanding across it, not per call.
        """
        in_use = self.calls_in_use or ()
        if len(in_use) >= MAX_CALL_ID:
            raise LocalProtocolError("every call id is in use")
        while True:
            if call_id > MAX_CALL_ID:
                call_id = 1
            if call_id not in in_use:
                break
            call_id += 1
        self._call_id_end = min(
            (other for other in in_use if other > call_id), default=MAX_CALL_ID + 1
        )
        self._call_ids = itertools.count(call_id + 1)
        return call_id

    def cancel_call(self, call_id: int) -> bytes | None:
        """The CANCEL frame for a call we gave up on (None once closing)."""
        if self.phase is not Phase.OPEN:
            return None
        return encode_frame(FrameKind.CANCEL, call_id, Cancel())

    def call_finished(self, call_id: int) -> None:
        """An incoming call is no longer queued or running: its id is free again."""
        self._active_calls.discard(call_id)
        if self._large_calls:
            self._release_large_call(call_id)

    def result_frame(self, call_id: int, result: Result) -> bytes:
        """The RESULT frame for an incoming call; a result too large to send becomes an error."""
        try:
            frame = encode_result(call_id, result)
        except LocalProtocolError as exc:
            # The handler's value, which msgpack refuses: noted for the engine
            # to log. Not one larger than the peer's frames (below), which the
            # peer chose at its handshake and could make every result be.
            self.unsendable_results.append((call_id, str(exc)))
            return self._result_refused(call_id, exc)
        if len(frame) - HEADER_SIZE <= self.peer_max_frame_size:  # _checked's test, inline
            return frame
        try:
            return self._checked(_RESULT, frame)
        except LocalProtocolError as exc:
            return self._result_refused(call_id, exc)

    def _result_refused(self, call_id: int, why: LocalProtocolError) -> bytes:
        refusal = Result(
            False, error=f"the handler's result cannot be sent: {why}", code="bad_result"
        )
        return self.encode(FrameKind.RESULT, call_id, refusal)

    def finish_value(self, call_id: int, value: Any) -> bytes:
        """An incoming call returned ``value``: free its id (:meth:`call_finished`)
        and return its RESULT frame (:meth:`value_frame`).

        The two in one, inline: this runs once per call the peer makes.
        """
        self._active_calls.discard(call_id)
        if self._large_calls:
            self._release_large_call(call_id)
        try:
            frame = encode_value(call_id, value)
        except LocalProtocolError:
            pass
        else:
            if len(frame) - HEADER_SIZE <= self.peer_max_frame_size:
                return frame
        return self.result_frame(call_id, Result(True, value))

    def value_frame(self, call_id: int, value: Any) -> bytes:
        """``result_frame(call_id, Result(True, value))``, without building the Result."""
        try:
            frame = encode_value(call_id, value)
        except LocalProtocolError:
            pass
        else:
            if len(frame) - HEADER_SIZE <= self.peer_max_frame_size:
                return frame
        # Unsendable (rare): result_frame encodes it again and makes the refusal.
        return self.result_frame(call_id, Result(True, value))

    def message_frame(self, event: str, data: Any) -> bytes:
        """The MESSAGE frame of a one-way message."""
        return self.encode(FrameKind.MESSAGE, 0, Message(event, data))

    def ping(self) -> bytes:
        """A PING frame with a fresh nonce (:attr:`last_ping`)."""
        self.last_ping = next(self._ping_ids)
        return encode_frame(FrameKind.PING, 0, Ping(self.last_ping))

    # ------------------------------------------------------------ streams

    def open_inbound(self, make: Callable[[int, int], IS]) -> IS:
        """Allocate a stream id the peer may send on; ``make(stream_id, window)`` builds it.

        Raises ``RPCError("too_many_streams")`` when the stream limit is reached,
        when one more window would take the outstanding credit of all
        inbound streams beyond :attr:`receive_budget`, or when this side's
        2**31 stream ids are used up (they do not wrap, unlike call ids).
        """
        self._check_stream_count()
        budget = self.receive_budget
        if budget is not None:
            committed = self.receive_committed()
            if committed + self.receive_window > budget:
                raise RPCError(
                    f"too many data streams on this connection: {len(self.incoming)} inbound "
                    f"streams hold {committed} of the {budget} bytes of receive budget",
                    "too_many_streams",
                )
        stream_id = next(self._stream_ids)
        if stream_id > MAX_STREAM_ID:
            # Stream ids do not wrap: the peer may still hold a stream id we
            # closed (data in flight, an early reset it remembers), and
            # _is_our_closed_stream relies on them rising.
            raise RPCError(
                "this connection has used all of its 2**31 data stream ids; "
                "reconnect to open more streams",
                "too_many_streams",
            )
        self._last_stream_id = stream_id
        stream = make(stream_id, self.receive_window)
        self.incoming[stream_id] = stream
        return stream

    def receive_committed(self) -> int:
        """What the inbound streams may hold: their windows, and the credit
        they returned ahead for chunks their consumers still hold."""
        return sum(stream.window + stream.ahead for stream in self.incoming.values())

    def open_outbound(self, stream_id: int, make: Callable[[int, int, int], OS]) -> OS:
        """Start sending on a stream id the peer allocated for us.

        ``make(stream_id, window, max_payload)`` builds it. Raises the peer's
        :class:`StreamReset` if it already gave up on that stream.

        The id must be one the peer allocates (see :meth:`check_peer_stream_id`).
        """
        self.check_peer_stream_id(stream_id)
        if stream_id in self.outgoing:
            raise LocalProtocolError(f"stream {stream_id} is already being sent")
        early_reset = self._early_resets.pop(stream_id, None)
        if early_reset is not None:
            try:
                raise early_reset
            finally:
                # This frame is in its traceback: it must not hold it too (a
                # reference cycle through the caller's frames otherwise).
                del early_reset
        stream = make(stream_id, self.peer_receive_window, self.peer_max_frame_size)
        self.outgoing[stream_id] = stream
        return stream

    def check_peer_stream_id(self, stream_id: int) -> None:
        """``RPCError`` (``invalid_arguments``) unless ``stream_id`` is one the peer
        may allocate for us to send on: in range, and of its parity (odd from a
        client, even from a server). One of ours would share its id with a
        stream we receive on, and a RESET of either would end both (a fuzzing
        review, 2026-12-07). Asked first by a call that names the id (a
        download), before it commits anything to it."""
        if not is_valid_stream_id(stream_id):
            raise RPCError(f"invalid stream id {stream_id}", "invalid_arguments")
        if self._is_our_stream_id(stream_id):
            side = "server" if self.is_client else "client"
            raise RPCError(
                f"invalid stream id {stream_id}: a {side} allocates "
                f"{'even' if side == 'server' else 'odd'} ids",
                "invalid_arguments",
            )

    def _check_stream_count(self) -> None:
        # Outbound streams count too, but are only refused here, when this side
        # opens an inbound one: the transfer layer caps what it sends with its
        # per-connection slots, before it commits to a stream the peer waits on.
        limit = self.max_streams
        if limit is not None and len(self.incoming) + len(self.outgoing) >= limit:
            raise RPCError(
                f"too many data streams on this connection (limit {limit})", "too_many_streams"
            )

    def close_stream(
        self, stream: InboundStream | OutboundStream, reset: tuple[str, str] | None
    ) -> bytes | None:
        """Forget a stream; with ``reset=(code, reason)``, the RESET frame to send."""
        if isinstance(stream, InboundStream):
            if self.incoming.pop(stream.stream_id, None) is stream:
                stream.forgotten()
        else:
            self.outgoing.pop(stream.stream_id, None)
        if reset is None or self.phase is not Phase.OPEN:
            return None
        code, reason = reset
        try:
            return self.encode(FrameKind.RESET, stream.stream_id, Reset(code, reason))
        except LocalProtocolError:
            return None  # a reason too long to send: the stream is forgotten anyway

    def credit_frame(self, stream_id: int, amount: int) -> bytes | None:
        """The CREDIT frame returning ``amount`` on an inbound stream we still hold."""
        if self.phase is not Phase.OPEN or stream_id not in self.incoming:
            return None
        return encode_frame(FrameKind.CREDIT, stream_id, Credit(amount))

    # ------------------------------------------------------------ encoding

    def encode(self, kind: FrameKind, stream_id: int, body: Body) -> bytes:
        """Encode a control frame, refusing one the peer would not accept.

        Checked here, where the caller can be told, rather than in the writer
        task, where an oversized frame could only kill the connection.
        """
        return self._checked(kind, encode_frame(kind, stream_id, body))

    def _checked(self, kind: FrameKind, frame: bytes) -> bytes:
        limit = self.peer_max_frame_size
        if len(frame) - HEADER_SIZE > limit:
            raise LocalProtocolError(
                f"{kind.name} of {len(frame) - HEADER_SIZE} bytes exceeds the peer's "
                f"max_frame_size ({limit}); send large data as a file or stream"
            )
        return frame


__all__ = [
    "MAX_CALL_ID",
    "MAX_EARLY_RESETS",
    "MAX_PEER_TEXT",
    "RESULTS_IN_HAND_BYTES",
    "SERVER_BUDGET_REFUSAL",
    "UNCOUNTABLE_RESULT",
    "USER_BUDGET_REFUSAL",
    "CallCancelled",
    "CallMemory",
    "CallReceived",
    "CallRefused",
    "CallShare",
    "ConnectionState",
    "Event",
    "GoodbyeReceived",
    "InboundStream",
    "MessageReceived",
    "OutboundStream",
    "Phase",
    "PingReceived",
    "PongReceived",
    "ReceiveMemory",
    "ResultMustWait",
    "ResultReceived",
    "ResultsInHand",
    "StreamWasReset",
    "peer_text",
]
