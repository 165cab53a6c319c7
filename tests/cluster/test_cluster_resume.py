"""A client that loses its node and reconnects to another keeps its id; progress across nodes.

Node processes on one SeaweedFS and one Valkey (see :mod:`node_processes`);
the roaming client reaches them through a :class:`CuttingProxy`, our stand-in
for a TCP load balancer: the test points the proxy at another node, then
cuts the client's connection (or kills its node), and the client's automatic
reconnect lands on the other node with its resume token.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import socket
from pathlib import Path
from typing import Any, TypedDict

import pytest
import redis
import trio

from cluster.node_processes import Receiver, engine_nodes, random_file, receiver
from conduit import Client, ClientDescriptor, ConnectionClosed, Server, ServerDescriptor
from conduit._resume import token_digest
from conduit.cluster._node import ClusterNode, _tag
from conduit.cluster.bus import _DEPARTED as DEPARTED
from conftest import served, wait_until
from cutting_proxy import CuttingProxy

#: Short, so a killed node's entries expire within the test, with room for a loaded machine.
TTL = 1.5
#: Large enough for several progress reports (at most ten a second) on the delivering node.
LARGE = 24 * 1024 * 1024 + 4321


class Roaming(TypedDict):
    """The roaming client's reconnect settings, passed as keywords."""

    reconnect_delay: float
    reconnect_delay_max: float
    reconnect_attempts: int


#: Reconnect at once: the test waits for it.
ROAMING: Roaming = {"reconnect_delay": 0.05, "reconnect_delay_max": 0.5, "reconnect_attempts": 20}


def _bus(engines: Any) -> redis.Redis:
    return redis.Redis.from_url(engines.bus.url)


def _registered_node(engines: Any, namespace: str, client_id: str) -> str | None:
    with contextlib.closing(_bus(engines)) as connection:
        value = connection.get(f"{namespace}:client:{client_id}")
    if value is None:
        return None
    assert isinstance(value, bytes)  # not decode_responses: replies are bytes
    return value.decode()


def _bus_contents(engines: Any, namespace: str) -> list[bytes]:
    """Every key of the namespace, and the value of every string key."""
    found: list[bytes] = []
    with contextlib.closing(_bus(engines)) as connection:
        for key in connection.scan_iter(match=f"{namespace}:*"):
            found.append(key)
            if connection.type(key) == b"string":
                value = connection.get(key) or b""
                assert isinstance(value, bytes)  # not decode_responses: replies are bytes
                found.append(value)
    return found


def _solo_server(engines: Any, namespace: str, **fields: Any) -> Server:
    """An in-process server, node "solo" of the test's cluster (password "secret")."""
    return Server(
        ServerDescriptor(
            password="secret",
            host="127.0.0.1",
            port=0,
            cluster_url=engines.bus.url,
            cluster_namespace=namespace,
            node_name="solo",
            cluster_ttl=TTL,
            **fields,
        )
    )


async def _reconnected(roamer: Receiver, cut: Any) -> None:
    """Run ``cut()`` and wait (bounded) for the client's automatic reconnect."""
    back = trio.Event()
    roamer.client.on_reconnect(back.set)
    cut()
    with trio.fail_after(30):
        await back.wait()


