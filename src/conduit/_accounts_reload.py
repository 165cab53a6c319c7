"""Re-reading a changed accounts file without anyone waiting on the file for long.

A server re-reads its accounts file when its ``stat`` says it changed: before
a hello's lookup (a user just added logs in at once) and once a second while
serving (a user removed loses their sessions). The read is file I/O, which
may block for as long as the file system likes: a FIFO put in the file's
place, a hung network mount. Until 2026-12-07 each hello read it in a worker
thread that could not be abandoned, holding a handshake slot, queued behind
the accounts' lock: one read that blocked froze every login for good, and
the server's close with it (found by a review).

So a :class:`Reloader` makes one read at a time, in a thread no task waits
for to its end (``trio.lowlevel.start_thread_soon``: no limiter held, nothing
for a cancellation to wait on), shared by everyone who asks while it runs.
Each asker waits for it only until :data:`RELOAD_PATIENCE` after it began,
then goes on with the accounts as they are, and the log says so; what the
read comes to, whenever it comes, is logged by the reloader itself.
"""

from __future__ import annotations

import contextlib

import outcome
import trio

from ._log_limit import LimitedLog
from .accounts import Accounts

#: Seconds after a read of the accounts file began that those asking for it
#: stop waiting and go on with the accounts as they are.
RELOAD_PATIENCE = 1.0

#: The key of the reloader's lines in the server's :class:`LimitedLog`.
LOG_KEY = "accounts file"


class Reloader:
    """One read of ``accounts`` at a time, waited for at most :data:`RELOAD_PATIENCE`.

    Made in, and for, one Trio run (the server's :meth:`~conduit.Server.run`):
    its waits are on that run's clock, and a read that ends after the run is
    over is not delivered (see :meth:`belongs_here`).
    """

    def __init__(self, accounts: Accounts, warnings: LimitedLog) -> None:
        """Re-read ``accounts`` when asked; problems go to ``warnings``."""
        #: The accounts it re-reads.
        self.accounts = accounts
        self._warnings = warnings
        self._token = trio.lowlevel.current_trio_token()
        self._in_flight: trio.Event | None = None
        self._began = 0.0

    def belongs_here(self) -> bool:
        """Whether it was made in the calling task's Trio run: a server run
        again gets a reloader of its own (a read of the run before, never
        delivered, would hold this one's flight for good; found by a review)."""
        return self._token is trio.lowlevel.current_trio_token()

    async def reload(self) -> None:
        """Re-read the file if it changed (the read shared with others under way),
        waiting for it until :data:`RELOAD_PATIENCE` after it began."""
        flight = self._in_flight
        if flight is None:
            flight = self._start()
        with trio.move_on_at(self._began + RELOAD_PATIENCE):
            await flight.wait()
            return
        self._warnings.warning(
            LOG_KEY,
            trio.current_time(),
            "accounts file %s: its read has not ended within %.0f s (a FIFO? a hung "
            "mount?): keeping the old data meanwhile",
            self.accounts.path,
            RELOAD_PATIENCE,
        )

    def _start(self) -> trio.Event:
        flight = self._in_flight = trio.Event()
        self._began = trio.current_time()
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[bool]) -> None:
            # In the read's thread: hand the result to the Trio run, if it
            # still runs (a read that ends after the server has gone is moot).
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._over, flight, result)

        trio.lowlevel.start_thread_soon(self.accounts.reload_if_changed, deliver)
        return flight

    def _over(self, flight: trio.Event, result: outcome.Outcome[bool]) -> None:
        self._in_flight = None
        flight.set()
        if isinstance(result, outcome.Error):
            self._warnings.warning(
                LOG_KEY,
                trio.current_time(),
                "accounts file %s unreadable, keeping the old data: %s",
                self.accounts.path,
                result.error,
            )


__all__ = ["LOG_KEY", "RELOAD_PATIENCE", "Reloader"]
