"""Faults of a cluster on a real SeaweedFS and Valkey: what each one may cost, and what it may not.

* A node evicting a partial it let go of never aborts the upload another
  node resumed from it (the eviction checks, and is conditional on, the
  version of the partial's state).
* One failed look at the bus while a cross-node request waits is retried,
  not a failure (and nothing reaches the caller as an ``ExceptionGroup``).
* A request (or its reply) the bus loses, while its node stays registered,
  ends the wait with ``RequestLost`` about a TTL after the node's last word
  about it; a TTL counted from when the bus came back, if it was away.
* A file whose ``CompleteMultipartUpload`` succeeded is reported published
  even if the clean-up after it fails; the sweeper removes what was left.
* A cancelled ``append`` loses no byte; a partial closed after a failed
  part keeps its stored parts, and a resume continues after them.
* The sweeper recognises the states of cross-node staging as its own, and
  still ignores a forged one.

Failures are injected by replacing one client or store method so that it
fails once, as a transient S3 or Redis error would; a lost request by a node
the test registers on the bus itself, which never answers (as a node whose
inbox lost the request looks to the requester).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import logging
import math
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import botocore.exceptions  # type: ignore[import-untyped]
import msgpack
import pytest
import redis
import trio

from cluster_engines import Engines
from conduit import FileTransferHandler
from conduit.cluster._push import _write_all, push_via_node
from conduit.cluster._s3_wire import UploadState
from conduit.cluster.bus import BusError, ClusterBus, NodeUnreachable, RequestLost
from conduit.cluster.s3 import MIN_PART_SIZE, S3Store
from conduit.errors import TransferError
from conduit.transfer import _backend_store
from conduit.transfer._backend import Admitted
from conduit.transfer._backend_store import StoreBackend, StoreSink
from conduit.transfer._hashing import HashGate
from conftest import ClientFactory, ServerFactory

PART = MIN_PART_SIZE
MiB = 1024 * 1024
#: Short, so that a bus outage of one TTL fits in a test; room for a loaded machine.
TTL = 1.5


def _client_error(code: str, status: int, operation: str) -> botocore.exceptions.ClientError:
    """What boto3 raises when S3 answers ``status`` / ``code`` (after its own retries)."""
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": "injected"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        operation,
    )


def _keys(store: S3Store, below: str) -> list[str]:
    """The keys under ``PREFIX/.conduit/<below>/``."""
    prefix = store.location.key(f".conduit/{below}/")
    answer = store.client.list_objects_v2(Bucket=store.bucket, Prefix=prefix)
    return [str(entry["Key"]) for entry in answer.get("Contents", [])]


async def _read_all(store: S3Store, name: str) -> bytes:
    reader = await store.open_reader(name)
    data = b""
    while block := await reader.read(4 * MiB):
        data += block
    await reader.aclose()
    return data


# --------------------------------------------------------------------------- A: evictions


@attrs.define
class Settings:
    """The handler settings the store backend reads."""

    max_file_size: int | None = None
    overwrite: bool = False
    partial_ttl: float = 24 * 3600.0
    max_partial_bytes: int | None = None
    hash_gate: HashGate = attrs.field(factory=HashGate)


class Connection:
    """What the backend keeps per connection."""

    def __init__(self) -> None:
        self.owned: dict[Any, Any] = {}


class FakePeer:
    """One connection of a client without an account: partials belong to its host."""

    def __init__(self, client_id: str) -> None:
        self.connection = Connection()
        self.account = None
        self.username = None
        self.address = ("10.0.0.1", 40000)  # every client behind the balancer
        self.id = client_id


def _peer(client_id: str) -> Any:
    """A :class:`FakePeer`, typed as the backend's peer."""
    return FakePeer(client_id)


@pytest.fixture
async def two_nodes(
    s3_url: str, s3_client_factory: Callable[[], Any]
) -> AsyncIterator[Callable[..., tuple[StoreBackend, StoreBackend]]]:
    """Make the store backends of two nodes on one bucket prefix (A's settings given)."""
    stores: list[S3Store] = []

    def make(**settings_of_a: Any) -> tuple[StoreBackend, StoreBackend]:
        a = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
        b = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
        stores.extend((a, b))
        return StoreBackend(a, Settings(**settings_of_a)), StoreBackend(b, Settings())

    yield make
    for store in stores:
        store.close()


