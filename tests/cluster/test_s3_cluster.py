"""Several conduit node processes storing in one S3 bucket (``storage_dir="s3://..."``).

Each node is a ``conduit_node.py`` process (see :mod:`node_processes`) with
``FileTransferHandler(storage_dir=<the same s3:// URL>)``, all on one
SeaweedFS and one Valkey; clients in the test process talk to them over real
sockets. What is checked, with the node that stored a file never the one that
serves it again:

* a file uploaded through A is listed, stat-ed, downloaded, renamed and
  deleted through B;
* an upload cut at about half through a proxy in front of A, sent again to B,
  resumes from the parts A stored: identical object, under 70 % resent;
* an upload to a node killed with ``kill -9`` halfway resumes on another node;
* two nodes publishing the same name at once never overwrite each other;
* without ``cluster_staging``, a push to a client of another node is staged
  in the handlers' own bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio

from cluster.node_processes import PASSWORD, engine_nodes, receiver
from conduit import Client, ClientDescriptor, FileTransferHandler
from conduit.transfer import TransferProgress
from cutting_proxy import CuttingProxy

MiB = 1024 * 1024
#: Large enough that the cut lands several 8 MiB parts in: what was stored
#: before it is what the retry does not send again.
CUT_SIZE = 64 * MiB
#: Bounds for a loaded machine (two cores shared by several test runs).
UPLOAD_TIMEOUT = 120.0
TTL = 3.0


@contextlib.asynccontextmanager
async def connected(port: int, **fields: Any) -> AsyncIterator[Client]:
    descriptor = ClientDescriptor(
        server_host="127.0.0.1",
        server_port=port,
        password=PASSWORD,
        connect_timeout=10.0,
        rpc_timeout=60.0,
        **fields,
    )
    async with Client(descriptor) as client:
        yield client


def _write(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    with path.open("wb") as file:
        for _ in range(0, size, MiB):
            block = os.urandom(min(MiB, size - file.tell()))
            hasher.update(block)
            file.write(block)
    return hasher.hexdigest()


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(MiB):
            hasher.update(block)
    return hasher.hexdigest()


async def _download_sha256(port: int, name: str, into: Path) -> str:
    handler = FileTransferHandler(storage_dir=into)
    async with connected(port) as client:
        result = await handler.receive_from_server(client, name, into)
    assert result["success"] is True, result
    return await trio.to_thread.run_sync(_sha256, into / name)


async def _send_until_not_busy(
    handler: FileTransferHandler, client: Client, path: Path
) -> dict[str, Any]:
    """Send; a partial the cut-off node is still letting go of answers ``busy``: send again."""
    for _attempt in range(20):
        result = await handler.send_to_server(client, path)
        if result.get("code") != "busy":
            return result
        await trio.sleep(0.5)
    raise AssertionError(f"still busy: {result}")


async def test_upload_through_a_then_list_download_rename_delete_through_b(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(UPLOAD_TIMEOUT):
        async with engine_nodes(
            engines, bus_namespace, tmp_path, ["a", "b"], ttl=TTL, shared_storage=s3_url
        ) as nodes:
            handler = FileTransferHandler(storage_dir=tmp_path / "client")
            source = tmp_path / "out" / "shared.bin"
            checksum = await trio.to_thread.run_sync(_write, source, 9 * MiB + 7)
            async with connected(nodes["a"].port) as client_a:
                uploaded = await handler.send_to_server(client_a, source, remote_name="d/x.bin")
            assert uploaded["success"] is True, uploaded
            assert uploaded["checksum"] == checksum

            async with connected(nodes["b"].port) as client_b:
                listing = await handler.list_files(client_b)
                assert [(f["name"], f["size"]) for f in listing] == [("d/x.bin", 9 * MiB + 7)]
                stat = await client_b.call("file_stat", name="d/x.bin", sha256=True)
                assert stat["sha256"] == checksum
                renamed = await handler.rename(client_b, "d/x.bin", "d/y.bin")
                assert renamed["success"] is True, renamed
            assert await _download_sha256(nodes["b"].port, "d/y.bin", tmp_path / "b") == checksum
            assert await _download_sha256(nodes["a"].port, "d/y.bin", tmp_path / "a") == checksum
            async with connected(nodes["a"].port) as client_a:
                assert (await handler.delete(client_a, "d/y.bin"))["success"] is True
            async with connected(nodes["b"].port) as client_b:
                assert await handler.list_files(client_b) == []

            # No cluster_staging: a push from A to a client of B is staged in
            # the bucket the handlers store in.
            async with (
                receiver(nodes["a"].port, tmp_path / "inbox-a") as control,
                receiver(nodes["b"].port, tmp_path / "inbox-b") as target,
            ):
                pushed = await control.client.call(
                    "push", client_id=target.id, path=str(source), name="pushed.bin"
                )
            assert pushed["success"] is True, pushed
            assert await trio.to_thread.run_sync(_sha256, target.inbox / "pushed.bin") == checksum
            async with connected(nodes["b"].port) as client_b:
                assert await handler.list_files(client_b) == []  # staging is never listed


async def test_an_upload_cut_on_a_resumes_on_b_and_racing_publishes_keep_both(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    names = ["a", "b", "c"]
    async with engine_nodes(
        engines, bus_namespace, tmp_path, names, ttl=TTL, shared_storage=s3_url
    ) as nodes:
        handler = FileTransferHandler(storage_dir=tmp_path / "client")
        source = tmp_path / "out" / "cut.bin"
        checksum = await trio.to_thread.run_sync(_write, source, CUT_SIZE)

        # Through a proxy that drops the connection to A halfway; no reconnect.
        with trio.fail_after(UPLOAD_TIMEOUT):
            with CuttingProxy(nodes["a"].port, cut_after=("c2s", CUT_SIZE // 2)) as proxy:
                async with connected(proxy.port, reconnect_enabled=False) as client_a:
                    cut = await handler.send_to_server(client_a, source)
                assert proxy.was_cut
            assert cut["success"] is False, cut

            # The same file to B, at once: it resumes from the parts A stored,
            # including the one A had in flight (B waits for A to let go).
            with CuttingProxy(nodes["b"].port) as counting:
                async with connected(counting.port) as client_b:
                    resumed = await _send_until_not_busy(handler, client_b, source)
                sent_to_b = sum(leg.c2s for leg in counting.legs)
        assert resumed["success"] is True, resumed
        assert resumed["checksum"] == checksum
        assert resumed["resumed_from"] > 0
        assert CUT_SIZE - resumed["resumed_from"] < 0.7 * CUT_SIZE, resumed
        assert sent_to_b < 0.7 * CUT_SIZE, sent_to_b  # measured on the wire, not reported
        with trio.fail_after(UPLOAD_TIMEOUT):
            assert await _download_sha256(nodes["c"].port, "cut.bin", tmp_path / "c") == checksum

        # Two nodes publish the same name at once, different bytes: both kept.
        contents = {}
        for node in ("a", "b"):
            path = tmp_path / node / "race.bin"
            contents[node] = await trio.to_thread.run_sync(_write, path, 2 * MiB + 1)
        results: dict[str, dict[str, Any]] = {}

        async def upload(node: str) -> None:
            async with connected(nodes[node].port) as client:
                results[node] = await handler.send_to_server(client, tmp_path / node / "race.bin")

        with trio.fail_after(UPLOAD_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for node in ("a", "b"):
                    nursery.start_soon(upload, node)
        assert all(result["success"] for result in results.values()), results
        assert sorted(result["path"] for result in results.values()) == [
            "race (1).bin",
            "race.bin",
        ]
        with trio.fail_after(UPLOAD_TIMEOUT):
            for node, result in results.items():
                got = await _download_sha256(nodes["c"].port, result["path"], tmp_path / "dl")
                assert got == contents[node]


async def test_a_node_killed_mid_upload_leaves_a_partial_another_node_resumes(
    engines: Any, bus_namespace: str, s3_url: str, tmp_path: Path
) -> None:
    size = 48 * MiB
    async with engine_nodes(
        engines, bus_namespace, tmp_path, ["a", "b"], ttl=TTL, shared_storage=s3_url
    ) as nodes:
        handler = FileTransferHandler(storage_dir=tmp_path / "client")
        source = tmp_path / "out" / "killed.bin"
        checksum = await trio.to_thread.run_sync(_write, source, size)
        killed = trio.Event()

        def kill_halfway(progress: TransferProgress) -> None:
            if progress.transferred >= size // 2 and not killed.is_set():
                nodes["a"].kill()  # kill -9: no goodbye, the partial as it is
                killed.set()

        progress_callback: Callable[[TransferProgress], None] = kill_halfway
        with trio.fail_after(UPLOAD_TIMEOUT):
            async with connected(nodes["a"].port, reconnect_enabled=False) as client_a:
                first = await handler.send_to_server(client_a, source, progress_callback)
        assert killed.is_set()
        assert first["success"] is False, first
        with trio.fail_after(UPLOAD_TIMEOUT):
            async with connected(nodes["b"].port) as client_b:
                resumed = await _send_until_not_busy(handler, client_b, source)
        assert resumed["success"] is True, resumed
        assert resumed["resumed_from"] > 0, resumed
        assert resumed["checksum"] == checksum
        with trio.fail_after(UPLOAD_TIMEOUT):
            assert await _download_sha256(nodes["b"].port, "killed.bin", tmp_path / "b") == checksum
