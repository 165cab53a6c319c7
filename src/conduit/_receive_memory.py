"""A server's receive memory: what the data streams of all its connections hold together.

Each connection bounds what its own peer can make it buffer
(``connection_receive_budget``); with a thousand connections that bound is a
thousand times larger. :class:`SharedReceiveMemory` is the server's bound over
all of them (``ServerDescriptor.server_receive_budget``). The counting is the
sans-IO :class:`~conduit.protocol.connection.ReceiveMemory`'s (the bytes the
streams hold, not the windows they may fill, so idle uploads cost nothing);
this adds the waiting. While more is held than the budget, every connection
that has a data stream coming in stops reading its socket (before its next
read, so each adds at most the read it was doing, about 1 MiB) until the
consumers, the uploads writing to disk, have taken enough out. The peers then meet TCP's
own backpressure: what they send waits in the kernel's socket buffers, which
the kernel bounds. Connections with no stream coming in, calls and downloads
alone, read on. A paused connection is not silent nor idle for its heartbeat
(we are the ones not reading it), and one whose peer has closed or reset it
is read to its end (``Connection._wait_for_receive_memory``).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from .protocol.connection import ReceiveMemory

#: Seconds a paused reader waits before it looks again without being woken:
#: every decrease wakes it (credit returned, a stream forgotten), and this only
#: bounds how long one the engine does not announce could keep it waiting.
RECHECK_INTERVAL = 0.1


class SharedReceiveMemory(ReceiveMemory):
    """A :class:`~conduit.protocol.connection.ReceiveMemory` that readers can wait on.

    One per :class:`~conduit.Server`, shared by its connections' inbound
    streams (see the module docstring).
    """

    __slots__ = ("_waiting",)

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self._waiting = trio.lowlevel.ParkingLot()

    def freed(self) -> None:
        """Something was taken out: wake the paused readers once the budget has room.

        Cheap when nobody waits (once per credit grant, per bulk batch).
        """
        if self._waiting and self.held <= self.limit:
            self._waiting.unpark_all()

    async def wait_for_room(self, still_needed: Callable[[], bool]) -> None:
        """Wait while the budget is exceeded and ``still_needed()`` (the reader
        still has streams coming in, its connection is still open)."""
        while self.held > self.limit and still_needed():
            with trio.move_on_after(RECHECK_INTERVAL):
                await self._waiting.park()


__all__ = ["RECHECK_INTERVAL", "SharedReceiveMemory"]
