"""An object store behind the storage seam (:mod:`._backend`): ``storage_dir="s3://..."``.

Everything goes through the async :class:`conduit.cluster.store.Store`
protocol (:class:`conduit.cluster.s3.S3Store` in practice), whose partials are
multipart uploads with their state beside them, so that any node sharing the
bucket can resume, list, serve, delete and rename what another node stored.
What the local store's disk budget (:mod:`._space`) decides with one lock
around a directory is decided here as follows:

* **Size.** ``max_file_size``, and what the store can hold at all
  (:meth:`Store.check_can_accept`); there is no free-space check.
* **Ownership.** A partial's transfer id is derived from the sender's
  transfer key *and* its owner (the user in accounts mode, else the client's
  host), so another client sending the same file gets a partial of its own
  and can neither resume, reset nor truncate the first; the same client
  resumes it through any node, since every node derives the same id.
* **Memory.** An upload holds up to two parts in memory (one filling, one
  being stored; 8 MiB each by default), so at most
  :data:`MAX_UPLOADS_PER_CONNECTION` run at once per connection and
  :data:`MAX_UPLOADS` per handler; more are refused with ``overloaded``.
* **Abandoned partials.** Kept (their whole parts are durable) for a resume
  from any node. This node indexes the ones it left and evicts an owner's
  oldest beyond :data:`._space.MAX_ABANDONED_PER_OWNER`, the oldest of all
  beyond :data:`._space.MAX_ABANDONED`, and the oldest first
  when ``max_partial_bytes`` would be exceeded, but only while nobody has
  written it since this node left it (the client may have resumed it
  through another node: see :meth:`StoreBackend._evict`); a sweeper
  removes, every :func:`sweep_interval`, every partial of the store nobody
  wrote to for ``partial_ttl`` (whichever node left it).
* **Accounts.** A user's root is a key prefix (``PREFIX/<root>/...``): the
  same confinement, since every name is a checked relative name below it.
  ``quota`` counts the user's published files (one whole listing per
  upload or call of small files, :meth:`~conduit.cluster.store.Store.used_bytes`) and
  the uploads in progress on this node; ``read_only`` refuses changes.

Re-runs store no second copy, as locally (:mod:`._rerun`): same-size
candidates are found with ``stat`` and hashed by reading them back (cached by
location, size and modification time; one hash at a time per connection).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import attrs
import trio

from .. import _threads
from .._log_limit import LimitedLog
from .._stored_errors import detached
from ..accounts import check_root
from ..cluster.store import FileReader, PartialUpload, Store, StoredFile
from ..errors import RPCError, TransferError, UnsafePathError
from ..protocol.connection import Buffer
from ._backend import Admitted, Opened, SmallRead
from ._engine import records_of
from ._hashing import HashGate
from ._local import SmallFile
from ._names import safe_relative_name, split_name
from ._rerun import VariantBudget, names_to_check, skipped_result
from ._space import (
    MAX_ABANDONED,
    MAX_ABANDONED_PER_OWNER,
    check_writable,
    owned_transfer_id,
    partial_owner,
)
from ._wire import as_rpc_error

if TYPE_CHECKING:
    from .._peer import Peer
    from .._streams import OutgoingStream
    from ..cluster.s3 import S3Store
    from ..protocol.data_runs import DataRecord
    from ._batch_store import Entry


def _published_key(root: str, name: str) -> str:
    """Where ``name`` of the root ``root`` ("" for none) is published, below the store's top."""
    return f"{root}/{name}" if root else name


__all__ = [
    "MAX_UPLOADS",
    "MAX_UPLOADS_PER_CONNECTION",
    "StoreBackend",
    "StoreSink",
    "StoreSource",
    "VersionedPartials",
]

log = logging.getLogger("conduit.transfer")

#: Uploads one connection may have open at once on an object store (each holds
#: up to two parts in memory).
MAX_UPLOADS_PER_CONNECTION: Final = 4
#: Uploads the handler may have open at once on an object store.
MAX_UPLOADS: Final = 32
#: Bytes read per call when hashing a stored object.
_HASH_BLOCK: Final = 4 * 1024 * 1024
#: Digests of stored objects kept.
_DIGESTS: Final = 1024