def _sink(admitted: Admitted) -> StoreSink:
    sink = admitted.sink
    assert isinstance(sink, StoreSink)
    return sink


async def _left_on(node: StoreBackend, name: str, data: bytes, key: str, parts: int) -> None:
    """A client sends ``parts`` parts of ``data`` to ``node``, then is cut off."""
    admitted = await node.admit(_peer("c1"), name, len(data), key, restart=False)
    await _sink(admitted).write([data[: parts * PART]])
    await _sink(admitted).close()
    await node.release(admitted)


async def _finish(admitted: Admitted, data: bytes, chunks: Sequence[bytes]) -> str:
    sink = _sink(admitted)
    await sink.write(chunks)
    return await sink.publish(overwrite=False, expected_sha256=hashlib.sha256(data).hexdigest())


async def test_room_for_an_upload_is_never_made_from_a_partial_resumed_elsewhere(
    two_nodes: Callable[..., tuple[StoreBackend, StoreBackend]],
) -> None:
    with trio.fail_after(120):
        a, b = two_nodes(max_partial_bytes=8 * PART)
        data = os.urandom(6 * PART + 77)
        await _left_on(a, "big.bin", data, "K1", parts=2)
        # The client reconnects through the balancer to B and resumes there.
        resumed = await b.admit(_peer("c1"), "big.bin", len(data), "K1", restart=False)
        assert _sink(resumed).offset == 2 * PART
        await _sink(resumed).write([data[2 * PART : 4 * PART]])
        # Another client's upload on A needs the room of A's "abandoned" partial.
        other = await a.admit(_peer("c2"), "other.bin", 7 * PART, "K2", restart=False)
        await _sink(other).discard()
        await a.release(other)
        # B's upload is intact: it completes with every byte.
        name = await _finish(resumed, data, [data[4 * PART :]])
        await b.release(resumed)
        assert name == "big.bin"
        assert isinstance(b.store, S3Store)
        assert await _read_all(b.store, "big.bin") == data


