"""The RPC budget's sans-IO steps run on what they say they run on.

``benchmarks.rpc_budget`` times each step of an echo call alone, on records
sealed up front: the open steps, and the frames the decode steps take, come
from records opened in nonce order (a record opened out of order fails its
tag check), and the open steps drop what they open, as the engine does.
"""

from __future__ import annotations

from benchmarks import rpc_budget as budget

from conduit.protocol.connection import CallReceived


def test_every_sans_io_step_runs() -> None:
    steps = budget.sans_io_steps(50)
    assert len(steps) == 9
    assert all(cost > 0 for cost in steps.values())


def test_the_decode_steps_frames_are_the_records_opened_in_order() -> None:
    client, server = budget._state(is_client=True), budget._state(is_client=False)
    writer = budget._writer(budget.KEY_C2S)
    # As in sans_io_steps: one record sealed before the list, never opened.
    writer.write_frames([(client.start_call("echo", {"data": b"first"})[1],)])
    records = []
    for index in range(3):
        _, frame = client.start_call("echo", {"data": bytes([index])})
        (record,) = writer.write_frames([(frame,)])
        records.append(bytes(record))
    frames = budget._opened(records, budget.KEY_C2S)
    events = [server.receive_frame(frame) for frame in frames]
    assert all(isinstance(event, CallReceived) for event in events)
    assert [event.args for event in events] == [  # type: ignore[union-attr]
        {"data": bytes([index])} for index in range(3)
    ]