def sweep_interval(partial_ttl: float) -> float:
    """Seconds between two sweeps of the store's expired partials."""
    return max(1.0, min(partial_ttl / 4, 300.0))


class StoreSettings(Protocol):
    """The handler settings the store backend reads at each use."""

    max_file_size: int | None
    overwrite: bool
    partial_ttl: float
    max_partial_bytes: int | None
    hash_gate: HashGate


@runtime_checkable
class VersionedPartials(Protocol):
    """A store whose partials have versions (:class:`conduit.cluster.s3.S3Store`).

    What a node needs to evict a partial it let go of without hitting an
    upload that another node resumed since: see :meth:`StoreBackend._evict`.
    """

    async def partial_version(self, name: str, transfer_id: str) -> tuple[int, str] | None:
        """The partial's durable size and the version of its state; None if there is none."""
        ...

    async def discard_partial_if(self, name: str, transfer_id: str, version: str) -> bool:
        """Discard the partial only if its state is still at ``version``; whether it was."""
        ...


# --------------------------------------------------------------------------- sink and source


class StoreSink:
    """A :class:`._backend.Sink` over a store's :class:`PartialUpload`."""

    def __init__(self, partial: PartialUpload, store: Store) -> None:
        """Wrap an open partial upload of ``store``."""
        self.partial = partial
        self._store = store
        #: Published or discarded: nothing left to resume.
        self.finished = False
        #: Published (counted as such by the backend once released).
        self.published = False
        #: None: parts go to the store from the event loop, so each batch's
        #: write is awaited (see :func:`~._engine.receive_file`).
        self.blocking_write: Callable[[Sequence[Buffer]], None] | None = None

    @property
    def offset(self) -> int:
        """Bytes accepted."""
        return self.partial.offset

    def sha256_hex(self) -> str:
        """Hex SHA-256 of the bytes accepted."""
        return self.partial.sha256_hex()

    async def write(self, chunks: Sequence[Buffer]) -> None:
        """Append ``chunks`` (whole parts go to the store as they fill)."""
        for chunk in chunks:
            await self.partial.append(chunk)

    async def publish(self, *, overwrite: bool, expected_sha256: str) -> str:
        """Verify, complete without overwriting; the name used.

        ``overwrite`` was decided when the partial was opened (an object
        store fixes the final key then); the backend opened it with the same
        setting.
        """
        name = await self.partial.publish(expected_sha256=expected_sha256)
        self.finished = self.published = True
        return name

    async def close(self) -> None:
        """Keep the stored parts for a resume."""
        await self.partial.close()

    async def discard(self) -> None:
        """Abort the upload."""
        self.finished = True
        await self.partial.discard()

    def location_of(self, name: str) -> str:
        """The URL of the published ``name``."""
        return self._store.location_of(name)


class StoreSource:
    """A :class:`._backend.Source` over a store's :class:`FileReader` (one ranged read)."""

    def __init__(self, store: Store, name: str, reader: FileReader) -> None:
        """Read ``name`` of ``store`` through ``reader`` (opened at byte 0)."""
        self._store = store
        self._name = name
        self._reader = reader
        self._position = 0

    async def read_records(
        self,
        stream: OutgoingStream,
        size: int,
        shape: tuple[int, int],
        hasher: Any,
        threads: trio.CapacityLimiter | None,
    ) -> list[DataRecord] | None:
        """See :meth:`._engine.BlockReader.read_records`: one ranged read, then laid out."""
        if threads is None:
            data = await self._reader.read(size)
        else:
            async with threads:
                data = await self._reader.read(size)
        if not data:
            return None
        await _threads.run_sync(hasher.update, data)
        self._position += len(data)
        return records_of(stream.stream_id, data, shape)

    async def check_unchanged(
        self, sent: bytes, span: tuple[int, int], threads: trio.CapacityLimiter | None
    ) -> None:
        """See :meth:`._engine.BlockReader.check_unchanged`: nothing to check, since
        a read streams one version of the object (and :meth:`seek` refuses another)."""

    async def hash_prefix(self, length: int, limiter: trio.CapacityLimiter | None) -> Any:
        """Hash the next ``length`` bytes; ``TransferError`` if the object is shorter."""
        hasher = hashlib.sha256()
        remaining = length
        while remaining > 0:
            block = await self._reader.read(min(_HASH_BLOCK, remaining))
            if not block:
                raise TransferError("the file is shorter than the part to resume", "source_changed")
            await _threads.run_sync(hasher.update, block, limiter=limiter)
            remaining -= len(block)
            self._position += len(block)
        return hasher

    async def seek(self, position: int) -> None:
        """Continue from ``position``: a new ranged read of the same object."""
        if position == self._position:
            return
        reader = await self._store.open_reader(self._name, start=position)
        old = self._reader
        if _identity(reader) != _identity(old):
            await reader.aclose()
            raise TransferError(
                f"{self._name!r} changed on the server; ask again", "source_changed"
            )
        self._reader, self._position = reader, position
        await old.aclose()

    async def aclose(self) -> None:
        """Close the read."""
        await self._reader.aclose()


