"""Per-address throttling of failed password attempts.

Pure bookkeeping with an injected clock, so tests can drive it with Trio's
autojump clock or with plain numbers.
"""

from __future__ import annotations

import itertools
from collections import deque

import attrs


@attrs.define
class _Record:
    failures: deque[float] = attrs.field(factory=deque)
    locked_until: float = 0.0


@attrs.define
class AuthThrottle:
    """After ``limit`` failures within ``window`` seconds, refuse an address for ``lockout``."""

    limit: int
    window: float
    lockout: float
    max_tracked: int = 100_000
    _records: dict[str, _Record] = attrs.field(factory=dict, init=False)

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until ``address`` may try again (0 when it may try now)."""
        record = self._records.get(address)
        if record is None:
            return 0.0
        return max(0.0, record.locked_until - now)

    def record_failure(self, address: str, now: float) -> None:
        """Count a failed handshake from ``address``."""
        record = self._records.get(address)
        if record is None:
            if len(self._records) >= self.max_tracked:
                self._forget_oldest(now)
            record = self._records[address] = _Record()
        record.failures.append(now)
        while record.failures and record.failures[0] < now - self.window:
            record.failures.popleft()
        if len(record.failures) >= self.limit:
            record.locked_until = now + self.lockout
            record.failures.clear()

    def record_success(self, address: str) -> None:
        """A correct password clears the address's record."""
        self._records.pop(address, None)

    def _forget_oldest(self, now: float) -> None:
        # Bound memory under a spray of addresses: drop records that no longer
        # matter and, if that is not enough, the oldest tenth. Evicting in bulk
        # keeps the scan off the path of every new failing address.
        stale = [
            key
            for key, rec in self._records.items()
            if rec.locked_until < now and (not rec.failures or rec.failures[-1] < now - self.window)
        ]
        for key in stale:
            del self._records[key]
        excess = len(self._records) - self.max_tracked * 9 // 10
        for key in list(itertools.islice(self._records, max(0, excess))):
            del self._records[key]
