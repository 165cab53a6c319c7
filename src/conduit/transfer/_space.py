"""The receiving side's disk budget: reservations, abandoned partials, quotas, ownership.

One :class:`DiskBudget` per handler decides whether an upload may begin and
opens its partial file. The rules, each enforced here and nowhere else:

* **Reservations.** An accepted upload reserves the bytes it still has to
  write (its declared size minus what its partial already holds, shrinking as
  data lands). A new upload is admitted only if its own remaining bytes fit in
  the free space minus every other reservation minus ``free_space_margin``, so
  the declared sizes of concurrent uploads can never add up to more than the
  disk holds. The check and the registration happen under one lock.
  ``max_reserved_per_user`` (default: none) bounds what one owner's uploads
  in progress reserve together (:meth:`DiskBudget._check_owner_reservation_locked`).
* **Abandoned partials** (kept for a resume when a connection drops) are
  indexed in memory with their expiry, ``partial_ttl`` after they were last
  written. A sweeper task sleeps until the earliest expiry and removes what has
  expired, then the directories that were created for it and are now empty.
  When space is needed, the oldest abandoned partials not currently being
  written are evicted *before* an upload is refused with ``no_space`` (or
  ``quota_exceeded``). ``max_partial_bytes`` caps abandoned plus in-flight
  partial bytes the same way. A partial with no bytes is removed when its
  upload ends (nothing to resume), each owner keeps at most
  :data:`MAX_ABANDONED_PER_OWNER` abandoned partials (its oldest go first),
  and all owners together :data:`MAX_ABANDONED` (the oldest of all go first:
  a peer with many addresses is many owners), so tiny partials cannot pile up
  inodes and directories.
* **Ownership.** A partial is bound to who created it (the user in accounts
  mode; the client's network address in shared-password mode, an IPv6
  address by its /64 as the password throttle counts it) until it
  expires: its id, and so its file name, is derived from the transfer key and
  the owner (:func:`owned_transfer_id`), so another client sending a file with
  the same transfer key gets a partial of its own and can neither resume,
  reset nor truncate the first, before or after a restart of the server.
  With ``overwrite=True`` an upload to a name another upload is writing is
  refused with ``busy``.
* **Isolation.** In accounts mode every user has a :class:`StorageRoot` of
  their own below the storage directory (``AccountRecord.root``), created on
  demand; ``quota`` counts their stored files and directories, partials and
  reservations; ``read_only`` refuses uploads with ``forbidden``. The stored
  bytes come from a walk of their tree, run outside the lock and checked
  against a count of the changes made below their root meanwhile. A walk's
  count is kept as an upper bound (:class:`_Usage`): every upload that ends
  adds its size and what its directories may have grown, nothing is
  subtracted, and while the bound leaves room no walk is needed (a batch of
  small files walks once, not once per file). Only a bound that does not
  leave room, one older than :data:`USAGE_RECOUNT_SECONDS` or one grown by
  more than a :data:`USAGE_RECOUNT_SHARE` of the quota since its walk is
  counted again, before anything is evicted or refused. A rename that makes
  directories (its new name's, not there yet) is admitted by the same rules
  for what they add (:meth:`DiskBudget.admit_rename`); its file was counted
  where it was. Counts that no longer stand are forgotten once a minute, so
  the budget holds the users of the last minute, not every user it has seen.

Times: expiries are kept on Trio's clock (a ``MockClock`` drives the sweeper);
a partial found on disk when the index is first loaded in a run gets the
expiry its wall-clock mtime implies.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

from .. import _threads
from .._log_limit import ThreadedLimitedLog
from .._throttle import address_key
from ..accounts import check_root
from ..errors import TransferError, UnsafePathError
from ._names import check_transfer_id, partial_basename, safe_relative_name, split_name
from ._stoppable import run_stoppable
from ._storage import ENTRY_ALLOWANCE, PartialFile, StorageRoot

if TYPE_CHECKING:
    from .._peer import Peer

log = logging.getLogger("conduit.transfer")

#: Default of ``FileTransferHandler.free_space_margin``: free space never handed out.
DEFAULT_FREE_SPACE_MARGIN = 1 << 20

#: Abandoned partials kept per owner (user or client host): beyond it the
#: owner's oldest is evicted, so that many tiny partials cannot exhaust the
#: inodes (``max_partial_bytes`` counts bytes only).
MAX_ABANDONED_PER_OWNER = 64
#: Abandoned partials kept in all, whoever owns them: the oldest go first.
#: The per-owner cap alone bounds nothing against a peer that has many
#: addresses (an IPv6 /48 holds 65,536 of the /64s owners are keyed by).
MAX_ABANDONED = 10_000

#: Seconds before an index of the partial files that failed to load is tried
#: again (at the next upload after them).
INDEX_RETRY_PAUSE = 30

#: Seconds a quota user's counted bytes stand as a bound before their tree is
#: walked again: files put into a root behind the server's back count from then.
USAGE_RECOUNT_SECONDS = 60.0
#: A bound grown by more than the quota divided by this since its walk is
#: counted again: what the allowances below miss (a file system whose
#: directories grow faster) is then at most a part of an eighth of the quota.
USAGE_RECOUNT_SHARE = 8
#: What a directory made for a file may add to its user's bytes (directories
#: count as their size): a block on common disks.
DIRECTORY_ALLOWANCE = 4096
#: Directories a user's bound remembers having charged since its walk; past
#: this many, each file charges its directories again.
MAX_CHARGED_DIRECTORIES = 4096

#: What an upload refused because its owner's uploads in progress already
#: reserve what one owner may (``max_reserved_per_user``) is told, with the
#: figure after it. The room comes back as the owner's own uploads write
#: their bytes or end: our client waits it out as it does a full call memory
#: (:mod:`._turns`).
USER_RESERVATION_REFUSAL = (
    "your uploads in progress reserve all the disk space one user may reserve "
    "at once (max_reserved_per_user); try again when some are done"
)

_Path = tuple[str, ...]  # a partial file's path below the storage directory


@attrs.define
class _Usage:
    """A quota user's stored bytes, at most: a walk's count plus every growth since.

    Nothing is subtracted (a delete leaves the bound above the truth); a file
    stored adds its size, its entry, and each directory of its path the
    bound has not charged since the walk, as if that directory were new.
    """

    #: What the walk counted.
    counted: int
    #: ``time.monotonic()`` of the walk.
    counted_at: float
    #: The walk's count plus every growth since.
    bound: int = attrs.field()
    #: The directories charged since the walk (see :data:`MAX_CHARGED_DIRECTORIES`).
    charged: set[_Path] = attrs.field(factory=set)

    @bound.default
    def _counted(self) -> int:
        return self.counted

    def stands(self, quota: int) -> bool:
        """Whether the bound may stand for ``quota`` without a walk: recent enough
        (:data:`USAGE_RECOUNT_SECONDS`), and not grown by more than a
        :data:`USAGE_RECOUNT_SHARE` of it since."""
        return (
            time.monotonic() - self.counted_at < USAGE_RECOUNT_SECONDS
            and (self.bound - self.counted) * USAGE_RECOUNT_SHARE <= quota
        )

    def add_file(self, directories: _Path, size: int) -> None:
        """A file of ``size`` bytes was stored (or renamed) into ``directories`` of the root."""
        grown = size + ENTRY_ALLOWANCE
        for depth in range(1, len(directories) + 1):
            directory = directories[:depth]
            if directory not in self.charged:
                grown += DIRECTORY_ALLOWANCE + ENTRY_ALLOWANCE
                if len(self.charged) < MAX_CHARGED_DIRECTORIES:
                    self.charged.add(directory)
        self.bound += grown


@attrs.define
class _QuotaRoot:
    """What the budget remembers of one quota user's root."""

    #: Changed (from the budget's counter) by every change seen below the root.
    generation: int
    #: The bound of its stored bytes, once walked.
    usage: _Usage | None = None


