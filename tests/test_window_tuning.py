"""The receive window's growth (sans-IO): the verdicts of :class:`WindowTuner`.

The engine side (a window growing over a long link, staying behind a slow
consumer, within the receive budget) is in ``tests/test_connection.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from conduit.protocol.window_tuning import (
    EPOCH_ROUND_TRIPS,
    MIN_ROUND_TRIP,
    QUEUE_TOLERANCE,
    WindowTuner,
)

WINDOW = 4 * 1024 * 1024
RTT = 0.08
EPOCH = EPOCH_ROUND_TRIPS * RTT


def _epoch(
    tuner: WindowTuner,
    window: int,
    per_round_trip: float,
    start: float,
    round_trips_since: Callable[[float], Sequence[float]] | None = None,
) -> int:
    """Grant ``per_round_trip`` bytes per round trip, a quarter window at a time,
    for one epoch from ``start`` (a hair longer, so that its last grant ends
    it); the growth that grant brings."""
    step = window // 4
    grants = round(per_round_trip * EPOCH_ROUND_TRIPS / step)
    growth = 0
    for i in range(1, grants + 1):
        now = start + 1.001 * EPOCH * i / grants
        growth += tuner.growth(window, step, now, RTT, round_trips_since)
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


def test_a_queue_that_stood_most_of_the_epoch_keeps_the_window() -> None:
    """Credit at nearly a window per round trip, but half or more of the round
    trips timed since the epoch's first took more than QUEUE_TOLERANCE longer
    than the smallest: the link, not the window, is full, and the window
    stays. With most of them within the tolerance, it grows."""
    late, early = RTT * (1 + QUEUE_TOLERANCE) * 1.01, RTT * (1 + QUEUE_TOLERANCE) * 0.99
    asked: list[float] = []

    def half_late(since: float) -> list[float]:
        asked.append(since)
        return [late, early, late, early]

    tuner = WindowTuner(limit=8 * WINDOW, epoch_start=0.0)
    assert _epoch(tuner, WINDOW, 0.9 * WINDOW, 0.0, half_late) == 0
    # Asked once, at the verdict, for those sent after the epoch's first round
    # trip (the last growth's to take effect in).
    assert asked == [RTT]
    start = tuner.epoch_start
    assert _epoch(tuner, WINDOW, 0.9 * WINDOW, start, lambda _: [late, early, early]) == WINDOW


def test_without_a_round_trip_timed_under_load_the_credit_decides() -> None:
    tuner = WindowTuner(limit=8 * WINDOW, epoch_start=0.0)
    assert _epoch(tuner, WINDOW, 0.9 * WINDOW, 0.0, lambda _since: []) == WINDOW


def test_a_window_the_credit_keeps_asks_for_no_round_trip() -> None:
    """The queue is looked at only where the credit says grow."""
    asked: list[float] = []

    def record(since: float) -> list[float]:
        asked.append(since)
        return []

    tuner = WindowTuner(limit=8 * WINDOW, epoch_start=0.0)
    assert _epoch(tuner, WINDOW, 0.4 * WINDOW, 0.0, record) == 0
    assert asked == []


def test_a_round_trip_is_timed_once_a_round_trip_from_the_epochs_second() -> None:
    tuner = WindowTuner(limit=8 * WINDOW, epoch_start=0.0)
    times = [0.0, 0.5 * RTT, 0.99 * RTT, RTT, 1.5 * RTT, 1.99 * RTT, 2 * RTT, 2.5 * RTT]
    assert [tuner.probe_due(WINDOW, t, RTT) for t in times] == [
        False, False, False, True, False, False, True, False,
    ]  # fmt: skip
    # A new epoch starts the count again.
    tuner.growth(WINDOW, 0, EPOCH, RTT)
    assert tuner.epoch_start == EPOCH
    assert not tuner.probe_due(WINDOW, EPOCH + 0.5 * RTT, RTT)
    assert tuner.probe_due(WINDOW, EPOCH + 1.01 * RTT, RTT)


def test_no_round_trip_is_timed_where_none_could_grow_the_window() -> None:
    tuner = WindowTuner(limit=8 * WINDOW, epoch_start=0.0)
    short = MIN_ROUND_TRIP / 2
    assert not any(tuner.probe_due(WINDOW, i * short, short) for i in range(1, 50))
    assert not any(tuner.probe_due(WINDOW, i * RTT, None) for i in range(1, 50))
    # A window at its limit: no verdict could grow it.
    assert not any(tuner.probe_due(8 * WINDOW, i * RTT, RTT) for i in range(1, 50))
