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
the same budget. (A handshake that ends by the server's own fault, not the
peer's, is :meth:`~AuthThrottle.released`: neither given back as a success
nor counted.)

A failure counts for ``window`` seconds from when it failed; an attempt in
flight counts until it settles, however long that takes (it is never aged
out of the budget while in flight, or a guesser holding its attempts open
longer than the window would get them for free). The server bounds an
attempt's life with ``auth_timeout``, which must not exceed the window.

Two budgets apply to each attempt:

- per address: ``limit`` attempts within ``window`` seconds, then the address is
  refused for ``lockout`` seconds;
- per user (accounts mode only): ``user_limit`` attempts within ``window``,
  then that user is locked for ``lockout`` seconds, *except* from addresses it
  authenticated from within :data:`TRUST_PERIOD` (still bound by their own
  address budget), the latest :data:`MAX_TRUSTED_PER_USER` of them. A stranger
  on another address can therefore lock a user out only of addresses the user
  has not logged in from recently; and no user, logging in from address after
  address, can push the others' trusted addresses out of the bounded table.

Addresses are keyed by :func:`address_key`: an IPv6 address by its /64 (one
host usually owns a whole /64, so per-address budgets would otherwise be
unlimited), an IPv4-mapped IPv6 address as the IPv4 address it is.

The tables are bounded (``max_tracked`` keys each), but a lock-out is never
forgotten to make room: when a table is full of locked records, new keys are
refused as throttled until the first lock ends. Below that bound, a record
that no longer matters (no lock-out, no failure within the window, nothing
in flight) is forgotten a little at a time: each new attempt looks at the
:data:`SWEEP_STEP` oldest records of each table, so a spray of addresses or
names that never come back leaves no more behind than its window's worth.

Pure bookkeeping with an injected clock, so tests drive it with Trio's
autojump clock or with plain numbers.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict

import attrs

#: Seconds an address that authenticated as a user stays exempt from that user's lock-out.
TRUST_PERIOD = 24 * 3600.0
#: IPv6 addresses are throttled per prefix of this length (a typical host's allocation).
IPV6_PREFIX = 64
#: Records of each table looked at, oldest first, at each new attempt: more
#: than the one record an attempt may add, so a table of stale records drains.
SWEEP_STEP = 4
#: Addresses one user is trusted from at once, the latest it logged in from:
#: an account logging in from address after address pushes out its own
#: oldest, never the trust of other users (the table is shared and bounded).
MAX_TRUSTED_PER_USER = 32


@functools.lru_cache(maxsize=4096)
def address_key(host: str) -> str:
    """The throttle's (and the per-address socket cap's) key for a peer's ``host``.

    IPv4 as it is; IPv4-mapped IPv6 (``::ffff:a.b.c.d``) as ``a.b.c.d``; other
    IPv6 as its /64 network (``2001:db8:1:2::/64``), since a single host can
    pick any of its 2**64 addresses; anything else (no address) unchanged.
    Memoised (bounded): a server asks for every connection, several times.
    """
    try:
        # A zone id (fe80::1%eth0) names the interface, not the peer.
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


def owner_key(username: str | None, host: str) -> str:
    """Whom a client counts against for what one client may hold (its
    connections, its resume tokens): its account, or with a shared password
    (no username, None or "") the address key ``host`` (:func:`address_key`).
    A server is in one mode or the other, so the two kinds never meet."""
    return username if username else host


@attrs.define(eq=False)
class Attempt:
    """One reserved password attempt (a ticket for :meth:`AuthThrottle.succeeded`/``failed``)."""

    address: str
    username: str
    #: When it was reserved.
    time: float
    #: When it failed; None while in flight.
    failed_at: float | None = None

    @property
    def failed(self) -> bool:
        """Whether it failed (else it is still in flight)."""
        return self.failed_at is not None

    def stale(self, since: float) -> bool:
        """Whether it failed before ``since`` (an attempt in flight never is)."""
        return self.failed_at is not None and self.failed_at < since


