"""A connection's socket lent to one worker-thread call, to seal and write bulk records there.

A bulk sender's worker thread reads a block of the file and hashes it
(:mod:`conduit.transfer._engine`). Handed back to the event loop, each record
of it then cost the loop a wake-up of the writer, a seal and a send that
waits for room in the socket (an ``epoll`` round trip and a scheduler pass
per wait): Python on the loop per record, the largest part of the CPU bulk
data costs beyond the raw reference (docs/benchmarks.md, "Bulk: where the
CPU goes"). With a :class:`SocketLease` the same thread seals each record
and writes it with blocking calls (``poll`` for room, then ``write``), as the
reference does, and the loop is not involved until the block is sent.

What keeps it safe:

* **One writer at a time, nonces in wire order.** The loop lends the socket
  only when its writer is idle and no task sends directly
  (:meth:`Connection.lend_socket <conduit._connection.Connection.lend_socket>`),
  and marks it lent exactly as a task sending directly does, so every other
  sender queues for the writer until the lease ends. Only the holder seals,
  so records take their counter nonces in the order they are written.
* **Fairness.** Between records the thread looks whether anything was queued
  for the writer (an RPC's call or result, a credit grant, a goodbye): if so
  it stops and hands the socket back, so control frames wait for at most one
  record, as they do behind the writer's own bulk records.
* **Cancellation and the end of the connection.** The thread's waits for
  room last at most :data:`SEND_SLICE`; it stops at once when the connection
  closed, and when its caller is cancelled, without cutting a record: the
  unwritten rest of a record already sealed goes to the writer, first
  (:meth:`Outbox.put_sealed <conduit._outbox.Outbox.put_sealed>`).
* **No descriptor reuse.** The thread writes to a duplicate of the socket's
  descriptor, closed when the lease ends: a connection closed meanwhile
  cannot leave it writing to a descriptor number reused by another socket.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable

from .protocol.records_io import FrameWriter

#: Seconds a thread waits for room in the socket before it looks again whether
#: it must stop (its caller cancelled, the connection closed).
SEND_SLICE = 0.05

#: Whether leases are possible here (``poll`` is POSIX; elsewhere the writer sends).
AVAILABLE = hasattr(select, "poll")


class SocketLease:
    """The socket lent to one worker-thread call (see the module docstring).

    Made and ended on the event loop (:meth:`end`); :meth:`send`,
    :meth:`stopped` and :meth:`wanted` are the thread's.
    """

    def __init__(
        self,
        fd: int,
        writer: FrameWriter,
        *,
        wanted: Callable[[], bool],
        closed: Callable[[], bool],
        release: Callable[[SocketLease], None],
    ) -> None:
        """``fd``: a duplicate of the socket's descriptor, owned (closed) by the lease.

        ``wanted``: whether frames wait for the writer; ``closed``: whether the
        connection is closed; ``release``: the connection's end of the lease.
        """
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLOUT)
        self._writer = writer
        self._wanted = wanted
        self._closed = closed
        self._release = release
        #: Set (on the loop) when the caller waiting for the thread is cancelled.
        self.cancelled = False
        #: A sealed record's unwritten rest, when the thread stopped within it.
        self.rest: bytes | None = None
        #: The write error that ended the lease (the connection is then lost).
        self.error: OSError | None = None
        self._ended = False

    def cancel(self) -> None:
        """The caller was cancelled: stop as soon as no record is cut in half."""
        self.cancelled = True

    def stopped(self) -> bool:
        """Whether the thread must stop before the next record (cancelled, closed, failed)."""
        return self.cancelled or self.error is not None or self._closed()

    def wanted(self) -> bool:
        """Whether others wait for the socket: the thread hands it back after this record."""
        return self._wanted()

    def send(self, plaintext: bytes | bytearray | memoryview) -> bool:
        """In the thread: seal one record and write all of it; False if stopped within it.

        A record cut short by a cancellation leaves its rest in :attr:`rest`
        (it was sealed: its nonce is spent, it must go out whole); one cut by
        the connection's end or a write error is dropped with the connection.
        """
        record = self._writer.seal_bulk(plaintext)
        total = len(record)
        sent = 0
        while sent < total:
            if self._closed():
                return False
            if self.cancelled:
                self.rest = bytes(record[sent:])
                return False
            try:
                sent += os.write(self._fd, record[sent:])
            except BlockingIOError:
                self._poll.poll(SEND_SLICE * 1000)
            except OSError as exc:
                self.error = exc
                return False
        return True

    def end(self) -> None:
        """On the loop, once the thread is done: give the socket back (idempotent)."""
        if self._ended:
            return
        self._ended = True
        os.close(self._fd)
        self._release(self)


__all__ = ["AVAILABLE", "SEND_SLICE", "SocketLease"]