class _OneShotIds:
    """Transfer ids for one-shot files: unique and unguessable, without a system call each.

    A one-shot file's id names only its hidden temporary (an overwriting
    publish, or the named partial where there is no ``O_TMPFILE``), so it has
    to be unique among this storage's partials and not guessable by a peer,
    nothing more. ``secrets.token_hex(16)`` per file cost a ``getrandom`` call
    and a few µs of Python in the store thread of every small file; a secret
    random half drawn once per process (and again in a forked child, which
    must not repeat its parent's ids) followed by a counter gives the same 32
    characters of ``[0-9a-f]``: 64 secret bits, and never the same id twice in
    one process.
    """

    def __init__(self) -> None:
        self._reseed()
        if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
            os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._secret = secrets.token_hex(8)
        self._counter = itertools.count()

    def new(self) -> str:
        """A fresh id (thread-safe: ``next`` on a count is atomic under the GIL)."""
        return f"{self._secret}{next(self._counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


_ONE_SHOT_IDS = _OneShotIds()


def owned_transfer_id(key: str | None, owner: str) -> str:
    """A partial's id: the sender's transfer key bound to its owner; a one-off id without a key.

    Derived, never the key itself, so the partial's name carries its owner
    (:func:`partial_owner`) through a restart of the server, whose index,
    rebuilt from the disk, knows no owners: a client at another address that
    knows or guesses the key gets a partial of its own, never the first
    one's offset and prefix digest. Both backends derive it so. The key is
    checked first (``UnsafePathError``: 1-64 characters of ``[A-Za-z0-9_-]``).
    """
    if key is None:
        return _ONE_SHOT_IDS.new()
    check_transfer_id(key)
    return hashlib.sha256(f"{key}\0{owner}".encode()).hexdigest()[:32]


def check_writable(peer: Peer | None) -> None:
    """Refuse a read-only account's change to its storage (upload, delete, rename)."""
    account = getattr(peer, "account", None)
    if account is not None and account.read_only:
        raise TransferError("this account is read-only: changes are refused", "forbidden")


class BudgetSettings(Protocol):
    """The handler settings the budget reads at each use."""

    @property
    def storage(self) -> StorageRoot:
        """The storage directory's root."""
        ...

    max_file_size: int | None
    overwrite: bool
    partial_ttl: float
    free_space_margin: int
    max_partial_bytes: int | None
    max_reserved_per_user: int | None


