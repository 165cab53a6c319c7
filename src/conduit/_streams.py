"""Data streams with per-stream credit (flow control in the style of HTTP/2).

The receiver of a stream grants the sender a window of bytes. The sender spends
it on DATA frames and waits when it runs out; the receiver returns credit only
after its consumer has taken the bytes. So a slow consumer (a slow disk) holds
back only its own stream, and the connection's reader task never blocks: it
can always append to an inbox, because the peer may not send beyond the window.

Every frame costs its payload plus :data:`FRAME_COST`, so a flood of tiny
frames is bounded too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import trio

from .errors import RemoteProtocolError, TransferError
from .protocol import FLAG_END, OutFrame
from .protocol.codec import data_header

#: Credit charged per frame on top of its payload (bounds per-frame bookkeeping).
FRAME_COST = 64

Buffer = bytes | bytearray | memoryview


class StreamReset(TransferError):
    """The other side aborted the stream."""


class IncomingStream:
    """The receiving end of one data stream.

    The connection's reader calls :meth:`deliver`; the consumer calls
    :meth:`receive` until it returns a trailer.
    """

    def __init__(self, stream_id: int, window: int, grant: Callable[[int, int], None]) -> None:
        self.stream_id = stream_id
        self._window = window
        self._available = window  # credit the peer still holds
        self._grant = grant
        self._chunks: deque[Buffer] = deque()
        self._taken_cost = 0  # consumed but not yet granted back
        self._pending_cost = 0  # handed to the consumer by the last receive()
        self._buffered_cost = 0
        self._trailer: bytes | None = None
        self._error: BaseException | None = None
        self._wakeup = trio.lowlevel.ParkingLot()
        self.bytes_received = 0

    @property
    def finished(self) -> bool:
        """True once the END frame has arrived."""
        return self._trailer is not None

    def deliver(self, payload: Buffer, flags: int) -> None:
        """Accept a DATA frame from the reader. Never blocks."""
        if self._trailer is not None:
            raise RemoteProtocolError(f"data after the end of stream {self.stream_id}")
        cost = len(payload) + FRAME_COST
        if cost > self._available:
            raise RemoteProtocolError(
                f"peer exceeded the credit window on stream {self.stream_id} "
                f"({cost} bytes with {self._available} granted)"
            )
        self._available -= cost
        self._buffered_cost += cost
        if flags & FLAG_END:
            self._trailer = bytes(payload)
        else:
            self._chunks.append(payload)
            self.bytes_received += len(payload)
        self._wakeup.unpark_all()

    def fail(self, exc: BaseException) -> None:
        """End the stream with an error (reset by the peer, or connection lost)."""
        if self._error is None and self._trailer is None:
            self._error = exc
        self._wakeup.unpark_all()

    async def receive(self) -> tuple[list[Buffer], bytes | None]:
        """Wait for data; return every buffered chunk and the trailer once the stream ends.

        Calling ``receive`` again tells the stream the previous chunks were
        consumed, which returns their credit to the sender.
        """
        self._taken_cost += self._pending_cost
        self._pending_cost = 0
        while not self._chunks and self._trailer is None:
            if self._error is not None:
                raise self._error
            # About to wait: hand back all credit, or the sender could be
            # waiting for credit we are sitting on.
            self._flush_credit(force=True)
            await self._wakeup.park()
        if self._error is not None and self._trailer is None and not self._chunks:
            raise self._error
        chunks = list(self._chunks)
        self._chunks.clear()
        self._pending_cost = self._buffered_cost
        self._buffered_cost = 0
        self._flush_credit(force=False)
        return chunks, self._trailer

    def _flush_credit(self, *, force: bool) -> None:
        amount = self._taken_cost
        if amount and self._trailer is None and (force or amount >= self._window // 4):
            self._taken_cost = 0
            self._available += amount
            self._grant(self.stream_id, amount)


class OutgoingStream:
    """The sending end of one data stream, spending the peer's credit."""

    def __init__(
        self,
        stream_id: int,
        window: int,
        max_payload: int,
        enqueue: Callable[[list[tuple[OutFrame, int]]], Awaitable[None]],
    ) -> None:
        self.stream_id = stream_id
        self._credit = window
        # A frame must fit in the window even when all of it is free.
        self.max_payload = max(1, min(max_payload, window - FRAME_COST))
        self._enqueue = enqueue
        self._error: BaseException | None = None
        self._wakeup = trio.lowlevel.ParkingLot()
        self.bytes_sent = 0
        self.finished = False

    @property
    def credit(self) -> int:
        """Bytes (including per-frame cost) the peer currently lets us send."""
        return self._credit

    async def wait_for_credit(self, cost: int) -> None:
        """Wait until at least ``cost`` bytes of credit are available."""
        await self._wait_for_credit(cost)

    def grant(self, increment: int) -> None:
        """Credit arrived from the peer."""
        self._credit += increment
        self._wakeup.unpark_all()

    def fail(self, exc: BaseException) -> None:
        """The peer reset the stream or the connection ended."""
        if self._error is None:
            self._error = exc
        self._wakeup.unpark_all()

    async def send(self, chunks: Sequence[Buffer]) -> None:
        """Send chunks as DATA frames, waiting for credit as needed."""
        batch: list[tuple[OutFrame, int]] = []
        for chunk in chunks:
            view = memoryview(chunk)
            for start in range(0, len(view), self.max_payload):
                piece = view[start : start + self.max_payload]
                cost = len(piece) + FRAME_COST
                if self._credit < cost:
                    await self._flush(batch)
                    batch = []
                    await self._wait_for_credit(cost)
                self._check()
                self._credit -= cost
                batch.append(((data_header(self.stream_id, len(piece)), piece), len(piece)))
                self.bytes_sent += len(piece)
        await self._flush(batch)

    async def finish(self, trailer: bytes = b"") -> None:
        """Send the END frame carrying ``trailer`` (e.g. the checksum)."""
        cost = len(trailer) + FRAME_COST
        await self._wait_for_credit(cost)
        self._credit -= cost
        frame: OutFrame = (data_header(self.stream_id, len(trailer), FLAG_END), trailer)
        await self._flush([(frame, len(trailer))])
        self.finished = True

    async def _flush(self, batch: list[tuple[OutFrame, int]]) -> None:
        if batch:
            self._check()
            await self._enqueue(batch)

    async def _wait_for_credit(self, cost: int) -> None:
        while self._credit < cost:
            self._check()
            await self._wakeup.park()
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error


__all__ = ["FRAME_COST", "IncomingStream", "OutgoingStream", "StreamReset"]
