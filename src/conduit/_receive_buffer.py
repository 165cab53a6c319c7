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

Streams that are not plain sockets (TLS, memory streams in tests) keep using
``receive_some``; plain sockets are read through :class:`~conduit._socket_io.SocketIO`
(no scheduler pass after a wake-up).
"""

from __future__ import annotations

import mmap

import trio

from ._socket_io import SocketIO
from .protocol.records import anonymous_buffer

#: The small read (and the size of read that switches to the mapping).
SMALL_READ = 64 * 1024


class ReceiveBuffer:
    """One connection's reads of up to ``size`` bytes (see the module docstring)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._mapping: mmap.mmap | None = None
        self._bulk = False
        self._io: SocketIO | None = None

    async def receive(self, stream: trio.abc.Stream) -> bytes | bytearray | memoryview:
        """The next bytes from ``stream`` (empty at EOF).

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
        received = await io.receive_into(mapping)
        if received > SMALL_READ:
            self._bulk = True
        return memoryview(mapping)[:received]

    @property
    def mapped(self) -> bool:
        """Whether reads land in the mapping (bulk data flowed since the last idle release)."""
        return self._mapping is not None

    def release_idle(self) -> None:
        """Drop the mapping unless bulk data arrived since the previous call.

        It is unmapped as soon as no view of it is left; the connection calls
        this on every heartbeat.
        """
        if not self._bulk:
            self._mapping = None
        self._bulk = False


__all__ = ["ReceiveBuffer"]
