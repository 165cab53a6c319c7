"""What one connection may cost the sending side: read-ahead memory and resume hashing.

A connection owns one :class:`SendBudget` (kept in ``Connection.owned``, so it
goes when the connection ends). Every download and push it serves draws on it:

* :class:`ByteBudget` -- bytes read from disk but not yet handed to the
  connection's outbox. A sender takes its block's worth before reading and gives
  it back once the block is queued, so a peer that stops reading holds at most
  this much file data in this process, however many streams it opens; and a
  sender waiting for credit holds none.
* worker threads -- at most :data:`READ_THREADS` of Trio's worker threads
  read for one connection at once, so one connection's downloads cannot take
  the whole pool from everyone else's ``file_list`` and reads.
* resume hashing -- checking a claimed resume point means hashing the whole
  prefix, which a few bytes of request can make gigabytes. One prefix is hashed
  at a time per connection, in a worker-thread pool shared by every connection
  (so one connection cannot take every thread), and a connection whose claims
  keep turning out wrong loses the right to have them checked at all.
"""

from __future__ import annotations

import attrs
import trio

#: Worker threads one connection's senders may keep reading from disk at once.
READ_THREADS = 4


class ByteBudget:
    """A count of bytes in use, never above ``capacity``; takers wait for room."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self._room = trio.lowlevel.ParkingLot()

    async def take(self, amount: int) -> int:
        """Wait for room, then take ``amount`` (at most the capacity); return what was taken."""
        amount = min(amount, self.capacity)
        while self.in_use + amount > self.capacity:
            await self._room.park()
        self.in_use += amount
        return amount

    def give_back(self, amount: int) -> None:
        """Return what :meth:`take` gave."""
        self.in_use -= amount
        self._room.unpark_all()


@attrs.define(eq=False)
class SendBudget:
    """The sending side's per-connection budget (see the module docstring)."""

    read_ahead: ByteBudget
    #: Taken around each disk read, inside Trio's global thread limit.
    read_threads: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(READ_THREADS)
    )
    #: One resume hash at a time per connection.
    hash_lock: trio.Lock = attrs.field(factory=trio.Lock)
    #: Bytes hashed for resume points that turned out not to match.
    hashed_in_vain: int = 0


__all__ = ["READ_THREADS", "ByteBudget", "SendBudget"]
