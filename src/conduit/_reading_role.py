"""Letting a caller read its own reply: the socket's reading role, shared with callers.

A connection's reading task (:mod:`conduit._call_workers`) reads every frame
and wakes the caller a RESULT is for. For a caller waiting alone that is one
task hop per call: the reading task wakes from ``epoll``, reads, decodes and
reschedules the caller, which then runs in the next scheduler pass (a task
switch, an ``epoll_wait`` and a pass of latency, on a ~100 us round trip). So a
caller of a client connection that waits alone and finds the reading task idle
takes the reading role itself: it waits for the socket,
reads, handles what arrives (results, credit, pings, resets: the frames whose
handlers never wait) and returns the role once its own result is in. Anything
else (a CALL or MESSAGE from the peer, bulk data, a backlog of replies, an
error) goes back to the reading task, which carries on exactly as if it had
read it.

Trio lets one task at a time wait for a file descriptor to become readable, and
a task waiting on one can only be woken by that descriptor, a cancellation or
:func:`trio.lowlevel.notify_closing`. So the socket is watched through two
``epoll`` instances of our own, each holding it, each waited on by Trio like a
socket:

* the **idle** instance is what the reading task waits on when it has nothing
  to do. While a caller holds the role the socket is taken out of it, so the
  reply wakes only the caller; giving the role back puts the socket back (two
  ``epoll_ctl`` calls per call, ~1 us), and bytes that arrived meanwhile make
  it readable at once: nothing is ever left unread with nobody watching;
* the **own** instance is what the role's holder waits on. Nothing else waits
  on it, so it can be interrupted without touching the socket: a timeout, the
  connection closing, or any other outcome delivered to the holder's call
  while it waits calls :meth:`ReadingRole.interrupt_holder`
  (``notify_closing`` of that instance, which wakes its waiter with
  ``ClosedResourceError``); the same wakes the idle reading task when a caller
  hands it a frame.

Only for client connections on plain sockets on Linux (``select.epoll``; the
instances are made when the connection starts, two descriptors for its life,
so not on a server's many connections), not under the asyncio shim, whose loop
reads client sockets itself (:mod:`conduit._host_reader`), and not while data
streams are open on the connection (see ``Connection._role_open``). Measured
(``docs/benchmark-journal.md``): one scheduler pass and one ``epoll_wait`` fewer per
sequential call, two ``epoll_ctl`` more. End to end that was within the noise
at the load of the round that added it; on a quiet machine, six pairs with
and without the role gave a sequential p50 of 132 against 146 µs and 8 %
more calls per second, the role ahead in every pair.
"""

from __future__ import annotations

import contextlib
import select

import trio

_EPOLLIN = getattr(select, "EPOLLIN", 1)


class ReadingRole:
    """The two ``epoll`` instances of one connection's socket (see the module docstring)."""

    __slots__ = ("_idle", "_idle_fd", "_own", "_own_fd", "_socket", "closed", "held")

    def __init__(self, socket: trio.socket.SocketType) -> None:
        self._socket = socket
        fd = socket.fileno()
        self._idle = select.epoll()
        self._own = select.epoll()
        self._idle_fd = self._idle.fileno()
        self._own_fd = self._own.fileno()
        # Level-triggered: readable for as long as the socket has bytes (or an
        # end or an error to report), however many wake-ups that takes.
        self._idle.register(fd, _EPOLLIN)
        self._own.register(fd, _EPOLLIN)
        #: A caller holds the role: the reading task must not read.
        self.held = False
        #: The connection ended; the instances are closed.
        self.closed = False

    @classmethod
    def of(cls, stream: trio.abc.Stream) -> ReadingRole | None:
        """The role for ``stream``'s socket; None when it is no plain socket or no epoll here."""
        if type(stream) is not trio.SocketStream or not hasattr(select, "epoll"):
            return None
        if stream.socket.fileno() < 0:
            return None
        try:
            return cls(stream.socket)
        except OSError:  # out of descriptors: callers just wait for the reading task
            return None

    async def wait_idle(self) -> None:
        """The reading task's wait: until the socket is readable while nobody holds the role.

        Raises ``trio.ClosedResourceError`` when woken by :meth:`wake_idle` or
        :meth:`close`; it may also return while a caller holds the role (the
        socket became readable just before it was taken): check :attr:`held`.
        """
        await trio.lowlevel.wait_readable(self._idle_fd)

    async def wait_own(self) -> None:
        """The holder's wait: until the socket is readable.

        Raises ``trio.ClosedResourceError`` when woken by
        :meth:`interrupt_holder` or :meth:`close`.
        """
        await trio.lowlevel.wait_readable(self._own_fd)

    def take(self) -> None:
        """A caller takes the role: the idle reading task no longer wakes for the socket."""
        # Modified, not removed: adding a socket that other epoll instances
        # watch takes the kernel's global epoll lock for a loop check. With no
        # events the kernel still reports a hang-up or an error; the reading
        # task then wakes, finds the role held and waits again, while the
        # holder (woken by the same condition) reads it and ends the connection.
        self._idle.modify(self._socket.fileno(), 0)
        self.held = True

    def release(self) -> None:
        """The holder gives the role back: the socket wakes the reading task again."""
        self.held = False
        fd = self._socket.fileno()
        if not self.closed and fd >= 0:
            # Fails only if the socket was closed meanwhile: the connection is over.
            with contextlib.suppress(OSError):
                self._idle.modify(fd, _EPOLLIN)

    def interrupt_holder(self) -> None:
        """Wake the holder from :meth:`wait_own` (its call has an outcome)."""
        if not self.closed:
            trio.lowlevel.notify_closing(self._own_fd)

    def wake_idle(self) -> None:
        """Wake the reading task from :meth:`wait_idle` (a caller left it a frame)."""
        if not self.closed:
            trio.lowlevel.notify_closing(self._idle_fd)

    def close(self) -> None:
        """The connection ended: wake any waiter and close both instances."""
        if self.closed:
            return
        self.closed = True
        for instance in (self._idle, self._own):
            trio.lowlevel.notify_closing(instance.fileno())
            instance.close()


__all__ = ["ReadingRole"]