# --------------------------------------------------------------------------- bookkeeping


@attrs.define(eq=False)
class _Upload:
    """An admitted upload: what it reserves, and who runs it."""

    root: str
    store: Store
    name: str
    transfer_id: str
    owner: str
    size: int
    uploads: set[_Upload]
    sink: StoreSink | None = None


@attrs.define
class _Kept:
    """A partial this node left for a resume."""

    root: str
    store: Store
    name: str
    transfer_id: str
    owner: str
    size: int
    modified: float  # wall clock
    #: The version of its state when it was left (None: the store has none).
    version: str | None = None


# --------------------------------------------------------------------------- backend


class StoreBackend:
    """:class:`._backend.Backend` on a :class:`conduit.cluster.store.Store`."""

    def __init__(
        self,
        store: Store,
        settings: StoreSettings,
        *,
        substore: Callable[[str], Store] | None = None,
    ) -> None:
        """Serve ``store``; ``substore(root)`` gives a user's root (None: no accounts)."""
        self.store = store
        #: Set by whoever built ``store`` when it is an S3 store: a cluster node
        #: without ``cluster_staging`` stages cross-node pushes in it.
        self.cluster_staging: S3Store | None = None
        self._settings = settings
        self._substore = substore
        self._roots: dict[str, Store] = {}
        self._active: set[_Upload] = set()
        self._kept: dict[tuple[str, str, str], _Kept] = {}
        # Per root: bytes published through this node so far (small files and
        # uploads), never lowered. A call of small files lists the root once
        # and adds what was published here since (its own files and every
        # concurrent call's and upload's), so that none of them goes unseen.
        self._published_here: dict[str, int] = {}
        # Per root: bytes of small files whose PUT is under way on this node.
        self._storing: dict[str, int] = {}
        self._digests: OrderedDict[tuple[str, int, str], str] = OrderedDict()
        self._token: trio.lowlevel.TrioToken | None = None
        # Lines about evicted partials, under a budget per owner (a peer
        # evicts its own at will, as with the local disk's DiskBudget). On
        # Trio's clock: this backend evicts from Trio tasks only.
        self._eviction_log = LimitedLog(log)

    # ------------------------------------------------------------------ roots

    def _store_for(self, peer: Peer | None) -> tuple[str, Store]:
        account = getattr(peer, "account", None)
        if account is None:
            return "", self.store
        root = check_root(account.root)
        store = self._roots.get(root)
        if store is None:
            if self._substore is None:
                raise TransferError("this store has no per-user roots", "forbidden")
            store = self._roots[root] = self._substore(root)
        return root, store

    def location_of(self, peer: Peer | None, name: str) -> str:
        """The URL of ``name`` in ``peer``'s root."""
        return self._store_for(peer)[1].location_of(name)

    # ------------------------------------------------------------------ sweeping

    def _ensure_sweeper(self) -> None:
        token = trio.lowlevel.current_trio_token()
        if self._token is not token:
            self._token = token
            trio.lowlevel.spawn_system_task(
                self._sweeper, token, name="conduit store partial sweeper"
            )

    async def _sweeper(self, token: trio.lowlevel.TrioToken) -> None:
        # A system task: it outlives the connections whose partials it expires
        # and ends with the run.
        while self._token is token:
            ttl = self._settings.partial_ttl
            cutoff = time.time() - ttl
            for key, kept in list(self._kept.items()):
                if kept.modified < cutoff:
                    del self._kept[key]
            for store in [self.store, *self._roots.values()]:
                try:
                    removed = await store.cleanup_stale_partials(ttl)
                except Exception:
                    log.exception("sweeping the expired partials of the store failed")
                else:
                    if removed:
                        log.info("removed %d expired partial uploads", removed)
            await trio.sleep(sweep_interval(ttl))

    # ------------------------------------------------------------------ uploads

    async def admit(
        self, peer: Peer, name: str, size: int, key: str | None, *, restart: bool
    ) -> Admitted:
        """See :meth:`._backend.Backend.admit`."""
        self._ensure_sweeper()
        settings = self._settings
        root, store, quota = await self._checked(peer, size)
        used = 0 if quota is None else await self._used(root, store)
        owner = partial_owner(peer)
        transfer_id = owned_transfer_id(key, owner)
        connection = peer.connection
        uploads: set[_Upload] | None = connection.owned.get(self)
        if uploads is None:
            uploads = connection.owned[self] = set()
        # From here to registering the upload nothing waits, so no other
        # admission can count the same room.
        if len(uploads) >= MAX_UPLOADS_PER_CONNECTION or len(self._active) >= MAX_UPLOADS:
            raise TransferError("too many uploads at once; try again later", "overloaded")
        self._check_room(root, name, size, quota, used)
        own = (root, name, transfer_id)
        # Taken out of the index only once the upload is admitted: refused,
        # they stay counted (and are evicted in their turn).
        going = self._older_versions(own, owner) if owner else []
        evict = self._room_for_partials(size, own, going=going)
        older = [self._kept.pop(key) for key in going]
        upload = _Upload(root, store, name, transfer_id, owner, size, uploads)
        self._active.add(upload)
        uploads.add(upload)
        self._kept.pop(own, None)
        try:
            for kept in older:
                await self._evict_logged(kept)
            for kept in evict:
                if await self._evict(kept):
                    # On the budget of the one asking for room, not the victim's.
                    self._eviction_log.info(
                        owner,
                        trio.current_time(),
                        "evicted abandoned partial %r to make room",
                        kept.name,
                    )
            resume = key is not None and not restart
            overwrite = settings.overwrite
            partial = await store.open_partial(
                name, transfer_id, resume=resume, overwrite=overwrite
            )
            if partial.offset > size:
                # Longer than the file: not a prefix of it; start over.
                with trio.CancelScope(shield=True):  # a pending cancel would skip it
                    await partial.close()
                partial = await store.open_partial(
                    name, transfer_id, resume=False, overwrite=overwrite
                )
        except BaseException:
            self._forget(upload)
            raise
        upload.sink = StoreSink(partial, store)
        return Admitted(upload.sink, upload)

    async def _checked(self, peer: Peer, size: int) -> tuple[str, Store, int | None]:
        """The checks that wait, but count nothing: writable, size; the root, its store, quota."""
        check_writable(peer)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise TransferError(f"invalid size {size!r}", "invalid_size")
        root, store = self._store_for(peer)
        await store.check_can_accept(size, self._settings.max_file_size, offset=size)
        return root, store, getattr(getattr(peer, "account", None), "quota", None)

    def _check_room(self, root: str, name: str, size: int, quota: int | None, used: int) -> None:
        """The checks against uploads in progress (no waiting: call right before registering)."""
        # By the key it publishes: two users' roots may nest ("s", "s/b").
        target = _published_key(root, name)
        if self._settings.overwrite and any(
            _published_key(other.root, other.name) == target for other in self._active
        ):
            raise TransferError(
                f"{name!r} is being written by another upload; try again later", "busy"
            )
        if quota is not None:
            reserved = sum(other.size for other in self._active if other.root == root)
            reserved += self._storing.get(root, 0)
            if used + reserved + size > quota:
                raise TransferError(
                    f"the upload would exceed this account's quota of {quota} bytes",
                    "quota_exceeded",
                )

    def _room_for_partials(
        self, size: int, own: tuple[str, str, str], *, going: list[tuple[str, str, str]]
    ) -> list[_Kept]:
        """The abandoned partials to evict (oldest first) so that ``max_partial_bytes``
        holds, besides those ``going`` (older versions the upload evicts)."""
        cap = self._settings.max_partial_bytes
        if cap is None:
            return []
        leaving = {own, *going}
        kept = sorted(
            (entry for key, entry in self._kept.items() if key not in leaving),
            key=lambda entry: entry.modified,
        )
        total = sum(e.size for e in kept) + sum(a.size for a in self._active) + size
        evict = []
        for entry in kept:
            if total <= cap:
                break
            evict.append(entry)
            total -= entry.size
        if total > cap:
            raise TransferError(
                f"unfinished uploads would exceed the limit of {cap} bytes; try again later",
                "no_space",
            )
        for entry in evict:
            self._kept.pop((entry.root, entry.name, entry.transfer_id), None)
        return evict

    def _forget(self, upload: _Upload) -> None:
        self._active.discard(upload)
        upload.uploads.discard(upload)

    def _published(self, root: str, size: int) -> None:
        self._published_here[root] = self._published_here.get(root, 0) + size

    async def _used(self, root: str, store: Store) -> int:
        """A quota user's bytes now: a listing, plus what this node published
        meanwhile (counted twice if the listing saw it too, never not at all)."""
        before = self._published_here.get(root, 0)
        listed = await store.used_bytes()
        return listed + self._published_here.get(root, 0) - before

    async def release(self, admitted: Admitted) -> None:
        """See :meth:`._backend.Backend.release`: index a kept partial, or remove an empty one."""
        upload: _Upload = admitted.ticket
        self._forget(upload)
        sink = upload.sink
        if sink is not None and sink.published:
            # No longer counted as in progress: counted as published instead.
            self._published(upload.root, upload.size)
        if sink is None or sink.finished:
            return
        with trio.CancelScope(shield=True):
            kept = _Kept(
                upload.root,
                upload.store,
                upload.name,
                upload.transfer_id,
                upload.owner,
                0,
                time.time(),
            )
            try:
                kept.size, kept.version = await _find_partial(upload.store, kept)
                if not kept.size:
                    # Nothing to resume: do not keep an upload (and a name) for
                    # nothing. As an eviction: the client may have resumed it
                    # through another node already.
                    await self._evict(kept)
                    return
            except Exception as exc:
                log.warning("could not look up the partial of %r: %s", upload.name, exc)
                return
            self._kept[upload.root, upload.name, upload.transfer_id] = kept
            await self._cap_kept(upload.owner)

    def _older_versions(self, own: tuple[str, str, str], owner: str) -> list[tuple[str, str, str]]:
        """The index's keys of ``owner``'s kept partials of the name ``own``
        uploads under another key: older versions of the file, which no send
        resumes, and whose hold on the name would make the new version's
        publish take the next free name ("r (1).bin"; until 2026-12-07)."""
        root, name, _transfer_id = own
        return [
            key
            for key, kept in self._kept.items()
            if key != own and (kept.root, kept.name, kept.owner) == (root, name, owner)
        ]

    async def forget_partial(self, peer: Peer, name: str, key: str) -> None:
        """See :meth:`._backend.Backend.forget_partial`."""
        root, _store = self._store_for(peer)
        own = (root, safe_relative_name(name), owned_transfer_id(key, partial_owner(peer)))
        kept = self._kept.pop(own, None)
        if kept is not None:
            await self._evict_logged(kept)

    async def _evict_logged(self, kept: _Kept) -> None:
        """:meth:`_evict`, a failure logged: the partial then expires as any other
        (not shielded: the store's calls may take its client's timeouts in a
        stall, and a cancelled begin need not wait for them all)."""
        try:
            await self._evict(kept)
        except trio.Cancelled:
            # Not evicted: back into the index, where it counts and is found
            # again (else a cancelled begin left it uncounted in the store,
            # holding its name: the second review).
            self._kept.setdefault((kept.root, kept.name, kept.transfer_id), kept)
            raise
        except Exception as exc:
            log.warning("could not evict the partial of %r: %s", kept.name, exc)

    async def _evict(self, kept: _Kept) -> bool:
        """Discard a partial this node let go of, unless it is live elsewhere; whether it was.

        The index of kept partials is this node's view, and the client may
        have resumed the partial through another node since (a cluster's
        balancer sends a reconnecting client anywhere): discarding it then
        would abort that node's upload under it, and the client would have
        to start over. So the partial is discarded only if its state is
        still the version this node saw when it let go, which the store
        checks again in the discard itself (a conditional delete), so a
        resume racing with the eviction is not hit either. The caller has
        already dropped it from the index: a partial live elsewhere is that
        node's to count and to keep.
        """
        store = kept.store
        if kept.version is None or not isinstance(store, VersionedPartials):
            return await store.discard_partial(kept.name, kept.transfer_id)
        if await store.discard_partial_if(kept.name, kept.transfer_id, kept.version):
            return True
        log.info("left partial %r alone: it was resumed or changed elsewhere", kept.name)
        return False

    async def _cap_kept(self, owner: str) -> None:
        """Evict ``owner``'s oldest kept partials beyond :data:`MAX_ABANDONED_PER_OWNER`,
        then the oldest of all beyond :data:`MAX_ABANDONED`."""
        mine = sorted(
            (entry for entry in self._kept.values() if entry.owner == owner),
            key=lambda entry: entry.modified,
        )
        victims = mine[: max(0, len(mine) - MAX_ABANDONED_PER_OWNER)]
        excess = len(self._kept) - len(victims) - MAX_ABANDONED
        if excess > 0:
            chosen = {id(entry) for entry in victims}
            others = (entry for entry in self._kept.values() if id(entry) not in chosen)
            victims += heapq.nsmallest(excess, others, key=lambda entry: entry.modified)
        for entry in victims:
            key = (entry.root, entry.name, entry.transfer_id)
            if self._kept.get(key) is not entry:
                # Taken back meanwhile (a resume began here), or left again
                # since (a newer entry): not this eviction's to remove.
                continue
            del self._kept[key]
            try:
                evicted = await self._evict(entry)
            except Exception as exc:
                log.warning("could not evict the partial of %r: %s", entry.name, exc)
            else:
                if evicted:
                    # On the budget of the owner who left one too many.
                    self._eviction_log.info(
                        owner,
                        trio.current_time(),
                        "evicted abandoned partial %r: too many kept",
                        entry.name,
                    )

    async def store_small(self, peer: Peer, entries: list[Entry]) -> None:
        """Each entry in one ``put_file`` (one ``PUT`` on S3), one after the other.

        The same rules as an upload's admission (read-only, size, quota, a
        name being overwritten by an upload), nothing to resume; each
        outcome is left on its entry. A quota user's bytes are counted (a
        whole listing) once per call, then grown by what this node has
        published in that root since (see ``_published_here``); a file whose
        PUT is under way is reserved meanwhile (``_storing``).
        """
        overwrite = self._settings.overwrite
        budget = VariantBudget()  # one for the whole call (see _rerun)
        listed: int | None = None  # this call's _used() when first needed
        published_before = 0
        for entry in entries:
            if entry.error is not None:
                continue
            try:
                entry.safe = safe_relative_name(entry.name)
                size = len(entry.data)
                answer = await self.rerun_answer(peer, entry.safe, size, entry.sha256, budget)
                if answer is not None and answer.get("skipped") is True:
                    entry.published, entry.skipped = answer["path"], True
                    continue
                root, store, quota = await self._checked(peer, size)
                used = 0
                if quota is not None:
                    if listed is None:
                        listed = await self._used(root, store)
                        published_before = self._published_here.get(root, 0)
                    used = listed + self._published_here.get(root, 0) - published_before
                self._check_room(root, entry.safe, size, quota, used)
                # Reserved while its PUT is under way (the check above does not
                # wait): other calls and admissions see it until it counts as published.
                self._storing[root] = self._storing.get(root, 0) + size
                try:
                    entry.published = await store.put_file(
                        entry.safe, entry.data, sha256=entry.sha256, overwrite=overwrite
                    )
                    # An overwrite's replaced file is not taken off: counted high, never low.
                    self._published(root, size)
                finally:
                    self._storing[root] -= size
            except Exception as exc:
                entry.error = as_rpc_error(exc, name=entry.name)

    async def rerun_answer(
        self, peer: Peer, name: str, size: int, sha256: str, budget: VariantBudget | None = None
    ) -> dict[str, Any] | None:
        """See :meth:`._backend.Backend.rerun_answer` (candidates by stat, hashed by reading;
        ``budget``: what hashing variants may still read, see :class:`._rerun.VariantBudget`)."""
        _root, store = self._store_for(peer)
        candidates = await self._same_size(store, name, size)
        if not candidates:
            return None
        if not sha256:
            return {"check_sha256": True}
        wanted = sha256.strip().lower()
        for stored in candidates:
            if budget is not None and stored.name != name and not budget.allows(size):
                return None
            digest = await self._digest(peer, store, stored)
            if hmac.compare_digest(digest, wanted):
                return skipped_result(stored.name, size, sha256)
        return None

    async def _same_size(self, store: Store, name: str, size: int) -> list[StoredFile]:
        """``name`` and its collision variants up to the first free one, of ``size`` bytes.

        Only ``name`` when this receiver overwrites (see :func:`._rerun.names_to_check`).
        """
        directories, basename = split_name(name)
        found = []
        for candidate in names_to_check(basename, overwrite=self._settings.overwrite):
            try:
                stored = await store.stat("/".join((*directories, candidate)))
            except FileNotFoundError:
                break
            if stored.size == size:
                found.append(stored)
        return found

    async def _digest(self, peer: Peer, store: Store, stored: StoredFile) -> str:
        """SHA-256 hex of a stored object: read back, one at a time per connection, cached.

        Cached by the object's version (its ETag), never by its modification
        time: S3 gives that to the second, and a same-size replacement within
        the second would otherwise be taken for the file it replaced.
        """
        key = (store.location_of(stored.name), stored.size, stored.version)
        cached = self._digests.get(key) if stored.version else None
        if cached is not None:
            self._digests.move_to_end(key)
            return cached
        gate = self._settings.hash_gate
        async with gate.lock_for(peer.connection), gate.limiter.slot(partial_owner(peer)):
            reader = await store.open_reader(stored.name)
            try:
                if _identity(reader) != (stored.size, stored.modified_ns, stored.version):
                    raise TransferError(f"{stored.name!r} changed; ask again", "source_changed")
                source = StoreSource(store, stored.name, reader)
                # (Its blocks on Trio's threads: the slot bounds the hashes.)
                digest: str = (await source.hash_prefix(stored.size, None)).hexdigest()
            finally:
                await reader.aclose()
        gate.hashed_bytes += stored.size
        if not stored.version:
            return digest
        self._digests[key] = digest
        while len(self._digests) > _DIGESTS:
            self._digests.popitem(last=False)
        return digest

    # ------------------------------------------------------------------ reads

    async def list_files(
        self, peer: Peer | None, *, max_entries: int, prefix: str | None, after: str | None = None
    ) -> list[dict[str, Any]]:
        """See :meth:`._backend.Backend.list_files`."""
        _root, store = self._store_for(peer)
        entries = await store.list_files(max_entries=max_entries, prefix=prefix, after=after)
        return [{"name": e.name, "size": e.size, "modified": e.modified} for e in entries]

    async def stat(self, peer: Peer, name: str, *, sha256: bool) -> dict[str, Any]:
        """See :meth:`._backend.Backend.stat`: a ``HEAD``; ``sha256`` reads the object back."""
        _root, store = self._store_for(peer)
        try:
            stored = await store.stat(name)
        except FileNotFoundError as exc:
            raise await _missing(store, name, exc) from None
        except Exception as exc:
            raise as_rpc_error(exc, name=name) from None
        answer: dict[str, Any] = {
            "name": stored.name,
            "size": stored.size,
            "modified_ns": stored.modified_ns,
        }
        if sha256:
            try:
                answer["sha256"] = await self._digest(peer, store, stored)
            except Exception as exc:
                raise as_rpc_error(exc, name=name) from None
        return answer

    async def open_source(self, peer: Peer, name: str) -> Opened:
        """See :meth:`._backend.Backend.open_source`: one ranged ``GET`` (again after a seek)."""
        _root, store = self._store_for(peer)
        safe = safe_relative_name(name)
        reader = await store.open_reader(safe)
        return Opened(StoreSource(store, safe, reader), reader.size, reader.modified_ns)

    async def read_small_files(
        self, peer: Peer, names: list[str], limit: int, room: int, threads: trio.CapacityLimiter
    ) -> list[SmallRead]:
        """See :meth:`._backend.Backend.read_small_files`: one ranged ``GET`` each."""
        _root, store = self._store_for(peer)
        reads = []
        used = 0
        for name in names:
            try:
                read = await self._read_whole(store, name, min(limit, room - used), threads)
            except FileNotFoundError as exc:
                # As file_stat answers it (the local store's batch does the same).
                read = SmallRead(0, 0, None, detached(await _missing(store, name, exc)))
            except (OSError, UnsafePathError, TransferError, RPCError) as exc:
                # Detached: kept in ``reads``, which this frame (in its traceback) holds.
                read = SmallRead(0, 0, None, detached(exc))
            if read.small is not None:
                used += read.size
            reads.append(read)
        return reads

    @staticmethod
    async def _read_whole(
        store: Store, name: str, max_size: int, threads: trio.CapacityLimiter
    ) -> SmallRead:
        """One file of :meth:`read_small_files`, one byte more asked than the object
        holds (a read is of one version of the object)."""
        reader = await store.open_reader(safe_relative_name(name))
        try:
            size, modified_ns = reader.size, reader.modified_ns
            if size > max_size:
                return SmallRead(size, modified_ns, None)
            parts: list[bytes] = []
            read = 0
            async with threads:
                while read <= size:
                    block = await reader.read(size + 1 - read)
                    if not block:
                        break
                    parts.append(block)
                    read += len(block)
        finally:
            with trio.CancelScope(shield=True):
                await reader.aclose()
        if read != size:
            return SmallRead(size, modified_ns, None)
        data = b"".join(parts)
        digest = await _threads.run_sync(lambda: hashlib.sha256(data).hexdigest())
        return SmallRead(size, modified_ns, SmallFile(data, digest))

    # ------------------------------------------------------------------ changes

    async def delete(self, peer: Peer, name: str) -> None:
        """See :meth:`._backend.Backend.delete`."""
        _root, store = self._store_for(peer)
        safe = safe_relative_name(name)
        if not await store.delete(safe):
            raise FileNotFoundError(2, "no such file in storage", safe)

    async def rename(self, peer: Peer, old: str, new: str, *, overwrite: bool) -> str:
        """See :meth:`._backend.Backend.rename`: a server-side copy, then a delete.

        Without ``overwrite`` an existing ``new`` is refused with ``exists``;
        the copy itself is conditional (``If-None-Match: *``), so a writer
        that creates ``new`` in between is never overwritten either (the file
        then takes a collision variant of ``new``).
        """
        _root, store = self._store_for(peer)
        source, target = safe_relative_name(old), safe_relative_name(new)
        await store.stat(source)  # FileNotFoundError first, as locally
        if source == target:
            raise TransferError(f"{source!r} and {target!r} are the same name", "exists")
        if not overwrite:
            try:
                await store.stat(target)
            except FileNotFoundError:
                pass
            else:
                raise TransferError(f"{target!r} already exists", "exists")
        return await store.rename(source, target, overwrite=overwrite)


async def _find_partial(store: Store, kept: _Kept) -> tuple[int, str | None]:
    """The durable size of ``kept``'s partial (0: none) and its version, if the store has them."""
    if isinstance(store, VersionedPartials):
        found = await store.partial_version(kept.name, kept.transfer_id)
        return (0, None) if found is None else found
    return await store.find_partial(kept.name, kept.transfer_id) or 0, None


def _identity(reader: FileReader) -> tuple[int, int, str]:
    """What tells two versions of a stored file apart (the version: mtimes are to the second)."""
    return reader.size, reader.modified_ns, reader.version


async def _missing(store: Store, name: str, exc: FileNotFoundError) -> RPCError:
    """What a name with no object says: ``is_directory`` when files live below it."""
    if await _is_directory(store, name):
        return RPCError(f"{name!r} is a directory", "is_directory")
    return as_rpc_error(exc, name=name)


async def _is_directory(store: Store, name: str) -> bool:
    """Whether published files live below ``name`` (an object store has no directories)."""
    try:
        return bool(await store.list_files(max_entries=1, prefix=name))
    except Exception:
        return False
