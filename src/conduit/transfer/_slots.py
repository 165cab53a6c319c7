"""The per-connection transfer limit: a slot is claimed, owned, and given back exactly once.

A transfer's RPC claims a slot before it opens anything, then hands the slot to
the task it spawns to move the bytes, and that task gives it back when it ends.
Pairing a claim and a release by hand at every exit (refused, failed while
opening, cancelled before the spawn, the spawned task's end) is how a slot
leaks; :class:`TransferSlot` makes each of those paths one ``with`` block.
"""

from __future__ import annotations

import weakref
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


@attrs.define(eq=False)
class _Held:
    """One connection's slots: how many are held, how many of them are ending,
    and the starts waiting for one to come back."""

    count: int = 0
    ending: int = 0
    given_back: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)


class TransferSlots:
    """How many transfers each connection has running; refuses one over the limit.

    Keyed weakly by connection, so a connection that is gone takes its count
    with it.
    """

    def __init__(self) -> None:
        self._held: weakref.WeakKeyDictionary[Any, _Held] = weakref.WeakKeyDictionary()

    def in_use(self, connection: object) -> int:
        """The slots ``connection`` holds now."""
        held = self._held.get(connection)
        return 0 if held is None else held.count

    def claim(self, connection: object, limit: int) -> TransferSlot:
        """Take one of ``connection``'s ``limit`` slots, or raise ``RPCError("overloaded")``."""
        held = self._held.setdefault(connection, _Held())
        if held.count >= limit:
            raise RPCError(f"too many transfers on this connection (limit {limit})", "overloaded")
        held.count += 1
        return TransferSlot(self, connection)

    async def claim_after_ending(self, connection: object, limit: int) -> TransferSlot:
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
        if held.count >= limit and held.ending > 0:  # (no deadline to arm on every download)
            with trio.move_on_after(ENDING_WAIT):
                while held.count >= limit and held.ending > 0:
                    await held.given_back.park()
        return self.claim(connection, limit)

    def _give_back(self, connection: object, *, was_ending: bool) -> None:
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

        with slots.claim(connection, limit) as slot:
            ...                                   # any exception gives the slot back
            slot.spawn(connection.spawn, task, arg)   # now the task owns it

    :meth:`spawn` starts the task in a wrapper that gives the slot back when
    the task ends, however it ends (returned, raised, cancelled before its
    first line); once started, leaving the ``with`` block no longer does.
    """

    _slots: TransferSlots
    _connection: object
    _held: bool = True
    _handed_off: bool = False
    _ending: bool = False

    @property
    def held(self) -> bool:
        """Whether this slot still counts against the connection's limit."""
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
            self._slots._give_back(self._connection, was_ending=self._ending)

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
