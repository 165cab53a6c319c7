"""The outbox hands the writer whole frames up to its budget, never one beyond it."""

from __future__ import annotations

from conduit._outbox import Outbox
from conduit.protocol import OutFrame
from conduit.protocol.codec import data_header
from conduit.protocol.connection import ConnectionState

CHUNK = 64 * 1024
# What the writer asks for: one record of a peer whose frames may be 1 MiB
# (the frame, its header and the record slack).
RECORD_BUDGET = 1024 * 1024 + 14 + 4096


def _outbox() -> Outbox:
    state = ConnectionState(
        is_client=True,
        receive_window=4 * 1024 * 1024,
        peer_receive_window=4 * 1024 * 1024,
        peer_max_frame_size=1024 * 1024,
        max_concurrent_calls=8,
    )
    return Outbox(8 * 1024 * 1024, state)


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