async def test_capping_an_owners_partials_never_evicts_one_resumed_elsewhere(
    two_nodes: Callable[..., tuple[StoreBackend, StoreBackend]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_backend_store, "MAX_ABANDONED_PER_OWNER", 1)
    with trio.fail_after(120):
        a, b = two_nodes()
        data = os.urandom(3 * PART + 5)
        await _left_on(a, "one.bin", data, "K1", parts=1)
        # Resumed on B, which has not stored a part yet: its state is all
        # that tells A that the partial is no longer abandoned.
        resumed = await b.admit(_peer("c1"), "one.bin", len(data), "K1", restart=False)
        assert _sink(resumed).offset == PART
        # A second partial of the same owner left on A: A's oldest must go.
        await _left_on(a, "two.bin", os.urandom(2 * PART), "K2", parts=1)
        assert [name for _root, name, _tid in a._kept] == ["two.bin"]
        name = await _finish(resumed, data, [data[PART:]])
        await b.release(resumed)
        assert isinstance(b.store, S3Store)
        assert await _read_all(b.store, name) == data


async def test_an_abandoned_partial_nobody_resumed_is_still_evicted(
    two_nodes: Callable[..., tuple[StoreBackend, StoreBackend]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_backend_store, "MAX_ABANDONED_PER_OWNER", 1)
    with trio.fail_after(120):
        a, _b = two_nodes()
        await _left_on(a, "one.bin", os.urandom(2 * PART), "K1", parts=1)
        await _left_on(a, "two.bin", os.urandom(2 * PART), "K2", parts=1)
        store = a.store
        assert isinstance(store, S3Store)
        # One partial left: one state, one reservation, one multipart upload.
        assert len(_keys(store, "uploads")) == 1
        assert len(_keys(store, "names")) == 1
        uploads = store.client.list_multipart_uploads(
            Bucket=store.bucket, Prefix=store.location.list_prefix
        ).get("Uploads", [])
        assert [u["Key"] for u in uploads] == [store.location.key("two.bin")]


async def test_kept_partials_are_capped_in_all_whatever_their_owners(
    two_nodes: Callable[..., tuple[StoreBackend, StoreBackend]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer with many addresses is many owners: the per-owner cap alone
    would keep one partial per address. Beyond MAX_ABANDONED in all, the
    oldest go, whoever they belong to."""
    monkeypatch.setattr(_backend_store, "MAX_ABANDONED", 2)
    with trio.fail_after(120):
        a, _b = two_nodes()
        for index in range(4):
            peer = _peer(f"c{index}")
            peer.address = (f"10.0.0.{index + 10}", 40000)  # an owner each
            data = os.urandom(2 * PART)
            admitted = await a.admit(peer, f"p{index}.bin", len(data), f"K{index}", restart=False)
            await _sink(admitted).write([data[:PART]])
            await _sink(admitted).close()
            await a.release(admitted)
        assert sorted(name for _root, name, _tid in a._kept) == ["p2.bin", "p3.bin"]
        store = a.store
        assert isinstance(store, S3Store)
        assert len(_keys(store, "uploads")) == 2


async def test_an_eviction_racing_with_a_resume_does_not_abort_it(
    s3_url: str, s3_client_factory: Callable[[], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resume claims the state between the evicting node's look and its delete."""
    with trio.fail_after(120):
        node_a = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
        node_b = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
        tid = "r" * 32
        data = os.urandom(2 * PART + 9)
        first = await node_a.open_partial("race.bin", tid, resume=False)
        await first.append(data[:PART])
        await first.close()
        found = await node_a.partial_version("race.bin", tid)
        assert found is not None and found[0] == PART
        seen = found[1]

        resumed: list[Any] = []
        real_load = node_a._load_state

        def load_then_resume_elsewhere(name: str, transfer_id: str) -> Any:
            loaded = real_load(name, transfer_id)
            resumed.append(node_b._open(name, transfer_id, True, False))  # B claims it now
            return loaded

        monkeypatch.setattr(node_a, "_load_state", load_then_resume_elsewhere)
        assert not await node_a.discard_partial_if("race.bin", tid, seen)
        monkeypatch.undo()

        (second,) = resumed
        assert second.offset == PART
        await second.append(data[PART:])
        name = await second.publish(expected_sha256=hashlib.sha256(data).hexdigest())
        assert await _read_all(node_b, name) == data
        # Unchanged since it was seen, it is discarded: upload, name and state.
        third = await node_a.open_partial("gone.bin", tid, resume=False)
        await third.append(os.urandom(PART))
        await third.close()
        found = await node_a.partial_version("gone.bin", tid)
        assert found is not None
        assert await node_a.discard_partial_if("gone.bin", tid, found[1])
        assert await node_a.find_partial("gone.bin", tid) is None
        assert _keys(node_a, "names") == []
        node_a.close()
        node_b.close()


# --------------------------------------------------------------------------- B: the bus


@attrs.define
class Answering:
    """How long node "b" takes to answer a request (longer than ttl / 3: it is watched)."""

    delay: float = TTL * 1.5


@pytest.fixture
async def two_buses(
    engines: Engines, bus_namespace: str, nursery: trio.Nursery
) -> AsyncIterator[tuple[ClusterBus, Answering]]:
    """Node "a", and node "b" answering every request with success after a delay."""
    a = ClusterBus(engines.bus.url, "a", namespace=bus_namespace, ttl=TTL)
    b = ClusterBus(engines.bus.url, "b", namespace=bus_namespace, ttl=TTL)
    answering = Answering()

    @b.on_request
    async def answer(kind: str, payload: dict[str, Any], sender: str) -> dict[str, Any]:
        await trio.sleep(answering.delay)
        return {"success": True, "delivered_by": "b"}

    scopes: list[trio.CancelScope] = []

    async def run(bus: ClusterBus, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            await bus.run(task_status=task_status)

    await nursery.start(run, a)
    await nursery.start(run, b)
    yield a, answering
    for scope in scopes:
        scope.cancel()


def _failing_looks(bus: ClusterBus, fail: Callable[[int], bool]) -> None:
    """Make ``bus.node_alive``'s call number n fail as a Redis outage does when ``fail(n)``."""
    real = bus.node_alive
    calls = 0

    async def node_alive(node: str) -> bool:
        nonlocal calls
        calls += 1
        if fail(calls):
            raise BusError("cluster bus: ConnectionError: Error 111 connecting (injected)")
        return await real(node)

    bus.node_alive = node_alive  # type: ignore[method-assign]


async def test_one_failed_look_at_the_bus_does_not_fail_a_push(
    two_buses: tuple[ClusterBus, Answering],
    s3_url: str,
    s3_client_factory: Callable[[], Any],
    tmp_path: Path,
) -> None:
    a, _answering = two_buses
    _failing_looks(a, lambda n: n == 2)  # the look before sending works; the watch's first fails
    store = S3Store(s3_url, client=s3_client_factory())
    source = tmp_path / "x.bin"
    source.write_bytes(b"hello" * 1000)
    with trio.fail_after(30):
        result = await push_via_node(a, store, "b", "some-client", source, None)
    assert result == {"success": True, "delivered_by": "b"}
    store.close()


async def test_a_bus_silent_for_a_ttl_is_a_plain_node_unreachable(
    two_buses: tuple[ClusterBus, Answering],
    s3_url: str,
    s3_client_factory: Callable[[], Any],
    tmp_path: Path,
) -> None:
    a, answering = two_buses
    answering.delay = 120.0  # "b" is alive, but the bus stays silent until the watch gives up
    _failing_looks(a, lambda n: n >= 2)
    # pytest.raises(NodeUnreachable) does not match an ExceptionGroup holding one.
    with trio.fail_after(30), pytest.raises(NodeUnreachable, match="has not answered"):
        await a.request("b", "push", {})
    # What send_to_client returns for it: a failure dict, not an exception.
    del a.node_alive  # the class's again
    _failing_looks(a, lambda n: n >= 2)
    store = S3Store(s3_url, client=s3_client_factory())
    source = tmp_path / "y.bin"
    source.write_bytes(b"hello" * 1000)
    with trio.fail_after(30):
        result = await push_via_node(a, store, "b", "some-client", source, None)
    assert result["success"] is False
    assert result["code"] == "unreachable"
    store.close()


async def _registered_but_deaf(
    url: str, namespace: str, name: str, *, say_served: int = 0, said: list[float] | None = None
) -> None:
    """Run as node ``name`` that never answers, until cancelled.

    Its registration is kept fresh as a live node's is. It reads its inbox
    only to say ``say_served`` times, ``TTL / 3`` apart, that the first
    request (from node "a") is still being served, appending to ``said``
    when it did; then it falls silent: from the requester's side, a reply
    lost on the bus. With ``say_served=0`` it never reads: a request lost on
    the bus.
    """
    bus = redis.Redis.from_url(url)
    node_key, inbox = f"{namespace}:node:{name}", f"{namespace}:inbox:{name}"

    async def keep_registered() -> None:
        while True:
            await trio.to_thread.run_sync(
                lambda: bus.set(node_key, "registered by the test", px=int(TTL * 1000))
            )
            await trio.sleep(TTL / 3)

    async def say_still_served() -> None:
        entries: Any = []
        while not entries:
            entries = await trio.to_thread.run_sync(
                lambda: bus.xread({inbox: "0-0"}, count=1, block=100)
            )
        request_id = msgpack.unpackb(entries[0][1][0][1][b"m"])["i"]
        message = msgpack.packb({"t": "alv", "s": name, "p": [request_id]})
        for _ in range(say_served):
            # Timed as it is sent, not once the thread is back: node "a" may
            # hear the word (and start its TTL) before this loop resumes.
            sent = trio.current_time()
            await trio.to_thread.run_sync(lambda: bus.xadd(f"{namespace}:inbox:a", {"m": message}))
            if said is not None:
                said.append(sent)
            await trio.sleep(TTL / 3)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_registered)
            if say_served:
                nursery.start_soon(say_still_served)
    finally:
        bus.close()


async def _start_deaf_node(
    nursery: trio.Nursery, engines: Engines, namespace: str, **options: Any
) -> None:
    """Start :func:`_registered_but_deaf` as node "deaf"; return once it is registered."""
    deaf = functools.partial(_registered_but_deaf, engines.bus.url, namespace, "deaf", **options)
    nursery.start_soon(deaf)
    await trio.sleep(0.1)


async def _ask_deaf_node(a: ClusterBus) -> RequestLost:
    """Node "a"'s request to "deaf", with no timeout: the RequestLost that ends it."""
    with trio.fail_after(10 * TTL), pytest.raises(RequestLost) as caught:
        await a.request("deaf", "push", {}, timeout=math.inf)
    return caught.value


async def test_a_request_the_bus_lost_ends_the_wait_instead_of_lasting_for_ever(
    two_buses: tuple[ClusterBus, Answering],
    engines: Engines,
    bus_namespace: str,
    nursery: trio.Nursery,
) -> None:
    a, _answering = two_buses
    await _start_deaf_node(nursery, engines, bus_namespace)
    started = trio.current_time()
    assert "request or its reply" in str(await _ask_deaf_node(a))
    assert trio.current_time() - started > TTL  # a whole TTL without word
    assert await a.node_alive("deaf")  # the node never left: the request was lost


async def test_a_reply_the_bus_lost_ends_the_wait_a_ttl_after_the_last_word(
    two_buses: tuple[ClusterBus, Answering],
    engines: Engines,
    bus_namespace: str,
    nursery: trio.Nursery,
) -> None:
    a, _answering = two_buses
    said: list[float] = []
    await _start_deaf_node(nursery, engines, bus_namespace, say_served=4, said=said)
    await _ask_deaf_node(a)
    # Each word counted: the wait outlasted a TTL from the last one, not from the request.
    assert len(said) == 4
    assert trio.current_time() - said[-1] > TTL


async def test_a_request_is_not_taken_for_lost_the_moment_the_bus_comes_back(
    two_buses: tuple[ClusterBus, Answering],
    engines: Engines,
    bus_namespace: str,
    nursery: trio.Nursery,
) -> None:
    a, _answering = two_buses
    await _start_deaf_node(nursery, engines, bus_namespace)
    # The look before sending works; the watch's first two fail, the third works.
    _failing_looks(a, lambda n: n in (2, 3))
    started = trio.current_time()
    await _ask_deaf_node(a)
    # While the bus was away the node's word could not have got through
    # either: the TTL of silence counts from the third look (after 3 x TTL / 3).
    assert trio.current_time() - started > 2 * TTL


# --------------------------------------------------------------------------- C: publishing


@pytest.mark.usefixtures("aws_environment")
async def test_a_published_file_is_reported_published_when_the_clean_up_fails(
    server_factory: ServerFactory, client_factory: ClientFactory, s3_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        handler = FileTransferHandler(storage_dir=s3_url)
        received: list[str] = []
        handler.on_file_received(lambda _client, path, _metadata: received.append(path))
        server = await server_factory(handler.register_server_handlers)
        client = await client_factory(server)
        store = handler.backend.store  # type: ignore[attr-defined]
        assert isinstance(store, S3Store)
        real_delete = store._delete

        def delete(key: str) -> None:
            if "/.conduit/names/" in key:  # releasing the name, after the object is complete
                raise _client_error("InternalError", 500, "DeleteObject")
            real_delete(key)

        store._delete = delete  # type: ignore[method-assign]
        source = tmp_path / "doc.bin"
        data = os.urandom(9 * MiB)
        source.write_bytes(data)
        result = await handler.send_to_server(client, source)
        assert result["success"] is True, result
        assert [Path(p).name for p in received] == ["doc.bin"]
        assert [f["name"] for f in await handler.list_files(client)] == ["doc.bin"]
        assert await _read_all(store, "doc.bin") == data


@pytest.mark.usefixtures("aws_environment")
async def test_a_part_refused_once_keeps_the_stored_parts_for_a_resume(
    server_factory: ServerFactory, client_factory: ClientFactory, s3_url: str, tmp_path: Path
) -> None:
    """A 503 SlowDown outlasting boto3's retries fails the upload, not its stored parts."""
    with trio.fail_after(120):
        handler = FileTransferHandler(storage_dir=s3_url)
        server = await server_factory(handler.register_server_handlers)
        client = await client_factory(server)
        store = handler.backend.store  # type: ignore[attr-defined]
        assert isinstance(store, S3Store)
        real_upload_part = store.client.upload_part
        parts = 0

        def upload_part(**request: Any) -> Any:
            nonlocal parts
            parts += 1
            if parts == 4:
                raise _client_error("SlowDown", 503, "UploadPart")
            return real_upload_part(**request)

        store.client.upload_part = upload_part
        source = tmp_path / "big.bin"
        data = os.urandom(40 * MiB)
        source.write_bytes(data)
        failed = await handler.send_to_server(client, source)
        assert failed["success"] is False and failed["code"] == "storage_error", failed
        again = await handler.send_to_server(client, source)
        assert again["success"] is True, again
        assert again["resumed_from"] > 0, again  # the parts stored before the 503
        assert await _read_all(store, "big.bin") == data


async def test_the_sweeper_removes_what_a_publish_could_not_clean_up(
    s3_url: str, s3_client_factory: Callable[[], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(120):
        store = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
        data = os.urandom(PART + 3)
        partial = await store.open_partial("kept.bin", "k" * 32, resume=False)
        await partial.append(data)
        monkeypatch.setattr(store, "_delete", _always_fails)  # neither the name nor the state
        name = await partial.publish(expected_sha256=hashlib.sha256(data).hexdigest())
        monkeypatch.undo()
        assert name == "kept.bin"
        assert len(_keys(store, "uploads")) == 1
        assert len(_keys(store, "names")) == 1
        # A sweep for which everything is old: the leftovers go, the file stays.
        assert await store.cleanup_stale_partials(-3600) == 1
        assert _keys(store, "uploads") == []
        assert _keys(store, "names") == []
        assert await _read_all(store, "kept.bin") == data
        store.close()


async def test_a_state_of_another_shape_in_the_bucket_stops_no_sweep(
    s3_url: str, s3_client_factory: Callable[[], Any]
) -> None:
    """Objects under the upload states' prefix that are JSON but no state
    (``null``, a list, fields of other types) are skipped: the sweep still
    removes an abandoned upload beside them. Found by a review: a state of
    ``null`` raised AttributeError out of every sweep of its prefix, so
    nothing under it was ever swept again."""
    with trio.fail_after(120):
        store = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
        partial = await store.open_partial("abandoned.bin", "a" * 32, resume=False)
        await partial.append(os.urandom(PART))
        await partial.close()  # its writer went away, its part stored
        good = json.loads(store._get(_keys(store, "uploads")[0])[0])  # type: ignore[index]
        shapes: list[Any] = [None, [], 7, {**good, "part_size": "5"}, {**good, "overwrite": 1}]
        for index, shape in enumerate(shapes):
            key = store.location.key(f".conduit/uploads/{index:02}.json")
            store.client.put_object(Bucket=store.bucket, Key=key, Body=json.dumps(shape).encode())
        assert await store.cleanup_stale_partials(-3600) == 1
        assert _keys(store, "uploads") == [
            store.location.key(f".conduit/uploads/{index:02}.json") for index in range(len(shapes))
        ]
        uploads = store.client.list_multipart_uploads(
            Bucket=store.bucket, Prefix=store.location.list_prefix
        ).get("Uploads", [])
        assert uploads == []
        store.close()


def _always_fails(key: str) -> None:
    raise _client_error("SlowDown", 503, "DeleteObject")


def test_a_local_copy_the_file_system_takes_none_of_is_an_error_not_a_spin(
    tmp_path: Path,
) -> None:
    """The client's node copies a staged file to a local one before pushing
    it: a write that takes 0 bytes with no error raises EIO instead of being
    retried for ever in its worker thread."""

    class TakesNothing(io.FileIO):
        calls = 0

        def write(self, data: Any) -> int:
            TakesNothing.calls += 1
            assert TakesNothing.calls < 100, "the write was retried without end"
            return 0

    with (
        TakesNothing(tmp_path / "copy", "wb") as out,
        pytest.raises(OSError, match="took none of 5 bytes") as info,
    ):
        _write_all(out, b"bytes")
    assert info.value.errno == errno.EIO
    assert TakesNothing.calls == 1


# --------------------------------------------------------------------------- the partial's close


async def test_a_cancelled_append_loses_no_byte(
    s3_url: str, s3_client_factory: Callable[[], Any]
) -> None:
    store = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
    data = os.urandom(3 * PART + 11)
    started, go_on = threading.Event(), threading.Event()
    real_upload = store.client.upload_part

    def upload_part(**arguments: Any) -> Any:
        started.set()
        go_on.wait(60)  # the first part stays in flight until the test lets it go
        return real_upload(**arguments)

    store.client.upload_part = upload_part
    try:
        with trio.fail_after(120):
            partial = await store.open_partial("slow.bin", "s" * 32, resume=False)
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:

                    async def cancel_once_in_flight() -> None:
                        await trio.to_thread.run_sync(started.wait, 60)
                        await trio.sleep(0.2)  # the second part waits for the first
                        scope.cancel()

                    nursery.start_soon(cancel_once_in_flight)
                    await partial.append(data[: 2 * PART])
            assert scope.cancelled_caught
            assert partial.offset == 2 * PART  # nothing accepted was dropped
            go_on.set()
            await partial.append(data[2 * PART :])
            name = await partial.publish(expected_sha256=hashlib.sha256(data).hexdigest())
            assert await _read_all(store, name) == data
    finally:
        go_on.set()
        store.close()


async def test_closing_after_a_failed_part_keeps_the_stored_parts(
    s3_url: str, s3_client_factory: Callable[[], Any]
) -> None:
    """The receiver closes (keeps) a partial after a transient error; a resume goes on."""
    with trio.fail_after(120):
        node_a = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
        node_b = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
        data = os.urandom(5 * PART + 123)
        real_upload = node_a.client.upload_part

        def upload_part(**arguments: Any) -> Any:
            if arguments["PartNumber"] == 3:
                raise _client_error("SlowDown", 503, "UploadPart")
            return real_upload(**arguments)

        node_a.client.upload_part = upload_part
        first = await node_a.open_partial("f.bin", "f" * 32, resume=False)
        with pytest.raises(TransferError) as caught:
            await first.append(data[: 5 * PART])  # part 3 fails; seen when part 4 waits for it
        assert caught.value.code == "storage_error"
        await first.close()
        assert await node_a.find_partial("f.bin", "f" * 32) == 2 * PART
        second = await node_b.open_partial("f.bin", "f" * 32, resume=True)
        assert second.offset == 2 * PART
        await second.append(data[2 * PART :])
        name = await second.publish(expected_sha256=hashlib.sha256(data).hexdigest())
        assert await _read_all(node_b, name) == data
        node_a.close()
        node_b.close()


async def test_closing_after_a_failed_complete_keeps_the_stored_parts(
    s3_url: str, s3_client_factory: Callable[[], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(120):
        store = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
        data = os.urandom(2 * PART + 1000)
        first = await store.open_partial("c.bin", "c" * 32, resume=False)
        await first.append(data)
        real_complete = store.client.complete_multipart_upload

        def complete(**arguments: Any) -> Any:
            raise _client_error("InternalError", 500, "CompleteMultipartUpload")

        store.client.complete_multipart_upload = complete
        with pytest.raises(TransferError) as caught:
            await first.publish(expected_sha256=hashlib.sha256(data).hexdigest())
        assert caught.value.code == "storage_error"
        await first.close()
        store.client.complete_multipart_upload = real_complete
        # The short last part is not resumed from: sent again with what follows.
        second = await store.open_partial("c.bin", "c" * 32, resume=True)
        assert second.offset == 2 * PART
        await second.append(data[2 * PART :])
        name = await second.publish(expected_sha256=hashlib.sha256(data).hexdigest())
        assert await _read_all(store, name) == data
        store.close()


# --------------------------------------------------------------------------- D: the sweeper


async def test_the_sweeper_owns_staging_states_and_not_forged_ones(
    s3_url: str, s3_client_factory: Callable[[], Any], caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(120):
        store = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
        staged = await store.open_staging("a" * 32)  # a push in flight
        await staged.append(os.urandom(PART))
        await staged._wait_inflight()
        with caplog.at_level(logging.WARNING, logger="conduit.cluster.s3"):
            assert await store.cleanup_stale_partials(3600) == 0
        assert "not its own" not in caplog.text
        # The push goes on regardless.
        await staged.append(b"tail")
        await staged.publish()
        # A state under the staging name that points at a published file.
        victim = await store.put_file("victim.bin", b"v", sha256=hashlib.sha256(b"v").hexdigest())
        token = "b" * 32
        forged = UploadState(
            name=f".staging/{token}",
            transfer_id=token,
            key=store.location.key(victim),
            upload_id="none",
            part_size=PART,
            overwrite=True,
            reservation=None,
        )
        store._put(store._state_key(forged.name, token), forged.dumps(), if_match=None)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="conduit.cluster.s3"):
            await store.cleanup_stale_partials(-3600)
        assert "not its own" in caplog.text
        assert await _read_all(store, "victim.bin") == b"v"
        store.close()


@pytest.mark.usefixtures("aws_environment")
async def test_an_upload_aborted_behind_our_back_is_retried_from_zero(
    server_factory: ServerFactory, client_factory: ClientFactory, s3_url: str, tmp_path: Path
) -> None:
    """The multipart upload was aborted behind our back (a bucket lifecycle rule
    that aborts incomplete uploads, an operator): completing it fails with
    NoSuchUpload. The partial is kept, as for any S3 refusal, but its parts are
    gone for good: the retry must find that out and start from zero, not fail
    the same way until the partial expires."""
    with trio.fail_after(120):
        handler = FileTransferHandler(storage_dir=s3_url)
        server = await server_factory(handler.register_server_handlers)
        client = await client_factory(server)
        store = handler.backend.store  # type: ignore[attr-defined]
        assert isinstance(store, S3Store)
        real_complete = store.client.complete_multipart_upload
        aborted = 0

        def aborted_first(**request: Any) -> Any:
            nonlocal aborted
            if aborted == 0:
                aborted += 1
                store.client.abort_multipart_upload(
                    Bucket=request["Bucket"], Key=request["Key"], UploadId=request["UploadId"]
                )
            return real_complete(**request)

        store.client.complete_multipart_upload = aborted_first
        source = tmp_path / "big.bin"
        data = os.urandom(12 * MiB)
        source.write_bytes(data)
        failed = await handler.send_to_server(client, source)
        assert failed["success"] is False and failed["code"] == "storage_error", failed
        again = await handler.send_to_server(client, source)
        assert again["success"] is True, again
        assert again["resumed_from"] == 0, again
        assert await _read_all(store, "big.bin") == data


async def test_a_published_file_takes_its_owners_partials_of_older_versions_with_it(
    two_nodes: Callable[..., tuple[StoreBackend, StoreBackend]],
) -> None:
    """As on a local disk: a partial a cut upload of an older version left
    (its key names that version) goes when its owner publishes the file, and
    one whose begin is answered ``already_there`` goes with that answer;
    another owner's stays. Until 2026-12-07 they stayed for partial_ttl."""
    with trio.fail_after(120):
        a, _b = two_nodes()
        store = a.store
        assert isinstance(store, S3Store)
        await _left_on(a, "r.bin", os.urandom(2 * PART), "K1", parts=1)
        elsewhere = _peer("c2")
        elsewhere.address = ("10.0.0.2", 40000)  # another host: another owner
        admitted = await a.admit(elsewhere, "s.bin", 2 * PART, "K9", restart=False)
        await _sink(admitted).write([os.urandom(PART)])
        await _sink(admitted).close()
        await a.release(admitted)  # another owner's, of another name
        assert len(_keys(store, "uploads")) == 2
        new = os.urandom(PART + 5)
        admitted = await a.admit(_peer("c1"), "r.bin", len(new), "K2", restart=False)
        assert await _finish(admitted, new, [new]) == "r.bin"
        await a.release(admitted)
        assert len(_keys(store, "uploads")) == 1  # only c2's is left
        await _left_on(a, "t.bin", os.urandom(2 * PART), "K3", parts=1)
        assert len(_keys(store, "uploads")) == 2
        await a.forget_partial(_peer("c1"), "t.bin", "K3")
        await a.forget_partial(_peer("c1"), "s.bin", "K9")  # the other owner's: stays
    uploads = store.client.list_multipart_uploads(
        Bucket=store.bucket, Prefix=store.location.list_prefix
    ).get("Uploads", [])
    assert [u["Key"] for u in uploads] == [store.location.key("s.bin")]
