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
waits for one of them to end and tries again (at once, if one ended while
its refusal was on the way); attempts that arrive while some wait, or have
just been woken, queue behind them, so the ones that wait are not overtaken
and each end lets exactly one go (no stampede of retries). What runs stays
at what the connection was shown to take, clocked by what ends, as TCP is
by its acknowledgements. A refusal while nothing else of ours runs is
returned as it is, and so is a waiter's second refusal when nothing of ours
that held room has ended since it began to wait: no end of ours will free
that room (another client holds a server-wide limit, or ours were all
refused too). A wait lasts as long as the transfers of ours ahead of it
take: a caller that wants a bound puts a deadline around its transfer.

Some refusals are waited out whatever runs of ours: a server's call memory
(``server_call_budget``) held by other connections' calls and messages
(:data:`~conduit.protocol.connection.SERVER_BUDGET_REFUSAL`), or our
user's share of it (``user_call_budget``), held by our user's calls and
messages on other connections too
(:data:`~conduit.protocol.connection.USER_BUDGET_REFUSAL`). So are two
like it: the server's transfers over all connections at their limit
(``max_transfers``: :data:`._slots.SERVER_TRANSFERS_REFUSAL`), or our
user's (``max_transfers_per_user``, which our other connections count
against: :data:`._slots.USER_TRANSFERS_REFUSAL`), or the disk space our
user's uploads in progress may reserve together (``max_reserved_per_user``:
:data:`._space.USER_RESERVATION_REFUSAL`). For those two of our user's,
while transfers of ours run on this connection, one of them ending gives
the room back, and is waited for as for a full connection. No end of
ours on this connection need free it, theirs do, and nothing says when:
the attempt is made again after a pause that doubles from
:data:`BUDGET_PAUSE` up to a second (jittered by half either way, so that
attempts refused together do not come back together), until
:data:`BUDGET_PATIENCE` seconds after its first such refusal (a server
whose memory or transfers others keep full for longer refuses the transfer
as it is).
Each try sends the attempt's first call again: the server refused it whole.

A server frees a download's slot a moment after its last bytes leave (it
closes the file and runs ``on_file_served`` first); it makes a download
that arrives meanwhile wait for that slot (up to 5 s) rather than refuse it
(:meth:`~._slots.TransferSlots.claim_after_ending`), so the turn an end
gives is not lost to that moment.

