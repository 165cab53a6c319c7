"""A few persistent worker threads shared by every connection, one call at a time each.

Work a peer asks for with a few bytes but that takes a worker thread for a
while (hashing a whole file, storing a batch of small files) must not let one
connection, or a few, take every thread of the server. A
:class:`RationedThreads` gives each kind of such work its own pool:

* one call at a time per connection (a lock the connection owns, released
  with it);
* at most ``threads`` calls at once for all connections together, admitted
  in arrival order (:attr:`RationedThreads.limiter`, a FIFO
  :class:`trio.CapacityLimiter`), so a waiting connection is served after
  the calls already under way, never after an unbounded stream of them;
* on persistent threads (:class:`.._worker_hop.WorkerHop`), since a
  ``trio.to_thread`` hop per small file cost more than the file.

Two kinds of work on one pool would wait for each other: a small upload of
100 bytes queued behind two whole-file hashes of a large file, which a peer
can ask for in a loop, took seconds (the handler has one pool per kind:
:class:`._hashing.HashGate` for hashes, and the local store's pool for small
files, whose own hashing is bounded by their size).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import trio

from .._worker_hop import WorkerHop

if TYPE_CHECKING:
    from .._connection import Connection

T = TypeVar("T")


class RationedThreads:
    """``threads`` shared worker threads, one call at a time per connection."""

    def __init__(self, name: str, threads: int) -> None:
        """A pool of at most ``threads`` threads called ``name`` (started on demand)."""
        #: Admits at most ``threads`` calls at once, in arrival order.
        self.limiter = trio.CapacityLimiter(threads)
        #: The pool's threads (at most ``threads``: the limiter admits no more calls).
        self.hop = WorkerHop(name, max_threads=threads)

    def lock_for(self, connection: Connection) -> trio.Lock:
        """``connection``'s lock for this pool (one call at a time per connection)."""
        lock: trio.Lock | None = connection.owned.get(self)
        if lock is None:
            lock = connection.owned[self] = trio.Lock()
        return lock

    async def run(
        self, connection: Connection, function: Callable[[], T], *, wait_inline: float = 0.0
    ) -> T:
        """Run ``function`` on the pool, within ``connection``'s share.

        ``wait_inline``: see :meth:`.._worker_hop.WorkerHop.run`.
        """
        # The fast paths take a free lock and limiter without the two
        # checkpoints each of ``async with`` costs; the hop itself is the
        # call's cancel point (and its schedule point, unless it was waited
        # for inline: then the RPC that carried it yields on its way out).
        lock = self.lock_for(connection)
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            limiter = self.limiter
            try:
                limiter.acquire_nowait()
            except trio.WouldBlock:
                await limiter.acquire()
            try:
                return await self.hop.run(function, wait_inline=wait_inline)
            finally:
                limiter.release()
        finally:
            lock.release()


__all__ = ["RationedThreads"]