async def test_client_keeps_its_id_on_another_node_after_a_cut(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    large = random_file(tmp_path / "large.bin", LARGE)
    async with (
        engine_nodes(
            engines, bus_namespace, tmp_path, ["a", "b"], ttl=TTL, staging=s3_url
        ) as nodes,
        receiver(nodes["a"].port, tmp_path / "inbox-a") as control,
    ):
        with CuttingProxy(nodes["a"].port) as proxy:
            async with receiver(
                proxy.port, tmp_path / "inbox-roamer", events=["news"], **ROAMING
            ) as roamer:
                old_id = roamer.id
                assert _registered_node(engines, bus_namespace, old_id) == "a"
                first_token = roamer.client._resume_token
                # The bus has the token only as its SHA-256.
                contents = _bus_contents(engines, bus_namespace)
                first_key = f"{bus_namespace}:resume:{hashlib.sha256(first_token).hexdigest()}"
                assert first_key.encode() in contents
                assert not [item for item in contents if first_token in item]
                assert not [item for item in contents if first_token.hex().encode() in item]

                # The balancer now sends new connections to B; the client's
                # connection is lost without A noticing (A would only at its
                # heartbeat timeout, 45 s): A keeps a stale connection.
                proxy.target_port = nodes["b"].port
                await _reconnected(roamer, lambda: proxy.legs[0].strand())

                assert roamer.id == old_id
                assert await roamer.client.call("whoami") == {"node": "b", "client_id": old_id}
                assert _registered_node(engines, bus_namespace, old_id) == "b"
                # The token A issued is spent once B has heard from the client
                # (it pings at once; see the test of the cut handshake below);
                # B's new one is shared, hashed, instead.
                await wait_until(
                    lambda: first_key.encode() not in _bus_contents(engines, bus_namespace)
                )
                contents = _bus_contents(engines, bus_namespace)
                new_token = roamer.client._resume_token
                assert new_token != first_token
                new_key = f"{bus_namespace}:resume:{hashlib.sha256(new_token).hexdigest()}"
                assert new_key.encode() in contents

                # A push from A, addressed by id, reaches the client on B (B told
                # A to drop its stale connection: A would otherwise push into
                # it), with B's progress reported to A.
                with trio.fail_after(120):
                    pushed = await control.client.call(
                        "push_progress", client_id=old_id, path=str(large), name="l.bin"
                    )
                result, reports = pushed["result"], pushed["reports"]
                assert result["success"] is True, result
                assert (roamer.inbox / "l.bin").read_bytes() == large.read_bytes()
                assert reports, "no progress reached the pushing node"
                assert [r["direction"] for r in reports] == ["push"] * len(reports)
                assert {r["filename"] for r in reports} == {"l.bin"}
                assert reports[-1]["transferred"] == reports[-1]["total_size"] == LARGE
                sent = [r["transferred"] for r in reports]
                assert sent == sorted(sent)
                # Throttled where it is produced: one per 0.1 s of B's clock, plus the last.
                assert len(reports) <= reports[-1]["elapsed"] / 0.1 + 2

                # A broadcast from A reaches it once, on B.
                await control.client.call("broadcast", event="news", data={"n": 1})
                with trio.fail_after(15):
                    await roamer.wait_messages(1)
                assert roamer.messages == [("news", {"n": 1})]

                # A has let go of the id for good: its cleanup of the stale
                # connection and its heartbeats (a few TTLs of them) leave B's
                # registration alone.
                await trio.sleep(2 * TTL)
                assert _registered_node(engines, bus_namespace, old_id) == "b"


async def test_a_push_in_flight_follows_its_client_to_another_node(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    large = random_file(tmp_path / "large.bin", LARGE)
    # Bound, not listening: the client's reconnects are refused until we say.
    nowhere = socket.socket()
    nowhere.bind(("127.0.0.1", 0))
    async with (
        engine_nodes(
            engines, bus_namespace, tmp_path, ["a", "b"], ttl=TTL, staging=s3_url
        ) as nodes,
        receiver(nodes["a"].port, tmp_path / "inbox-a") as control,
    ):
        with nowhere, CuttingProxy(nodes["a"].port) as proxy:
            async with receiver(proxy.port, tmp_path / "inbox-roamer", **ROAMING) as roamer:
                client_id = roamer.id
                # The client's connection is lost without A noticing, and the
                # client cannot come back yet: A still sees it connected.
                proxy.target_port = nowhere.getsockname()[1]
                proxy.legs[0].strand()
                outcome: dict[str, Any] = {}

                async def push() -> None:
                    outcome.update(
                        await control.client.call(
                            "push", client_id=client_id, path=str(large), name="f.bin"
                        )
                    )

                with trio.fail_after(60):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(push)
                        # Sequencing only: give A the time to start the push into
                        # the dead connection (if it has not, it takes the direct
                        # cross-node path below, and the test still holds).
                        await trio.sleep(1.0)
                        proxy.target_port = nodes["b"].port
                back = outcome
                assert back["success"] is True, back
                assert roamer.id == client_id
                assert _registered_node(engines, bus_namespace, client_id) == "b"
                assert (roamer.inbox / "f.bin").read_bytes() == large.read_bytes()


async def test_client_of_a_killed_node_resumes_elsewhere_and_others_are_unreachable(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    small = random_file(tmp_path / "small.bin", 50_000)
    async with (
        engine_nodes(
            engines, bus_namespace, tmp_path, ["a", "b", "c"], ttl=TTL, staging=s3_url
        ) as nodes,
        receiver(nodes["c"].port, tmp_path / "inbox-c") as control,
        receiver(nodes["a"].port, tmp_path / "inbox-stranded", reconnect_enabled=False) as stranded,
    ):
        with CuttingProxy(nodes["a"].port) as proxy:
            async with receiver(proxy.port, tmp_path / "inbox-roamer", **ROAMING) as roamer:
                old_id = roamer.id
                assert _registered_node(engines, bus_namespace, old_id) == "a"
                proxy.target_port = nodes["b"].port

                def kill_a() -> None:
                    nodes["a"].kill()

                # A dies without a goodbye: its registrations are still there
                # (for up to a TTL) when the client comes back through B.
                await _reconnected(roamer, kill_a)
                with trio.fail_after(10):
                    await nodes["a"].process.wait()
                assert roamer.id == old_id
                assert await roamer.client.call("whoami") == {"node": "b", "client_id": old_id}
                assert _registered_node(engines, bus_namespace, old_id) == "b"

                # C pushes to the id: B delivers it.
                with trio.fail_after(60):
                    result = await control.client.call(
                        "push", client_id=old_id, path=str(small), name="s.bin"
                    )
                assert result["success"] is True, result
                assert (roamer.inbox / "s.bin").read_bytes() == small.read_bytes()

                # A client that stayed with A is reported unreachable: a clear
                # failure within 30 s, not a hang; then forgotten.
                with trio.fail_after(30):
                    lost = await control.client.call(
                        "push", client_id=stranded.id, path=str(small), name="s.bin"
                    )
                assert lost["success"] is False
                assert lost["code"] in ("unreachable", "connection_closed"), lost
                with trio.fail_after(30):
                    while _registered_node(engines, bus_namespace, stranded.id) is not None:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                assert _registered_node(engines, bus_namespace, old_id) == "b"


async def test_client_of_a_node_stopped_cleanly_comes_back_through_another_with_its_id(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    """A node's clean stop (a restart, a scale-down) says goodbye as going
    away: its clients reconnect through the balancer to another node and
    keep their ids, as when a node dies. Before, that goodbye kept them away."""
    async with engine_nodes(
        engines, bus_namespace, tmp_path, ["a", "b"], ttl=TTL, staging=s3_url
    ) as nodes:
        with CuttingProxy(nodes["a"].port) as proxy:
            async with receiver(proxy.port, tmp_path / "inbox-roamer", **ROAMING) as roamer:
                old_id = roamer.id
                assert _registered_node(engines, bus_namespace, old_id) == "a"
                proxy.target_port = nodes["b"].port
                back = trio.Event()
                roamer.client.on_reconnect(back.set)
                with trio.fail_after(30):
                    await nodes["a"].stop()
                    await back.wait()
                assert nodes["a"].process.returncode == 0
                assert roamer.id == old_id
                assert await roamer.client.call("whoami") == {"node": "b", "client_id": old_id}
                assert _registered_node(engines, bus_namespace, old_id) == "b"


async def test_the_bus_counts_each_token_against_its_clients_address(
    engines: Any, bus_namespace: str, nursery: trio.Nursery
) -> None:
    # With a shared password a token counts against the address its client
    # came from (by a hash, as names are), as in the local table: the bus
    # bounds the tokens of each (RESUME_ENTRIES_PER_OWNER).
    server = _solo_server(engines, bus_namespace)
    await nursery.start(server.run)
    clients = []
    for source in ("127.0.0.1", "127.0.0.1", "127.0.0.2"):
        client = Client(
            ClientDescriptor(server_host="127.0.0.1", server_port=server.port, password="secret")
        )
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port, local_address=source)
            await client.connect(stream=stream)
        clients.append(client)

    def tokens_of(address: str) -> int:
        group = _tag(b"conduit-owner", address)
        with contextlib.closing(_bus(engines)) as connection:
            return int(connection.zcard(f"{bus_namespace}:resumes:{group}"))

    assert (tokens_of("127.0.0.1"), tokens_of("127.0.0.2")) == (2, 1)
    for client in clients:
        await client.disconnect()
    await server.close()


async def test_a_resume_at_a_full_share_in_a_cluster_is_refused_before_it_moves_the_id(
    engines: Any, bus_namespace: str, nursery: trio.Nursery
) -> None:
    # In a cluster, redeeming a token moves the client's id to this node, which
    # closes its connection on the node it is on: a resume the share refuses
    # must not get that far. (On a single server it may replace its own stale
    # connection; a node does not tell its stale ones apart.)
    server = _solo_server(engines, bus_namespace, max_connections_per_user=1)
    await nursery.start(server.run)
    descriptor = ClientDescriptor(
        server_host="127.0.0.1", server_port=server.port, password="secret", reconnect_enabled=False
    )
    holder = Client(descriptor)
    await holder.connect()
    other = Client(descriptor)
    other._resume_token = holder._resume_token
    with trio.fail_after(10), pytest.raises(ConnectionClosed, match="already holds all"):
        await other.connect()
    assert holder.connected and holder.id in server.clients
    assert _registered_node(engines, bus_namespace, holder.id or "") == "solo"
    await holder.disconnect()
    await server.close()


async def _node_with_a_shared_token(
    engines: Any, namespace: str, nursery: trio.Nursery
) -> tuple[Server, ClusterNode, str, bytes]:
    """Node "solo", serving, and a client id it holds with a resume token
    (user "alice") shared on the bus."""
    server = _solo_server(engines, namespace)
    await nursery.start(server.run)
    node = server.cluster
    assert node is not None
    client_id = await node.new_client_id()
    token = secrets.token_bytes(32)
    await node.share_resume_token(token, client_id, "alice", "alice")
    return server, node, client_id, token


async def test_overlapping_connections_of_one_client_on_one_node(
    engines: Any, bus_namespace: str, nursery: trio.Nursery
) -> None:
    # The race the counting closes: a client reconnects here while its stale
    # connection is still ending. Whichever ends first, the id stays registered
    # until the last connection holding it is gone.
    server, node, client_id, token = await _node_with_a_shared_token(
        engines, bus_namespace, nursery
    )
    assert await node.resume_client_id(token, "bob") is None  # another account's try
    assert await node.resume_client_id(token, "alice") == client_id  # the reconnect
    await node.spend_resume_token(token_digest(token))  # its session heard from the client
    assert await node.resume_client_id(token, "alice") is None  # good once
    await node.release_client_id(client_id)  # the stale connection ends first
    assert _registered_node(engines, bus_namespace, client_id) == "solo"
    await node.release_client_id(client_id)  # then the reconnect's
    assert _registered_node(engines, bus_namespace, client_id) == DEPARTED + "solo"
    assert await node.bus.locate_client(client_id) is None
    await server.close()


async def test_a_token_forgotten_while_a_stale_connection_holds_the_id_stays_spent(
    engines: Any, bus_namespace: str, nursery: trio.Nursery
) -> None:
    """The reconnect's session ends first, its client saying goodbye for good,
    while the stale connection still holds the id (its end waited on past
    its hooks' time): the token the client forgot is spent at once, and the
    stale connection's end does not make it good again for an hour (a review
    found it did, once the first release left it alone)."""
    server, node, client_id, token = await _node_with_a_shared_token(
        engines, bus_namespace, nursery
    )
    assert await node.resume_client_id(token, "alice") == client_id  # the reconnect
    following = secrets.token_bytes(32)  # its WELCOME's
    await node.share_resume_token(following, client_id, "alice", "alice")
    await node.spend_resume_token(token_digest(token))  # its session heard from the client
    key = f"{bus_namespace}:resume:{token_digest(following).hex()}"
    with contextlib.closing(_bus(engines)) as connection:
        assert connection.exists(key)
        await node.release_client_id(client_id, forgotten_token=token_digest(following))
        assert not connection.exists(key)
        await node.release_client_id(client_id)  # the stale connection ends, lost
        assert not connection.exists(key)
        assert _registered_node(engines, bus_namespace, client_id) == DEPARTED + "solo"
    await server.close()


async def test_a_resume_whose_handshake_ends_mid_claim_leaves_no_id_registered(
    engines: Any, bus_namespace: str, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconnect's handshake runs out of time (its ``auth_timeout``) while
    the node, having moved the client's id here, tells the node it came
    from: the id must not stay registered here, refreshed for ever with no
    connection to release it (an authenticated client could pile them up)."""
    server, node, client_id, token = await _node_with_a_shared_token(
        engines, bus_namespace, nursery
    )
    await node.release_client_id(client_id)  # its connection ended
    # Since then it resumed on node "b", which holds its entry now.
    with contextlib.closing(_bus(engines)) as connection:
        connection.set(f"{bus_namespace}:client:{client_id}", "b", px=int(TTL * 1000))

    async def the_bus_is_slow(*_: Any) -> None:
        await trio.sleep_forever()  # the notice to "b" waits for the bus

    monkeypatch.setattr(node.bus, "tell", the_bus_is_slow)
    with trio.move_on_after(0.5) as deadline:  # the handshake's deadline
        await node.resume_client_id(token, "alice")
    assert deadline.cancelled_caught
    # Moved here, then let go: marked departed, and no longer refreshed.
    await trio.sleep(3 * TTL)
    assert _registered_node(engines, bus_namespace, client_id) != "solo"
    await server.close()


async def test_a_moved_notice_that_crossed_a_claim_here_keeps_the_id(
    engines: Any, bus_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node A is told that client X resumed on node B, and while A looks X up on
    the bus (and is answered B), X resumes on A again. The notice is out of date:
    A must keep refreshing X's entry (else it expires while X is connected to A)
    and must not route X's pushes to B."""
    server = Server(
        ServerDescriptor(
            host="127.0.0.1",
            port=0,
            password="a password for the test",
            cluster_url=engines.bus.url,
            cluster_namespace=bus_namespace,
            node_name="a",
            cluster_ttl=TTL,
        )
    )
    node = server.cluster
    assert node is not None
    client_id = "roaming-" + secrets.token_hex(4)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await node.claim_client_id(client_id)
            # X resumes on node B: B owns the entry now and tells A.
            with contextlib.closing(_bus(engines)) as connection:
                connection.set(f"{bus_namespace}:client:{client_id}", "b", px=int(TTL * 1000))
            real_locate = node.bus.locate_client

            async def locate_then_come_back(wanted: str) -> str | None:
                answer = await real_locate(wanted)  # "b": read before the claim below
                await node.claim_client_id(client_id)  # X resumes on A again
                return answer

            with monkeypatch.context() as patch:
                patch.setattr(node.bus, "locate_client", locate_then_come_back)
                await node._client_moved({"client_id": client_id}, "b")

            assert node.moved_away(client_id) is None
            # Still refreshed by A: the entry outlives several TTLs.
            await trio.sleep(3 * TTL)
            assert _registered_node(engines, bus_namespace, client_id) == "a"
            await server.close()


async def test_a_reconnect_cut_inside_its_handshake_keeps_the_client_id_in_a_cluster(
    engines: Any, bus_namespace: str, nursery: trio.Nursery
) -> None:
    """As on a single server (``tests/test_reconnect.py``): the connection
    drops, the reconnect that follows is cut just before the last byte of its
    WELCOME, after the node has redeemed the client's token on the bus, and
    the next one goes through. The client keeps its id: the bus holds a
    redeemed token until the session that redeemed it hears from its client
    (before, it was consumed at once, and the client came back under a new
    id). The reconnected client pings at once, and from then on the token is
    spent: replayed, it gives a new id."""
    quiet: dict[str, Any] = {"heartbeat_interval": 60.0, "heartbeat_timeout": 120.0}
    server = _solo_server(engines, bus_namespace, **quiet)

    def client(port: int, **fields: Any) -> Client:
        return Client(
            ClientDescriptor(
                server_host="127.0.0.1",
                server_port=port,
                password="secret",
                connect_timeout=5.0,
                reconnect_delay=0.05,
                reconnect_delay_max=0.5,
                **fields,
            )
        )

    port = await nursery.start(server.run)
    with CuttingProxy(port) as measure:  # what a whole handshake sends the client
        first = client(measure.port)
        await first.connect()
        handshake = measure.legs[0].s2c
        await first.disconnect()
    with CuttingProxy(port, cut_after=("s2c", handshake - 1), cut_leg=1) as proxy:
        roamer = client(proxy.port, **quiet)
        back = trio.Event()
        roamer.on_reconnect(back.set)
        await roamer.connect()
        client_id = roamer.id
        assert client_id is not None
        presented = roamer._resume_token
        held_key = f"{bus_namespace}:resume:{token_digest(presented).hex()}".encode()
        await served(server, roamer)
        proxy.legs[0].close()
        with trio.fail_after(20):
            await back.wait()
        assert proxy.was_cut and proxy.accepted == 3
        assert roamer.id == client_id
        assert _registered_node(engines, bus_namespace, client_id) == "solo"
        await served(server, roamer)
        session = server.clients[client_id]
        await wait_until(lambda: session.connection.heard_from_peer, timeout=10)
        await wait_until(lambda: held_key not in _bus_contents(engines, bus_namespace))
        stranger = client(port)
        stranger._resume_token = presented
        await stranger.connect()
        assert stranger.id != client_id and roamer.connected
        await stranger.disconnect()
        await roamer.disconnect()
    await server.close()
