"""Where a connection's reader waits for the results in hand to be taken.

:class:`~conduit.protocol.connection.ResultsInHand` counts, in the state
machine, what the large RESULTs decoded for an endpoint's callers hold until
the callers take them; a RESULT that does not fit is handed back undecoded
(:class:`~conduit.protocol.connection.ResultMustWait`). :class:`ResultGate`
adds the engine's side: the callers release what they took
(``conduit._pending_calls``), and a reader holding such a RESULT waits here
until nothing is in hand. The callers in hand have been woken already and
take their results in their next step, so the wait is a pass or two of the
scheduler, whatever the peers do.
"""

from __future__ import annotations

import trio

from .protocol.connection import ResultsInHand


class ResultGate(ResultsInHand):
    """:class:`~conduit.protocol.connection.ResultsInHand` that wakes the
    readers waiting for it once its results have all been taken."""

    __slots__ = ("_taken",)

    def __init__(self) -> None:
        super().__init__()
        self._taken = trio.lowlevel.ParkingLot()

    def release(self, size: int) -> None:
        """The caller of a result that held ``size`` bytes has taken it."""
        self.held -= size
        if not self.held:
            self._taken.unpark_all()

    async def wait_taken(self) -> None:
        """Return once no counted result is in hand (at once if none is)."""
        while self.held:
            await self._taken.park()
