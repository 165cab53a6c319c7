"""Data streams with per-stream credit (flow control in the style of HTTP/2): the waiting.

The receiver of a stream grants the sender a window of bytes. The sender spends
it on DATA frames and waits when it runs out; the receiver returns credit only
after its consumer has taken the bytes. So a slow consumer (a slow disk) holds
back only its own stream, and the connection's reader task never blocks: it
can always append to an inbox, because the peer may not send beyond the window.

The counters and their checks are sans-IO
(:class:`~conduit.protocol.connection.InboundStream`,
:class:`~conduit.protocol.connection.OutboundStream`); these subclasses add
what needs Trio: parking the consumer or producer until the state changes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from ._receive_memory import SharedReceiveMemory
from ._stored_errors import detached
from .protocol import FLAG_END, FRAME_COST, HEADER_SIZE, OutFrame
from .protocol.codec import data_header
from .protocol.connection import Buffer, InboundStream, OutboundStream
from .protocol.data_runs import DataRecord
from .protocol.records_io import RECORD_SLACK
from .protocol.window_tuning import WindowTuner


class RoundTrips(Protocol):
    """What a growing window asks its connection about the link's round trip."""

    @property
    def round_trip(self) -> float | None:
        """The smallest round trip measured (a PING to its PONG); None before one."""

    def round_trips_since(self, start: float) -> list[float]:
        """The round trips of the PINGs sent at ``start`` or later."""

    def probe_round_trip(self) -> None:
        """Time a round trip now (a PING), unless one is being timed."""


