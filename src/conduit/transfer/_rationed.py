"""A few persistent worker threads shared by every connection, one call at a time each.

Work a peer asks for with a few bytes but that takes a worker thread for a
while (hashing a whole file, storing a batch of small files) must not let one
connection, or a few, take every thread of the server. A
:class:`RationedThreads` gives each kind of such work its own pool:

* one call at a time per connection (a lock the connection owns, released
  with it);
* at most ``threads`` calls at once for all connections together
  (:class:`FairLimiter`): when they are all taken, the calls waiting are
  admitted by owner in turn, a user or in shared-password mode a client's
  host (:func:`._space.partial_owner`), each owner's in arrival order. So a
  waiting owner is served after the calls under way and at most one call
  of each other owner waiting, however many connections those have (in
  arrival order alone, a user with 32 connections listing a large root kept
  another user's listing of one file waiting 3.3 s, until 2026-12-05); an
  owner alone still has every thread;
* on persistent threads (:class:`.._worker_hop.WorkerHop`), since a
  ``trio.to_thread`` hop per small file cost more than the file.

Two kinds of work on one pool would wait for each other: a small upload of
100 bytes queued behind two whole-file hashes of a large file, which a peer
can ask for in a loop, took seconds (the handler has one pool per kind:
:class:`._hashing.HashGate` for hashes, and the local store's pool for small
files, whose own hashing is bounded by their size).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Hashable
from typing import TYPE_CHECKING, TypeVar

import trio

from .._worker_hop import WorkerHop
from ._space import partial_owner

if TYPE_CHECKING:
    from .._connection import Connection
    from .._peer import Peer

T = TypeVar("T")


class FairLimiter:
    """At most ``total`` holders at once; waiters admitted by owner in turn.

    Each owner's waiters queue in arrival order, and the owners take turns: a
    slot given back goes to the first waiter of the owner that has waited
    longest for its turn, and that owner goes to the back of the line.
    """

    def __init__(self, total: int) -> None:
        """A limiter of ``total`` slots, all free."""
        self._free = total
        # Owners with calls waiting, in the order of their turns.
        self._waiting: collections.OrderedDict[str, collections.deque[trio.Event]] = (
            collections.OrderedDict()
        )

    def acquire_nowait(self) -> bool:
        """Take a slot if one is free and nobody waits for one; whether it did."""
        if self._free and not self._waiting:
            self._free -= 1
            return True
        return False

    async def acquire(self, owner: str) -> None:
        """Wait for a slot, in ``owner``'s turn."""
        handed = trio.Event()
        self._waiting.setdefault(owner, collections.deque()).append(handed)
        try:
            await handed.wait()
        except BaseException:
            if handed.is_set():
                self.release()  # handed over as we were cancelled: pass it on
            else:
                queue = self._waiting[owner]
                queue.remove(handed)
                if not queue:
                    del self._waiting[owner]
            raise

    @contextlib.asynccontextmanager
    async def slot(self, owner: str) -> AsyncIterator[None]:
        """Hold a slot (waiting in ``owner``'s turn) for the body."""
        if not self.acquire_nowait():
            await self.acquire(owner)
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        """Give a slot back: to the next owner's first waiter, if any waits."""
        if not self._waiting:
            self._free += 1
            return
        owner, queue = next(iter(self._waiting.items()))
        handed = queue.popleft()
        if queue:
            self._waiting.move_to_end(owner)
        else:
            del self._waiting[owner]
        handed.set()


class RationedThreads:
    """``threads`` shared worker threads, one call at a time per connection, fair by owner."""

    def __init__(self, name: str, threads: int) -> None:
        """A pool of at most ``threads`` threads called ``name`` (started on demand)."""
        #: Admits at most ``threads`` calls at once, owners in turn.
        self.limiter = FairLimiter(threads)
        #: The pool's threads (at most ``threads``: the limiter admits no more calls).
        self.hop = WorkerHop(name, max_threads=threads)

    def lock_for(self, connection: Connection) -> trio.Lock:
        """``connection``'s lock for this pool (one call at a time per connection)."""
        lock: trio.Lock | None = connection.owned.get(self)
        if lock is None:
            lock = connection.owned[self] = trio.Lock()
        return lock

    async def run(
        self,
        peer: Peer,
        function: Callable[[], T],
        *,
        wait_inline: float = 0.0,
        inline_kind: Hashable = None,
    ) -> T:
        """Run ``function`` on the pool, within the share of ``peer``'s connection and owner.

        ``wait_inline``, ``inline_kind``: see :meth:`.._worker_hop.WorkerHop.run`.
        """
        # The fast paths take a free lock and slot without the two
        # checkpoints each of ``async with`` costs; the hop itself is the
        # call's cancel point (and its schedule point, unless it was waited
        # for inline: then the RPC that carried it yields on its way out).
        lock = self.lock_for(peer.connection)
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            limiter = self.limiter
            if not limiter.acquire_nowait():
                await limiter.acquire(partial_owner(peer))
            try:
                return await self.hop.run(
                    function, wait_inline=wait_inline, inline_kind=inline_kind
                )
            finally:
                limiter.release()
        finally:
            lock.release()


__all__ = ["FairLimiter", "RationedThreads"]
