"""Throttling of password attempts per address and per user, counted before the work.

An attempt *reserves* a slot the moment the server has read a CLIENT_HELLO,
before any password work: in-flight attempts count like failures, so N
parallel connections get no more guesses than N sequential ones. When a
budget is full of attempts still in flight, a new attempt waits for one to
settle (the server queues it) rather than being refused, so honest parallel
connects from one address are serialised, not turned away. A success
gives its slot back and forgives that user's earlier failures from that
address; anything else (wrong password, a hello that never confirms, a
dropped connection) leaves the slot counted, so hello replays are bounded by
the same budget.

Two budgets apply to each attempt:

- per address: ``limit`` attempts within ``window`` seconds, then the address is
  refused for ``lockout`` seconds;
- per user (accounts mode only): ``user_limit`` attempts within ``window``,
  then that user is locked for ``lockout`` seconds, *except* from addresses it
  authenticated from within :data:`TRUST_PERIOD` (still bound by their own
  address budget). A stranger on another address can therefore lock a user out
  only of addresses the user has not logged in from recently.

Pure bookkeeping with an injected clock, so tests drive it with Trio's
autojump clock or with plain numbers.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import attrs

#: Seconds an address that authenticated as a user stays exempt from that user's lock-out.
TRUST_PERIOD = 24 * 3600.0


@attrs.define(eq=False)
class Attempt:
    """One reserved password attempt (a ticket for :meth:`AuthThrottle.succeeded`/``failed``)."""

    address: str
    username: str
    time: float
    failed: bool = False


@attrs.define
class _Record:
    # A list, not a deque: it holds at most a limit's worth (a few) of
    # attempts, and 100,000 tracked addresses must stay small.
    attempts: list[Attempt] = attrs.field(factory=list)
    locked_until: float = 0.0

    def prune(self, since: float) -> None:
        stale = 0
        while stale < len(self.attempts) and self.attempts[stale].time < since:
            stale += 1
        if stale:
            del self.attempts[:stale]


@attrs.define
class AuthThrottle:
    """Budgets of password attempts per address and per user (see the module docstring)."""

    limit: int
    window: float
    lockout: float
    user_limit: int = 20
    max_tracked: int = 100_000
    _records: dict[str, _Record] = attrs.field(factory=dict, init=False)
    _users: dict[str, _Record] = attrs.field(factory=dict, init=False)
    _trusted: OrderedDict[tuple[str, str], float] = attrs.field(factory=OrderedDict, init=False)

    def retry_after(self, address: str, now: float, username: str = "") -> float:
        """Seconds ``address`` (trying ``username``) stays locked out (0 when not locked)."""
        wait = self._locked(self._records.get(address), now)
        if username and not self._is_trusted(username, address, now):
            wait = max(wait, self._locked(self._users.get(username), now))
        return wait

    def reserve(self, address: str, username: str, now: float) -> Attempt | float:
        """Count an attempt before its work.

        The ticket; or the seconds of lock-out left (> 0) when refused; or 0.0
        when the budget is full of attempts still in flight (try again when
        one settles).
        """
        wait = self.retry_after(address, now, username)
        if wait > 0:
            return wait
        if self._full(self._records.get(address), self.limit, now):
            return 0.0
        if (
            username
            and not self._is_trusted(username, address, now)
            and self._full(self._users.get(username), self.user_limit, now)
        ):
            return 0.0
        attempt = Attempt(address, username, now)
        self._record(self._records, address, now).attempts.append(attempt)
        if username:
            self._record(self._users, username, now).attempts.append(attempt)
        return attempt

    def succeeded(self, attempt: Attempt, now: float) -> None:
        """The attempt authenticated: free its slot and that user's failures from its address."""
        record = self._records.get(attempt.address)
        if record is not None:
            record.attempts = [a for a in record.attempts if a.username != attempt.username]
            if not record.attempts and record.locked_until <= now:
                del self._records[attempt.address]
        user = self._users.get(attempt.username) if attempt.username else None
        if user is not None:
            # Only this attempt: a stranger's failures against the user keep counting.
            user.attempts = [a for a in user.attempts if a is not attempt]
        if attempt.username:
            key = (attempt.username, attempt.address)
            self._trusted[key] = now
            self._trusted.move_to_end(key)
            while len(self._trusted) > self.max_tracked:
                self._trusted.popitem(last=False)

    def failed(self, attempt: Attempt, now: float) -> None:
        """The attempt did not authenticate (wrong password, dropped, timed out, bad frames)."""
        attempt.failed = True
        self._check(self._records.get(attempt.address), self.limit, now)
        if attempt.username:
            self._check(self._users.get(attempt.username), self.user_limit, now)

    def record_failure(self, address: str, now: float, username: str = "") -> None:
        """Count a failed attempt that was not reserved (reserve + failed in one)."""
        attempt = Attempt(address, username, now)
        self._record(self._records, address, now).attempts.append(attempt)
        if username:
            self._record(self._users, username, now).attempts.append(attempt)
        self.failed(attempt, now)

    # ------------------------------------------------------------------ internals

    def _is_trusted(self, username: str, address: str, now: float) -> bool:
        since = self._trusted.get((username, address))
        return since is not None and now - since < TRUST_PERIOD

    @staticmethod
    def _locked(record: _Record | None, now: float) -> float:
        if record is None or record.locked_until <= now:
            return 0.0
        return record.locked_until - now

    def _full(self, record: _Record | None, limit: int, now: float) -> bool:
        if record is None:
            return False
        record.prune(now - self.window)
        return len(record.attempts) >= limit

    def _check(self, record: _Record | None, limit: int, now: float) -> None:
        if record is None:
            return
        record.prune(now - self.window)
        if sum(1 for a in record.attempts if a.failed) >= limit:
            record.locked_until = now + self.lockout
            record.attempts.clear()

    def _record(self, table: dict[str, _Record], key: str, now: float) -> _Record:
        record = table.get(key)
        if record is None:
            if len(table) >= self.max_tracked:
                self._forget_oldest(table, now)
            record = table[key] = _Record()
        return record

    def _forget_oldest(self, table: dict[str, _Record], now: float) -> None:
        # Bound memory under a spray of addresses or usernames: drop records
        # that no longer matter and, if that is not enough, the oldest tenth.
        # Evicting in bulk keeps the scan off the path of every new key.
        stale = [
            key
            for key, rec in table.items()
            if rec.locked_until < now
            and (not rec.attempts or rec.attempts[-1].time < now - self.window)
        ]
        for key in stale:
            del table[key]
        excess = len(table) - self.max_tracked * 9 // 10
        for key in list(itertools.islice(table, max(0, excess))):
            del table[key]


__all__ = ["TRUST_PERIOD", "Attempt", "AuthThrottle"]
