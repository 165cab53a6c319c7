"""Transfer limits: a slot is claimed, owned, and given back exactly once.

A transfer's RPC claims a slot before it opens anything, then hands the slot to
the task it spawns to move the bytes, and that task gives it back when it ends.
Pairing a claim and a release by hand at every exit (refused, failed while
opening, cancelled before the spawn, the spawned task's end) is how a slot
leaks; :class:`TransferSlot` makes each of those paths one ``with`` block.

A slot counts three times (:class:`TransferLimits`): against its
connection's limit (``max_transfers_per_connection``), against its owner's
(``max_transfers_per_user``: a user, or with a shared password a client's
host, over all the owner's connections) and against the handler's, over all
connections (``max_transfers``). Each running transfer holds open files (an
upload its partial and its directory, a download its file): without the two
wider limits one user's 63 connections held 2,064 descriptors, the process's
limit, and nobody could connect until they left (found by a review on
2026-12-07). By default the handler's limit is a quarter of the process's
descriptor limit, read at each claim (:func:`default_max_transfers`), so that
the open files of transfers take at most half of the descriptors and the
sockets keep the rest; and an owner's a quarter of that.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import attrs
import trio

from ..errors import RPCError

#: Starts ``fn(*args)`` as a task: ``Connection.spawn`` (or a nursery's ``start_soon``).
Spawner = Callable[..., None]


#: Longest a start waits for the slot of a transfer that is ending (its
#: ``on_file_served`` may take its time): then it is refused as by a full
#: connection.
ENDING_WAIT = 5.0

#: What a transfer refused because its owner's connections run all the
#: transfers one owner may is told (with the figure after it). The room is
#: held by the owner's own transfers, on this connection or another, and
#: comes back as they end: our client waits it out as it does a full call
#: memory (:mod:`._turns`).
USER_TRANSFERS_REFUSAL = (
    "your connections run all the transfers one user may run at once "
    "(max_transfers_per_user); try again when some are done"
)
#: What a transfer refused because the server runs all the transfers it may
#: is told (no figure: what the server runs is other users' business); waited
#: out as the above.
SERVER_TRANSFERS_REFUSAL = (
    "the server runs all the transfers it may run at once (max_transfers); "
    "try again when some are done"
)

#: The handler's limit where the process has no descriptor limit to derive
#: it from (unlimited, or a platform without ``RLIMIT_NOFILE``).
MAX_TRANSFERS_WITHOUT_A_LIMIT = 4096


def default_max_transfers() -> int:
    """The handler's default ``max_transfers``: a quarter of the process's descriptor limit.

    A transfer holds at most two descriptors (an upload's partial file and its
    directory), so the transfers of all connections hold at most half of the
    limit, and the sockets (and whatever else the application opens) keep the
    other half. Read afresh at each claim: ``conduit serve`` raises the soft
    limit after the handler is made, and an application may too.
    """
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return MAX_TRANSFERS_WITHOUT_A_LIMIT
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return MAX_TRANSFERS_WITHOUT_A_LIMIT
    if soft == resource.RLIM_INFINITY:
        return MAX_TRANSFERS_WITHOUT_A_LIMIT
    return max(1, soft // 4)


@attrs.frozen
class TransferLimits:
    """The three limits a transfer's slot counts against, as they stand at its claim."""

    #: Transfers one connection may run at once (``max_transfers_per_connection``).
    per_connection: int
    #: Transfers one owner's connections may run at once (``max_transfers_per_user``).
    per_owner: int
    #: Transfers all connections may run at once (``max_transfers``).
    total: int


@attrs.define(eq=False)
class _Held:
    """One connection's slots: how many are held, how many of them are ending,
    and the starts waiting for one to come back."""

    count: int = 0
    ending: int = 0
    given_back: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)