def user_storage(storage: StorageRoot, peer: Peer | None) -> tuple[StorageRoot, _Path]:
    """The root ``peer`` may see, and its path below ``storage``.

    Shared-password mode (no account): the storage directory itself. Accounts
    mode: ``storage/<account.root>``, reached from the storage directory
    without following a symlink (:attr:`StorageRoot.confined`), as everything
    below it is: a root a local process turned into a link is refused.
    """
    account = getattr(peer, "account", None)
    if account is None:
        return storage, ()
    root = check_root(account.root)
    prefix = tuple(root.split("/"))
    confined = storage.confined + len(prefix)  # reached from the storage, no links followed
    return (
        StorageRoot(storage.path.joinpath(*prefix), storage.dir_mode, storage.file_mode, confined),
        prefix,
    )


def partial_owner(peer: Peer | None) -> str:
    """Who a partial belongs to: the user, else the client's host, else the connection."""
    if peer is None:
        return ""
    username = getattr(peer, "username", None)
    if username is not None:
        return f"user:{username}"
    address = peer.address
    if isinstance(address, tuple) and address:
        # Keyed as the password throttle keys addresses: one host's /64 is one owner.
        return f"host:{address_key(str(address[0]))}"
    return f"connection:{peer.id}"


@attrs.define(eq=False)
class Admission:
    """An accepted upload: its reservation and, once opened, its partial file."""

    storage: StorageRoot
    prefix: _Path
    name: str
    transfer_id: str
    owner: str
    size: int
    start: int
    partial: PartialFile | None = None

    @property
    def directories(self) -> _Path:
        """The partial's directories below the storage directory."""
        return (*self.prefix, *split_name(self.name)[0])

    @property
    def path(self) -> _Path:
        """The partial file's path below the storage directory."""
        return (*self.directories, partial_basename(split_name(self.name)[1], self.transfer_id))

    @property
    def target(self) -> _Path:
        """The file it is published as, below the storage directory."""
        return (*self.prefix, *self.name.split("/"))

    def remaining(self) -> int:
        """Bytes still to be written: the part of the reservation not yet on disk by a name.

        An anonymous partial (:meth:`StorageRoot.open_one_shot`) keeps its
        whole size reserved until it is released: its bytes are on the disk
        (``statvfs`` counts them) but under no name, so a quota's walk of the
        tree cannot see them before the link.
        """
        partial = self.partial
        if partial is None or partial.closed or partial.partial_name is None:
            written = self.start
        else:
            written = partial.offset
        return max(0, self.size - written)


@attrs.define(eq=False)
class _Abandoned:
    path: _Path
    owner: str
    size: int
    modified: float  # wall clock: eviction order, oldest first
    expires: float  # Trio clock
    #: The file it would be published as (below the storage directory); ()
    #: when not known (found on the disk at start).
    target: _Path = ()


@attrs.frozen
class OneShotAdmitter:
    """:meth:`DiskBudget.admit` and :meth:`DiskBudget.release` for one-shot files,
    called from a worker thread (the budget's lock is a thread lock)."""

    budget: DiskBudget
    peer: Peer | None
    storage: StorageRoot
    prefix: _Path
    owner: str
    quota: int | None
    #: Trio's clock when the batch began (release stamps expiries with it).
    now: float

    def admit(self, name: str, size: int) -> Admission:
        """Check and reserve ``size`` bytes for ``name``, then open its (anonymous) partial."""
        check_writable(self.peer)
        budget = self.budget
        admission = budget._admit_sync(
            self.storage, self.prefix, name, size, None, self.owner, True, self.quota
        )
        try:
            admission.partial = self.storage.open_one_shot(name, admission.transfer_id)
        except BaseException:
            budget._release_sync(admission, self.now)
            raise
        return admission

    def release(self, admission: Admission) -> None:
        """The file was published or discarded: free its reservation."""
        self.budget._release_sync(admission, self.now)

    def finished(self) -> None:
        """Back in Trio after the batch: let the sweeper see any partial a failure kept."""
        self.budget._wake_sweeper()


