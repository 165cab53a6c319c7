"""Log lines a peer causes at will, rate-limited per key and in all.

A flood of failed handshakes, or of requests an authenticated peer repeats
for nothing, must not become a flood of log lines (disk, journald, whoever
reads them). Each key gets a small burst, then one line per ``period`` that
says how many were suppressed. A key is an address before authentication,
and an owner after it (a user, or with a shared password a client's host).
Honest mistakes (a few wrong passwords) are all logged. A flood spread over
many keys (each within its own budget) meets a second budget, per kind of
line across all keys: a larger burst, then one line per ``total_period``,
which says how many lines from all were suppressed.

A key's bucket is kept while it could still limit a line: one quiet for
``burst * period`` (full again) is forgotten, a few at each line logged, so
a spray of addresses that never come back leaves no table behind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import attrs

#: Buckets looked at, oldest first, at each line (more than the one a line adds).
SWEEP_STEP = 4


@attrs.define
class _Bucket:
    tokens: float
    stamp: float
    suppressed: int = 0

    def refill(self, now: float, burst: int, period: float) -> None:
        """Add what ``now - stamp`` earned (one line per ``period``), up to ``burst``."""
        self.tokens = min(float(burst), self.tokens + max(0.0, now - self.stamp) / period)
        self.stamp = now


def _as_text(error: BaseException) -> str:
    """``str(error)``, or its type and repr when its ``__str__`` fails (a line
    must not raise where logging would have reported a formatting error)."""
    try:
        return str(error)
    except Exception:
        return f"<{type(error).__name__} that cannot be shown>"


@attrs.define
class LimitedLog:
    """``warning(key, clock_now, msg, *args)``: at most ``burst`` lines, then one per ``period``.

    Budgets are per ``key`` (an address, or an owner) and message template, so a flood of
    one kind does not hide the first lines of another; and per message
    template across all keys (``total_burst``, then one per
    ``total_period``), so a flood from many addresses is not one line per
    attempt either.
    """

    log: logging.Logger
    burst: int = 5
    period: float = 10.0
    max_keys: int = 10_000
    # Large enough that an honest incident (a few dozen clients with an old
    # password) is logged line by line; a flood is ten lines a second.
    total_burst: int = 100
    total_period: float = 0.1
    _buckets: OrderedDict[tuple[str, str], _Bucket] = attrs.field(factory=OrderedDict, init=False)
    # Per message template: the templates are the code's own, a handful.
    _totals: dict[str, _Bucket] = attrs.field(factory=dict, init=False)

    def warning(self, key: str, now: float, message: str, *args: Any) -> None:
        """Log ``message % args`` for ``key`` (an address, an owner) unless it, or all
        addresses together, have used their budget for this message."""
        self._emit(logging.WARNING, key, now, message, *args)

    def error(self, key: str, now: float, message: str, *args: Any) -> None:
        """:meth:`warning` at level ERROR (a condition that repeats for as long
        as it lasts, such as the server out of file descriptors)."""
        self._emit(logging.ERROR, key, now, message, *args)

    def info(self, key: str, now: float, message: str, *args: Any) -> None:
        """:meth:`warning` at level INFO (what a peer may cause at will, such as
        connections reset before their hello, under the same budgets)."""
        if self.log.isEnabledFor(logging.INFO):
            self._emit(logging.INFO, key, now, message, *args)

    def _emit(self, level: int, key: str, now: float, message: str, *args: Any) -> None:
        self._sweep(now)
        slot = (key, message)
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = _Bucket(float(self.burst), now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(slot)
        bucket.refill(now, self.burst, self.period)
        if bucket.tokens < 1:
            bucket.suppressed += 1
            return
        total = self._totals.get(message)
        if total is None:
            total = self._totals[message] = _Bucket(float(self.total_burst), now)
        total.refill(now, self.total_burst, self.total_period)
        if total.tokens < 1:
            # Counted once, here: the address's own budget is left as it was.
            total.suppressed += 1
            return
        bucket.tokens -= 1
        total.tokens -= 1
        if bucket.suppressed:
            message += " (%d similar lines from this source suppressed)"
            args = (*args, bucket.suppressed)
            bucket.suppressed = 0
        if total.suppressed:
            message += " (%d similar lines from all addresses suppressed)"
            args = (*args, total.suppressed)
            total.suppressed = 0
        # An exception in a line's arguments would go into its record, and
        # with it its traceback: every frame it passed, and the connection
        # they hold, kept alive by whatever handler keeps records (a memory
        # buffer, a test's capture; a fuzzing review, 2026-12-07). Its text
        # says what the line needs.
        args = tuple(_as_text(arg) if isinstance(arg, BaseException) else arg for arg in args)
        self.log.log(level, message, *args)

    def tracked(self) -> int:
        """Buckets held (per address and message)."""
        return len(self._buckets)

    def _sweep(self, now: float) -> None:
        # In order of last use: the first is the quietest. One quiet for
        # burst * period is full again, as a new one would be; a count of
        # lines it suppressed goes with it (its address has gone quiet).
        quiet = self.burst * self.period
        for _ in range(SWEEP_STEP):
            if not self._buckets or now - next(iter(self._buckets.values())).stamp < quiet:
                return
            self._buckets.popitem(last=False)


class ThreadedLimitedLog:
    """A :class:`LimitedLog` for lines logged from worker threads too.

    Its budgets are locked, and its clock is :func:`time.monotonic` (a worker
    thread has no Trio clock). ``info(key, msg, *args)`` and
    ``warning(key, msg, *args)`` as :class:`LimitedLog`'s, without the clock.
    """

    __slots__ = ("_limited", "_lock")

    def __init__(self, log: logging.Logger) -> None:
        self._limited = LimitedLog(log)
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args: Any) -> None:
        """:meth:`LimitedLog.warning`, from any thread."""
        with self._lock:
            self._limited.warning(key, time.monotonic(), message, *args)

    def info(self, key: str, message: str, *args: Any) -> None:
        """:meth:`LimitedLog.info`, from any thread."""
        with self._lock:
            self._limited.info(key, time.monotonic(), message, *args)


__all__ = ["SWEEP_STEP", "LimitedLog", "ThreadedLimitedLog"]
