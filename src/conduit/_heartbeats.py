"""One timer task for the heartbeats of many connections.

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

A server runs one in its nursery for all its connections. Clients share one
per Trio run and interval (:func:`shared`, a system task started on first
use): a ``Client`` has one connection at a time, but a process may make many
clients, or reconnect one many times, and each connection would otherwise
start and end a task of its own on the connect's critical path.
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
                self._beat(queue.popleft(), now)

    def _beat(self, entry: Entry, now: float) -> None:
        """Beat one due entry, and queue it again if its connection goes on.

        A method of its own so that the loop's locals never hold an entry's
        callback: a connection whose last beat ended it would otherwise stay
        in memory until the next beat of another one (on an idle server, for
        ever).
        """
        beat = entry[1]
        if beat is None:
            return
        try:
            again = beat(now)
        except Exception:  # one connection's bug must not stop the others' beats
            log.exception("heartbeat failed")
            again = False
        if again and entry[1] is not None:
            entry[0] = now + self.interval
            self._queue.append(entry)


#: This Trio run's shared timers, by interval (see :func:`shared`).
_SHARED: trio.lowlevel.RunVar[dict[float, Heartbeats]] = trio.lowlevel.RunVar("conduit_heartbeats")


def shared(interval: float) -> Heartbeats:
    """The timer of ``interval`` shared by the current Trio run's client connections.

    Started on first use as a system task; it parks while no connection
    needs it and ends with the run.
    """
    try:
        timers = _SHARED.get()
    except LookupError:
        timers = {}
        _SHARED.set(timers)
    timer = timers.get(interval)
    if timer is None:
        timer = timers[interval] = Heartbeats(interval)
        trio.lowlevel.spawn_system_task(timer.run, name=f"conduit heartbeats every {interval:g}s")
    return timer


__all__ = ["Beat", "Entry", "Heartbeats", "shared"]
