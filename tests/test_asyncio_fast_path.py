"""The asyncio shim's RPC fast path (conduit._host_rpc) and loop-side reads (_host_reader).

Under ``asyncio.run``, ``client.rpc.call`` / ``client.rpc.invoke`` /
``client.call`` run on the asyncio loop (no Trio task per call) and a client's
socket is read by the loop itself. These tests check that the fast path is
really taken and that it behaves exactly as the bridged path: results, error
types, timeouts, cancellation (the server is told, nothing is left pending),
frames that need the reading task, a lost connection, bulk-sized replies, and
the end of the loop. Real loopback sockets; the server runs on the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVarTuple

import pytest
import trio

from conduit import (
    Client,
    ClientDescriptor,
    ConnectionClosed,
    RPCError,
    RPCTimeoutError,
    Server,
    ServerDescriptor,
    _asyncio,
)
from conduit._connection import Connection
from conftest import asyncio_until
from cutting_proxy import CuttingProxy
from test_asyncio_bridge import run_strict


class Rig:
    """A server and a connected client on the running loop, plus what the handlers saw."""

    def __init__(self, server: Server, client: Client) -> None:
        self.server = server
        self.client = client
        self.events: list[Any] = []
        #: Set by ``block`` when it starts; ``release`` lets it return.
        self.blocked = asyncio.Event()
        self.release = asyncio.Event()
        #: What ended each ``block`` call: "returned" or "cancelled".
        self.block_ends: list[str] = []

    @property
    def connection(self) -> Connection:
        peer = self.client._peer
        assert peer is not None
        return peer.connection

    def worker_calls(self) -> int:
        """Calls finished by the guest's worker tasks (the bridged path) so far."""
        return _asyncio._guests[asyncio.get_running_loop()].completed


async def start_rig() -> tuple[Rig, asyncio.Task[None]]:
    server = Server(ServerDescriptor(host="127.0.0.1", port=0, password="pw"))
    server_task = asyncio.create_task(server.run())
    await asyncio_until(lambda: server.is_running)
    client = Client(
        ClientDescriptor(server_host="127.0.0.1", server_port=server.port, password="pw")
    )
    r = Rig(server, client)

    @server.rpc
    async def echo(data: Any) -> Any:
        return data

    @server.rpc
    async def names(loop: int, proxy: int, client: int) -> list[int]:
        return [loop, proxy, client]

    @server.rpc
    async def fail(code: str) -> None:
        raise RPCError("refused on purpose", code)

    @server.rpc
    async def block() -> str:
        r.blocked.set()
        try:
            await r.release.wait()
        except asyncio.CancelledError:
            r.block_ends.append("cancelled")
            raise
        r.block_ends.append("returned")
        return "released"

    @server.rpc
    async def ask_client(x: int) -> int:
        peer = server.clients[client.id or ""]
        await peer.send("note", x)
        value: int = await peer.call("double", x=x)
        return value

    @client.rpc
    async def double(x: int) -> int:
        return 2 * x

    @client.on("note")
    def note(data: Any) -> None:
        r.events.append(data)

    await client.connect()
    return r, server_task


@contextlib.asynccontextmanager
async def rig() -> AsyncIterator[Rig]:
    r, server_task = await start_rig()
    try:
        yield r
    finally:
        await r.client.disconnect()
        await r.server.close()
        await asyncio.wait_for(server_task, 10)


