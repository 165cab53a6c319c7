"""Re-runs store no second copy: recognising a file that already arrived complete.

A file counts as already there when a published file has the same relative
name, the same size and the same SHA-256 as the one offered. Nothing weaker
(name and size, or a modification time) is trusted: a different file of the
same size under a taken name still gets the collision policy (``name (1).ext``).

Who hashes what, so that the common case costs nothing:

* small files (sent in one call) carry their SHA-256 anyway; the receiver
  hashes its same-size file, if it has one, and compares;
* a streamed upload or push asks ``begin`` first; only when the receiver has a
  published file of exactly that size does it answer ``{"check_sha256": True}``,
  and the sender then hashes its local file (one extra read, paid only on that
  collision) and begins again with ``sha256=``; the receiver compares with its
  own file's hash and answers ``{"already_there": True}`` or begins as usual;
* a download whose local target exists with the server's size asks
  ``file_stat(name, sha256=True)`` and compares with the local file's hash.
"""

from __future__ import annotations

import hmac
from typing import Any

import trio

from ._storage import StorageRoot

#: The ``reason`` of a skipped file.
ALREADY_THERE = "already_there"


async def same_size_exists(storage: StorageRoot, name: str, size: int) -> bool:
    """Whether ``storage`` has a published regular file ``name`` of ``size`` bytes (cheap)."""
    return await trio.to_thread.run_sync(storage.published_size, name) == size


async def is_already_there(storage: StorageRoot, name: str, size: int, sha256: str) -> bool:
    """Whether ``storage`` holds ``name`` with exactly this size and SHA-256 (hashes it)."""
    existing = await trio.to_thread.run_sync(storage.existing_sha256, name, size)
    return existing is not None and hmac.compare_digest(existing, sha256.strip().lower())


def skipped_result(name: str, size: int, sha256: str, **extra: Any) -> dict[str, Any]:
    """The success result for a file that was not transferred because it is already there."""
    return {
        "success": True,
        "skipped": True,
        "reason": ALREADY_THERE,
        "path": name,
        "filename": name,
        "size": size,
        "checksum": sha256,
        **extra,
    }