@attrs.define
class _Record:
    # A list, not a deque: it holds at most a limit's worth (a few) of
    # attempts, and 100,000 tracked addresses must stay small.
    attempts: list[Attempt] = attrs.field(factory=list)
    locked_until: float = 0.0

    def prune(self, since: float) -> None:
        """Forget the failures older than ``since``; attempts in flight stay."""
        if any(a.stale(since) for a in self.attempts):
            self.attempts = [a for a in self.attempts if not a.stale(since)]

    def in_flight(self) -> bool:
        return any(a.failed_at is None for a in self.attempts)


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
    #: Each user's trusted addresses, oldest first (at most MAX_TRUSTED_PER_USER).
    _trusted_from: dict[str, list[str]] = attrs.field(factory=dict, init=False)
    #: Per table (by id): until when it is known to be full of locked records.
    _full_until: dict[int, float] = attrs.field(factory=dict, init=False)

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
        self._sweep(now)
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
        # A table full of lock-outs takes no new key (a lock is never forgotten
        # to make room): refused as throttled until the first lock ends.
        full = self._room(self._records, address, now)
        if username:
            full = max(full, self._room(self._users, username, now))
        if full > 0:
            return full
        attempt = Attempt(address, username, now)
        self._record(self._records, address, now).attempts.append(attempt)
        if username:
            self._record(self._users, username, now).attempts.append(attempt)
        return attempt

    def succeeded(self, attempt: Attempt, now: float) -> None:
        """The attempt authenticated: free its slot and that user's failures from its address.

        Attempts still under way keep their slots (they count if they fail).
        The failures are forgiven because an honest client whose connection
        was cut during a handshake counts as one (the server cannot tell it
        from a wrong password), and a flaky network must not lock it out.
        """
        record = self._records.get(attempt.address)
        if record is not None:
            username = attempt.username
            record.attempts = [
                a
                for a in record.attempts
                if a is not attempt and not (a.failed and a.username == username)
            ]
            if not record.attempts and record.locked_until <= now:
                del self._records[attempt.address]
        user = self._users.get(attempt.username) if attempt.username else None
        if user is not None:
            # Only this attempt: a stranger's failures against the user keep counting.
            user.attempts = [a for a in user.attempts if a is not attempt]
        if attempt.username:
            self._trust(attempt.username, attempt.address, now)

    def failed(self, attempt: Attempt, now: float) -> None:
        """The attempt did not authenticate (wrong password, dropped, timed out, bad frames)."""
        attempt.failed_at = now
        self._check(self._records.get(attempt.address), self.limit, now)
        if attempt.username:
            self._check(self._users.get(attempt.username), self.user_limit, now)

    def released(self, attempt: Attempt, now: float) -> None:
        """The attempt ended by the server's fault, not the peer's: free its slot,
        uncounted. Nothing is forgiven, nothing trusted."""
        for table, key in ((self._records, attempt.address), (self._users, attempt.username)):
            record = table.get(key) if key else None
            if record is None:
                continue
            record.attempts = [a for a in record.attempts if a is not attempt]
            if not record.attempts and record.locked_until <= now:
                del table[key]

    def record_failure(self, address: str, now: float, username: str = "") -> None:
        """Count a failed attempt that was not reserved (reserve + failed in one).

        Not counted for a new key while its table is full of lock-outs.
        """
        self._sweep(now)
        if self._room(self._records, address, now) > 0 or (
            username and self._room(self._users, username, now) > 0
        ):
            return
        attempt = Attempt(address, username, now)
        self._record(self._records, address, now).attempts.append(attempt)
        if username:
            self._record(self._users, username, now).attempts.append(attempt)
        self.failed(attempt, now)

    def tracked(self) -> int:
        """Keys held in all: addresses, users and (user, address) pairs trusted."""
        return len(self._records) + len(self._users) + len(self._trusted)

    # ------------------------------------------------------------------ internals

    def _sweep(self, now: float) -> None:
        """Forget a few records that no longer matter, oldest first (see the
        module docstring). One that still matters goes to the back of its
        table, so the next sweep looks further; trust ends in order of age."""
        since = now - self.window
        for table in (self._records, self._users):
            for _ in range(min(SWEEP_STEP, len(table))):
                key = next(iter(table))
                record = table.pop(key)
                if record.locked_until > now or not all(a.stale(since) for a in record.attempts):
                    table[key] = record
        trusted = self._trusted
        for _ in range(SWEEP_STEP):
            if not trusted or now - next(iter(trusted.values())) < TRUST_PERIOD:
                break
            self._untrust(next(iter(trusted)))

    def _trust(self, username: str, address: str, now: float) -> None:
        key = (username, address)
        addresses = self._trusted_from.setdefault(username, [])
        if key in self._trusted:
            addresses.remove(address)  # (at most MAX_TRUSTED_PER_USER long)
            self._trusted.move_to_end(key)
        addresses.append(address)
        self._trusted[key] = now
        if len(addresses) > MAX_TRUSTED_PER_USER:
            self._untrust((username, addresses[0]))
        while len(self._trusted) > self.max_tracked:
            self._untrust(next(iter(self._trusted)))

    def _untrust(self, key: tuple[str, str]) -> None:
        del self._trusted[key]
        username, address = key
        addresses = self._trusted_from[username]
        addresses.remove(address)
        if not addresses:
            del self._trusted_from[username]

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
            # The failures are spent on the lock; attempts in flight count when they settle.
            record.attempts = [a for a in record.attempts if not a.failed]

    def _record(self, table: dict[str, _Record], key: str, now: float) -> _Record:
        record = table.get(key)
        if record is None:
            # The caller made room (see _room).
            record = table[key] = _Record()
        return record

    def _room(self, table: dict[str, _Record], key: str, now: float) -> float:
        """0 when ``key`` has or can get a record; else seconds until a lock in the table ends."""
        if key in table or len(table) < self.max_tracked:
            return 0.0
        # While the table is known to be all locks, refuse without a scan: a
        # spray of new keys must not cost a 100,000-record scan each.
        full_until = self._full_until.get(id(table), 0.0)
        if full_until > now:
            return full_until - now
        self._forget_oldest(table, now)
        if len(table) < self.max_tracked:
            return 0.0
        full_until = self._full_until[id(table)] = min(r.locked_until for r in table.values())
        return full_until - now

    def _forget_oldest(self, table: dict[str, _Record], now: float) -> None:
        # Bound memory under a spray of addresses or usernames: drop records
        # that no longer matter and, if that is not enough, the oldest unlocked
        # ones down to nine tenths. A locked record is never dropped: that
        # would lift its lock-out for whoever sprays enough new keys. Nor is
        # one with an attempt in flight unless nothing else is left to drop
        # (there are at most as many as sockets still authenticating): its
        # attempts would fail uncounted.
        # Evicting in bulk keeps the scan off the path of every new key.
        since = now - self.window
        stale = [
            key
            for key, rec in table.items()
            if rec.locked_until <= now and all(a.stale(since) for a in rec.attempts)
        ]
        for key in stale:
            del table[key]
        excess = len(table) - self.max_tracked * 9 // 10
        if excess <= 0:
            return
        idle: list[str] = []
        busy: list[str] = []
        for key, rec in table.items():
            if rec.locked_until <= now:
                (busy if rec.in_flight() else idle).append(key)
        for key in (idle + busy)[:excess]:
            del table[key]


__all__ = [
    "IPV6_PREFIX",
    "MAX_TRUSTED_PER_USER",
    "SWEEP_STEP",
    "TRUST_PERIOD",
    "Attempt",
    "AuthThrottle",
    "address_key",
    "owner_key",
]
