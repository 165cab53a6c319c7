"""Warning lines about unauthenticated peers, rate-limited per address.

A flood of failed handshakes must not become a flood of log lines (disk,
journald, whoever reads them): each address gets a small burst, then one line
per ``period`` that says how many were suppressed. Honest mistakes (a few
wrong passwords) are all logged.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import attrs


@attrs.define
class _Bucket:
    tokens: float
    stamp: float
    suppressed: int = 0


@attrs.define
class LimitedLog:
    """``warning(key, clock_now, msg, *args)``: at most ``burst`` lines, then one per ``period``.

    Budgets are per ``key`` (an address) and message template, so a flood of
    one kind does not hide the first lines of another.
    """

    log: logging.Logger
    burst: int = 5
    period: float = 10.0
    max_keys: int = 10_000
    _buckets: OrderedDict[tuple[str, str], _Bucket] = attrs.field(factory=OrderedDict, init=False)

    def warning(self, key: str, now: float, message: str, *args: Any) -> None:
        """Log ``message % args`` for ``key`` (an address) unless it has used its budget."""
        slot = (key, message)
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = _Bucket(float(self.burst), now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(slot)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) / self.period)
        bucket.stamp = now
        if bucket.tokens < 1:
            bucket.suppressed += 1
            return
        bucket.tokens -= 1
        if bucket.suppressed:
            message += " (%d similar lines from this address suppressed)"
            args = (*args, bucket.suppressed)
            bucket.suppressed = 0
        self.log.warning(message, *args)


__all__ = ["LimitedLog"]
