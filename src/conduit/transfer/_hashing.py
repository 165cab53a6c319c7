"""Whole-file SHA-256 on demand (``file_stat(sha256=True)``, a re-run's ``sha256=``), bounded.

A few bytes of request can ask the server to read and hash a whole stored
file, and a re-run check may hash up to ``MAX_VARIANTS`` same-size
candidates. Left on Trio's default thread pool, a client looping such calls
could keep every worker thread reading and starve everyone's ``file_list``
and downloads. So every whole-file hash goes through one :class:`HashGate`
per handler, the same discipline as resume hashing (:mod:`._budget`):

* one hash at a time per connection (a lock the connection owns);
* at most :data:`HASH_THREADS` hashing threads for all connections together,
  admitted in arrival order (:class:`._rationed.RationedThreads`); no other
  work runs on them, so a peer that keeps them busy delays only other
  peers' whole-file hashes, by at most the hashes already under way (small
  uploads are stored on a pool of their own, :class:`._backend_local.LocalBackend`);
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

from ._rationed import RationedThreads
from ._storage import sha256_of_fd

#: Worker threads hashing whole files at once, all connections together.
HASH_THREADS = 2
#: Digests kept (an entry is ~200 bytes).
CACHE_ENTRIES = 4096

_Key = tuple[int, int, int, int, int]


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
