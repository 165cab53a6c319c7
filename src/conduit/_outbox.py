"""The queue between a connection's producers and its single writer task.

Why not one ``trio.open_memory_channel``: a channel costs several microseconds
per item and has no notion of priority. Control frames (RPC results, credit
grants, pings) must overtake bulk data, or a 10 GiB upload would delay every
RPC reply behind megabytes of file chunks. So the outbox keeps two queues:
control frames (small, never blocking) and data frames (bounded in bytes;
producers wait when it is full, which is the in-process backpressure), and the
writer always drains control first.

Whether the outbox still takes frames is the connection state machine's phase
(:class:`~conduit.protocol.connection.Phase`): OPEN takes everything; CLOSING
(a graceful close) takes control frames but no new data, and drains what is
queued; CLOSED refuses all. The GOODBYE that starts a graceful close goes
last (:meth:`Outbox.put_last`), after the data queued before it: the peer
ignores whatever follows a GOODBYE, so one sent ahead of a download's last
frames would lose a file already served. The writer stops once nothing is
queued and the phase is not OPEN, unless the GOODBYE is still to come
(:meth:`Outbox.expect_last`: a handler's close whose answer is not sent yet).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio

from .errors import ConnectionClosed
from .protocol import OutFrame
from .protocol.connection import ConnectionState, Phase

# Enum members are class attribute lookups (~0.1 us each); these run per call.
_OPEN = Phase.OPEN
_CLOSED = Phase.CLOSED

#: Bytes counted for each queued control frame on top of its own: about what
#: the frame's bytes object, its tuple and its deque slot take in memory.
CONTROL_FRAME_OVERHEAD = 160


class OutboxClosed(Exception):
    """Raised to the writer when there is nothing more to send, ever."""


class Outbox:
    """Frames waiting for the writer; control before data."""

    def __init__(
        self,
        data_limit: int,
        state: ConnectionState,
        start_writer: Callable[[], None] | None = None,
    ) -> None:
        self._state = state
        self._control: deque[OutFrame] = deque()
        self._control_bytes = 0
        self._control_drained = trio.lowlevel.ParkingLot()
        self._data: deque[tuple[OutFrame, int]] = deque()
        self._data_bytes = 0
        self._data_limit = data_limit
        # Sealed bytes a producer could not finish sending without waiting
        # (the reader never waits on the socket): the writer sends them first.
        self._sealed: list[bytes | bytearray | memoryview] = []
        # The frame that ends the connection (see put_last), and whether it
        # is still to come (see expect_last).
        self._last: OutFrame | None = None
        self._last_expected = False
        self._writer_waiting = trio.lowlevel.ParkingLot()
        self._producers_waiting = trio.lowlevel.ParkingLot()
        #: True while the writer is parked with nothing to send, or not
        #: started yet: a producer may then write a frame itself instead of
        #: waking the writer for it.
        self.writer_idle = start_writer is not None
        # Called instead of a wake-up the first time the writer is needed: a
        # connection that only ever sends directly never starts its task.
        self._start_writer = start_writer

    @property
    def data_bytes(self) -> int:
        """Bytes of data frames queued."""
        return self._data_bytes

    def put_control(self, frame: OutFrame) -> None:
        """Queue a control frame. Never blocks: its producers bound what is queued
        (the reader stops at the connection's backlog, a message sender waits
        below it, a broadcast skips a peer over it)."""
        self.queue_control(frame)
        self._wake_writer()

    def queue_control(self, frame: OutFrame) -> None:
        """Queue a control frame without waking the writer.

        For a producer about to queue more (the reader running several calls
        of one record): it then sends them all at once with :meth:`take_control`
        or wakes the writer, so a burst costs one record and one send.
        """
        if self._state.phase is _CLOSED:  # _check_open, inline: once per call and result
            raise ConnectionClosed(self._state.close_reason or "connection closed")
        self._control.append(frame)
        # What the frame holds in memory, not only its bytes on the wire: a
        # PONG is 22 bytes and ~170 of Python objects, so a flood of PINGs
        # counted by wire bytes alone queued ~8x the backlog in memory.
        self._control_bytes += sum(map(len, frame)) + CONTROL_FRAME_OVERHEAD

    @property
    def control_queued(self) -> bool:
        """Whether control frames wait to be sent."""
        return bool(self._control)

    @property
    def control_count(self) -> int:
        """How many control frames wait to be sent."""
        return len(self._control)

    def take_control(self) -> list[OutFrame]:
        """Take every queued control frame, to send them right away instead of the writer."""
        batch = list(self._control)
        self._control.clear()
        self._control_bytes = 0
        if self._control_drained:  # a reader held back by the backlog (rare)
            self._control_drained.unpark_all()
        return batch

    def put_last(self, frame: OutFrame) -> None:
        """Queue the frame that ends the connection (its GOODBYE): the writer
        sends it after every frame queued, data included; no data is taken
        after it (:meth:`put_data` refuses once the phase is not OPEN)."""
        self._check_open()
        self._last = frame
        self._last_expected = False
        self._wake_writer()

    def expect_last(self) -> None:
        """The phase is CLOSING, and the frame that ends the connection comes
        later (:meth:`put_last`): until then the writer waits for it when
        nothing else is queued, instead of stopping, which would end the
        connection without its GOODBYE."""
        self._check_open()
        self._last_expected = True

    def put_sealed(self, chunks: list[bytes | bytearray | memoryview]) -> None:
        """Hand the writer sealed bytes (the rest of records already begun) to send first."""
        self._check_open()
        self._sealed.extend(chunks)
        self._wake_writer()

    @property
    def sealed_queued(self) -> bool:
        """Whether sealed bytes wait for the writer: nobody else may send before them."""
        return bool(self._sealed)

    def take_sealed(self) -> list[bytes | bytearray | memoryview]:
        """The sealed bytes to send before any new record (see :meth:`put_sealed`)."""
        chunks, self._sealed = self._sealed, []
        return chunks

    def wake_writer(self) -> None:
        """Make the writer send what is queued."""
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self.writer_idle:
            # Not idle any more once woken: a producer that sees it woken queues
            # behind it instead of sending alone (its frame joins the record).
            self.writer_idle = False
            start, self._start_writer = self._start_writer, None
            if start is not None:
                start()
            else:
                self._writer_waiting.unpark_all()

    @property
    def control_bytes(self) -> int:
        """Memory of the control frames queued: their bytes, plus
        :data:`CONTROL_FRAME_OVERHEAD` each."""
        return self._control_bytes

    async def wait_control_below(self, limit: int) -> None:
        """Wait until the queued control frames fit in ``limit`` bytes (reader backpressure)."""
        while self._control_bytes > limit:
            self._check_open()
            await self._control_drained.park()

    async def put_data(self, frames: list[tuple[OutFrame, int]]) -> None:
        """Queue data frames (with their sizes), waiting while the queue is full.

        Only while the connection is OPEN: a graceful close sends what was
        queued before it, then its GOODBYE (see :meth:`put_last`), and a
        stream still sending fails with :class:`ConnectionClosed`.
        """
        while True:
            if self._state.phase is not _OPEN:
                raise ConnectionClosed(self._state.close_reason or "connection closed")
            if self._data_bytes < self._data_limit:
                break
            await self._producers_waiting.park()
        self._data.extend(frames)
        self._data_bytes += sum(size for _, size in frames)
        self._wake_writer()

    async def take(self, budget: int) -> list[OutFrame]:
        """Wait for frames; return all control frames and up to ``budget`` bytes
        of data, and the last frame (see :meth:`put_last`) once no data is left."""
        while not self._control and not self._data and not self._sealed and self._last is None:
            if self._state.phase is not _OPEN and not self._last_expected:
                raise OutboxClosed
            self.writer_idle = True
            try:
                await self._writer_waiting.park()
            finally:
                self.writer_idle = False
        batch = self.take_control()
        taken = 0
        # Whole frames up to the budget, never one beyond it (the first always
        # goes): a 17th 64 KiB frame taken with a record's 16 would be sealed
        # and sent as a record of its own.
        while self._data and (not taken or taken + self._data[0][1] <= budget):
            frame, size = self._data.popleft()
            batch.append(frame)
            taken += size
        if taken:
            self._data_bytes -= taken
            if self._data_bytes < self._data_limit:
                self._producers_waiting.unpark_all()
        if self._last is not None and not self._data:
            batch.append(self._last)
            self._last = None
        return batch

    def close(self) -> None:
        """The state machine is CLOSED: drop what is queued, wake everyone to see it."""
        self._control.clear()
        self._control_bytes = 0
        self._data.clear()
        self._data_bytes = 0
        self._sealed.clear()
        self._last = None
        self._last_expected = False
        self._start_writer = None  # the connection's method: no cycle left behind
        # Only lots with someone parked: this runs twice at every connection's end.
        for lot in (self._writer_waiting, self._producers_waiting, self._control_drained):
            if lot:
                lot.unpark_all()

    def _check_open(self) -> None:
        if self._state.phase is _CLOSED:
            raise ConnectionClosed(self._state.close_reason or "connection closed")
