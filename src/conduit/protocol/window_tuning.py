"""When a stream's receive window, not its consumer, holds the sender back: grow it.

A sender may have at most a window of bytes in flight, so one stream moves at
most a window per round trip: 4 MiB (the default ``receive_window``) over a
link with 80 ms between the ends is 52 MB/s, whatever the link carries
(through a delay proxy carrying 97 MB/s it moved 40). A window that large on
loopback, where a round trip is a tenth of a millisecond, is already far more
than the link needs, and every byte of it is a byte a call on the same
connection may wait behind. So where a descriptor's
``max_receive_window`` lets it (by default up to 8 windows; set to
``receive_window``, every window stays where it starts), the window starts
at ``receive_window`` and grows only where the round trip calls for it, as
QUIC implementations tune theirs (RFC 9000 leaves the policy to them;
quic-go's is the model, with epochs measured in time):

- credit is granted in steps as the consumer takes bytes; the grants are
  counted over an *epoch* of at least :data:`EPOCH_ROUND_TRIPS` round trips;
- if the epoch granted more than half a window per round trip, the bytes came
  back nearly as fast as the window lets them (the sender waited for credit
  rather than the receiver for data): the window doubles, up to
  ``max_receive_window``;
- otherwise the consumer or the link is what paces the stream: it stays;
- it stays too when at least half the round trips timed during the epoch
  (one a round trip, from its second on) took more than
  :data:`QUEUE_TOLERANCE` longer than the smallest: a queue stood at the
  link's narrowest point most of the time, so the link, not the window, was
  full;
- and over a round trip under :data:`MIN_ROUND_TRIP` it always stays.

The credit rule alone cannot tell a full window from a full link: a link
moving at its own rate, just over half a window per round trip, brings the
credit back as fast as a window that paces it would, and a window doubled
there adds only bytes waiting in the link's queue (and every call on the
connection waits behind them). The queue shows in the round trip: the
PONG to a PING comes back behind the window's bytes, late by the time they
take to drain. A queue that stands most of the time says the window
already fills the link: doubling it there only doubles what every call
waits behind. So a stream's window grows at most about once past the point
where it fills the link (the growth that overshoots is seen only in the
next epoch), not on and on while the credit keeps coming at more than half
a window per round trip. Streams growing on one connection each judge the
queue they share: two whose verdicts fall together may both double into it
once. Where the consumer (a disk) is the slower end the window never grows.

The epoch spans many round trips because credit goes back in bursts (a
consumer's whole batch at once, up to a window): over a short epoch one
burst would look like a fast link. The round trip it is judged by is the
engine's smallest measured one (a PING and its PONG), not one measured
behind the stream's own bytes, which would make a larger window look needed
by the queue it builds; those timed during the epoch only say whether that
queue is there.

Pure arithmetic on the byte counts and times it is given: the engine reads the
clock and decides how much of the growth its memory budget allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

#: The shortest epoch, in round trips (see the module docstring).
EPOCH_ROUND_TRIPS = 8
#: Seconds: a shorter round trip never grows a window. Below it a window of
#: 4 MiB already covers 200 MB/s, and a round trip measured there may be
#: our own event loop's lag (a loaded machine took a loopback PING for
#: milliseconds), not the link's.
MIN_ROUND_TRIP = 0.02
#: How much longer than the smallest a round trip timed during an epoch may
#: be, as a share of it, before it is taken to have waited in a queue: a
#: quarter (5 ms at 20 ms) is over the few milliseconds a busy event loop
#: adds to a PING, and under what a window's worth of queue adds.
QUEUE_TOLERANCE = 0.25


def waited_in_a_queue(took: float, smallest: float) -> bool:
    """Whether a round trip that ``took`` seconds, against the ``smallest``
    measured, waited in a queue (more than :data:`QUEUE_TOLERANCE` longer)."""
    return took > smallest * (1 + QUEUE_TOLERANCE)


@attrs.define(slots=True)
class WindowTuner:
    """The growth of one inbound stream's window (see the module docstring)."""

    #: The largest window this stream may have.
    limit: int
    #: When the current epoch began (the stream's opening, or the last verdict).
    epoch_start: float
    #: Credit granted since then.
    epoch_granted: int = 0
    #: When this epoch last asked for a round trip to be timed (:meth:`probe_due`).
    last_probe: float | None = None

    def growth(
        self,
        window: int,
        granted: int,
        now: float,
        round_trip: float | None,
        round_trips_since: Callable[[float], Sequence[float]] | None = None,
    ) -> int:
        """Bytes to add to ``window`` (0 for none), with ``granted`` just granted at ``now``.

        ``round_trip``: the smallest round trip measured on the connection,
        None while none was; without one, or with one under
        :data:`MIN_ROUND_TRIP`, there is nothing to judge by, and the epoch
        starts again. ``round_trips_since(t)``: the round trips of the PINGs
        sent at ``t`` or later, asked once an epoch, at its verdict; without
        it, or without any, the credit alone decides.
        """
        if round_trip is None or round_trip < MIN_ROUND_TRIP:
            self._next_epoch(now)
            return 0
        self.epoch_granted += granted
        elapsed = now - self.epoch_start
        if elapsed < EPOCH_ROUND_TRIPS * round_trip:
            return 0
        per_round_trip = self.epoch_granted * round_trip / elapsed
        # The epoch's first round trip is the last growth's to take effect in.
        loaded_since = self.epoch_start + round_trip
        self._next_epoch(now)
        if per_round_trip <= window / 2 or window >= self.limit:
            return 0
        if round_trips_since is not None:
            loaded = round_trips_since(loaded_since)
            queued = sum(waited_in_a_queue(took, round_trip) for took in loaded)
            if loaded and 2 * queued >= len(loaded):
                return 0
        return min(window, self.limit - window)

    def probe_due(self, window: int, now: float, round_trip: float | None) -> bool:
        """Whether to time a round trip now, behind the stream's bytes: once a
        round trip from the epoch's second on, so that the verdict finds
        several, the last growth having had its round trip to take effect;
        never once ``window`` is at the limit (no verdict could grow it)."""
        if round_trip is None or round_trip < MIN_ROUND_TRIP or window >= self.limit:
            return False
        last = self.epoch_start if self.last_probe is None else self.last_probe
        if now - last < round_trip:
            return False
        self.last_probe = now
        return True

    def _next_epoch(self, now: float) -> None:
        self.epoch_start = now
        self.epoch_granted = 0
        self.last_probe = None


__all__ = [
    "EPOCH_ROUND_TRIPS",
    "MIN_ROUND_TRIP",
    "QUEUE_TOLERANCE",
    "WindowTuner",
    "waited_in_a_queue",
]
