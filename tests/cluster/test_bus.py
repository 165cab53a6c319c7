"""The cluster bus against a real Valkey: registry, expiry, inboxes, broadcast, leases."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
import trio

from conduit.cluster.bus import (
    ClientIdTaken,
    ClusterBus,
    LeaseBusy,
    LeaseLost,
    NodeNameTaken,
    NodeUnreachable,
)
from conduit.errors import RPCError
from conftest import wait_until

#: Short TTL so that expiry tests take seconds, not thirty; with room for a
#: loaded machine (a heartbeat every TTL / 3 must not be late by a whole TTL).
TTL = 1.5
NODE_PROGRAM = Path(__file__).with_name("bus_node.py")

BusFactory = Callable[..., Awaitable[ClusterBus]]


@pytest.fixture
async def bus_factory(
    engines: Any, bus_namespace: str, nursery: trio.Nursery
) -> AsyncIterator[BusFactory]:
    """Start running buses (nodes) in the test's namespace; they stop at teardown."""
    scopes: list[trio.CancelScope] = []

    async def run(bus: ClusterBus, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            await bus.run(task_status=task_status)

    async def make(name: str, **options: Any) -> ClusterBus:
        options.setdefault("ttl", TTL)
        bus = ClusterBus(engines.bus.url, name, namespace=bus_namespace, **options)
        await nursery.start(run, bus)
        return bus

    yield make
    for scope in scopes:
        scope.cancel()


async def test_registry_and_clean_exit(engines: Any, bus_factory: BusFactory) -> None:
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    assert await node_a.nodes() == ["a", "b"]
    await node_b.register_client("client-1")
    assert await node_a.locate_client("client-1") == "b"
    # Still there after several TTLs: the heartbeat refreshes node and client.
    await trio.sleep(TTL * 2)
    assert await node_a.node_alive("b")
    assert await node_a.locate_client("client-1") == "b"


async def test_stopped_node_is_removed_at_once(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    node_a = await bus_factory("a")
    node_b = ClusterBus(engines.bus.url, "b", namespace=bus_namespace, ttl=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(node_b.run)
        await node_b.register_client("c")
        assert await node_a.nodes() == ["a", "b"]
        nursery.cancel_scope.cancel()
    # A long TTL, yet gone at once: a clean stop unregisters.
    assert await node_a.nodes() == ["a"]
    assert await node_a.locate_client("c") is None


async def test_killed_node_is_forgotten(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    node_a = await bus_factory("a")
    arguments = [sys.executable, str(NODE_PROGRAM), engines.bus.url, bus_namespace]
    process = await trio.lowlevel.open_process(
        [*arguments, "doomed", "c9", "1.5"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(20):
            line = await process.stdout.receive_some(64)
        assert line.strip() == b"ready"
        assert await node_a.locate_client("c9") == "doomed"
        reply = await node_a.request("doomed", "echo", {"x": 1})
        assert reply == {"kind": "echo", "payload": {"x": 1}, "from": "a"}

        process.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await process.wait()
        # A request in flight to the dead node fails (not hangs) once it is forgotten.
        with pytest.raises(NodeUnreachable), trio.fail_after(10):
            await node_a.request("doomed", "echo", {"x": 2}, timeout=60)
        assert not await node_a.node_alive("doomed")
        assert await node_a.locate_client("c9") is None
        with pytest.raises(NodeUnreachable):
            await node_a.request_for_client("c9", "echo", {})
        assert await node_a.nodes() == ["a"]
    finally:
        process.kill()
        with trio.fail_after(10):
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


async def test_restarted_node_takes_its_name_back(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    arguments = [sys.executable, str(NODE_PROGRAM), engines.bus.url, bus_namespace]
    process = await trio.lowlevel.open_process(
        [*arguments, "phoenix", "c1", str(TTL)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(20):
            assert (await process.stdout.receive_some(64)).strip() == b"ready"
        process.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await process.wait()
    finally:
        process.kill()
        if process.stdout is not None:
            await process.stdout.aclose()
    # Restarted at once under the same name: it waits out the dead registration.
    reborn = await bus_factory("phoenix")
    assert await reborn.nodes() == ["phoenix"]
    await reborn.register_client("c1-again")
    assert await reborn.locate_client("c1-again") == "phoenix"


async def test_a_node_that_lost_its_name_leaves_the_new_holders_inbox_alone(
    engines: Any, bus_namespace: str
) -> None:
    """A node cut off for longer than its TTL loses its name; a newer process
    takes it, with the inbox. When the old one stops, it must not delete that
    inbox (it did, until 2026-12-07: found by a review of the bus)."""
    old = ClusterBus(engines.bus.url, "x", namespace=bus_namespace, ttl=30.0)
    inbox, node_key = f"{bus_namespace}:inbox:x", f"{bus_namespace}:node:x"
    with contextlib.closing(redis.Redis.from_url(engines.bus.url)) as redis_client:
        async with trio.open_nursery() as nursery:
            await nursery.start(old.run)
            # As if its registration had expired and another process registered:
            redis_client.set(node_key, "a newer process's registration")
            redis_client.xadd(inbox, {"m": b"a request for the newer process"})
            nursery.cancel_scope.cancel()
        assert redis_client.get(node_key) == b"a newer process's registration"
        assert redis_client.xlen(inbox) == 1


async def test_requests_between_nodes(bus_factory: BusFactory) -> None:
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    seen: list[tuple[str, str]] = []

    @node_b.on_request
    async def handle(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        seen.append((kind, sender))
        if kind == "refuse":
            raise RPCError("not allowed here", "denied")
        if kind == "crash":
            raise ValueError("handler bug")
        return {"data": payload["data"][::-1], "node": "b"}

    assert await node_a.request("b", "push", {"data": b"\x00\x01\x02"}) == {
        "data": b"\x02\x01\x00",
        "node": "b",
    }
    with pytest.raises(RPCError) as caught:
        await node_a.request("b", "refuse", {})
    assert caught.value.code == "denied"
    with pytest.raises(RPCError, match="handler bug"):
        await node_a.request("b", "crash", {})
    with pytest.raises(NodeUnreachable):
        await node_a.request("nobody", "push", {})
    # Routed by client id.
    await node_b.register_client("client-7")
    reply = await node_a.request_for_client("client-7", "push", {"data": b"ab"})
    assert reply["data"] == b"ba"
    assert seen == [("push", "a"), ("refuse", "a"), ("crash", "a"), ("push", "a")]
    # Node a has no handler: a clear error, not a hang.
    with pytest.raises(RPCError) as caught:
        await node_b.request("a", "anything", {})
    assert caught.value.code == "not_found"


async def test_request_timeout(bus_factory: BusFactory) -> None:
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    release = trio.Event()

    @node_b.on_request
    async def slow(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        await release.wait()
        return {}

    with pytest.raises(TimeoutError):
        await node_a.request("b", "slow", {}, timeout=0.3)
    release.set()


async def test_a_request_served_for_longer_than_a_ttl_is_waited_for(
    bus_factory: BusFactory,
) -> None:
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")

    @node_b.on_request
    async def slow(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        await trio.sleep(3 * TTL)  # no progress reports: only "still served" keeps it
        return {"done": True}

    with trio.fail_after(10 * TTL):
        assert await node_a.request("b", "slow", {}, timeout=math.inf) == {"done": True}


@pytest.mark.parametrize("how", ["timeout", "cancelled", "on_progress raised"])
async def test_a_request_its_requester_stops_waiting_for_is_stopped_on_its_node(
    bus_factory: BusFactory, how: str
) -> None:
    """However the requester stops waiting (a timeout, its caller's
    cancellation, what ``on_progress`` raised), the serving node's handler is
    cancelled: before, it went on (a cross-node push its caller had stopped
    was still delivered, whole, seconds later). The node sends no reply, and
    a request nobody stopped is left alone."""
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    started, stopped = trio.Event(), trio.Event()

    @node_b.on_request
    async def long(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        if kind == "quick":
            return {}
        started.set()
        try:
            while True:  # bounded by the test's fail_after
                await node_b.report_progress({"still": "going"})
                await trio.sleep(0.05)
        finally:
            stopped.set()

    class Stop(Exception):
        pass

    async def stop(data: Any) -> None:
        raise Stop

    with trio.fail_after(10 * TTL):
        if how == "timeout":
            with pytest.raises(TimeoutError):
                await node_a.request("b", "long", {}, timeout=0.5)
        elif how == "cancelled":
            with trio.move_on_after(0.5):
                await node_a.request("b", "long", {}, timeout=math.inf)
        else:
            with pytest.raises(Stop):
                await node_a.request("b", "long", {}, timeout=math.inf, on_progress=stop)
        assert started.is_set()
        await stopped.wait()
        assert await node_a.request("b", "quick", {}) == {}  # the node serves on
    # (Its task may still be between the reply and its end.)
    await wait_until(lambda: not node_b._serving_scopes and not node_b._serving)


async def test_a_node_busy_with_as_many_requests_as_it_serves_still_hears_notices(
    bus_factory: BusFactory,
) -> None:
    """One-way notices (a client that moved away) do not wait behind
    requests: a node serving ``max_handlers`` long requests (pushes) refuses
    one more request as overloaded, but still handles a notice. Before, the
    notice was dropped (logged), and a push waiting on that node for the
    moved client waited its whole ``push_reconnect_timeout``."""
    node_a = await bus_factory("a")
    node_b = await bus_factory("b", max_handlers=2)
    release, noticed = trio.Event(), trio.Event()

    @node_b.on_request
    async def handle(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        if kind == "notice":
            noticed.set()
        else:
            await release.wait()
        return {}

    async def ask() -> None:
        await node_a.request("b", "long", {}, timeout=math.inf)

    with trio.fail_after(10 * TTL):
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(ask)
            await wait_until(lambda: len(node_b._serving.get("a", ())) == 2)
            with pytest.raises(RPCError, match="overloaded"):
                await node_a.request("b", "one more", {})
            await node_a.tell("b", "notice", {})
            await noticed.wait()
            release.set()


async def test_a_reply_the_bus_fails_to_take_is_sent_again(bus_factory: BusFactory) -> None:
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")

    @node_b.on_request
    async def answer(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        return {"answer": kind}

    # Node b's first reply fails as a Redis blip would (the retried one goes through).
    real_xadd, refused = node_b._xadd, list[str]()

    def xadd(stream: str, data: bytes) -> None:
        if msgpack.unpackb(data)["t"] == "rep" and not refused:
            refused.append(stream)
            raise redis.ConnectionError("injected")
        real_xadd(stream, data)

    node_b._xadd = xadd  # type: ignore[method-assign]
    with trio.fail_after(10 * TTL):
        assert await node_a.request("b", "question", {}) == {"answer": "question"}
    assert len(refused) == 1


async def test_broadcast_reaches_every_other_node(bus_factory: BusFactory) -> None:
    nodes = [await bus_factory(name) for name in ("a", "b", "c")]
    received: dict[str, list[tuple[str, Any, str]]] = {bus.node_name: [] for bus in nodes}
    arrived = trio.Event()

    for bus in nodes:

        async def handler(event: str, data: Any, sender: str, name: str = bus.node_name) -> None:
            received[name].append((event, data, sender))
            if len(received["b"]) == 2 and len(received["c"]) == 2:
                arrived.set()

        bus.on_event(handler)

    await nodes[0].broadcast("chat", {"text": "hello"})
    await nodes[0].broadcast("tick", 2)
    with trio.fail_after(10):
        await arrived.wait()
    expected = [("chat", {"text": "hello"}, "a"), ("tick", 2, "a")]
    assert received["b"] == expected
    assert received["c"] == expected
    assert received["a"] == []  # the sender delivers to its own clients itself


async def test_broadcasts_behind_a_slow_event_handler_are_bounded_by_their_bytes(
    bus_factory: BusFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose event handler waits (a broadcast to a client that reads
    slowly) queues at most 32 MiB of broadcasts; the rest are dropped, and
    said so. Found by a review: only their number was bounded (1,024), and
    300 broadcasts of a megabyte grew a node by 309 MB."""
    sender, slow = await bus_factory("a"), await bus_factory("b", max_message_bytes=2 << 20)
    sender.max_message_bytes = 2 << 20
    release, first = trio.Event(), trio.Event()
    handled: list[int] = []

    async def wait_then_take(event: str, data: Any, node: str) -> None:
        first.set()
        await release.wait()
        handled.append(int(data["n"]))

    slow.on_event(wait_then_take)
    payload = os.urandom(1 << 20)
    with caplog.at_level(logging.WARNING, logger="conduit.cluster.bus"), trio.fail_after(60):
        await sender.broadcast("big", {"n": 0, "blob": payload})
        await first.wait()  # the handler holds the first; the rest queue behind it
        for n in range(1, 61):
            await sender.broadcast("big", {"n": n, "blob": payload})
        await sender.broadcast("last", {"n": 61})
        # Polled: the other node's reading task gives no event to wait on.
        while _dropped(caplog) + _queued(slow) < 61:  # noqa: ASYNC110
            await trio.sleep(0.05)
        assert _queued(slow) <= 32  # (61 before: only 1,024 were a bound)
        queued = slow._events_bytes
        release.set()
        while not handled or slow._events_bytes:  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert 0 < queued <= 32 * 1024 * 1024
    assert _dropped(caplog) > 20
    # The first, then the 31 that fit behind it in order; the small last one
    # may have found room again.
    assert handled[:32] == list(range(32)), handled


def _dropped(caplog: pytest.LogCaptureFixture) -> int:
    return sum("dropped cluster event" in record.getMessage() for record in caplog.records)


def _queued(bus: ClusterBus) -> int:
    return bus._events_out.statistics().current_buffer_used


def _echoing(bus: ClusterBus) -> None:
    @bus.on_request
    async def echo(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        return {"kind": kind}


async def test_a_key_of_another_type_in_place_of_a_stream_is_cleared(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    """A value written by hand where the events stream lives made every read
    of a node's streams fail (``WRONGTYPE``), its inbox's with it: requests
    were lost. The node now deletes such a key (the namespace is the
    cluster's) and reads on. Found by a review of the bus."""
    node_a, node_b = await bus_factory("a"), await bus_factory("b")
    _echoing(node_b)
    with contextlib.closing(redis.Redis.from_url(engines.bus.url)) as redis_client:
        redis_client.set(f"{bus_namespace}:events", "not a stream")
        with trio.fail_after(30):
            assert await node_a.request("b", "ping", {}) == {"kind": "ping"}
        assert redis_client.type(f"{bus_namespace}:events") in (b"stream", b"none")


async def test_an_inbox_made_anew_with_lower_ids_is_read_from_its_start(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    """A node reads its inbox on from the last id it read. After an entry
    with an id far ahead (forged, or from a clock that was ahead), an inbox
    that expired while idle and was made anew has ids below it: the node
    waited for ids it would not see for centuries, and every request to it
    was lost. It now reads such a stream from its start. Found by a review."""
    node_a, node_b = await bus_factory("a"), await bus_factory("b")
    _echoing(node_b)
    inbox = f"{bus_namespace}:inbox:b"
    with contextlib.closing(redis.Redis.from_url(engines.bus.url)) as redis_client:
        with trio.fail_after(30):
            assert await node_a.request("b", "ping", {}) == {"kind": "ping"}  # (its expiry set)
        redis_client.xadd(inbox, {"m": b"x"}, id="99999999999999-0")
        with trio.fail_after(30):
            while redis_client.exists(inbox):  # noqa: ASYNC110 (it expires: 3 TTLs idle)
                await trio.sleep(0.2)
            assert await node_a.request("b", "ping", {}) == {"kind": "ping"}


async def test_a_stream_whose_ids_are_used_up_is_made_anew(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    """An entry with the largest id leaves none to add after it: every
    broadcast then failed, and the failing pipeline's expiry kept the stream
    alive for ever. It is now made anew, and the other nodes read it from
    its start. Found by a review."""
    node_a, node_b = await bus_factory("a"), await bus_factory("b")
    received: list[Any] = []
    arrived = trio.Event()

    async def on_event(event: str, data: Any, sender: str) -> None:
        received.append(data)
        arrived.set()

    node_b.on_event(on_event)
    with contextlib.closing(redis.Redis.from_url(engines.bus.url)) as redis_client:
        redis_client.xadd(
            f"{bus_namespace}:events", {"m": b"x"}, id="18446744073709551615-18446744073709551615"
        )
        with trio.fail_after(30):
            await node_a.broadcast("tick", 1)
            await arrived.wait()
    assert received == [1]


async def test_ids_and_names_are_unique(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    await node_a.register_client("same")
    with pytest.raises(ClientIdTaken):
        await node_b.register_client("same")
    fresh = {await node.new_client_id("c-") for node in (node_a, node_b) for _ in range(20)}
    assert len(fresh) == 40
    assert all(client_id.startswith("c-") for client_id in fresh)
    await node_a.unregister_client("same")
    await node_b.register_client("same")  # a departed client's id is free again
    assert await node_a.locate_client("same") == "b"
    twin = ClusterBus(engines.bus.url, "a", namespace=bus_namespace, ttl=TTL)
    with pytest.raises(NodeNameTaken):
        await twin.run()


async def test_lease_exclusive_and_expires(bus_factory: BusFactory) -> None:
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    lease = await node_a.acquire_lease("upload:x", ttl=1.0)
    assert lease is not None
    assert await node_b.acquire_lease("upload:x", ttl=1.0) is None
    assert await node_b.lease_holder("upload:x") == "a"
    assert await lease.renew()
    # Not renewed: it expires, someone else takes it, and the old holder knows.
    taken = None
    with trio.fail_after(5):
        while taken is None:
            await trio.sleep(0.1)
            taken = await node_b.acquire_lease("upload:x", ttl=5)
    assert not await lease.renew()
    await lease.release()  # not ours any more: must not remove b's lease
    assert await node_a.lease_holder("upload:x") == "b"
    await taken.release()
    assert await node_a.lease_holder("upload:x") is None


async def test_lease_context_renews_and_releases(bus_factory: BusFactory) -> None:
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    async with node_a.lease("upload:y", ttl=1.0):
        # Held for several TTLs thanks to renewal.
        for _ in range(5):
            await trio.sleep(0.5)
            with pytest.raises(LeaseBusy):
                async with node_b.lease("upload:y", ttl=1.0):
                    pass  # pragma: no cover - must not be reached
    async with node_b.lease("upload:y", ttl=1.0):
        assert await node_a.lease_holder("upload:y") == "b"
    assert await node_a.lease_holder("upload:y") is None


async def test_lost_lease_cancels_the_holder(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    node_a = await bus_factory("a")
    thief = redis.Redis.from_url(engines.bus.url)
    reached_end = False

    async def hold() -> None:
        nonlocal reached_end
        async with node_a.lease("upload:z", ttl=0.6):
            # Someone takes the lease behind our back (as after an expiry).
            thief.set(f"{bus_namespace}:lease:upload:z", "thief token", px=60_000)
            await trio.sleep(5)
            reached_end = True

    with trio.fail_after(10), pytest.raises(LeaseLost):
        await hold()
    assert not reached_end
    assert thief.get(f"{bus_namespace}:lease:upload:z") == b"thief token"
    thief.close()


async def test_not_running_is_a_clear_error(engines: Any, bus_namespace: str) -> None:
    from conduit.cluster.bus import BusError

    bus = ClusterBus(engines.bus.url, "idle", namespace=bus_namespace)
    with pytest.raises(BusError, match="not running"):
        await bus.request("x", "k", {})
    with pytest.raises(BusError, match="not running"):
        await bus.broadcast("e")
    with pytest.raises(ValueError, match="ttl"):
        ClusterBus(engines.bus.url, "x", ttl=60)
    with pytest.raises(ValueError, match="node name"):
        ClusterBus(engines.bus.url, "bad:name")


async def test_malformed_messages_are_ignored(
    engines: Any, bus_namespace: str, bus_factory: BusFactory, caplog: pytest.LogCaptureFixture
) -> None:
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")

    @node_b.on_request
    async def handle(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        return {"ok": kind}

    stranger = redis.Redis.from_url(engines.bus.url)
    garbage = [
        b"\xc1",  # not msgpack
        b"\x93\x01\x02\x03",  # a list
        b"\x82\xa1t\xa3req\xa1s\x01",  # sender not text
        b"\x83\xa1t\xa3rep\xa1s\xa1x\xa1e\xa1z",  # error not a pair
    ]
    # A type of a later version (a rolling upgrade): ignored without a warning.
    later = msgpack.packb({"t": "zzz", "s": "x", "i": "1"})
    caplog.set_level(logging.DEBUG, logger="conduit.cluster.bus")
    for data in [*garbage, later]:
        stranger.xadd(f"{bus_namespace}:inbox:b", {"m": data})
        stranger.xadd(f"{bus_namespace}:events", {"m": data})
    stranger.xadd(f"{bus_namespace}:inbox:b", {"other": b"field"})
    stranger.close()
    # The reader survived all of it.
    assert await node_a.request("b", "still-there", {}) == {"ok": "still-there"}
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    malformed = [m for m in messages if m == (logging.WARNING, "ignoring a malformed bus message")]
    # Each piece of garbage once in b's inbox and twice on the events stream
    # (both nodes read it), and the entry with no "m" field: a warning each;
    # the later type only a debug line, as often.
    assert len(malformed) == 3 * len(garbage) + 1, messages
    unknown = [
        m for m in messages if m == (logging.DEBUG, "ignoring a bus message of unknown type 'zzz'")
    ]
    assert len(unknown) == 3, messages


async def test_a_resumed_client_moves_and_its_old_node_lets_go(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    await node_a.register_client("roamer")
    await node_a.register_client("stayer")
    # B takes the entry over (the client proved with its token that A's is stale);
    # SET NX would have refused it.
    assert await node_b.move_client("roamer") == "a"
    assert await node_b.move_client("fresh") is None
    assert await node_a.locate_client("roamer") == "b"
    # A's cleanup compares before deleting: B's entry stays.
    await node_b.move_client("stayer")
    await node_a.unregister_client("stayer")
    assert await node_a.locate_client("stayer") == "b"
    # A's next heartbeat (every TTL / 3) sees the entry is B's and stops
    # refreshing it, so it does not recreate it once B lets it go.
    with trio.fail_after(10):
        while "roamer" in node_a._clients:  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(0.05)
    assert await node_a.locate_client("roamer") == "b"
    assert "stayer" not in node_a._clients
    await node_b.unregister_client("roamer")
    await trio.sleep(TTL)
    assert await node_a.locate_client("roamer") is None
    # Without the move, a re-registration by A would still be refused.
    with pytest.raises(ClientIdTaken):
        await node_a.register_client("fresh")


async def test_a_client_that_moves_and_leaves_before_its_old_node_beats_stays_gone(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    """The client resumes on B and leaves B before A's next heartbeat: A must
    not take the entry for one the bus lost and recreate it in its own name."""
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    await node_a.register_client("racer")
    assert await node_b.move_client("racer") == "a"
    await node_b.unregister_client("racer")
    assert await node_a.locate_client("racer") is None  # departed, not on A
    with trio.fail_after(10):
        while "racer" in node_a._clients:  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(0.05)
    await trio.sleep(TTL * 1.2)  # the departed mark has expired; A beat meanwhile
    assert await node_a.locate_client("racer") is None
    direct = redis.Redis.from_url(engines.bus.url)
    try:
        assert direct.get(f"{bus_namespace}:client:racer") is None
    finally:
        direct.close()


async def test_a_release_that_lands_after_the_clients_resume_on_the_same_node_heals(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    """A client's old session on A ends while the client resumes on A itself:
    the resume's move lands first, then the release marks the entry departed.
    The mark is A's own and A holds the client again: A's next beat writes the
    entry back, so the client stays locatable (a mark of another node's would
    have been a move, and is not written back)."""
    node_a = await bus_factory("a")
    await node_a.register_client("c1")
    assert await node_a.move_client("c1") == "a"  # the resume, here
    await node_a.unregister_client("c1")  # the old session's release, landing after it
    node_a._clients.add("c1")  # the node holds it again (the resume's hold)
    assert await node_a.locate_client("c1") is None
    with trio.fail_after(10):
        while await node_a.locate_client("c1") != "a":  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(0.05)
    await trio.sleep(TTL * 1.2)
    assert await node_a.locate_client("c1") == "a" and "c1" in node_a._clients


async def test_entries_the_bus_lost_are_recreated_at_the_next_heartbeat(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    """A Redis restart without persistence loses the node's and its clients'
    entries: the node's next beat writes them again."""
    node_a = await bus_factory("a")
    await node_a.register_client("kept")
    direct = redis.Redis.from_url(engines.bus.url)
    try:
        direct.delete(f"{bus_namespace}:node:a", f"{bus_namespace}:client:kept")
        assert await node_a.locate_client("kept") is None
        with trio.fail_after(10):
            while await node_a.locate_client("kept") != "a":  # noqa: ASYNC110 - no event to wait on
                await trio.sleep(0.05)
        assert await node_a.node_alive("a")
    finally:
        direct.close()


async def test_resume_entries_are_owned_and_single_use(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    first, second = "aa" * 32, "bb" * 32
    await node_a.share_resume(first, "client-1", "alice", 60.0)
    # Another account cannot redeem it, and its attempt leaves it for the owner.
    assert await node_b.redeem_resume(first, "mallory") is None
    assert await node_b.redeem_resume(first, "alice") == "client-1"
    assert await node_a.redeem_resume(first, "alice") is None  # good once, cluster-wide
    # A new token for the client replaces its previous one.
    await node_a.share_resume(first, "client-1", "alice", 60.0)
    await node_a.share_resume(second, "client-1", "alice", 60.0, replaces=first)
    assert await node_b.redeem_resume(first, "alice") is None
    # Expiry: shortened to almost nothing, it is gone.
    await node_a.expire_resume([second], 0.05)
    await trio.sleep(0.2)
    assert await node_b.redeem_resume(second, "alice") is None
    with pytest.raises(ValueError, match="owner"):
        await node_a.share_resume(first, "c", "two words", 60.0)
    stranger = redis.Redis.from_url(engines.bus.url)
    try:
        await node_a.share_resume(first, "client-2", "-", 60.0)
        assert stranger.get(f"{bus_namespace}:resume:{first}") == b"- client-2"
    finally:
        stranger.close()


async def test_one_owners_resume_entries_are_bounded_and_evict_only_its_own(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    """Past ``keep`` entries counted against one owner (a client connecting
    in a loop), its oldest go, entry and all; another owner's stay."""
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    flood = [f"{index:02x}" * 32 for index in range(5)]
    other = "ee" * 32
    await node_b.share_resume(other, "client-9", "-", 60.0, counted_against="honest")
    went = [
        await node_a.share_resume(digest, f"c{i}", "-", 60.0, counted_against="loop", keep=3)
        for i, digest in enumerate(flood)
    ]
    assert went == [0, 0, 0, 1, 1]
    direct = redis.Redis.from_url(engines.bus.url)
    try:
        assert direct.zcard(f"{bus_namespace}:resumes:loop") == 3
        entries = direct.keys(f"{bus_namespace}:resume:*")
        assert len(entries) == 4  # the flood's newest three, and the other owner's
        # A client's next token replaces its last one in the set as on the bus.
        newer = "ff" * 32
        assert (
            await node_a.share_resume(
                newer, "c4", "-", 60.0, replaces=flood[4], counted_against="loop", keep=3
            )
            == 0
        )
        assert direct.zcard(f"{bus_namespace}:resumes:loop") == 3
        assert 0 < direct.pttl(f"{bus_namespace}:resumes:loop") <= 60_000
    finally:
        direct.close()
    for digest in flood[:2] + flood[4:]:
        assert await node_b.redeem_resume(digest, "-") is None
    for i, digest in ((2, flood[2]), (3, flood[3]), (4, newer)):
        assert await node_b.redeem_resume(digest, "-") == f"c{i}"
    assert await node_a.redeem_resume(other, "-") == "client-9"
    with pytest.raises(ValueError, match="owner"):
        await node_a.share_resume(other, "c", "-", 60.0, counted_against="two words")
    with pytest.raises(ValueError, match="keep"):
        await node_a.share_resume(other, "c", "-", 60.0, keep=0)


async def test_a_node_whose_clock_is_behind_keeps_the_token_it_just_shared(
    bus_factory: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner's set is ordered by the Redis server's clock: scored by the
    # node's own, a token shared by a node two minutes behind was the oldest,
    # and went in the very call that shared it.
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    for index in range(3):
        await node_a.share_resume(f"{index:02x}" * 32, f"c{index}", "-", 60.0, keep=3)
    real_time_ns, real_time = time.time_ns, time.time
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() - 120 * 10**9)
    monkeypatch.setattr(time, "time", lambda: real_time() - 120)
    assert await node_b.share_resume("bb" * 32, "cb", "-", 60.0, keep=3) == 1
    assert await node_a.redeem_resume("bb" * 32, "-") == "cb"
    assert await node_a.redeem_resume("00" * 32, "-") is None  # the oldest went


async def test_a_held_resume_entry_stays_good_until_spent_and_never_longer_than_its_hold(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    """A token redeemed with ``hold`` stays redeemable (the redeeming session
    has not heard from its client, whose WELCOME may be lost) until it is
    spent, and for at most ``hold`` from its first redemption: a later
    redemption never gives it more time."""
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    digest, other = "cc" * 32, "dd" * 32
    key = f"{bus_namespace}:resume:{digest}"
    stranger = redis.Redis.from_url(engines.bus.url)
    try:
        await node_a.share_resume(digest, "client-3", "alice", 60.0)
        assert await node_b.redeem_resume(digest, "mallory", hold=30.0) is None
        assert await node_b.redeem_resume(digest, "alice", hold=30.0) == "client-3"
        left = stranger.pttl(key)
        assert isinstance(left, int) and 25_000 < left <= 30_000  # shortened to the hold
        assert await node_a.redeem_resume(digest, "alice", hold=50.0) == "client-3"  # again
        again = stranger.pttl(key)
        assert isinstance(again, int) and again <= left  # never lengthened
        await node_b.spend_resume(digest)
        assert await node_a.redeem_resume(digest, "alice", hold=30.0) is None
        await node_b.spend_resume(digest)  # already gone: nothing happens
        # Spent with whom it counted against, it leaves that bound's set too
        # (its member stayed until 2026-12-08, about 130 bytes a goodbye).
        counted = f"{bus_namespace}:resumes:group"
        await node_a.share_resume(digest, "client-3", "alice", 60.0, counted_against="group")
        assert stranger.zscore(counted, digest) is not None
        await node_b.spend_resume(digest, counted_against="group")
        assert stranger.zscore(counted, digest) is None
        assert not stranger.exists(key)
        # The hold runs out by itself when nobody spends it.
        await node_a.share_resume(other, "client-4", "alice", 60.0)
        assert await node_a.redeem_resume(other, "alice", hold=0.05) == "client-4"
        await trio.sleep(0.2)
        assert await node_b.redeem_resume(other, "alice", hold=30.0) is None
        for wrong in (0.0, -1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match="hold"):
                await node_a.redeem_resume(digest, "alice", hold=wrong)
    finally:
        stranger.close()


async def test_progress_reports_and_one_way_messages(bus_factory: BusFactory) -> None:
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")
    told: list[tuple[str, dict[str, Any], str]] = []
    heard = trio.Event()

    @node_b.on_request
    async def handle(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        if kind == "work":
            for step in range(1, 6):
                await node_b.report_progress({"step": step})
            return {"done": True}
        told.append((kind, payload, sender))
        heard.set()
        if kind == "broken":
            raise RPCError("nobody waits for this", "ignored")
        return {"never": "sent"}

    reports: list[Any] = []

    async def on_progress(data: Any) -> None:
        reports.append(data)

    with trio.fail_after(20):
        reply = await node_a.request("b", "work", {}, on_progress=on_progress)
    assert reply == {"done": True}
    # In order; a slow requester may skip some, never the last (it precedes the reply).
    assert reports, reports
    assert reports[-1] == {"step": 5}
    steps = [report["step"] for report in reports]
    assert steps == sorted(set(steps))
    # Reporting is for request handlers only.
    with pytest.raises(RuntimeError, match="report_progress"):
        await node_a.report_progress({"step": 0})
    # One-way: the handler runs, its failure is only logged, nothing is replied.
    await node_a.tell("b", "broken", {"x": 1})
    await node_a.tell("b", "notice", {"x": 2})
    with trio.fail_after(10):
        while len(told) < 2:
            await heard.wait()
            heard = trio.Event()
    # Each in a task of its own, so not necessarily in order.
    assert sorted(told) == [("broken", {"x": 1}, "a"), ("notice", {"x": 2}, "a")]
    # And requests still work after them.
    assert await node_a.request("b", "work", {}) == {"done": True}


async def test_a_request_survives_its_nodes_registration_lost_for_a_while(
    engines: Any, bus_namespace: str, bus_factory: BusFactory
) -> None:
    """The bus restarted without persistence loses every node's registration
    until the node's next heartbeat (here deleted again and again for a TTL,
    which the requester's looks are sure to see): a request the node still
    serves, saying so, is waited for. Until 2026-12-07 one look that found
    the registration missing failed it ("left the cluster before answering"),
    2 in 6 cross-node pushes across a restart of a second."""
    node_a = await bus_factory("a")
    node_b = await bus_factory("b")

    @node_b.on_request
    async def slow(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        await trio.sleep(2 * TTL)  # "still served" words go to the requester meanwhile
        return {"done": True}

    direct = redis.Redis.from_url(engines.bus.url)
    try:
        with trio.fail_after(10 * TTL):
            async with trio.open_nursery() as nursery:

                async def forget_b() -> None:
                    await trio.sleep(TTL / 4)
                    with trio.move_on_after(TTL):
                        while True:
                            direct.delete(f"{bus_namespace}:node:b")
                            await trio.sleep(0.02)

                nursery.start_soon(forget_b)
                assert await node_a.request("b", "slow", {}, timeout=math.inf) == {"done": True}
    finally:
        direct.close()