class DiskBudget:
    """Admits uploads against the disk, the partial cap and quotas; reclaims partials."""

    def __init__(self, settings: BudgetSettings) -> None:
        self._settings = settings
        # The lines about evicted partials, under a budget per owner: a peer
        # evicts its own abandoned partials at will (begin, send a byte,
        # leave: one eviction per upload past its cap). Admissions and
        # releases run in worker threads, hence the threaded kind.
        self._eviction_log = ThreadedLimitedLog(log)
        # Held (in worker threads) around every decision and every removal, so
        # that two admissions cannot both count the same free bytes and a
        # sweep never removes a directory an admitted upload is about to use.
        self._lock = threading.Lock()
        self._active: set[Admission] = set()
        self._abandoned: dict[_Path, _Abandoned] = {}
        # Per quota user's root (its prefix): a generation, bumped under the
        # lock by every change this budget sees below it, so that an admission
        # can walk the tree outside the lock and know whether what it counted
        # still holds; and the last walk's count, grown by every change. Roots
        # whose count no longer stands are forgotten (see _forget_stale_locked),
        # so the map holds the users of the last minute, not every user seen.
        self._roots: dict[_Path, _QuotaRoot] = {}
        # Generations come from one counter: a root forgotten and seen again
        # never repeats a number an admission in flight may hold.
        self._ticks = itertools.count()
        self._forgot_at = time.monotonic()
        # Per Trio run: the sweeper task, its wake-up event, the index load.
        self._token: trio.lowlevel.TrioToken | None = None
        # The run and the time of the last index load that failed.
        self._index_failed: tuple[trio.lowlevel.TrioToken, float] | None = None
        self._sweeping = False
        self._wake = trio.Event()
        self._loaded = trio.Event()

    # ------------------------------------------------------------------ async API

    async def admit(
        self, peer: Peer | None, name: str, size: int, key: str | None, *, restart: bool
    ) -> Admission:
        """Check and reserve, then open the partial for ``name`` (raises TransferError).

        ``key`` is the sender's transfer key; ``None`` for a one-shot small file.
        """
        await self._ensure_running()
        settings = self._settings
        check_writable(peer)
        account = getattr(peer, "account", None)
        storage, prefix = user_storage(settings.storage, peer)
        owner = partial_owner(peer)
        quota = None if account is None else account.quota
        admission = await _threads.run_sync(
            self._admit_sync, storage, prefix, name, size, key, owner, restart, quota
        )
        resume = key is not None and not restart
        try:
            # Stoppable: resuming hashes the partial (seconds for many GiB), and a
            # cancelled sender's slot must not wait for that (see _stoppable).
            admission.partial = await run_stoppable(
                lambda stop: storage.open_partial(
                    name, admission.transfer_id, resume=resume, stop=stop
                ),
                name="conduit: open a partial",
            )
            if admission.partial.offset > size:
                # Longer than the file: not a prefix of it; start over.
                await _threads.run_sync(admission.partial.close)
                admission.partial = await _threads.run_sync(
                    lambda: storage.open_partial(name, admission.transfer_id, resume=False)
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                if admission.partial is not None:
                    await _threads.run_sync(admission.partial.close)
                await self.release(admission)
            raise
        return admission

    async def one_shot(self, peer: Peer | None) -> OneShotAdmitter:
        """Admit many one-shot small files from a worker thread (see :mod:`._batch_store`).

        Each file is admitted with exactly the rules of :meth:`admit` (read-only
        accounts, size, space, partial cap, quota), in the thread that stores
        it, without a hop per file.
        """
        await self._ensure_running()
        account = getattr(peer, "account", None)
        storage, prefix = user_storage(self._settings.storage, peer)
        quota = None if account is None else account.quota
        return OneShotAdmitter(
            self, peer, storage, prefix, partial_owner(peer), quota, trio.current_time()
        )

    async def release(self, admission: Admission) -> None:
        """The upload ended: free its reservation; index its partial if one was kept."""
        with trio.CancelScope(shield=True):
            await _threads.run_sync(self._release_sync, admission, trio.current_time())
        self._wake_sweeper()

    # ------------------------------------------------------------------ sweeper

    async def _ensure_running(self) -> None:
        token = trio.lowlevel.current_trio_token()
        if self._token is not token and not self._index_failed_lately(token):
            # A new Trio run (or the first): the index's expiries were on another
            # clock, so load it afresh from the disk (once, unless that fails).
            failed = self._index_failed
            retry = failed is not None and failed[0] is token
            self._token = token
            self._sweeping = False
            self._wake = trio.Event()
            self._loaded = trio.Event()
            try:
                await _threads.run_sync(self._load_sync, trio.current_time(), retry)
            except Exception:
                log.exception(
                    "could not index the partial files in %s (tried again at the first "
                    "upload %d s or more from now)",
                    self._settings.storage.path,
                    INDEX_RETRY_PAUSE,
                )
                # Tried again: an index missing for the rest of the run would
                # expire, count and evict no partial (a walk that ran out of
                # descriptors once, say). Meanwhile uploads go on without it.
                self._token = None
                self._index_failed = (token, trio.current_time())
            finally:
                self._loaded.set()
            self._wake_sweeper()
        if not self._loaded.is_set():
            # Loaded already (every call but the first few): no checkpoint
            # here; the callers' own worker-thread hop is one.
            await self._loaded.wait()

    def _index_failed_lately(self, token: trio.lowlevel.TrioToken) -> bool:
        """Whether this run's index failed to load less than :data:`INDEX_RETRY_PAUSE` ago."""
        failed = self._index_failed
        return (
            failed is not None
            and failed[0] is token
            and trio.current_time() - failed[1] < INDEX_RETRY_PAUSE
        )

    def _wake_sweeper(self) -> None:
        """Make sure a sweeper is waiting for the earliest expiry (it stops when none is left)."""
        if self._sweeping:
            self._wake.set()
        elif self._abandoned and self._token is not None:
            self._sweeping = True
            self._wake = trio.Event()
            trio.lowlevel.spawn_system_task(
                self._sweeper, self._token, name="conduit partial sweeper"
            )

    async def _sweeper(self, token: trio.lowlevel.TrioToken) -> None:
        # A system task: it outlives the connections whose partials it expires
        # and ends with the run; it exits when nothing is left to expire, so an
        # idle handler holds no task.
        while self._token is token and self._abandoned:
            with trio.move_on_at(self._earliest_expiry()):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = trio.Event()
            try:
                removed = await _threads.run_sync(self._sweep_sync, trio.current_time())
            except Exception:
                log.exception("sweeping expired partial files failed")
                await trio.sleep(1)  # do not spin on a persistent error
                continue
            if removed:
                log.info("removed %d expired partial files", removed)
        if self._token is token:
            self._sweeping = False

    def _earliest_expiry(self) -> float:
        # Not under the lock: the event loop must not wait for a worker thread's
        # walk. Copying the values is one C call, atomic under the GIL.
        entries = list(self._abandoned.values())
        return min((entry.expires for entry in entries), default=math.inf)

    # ------------------------------------------------------------------ worker-thread side

    def _load_sync(self, now: float, retry: bool) -> None:
        """Index the partial files on disk, their expiries on this run's clock.

        ``retry``: a load after one of this run failed, while uploads went on:
        what they left is indexed already (with its owner), and stays so. The
        partials of uploads in progress are not abandoned: never indexed.
        """
        wall = time.time()
        ttl = self._settings.partial_ttl
        found = self._settings.storage.list_partials()
        with self._lock:
            if not retry:
                self._abandoned.clear()
            active = {admission.path for admission in self._active}
            for entry in found:
                path = (*entry.directories, entry.basename)
                if path in active or path in self._abandoned:
                    continue
                expires = now + max(0.0, entry.modified + ttl - wall)
                self._abandoned[path] = _Abandoned(path, "", entry.size, entry.modified, expires)

    def _sweep_sync(self, now: float) -> int:
        with self._lock:
            expired = [entry for entry in self._abandoned.values() if entry.expires <= now]
            for entry in expired:
                self._remove_locked(entry)
            return len(expired)

    def _admit_sync(
        self,
        storage: StorageRoot,
        prefix: _Path,
        name: str,
        size: int,
        key: str | None,
        owner: str,
        restart: bool,
        quota: int | None,
    ) -> Admission:
        settings = self._settings
        # Size rules first (invalid_size, too_large); space is decided below.
        storage.check_can_accept(size, settings.max_file_size, offset=max(size, 0))
        walked: int | None = None
        generation = -1
        if quota is not None:
            with self._lock:
                generation = self._root_locked(prefix).generation
                bounded = self._fits_bound_locked(storage, prefix, size, quota)
            if not bounded:
                # The walk of the user's tree takes as long as the tree is big:
                # done outside the lock, which every user's admission takes.
                walked = storage.stored_bytes()
        with self._lock:
            self._forget_stale_locked(keep=prefix)
            transfer_id = owned_transfer_id(key, owner)
            start = 0
            if not restart and key is not None:
                start = storage.find_partial(name, transfer_id) or 0
                if start > size:
                    start = 0
            admission = Admission(storage, prefix, name, transfer_id, owner, size, start)
            own = admission.path
            if key is not None:
                # Refused before anything is dropped or evicted for it. A
                # one-shot small file (no key) is stored and released within
                # one hop: it holds no reservation a peer could keep.
                self._check_owner_reservation_locked(owner, size - start)
                self._drop_older_versions_locked(admission)
            if settings.overwrite:
                # By the file it publishes: two users' roots may nest (alice's
                # "s", bob's "s/b"), and alice's "b/x.bin" is bob's "x.bin"
                # (both were let through, a review found on 2026-12-07).
                for other in self._active:
                    if other.target == admission.target:
                        raise TransferError(
                            f"{name!r} is being written by another upload; try again later",
                            "busy",
                        )
            # The user's own quota first: what it evicts is the user's own, and
            # an upload it refuses must not have cost anybody else a partial.
            if quota is not None and not (
                walked is None and self._fits_bound_locked(storage, prefix, size - start, quota)
            ):
                root = self._root_locked(prefix)
                if walked is None or root.generation != generation:
                    walked = storage.stored_bytes()  # changed since: count again, here
                root.usage = _Usage(walked, time.monotonic())
                self._make_room_in_quota(storage, prefix, walked, size - start, quota, own)
            # What no eviction could admit is refused before any step evicts:
            # the disk's step would otherwise evict for an upload that the
            # cap on unfinished bytes then refuses.
            self._check_partial_cap(size)
            self._make_room_on_disk(storage, size - start, own, owner)
            self._make_room_for_partials(size, own, owner)
            self._abandoned.pop(own, None)
            self._active.add(admission)
            # Its partial's directories are made now, before any byte counts:
            # a quota bound charges them here (its size counts as admitted).
            self._changed_locked(own, stored=0)
            return admission

    def admit_rename(
        self, storage: StorageRoot, prefix: _Path, new: str, quota: int | None
    ) -> None:
        """Admit a rename to ``new`` in ``storage`` (below ``prefix``) against ``quota``
        before it is made (worker thread; raises TransferError ``quota_exceeded``).

        The file's bytes are counted where they are; what a rename may add is
        the directories of ``new`` that do not exist yet (it makes them). A
        rename that makes none, or one without a quota, is not checked. One
        that does is admitted as an upload's directories are: each missing
        directory charged its :data:`DIRECTORY_ALLOWANCE` and an entry, plus
        the file's new entry, against the user's bound, counted again when the
        bound does not leave room (or no longer stands); refused before
        anything is made, else charged to the bound at once, so that the
        user's next admission counts them before they exist.
        """
        if quota is None:
            return
        try:
            parts = tuple(safe_relative_name(new).split("/"))
        except UnsafePathError:
            return  # the rename refuses the name and makes nothing
        missing = storage.missing_directories(parts[:-1])
        if not missing:
            return
        needed = ENTRY_ALLOWANCE + missing * (DIRECTORY_ALLOWANCE + ENTRY_ALLOWANCE)
        walked: int | None = None
        with self._lock:
            generation = self._root_locked(prefix).generation
            bounded = self._fits_bound_locked(storage, prefix, needed, quota)
        if not bounded:
            walked = storage.stored_bytes()  # outside the lock, as an admission's
        with self._lock:
            self._forget_stale_locked(keep=prefix)
            if not (walked is None and self._fits_bound_locked(storage, prefix, needed, quota)):
                root = self._root_locked(prefix)
                if walked is None or root.generation != generation:
                    walked = storage.stored_bytes()  # changed since: count again, here
                root.usage = _Usage(walked, time.monotonic())
                self._make_room_in_quota(storage, prefix, walked, needed, quota, (), "rename")
            # The directories are made after the lock is released: charged now
            # (prune_after_removal charges them again once they are there).
            self._changed_locked((*prefix, *parts), stored=0)

    def _release_sync(self, admission: Admission, now: float) -> None:
        with self._lock:
            self._active.discard(admission)
            # Published or not: a bound may count more than is there, never less.
            self._changed_locked(admission.path, stored=admission.size)
            partial = admission.partial
            if partial is not None and not partial.finished:
                try:
                    info = admission.storage.find_partial(admission.name, admission.transfer_id)
                except (OSError, UnsafePathError):
                    info = None
                if info:
                    self._abandoned[admission.path] = _Abandoned(
                        admission.path,
                        admission.owner,
                        info,
                        time.time(),
                        now + self._settings.partial_ttl,
                        admission.target,
                    )
                    self._cap_owner_locked(admission.owner)
                    self._cap_all_locked(admission.owner)
                    return
                if info == 0:
                    # Nothing to resume: keeping it would only cost an inode
                    # (and directories) per begin for partial_ttl.
                    directories, basename = admission.path[:-1], admission.path[-1]
                    self._settings.storage.remove_idle_partial(directories, basename)
            # Published, discarded or never opened: the directories made for it
            # may now be empty.
            self._prune_locked(admission.directories)

    def _drop_older_versions_locked(self, admission: Admission) -> None:
        """Remove the owner's abandoned partials of the file ``admission`` uploads
        under another key.

        A partial's key names its file's size and modification time: one a
        cut upload of an earlier version left is resumed by no later send,
        and stayed for ``partial_ttl`` beside the new version (found by a
        review on 2026-12-07; a download does the same for its partials of
        older versions). Only the owner's own, which only its sends could
        have resumed, and only idle ones; before the room for the upload is
        counted, which they then leave to it.
        """
        owner, target, own = admission.owner, admission.target, admission.path
        if not owner:
            return
        for entry in [
            entry
            for entry in self._abandoned.values()
            if entry.target == target and entry.owner == owner and entry.path != own
        ]:
            self._remove_locked(entry)

    async def forget_partial(self, peer: Peer | None, name: str, key: str) -> None:
        """Remove ``peer``'s abandoned partial of ``name`` under ``key``, if idle.

        For a begin answered ``already_there`` (the file it was sending is
        published already, by another send): nothing will resume it.
        """
        _storage, prefix = user_storage(self._settings.storage, peer)
        directories, basename = split_name(name)
        path = (
            *prefix,
            *directories,
            partial_basename(basename, owned_transfer_id(key, partial_owner(peer))),
        )

        def forget() -> None:
            with self._lock:
                entry = self._abandoned.get(path)
                if entry is not None:
                    self._remove_locked(entry)

        await _threads.run_sync(forget)

    def _cap_owner_locked(self, owner: str) -> None:
        """Evict ``owner``'s oldest abandoned partials beyond :data:`MAX_ABANDONED_PER_OWNER`."""
        if not owner:
            return
        mine = sorted(
            (entry for entry in self._abandoned.values() if entry.owner == owner),
            key=lambda entry: entry.modified,
        )
        for entry in mine[: max(0, len(mine) - MAX_ABANDONED_PER_OWNER)]:
            if self._remove_locked(entry):
                self._eviction_log.info(
                    owner,
                    "evicted abandoned partial %s: too many for %s",
                    "/".join(entry.path),
                    owner,
                )

    def _cap_all_locked(self, cause: str) -> None:
        """Evict the oldest abandoned partials beyond :data:`MAX_ABANDONED`
        (``cause``: the owner whose partial was one too many)."""
        excess = len(self._abandoned) - MAX_ABANDONED
        if excess <= 0:
            return
        oldest = heapq.nsmallest(excess, self._abandoned.values(), key=lambda e: e.modified)
        for entry in oldest:
            if self._remove_locked(entry):
                # Logged on the budget of whoever caused it, not the victim's.
                self._eviction_log.info(
                    cause,
                    "evicted abandoned partial %s: too many in all",
                    "/".join(entry.path),
                )

    def _check_owner_reservation_locked(self, owner: str, needed: int) -> None:
        """Refuse an upload of ``needed`` more bytes that would take ``owner``'s
        reservations past ``max_reserved_per_user``.

        Without it one owner's begins, declaring the free space and then sending
        a byte now and then, kept every other user's uploads ``no_space`` for
        as long as their connection lived (a review, 2026-12-07). An upload
        that alone needs more than the limit is refused ``no_space``: it could
        never begin. One that fits once the owner's others write their bytes or
        end is refused ``overloaded`` (:data:`USER_RESERVATION_REFUSAL`), which
        our client waits out.
        """
        cap = self._settings.max_reserved_per_user
        if cap is None or not owner:
            return
        if needed > cap:
            raise TransferError(
                f"this upload needs {needed} bytes of disk space, more than one user "
                f"may reserve at once (max_reserved_per_user: {cap})",
                "no_space",
            )
        held = sum(a.remaining() for a in self._active if a.owner == owner)
        if held + needed > cap:
            raise TransferError(f"{USER_RESERVATION_REFUSAL} (limit {cap} bytes)", "overloaded")

    def _reserved(self, storage: StorageRoot | None = None) -> int:
        return sum(
            a.remaining() for a in self._active if storage is None or a.storage.path == storage.path
        )

    def _make_room_on_disk(self, storage: StorageRoot, needed: int, own: _Path, owner: str) -> None:
        margin = self._settings.free_space_margin

        def shortfall() -> int:
            return needed - (storage.free_space() - self._reserved() - margin)

        if not self._evict_until(shortfall, own, (), owner):
            available = max(0, storage.free_space() - self._reserved() - margin)
            raise TransferError(
                f"not enough disk space: {needed} bytes needed, {available} available "
                "(free space minus uploads in progress minus the margin)",
                "no_space",
            )

    def _check_partial_cap(self, size: int) -> None:
        """Refuse an upload that would pass ``max_partial_bytes`` with every
        abandoned partial gone (the uploads in progress cannot be evicted)."""
        cap = self._settings.max_partial_bytes
        if cap is not None and sum(a.size for a in self._active) + size > cap:
            raise self._partial_cap_error(cap)

    @staticmethod
    def _partial_cap_error(cap: int) -> TransferError:
        return TransferError(
            f"unfinished uploads would exceed the limit of {cap} bytes; try again later",
            "no_space",
        )

    def _make_room_for_partials(self, size: int, own: _Path, owner: str) -> None:
        cap = self._settings.max_partial_bytes
        if cap is None:
            return

        def shortfall() -> int:
            kept = sum(e.size for p, e in self._abandoned.items() if p != own)
            return kept + sum(a.size for a in self._active) + size - cap

        if not self._evict_until(shortfall, own, (), owner):
            raise self._partial_cap_error(cap)

    def _fits_bound_locked(
        self, storage: StorageRoot, prefix: _Path, needed: int, quota: int
    ) -> bool:
        """Whether ``needed`` more bytes fit in ``quota`` by the user's bound alone (no walk)."""
        root = self._roots.get(prefix)
        usage = None if root is None else root.usage
        if usage is None or not usage.stands(quota):
            return False
        return self._quota_shortfall(storage, prefix, usage.bound, needed, quota) <= 0

    def _quota_shortfall(
        self, storage: StorageRoot, prefix: _Path, stored: int, needed: int, quota: int
    ) -> int:
        """Bytes over ``quota`` if ``needed`` more were stored below ``prefix``.

        Counted: ``stored`` (the walk's published files and directories, or a
        bound of them), the abandoned partials' bytes below ``prefix`` (all
        partials on disk are indexed: loaded at start, added at each release),
        the whole size of every admitted upload to this root (written or not),
        and ``needed``.
        """
        kept = sum(
            entry.size for path, entry in self._abandoned.items() if path[: len(prefix)] == prefix
        )
        admitted = sum(a.size for a in self._active if a.storage.path == storage.path)
        return stored + kept + admitted + needed - quota

    def _make_room_in_quota(
        self,
        storage: StorageRoot,
        prefix: _Path,
        stored: int,
        needed: int,
        quota: int,
        own: _Path,
        what: str = "upload",
    ) -> None:
        """Evict ``prefix``'s abandoned partials until the upload (or ``what``) fits in
        ``quota`` (counted by :meth:`_quota_shortfall`, with ``stored`` from an exact walk)."""

        def shortfall() -> int:
            return self._quota_shortfall(storage, prefix, stored, needed, quota)

        if not self._evict_until(shortfall, own, prefix, None):
            raise TransferError(
                f"the {what} would exceed this account's quota of {quota} bytes",
                "quota_exceeded",
            )

    def _evict_until(
        self, shortfall: Callable[[], int], own: _Path, within: _Path, owner: str | None
    ) -> bool:
        """Evict the oldest abandoned partials (below ``within``) until ``shortfall() <= 0``:
        ``owner``'s first (the one asking pays first), then the others'.

        Nothing is evicted when all of them together could not cover the
        shortfall: the request is refused anyway, and a request for more than
        the disk holds (one size field) must not cost the others their
        partials, each a resume they were promised.
        """
        missing = shortfall()
        if missing <= 0:
            return True
        candidates = sorted(
            (
                entry
                for path, entry in self._abandoned.items()
                if path != own and path[: len(within)] == within
            ),
            key=lambda entry: (entry.owner != owner, entry.modified),
        )
        if sum(entry.size for entry in candidates) < missing:
            return False
        for entry in candidates:
            if self._remove_locked(entry):
                # On the budget of the one asking for room (a user's own
                # quota: that user's partials), not the victim's.
                self._eviction_log.info(
                    entry.owner if owner is None else owner,
                    "evicted abandoned partial %s to make room",
                    "/".join(entry.path),
                )
                if shortfall() <= 0:
                    return True
        return shortfall() <= 0

    def _remove_locked(self, entry: _Abandoned) -> bool:
        """Remove an abandoned partial (unless it is being written) and its empty directories."""
        self._abandoned.pop(entry.path, None)
        self._changed_locked(entry.path)
        directories, basename = entry.path[:-1], entry.path[-1]
        storage = self._settings.storage
        removed = storage.remove_idle_partial(directories, basename)
        self._prune_locked(directories)
        return removed

    def prune_after_removal(self, prefix: _Path, name: str, *, moved_to: str | None = None) -> None:
        """``name`` (in the root below ``prefix``) was deleted, or renamed to
        ``moved_to``: remove its directories left empty (worker thread).

        Under the budget's lock, as a release's pruning, so that no directory an
        admitted upload is about to use goes; the directories of ``prefix`` (a
        user's root) stay. Without it, a peer could make directories without
        end (a file at depth 63, deleted, again) that no quota counted. The
        directories of a rename's new name may be new: the user's bound grows
        (again: :meth:`admit_rename` charged them before they were made, but a
        walk in between may not have seen them).
        """
        directories = split_name(safe_relative_name(name))[0]
        with self._lock:
            if moved_to is not None:  # its bytes are counted where they were
                target = safe_relative_name(moved_to).split("/")
                self._changed_locked((*prefix, *target), stored=0)
            self._changed_locked((*prefix, *directories))
            if directories:
                self._prune_locked((*prefix, *directories), floor=len(prefix))

    def _changed_locked(self, path: _Path, *, stored: int | None = None) -> None:
        """Something at or below ``path`` changed: a quota walk of a root above it is stale.

        ``stored``: a file of that many bytes is now at ``path`` (0 for one
        renamed there), which the root's bound adds (see :class:`_Usage`).
        """
        roots = self._roots
        if not roots:
            return
        # A lookup per depth, not a scan of every user's root.
        for depth in range(len(path) + 1):
            root = roots.get(path[:depth])
            if root is not None:
                root.generation = next(self._ticks)
                if root.usage is not None and stored is not None:
                    # The walk counts what is below the root, not the root.
                    root.usage.add_file(path[depth:-1], stored)

    def _root_locked(self, prefix: _Path) -> _QuotaRoot:
        """``prefix``'s quota record, made on first use."""
        root = self._roots.get(prefix)
        if root is None:
            root = self._roots[prefix] = _QuotaRoot(next(self._ticks))
        return root

    def _forget_stale_locked(self, *, keep: _Path) -> None:
        """At most once per :data:`USAGE_RECOUNT_SECONDS`, drop the roots
        (but ``keep``, the admitting user's) whose count would not stand any
        more, or was never made.

        Safe at any moment: a forgotten root's next admission walks its tree,
        and one whose walk is under way finds a new generation and walks again.
        """
        now = time.monotonic()
        if now - self._forgot_at < USAGE_RECOUNT_SECONDS:
            return
        self._forgot_at = now
        self._roots = {
            prefix: root
            for prefix, root in self._roots.items()
            if prefix == keep
            or (root.usage is not None and now - root.usage.counted_at < USAGE_RECOUNT_SECONDS)
        }

    def _prune_locked(self, directories: _Path, *, floor: int = 0) -> None:
        # Keep every directory an admitted upload uses (it may be about to
        # create its partial there); one holding a kept partial is not empty.
        keep = floor
        for path in [a.directories for a in self._active]:
            common = 0
            for mine, theirs in zip(directories, path, strict=False):
                if mine != theirs:
                    break
                common += 1
            keep = max(keep, common)
        if keep < len(directories):
            self._settings.storage.prune_empty_directories(directories, keep=keep)


__all__ = [
    "DEFAULT_FREE_SPACE_MARGIN",
    "MAX_ABANDONED_PER_OWNER",
    "Admission",
    "DiskBudget",
    "OneShotAdmitter",
    "owned_transfer_id",
    "partial_owner",
    "user_storage",
]