def run(body: Callable[[Rig], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        async with asyncio.timeout(30), rig() as r:
            await body(r)

    run_strict(main)


def test_calls_take_the_fast_path_and_the_loop_reads_the_socket() -> None:
    async def body(r: Rig) -> None:
        assert r.connection.host_reader is not None
        assert r.connection.host_reader.loop is asyncio.get_running_loop()
        before = r.worker_calls()
        for index in range(50):
            assert await r.client.rpc.call("echo", data=index) == {"success": True, "data": index}
        assert await r.client.rpc.invoke("echo", data=b"x") == b"x"
        assert await r.client.call("echo", {"data": [1, 2]}) == [1, 2]
        results = await asyncio.gather(*(r.client.rpc.invoke("echo", data=i) for i in range(40)))
        assert results == list(range(40))
        # Not one of them went through a Trio worker task.
        assert r.worker_calls() == before
        assert len(r.connection._pending) == 0

    run(body)


def test_concurrent_callers_calling_again_as_soon_as_woken() -> None:
    """Callers woken by one batch queue their next calls; the last one woken sends them."""

    async def body(r: Rig) -> None:
        async def caller(index: int) -> list[int]:
            return [await r.client.rpc.invoke("echo", data=index * 100 + n) for n in range(30)]

        results = await asyncio.gather(*(caller(index) for index in range(8)))
        assert results == [[index * 100 + n for n in range(30)] for index in range(8)]
        calls = r.connection.owned
        assert len(r.connection._pending) == 0
        assert all(getattr(state, "waking", 0) == 0 for state in calls.values())

    run(body)


def test_large_results_read_on_the_loop_reach_their_callers_and_leave_nothing_counted() -> None:
    """Results over RESULTS_IN_HAND_BYTES together (8 of ~11 MB decoded each,
    by the count), read on the loop: every caller gets its own, and nothing
    stays counted in hand (a loop's future takes its result at once)."""

    async def body(r: Rig) -> None:
        @r.server.rpc
        async def maps(n: int) -> list[dict[str, int]]:
            return [{}] * n

        sizes = [150_000 + index for index in range(8)]
        values = await asyncio.gather(*(r.client.rpc.invoke("maps", n=size) for size in sizes))
        assert [len(value) for value in values] == sizes
        assert r.connection._results_in_hand.held == 0

    run(body)


def test_failures_keep_their_types() -> None:
    async def body(r: Rig) -> None:
        with pytest.raises(RPCError) as info:
            await r.client.rpc.invoke("fail", code="nope")
        assert info.value.code == "nope"
        with pytest.raises(RPCError) as info:
            await r.client.call("fail", code="nope")
        assert info.value.code == "nope"
        result = await r.client.rpc.call("missing")
        assert result["success"] is False
        # Arguments that cannot be serialised raise before anything is sent.
        with pytest.raises(TypeError):
            await r.client.rpc.call("echo", args=["not", "a", "dict"])
        assert await r.client.rpc.invoke("echo", data="still fine") == "still fine"

    run(body)


def test_arguments_may_bear_the_names_of_the_fast_paths_own_parameters() -> None:
    """``loop=``, ``proxy=`` and ``client=`` are the caller's arguments, as
    under Trio (they raised TypeError: "got multiple values for argument")."""

    async def body(r: Rig) -> None:
        names = {"loop": 1, "proxy": 2, "client": 3}
        assert await r.client.rpc.call("names", **names) == {"success": True, "data": [1, 2, 3]}
        assert await r.client.rpc.invoke("names", **names) == [1, 2, 3]
        assert await r.client.call("names", **names) == [1, 2, 3]

    run(body)


def test_timeout_raises_rpc_timeout_error_and_cancels_on_the_server() -> None:
    async def body(r: Rig) -> None:
        with pytest.raises(RPCTimeoutError):
            await r.client.rpc.invoke("block", timeout=0.2)
        result = await r.client.rpc.call("block", timeout=0.2)
        assert result["success"] is False
        assert result["code"] == "timeout"
        await asyncio_until(lambda: len(r.block_ends) == 2)
        assert r.block_ends == ["cancelled", "cancelled"]
        assert len(r.connection._pending) == 0

    run(body)


@pytest.mark.parametrize("how", ["task.cancel", "asyncio.timeout"])
def test_cancelling_the_caller_mid_call_cancels_it_on_the_server(how: str) -> None:
    async def body(r: Rig) -> None:
        if how == "task.cancel":
            task = asyncio.create_task(r.client.rpc.call("block"))
            await r.blocked.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await r.client.rpc.invoke("block")
        # Forgotten at once, and the server was told: its handler is cancelled.
        assert len(r.connection._pending) == 0
        await asyncio_until(lambda: bool(r.block_ends))
        assert r.block_ends == ["cancelled"]
        assert await r.client.rpc.invoke("echo", data="after") == "after"

    run(body)


def test_a_result_arriving_for_a_cancelled_caller_is_dropped() -> None:
    async def body(r: Rig) -> None:
        task = asyncio.create_task(r.client.rpc.invoke("block"))
        await r.blocked.wait()
        # The result is sent (release) in the same iteration as the cancel.
        r.release.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for index in range(5):
            assert await r.client.rpc.invoke("echo", data=index) == index
        assert len(r.connection._pending) == 0

    run(body)


def test_a_call_whose_coroutine_is_closed_before_its_answer_holds_back_no_later_call() -> None:
    """A fast-path call's coroutine closed while it waits (``GeneratorExit`` at
    its ``await``: a coroutine finalised, or driven by something other than an
    asyncio task) is forgotten, and the callers after it send their calls at
    once. Before, it was counted as a caller woken by its answer that had
    resumed, though no answer had come: the count went negative, and from
    then on every call was queued unsent until another one's traffic flushed
    it, or timed out."""

    async def body(r: Rig) -> None:
        pending = r.client.rpc.invoke("block")
        pending.send(None)  # sends the CALL, then waits for its answer
        await r.blocked.wait()
        pending.close()
        for index in range(5):  # while "block" still runs on the server
            assert await r.client.rpc.invoke("echo", data=index, timeout=2) == index
        assert len(r.connection._pending) == 0  # the closed call was forgotten
        r.release.set()

    run(body)


def test_frames_for_the_reading_task_are_handed_over() -> None:
    """A CALL and a MESSAGE from the server, between results, reach the client's handlers."""

    async def body(r: Rig) -> None:
        for x in range(10):
            assert await r.client.rpc.invoke("ask_client", x=x) == 2 * x
            assert await r.client.rpc.invoke("echo", data=x) == x
        assert r.events == list(range(10))

    run(body)


def test_bulk_sized_replies_are_read_the_trio_way_then_small_ones_on_the_loop() -> None:
    async def body(r: Rig) -> None:
        big = bytes(range(256)) * 2048  # 512 KiB: more than one small read
        for _ in range(3):
            assert await r.client.rpc.invoke("echo", data=big) == big
            assert await r.client.rpc.invoke("echo", data=b"small") == b"small"

    run(body)


def test_a_lost_connection_fails_pending_and_later_calls() -> None:
    async def body(r: Rig) -> None:
        pending = asyncio.create_task(r.client.rpc.invoke("block"))
        await r.blocked.wait()
        await r.server.clients[r.client.id or ""].close("going away")
        with pytest.raises(ConnectionClosed):
            await pending
        result = await r.client.rpc.call("echo", data=1)
        assert result["success"] is False

    run(body)


def test_a_cut_connection_fails_the_call_and_the_next_connection_is_fast_again() -> None:
    """The end of the stream read on the loop goes to the reading task; the client reconnects."""

    async def body(r: Rig) -> None:
        with CuttingProxy(r.server.port) as proxy:
            client = Client(
                ClientDescriptor(
                    server_host="127.0.0.1",
                    server_port=proxy.port,
                    password="pw",
                    reconnect_delay=0.05,
                )
            )
            await client.connect()
            try:
                first = client._peer
                assert first is not None and first.connection.host_reader is not None
                pending = asyncio.create_task(client.rpc.invoke("block"))
                await r.blocked.wait()
                proxy.legs[0].close()  # RST, no FIN
                with pytest.raises(ConnectionClosed):
                    await pending
                # The end of the stream, read on the loop, reached the reading task.
                reason = first.connection.close_reason or ""
                assert reason == "peer closed the connection" or "reset by peer" in reason
                await asyncio_until(lambda: client._peer is not first and client.connected)
                before = r.worker_calls()
                assert await client.rpc.invoke("echo", data="again") == "again"
                assert r.worker_calls() == before
            finally:
                await client.disconnect()

    run(body)


class _RecordingLoop(asyncio.SelectorEventLoop):
    """Records which descriptors stop being watched."""

    def __init__(self) -> None:
        super().__init__()
        self.removed: list[int] = []

    def remove_reader(self, fd: Any) -> bool:
        self.removed.append(fd)
        return super().remove_reader(fd)


def test_asyncio_run_ending_mid_call_stops_the_socket_watch() -> None:
    """A call left pending when the loop's run ends: cancelled, the socket no longer watched."""
    seen: dict[str, Any] = {}

    async def main() -> None:
        r, _server_task = await start_rig()
        seen["fd"] = r.connection.stream.socket.fileno()  # type: ignore[attr-defined]
        seen["task"] = asyncio.create_task(r.client.rpc.invoke("block"))
        await r.blocked.wait()
        selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        seen["watched"] = seen["fd"] in selector.get_map()
        seen["connection"] = r.connection
        # Return without disconnecting: the runner cancels the pending call
        # and the server, and ends the guest run.

    loop = _RecordingLoop()
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        runner.run(main())
    assert seen["watched"]
    assert seen["task"].cancelled()
    assert seen["fd"] in loop.removed
    assert len(seen["connection"]._pending) == 0
    assert not trio.lowlevel.in_trio_run()
    assert len(_asyncio._guests) == 0


_Ts = TypeVarTuple("_Ts")


class _NoReaderLoop(asyncio.SelectorEventLoop):
    """A loop that cannot watch sockets (as Windows' proactor loop)."""

    def add_reader(self, fd: Any, callback: Callable[[*_Ts], object], *args: *_Ts) -> None:
        raise NotImplementedError


def test_a_loop_without_add_reader_falls_back_to_trio_reading() -> None:
    async def main() -> None:
        async with asyncio.timeout(30), rig() as r:
            for index in range(20):
                assert await r.client.rpc.invoke("echo", data=index) == index
            assert await r.client.rpc.invoke("ask_client", x=4) == 8
            with pytest.raises(RPCTimeoutError):
                await r.client.rpc.invoke("block", timeout=0.1)

    with asyncio.Runner(loop_factory=_NoReaderLoop) as runner:
        runner.run(main())
    assert not trio.lowlevel.in_trio_run()


def test_under_trio_the_connection_reads_in_trio() -> None:
    async def main() -> None:
        server = Server(ServerDescriptor(host="127.0.0.1", port=0, password="pw"))

        @server.rpc
        async def echo(data: Any) -> Any:
            return data

        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            client = Client(
                ClientDescriptor(server_host="127.0.0.1", server_port=port, password="pw")
            )
            await client.connect()
            peer = client._peer
            assert peer is not None
            assert peer.connection.host_reader is None
            assert await client.rpc.invoke("echo", data=3) == 3
            await client.disconnect()
            await server.close()

    trio.run(main)
