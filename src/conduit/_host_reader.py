"""Reading a client connection's socket from the asyncio loop that hosts its Trio run.

Under the asyncio shim, Trio runs as a guest of the asyncio loop, and Trio's
wait for I/O happens in a worker thread: every time a reply arrives for a Trio
task that waits on the socket, that thread wakes, then wakes the loop's thread
(two thread hand-offs, measured as ~2 extra context switches and about half the
shim's cost per sequential RPC). So for a client connection hosted on asyncio,
the socket's readability is watched by the **asyncio loop itself**
(``loop.add_reader``) while the connection's reading task waits in
:meth:`HostReader.receive`:

* when bytes arrive, the loop's callback reads them (one non-blocking read) and
  hands them to the connection's ``drain``, which handles, right there on the
  loop's thread, every frame that needs no Trio task (results, credit, pings,
  resets: their handlers only settle futures, queue replies or reschedule Trio
  tasks). A result for a call made through the shim's fast path
  (:mod:`conduit._host_rpc`) settles its asyncio future: a sequential RPC then
  involves neither Trio's scheduler nor its I/O thread;
* what needs the reading task (a CALL or MESSAGE frame, the end of the stream,
  an error, bulk data, the reply backlog) is handed over: the callback stops
  watching the socket and reschedules the task, which carries on as it would
  have after reading (that wake-up pays the guest's thread hand-offs, as any
  Trio wake-up from asyncio does);
* bulk data (a read that fills :data:`~conduit._receive_buffer.SMALL_READ`) is
  read the Trio way, into the receive buffer's mapping, until the buffer drops
  its mapping again (an idle heartbeat interval).

The socket is watched only while a Trio task waits in :meth:`HostReader.receive`;
cancelling that task (the connection closing, the guest run ending with the
loop) stops the watch before the socket can be closed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import outcome
import trio

from ._callbacks import current_host_loop
from ._receive_buffer import SMALL_READ, ReceiveBuffer
from ._socket_io import _translate as translate_error

#: What the reading task gets: bytes to feed, or None when the loop's callback
#: already fed them (only frames it left are still to be read).
Received = bytes | bytearray | memoryview | None


class HostReader:
    """The asyncio-side reading of one client connection (see the module docstring)."""

    __slots__ = (
        "_buffer",
        "_drain",
        "_fd",
        "_stream",
        "_task",
        "_trio_only",
        "_trio_reads",
        "loop",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stream: trio.SocketStream,
        buffer: ReceiveBuffer,
        drain: Callable[[bytes], bool],
    ) -> None:
        #: The asyncio loop hosting this Trio run: the shim's fast path is for its callers.
        self.loop = loop
        self._stream = stream
        self._buffer = buffer
        self._drain = drain
        self._task: trio.lowlevel.Task | None = None
        self._fd = -1
        # Reading the Trio way: bulk data flows, or the loop cannot watch sockets.
        self._trio_reads = False
        self._trio_only = False  # the loop cannot watch sockets

    @classmethod
    def of(
        cls,
        stream: trio.abc.Stream,
        buffer: ReceiveBuffer,
        drain: Callable[[bytes], bool],
        *,
        is_client: bool,
    ) -> HostReader | None:
        """A host reader when this Trio run is hosted on asyncio and ``stream`` a plain socket.

        Only for clients: a server's connections mostly carry calls, which need
        the reading task anyway.
        """
        loop = current_host_loop()
        if loop is None or not is_client or type(stream) is not trio.SocketStream:
            return None
        return cls(loop, stream, buffer, drain)

    async def receive(self) -> Received:
        """Called by the reading task: the next bytes, or None once the loop handled them."""
        if self._trio_reads:
            return await self._receive_in_trio()
        await trio.lowlevel.checkpoint_if_cancelled()
        fd = self._stream.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        try:
            self.loop.add_reader(fd, self._on_readable)
        except NotImplementedError:  # a loop without add_reader (Windows' proactor)
            self._trio_only = self._trio_reads = True
            return await self._receive_in_trio()
        self._task = trio.lowlevel.current_task()
        self._fd = fd

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self._stop()
            return trio.lowlevel.Abort.SUCCEEDED

        received: Received = await trio.lowlevel.wait_task_rescheduled(abort)
        return received

    async def _receive_in_trio(self) -> Received:
        data = await self._buffer.receive(self._stream)
        if not self._trio_only and not self._buffer.mapped and len(data) < SMALL_READ:
            # Bulk data stopped long enough for the buffer to drop its mapping.
            self._trio_reads = False
        return data

    def _on_readable(self) -> None:
        # An asyncio callback, on the loop's thread between guest ticks.
        try:
            data = os.read(self._fd, SMALL_READ)
        except BlockingIOError:
            return
        except OSError as exc:
            self._hand_over(outcome.Error(translate_error(exc)))
            return
        if not data or len(data) == SMALL_READ:
            # The end of the stream, or bulk data: the reading task's to handle,
            # and bulk data is read the Trio way, into the buffer's mapping.
            self._trio_reads = bool(data)
            self._hand_over(outcome.Value(data))
            return
        try:
            handled = self._drain(data)
        except Exception as exc:  # IntegrityError, ProtocolError...: the reading task decides
            self._hand_over(outcome.Error(exc))
            return
        if not handled:
            self._hand_over(outcome.Value(None))

    def _hand_over(self, result: outcome.Outcome[Received]) -> None:
        task = self._task
        self._stop()
        if task is not None:
            trio.lowlevel.reschedule(task, result)

    def _stop(self) -> None:
        if self._task is not None:
            self._task = None
            self.loop.remove_reader(self._fd)

    def unlink(self) -> None:
        """Drop the connection's callback, once it is over (see ``Connection._unlink``):
        it holds the connection, which holds this reader."""
        self._drain = _over


def _over(_data: bytes) -> bool:
    """The callback of a reader whose connection is over (its reading ended
    first: never called)."""
    return False


__all__ = ["HostReader", "Received"]
