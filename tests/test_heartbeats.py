"""The server's one heartbeat timer for all its connections (:mod:`conduit._heartbeats`).

- each beat comes every ``interval``, in the order the beats were added;
- a beat that returns False, or is removed, never comes again, and a removed
  entry no longer holds its callback;
- a beat that raises is logged and dropped; the others go on;
- with nothing queued the task waits without a timer, and wakes for the next add.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Callable

import pytest
import trio
import trio.testing

from conduit._heartbeats import Heartbeats


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Heartbeats(0)


async def test_beats_come_every_interval_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    beats = Heartbeats(10.0)
    seen: list[tuple[str, float]] = []

    def beat(name: str, times: int) -> Callable[[float], bool]:
        def one(now: float) -> bool:
            seen.append((name, now))
            return sum(1 for n, _ in seen if n == name) < times

        return one

    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(beats.run)
            start = trio.current_time()
            beats.add(beat("a", 3), start)
            await trio.sleep(4)
            beats.add(beat("b", 2), trio.current_time())
            await trio.sleep(100)
            nursery.cancel_scope.cancel()
    assert [(name, round(now - start)) for name, now in seen] == [
        ("a", 10),
        ("b", 14),
        ("a", 20),
        ("b", 24),
        ("a", 30),
    ]
    assert len(beats) == 0  # both said False: dropped


async def test_a_removed_beat_stops_and_is_released(
    autojump_clock: trio.testing.MockClock,
) -> None:
    beats = Heartbeats(5.0)
    seen: list[float] = []

    def beat(now: float) -> bool:
        seen.append(now)
        return True

    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(beats.run)
            entry = beats.add(beat, trio.current_time())
            await trio.sleep(12)
            assert len(seen) == 2
            Heartbeats.remove(entry)
            assert entry[1] is None  # the callback (a connection's method) is let go at once
            await trio.sleep(50)
            assert len(seen) == 2
            assert len(beats) == 0
            # Nothing queued: the task waits for the next add, then beats again.
            beats.add(beat, trio.current_time())
            await trio.sleep(6)
            assert len(seen) == 3
            nursery.cancel_scope.cancel()


async def test_a_connection_its_last_beat_ended_is_released_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The beat that ends a connection (its heartbeat timed out) returns False;
    nothing of the timer may keep the connection alive afterwards, although no
    other connection beats again to replace the timer's locals."""

    class Connection:
        def beat(self, now: float) -> bool:
            return False  # timed out: ended

    beats = Heartbeats(5.0)
    connection = Connection()
    released = weakref.ref(connection)
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(beats.run)
            beats.add(connection.beat, trio.current_time())
            del connection
            await trio.sleep(6)  # the beat came, and the queue is empty
            assert len(beats) == 0
            gc.collect()
            assert released() is None
            nursery.cancel_scope.cancel()


async def test_a_failing_beat_is_logged_and_the_others_go_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    beats = Heartbeats(1.0)
    good: list[float] = []

    def bad(now: float) -> bool:
        raise RuntimeError("boom")

    def fine(now: float) -> bool:
        good.append(now)
        return True

    with trio.fail_after(1000), caplog.at_level(logging.ERROR, logger="conduit.connection"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(beats.run)
            beats.add(bad, trio.current_time())
            beats.add(fine, trio.current_time())
            await trio.sleep(3.5)
            nursery.cancel_scope.cancel()
    assert len(good) == 3
    assert len(beats) == 1  # the failing one was dropped
    assert "heartbeat failed" in caplog.text
