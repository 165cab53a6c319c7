"""Where a connection's socket reads land: one page mapping, reused for every read.

``SocketStream.receive_some(n)`` allocates ``n`` bytes per call and shrinks
them to what arrived: at the 1 MiB a connection asks for (one read per sealed
record at full speed), every read is a megabyte from ``malloc``, which glibc
serves from its heap once a block that large has been freed; interleaved with
the connection's other allocations, a few concurrent uploads leave tens of
megabytes the process never gives back after they end. Reading into a buffer
of the connection's own (``recv_into``) allocates nothing per read, and a page
mapping, unlike a heap block, is returned to the system when the connection
ends (with the connection object: the last view of it may outlive the
receive task by a moment, so it is not closed by hand). Its pages are
released after an idle heartbeat interval too
(:meth:`ReceiveBuffer.release_idle`), so an idle connection holds none.

Streams that are not plain sockets (TLS, memory streams in tests) keep using
``receive_some``.
"""

from __future__ import annotations

import errno
import mmap

import trio

from .protocol.records import anonymous_buffer

#: A read larger than this counts as bulk data for :meth:`ReceiveBuffer.release_idle`.
_BULK = 64 * 1024
#: errno values trio reports as a closed (not a broken) stream.
_CLOSED = frozenset({errno.EBADF, errno.ENOTSOCK})


class ReceiveBuffer:
    """One connection's reads of up to ``size`` bytes (see the module docstring)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._mapping: mmap.mmap | None = None
        self._bulk = False

    async def receive(self, stream: trio.abc.Stream) -> bytes | bytearray | memoryview:
        """The next bytes from ``stream`` (empty at EOF).

        A view of the buffer: valid until the next call, so the caller copies
        what it keeps (the frame reader does).
        """
        if type(stream) is not trio.SocketStream:
            return await stream.receive_some(self.size)
        if self._mapping is None:
            self._mapping = anonymous_buffer(self.size)
        try:
            received = await stream.socket.recv_into(self._mapping)
        except OSError as exc:
            # What SocketStream.receive_some reports for the same errors.
            if exc.errno in _CLOSED:
                raise trio.ClosedResourceError("this socket was already closed") from None
            raise trio.BrokenResourceError(exc) from exc
        if received > _BULK:
            self._bulk = True
        return memoryview(self._mapping)[:received]

    def release_idle(self) -> None:
        """Give the pages back unless bulk data arrived since the previous call.

        The mapping stays (its pages come back zeroed, on demand); the
        connection calls this on every heartbeat.
        """
        if self._mapping is not None and not self._bulk and hasattr(mmap, "MADV_DONTNEED"):
            self._mapping.madvise(mmap.MADV_DONTNEED)
        self._bulk = False


__all__ = ["ReceiveBuffer"]
