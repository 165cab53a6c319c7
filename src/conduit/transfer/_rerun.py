"""Re-runs store no second copy: recognising a file that already arrived complete.

A file counts as already there when a published file has the same relative
name (or one of its collision variants ``name (1).ext``, ... up to the first
free one: where an earlier run stored it), the same size and the same SHA-256
as the one offered. A receiver that overwrites (``overwrite=True``) publishes
under the name itself, never a variant, so there only the name counts: a new
version of ``a.txt`` that equals ``a (1).txt`` must still replace ``a.txt``. Nothing weaker
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

What a call of small files may read for it is bounded (:class:`VariantBudget`):
each file's own name is always checked, its collision variants only while
:data:`VARIANT_READ_BUDGET` lasts. Without it, a batch of 64 names with 100
same-size variants each (6,400 files, more than the digest cache holds) made
one store thread read 100 times the batch's size, every time it was sent.
Past the budget, a file that is there only under a variant is stored again,
under the next free one: a second copy, never a lost or a wrong file.
"""

from __future__ import annotations

import hmac
import itertools
import stat
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs

from .. import _threads
from ._names import collision_candidates, split_name
from ._storage import StorageRoot

if TYPE_CHECKING:
    from .._peer import Peer
    from ._hashing import HashGate

#: The ``reason`` of a skipped file.
ALREADY_THERE = "already_there"


#: Collision variants (``name (1).ext``, ...) looked at, at most: a re-run of a
#: file that once collided finds its earlier copy there.
MAX_VARIANTS = 100

#: Bytes one call of small files (``file_upload_small``, a batch) may read
#: hashing collision variants for its re-run checks (see :class:`VariantBudget`):
#: 16 batches of the default 1 MiB frame, where a re-run reads each file's own
#: name once.
VARIANT_READ_BUDGET = 16 * 1024 * 1024


def _budget_default() -> int:
    return VARIANT_READ_BUDGET  # read at each call: tests lower it


@attrs.define
class VariantBudget:
    """What one call may still read hashing collision variants (``name (1).ext``, ...).

    A file's own name is always checked (a re-run's common case); each
    variant looked at takes its size from :attr:`left` (one whose digest is
    cached too, though it reads nothing: the budget is what could be read),
    and none is looked at once that would go below zero.
    """

    left: int = attrs.field(factory=_budget_default)

    def allows(self, size: int) -> bool:
        """Take ``size`` bytes for hashing one variant; False (nothing taken) past the budget."""
        if size > self.left:
            return False
        self.left -= size
        return True


def names_to_check(basename: str, *, overwrite: bool) -> Iterable[str]:
    """The base names where an earlier run may have stored ``basename``, in order.

    The name, then (unless the receiver overwrites, and so never stores under
    another name) the collision variants a non-overwriting publish would have
    produced, at most :data:`MAX_VARIANTS`.
    """
    if overwrite:
        return (basename,)
    return itertools.chain(
        [basename], itertools.islice(collision_candidates(basename), MAX_VARIANTS)
    )


def _candidates(storage: StorageRoot, name: str, size: int, *, overwrite: bool) -> list[str]:
    """``name`` and its collision variants up to the first free one, of exactly ``size`` bytes.

    The variants are those a non-overwriting publish would have produced, in
    the same order, so the walk stops at the first name that was never taken.
    A name taken by something else (a directory, a symlink) does not stop it:
    a publish went past it too. With ``overwrite``, only ``name``.
    """
    directories, basename = split_name(name)
    found = []
    for candidate in names_to_check(basename, overwrite=overwrite):
        full = "/".join((*directories, candidate))
        info = storage.entry_stat(full)
        if info is None:
            break
        if stat.S_ISREG(info.st_mode) and info.st_size == size:
            found.append(full)
    return found


async def same_size_exists(storage: StorageRoot, name: str, size: int, *, overwrite: bool) -> bool:
    """Whether ``storage`` has ``name`` (or, unless ``overwrite``, a collision variant)
    of ``size`` bytes (cheap)."""
    return bool(
        await _threads.run_sync(lambda: _candidates(storage, name, size, overwrite=overwrite))
    )


def find_sync(
    storage: StorageRoot,
    name: str,
    size: int,
    sha256: str,
    hash_fd: Callable[[int, int], str] | None = None,
    budget: VariantBudget | None = None,
    *,
    overwrite: bool,
) -> str | None:
    """:func:`find_already_there` for a worker thread (``hash_fd``: a cached hasher;
    ``budget``: what hashing variants may still read, see :class:`VariantBudget`)."""
    wanted = sha256.strip().lower()
    for candidate in _candidates(storage, name, size, overwrite=overwrite):
        if budget is not None and candidate != name and not budget.allows(size):
            return None
        existing = storage.existing_sha256(candidate, size, hash_fd)
        if existing is not None and hmac.compare_digest(existing, wanted):
            return candidate
    return None


async def find_already_there(
    storage: StorageRoot,
    name: str,
    size: int,
    sha256: str,
    gate: tuple[HashGate, Peer] | None = None,
    *,
    overwrite: bool,
) -> str | None:
    """The stored name (``name`` or, unless ``overwrite``, a variant) holding exactly
    this size and SHA-256, if any.

    ``gate``: the handler's :class:`HashGate` and the asking peer; its request
    then hashes within its connection's share (one hash at a time, shared
    threads admitting owners in turn, cached digests) instead of on Trio's
    default pool.
    """
    if gate is None:
        return await _threads.run_sync(
            lambda: find_sync(storage, name, size, sha256, overwrite=overwrite)
        )
    hashing, peer = gate
    return await hashing.run(
        peer,
        lambda: find_sync(storage, name, size, sha256, hashing.digest_of_fd, overwrite=overwrite),
    )


def asks_for_sha256(answer: Any) -> bool:
    """Whether a begin answer is ``{"check_sha256": True}`` (begin again with ``sha256=``)."""
    return isinstance(answer, dict) and answer.get("check_sha256") is True


def says_skipped(answer: Any) -> bool:
    """Whether a begin answer says the file is already there (nothing to send)."""
    return isinstance(answer, dict) and answer.get("skipped") is True


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


def kept_download_result(name: str, size: int, sha256: str, path: str) -> dict[str, Any]:
    """The success result of a download whose file this side already holds at ``path``:
    the keys of a download that moved its bytes, none of them moved."""
    return skipped_result(name, size, sha256, path=path, resumed_from=0, elapsed=0.0, speed=0.0)