The lines are kept per connection, weakly: a reconnect starts a fresh one.
"""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import attrs
import trio

from ..protocol.connection import SERVER_BUDGET_REFUSAL, USER_BUDGET_REFUSAL
from ._slots import SERVER_TRANSFERS_REFUSAL, USER_TRANSFERS_REFUSAL
from ._space import USER_RESERVATION_REFUSAL

if TYPE_CHECKING:
    from .._peer import Peer

#: Refusals that say "this connection runs all it may now", at a transfer's start.
FULL_CODES = frozenset({"overloaded", "too_many_streams"})

#: The first pause before an attempt refused for what other connections hold
#: (:data:`BUDGET_REFUSALS`) is made again (doubling, up to a second), and
#: how long after its first such refusal it goes on being made.
BUDGET_PAUSE = 0.05
BUDGET_PATIENCE = 30.0
#: What those refusals say: the server's memory is full, or its user's share;
#: the server runs all the transfers it may, or our user's connections do;
#: our user's uploads reserve all the disk space one user may.
BUDGET_REFUSALS = (
    SERVER_BUDGET_REFUSAL,
    USER_BUDGET_REFUSAL,
    SERVER_TRANSFERS_REFUSAL,
    USER_TRANSFERS_REFUSAL,
    USER_RESERVATION_REFUSAL,
)
#: Of those, the ones for room our user's own transfers hold, which one of
#: ours on this connection ending may give back.
OWN_REFUSALS = (USER_TRANSFERS_REFUSAL, USER_RESERVATION_REFUSAL)

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
    #: Attempts that ended having held room (not refused at their start).
    freed: int = 0
    #: Waiters woken and not yet running again: those that arrive meanwhile
    #: queue behind them rather than take the room that woke them.
    handing_off: int = 0
    waiting: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)

    def must_queue(self) -> bool:
        """Whether an attempt that arrives now goes behind others waiting for a turn."""
        return bool(self.waiting) or self.handing_off > 0

    async def wait_for_an_end(self) -> None:
        """Park until an attempt ends that lets us go (at once when nothing could)."""
        if self.running == 0 and self.handing_off == 0:
            return
        await self.waiting.park()
        # No checkpoint between our wake-up and the attempt we make next.
        self.handing_off -= 1

    def ended(self, *, freed: bool) -> None:
        """One attempt ended; ``freed``: it held room (it was not refused at its start)."""
        self.running -= 1
        if freed:
            self.freed += 1
            self.handing_off += len(self.waiting.unpark())
        elif self.running == 0 and self.handing_off == 0:
            # Nothing of ours is left to free room: every waiter tries once more.
            self.handing_off += len(self.waiting.unpark_all())


_lines: weakref.WeakKeyDictionary[object, _Line] = weakref.WeakKeyDictionary()


async def take_turn(
    peer: PeerT, attempt: Callable[[PeerT], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """Run ``attempt(peer)``, again each time one of ours ends while the connection is full.

    Returns the attempt's result: its first that is not a full-connection
    refusal, or a refusal that nothing of ours will lift (see the module
    docstring), or any result once ``peer``'s connection is gone. A refusal
    for what other connections hold (:data:`BUDGET_REFUSALS`) is tried again after pauses, until
    :data:`BUDGET_PATIENCE` seconds after the first.
    """
    line = _lines.setdefault(peer.connection, _Line())
    if line.must_queue():
        await line.wait_for_an_end()
    waited_since: int | None = None
    budget_pause, budget_deadline = BUDGET_PAUSE, math.inf
    while True:
        freed_before = line.freed
        line.running += 1
        refused = False
        try:
            result = await attempt(peer)
            refused = result.get("code") in FULL_CODES
        finally:
            line.ended(freed=not refused)
        if not refused or not peer.connected:
            return result
        error = str(result.get("error", ""))
        # Our user's transfers (or the disk space its uploads reserve) at
        # their limit while some of them are ours on this connection: one of
        # ours ending frees a slot (or its reservation), as for a full
        # connection (a user limit below the connection's, say: on a process
        # of 256 descriptors by default), and so may the user's other
        # connections: tried again at whichever comes first, one of ours
        # ending or the budget's pause, with no patience to run out (a
        # budget's 30 s gave it up, a review found; waiting for ours alone
        # held it as long as ours ran, the next review found).
        if line.running > 0 and any(refusal in error for refusal in OWN_REFUSALS):
            with trio.move_on_after(budget_pause * random.uniform(0.5, 1.5)):
                await line.wait_for_an_end()
            budget_pause = min(2 * budget_pause, 1.0)
            continue
        if any(refusal in error for refusal in BUDGET_REFUSALS):
            now = trio.current_time()
            budget_deadline = min(budget_deadline, now + BUDGET_PATIENCE)
            if now >= budget_deadline:
                return result
            # Jittered, so that the transfers a full server refused together
            # (each sending its whole call again) do not come back together.
            pause = budget_pause * random.uniform(0.5, 1.5)
            await trio.sleep_until(min(now + pause, budget_deadline))
            budget_pause = min(2 * budget_pause, 1.0)
            if line.must_queue():
                # Ours wait in line (for a connection-full turn): behind them.
                await line.wait_for_an_end()
            continue
        if line.freed != freed_before:
            # Room came free while we asked (the refusal was on its way when
            # one of ours ended): ask again at once.
            continue
        if line.running == 0 or waited_since == line.freed:
            return result
        waited_since = line.freed
        await line.wait_for_an_end()


__all__ = ["FULL_CODES", "Attempt", "take_turn"]
