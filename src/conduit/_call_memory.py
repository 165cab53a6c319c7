"""A server's call memory: what the large calls and queued messages of all its connections hold.

Each connection bounds what its own peer can make it hold decoded: the
arguments of its large calls running (``LARGE_CALL_BYTES``) and the messages
its message task has queued or is handling (``_MESSAGE_QUEUE_BYTES``). With a
thousand connections those bounds are a thousand times larger.
:class:`SharedCallMemory` is the server's bound over all of them
(``ServerDescriptor.server_call_budget``). The counting is the sans-IO
:class:`~conduit.protocol.connection.CallMemory`'s; this adds the waiting.

A large call that does not fit is refused at once (``overloaded``, as over
its connection's own bound: a refused call did nothing, so its caller may
try again). A message cannot be refused (it has no answer), so the reader
that holds one waits, reading nothing more from its connection, until the
message handlers of any connection, or the large calls, have released
enough; its peer then meets TCP's backpressure. Connections with no message
to queue read on.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ._receive_memory import RECHECK_INTERVAL
from .protocol.connection import CallMemory


class SharedCallMemory(CallMemory):
    """A :class:`~conduit.protocol.connection.CallMemory` that readers can wait on.

    One per :class:`~conduit.Server`, shared by its connections (see the
    module docstring).
    """

    __slots__ = ("_waiting",)

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self._waiting = trio.lowlevel.ParkingLot()

    def release(self, size: int) -> None:
        """What ``size`` bytes held is over: wake the readers waiting for room.

        Each looks again (:meth:`wait_for_room`); those that still do not
        fit park again. Cheap when nobody waits.
        """
        self.held -= size
        if self._waiting:
            self._waiting.unpark_all()

    async def wait_for_room(self, size: int, still_needed: Callable[[], bool]) -> None:
        """Wait until ``size`` more bytes fit, or ``still_needed()`` is false
        (the reader's connection has ended)."""
        while not self.admits(size) and still_needed():
            # Woken by every release; the timeout only bounds how long a
            # connection's end, which nothing here announces, goes unseen.
            with trio.move_on_after(RECHECK_INTERVAL):
                await self._waiting.park()


__all__ = ["SharedCallMemory"]
