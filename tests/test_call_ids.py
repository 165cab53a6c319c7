"""Call ids wrap within the header's 32 bits, skipping the ids of calls still outstanding.

The header holds a call id in 32 bits (``!2sBBBxII``): after 2**32-1 calls on
one connection the ids start again at 1, never on the id of a call of ours
still awaiting its result. The tests advance the machine's counter (its
private ``_call_ids``) instead of making four billion calls. Stream ids do not
wrap: once a side's 2**31 are used up, opening a stream is refused.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio

from conduit import Client, Server
from conduit.errors import LocalProtocolError, RPCError
from conduit.protocol import MAX_STREAM_ID, iter_frames
from conduit.protocol.connection import (
    CallReceived,
    ConnectionState,
    InboundStream,
    ResultReceived,
)
from conduit.protocol.messages import Result
from conftest import ClientFactory, ServerFactory, wait_until

MAX_ID = 2**32 - 1  # the largest value of the header's 32-bit stream id field
MAX_FRAME = 64 * 1024


def machine(*, is_client: bool) -> ConnectionState:
    return ConnectionState(
        is_client=is_client,
        receive_window=MAX_FRAME,
        peer_receive_window=MAX_FRAME,
        peer_max_frame_size=MAX_FRAME,
        max_concurrent_calls=64,
    )


def advance_call_ids(state: ConnectionState, next_id: int) -> None:
    """As if ``next_id - 1`` calls had been made: the next call gets ``next_id``."""
    state._call_ids = itertools.count(next_id)


def deliver(to: ConnectionState, frame: bytes) -> Any:
    """Feed one frame to ``to`` (as the engine does a record's); its event."""
    (parsed,) = iter_frames(frame, MAX_FRAME)
    return to.receive_frame(parsed)


class Caller:
    """A client machine and a server machine, with the client's table of pending
    calls kept as the engine's PendingCalls keeps it (and hands to the machine)."""

    def __init__(self) -> None:
        self.client = machine(is_client=True)
        self.server = machine(is_client=False)
        self.pending: dict[int, str] = {}  # call id -> the caller's tag
        self.client.calls_in_use = self.pending
        self.ids: list[int] = []

    def call(self, tag: str) -> int:
        """Make a call; the server receives it (and refuses an id it is running)."""
        call_id, frame = self.client.start_call("echo", {"tag": tag})
        assert 1 <= call_id <= MAX_ID
        assert call_id not in self.pending, f"id {call_id} reused while its call is outstanding"
        self.pending[call_id] = tag
        self.ids.append(call_id)
        event = deliver(self.server, frame)
        assert isinstance(event, CallReceived)
        assert event.call_id == call_id and event.args == {"tag": tag}
        return call_id

    def reply(self, call_id: int, tag: str) -> None:
        reply = deliver(self.client, self.server.result_frame(call_id, Result(True, tag)))
        assert isinstance(reply, ResultReceived)
        # The caller waiting on this id is the one that sent ``tag``.
        assert self.pending.pop(reply.call_id) == reply.result.value == tag


def test_call_ids_wrap_to_1_after_the_largest_id() -> None:
    caller = Caller()
    advance_call_ids(caller.client, MAX_ID - 1)
    for tag in "abcd":
        call_id = caller.call(tag)
        caller.reply(call_id, tag)
        caller.server.call_finished(call_id)
    assert caller.ids == [MAX_ID - 1, MAX_ID, 1, 2]


def test_wrapped_call_ids_skip_the_ids_of_calls_still_outstanding() -> None:
    caller = Caller()
    first = [caller.call(tag) for tag in ("one", "two", "three", "four", "five")]
    assert first == [1, 2, 3, 4, 5]
    # Calls 2 and 4 stay outstanding (the server still runs them) across the wrap.
    for call_id, tag in ((1, "one"), (3, "three"), (5, "five")):
        caller.server.call_finished(call_id)
        caller.reply(call_id, tag)
    advance_call_ids(caller.client, MAX_ID - 1)
    tags = [f"wrapped-{i}" for i in range(6)]
    ids = [caller.call(tag) for tag in tags]
    assert ids == [MAX_ID - 1, MAX_ID, 1, 3, 5, 6]
    # Every reply reaches its own caller, the long-outstanding ones included.
    for call_id, tag in zip(ids, tags, strict=True):
        caller.server.call_finished(call_id)
        caller.reply(call_id, tag)
    for call_id, tag in ((2, "two"), (4, "four")):
        caller.server.call_finished(call_id)
        caller.reply(call_id, tag)
    assert caller.pending == {}
    # Freed, 2 and 4 are given out again when their turn comes; the counter runs on.
    assert [caller.call(f"after-{i}") for i in range(3)] == [7, 8, 9]


def test_an_id_answered_before_its_turn_is_used_again() -> None:
    caller = Caller()
    caller.call("held")  # id 1
    caller.call("answered later")  # id 2
    caller.server.call_finished(1)
    caller.reply(1, "held")
    advance_call_ids(caller.client, MAX_ID)
    assert caller.call("last") == MAX_ID
    assert caller.call("wrapped") == 1  # free again
    caller.server.call_finished(2)
    caller.reply(2, "answered later")  # answered before the counter got to 2
    assert [caller.call("next"), caller.call("then")] == [2, 3]


def test_runs_of_outstanding_ids_are_skipped_in_one_step() -> None:
    caller = Caller()
    for i in range(10):
        caller.call(f"held-{i}")  # ids 1..10, all outstanding
    advance_call_ids(caller.client, MAX_ID - 1)
    ids = [caller.call(f"new-{i}") for i in range(4)]
    assert ids == [MAX_ID - 1, MAX_ID, 11, 12]


def test_with_every_call_id_in_use_a_call_is_refused() -> None:
    state = machine(is_client=True)
    state.calls_in_use = range(1, MAX_ID + 1)  # what four billion outstanding calls would be
    advance_call_ids(state, MAX_ID + 1)
    with pytest.raises(LocalProtocolError, match="every call id is in use"):
        state.start_call("echo", {})


@pytest.mark.parametrize("is_client", [True, False])
def test_stream_ids_used_up_is_a_clear_refusal(is_client: bool) -> None:
    """Stream ids do not wrap (the peer may still hold a closed one): the last
    one works, the next is refused with too_many_streams, not struct.error."""
    state = machine(is_client=is_client)
    last = MAX_STREAM_ID if is_client else MAX_STREAM_ID - 1
    state._stream_ids = itertools.count(last, 2)
    stream = state.open_inbound(InboundStream)
    assert stream.stream_id == last
    assert state.credit_frame(last, 1024) is not None  # encodes within the header
    state.close_stream(stream, None)
    with pytest.raises(RPCError) as info:
        state.open_inbound(InboundStream)
    assert info.value.code == "too_many_streams"
    assert "reconnect" in info.value.message


# ------------------------------------------------------------------ over a connection


async def test_calls_across_the_wrap_over_a_connection(
    memory_server_factory: ServerFactory, memory_client_factory: ClientFactory
) -> None:
    """A call held by the server keeps its id while ids wrap around it; every
    reply reaches its own caller and the connection stays healthy."""
    release = trio.Event()

    def register(server: Server) -> None:
        @server.rpc
        async def echo(x: int) -> int:
            await trio.lowlevel.checkpoint()
            return x

        @server.rpc
        async def hold(tag: str) -> str:
            await release.wait()
            return tag

    server = await memory_server_factory(register=register)
    client: Client = await memory_client_factory(server)
    assert client._peer is not None
    connection = client._peer.connection
    state = connection._state
    allocated: list[int] = []
    start_call = state.start_call

    def recording_start_call(method: str, args: dict[str, Any]) -> tuple[int, bytes]:
        call_id, frame = start_call(method, args)
        allocated.append(call_id)
        return call_id, frame

    state.start_call = recording_start_call  # type: ignore[method-assign]
    held: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def hold_call() -> None:
                held.append(await client.call("hold", tag="held", timeout=30))

            nursery.start_soon(hold_call)
            await wait_until(lambda: bool(connection._pending._calls), interval=0.001)
            (held_id,) = connection._pending._calls
            assert allocated == [held_id]
            # As if 2**32 - 3 calls had been made: the wrap comes 2 calls from now.
            advance_call_ids(state, MAX_ID - 1)
            results: dict[int, int] = {}

            async def echo_call(x: int) -> None:
                results[x] = await client.call("echo", x=x)

            # Concurrent calls across the wrap and past the held call's id.
            count = held_id + 4
            async with trio.open_nursery() as calls:
                for x in range(count):
                    calls.start_soon(echo_call, x)
            assert results == {x: x for x in range(count)}
            wrapped = allocated[1:]
            assert all(1 <= call_id <= MAX_ID for call_id in wrapped)
            assert held_id not in wrapped
            assert wrapped[:2] == [MAX_ID - 1, MAX_ID]
            assert sorted(wrapped[2:]) == [i for i in range(1, count) if i != held_id]
            assert not held  # still outstanding all along
            release.set()
        assert held == ["held"]
        assert client.connected
        assert await client.call("echo", x=99) == 99
