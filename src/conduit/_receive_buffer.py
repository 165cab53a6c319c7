"""Where a connection's socket reads land: bulk data into one reused page mapping.

``SocketStream.receive_some(n)`` allocates ``n`` bytes per call and shrinks
them to what arrived: at the 1 MiB a connection asks for during bulk data (one
read per sealed record at full speed), every read is a megabyte from
``malloc``, which glibc serves from its heap once a block that large has been
freed; interleaved with the connection's other allocations, a few concurrent
uploads leave tens of megabytes the process never gives back after they end.

So a connection reads small (``receive_some`` of 64 KiB, which is all calls
and results need) until a read fills that, and from then on reads into a page
mapping of its own (``recv_into``): nothing allocated per read, and given back
to the system when the connection ends or an idle heartbeat interval passes
(:meth:`ReceiveBuffer.release_idle`), after which it reads small again. Idle
and RPC-only connections hold no buffer at all.

While a bulk record is partly here, a read waits until the rest of it has
arrived (the socket's low-water mark, :meth:`SocketIO.set_low_water`), so a
1 MiB record costs one wake-up and one read instead of one per burst of TCP
segments (about seven per megabyte on loopback): each wake-up is an epoll
round trip and a scheduler pass, which cost more CPU than decrypting the
bytes. The mark is dropped back on every heartbeat (:meth:`ReceiveBuffer.release_idle`),
so a record trickling in over a slow link is still read at least once per
heartbeat interval and the peer is never taken for silent.

The rest of a record is read behind a copy of its start, at the front of the
mapping (:class:`PartialRecord`), so the record opener can decrypt the whole
record from the read as it is: only the start (usually a few KiB that came
with the previous read) is copied, not the megabyte. A start larger than the
rest stays with the opener, which appends the rest to it (fewer bytes copied).

Streams that are not plain sockets (TLS, memory streams in tests) keep using
``receive_some``; plain sockets are read through :class:`~conduit._socket_io.SocketIO`
(no scheduler pass after a wake-up).
"""

from __future__ import annotations

import mmap
from typing import Protocol

import trio

from ._socket_io import SocketIO
from .protocol.records import anonymous_buffer

#: The small read (and the size of read that switches to the mapping).
SMALL_READ = 64 * 1024


class PartialRecord(Protocol):
    """The record opener's side of a read of a record's rest (the frame reader)."""

    def partial(self) -> memoryview:
        """The bytes of the record begun (received, not yet opened)."""
        ...

    def discard_partial(self) -> None:
        """Forget those bytes: they come back, with the rest, in the read."""
        ...


class ReceiveBuffer:
    """One connection's reads of up to ``size`` bytes (see the module docstring)."""

    def __init__(self, size: int, io: SocketIO | None = None) -> None:
        """``io``: the socket's fast path, when the caller has one already."""
        self.size = size
        self._mapping: mmap.mmap | None = None
        self._bulk = False
        self._io: SocketIO | None = io

    async def receive(
        self, stream: trio.abc.Stream, missing: int = 0, partial: PartialRecord | None = None
    ) -> bytes | bytearray | memoryview:
        """The next bytes from ``stream`` (empty at EOF).

        ``missing``: bytes the caller knows are still to come (the rest of a
        record); with bulk data flowing, a read then takes exactly that many
        (up to the mapping's size), and waits until they are all there.
        ``partial``: where the record's start is; when the whole record fits
        the mapping, the read returns it whole (its start copied in front,
        then discarded from ``partial`` once the read succeeded).

        From the mapping, a view valid until the next call: the caller copies
        what it keeps (the frame reader does).
        """
        io = self._io
        if io is None:
            if type(stream) is not trio.SocketStream:
                return await stream.receive_some(self.size)
            io = self._io = SocketIO(stream.socket)
        mapping = self._mapping
        if mapping is None:
            data = await io.receive(SMALL_READ)
            if len(data) == SMALL_READ:  # bulk data is flowing: read big from now on
                self._mapping = anonymous_buffer(self.size)
                self._bulk = True
            return data
        if missing > SMALL_READ:
            # The rest of a bulk record, and no more: the record opener then
            # never holds more than one record.
            if partial is not None:
                with partial.partial() as start:
                    begun = len(start)
                    # The start is copied twice this way (the opener kept a copy
                    # when the earlier read was reused), the rest never: worth it
                    # when the start is the smaller part. A record larger than
                    # the mapping is joined by the opener, as before.
                    if begun < missing and begun + missing <= len(mapping):
                        mapping[:begun] = start
                    else:
                        begun = -1
                if begun >= 0:
                    return await self._receive_rest(io, mapping, begun, missing, partial)
            want = min(missing, len(mapping))
            io.set_low_water(want)
            with memoryview(mapping) as whole, whole[:want] as target:
                received = await io.receive_into(target)
        else:  # a call or a result is read at once, with whatever follows
            io.set_low_water(1)
            received = await io.receive_into(mapping)
        if received > SMALL_READ:
            self._bulk = True
        return memoryview(mapping)[:received]

    async def _receive_rest(
        self,
        io: SocketIO,
        mapping: mmap.mmap,
        begun: int,
        missing: int,
        partial: PartialRecord,
    ) -> bytes | memoryview:
        # The record's start is at the front of the mapping: its rest goes right
        # behind it, and the caller gets the record whole.
        io.set_low_water(missing)
        with memoryview(mapping) as whole, whole[begun : begun + missing] as target:
            received = await io.receive_into(target)
        if not received:
            return b""  # EOF: the record's start no longer matters
        # Only now: a cancelled read leaves the start where it was.
        partial.discard_partial()
        self._bulk = True
        return memoryview(mapping)[: begun + received]

    @property
    def would_wait(self) -> bool:
        """Whether the next :meth:`receive` of a call or result would wait for the socket first.

        True only for small reads from a plain socket that found it drained:
        then the reading task may wait through the connection's reading role
        (:mod:`conduit._reading_role`) instead, and call :meth:`woke` after.
        """
        return self._mapping is None and self._io is not None and self._io.would_wait

    def woke(self) -> None:
        """The socket was reported readable: the next :meth:`receive` reads at once."""
        if self._io is not None:
            self._io.woke()

    def read_now(self) -> bytes | None:
        """A small read without waiting, for a caller holding the reading role.

        None when nothing is there (or reads are not small now: bulk data, or
        no plain socket); b"" at end of stream. A read that fills
        :data:`SMALL_READ` switches to the mapping, as :meth:`receive` does.
        """
        io = self._io
        if io is None or self._mapping is not None:
            return None
        data = io.read_now(SMALL_READ)
        if data is not None and len(data) == SMALL_READ:
            self._mapping = anonymous_buffer(self.size)
            self._bulk = True
        return data

    @property
    def mapped(self) -> bool:
        """Whether reads land in the mapping (bulk data flowed since the last idle release)."""
        return self._mapping is not None

    def release(self) -> None:
        """Drop the mapping for good (the connection is over; a read after
        this reads small again). It is unmapped once no view of it is left."""
        self._mapping = None
        self._bulk = False

    def release_idle(self) -> None:
        """Drop the mapping unless bulk data arrived since the previous call,
        and read whatever is there (the low-water mark goes back to one byte).

        It is unmapped as soon as no view of it is left; the connection calls
        this on every heartbeat.
        """
        if not self._bulk:
            self._mapping = None
        self._bulk = False
        if self._io is not None:
            self._io.set_low_water(1)


__all__ = ["PartialRecord", "ReceiveBuffer"]
