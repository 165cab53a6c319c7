"""One timer task for the heartbeats of all of a server's connections.

Every ``heartbeat_interval`` a connection pings its peer and checks that it has
heard from it within ``heartbeat_timeout`` (:meth:`conduit._connection.Connection.beat`).
A task per connection sleeping between beats costs each connection the task's
start and end and a timer (a cancel scope with a deadline, registered and
removed): measured at about 0.25 M instructions, a sixth of everything a
server spends on a short session besides the handshake's cryptography.

A server's connections share one interval, so their beats fall due in the
order they were scheduled: a FIFO queue whose head is always the next one due,
served by one task that sleeps until that head. A connection that ends clears
its entry (:meth:`Heartbeats.remove`), which then costs a few bytes until its
time comes and it is dropped: the queue never holds a finished connection.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger("conduit.connection")

#: A connection's beat: called with the current time; False once it needs no more.
Beat = Callable[[float], bool]
#: A queue entry: ``[due, beat]``; ``beat`` is None once removed.
Entry = list[Any]


class Heartbeats:
    """The heartbeat timer shared by connections of one ``interval`` (see the module docstring)."""

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError("a heartbeat interval is positive")
        self.interval = interval
        self._queue: deque[Entry] = deque()
        # The task waits here while the queue is empty (no timer at all then).
        self._empty = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        """Entries queued, including removed ones not yet dropped."""
        return len(self._queue)

    def add(self, beat: Beat, now: float) -> Entry:
        """Call ``beat`` every ``interval`` from ``now`` until it returns False or is removed."""
        entry: Entry = [now + self.interval, beat]
        self._queue.append(entry)
        if self._empty:
            self._empty.unpark_all()
        return entry

    @staticmethod
    def remove(entry: Entry) -> None:
        """Stop the beats of ``entry`` (its connection ended); releases the connection at once."""
        entry[1] = None

    async def run(self) -> None:
        """Beat each connection when it is due, until cancelled."""
        queue = self._queue
        while True:
            while queue and queue[0][1] is None:
                queue.popleft()
            if not queue:
                await self._empty.park()
                continue
            await trio.sleep_until(queue[0][0])
            now = trio.current_time()
            # Due times only grow along the queue (one interval, a clock that
            # never goes back): the due entries are a prefix.
            while queue and queue[0][0] <= now:
                entry = queue.popleft()
                beat = entry[1]
                if beat is None:
                    continue
                try:
                    again = beat(now)
                except Exception:  # one connection's bug must not stop the others' beats
                    log.exception("heartbeat failed")
                    again = False
                if again and entry[1] is not None:
                    entry[0] = now + self.interval
                    queue.append(entry)


__all__ = ["Beat", "Entry", "Heartbeats"]
