"""The outbox hands the writer whole frames up to its budget, never one beyond it."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from conduit._outbox import Outbox, OutboxClosed
from conduit.errors import ConnectionClosed
from conduit.protocol import OutFrame
from conduit.protocol.codec import data_header
from conduit.protocol.connection import ConnectionState

CHUNK = 64 * 1024
# What the writer asks for: one record of a peer whose frames may be 1 MiB
# (the frame, its header and the record slack).
RECORD_BUDGET = 1024 * 1024 + 14 + 4096


def _outbox(state: ConnectionState | None = None) -> Outbox:
    return Outbox(8 * 1024 * 1024, state or _state())


def _state() -> ConnectionState:
    return ConnectionState(
        is_client=True,
        receive_window=4 * 1024 * 1024,
        peer_receive_window=4 * 1024 * 1024,
        peer_max_frame_size=1024 * 1024,
        max_concurrent_calls=8,
    )


def _frames(count: int, size: int) -> list[tuple[OutFrame, int]]:
    header = data_header(1, size)
    return [((header, bytes(size)), size) for _ in range(count)]


async def test_take_stops_before_the_frame_that_would_exceed_the_budget() -> None:
    """32 chunks of 64 KiB go out as two takes of 16 (one record each), not
    17 + 15 (a 17th chunk sealed and sent as a record of its own)."""
    outbox = _outbox()
    await outbox.put_data(_frames(32, CHUNK))
    assert len(await outbox.take(RECORD_BUDGET)) == 16
    assert len(await outbox.take(RECORD_BUDGET)) == 16
    assert outbox.data_bytes == 0


async def test_take_hands_over_a_frame_larger_than_the_budget_alone() -> None:
    outbox = _outbox()
    await outbox.put_data(_frames(2, 300_000))
    assert len(await outbox.take(256 * 1024)) == 1
    assert len(await outbox.take(256 * 1024)) == 1


async def test_the_goodbye_goes_after_the_data_queued_before_it() -> None:
    """A graceful close's GOODBYE leaves with the last take of the data queued
    before it (the peer ignores what follows a GOODBYE), after control frames
    queued even later; no data is taken once the connection is closing."""
    state = _state()
    outbox = _outbox(state)
    await outbox.put_data(_frames(20, CHUNK))
    goodbye = state.goodbye("done")
    assert goodbye is not None
    outbox.put_last((goodbye,))
    with pytest.raises(ConnectionClosed, match="done"):
        await outbox.put_data(_frames(1, CHUNK))
    outbox.put_control((b"answer",))
    first = await outbox.take(RECORD_BUDGET)
    assert first[0] == (b"answer",) and (goodbye,) not in first and len(first) == 17
    second = await outbox.take(RECORD_BUDGET)
    assert len(second) == 5 and second[-1] == (goodbye,)


async def test_once_closing_the_writer_stops_after_the_goodbye_not_before_it() -> None:
    """Nothing queued while closing ends the writer (the GOODBYE went out),
    except while the GOODBYE is still to come (a handler's close waiting for
    that handler's answer): the writer then waits for it. Before, it stopped
    after the frames queued meanwhile, ending the connection without its
    GOODBYE."""
    state = _state()
    outbox = _outbox(state)
    goodbye = state.goodbye("logged out")
    assert goodbye is not None
    outbox.expect_last()
    outbox.put_control((b"another call's answer",))
    assert await outbox.take(RECORD_BUDGET) == [(b"another call's answer",)]
    async with trio.open_nursery() as nursery:
        taken: list[list[OutFrame]] = []

        async def writer() -> None:
            taken.append(await outbox.take(RECORD_BUDGET))

        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert taken == []  # waiting, not stopped
        outbox.put_last((goodbye,))
    assert taken == [[(goodbye,)]]
    with pytest.raises(OutboxClosed):
        await outbox.take(RECORD_BUDGET)


async def test_a_goodbye_expected_but_never_sent_still_lets_the_writer_stop_at_the_end() -> None:
    """The connection ended meanwhile (the grace ran out, the peer left)."""
    state = _state()
    outbox = _outbox(state)
    state.goodbye("logged out")
    outbox.expect_last()
    state.close("connection lost")
    outbox.close()
    with trio.fail_after(5), pytest.raises(OutboxClosed):  # (not: waiting for ever)
        await outbox.take(RECORD_BUDGET)
