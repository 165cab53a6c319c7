"""The receive window's growth (sans-IO): the verdicts of :class:`WindowTuner`.

The engine side (a window growing over a long link, staying behind a slow
consumer, within the receive budget) is in ``tests/test_connection.py``.
"""

from __future__ import annotations

from conduit.protocol.window_tuning import EPOCH_ROUND_TRIPS, MIN_ROUND_TRIP, WindowTuner

WINDOW = 4 * 1024 * 1024
RTT = 0.08
EPOCH = EPOCH_ROUND_TRIPS * RTT


def _epoch(tuner: WindowTuner, window: int, per_round_trip: float, start: float) -> int:
    """Grant ``per_round_trip`` bytes per round trip, a quarter window at a time,
    for one epoch from ``start`` (a hair longer, so that its last grant ends
    it); the growth that grant brings."""
    step = window // 4
    grants = round(per_round_trip * EPOCH_ROUND_TRIPS / step)
    growth = 0
    for i in range(1, grants + 1):
        growth += tuner.growth(window, step, start + 1.001 * EPOCH * i / grants, RTT)
    assert tuner.epoch_granted == 0  # the epoch ended with its last grant
    return growth


def test_a_window_that_paces_its_stream_doubles_up_to_its_limit() -> None:
    tuner = WindowTuner(limit=3 * WINDOW, epoch_start=0.0)
    # Nearly a window per round trip: the sender waits for credit.
    assert _epoch(tuner, WINDOW, 0.9 * WINDOW, 0.0) == WINDOW
    # Doubled, then only as far as the limit, then not at all.
    assert _epoch(tuner, 2 * WINDOW, 1.8 * WINDOW, 1.001 * EPOCH) == WINDOW
    assert _epoch(tuner, 3 * WINDOW, 2.7 * WINDOW, 2.002 * EPOCH) == 0


def test_a_window_the_consumer_or_link_leaves_half_empty_stays() -> None:
    tuner = WindowTuner(limit=8 * WINDOW, epoch_start=0.0)
    for epoch in range(5):
        assert _epoch(tuner, WINDOW, 0.4 * WINDOW, epoch * 1.001 * EPOCH) == 0


def test_a_burst_of_credit_right_after_a_verdict_is_no_fast_link() -> None:
    """A consumer hands back a whole batch at once: a window granted within a
    moment says nothing about the link until the epoch has lasted its round trips."""
    tuner = WindowTuner(limit=8 * WINDOW, epoch_start=0.0)
    assert tuner.growth(WINDOW, WINDOW, 0.001, RTT) == 0
    assert tuner.growth(WINDOW, WINDOW, 0.002, RTT) == 0
    # The epoch ends once it has lasted; two windows in it are a quarter window
    # per round trip: the link is not window-bound.
    assert tuner.growth(WINDOW, 0, EPOCH, RTT) == 0
    assert tuner.epoch_granted == 0 and tuner.epoch_start == EPOCH


def test_without_a_round_trip_there_is_no_verdict() -> None:
    tuner = WindowTuner(limit=8 * WINDOW, epoch_start=0.0)
    for i in range(1, 100):
        assert tuner.growth(WINDOW, WINDOW, i * 0.001, None) == 0
    assert tuner.epoch_granted == 0  # what was granted without one is not counted later
    assert tuner.growth(WINDOW, WINDOW, 0.1 + EPOCH, RTT) == 0


def test_a_round_trip_too_short_to_need_it_grows_nothing() -> None:
    """Under MIN_ROUND_TRIP a window of a few MiB covers hundreds of MB/s, and
    such a round trip may be our own loop's lag: credit however fast grows nothing."""
    tuner = WindowTuner(limit=8 * WINDOW, epoch_start=0.0)
    short = MIN_ROUND_TRIP / 2
    for i in range(1, 200):
        assert tuner.growth(WINDOW, WINDOW, i * short, short) == 0
