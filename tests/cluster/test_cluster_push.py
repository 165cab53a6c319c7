"""A push to a client of another node goes out as a local push does.

In-process nodes on one SeaweedFS and one Valkey, the files stored in
S3 (which is where pushes between nodes are staged). Node A pushes to a
client connected to node B: B delivers it with the transfer handler's own
local push, so the push waits its turn among the client's transfers, and a
client whose connection drops and comes back (to B) gets the push resumed,
as a push issued on B itself would. Found by a review of the cluster mode:
B sent with the bare sender, so the second and third of three pushes at
once to a client taking one transfer at a time were refused
``overloaded``, and a push whose client's connection dropped failed
``connection_closed`` although the client was back within a second. A
push follows its client to the node it resumes its session on, also when
the node pushing saw the connection end first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from conduit import Client, ClientDescriptor, FileTransferHandler, Server, ServerDescriptor
from cutting_proxy import CuttingProxy

PASSWORD = "push between nodes"
MiB = 1024 * 1024


def _node(
    engines: Any, namespace: str, name: str, s3_url: str
) -> tuple[Server, FileTransferHandler]:
    server = Server(
        ServerDescriptor(
            host="127.0.0.1",
            port=0,
            password=PASSWORD,
            cluster_url=engines.bus.url,
            cluster_namespace=namespace,
            node_name=name,
            cluster_ttl=1.5,
        )
    )
    handler = FileTransferHandler(storage_dir=s3_url)
    handler.register_server_handlers(server)
    return server, handler


@contextlib.asynccontextmanager
async def _nodes(
    engines: Any, namespace: str, s3_url: str, names: str = "ab"
) -> AsyncIterator[list[tuple[Server, FileTransferHandler]]]:
    """Nodes named by the letters of ``names``, each with its transfer handler, running."""
    nodes = [_node(engines, namespace, name, s3_url) for name in names]
    async with trio.open_nursery() as nursery:
        for server, _ in nodes:
            await nursery.start(server.run)
        try:
            yield nodes
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                for server, _ in nodes:
                    await server.close()


def _client(port: int, inbox: Path, **fields: Any) -> tuple[Client, FileTransferHandler]:
    client = Client(
        ClientDescriptor(
            server_host="127.0.0.1",
            server_port=port,
            password=PASSWORD,
            reconnect_delay=0.05,
            reconnect_delay_max=0.5,
            reconnect_attempts=20,
        )
    )
    handler = FileTransferHandler(storage_dir=inbox, **fields)
    handler.register_client_handlers(client)
    return client, handler


@pytest.mark.usefixtures("aws_environment")
async def test_pushes_from_another_node_wait_their_turn(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    files = []
    for index in range(3):
        path = tmp_path / f"source-{index}.bin"
        path.write_bytes(os.urandom(2 * MiB + index))
        files.append(path)
    async with _nodes(engines, bus_namespace, s3_url) as ((a, pushing), (b, _)):
        client, _ = _client(b.port, tmp_path / "inbox", max_transfers_per_connection=1)
        async with client:
            assert client.id is not None
            results: dict[int, dict[str, Any]] = {}

            async def push(index: int) -> None:
                results[index] = await pushing.send_to_client(
                    a, client.id or "", files[index], remote_name=f"f{index}.bin"
                )

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    for index in range(3):
                        nursery.start_soon(push, index)
        for index in range(3):
            assert results[index]["success"] is True, results[index]
            assert (tmp_path / "inbox" / f"f{index}.bin").read_bytes() == files[index].read_bytes()


@pytest.mark.usefixtures("aws_environment")
async def test_a_push_from_another_node_resumes_when_its_client_comes_back(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    source = tmp_path / "large.bin"
    source.write_bytes(os.urandom(24 * MiB + 4321))
    async with _nodes(engines, bus_namespace, s3_url) as ((a, pushing), (b, _)):
        with CuttingProxy(b.port, cut_after=("s2c", 8 * MiB)) as proxy:
            client, _ = _client(proxy.port, tmp_path / "inbox")
            async with client:
                client_id = client.id
                assert client_id is not None
                with trio.fail_after(120):
                    result = await pushing.send_to_client(a, client_id, source, remote_name="f.bin")
                assert proxy.was_cut
                assert client.id == client_id
        assert result["success"] is True, result
        assert result["checksum"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert (tmp_path / "inbox" / "f.bin").read_bytes() == source.read_bytes()


@pytest.mark.usefixtures("aws_environment")
async def test_a_push_waiting_for_its_client_follows_it_when_its_node_saw_the_drop(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    """A pushes to its own client; mid-push the client's connection is reset
    (A sees it end) and the client resumes its session on B. A's push, waiting
    for the client to come back, hears of the move and goes on through B.
    Found by a review: B told the node the client had left only if the id's
    entry still named it, not if it bore its departed mark, so A waited out
    all of ``push_reconnect_timeout`` (120 s by default) and failed."""
    source = tmp_path / "large.bin"
    source.write_bytes(os.urandom(24 * MiB + 4321))
    async with _nodes(engines, bus_namespace, s3_url) as ((a, pushing), (b, _)):
        pushing.push_reconnect_timeout = 90.0
        with CuttingProxy(a.port, cut_after=("s2c", 8 * MiB)) as proxy:
            client, _ = _client(proxy.port, tmp_path / "inbox")
            async with client:
                client_id = client.id
                assert client_id is not None
                proxy.target_port = b.port  # the balancer sends the reconnect to B
                with trio.fail_after(60):  # (under push_reconnect_timeout)
                    result = await pushing.send_to_client(a, client_id, source, remote_name="f.bin")
                assert proxy.was_cut and client.id == client_id
                assert a.cluster is not None and a.cluster.moved_away(client_id) == "b"
        assert result["success"] is True, result
        assert (tmp_path / "inbox" / "f.bin").read_bytes() == source.read_bytes()


@pytest.mark.usefixtures("aws_environment")
async def test_a_push_from_another_node_follows_its_client_to_a_third(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    """A pushes to a client of B; mid-push the client resumes its session on C
    (B's connection left open, as a link that died silently). B, told of the
    move, finishes the push through C, as a push issued on B does. Found by a
    review: B answered ``connection_closed``."""
    source = tmp_path / "large.bin"
    source.write_bytes(os.urandom(24 * MiB + 4321))
    async with _nodes(engines, bus_namespace, s3_url, "abc") as ((a, pushing), (b, _), (c, _)):
        with CuttingProxy(b.port, cut_after=("s2c", 8 * MiB), strand=True) as proxy:
            client, _ = _client(proxy.port, tmp_path / "inbox")
            async with client:
                client_id = client.id
                assert client_id is not None
                proxy.target_port = c.port
                with trio.fail_after(60):
                    result = await pushing.send_to_client(a, client_id, source, remote_name="f.bin")
                assert proxy.was_cut and client.id == client_id
        assert result["success"] is True, result
        assert (tmp_path / "inbox" / "f.bin").read_bytes() == source.read_bytes()
