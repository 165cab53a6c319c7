"""Sending and receiving on a plain socket without Trio's per-operation overhead.

Each ``trio.SocketStream.send_all`` and ``receive_some`` that completes ends
with a scheduler pass (``cancel_shielded_checkpoint``), and a producer that
sent a record itself that way would have to shield the send in a cancel
scope, so that a cancellation could not cut a record in half: together ~10 us
of CPU per RPC round trip on the benchmark machine, about as much as all of
our protocol work.

:class:`SocketIO` does the same I/O with the socket's own non-blocking calls
and Trio's public waiting primitives (:func:`trio.lowlevel.wait_readable`):

* :meth:`SocketIO.send_now` writes what the socket takes at once and never
  waits, so it needs no shield; what it leaves goes to the connection's
  writer, which sends it with :meth:`SocketIO.send_when_writable`, one wait
  and one write at a time, so that it sees whether the peer still takes
  bytes;
* :meth:`SocketIO.receive` reads at once when bytes are there and waits for
  readability otherwise. It still checkpoints whenever it returns bytes without
  having waited first (bytes that keep coming), so a busy connection cannot
  starve the other tasks; only the read right after a wake-up, the one every
  RPC makes, skips the extra scheduler pass;
* after a small read that found the socket drained (it returned fewer bytes
  than asked), the next :meth:`SocketIO.receive` waits for readability first
  instead of trying a read that would fail: in a request/response exchange the
  next message cannot be there yet (its sender has not seen our reply), and
  the failed ``read`` and its ``BlockingIOError`` cost ~2.5 us per message. If
  bytes did arrive meanwhile, Trio reports the socket readable on its next
  pass, which costs what the checkpoint after an immediate read costs. Where
  the protocol says the peer sends without waiting for us (a server's
  confirmation right behind its hello), :meth:`SocketIO.may_have_more` makes
  the next read go first: waiting for readability when the bytes are already
  there costs two ``epoll_ctl`` and a wake-up.

Only for a plain :class:`trio.SocketStream` (TCP, Unix); TLS and in-memory
streams keep the Trio calls. The descriptor is read on every call: a closed
stream's is -1, never a number the process reused for another socket.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import socket as _socket
import sys
from collections.abc import Callable
from typing import Any

import trio

if sys.platform == "linux":
    import fcntl
    import termios

    #: SIOCOUTQ: a socket's bytes not yet acknowledged by its peer (Linux).
    _SIOCOUTQ: int | None = termios.TIOCOUTQ
else:  # pragma: no cover - the heartbeat then judges by frames alone
    _SIOCOUTQ = None

#: What a read may land in.
Buffer = bytearray | memoryview | mmap.mmap


class SocketIO:
    """The fast path of one connection's socket (see the module docstring)."""

    __slots__ = ("_drained", "_low_water", "_socket", "_woken")

    def __init__(self, socket: trio.socket.SocketType, *, just_started: bool = False) -> None:
        self._socket = socket
        # The task was just scheduled: a read that succeeds now needs no
        # scheduler pass of its own (as after a wake-up).
        self._woken = just_started
        self._low_water = 1
        # The last receive() came back short: the socket had nothing more.
        self._drained = False

    @classmethod
    def of(cls, stream: trio.abc.Stream, *, just_started: bool = False) -> SocketIO | None:
        """The fast path for ``stream``, or None when it is not a plain socket stream.

        ``just_started``: the caller is a task that has just started (its
        start was its scheduler pass), so the first :meth:`receive`, tried at
        once, adds no pass of its own when bytes are there; it waits for
        readability as any read when none are.
        """
        if type(stream) is trio.SocketStream:
            return cls(stream.socket, just_started=just_started)
        return None

    def send_now(self, data: bytes | bytearray | memoryview) -> int:
        """Write as much of ``data`` as the socket takes without waiting; return that count."""
        try:
            return os.write(self._fd(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _translate(exc) from exc

    async def send_when_writable(self, data: bytes | bytearray | memoryview) -> int:
        """Wait until the socket has room, then write what it takes; return that count.

        For the rest of a write that fell short (the socket is full, so waiting
        first saves a write that would fail). The count may be 0 (the room went
        to no one); the caller decides whether to go on, which lets it see
        each write's progress, as ``send_all`` would not. Waking up from the
        wait was this task's scheduler pass; no other follows the write.
        """
        self._fd()  # a closed socket fails here, as a write would
        await trio.lowlevel.wait_writable(self._socket)
        return self.send_now(data)

    def allow_unsent(self, size: int) -> None:
        """Let the kernel hold ``size`` bytes not yet sent (``TCP_NOTSENT_LOWAT``).

        Trio sets the mark to 16 KiB so that a sender keeps its data until the
        last moment; for bulk records that means a 1 MiB record goes out in
        five or six writes, each after a wait for the socket (an epoll round
        trip and a scheduler pass). A larger mark takes fewer writes; control
        frames still overtake bulk data at the next record boundary (see
        :mod:`conduit._outbox`), behind at most this much more in the kernel.
        TCP only; elsewhere a no-op.
        """
        with contextlib.suppress(OSError, AttributeError):
            self._socket.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NOTSENT_LOWAT, size)

    def set_low_water(self, count: int) -> None:
        """Wake a waiting read only once ``count`` bytes are there (``SO_RCVLOWAT``).

        Linux re-checks readability when the mark changes, so lowering it
        wakes a reader already waiting on bytes that have arrived. A read that
        does not wait still returns whatever is there.
        """
        if count != self._low_water and self._socket.fileno() >= 0:
            self._low_water = count
            # Not supported here: reads just wake earlier.
            with contextlib.suppress(OSError):
                self._socket.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVLOWAT, count)

    async def receive(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes (b"" at end of stream); waits until some arrive."""
        data: bytes = await self._read(lambda fd: os.read(fd, max_bytes), self._drained)
        self._drained = 0 < len(data) < max_bytes
        return data

    def may_have_more(self) -> None:
        """The peer may have sent more without waiting for anything from us
        (its next message does not answer our last one): the next
        :meth:`receive` tries a read first, whatever the last one found."""
        self._drained = False

    @property
    def would_wait(self) -> bool:
        """Whether the next :meth:`receive` waits for readability before reading."""
        return self._drained

    def woke(self) -> None:
        """The socket was just reported readable by another wait: the next read goes first.

        And skips the scheduler pass after it, as after a wait of its own (see
        :mod:`conduit._reading_role`, whose ``epoll`` the reading task waits on).
        """
        self._drained = False
        self._woken = True

    def read_now(self, max_bytes: int) -> bytes | None:
        """Up to ``max_bytes`` bytes without waiting (b"" at end of stream); None if none are there.

        For a task that waited for readability itself (see
        :mod:`conduit._reading_role`); what :meth:`receive` does after its wait.
        """
        try:
            data = os.read(self._fd(), max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _translate(exc) from exc
        self._drained = 0 < len(data) < max_bytes
        return data

    async def receive_into(self, buffer: Buffer) -> int:
        """Read into ``buffer``; return the count (0 at end of stream).

        Bulk data: always tries the read first (data keeps coming).
        """
        count: int = await self._read(lambda fd: os.readv(fd, (buffer,)), False)
        return count

    async def _read(self, read: Callable[[int], Any], wait_first: bool) -> Any:
        if wait_first:
            self._fd()  # a closed socket fails here, as a read would
            # A cancellation point too, as checkpoint_if_cancelled is.
            await trio.lowlevel.wait_readable(self._socket)
            self._woken = True
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                result = read(self._fd())
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._socket)
                self._woken = True
                continue
            except OSError as exc:
                raise _translate(exc) from exc
            if self._woken:
                self._woken = False
            else:
                # Shielded, as Trio's own: the bytes are read, never lose them.
                await trio.lowlevel.cancel_shielded_checkpoint()
            return result

    def _fd(self) -> int:
        fd = self._socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        return fd


def _translate(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    # What trio.SocketStream reports for the same errors.
    if exc.errno in (errno.EBADF, errno.ENOTSOCK):
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def close_now(stream: trio.abc.Stream) -> bool:
    """Close a plain socket stream at once; False (nothing done) for other streams.

    What ``trio.SocketStream.aclose`` does, without its closing checkpoint:
    under ``aclose_forcefully`` (a cancelled scope) that checkpoint raises and
    catches a Cancelled, the dearest part of a connection's end. Closing a
    socket never waits, and tasks blocked on it are woken as by ``aclose``.
    """
    if type(stream) is trio.SocketStream:
        stream.socket.close()
        return True
    return False


#: poll() events that say the peer will send nothing more: it closed its side
#: (``POLLRDHUP``, Linux; elsewhere only a whole hang-up shows) or the
#: connection failed.
_PEER_GONE = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under a socket stream, plain or under TLS (None: in memory)."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


#: How long a connection that said GOODBYE reads on, discarding, for the
#: peer's end of stream before it closes its socket (see :func:`linger`).
LINGER_AFTER_GOODBYE = 1.0


async def linger(stream: trio.abc.Stream, timeout: float = LINGER_AFTER_GOODBYE) -> None:
    """Half-close the socket of ``stream`` (plain or under TLS), then read,
    discarding, until the peer's end of stream, for at most ``timeout``
    seconds; shielded. Nothing for a stream on no socket.

    For a connection whose GOODBYE went out, before it closes its socket.
    Closing a socket with bytes unread, or that the peer still sends to,
    makes the kernel answer with a reset, on which the peer's next send
    fails: a peer still sending (a push or an upload of its own under way)
    then ended as for a lost link before its reader came to our GOODBYE,
    behind what it had not read yet. A client reconnected, a server's push
    waited out its ``push_reconnect_timeout`` (until 2026-12-07, under TLS
    most of the time). Here the peer reads our GOODBYE, ends, and its end of
    stream ends the wait. (Under TLS the half-close goes under the TLS
    layer: the GOODBYE, sealed, already said the connection is over.)
    """
    sock = _socket_of(stream)
    if sock is None or sock.fileno() < 0:
        return
    try:
        sock.shutdown(_socket.SHUT_WR)
    except OSError:
        return  # the connection failed already: nothing left to lose
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + timeout
        try:
            while await sock.recv(256 * 1024):
                pass
        except OSError:
            pass


def peer_has_closed(stream: trio.abc.Stream) -> bool:
    """Whether the peer of a socket stream (plain or under TLS) has closed its
    side or the connection failed, even with unread bytes before its end.

    For a reader that has stopped reading on purpose: it sees neither the end
    nor a reset until it reads everything before them. False for streams on
    no socket (in memory), and when nothing says so yet. One ``poll`` that
    never waits.
    """
    sock = _socket_of(stream)
    if sock is None:
        return False
    fd = sock.fileno()
    if fd < 0:
        return True  # closed here
    poller = select.poll()
    poller.register(fd, _PEER_GONE)
    return any(events & _PEER_GONE for _, events in poller.poll(0))


def unacknowledged_bytes(stream: trio.abc.Stream) -> int | None:
    """Bytes sent on the socket of ``stream`` (plain or under TLS) that its
    peer's kernel has not acknowledged yet, or None where that cannot be
    told (no socket, a platform without ``SIOCOUTQ``).

    A count that goes down says the peer takes our bytes, however slowly its
    link goes; one that stands still says it took none since (its receive
    buffer is full: it reads nothing). One ``ioctl`` that never waits.
    """
    sock = _socket_of(stream)
    if sock is None or _SIOCOUTQ is None:
        return None
    fd = sock.fileno()
    if fd < 0:
        return None
    try:
        answer = fcntl.ioctl(fd, _SIOCOUTQ, bytes(4))
    except OSError:
        return None
    return int.from_bytes(answer, sys.byteorder, signed=True)
