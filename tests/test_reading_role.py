"""A caller reading its own reply (conduit._reading_role) over real loopback sockets.

A caller that finds the connection's reading task idle takes the reading role
and waits for the socket itself. Everything the reading task guarantees must
hold while it does: the peer's calls and messages, pings, credit, CANCEL,
timeouts, the connection ending.
"""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from conduit._connection import Connection
from conduit.errors import ConnectionClosed, RPCTimeoutError
from test_connection import Pair, _consume, _pair, _settings, _socket_pair


@asynccontextmanager
async def _running(**server_settings: Any) -> AsyncIterator[tuple[Pair, trio.Nursery]]:
    client_stream, server_stream = _socket_pair()
    settings = _settings(**server_settings) if server_settings else None
    p = _pair(client_stream, server_stream, server_settings=settings)

    async def echo(_c: Connection, x: Any) -> Any:
        return x

    p.server_dispatch.methods["echo"] = echo
    p.client_dispatch.methods["echo"] = echo
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.client.run)
        nursery.start_soon(p.server.run)
        # After its first read the idle reading task waits where callers can take over.
        assert await p.client.call("echo", {"x": 0}, None) == 0
        yield p, nursery
        nursery.cancel_scope.cancel()


def _role_held(connection: Connection) -> bool:
    role = connection._role
    return role is not None and role.held


async def test_a_sequential_caller_reads_its_own_reply() -> None:
    entered, release = trio.Event(), trio.Event()

    async def gate(_c: Connection) -> str:
        entered.set()
        await release.wait()
        return "through"

    with trio.fail_after(10):
        async with _running() as (p, nursery):
            p.server_dispatch.methods["gate"] = gate
            results: list[Any] = []
            answered = trio.Event()

            async def call() -> None:
                results.append(await p.client.call("gate", {}, 5))
                answered.set()

            nursery.start_soon(call)
            await entered.wait()
            # The caller, not the reading task, waits for the socket.
            assert _role_held(p.client)
            release.set()
            await answered.wait()
            assert results == ["through"]
            assert not _role_held(p.client)
            for n in range(50):
                assert await p.client.call("echo", {"x": n}, 5) == n


async def test_a_large_result_read_by_its_caller_waits_while_others_are_in_hand() -> None:
    """A caller holding the role reads its own large result (over
    UNCOUNTED_CALL_BYTES decoded): counted in hand until it takes it. While
    results of other connections of the endpoint are in hand (their callers
    not yet run: held here by the test), its RESULT is not decoded but handed
    to the reading task, which waits until they are taken, then delivers it."""
    maps: list[dict[str, int]] = [{}] * 10_000  # 10 KB on the wire, ~700 KB decoded by the count
    with trio.fail_after(10):
        async with _running() as (p, nursery):
            gate = p.client._results_in_hand
            assert await p.client.call("echo", {"x": maps}, 5) == maps
            assert gate.held == 0
            gate.take(40 * 1024 * 1024)  # others' results, over RESULTS_IN_HAND_BYTES
            results: list[Any] = []
            answered = trio.Event()

            async def call() -> None:
                results.append(await p.client.call("echo", {"x": maps}, 5))
                answered.set()

            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            assert not results and not _role_held(p.client)  # the reading task waits
            gate.release(40 * 1024 * 1024)
            await answered.wait()
            assert results == [maps] and gate.held == 0


async def test_the_peers_call_and_message_reach_the_reading_task_while_a_caller_reads() -> None:
    """The server calls back into the client and sends it a message while a client
    caller holds the role: the caller hands both to the reading task and still
    gets its own reply."""

    async def calls_back(connection: Connection, x: int) -> int:
        await connection.send_message("note", {"x": x})
        return int(await connection.call("echo", {"x": x + 1}, 5)) + 1

    with trio.fail_after(10):
        async with _running() as (p, _nursery):
            p.server_dispatch.methods["calls_back"] = calls_back
            for x in range(20):
                assert await p.client.call("calls_back", {"x": x}, 5) == x + 2
            await trio.testing.wait_all_tasks_blocked()
            assert p.client_dispatch.messages == [("note", {"x": x}) for x in range(20)]


async def test_pings_are_answered_while_a_caller_holds_the_role() -> None:
    """The server pings every 20 ms and gives up after 1 s without a frame; the
    client sends nothing of its own for 2 s (its caller waits for a slow reply),
    so only its answers to the pings, sent by the role's holder, keep the
    connection open."""

    async def slow(_c: Connection) -> str:
        await trio.sleep(2)
        return "slow"

    with trio.fail_after(20):
        async with _running(heartbeat_interval=0.02, heartbeat_timeout=1.0) as (p, _nursery):
            p.server_dispatch.methods["slow"] = slow
            assert await p.client.call("slow", {}, 10) == "slow"
            assert p.server.is_open and p.client.is_open


async def test_cancelling_the_role_holder_cancels_its_call_and_frees_the_role() -> None:
    entered, cancelled = trio.Event(), trio.Event()

    async def forever(_c: Connection) -> None:
        entered.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    with trio.fail_after(10):
        async with _running() as (p, nursery):
            p.server_dispatch.methods["forever"] = forever
            with trio.CancelScope() as scope:
                nursery.start_soon(_cancel_when_entered, entered, scope)
                await p.client.call("forever", {}, None)
            assert scope.cancelled_caught
            await cancelled.wait()  # the CANCEL reached the server's handler
            assert not _role_held(p.client)
            for n in range(20):
                assert await p.client.call("echo", {"x": n}, 5) == n


async def _cancel_when_entered(entered: trio.Event, scope: trio.CancelScope) -> None:
    await entered.wait()
    scope.cancel()