class IncomingStream(InboundStream):
    """The receiving end of one data stream.

    The connection's reader delivers DATA through its state machine, then calls
    :meth:`wake`; the consumer calls :meth:`receive` until it returns a trailer.
    """

    def __init__(
        self,
        stream_id: int,
        window: int,
        grant: Callable[[int, int], None],
        *,
        max_frame_size: int | None = None,
        room: Callable[[], int] | None = None,
        memory: SharedReceiveMemory | None = None,
        tuner: WindowTuner | None = None,
        round_trips: RoundTrips | None = None,
        growth_reserve: int = 0,
        reading_paused: Callable[[], bool] = lambda: False,
    ) -> None:
        """``max_frame_size``: the largest DATA payload the peer may send us (None: unknown).

        ``room``: how many bytes the connection's receive budget has left beyond
        the windows of its inbound streams and the credit they returned ahead
        (None: no budget); ``receive(ahead=True)`` returns early only what
        leaves a starting window of that room for a stream yet to open.

        ``memory``: the server's receive memory, where the stream counts what
        it holds (None: not counted; see :mod:`conduit._receive_memory`).

        ``tuner`` and ``round_trips`` (the connection, which times the round
        trip): how the window grows where the link's round trip calls for
        more bytes in flight (see :mod:`conduit.protocol.window_tuning`);
        None: it stays at ``window``. It grows only by what leaves
        ``growth_reserve`` of the ``room`` for streams yet to open: windows
        never shrink, so what they took would refuse those streams for as
        long as they last.

        ``reading_paused``: whether the connection has stopped reading its
        socket for now (its receive memory is full, say): no data can come
        then, which says nothing against the sender.
        """
        super().__init__(stream_id, window, memory)
        #: See ``reading_paused`` above.
        self.reading_paused = reading_paused
        self._shared = memory
        self._grant = grant
        self._room = room
        # The window a new stream opens with: the room kept free for one.
        self._opening_window = window
        self._tuner = tuner
        self._round_trips = round_trips
        self._growth_reserve = growth_reserve
        self._wakeup = trio.lowlevel.ParkingLot()
        # Buffered bytes (frame costs included) that wake a waiting consumer:
        # what its receive(at_least=...) asked for.
        self._wake_at = 0
        # The most receive(at_least=...) may wait for. A sender stops only when
        # its credit cannot pay for its next frame, i.e. when more than
        # window - (largest frame + FRAME_COST) bytes are buffered here: a
        # batch no larger than that is always filled (or the stream ends).
        # Unknown frame size: no batching.
        largest = window if max_frame_size is None else max_frame_size + FRAME_COST
        self._batch_limit = min(window // 2, max(0, window - largest))
        # Batches a consumer keeps (receive(keep=True)), oldest first: the
        # credit of each not yet returned, and the credit returned ahead for it.
        self._held: deque[tuple[int, int]] = deque()
        # Seconds between the last three DATA events (two gaps), and when the
        # last came: a consumer waits for the rest of a batch only while data
        # comes closer together than its patience (see receive). Until there
        # are gaps to go by, it waits (they are -inf).
        self._arrival_gap = self._previous_gap = -math.inf
        self._last_arrival = math.inf

    def wake(self) -> None:
        """Data arrived: let the consumer look, once there is as much as it waits for.

        Called for every DATA event (one per record of bulk data): cheap when
        nobody waits, and a consumer waiting for a batch is not woken for
        less (a wake-up it would only answer by parking again). It also notes
        the time since the last event, for :meth:`receive`'s patience.
        """
        now = trio.current_time()
        self._previous_gap, self._arrival_gap = self._arrival_gap, now - self._last_arrival
        self._last_arrival = now
        if self._wakeup and (self.buffered_cost >= self._wake_at or self.trailer is not None):
            self._wakeup.unpark_all()

    def fail(self, exc: BaseException) -> None:
        """End the stream with an error (reset by the peer, or connection lost).

        Kept :func:`~conduit._stored_errors.detached`, and raised as a fresh
        copy each time: a frame that holds this stream must not end up in a
        traceback this stream holds.
        """
        super().fail(detached(exc))
        self._wakeup.unpark_all()

    async def receive(
        self,
        at_least: int = 0,
        *,
        patience: float = 0.0,
        ahead: bool = False,
        keep: bool = False,
    ) -> tuple[list[Buffer], bytes | None]:
        """Wait for data; return every buffered chunk and the trailer once the stream ends.

        With ``at_least`` and ``patience``: once some data is here, wait up to
        ``patience`` seconds more until ``at_least`` bytes (frame costs
        included) are buffered, or the stream ends or fails. A consumer that
        pays a fixed cost per batch (a worker-thread hop per write) then pays
        it less often while data streams in, and a sender that pauses leaves
        its bytes waiting no longer than ``patience``. It waits only while one
        of the last two gaps between DATA events was at most ``patience``:
        over a link slower than that (a record of 1 MiB every 10.5 ms at 100
        MB/s) the wait would run out every time, holding back the credit of
        what arrived for nothing; but a sender that sends its records in
        pairs, a pause between them (its reads set the pace), or one late
        record on a fast link, still has its records batched. ``at_least``
        is capped at half the window, and below what a sender blocked on
        credit may leave unsent, so a sender that keeps sending can always
        fill the batch.
        Calling ``receive`` again tells the stream the previous chunks were
        consumed, which returns their credit to the sender.

        With ``ahead``, the credit of the chunks returned (at most a window)
        goes back at once, before they are consumed: the sender refills the
        window while the consumer writes the batch, instead of the two working
        in turn. The stream then holds at most a window buffered or in flight
        plus a window with the consumer (until its next call), and never more
        than the connection's receive budget has room for beside one more
        stream's window.

        With ``keep``, calling ``receive`` again does not consume the batches
        returned before: the consumer keeps each until it calls
        :meth:`release` for it, oldest first (a consumer whose writer thread
        writes one batch while it takes the next: see
        ``conduit.transfer._write_behind``). The stream then holds at most a
        window and the batches kept. Their credit returned ahead still counts
        against the connection's receive budget until released, so the budget
        bounds them however many a consumer keeps; without ``ahead`` the
        window alone does. The release must not wait for this call: with no
        room for early credit, a sender may be waiting for the credit of the
        batches kept. A call without ``keep`` consumes every batch kept so far.
        """
        if not keep:
            self._consume_all()
        while not self.chunks and self.trailer is None:
            if self.error is not None:
                raise detached(self.error)
            # About to wait: hand back all credit, or the sender could be
            # waiting for credit we are sitting on.
            self._flush_credit(force=True)
            await self._wakeup.park()
        at_least = min(at_least, self._batch_limit)
        if (
            patience > 0
            and self.buffered_cost < at_least
            and min(self._arrival_gap, self._previous_gap) <= patience
            and self.trailer is None
            and self.error is None
        ):
            await self._gather(at_least, patience)
        if self.error is not None and self.trailer is None and not self.chunks:
            raise detached(self.error)
        result = self.take()
        early = self._return_ahead() if ahead and self.trailer is None else 0
        if keep:
            self._held.append((self.pending_cost, early))
            self.pending_cost = 0
        self._flush_credit(force=False)
        return result

    def release(self) -> None:
        """The oldest batch a ``receive(keep=True)`` returned was used up: its credit may return.

        All of it at once, since its consumer may be parked waiting for data
        (a ``receive`` would otherwise return it in quarter-window steps). A
        no-op when no batch is kept.
        """
        if self._held:
            rest, early = self._held.popleft()
            self.taken_cost += rest
            self._less_ahead(early)
            self._flush_credit(force=True)

    def _consume_all(self) -> None:
        while self._held:
            self.taken_cost += self._held.popleft()[0]
        self.consumed()
        self._less_ahead(self.ahead)

    def _less_ahead(self, amount: int) -> None:
        # Bytes whose credit went back early are used up: no longer held.
        self.ahead -= amount
        if self.memory is not None:
            self.memory.held -= amount

    def _return_ahead(self) -> int:
        # The credit of the whole batch just taken, which the window bounds
        # (at most a window: the stream then holds a window buffered or in
        # flight and the batches its consumer keeps). Only the first
        # is ahead of an RPC on the connection, so this, unlike a larger
        # window, leaves the bound on what a call behind a transfer waits for
        # where it was; half a window left the sender waiting for credit
        # whenever the consumer took more (docs/benchmark-journal.md, "Eleventh round
        # (wave 15, bulk)"). And only within what the connection's receive
        # budget has left beyond one more window: the peer can never make the
        # connection buffer more than the budget (a full connection simply
        # gets no early credit), and early credit never takes the room a new
        # stream needs (one is refused only when the windows alone fill it).
        early = self.pending_cost
        if self._room is not None:
            # A grown window's batches leave the room its growth left (see _widen).
            keep = self._opening_window
            if self.window > self._opening_window:
                keep = max(keep, self._growth_reserve)
            early = min(early, max(0, self._room() - keep))
        if early:
            self.pending_cost -= early
            self.taken_cost += early
            # Still held (the consumer has it) though its credit goes back:
            # the server's receive memory keeps counting it.
            self.ahead += early
            if self.memory is not None:
                self.memory.held += early
        return early

    def _widen(self, granted: int) -> int:
        """Grow the window if the tuner finds it is what paces the sender; the growth."""
        tuner, round_trips = self._tuner, self._round_trips
        assert tuner is not None and round_trips is not None
        now, round_trip = trio.current_time(), round_trips.round_trip
        more = tuner.growth(self.window, granted, now, round_trip, round_trips.round_trips_since)
        if tuner.probe_due(self.window, now, round_trip):
            round_trips.probe_round_trip()
        if more and self._room is not None:
            more = min(more, self._room() - self._growth_reserve)
        if more <= 0:
            return 0
        self.grow(more)
        return more

    async def _gather(self, at_least: int, patience: float) -> None:
        # All credit back first: the cap on at_least assumes the sender has it.
        self._flush_credit(force=True)
        self._wake_at = at_least
        try:
            with trio.move_on_after(patience):
                while self.buffered_cost < at_least and self.trailer is None and self.error is None:
                    await self._wakeup.park()
        finally:
            self._wake_at = 0

    def _flush_credit(self, *, force: bool) -> None:
        amount = self.credit_to_return(force=force)
        if amount:
            if self._tuner is not None:
                amount += self._widen(amount)
            self._grant(self.stream_id, amount)
        if self._shared is not None:
            self._shared.freed()


class OutgoingStream(OutboundStream):
    """The sending end of one data stream, spending the peer's credit."""

    def __init__(
        self,
        stream_id: int,
        window: int,
        max_payload: int,
        enqueue: Callable[[list[tuple[OutFrame, int]]], Awaitable[None]],
    ) -> None:
        super().__init__(stream_id, window, max_payload)
        self.window = window
        self._enqueue = enqueue
        self._wakeup = trio.lowlevel.ParkingLot()
        # Every full chunk of a stream has the same header: encoded once.
        self._header_size = -1
        self._header = b""

    async def wait_for_credit(self, cost: int) -> None:
        """Wait until at least ``cost`` bytes of credit are available."""
        await self._wait_for_credit(cost)

    @property
    def waiting_for_credit(self) -> bool:
        """Whether a producer waits for the peer's credit now."""
        return bool(self._wakeup)

    def wake(self) -> None:
        """Credit arrived (the state machine counted it): let the producer go on."""
        if self._wakeup:
            self._wakeup.unpark_all()

    def fail(self, exc: BaseException) -> None:
        """The peer reset the stream or the connection ended (kept and raised
        detached, as :meth:`IncomingStream.fail` says)."""
        super().fail(detached(exc))
        self._wakeup.unpark_all()

    async def send(self, chunks: Sequence[Buffer]) -> None:
        """Send chunks as DATA frames, waiting for credit as needed."""
        batch: list[tuple[OutFrame, int]] = []
        max_payload = self.max_payload
        self._check()
        for chunk in chunks:
            view = memoryview(chunk)
            for start in range(0, len(view), max_payload):
                piece = view[start : start + max_payload]
                size = len(piece)
                cost = size + FRAME_COST
                if self.credit < cost:
                    await self._flush(batch)
                    batch = []
                    await self._wait_for_credit(cost)
                self.credit -= cost
                if size != self._header_size:
                    self._header = data_header(self.stream_id, size)
                    self._header_size = size
                batch.append(((self._header, piece), size))
                self.bytes_sent += size
        await self._flush(batch)

    def record_shape(self, chunk_size: int) -> tuple[int, int]:
        """``(frame payload, frames per record)`` for :func:`~conduit.protocol.data_runs.lay_out`.

        A laid-out record fits in one sealed record whatever the peer's limit
        (that limit is its largest frame plus a header plus ``RECORD_SLACK``,
        and ``max_payload`` is at most its largest frame), and its credit cost
        fits in the window, so :meth:`send_records` can always send it.
        """
        frame = max(1, min(chunk_size, self.max_payload))
        room = self.max_payload + HEADER_SIZE + RECORD_SLACK
        per_record = min(room // (frame + HEADER_SIZE), self.window // (frame + FRAME_COST))
        return frame, max(1, per_record)

    async def send_records(self, records: Sequence[DataRecord]) -> None:
        """Send DATA frames already laid out as records (see :meth:`record_shape`).

        Credit is spent per record (its payload plus :data:`FRAME_COST` per
        frame), waiting for a whole record's credit; each record is queued as
        one piece, which the writer seals without copying it again.
        """
        batch: list[tuple[OutFrame, int]] = []
        self._check()
        for record in records:
            cost = record.payload + record.frames * FRAME_COST
            if self.credit < cost:
                await self._flush(batch)
                batch = []
                await self._wait_for_credit(cost)
            self.credit -= cost
            batch.append(((record.buffer,), record.payload))
            self.bytes_sent += record.payload
        await self._flush(batch)

    async def finish(self, trailer: bytes = b"") -> None:
        """Send the END frame carrying ``trailer`` (e.g. the checksum)."""
        cost = len(trailer) + FRAME_COST
        await self._wait_for_credit(cost)
        self.credit -= cost
        frame: OutFrame = (data_header(self.stream_id, len(trailer), FLAG_END), trailer)
        await self._flush([(frame, len(trailer))])
        self.finished = True

    async def _flush(self, batch: list[tuple[OutFrame, int]]) -> None:
        if batch:
            self._check()
            await self._enqueue(batch)

    async def _wait_for_credit(self, cost: int) -> None:
        while self.credit < cost:
            self._check()
            await self._wakeup.park()
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise detached(self.error)


__all__ = ["IncomingStream", "OutgoingStream"]
