"""When a stream's receive window, not its consumer, holds the sender back: grow it.

A sender may have at most a window of bytes in flight, so one stream moves at
most a window per round trip: 4 MiB (the default ``receive_window``) over a
link with 80 ms between the ends is 52 MB/s, whatever the link carries
(through a delay proxy carrying 97 MB/s it moved 40). A window that large on
loopback, where a round trip is a tenth of a millisecond, is already far more
than the link needs, and every byte of it is a byte a call on the same
connection may wait behind. So
where a descriptor's ``max_receive_window`` lets it (growth is opt-in), the
window starts at ``receive_window`` and grows only where the round trip calls
for it, as QUIC implementations tune theirs (RFC 9000 leaves the policy to
them; quic-go's is the model, with epochs measured in time):

- credit is granted in steps as the consumer takes bytes; the grants are
  counted over an *epoch* of at least :data:`EPOCH_ROUND_TRIPS` round trips;
- if the epoch granted more than half a window per round trip, the bytes came
  back nearly as fast as the window lets them (the sender waited for credit
  rather than the receiver for data): the window doubles, up to
  ``max_receive_window``;
- otherwise the consumer or the link is what paces the stream: it stays;
- and over a round trip under :data:`MIN_ROUND_TRIP` it always stays.

In steady state that leaves the window between two and four times the
bandwidth-delay product, and never grows it where the consumer (a disk) is
the slower end. The epoch spans many round trips because credit goes back in
bursts (a consumer's whole batch at once, up to a window): over a short epoch
one burst would look like a fast link. The round trip is the engine's
smallest measured one (a PING and its PONG), not one measured behind the
stream's own bytes, which would make a larger window look needed by the queue
it builds.

Pure arithmetic on the byte counts and times it is given: the engine reads the
clock and decides how much of the growth its memory budget allows.
"""

from __future__ import annotations

import attrs

#: The shortest epoch, in round trips (see the module docstring).
EPOCH_ROUND_TRIPS = 8
#: Seconds: a shorter round trip never grows a window. Below it a window of
#: 4 MiB already covers 200 MB/s, and a round trip measured there may be
#: our own event loop's lag (a loaded machine took a loopback PING for
#: milliseconds), not the link's.
MIN_ROUND_TRIP = 0.02


@attrs.define(slots=True)
class WindowTuner:
    """The growth of one inbound stream's window (see the module docstring)."""

    #: The largest window this stream may have.
    limit: int
    #: When the current epoch began (the stream's opening, or the last verdict).
    epoch_start: float
    #: Credit granted since then.
    epoch_granted: int = 0

    def growth(self, window: int, granted: int, now: float, round_trip: float | None) -> int:
        """Bytes to add to ``window`` (0 for none), with ``granted`` just granted at ``now``.

        ``round_trip``: the smallest round trip measured on the connection,
        None while none was; without one, or with one under
        :data:`MIN_ROUND_TRIP`, there is nothing to judge by, and the epoch
        starts again.
        """
        if round_trip is None or round_trip < MIN_ROUND_TRIP:
            self.epoch_start = now
            self.epoch_granted = 0
            return 0
        self.epoch_granted += granted
        elapsed = now - self.epoch_start
        if elapsed < EPOCH_ROUND_TRIPS * round_trip:
            return 0
        per_round_trip = self.epoch_granted * round_trip / elapsed
        self.epoch_start = now
        self.epoch_granted = 0
        if per_round_trip <= window / 2 or window >= self.limit:
            return 0
        return min(window, self.limit - window)


__all__ = ["EPOCH_ROUND_TRIPS", "MIN_ROUND_TRIP", "WindowTuner"]
