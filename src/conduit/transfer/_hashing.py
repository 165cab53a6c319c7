"""Whole-file SHA-256 on demand (``file_stat(sha256=True)``, a re-run's ``sha256=``), bounded.

A few bytes of request can ask the server to read and hash a whole stored
file, and a re-run check may hash up to ``MAX_VARIANTS`` same-size
candidates. Left on Trio's default thread pool, a client looping such calls
could keep every worker thread reading and starve everyone's ``file_list``
and downloads. So every whole-file hash goes through one :class:`HashGate`
per handler, the same discipline as resume hashing (:mod:`._budget`):

* one hash at a time per connection (a lock the connection owns);
* at most :data:`HASH_THREADS` hashing threads for all connections together,
  admitted by owner in turn (:class:`._rationed.RationedThreads`); no other
  work runs on them, so a peer that keeps them busy delays only other
  peers' whole-file hashes, by at most the hashes already under way (small
  uploads are stored on a pool of their own, :class:`._backend_local.LocalBackend`);
* digests are cached by ``(st_dev, st_ino, size, st_mtime_ns, st_ctime_ns)``
  (at most :data:`CACHE_ENTRIES`, least recently used dropped first): asking
  again for an unchanged file costs one ``fstat`` and no read at all, so a
  loop costs what the distinct files cost once.

The cache only remembers *settled* digests, the way git treats "racy" index
entries. Timestamps are coarse (1 s on ext3, HFS+ and many network file
systems, 2 s on FAT; ext4 stamps from the kernel's coarse clock) and a write
through a shared ``mmap`` to a page that is already dirty updates none of them,
so "same key" does not prove "same bytes" for a file changed a moment ago. A
digest is therefore cached only when

* the file's mtime and ctime are at least :data:`SETTLE_NS` older than the
  wall clock read before the hash started (so the last write they record,
  however coarsely, happened before the read began, and the read saw it), and
* an ``fstat`` after the hash shows the same key (and size) as the one
  before it.

A cached entry is served only while its timestamps are still
:data:`SETTLE_NS` in the past (they can only stop being so if the clock is
set back). A file whose key changed while it was hashed is hashed again (at
most :data:`HASH_ATTEMPTS` reads in all); a digest whose key held but whose
timestamps are recent is returned, not remembered, so every ask of a
recently changed file reads it again.

What remains: a writer that changes bytes without updating any timestamp
(``mmap`` stores to a page still dirty from a write more than
:data:`SETTLE_NS` earlier, until the kernel writes it back: about 30 s by
default on Linux) can still get a stale digest served, as it can from any
cache keyed on file metadata; so can a file system whose clock runs more than
:data:`SETTLE_NS` behind this host's (a network file system stamping with its
server's clock).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

from ._rationed import RationedThreads
from ._storage import sha256_of_fd

#: Worker threads hashing whole files at once, all connections together.
HASH_THREADS = 2
#: Digests kept (an entry is ~200 bytes).
CACHE_ENTRIES = 4096
#: How far in the past (ns) a file's mtime and ctime must be, measured from the
#: moment its hash started, for its digest to be cached or served from the cache.
#: The coarsest common timestamp tick is FAT's 2 s (mtime rounded down, so a
#: write stamped ``t`` may have happened up to 2 s after ``t``); one second more
#: covers the coarse kernel clock the stamps come from lagging the wall clock
#: and a write landing on a tick boundary.
SETTLE_NS = 3_000_000_000
#: Reads of one file in one call, at most, while its key keeps changing under them.
HASH_ATTEMPTS = 3

_Key = tuple[int, int, int, int, int]

#: The wall clock (ns since the epoch), the same clock file timestamps come from.
_now_ns = time.time_ns


def _key(info: os.stat_result, size: int) -> _Key:
    return (info.st_dev, info.st_ino, size, info.st_mtime_ns, info.st_ctime_ns)


def _settled(key: _Key, now_ns: int) -> bool:
    """Whether ``key``'s mtime and ctime are both at least :data:`SETTLE_NS` before ``now_ns``."""
    return max(key[3], key[4]) <= now_ns - SETTLE_NS


class HashGate(RationedThreads):
    """The handler's whole-file hashing: per-connection lock, shared threads, digest cache."""

    def __init__(self) -> None:
        """Up to :data:`HASH_THREADS` hashing threads and an empty cache."""
        super().__init__("hashing", HASH_THREADS)
        #: Bytes actually read and hashed (cache misses), for tests and metrics.
        self.hashed_bytes = 0
        self._cache: OrderedDict[_Key, str] = OrderedDict()
        self._lock = threading.Lock()  # the cache is used from worker threads

    def digest_of_fd(self, fd: int, size: int) -> str:
        """SHA-256 hex of the first ``size`` bytes of ``fd`` (worker thread), cached once settled.

        An old, unchanged file: one ``fstat`` and a lookup. Otherwise the file
        is read; its digest is remembered only if the file's timestamps were
        :data:`SETTLE_NS` old when the read began and an ``fstat`` after it
        shows the same key. If the key changed during the read, the file is
        read again (up to :data:`HASH_ATTEMPTS` reads); a file still changing
        after that gets the last read's digest (the bytes as read, what any
        uncached read would answer), never cached.
        """
        for attempt in range(1, HASH_ATTEMPTS + 1):
            started = _now_ns()
            info = os.fstat(fd)
            key = _key(info, size)
            settled = _settled(key, started)
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None:
                    if settled:
                        self._cache.move_to_end(key)
                        return cached
                    del self._cache[key]  # the clock went back: not trusted any more
            result, position = sha256_of_fd(fd, size)
            after = os.fstat(fd)
            unchanged = _key(after, size) == key and after.st_size == info.st_size
            with self._lock:
                self.hashed_bytes += position
                # A file shorter than expected, or one written during the read
                # or within SETTLE_NS before it, is not remembered.
                if unchanged and settled and position == size:
                    self._cache[key] = result
                    while len(self._cache) > CACHE_ENTRIES:
                        self._cache.popitem(last=False)
            if unchanged or attempt == HASH_ATTEMPTS:
                return result
        raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["CACHE_ENTRIES", "HASH_ATTEMPTS", "HASH_THREADS", "SETTLE_NS", "HashGate"]
