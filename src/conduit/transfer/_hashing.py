"""Whole-file SHA-256 on demand (``file_stat(sha256=True)``, a re-run's ``sha256=``), bounded.

A few bytes of request can ask the server to read and hash a whole stored
file, and a re-run check may hash up to ``MAX_VARIANTS`` same-size
candidates. Left on Trio's default thread pool, a client looping such calls
could keep every worker thread reading and starve everyone's ``file_list``
and downloads. So every whole-file hash goes through one :class:`HashGate`
per handler, the same discipline as resume hashing (:mod:`._budget`):

* one hash at a time per connection (a lock the connection owns);
* at most :data:`HASH_THREADS` hashing threads for all connections together
  (:attr:`HashGate.limiter`), kept as persistent threads of a
  :class:`.._worker_hop.WorkerHop`: a small upload's store runs here, and a
  ``trio.to_thread`` hop per file cost more than the file;
* digests are cached by ``(st_dev, st_ino, size, st_mtime_ns, st_ctime_ns)``
  (at most :data:`CACHE_ENTRIES`, least recently used dropped first): asking
  again for an unchanged file costs no read at all, so a loop costs what the
  distinct files cost once. Any change to the file (a write or a rename over
  it changes mtime, ctime or the inode) misses the cache.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import trio

from .._worker_hop import WorkerHop
from ._storage import sha256_of_fd

if TYPE_CHECKING:
    from .._connection import Connection

#: Worker threads hashing whole files at once, all connections together.
HASH_THREADS = 2
#: Digests kept (an entry is ~200 bytes).
CACHE_ENTRIES = 4096

T = TypeVar("T")
_Key = tuple[int, int, int, int, int]


class HashGate:
    """The handler's whole-file hashing: per-connection lock, shared threads, digest cache."""

    def __init__(self) -> None:
        self.limiter = trio.CapacityLimiter(HASH_THREADS)
        #: Bytes actually read and hashed (cache misses), for tests and metrics.
        self.hashed_bytes = 0
        self._cache: OrderedDict[_Key, str] = OrderedDict()
        self._lock = threading.Lock()  # the cache is used from worker threads
        #: The gate's threads (at most HASH_THREADS: the limiter admits no more calls).
        self.hop = WorkerHop("hashing", max_threads=HASH_THREADS)

    def lock_for(self, connection: Connection) -> trio.Lock:
        """``connection``'s hashing lock (one whole-file hash at a time per connection)."""
        lock: trio.Lock | None = connection.owned.get(self)
        if lock is None:
            lock = connection.owned[self] = trio.Lock()
        return lock

    async def run(
        self, connection: Connection, function: Callable[[], T], *, wait_inline: float = 0.0
    ) -> T:
        """Run ``function`` (which hashes via :meth:`digest_of_fd`) within the gate.

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

    def digest_of_fd(self, fd: int, size: int) -> str:
        """SHA-256 hex of the first ``size`` bytes of ``fd`` (worker thread), cached."""
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino, size, info.st_mtime_ns, info.st_ctime_ns)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        result, position = sha256_of_fd(fd, size)
        with self._lock:
            self.hashed_bytes += position
            if position == size:  # a file shorter than expected is not remembered
                self._cache[key] = result
                while len(self._cache) > CACHE_ENTRIES:
                    self._cache.popitem(last=False)
        return result


__all__ = ["CACHE_ENTRIES", "HASH_THREADS", "HashGate"]