async def test_a_timeout_wakes_the_role_holder() -> None:
    async def forever(_c: Connection) -> None:
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with _running() as (p, _nursery):
            p.server_dispatch.methods["forever"] = forever
            with pytest.raises(RPCTimeoutError):
                await p.client.call("forever", {}, 0.2)
            assert not _role_held(p.client)
            assert await p.client.call("echo", {"x": "after"}, 5) == "after"


async def test_the_connection_ending_wakes_the_role_holder() -> None:
    """The peer's socket closes while a caller waits for the socket itself."""
    entered = trio.Event()

    async def forever(_c: Connection) -> None:
        entered.set()
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with _running() as (p, nursery):
            p.server_dispatch.methods["forever"] = forever
            failures: list[BaseException] = []
            failed = trio.Event()

            async def call() -> None:
                try:
                    await p.client.call("forever", {}, None)
                except ConnectionClosed as exc:
                    failures.append(exc)
                    failed.set()

            nursery.start_soon(call)
            await entered.wait()
            assert _role_held(p.client)
            p.server.abort("the server goes away")
            await p.client.closed.wait()
            await failed.wait()
            assert isinstance(failures[0], ConnectionClosed)


async def test_closing_this_side_wakes_the_role_holder() -> None:
    entered = trio.Event()

    async def forever(_c: Connection) -> None:
        entered.set()
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with _running() as (p, nursery):
            p.server_dispatch.methods["forever"] = forever
            failures: list[BaseException] = []
            failed = trio.Event()

            async def call() -> None:
                try:
                    await p.client.call("forever", {}, None)
                except ConnectionClosed as exc:
                    failures.append(exc)
                    failed.set()

            nursery.start_soon(call)
            await entered.wait()
            assert _role_held(p.client)
            p.client.abort("this side stops")
            await p.client.closed.wait()
            await failed.wait()
            assert "this side stops" in str(failures[0])


async def test_a_tampered_record_read_by_the_role_holder_ends_the_connection() -> None:
    """Bytes that are no sealed record of this session, read by a caller holding
    the role: the connection ends with the integrity failure as its reason and
    the caller gets ConnectionClosed (nothing is delivered)."""
    entered = trio.Event()

    async def forever(_c: Connection) -> None:
        entered.set()
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with _running() as (p, nursery):
            p.server_dispatch.methods["forever"] = forever
            failures: list[BaseException] = []
            failed = trio.Event()

            async def call() -> None:
                try:
                    await p.client.call("forever", {}, None)
                except ConnectionClosed as exc:
                    failures.append(exc)
                    failed.set()

            nursery.start_soon(call)
            await entered.wait()
            assert _role_held(p.client)
            # A record-sized frame of random bytes, written past the server's engine.
            await p.server.stream.send_all(struct.pack("!I", 48) + os.urandom(48))
            await failed.wait()
            await p.client.closed.wait()
            reason = p.client.close_reason or ""
            assert "failed authentication" in reason, reason


async def test_calls_beside_an_upload_leave_the_socket_to_the_reading_task() -> None:
    """While a data stream is open no caller takes the role (it measured worse
    beside bulk data); calls and the upload's credit both keep flowing."""
    payload = os.urandom(8 * 1024 * 1024 + 3)
    with trio.fail_after(30):
        async with _running() as (p, nursery):
            incoming = p.server.open_incoming_stream()
            outgoing = p.client.open_outgoing_stream(incoming.stream_id)
            received = bytearray()
            trailers: list[bytes] = []

            async def send() -> None:
                await outgoing.send([payload])
                await outgoing.finish(b"end")

            async def receive() -> None:
                trailers.append(await _consume(incoming, received))

            nursery.start_soon(send)
            nursery.start_soon(receive)
            calls = 0
            while not trailers:
                assert await p.client.call("echo", {"x": calls}, 5) == calls
                calls += 1
            assert not _role_held(p.client)
            assert trailers == [b"end"]
            assert bytes(received) == payload


async def test_a_stream_opened_while_a_caller_holds_the_role_gets_its_data() -> None:
    """A caller holds the role when a download starts on the connection: it
    handles the first DATA frames (and this side's credit goes out), then hands
    the socket back to the reading task once bulk reads begin."""
    entered, release = trio.Event(), trio.Event()
    payload = os.urandom(3 * 1024 * 1024 + 7)

    async def gate(_c: Connection) -> str:
        entered.set()
        await release.wait()
        return "through"

    with trio.fail_after(30):
        async with _running() as (p, nursery):
            p.server_dispatch.methods["gate"] = gate
            results: list[Any] = []
            answered = trio.Event()

            async def call() -> None:
                results.append(await p.client.call("gate", {}, 10))
                answered.set()

            nursery.start_soon(call)
            await entered.wait()
            assert _role_held(p.client)
            incoming = p.client.open_incoming_stream()
            outgoing = p.server.open_outgoing_stream(incoming.stream_id)

            async def send() -> None:
                await outgoing.send([payload])
                await outgoing.finish(b"end")

            nursery.start_soon(send)
            received = bytearray()
            assert await _consume(incoming, received) == b"end"
            assert bytes(received) == payload
            release.set()
            await answered.wait()
            assert results == ["through"]


async def test_callers_alone_or_together_all_get_their_replies() -> None:
    """A caller waiting alone reads for itself, others wait for the reading
    task; callers come and go between the two while 16 call at once."""
    with trio.fail_after(20):
        async with _running() as (p, _nursery):
            results: dict[tuple[int, int], Any] = {}

            async def caller(index: int) -> None:
                for n in range(50):
                    results[index, n] = await p.client.call("echo", {"x": [index, n]}, 5)

            async with trio.open_nursery() as callers:
                for index in range(16):
                    callers.start_soon(caller, index)
            assert results == {(i, n): [i, n] for i in range(16) for n in range(50)}
