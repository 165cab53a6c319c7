"""The running hashes of partial files no transfer holds, so that a resume need not read them again.

A resumed transfer checks the bytes its partial holds by their SHA-256,
which this side computes by reading the partial whole
(:meth:`._storage.PartialFile.rehash_prefix`): seconds for many GiB. A peer
that begins the same upload again and again (each begin replaces the
attempt before it) made the server read it again each time: 271 begins
over four partials of 48 MiB hashed 15 GiB in 9 s, and slowed every other
user's work on the same threads (a review, 2026-12-07).

So when a partial is closed its running hash is kept here, with what says
the file has not changed since: its device and inode, its size, and its
modification and change times to the nanosecond (anything that writes to
the file, truncates it, renames or links it moves its change time). A
resume that finds the file so takes the hash over instead of reading it;
one that finds it otherwise reads it whole, as before. A hash stopped part
way (its transfer given up) keeps what it read, and the next resume reads
on from there. Bounded: the last :data:`MAX_KEPT` partials, a hash object
(about 200 bytes) each; a partial this process removes (expired, evicted,
discarded) takes its hash with it.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any

import attrs

#: The most hashes kept (the oldest go first): as many as the abandoned
#: partials a server keeps in all (``_space.MAX_ABANDONED``).
MAX_KEPT = 10_000


@attrs.frozen
class _Kept:
    size: int
    modified_ns: int
    changed_ns: int
    #: Bytes the digest covers (the file's first ones).
    hashed: int
    digest: Any


class PrefixDigests:
    """Kept hashes by file (device, inode); used from worker threads."""

    def __init__(self, max_kept: int = MAX_KEPT) -> None:
        """A table of at most ``max_kept`` hashes."""
        self._max_kept = max_kept
        self._kept: collections.OrderedDict[tuple[int, int], _Kept] = collections.OrderedDict()
        self._lock = threading.Lock()

    def keep(self, stat: os.stat_result, hashed: int, digest: Any) -> None:
        """Keep ``digest`` (hashlib's, of the first ``hashed`` bytes of the file ``stat``
        describes; this takes it over, the caller gives it up)."""
        kept = _Kept(stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, hashed, digest)
        with self._lock:
            self._kept[(stat.st_dev, stat.st_ino)] = kept
            self._kept.move_to_end((stat.st_dev, stat.st_ino))
            while len(self._kept) > self._max_kept:
                self._kept.popitem(last=False)

    def take(self, stat: os.stat_result) -> tuple[int, Any] | None:
        """The bytes covered and the hash kept for the file ``stat`` describes, if
        the file is as it was then (else None); forgotten here either way."""
        with self._lock:
            kept = self._kept.pop((stat.st_dev, stat.st_ino), None)
        if (
            kept is None
            or kept.size != stat.st_size
            or kept.modified_ns != stat.st_mtime_ns
            or kept.changed_ns != stat.st_ctime_ns
            or kept.hashed > stat.st_size
        ):
            return None
        return kept.hashed, kept.digest

    def forget(self, stat: os.stat_result) -> None:
        """Forget the hash kept for the file ``stat`` describes, if any: it is
        being removed (its entry would otherwise stay until the table's
        bound pushed it out)."""
        with self._lock:
            self._kept.pop((stat.st_dev, stat.st_ino), None)

    def __len__(self) -> int:
        return len(self._kept)


#: The process's table: partials of every root and transfer.
PREFIX_DIGESTS = PrefixDigests()