class TransferSlots:
    """How many transfers each connection, each owner and all together run; refuses
    one over a limit.

    Keyed weakly by connection, so a connection that is gone takes its count
    with it; an owner is counted only while it holds a slot.
    """

    def __init__(self) -> None:
        self._held: weakref.WeakKeyDictionary[Any, _Held] = weakref.WeakKeyDictionary()
        self._by_owner: Counter[str] = Counter()
        self._total = 0

    def in_use(self, connection: object) -> int:
        """The slots ``connection`` holds now."""
        held = self._held.get(connection)
        return 0 if held is None else held.count

    def owned_by(self, owner: str) -> int:
        """The slots the connections of ``owner`` hold now."""
        return self._by_owner[owner]

    @property
    def total(self) -> int:
        """The slots all connections hold now."""
        return self._total

    def claim(self, connection: object, owner: str, limits: TransferLimits) -> TransferSlot:
        """Take a slot of ``connection``, whose peer is ``owner``; ``RPCError("overloaded")``
        when the connection, the owner or all connections together are at their limit."""
        held = self._held.setdefault(connection, _Held())
        limit = limits.per_connection
        if held.count >= limit:
            raise RPCError(f"too many transfers on this connection (limit {limit})", "overloaded")
        if self._by_owner[owner] >= limits.per_owner:
            raise RPCError(f"{USER_TRANSFERS_REFUSAL} (limit {limits.per_owner})", "overloaded")
        if self._total >= limits.total:
            raise RPCError(SERVER_TRANSFERS_REFUSAL, "overloaded")
        held.count += 1
        self._by_owner[owner] += 1
        self._total += 1
        return TransferSlot(self, connection, owner)

    async def claim_after_ending(
        self, connection: object, owner: str, limits: TransferLimits
    ) -> TransferSlot:
        """:meth:`claim`, once the slots of transfers that are ending have come back.

        A peer that saw a transfer end (a download's last bytes) may start the
        next at once, while the task that served it still holds its slot (it
        closes the file, then runs ``on_file_served``): that start waits for
        the slot rather than being refused, up to :data:`ENDING_WAIT`. Only
        for those: a connection whose slots are all held by transfers still
        under way is refused at once, as by :meth:`claim`. Each slot this
        connection gives back wakes its waiters (only its own) to look again.
        """
        held = self._held.setdefault(connection, _Held())
        limit = limits.per_connection
        if held.count >= limit and held.ending > 0:  # (no deadline to arm on every download)
            with trio.move_on_after(ENDING_WAIT):
                while held.count >= limit and held.ending > 0:
                    await held.given_back.park()
        return self.claim(connection, owner, limits)

    def _give_back(self, connection: object, owner: str, *, was_ending: bool) -> None:
        self._total -= 1
        self._by_owner[owner] -= 1
        if not self._by_owner[owner]:
            del self._by_owner[owner]
        held = self._held.get(connection)
        if held is None:
            return
        held.count = max(0, held.count - 1)
        if was_ending:
            held.ending -= 1
        held.given_back.unpark_all()

    def _mark_ending(self, connection: object) -> None:
        self._held.setdefault(connection, _Held()).ending += 1


@attrs.define(eq=False)
class TransferSlot:
    """One claimed slot; a context manager that gives it back on exit, unless handed off.

    ::

        with slots.claim(connection, owner, limits) as slot:
            ...                                   # any exception gives the slot back
            slot.spawn(connection.spawn, task, arg)   # now the task owns it

    :meth:`spawn` starts the task in a wrapper that gives the slot back when
    the task ends, however it ends (returned, raised, cancelled before its
    first line); once started, leaving the ``with`` block no longer does.
    """

    _slots: TransferSlots
    _connection: object
    _owner: str
    _held: bool = True
    _handed_off: bool = False
    _ending: bool = False

    @property
    def held(self) -> bool:
        """Whether this slot still counts against its limits."""
        return self._held

    def ending(self) -> None:
        """Say that the peer may have seen this transfer end: a start that finds
        the connection's slots full waits for this one (see
        :meth:`TransferSlots.claim_after_ending`) until it is given back."""
        if self._held and not self._ending:
            self._ending = True
            self._slots._mark_ending(self._connection)

    def release(self) -> None:
        """Give the slot back; later calls do nothing."""
        if self._held:
            self._held = False
            self._slots._give_back(self._connection, self._owner, was_ending=self._ending)

    def spawn(self, spawner: Spawner, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start ``fn(*args)`` with ``spawner``; that task now owns the slot.

        If ``spawner`` raises (the connection is closing), the slot stays with
        the caller's ``with`` block, which gives it back.
        """
        spawner(self._run_owning, fn, *args)
        # No checkpoint between the spawn and this line: the task cannot have
        # run yet, and from here on only it releases the slot.
        self._handed_off = True

    async def _run_owning(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        # Trio runs every task it started at least up to its first checkpoint,
        # so this ``try`` is entered even when the task is cancelled at once.
        try:
            await fn(*args)
        finally:
            self.release()

    def __enter__(self) -> TransferSlot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._handed_off:
            self.release()
