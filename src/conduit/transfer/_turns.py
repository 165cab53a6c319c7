"""Transfers that a full connection refused wait their turn instead of failing.

A server bounds what one connection may run at once (its transfer slots,
``max_transfers_per_connection``; its data streams and their receive budget),
and so does the client for its own downloads (``max_streams_per_connection``,
``connection_receive_budget``). Past a bound, the next transfer is refused at
its start with ``overloaded`` or ``too_many_streams``, before any byte or
file is committed. On one connection, everything those bounds count is this
client's own: a program that starts more transfers than the server allows
(``conduit get -j 32`` against 32 slots, with the directory batches beside
them) is asking too much at once, not for something it cannot have. The
same holds for a server's pushes into a client's slots.

So a refused attempt, while others of ours run on the same connection,
waits for one of them to end and tries again; attempts that arrive while
some wait queue behind them, so the ones that wait are not overtaken and
each end lets exactly one go (no stampede of retries). What runs stays at
what the connection was shown to take, clocked by what ends, as TCP is by
its acknowledgements. A refusal while nothing else of ours runs is
returned as it is, and so is a waiter's second refusal when nothing of ours
that held room has ended since it began to wait: no end of ours will free
that room (another client holds a server-wide limit, or ours were all
refused too).

The lines are kept per connection, weakly: a reconnect starts a fresh one.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import attrs
import trio

if TYPE_CHECKING:
    from .._peer import Peer

#: Refusals that say "this connection runs all it may now", at a transfer's start.
FULL_CODES = frozenset({"overloaded", "too_many_streams"})

#: One try of a transfer on a peer: its result dict (see :mod:`._resilient`).
Attempt = Callable[["Peer"], Awaitable[dict[str, Any]]]


class _OnConnection(Protocol):
    """What a turn needs of a peer (a :class:`~conduit.Peer`)."""

    @property
    def connection(self) -> object:
        """The connection whose line the attempt joins."""

    @property
    def connected(self) -> bool:
        """Whether that connection is still up."""


PeerT = TypeVar("PeerT", bound=_OnConnection)


@attrs.define(eq=False)
class _Line:
    """The attempts of one connection: how many run, and who waits for one to end."""

    running: int = 0
    #: Attempts that ended having held room: a waiter whose retry is refused
    #: again waits on only if one has ended since it began waiting.
    freed: int = 0
    waiting: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)

    async def wait_for_an_end(self) -> None:
        """Park until one of the running attempts ends (at once when none runs)."""
        if self.running > 0:
            await self.waiting.park()

    def ended(self, *, freed: bool) -> None:
        """One attempt ended; ``freed``: it held room (it was not refused at its start)."""
        self.running -= 1
        if freed:
            self.freed += 1
            self.waiting.unpark()
        elif self.running == 0:
            # Nothing of ours is left to free room: every waiter tries once more.
            self.waiting.unpark_all()


_lines: weakref.WeakKeyDictionary[object, _Line] = weakref.WeakKeyDictionary()


async def take_turn(
    peer: PeerT, attempt: Callable[[PeerT], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """Run ``attempt(peer)``, again each time one of ours ends while the connection is full.

    Returns the attempt's result: its first that is not a full-connection
    refusal, or a refusal met while nothing else of ours ran on
    ``peer``'s connection (or once that connection is gone).
    """
    line = _lines.setdefault(peer.connection, _Line())
    if line.waiting:
        await line.wait_for_an_end()
    waited_since: int | None = None
    while True:
        line.running += 1
        refused = False
        try:
            result = await attempt(peer)
            refused = result.get("code") in FULL_CODES
        finally:
            line.ended(freed=not refused)
        if not refused or line.running == 0 or not peer.connected or waited_since == line.freed:
            return result
        waited_since = line.freed
        await line.wait_for_an_end()


__all__ = ["FULL_CODES", "take_turn"]
