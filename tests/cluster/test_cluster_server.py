"""Servers in a cluster: node processes on one SeaweedFS and one Valkey, real sockets.

Each node is a ``conduit_node.py`` process (see :mod:`node_processes`); the
test process connects clients to them and drives them through RPC. What is
checked: a push issued on one node reaches a client of another, byte for
byte; a broadcast reaches the clients of every node; client ids are
registered cluster-wide (and released); a killed node's clients are reported
unreachable, not waited for.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import redis
import trio

from cluster.node_processes import Receiver, engine_nodes, random_file, receiver
from conduit._resume import token_digest

#: Short, to see a killed node forgotten quickly, with room for a loaded machine.
TTL = 1.5
#: A file large enough to stream in chunks (not the one-call small-file path).
LARGE = 3 * 1024 * 1024 + 12_345


def _registered_node(engines: Any, namespace: str, client_id: str) -> str | None:
    connection = redis.Redis.from_url(engines.bus.url)
    try:
        value = connection.get(f"{namespace}:client:{client_id}")
    finally:
        connection.close()
    if value is None:
        return None
    assert isinstance(value, bytes)  # not decode_responses: replies are bytes
    return value.decode()


async def _wait_unregistered(engines: Any, namespace: str, client_id: str) -> None:
    # Polled: the registry lives in another process's Redis, with no event to wait on.
    with trio.fail_after(15):
        while _registered_node(engines, namespace, client_id) is not None:  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_push_broadcast_and_ids_across_three_nodes(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    large = random_file(tmp_path / "large.bin", LARGE)
    small = random_file(tmp_path / "small.bin", 10_000)
    async with (
        engine_nodes(
            engines, bus_namespace, tmp_path, ["a", "b", "c"], ttl=TTL, staging=s3_url
        ) as nodes,
        contextlib.AsyncExitStack() as stack,
    ):
        on: dict[str, Receiver] = {}
        for name, node in nodes.items():
            on[name] = await stack.enter_async_context(
                receiver(node.port, tmp_path / f"inbox-{name}", events=["news"])
            )
        control = on["a"].client

        # Client ids: each registered to its own node, distinct across nodes.
        ids = {name: found.id for name, found in on.items()}
        assert len(set(ids.values())) == 3
        for name, found in on.items():
            identity = await found.client.call("whoami")
            assert identity == {"node": name, "client_id": found.id}
            assert _registered_node(engines, bus_namespace, found.id) == name

        # A push issued on A reaches clients of B and C, byte for byte, and of A itself.
        with trio.fail_after(60):
            to_b = await control.call("push", client_id=ids["b"], path=str(large), name="l.bin")
            to_c = await control.call("push", client_id=ids["c"], path=str(small), name="s.bin")
            to_a = await control.call("push", client_id=ids["a"], path=str(small), name="s.bin")
        for result in (to_b, to_c, to_a):
            assert result["success"] is True, result
        assert to_b["checksum"] == hashlib.sha256(large.read_bytes()).hexdigest()
        assert (on["b"].inbox / "l.bin").read_bytes() == large.read_bytes()
        assert (on["c"].inbox / "s.bin").read_bytes() == small.read_bytes()
        assert (on["a"].inbox / "s.bin").read_bytes() == small.read_bytes()

        # A broadcast from A reaches the clients of A, B and C.
        sent_locally = await control.call("broadcast", event="news", data={"n": 1})
        assert sent_locally == 1  # A's own client; the others are other nodes' count
        with trio.fail_after(15):
            for found in on.values():
                await found.wait_messages(1)
        for found in on.values():
            assert found.messages == [("news", {"n": 1})]
        # ... and skips the excluded clients of other nodes: C sees the third
        # broadcast but not the second (one stream, delivered in order).
        await control.call("broadcast", event="news", data={"n": 2}, exclude=[ids["c"]])
        await control.call("broadcast", event="news", data={"n": 3})
        with trio.fail_after(15):
            await on["c"].wait_messages(2)
        assert on["c"].messages == [("news", {"n": 1}), ("news", {"n": 3})]

        # A client that leaves gives its id back at once.
        await on["b"].client.disconnect()
        await _wait_unregistered(engines, bus_namespace, ids["b"])
        gone = await control.call("push", client_id=ids["b"], path=str(small), name="x.bin")
        assert gone["success"] is False
        assert gone["code"] == "connection_closed"


async def test_killed_node_clients_are_unreachable(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    small = random_file(tmp_path / "small.bin", 10_000)
    async with (
        engine_nodes(
            engines, bus_namespace, tmp_path, ["a", "b"], ttl=TTL, staging=s3_url
        ) as nodes,
        receiver(nodes["a"].port, tmp_path / "inbox-a") as control,
        receiver(nodes["b"].port, tmp_path / "inbox-b") as doomed,
    ):
        assert _registered_node(engines, bus_namespace, doomed.id) == "b"
        nodes["b"].kill()
        with trio.fail_after(10):
            await nodes["b"].process.wait()
        # Issued at once, while the cluster still has B: answered, not hung,
        # within 30 s (in about one TTL).
        with trio.fail_after(30):
            result = await control.client.call(
                "push", client_id=doomed.id, path=str(small), name="s.bin"
            )
        assert result["success"] is False
        assert result["code"] in ("unreachable", "connection_closed"), result
        # B is forgotten with its clients; a push now is refused up front.
        await _wait_unregistered(engines, bus_namespace, doomed.id)
        with trio.fail_after(30):
            later = await control.client.call(
                "push", client_id=doomed.id, path=str(small), name="s.bin"
            )
        assert later["code"] == "connection_closed"
        assert not list((tmp_path / "inbox-b").glob("*.bin"))


async def test_push_to_another_node_needs_staging(
    engines: Any, bus_namespace: str, tmp_path: Path
) -> None:
    small = random_file(tmp_path / "small.bin", 10_000)
    async with (
        engine_nodes(engines, bus_namespace, tmp_path, ["a", "b"], ttl=TTL, staging=None) as nodes,
        receiver(nodes["a"].port, tmp_path / "inbox-a") as control,
        receiver(nodes["b"].port, tmp_path / "inbox-b") as target,
    ):
        with trio.fail_after(30):
            result = await control.client.call(
                "push", client_id=target.id, path=str(small), name="s.bin"
            )
        assert result == {"success": False, "error": result["error"], "code": "no_staging"}
        assert "cluster_staging" in result["error"]
        # Broadcasts and ids need no store.
        assert _registered_node(engines, bus_namespace, target.id) == "b"


def _resume_entry_exists(engines: Any, namespace: str, token: bytes) -> bool:
    """Whether the bus has the token's entry, or its digest in an owner's bound."""
    connection = redis.Redis.from_url(engines.bus.url)
    digest = token_digest(token).hex()
    try:
        if connection.exists(f"{namespace}:resume:{digest}"):
            return True
        bounds = connection.scan_iter(match=f"{namespace}:resumes:*", count=1000)
        return any(connection.zscore(bound, digest) is not None for bound in bounds)
    finally:
        connection.close()


async def test_a_client_that_says_goodbye_leaves_no_resume_entry_on_the_bus(
    engines: Any, bus_namespace: str, tmp_path: Path
) -> None:
    """Its node spends the bus's copy of its token once it has its GOODBYE for
    good (the client forgot it: until 2026-12-08 the entry stayed for an
    hour), and the token leaves its owner's bound (its member stayed there
    until the bound's own expiry); so does a token redeemed by a resume once
    the session heard from its client. A client whose link is lost keeps its
    entry, to resume anywhere."""
    async with (
        engine_nodes(engines, bus_namespace, tmp_path, ["a"], ttl=TTL, staging=None) as nodes,
        receiver(nodes["a"].port, tmp_path / "inbox-1", reconnect_enabled=False) as leaving,
        receiver(nodes["a"].port, tmp_path / "inbox-2", reconnect_enabled=False) as lost,
        receiver(nodes["a"].port, tmp_path / "inbox-3", reconnect_delay=0.1) as resuming,
    ):
        leaving_token, lost_token = leaving.client._resume_token, lost.client._resume_token
        assert _resume_entry_exists(engines, bus_namespace, leaving_token)
        assert _resume_entry_exists(engines, bus_namespace, lost_token)
        lost_id = lost.id
        await leaving.client.disconnect()
        assert lost.client._peer is not None
        lost.client._peer.connection.abort("the link is lost")  # no goodbye
        await _wait_unregistered(engines, bus_namespace, lost_id)
        with trio.fail_after(15):
            while _resume_entry_exists(engines, bus_namespace, leaving_token):  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert _resume_entry_exists(engines, bus_namespace, lost_token)
        # A resume: the redeemed token goes once the session hears from the
        # client, and the next one with its goodbye.
        redeemed, resuming_id = resuming.client._resume_token, resuming.id
        assert resuming.client._peer is not None
        resuming.client._peer.connection.abort("the link is lost")
        with trio.fail_after(15):
            while resuming.client._resume_token == redeemed:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert resuming.id == resuming_id  # resumed, not a new session
        with trio.fail_after(15):
            while _resume_entry_exists(engines, bus_namespace, redeemed):  # noqa: ASYNC110
                await trio.sleep(0.05)
        last = resuming.client._resume_token
        assert _resume_entry_exists(engines, bus_namespace, last)
        await resuming.client.disconnect()
        with trio.fail_after(15):
            while _resume_entry_exists(engines, bus_namespace, last):  # noqa: ASYNC110
                await trio.sleep(0.05)


async def test_a_cross_node_push_its_caller_stops_is_not_delivered(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    """``on_progress`` raising stops a push to a client of another node too,
    as it stops a local one: node A tells node B to stop serving the request,
    B cancels its local push, and the client keeps only a partial (for a
    resume), never the whole file published. Before, B went on and delivered
    it seconds after A's caller had stopped it."""
    big = random_file(tmp_path / "big.bin", 256 * 1024 * 1024)
    async with (
        engine_nodes(
            engines, bus_namespace, tmp_path, ["a", "b"], ttl=TTL, staging=s3_url
        ) as nodes,
        receiver(nodes["a"].port, tmp_path / "inbox-a") as control,
        receiver(nodes["b"].port, tmp_path / "inbox-b") as target,
    ):
        with trio.fail_after(120):
            outcome = await control.client.call(
                "push_stopped", client_id=target.id, path=str(big), name="big.bin", timeout=120
            )
        assert outcome == {"stopped": True}
        # Until the client's inbox has stopped changing for 2 s (B went on
        # to publish the whole file within 8 s when it did not stop).
        published = target.inbox / "big.bin"
        with trio.fail_after(60):
            last, still = -1, 0
            while still < 4 and not published.exists():
                await trio.sleep(0.5)
                now = sum(p.stat().st_size for p in target.inbox.rglob("*") if p.is_file())
                still, last = (still + 1 if now == last else 0), now
        assert not published.exists()
        # B serves on: a push that is not stopped goes through.
        small = random_file(tmp_path / "small.bin", LARGE)
        with trio.fail_after(60):
            result = await control.client.call(
                "push", client_id=target.id, path=str(small), name="small.bin"
            )
        assert result["success"] is True, result
        assert (target.inbox / "small.bin").read_bytes() == small.read_bytes()
