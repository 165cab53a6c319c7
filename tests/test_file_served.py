"""``FileTransferHandler.on_file_served``: the server hears how each download ended.

Real loopback sockets and real files, under ``trio.run`` and (for the callback's
world) under ``asyncio.run``. The CLI's ``serve`` log lines built on this hook
are checked here in process (a refused download is hard to provoke through
``conduit get``, which asks ``file_stat`` first) and, for a served one, through
the real ``conduit serve`` in ``test_cli.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from conduit import (
    Client,
    FileTransferHandler,
    Peer,
    Server,
)
from conduit.cli._serve import ServeOptions, build_server
from conftest import PASSWORD, ClientFactory, ServerFactory, wait_until
from transfer_helpers import MiB, asyncio_file_server, make_file

Served = tuple[Peer, str, dict[str, Any]]


async def _serving(
    server_factory: ServerFactory, storage: Path
) -> tuple[Server, FileTransferHandler, list[Served]]:
    transfer = FileTransferHandler(storage_dir=storage)
    served: list[Served] = []

    @transfer.on_file_served
    async def record(client: Peer, name: str, metadata: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()  # an async callback, awaited in Trio here
        served.append((client, name, metadata))

    server = await server_factory(register=transfer.register_server_handlers)
    return server, transfer, served


async def test_a_served_download_is_reported_with_its_checksum(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    server, transfer, served = await _serving(server_factory, tmp_path / "server")
    digest = await make_file(transfer.storage_dir / "reports" / "q1.bin", 3 * MiB)
    client: Client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "client")
    with trio.fail_after(30):
        got = await local.receive_from_server(client, "reports/q1.bin", tmp_path / "out")
        assert got["success"], got
        await wait_until(lambda: bool(served))  # told after the last frame is sent
    [(peer, name, metadata)] = served
    assert peer.id == client.id
    assert name == "reports/q1.bin"
    assert metadata["success"] is True
    assert metadata["filename"] == "reports/q1.bin"
    assert metadata["client_id"] == client.id
    assert metadata["size"] == 3 * MiB
    assert metadata["checksum"] == digest == got["checksum"]
    assert metadata["path"] == str(transfer.storage_dir / "reports" / "q1.bin")
    assert metadata["resumed_from"] == 0
    assert metadata["elapsed"] >= 0 and "error" not in metadata


async def test_refused_downloads_are_reported_with_the_clients_error(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    server, _, served = await _serving(server_factory, tmp_path / "server")
    client: Client = await client_factory(server)
    stream = client.server.connection.open_incoming_stream()
    with trio.fail_after(30):
        local = FileTransferHandler(storage_dir=tmp_path / "client")
        missing = await local.receive_from_server(client, "missing.bin", tmp_path / "out")
        # receive_from_server asks file_stat first; ask for the download itself,
        # as a client that skips the stat (or a hostile one) would.
        answer = await client.rpc.call(
            "file_download",
            name="../escape.bin",
            stream_id=stream.stream_id,
            size=1,
            offset=0,
            prefix_sha256="",
        )
    assert missing["code"] == "not_found"  # refused by file_stat: no download asked for
    assert answer["success"] is False and answer["code"] == "unsafe_path", answer
    [(peer, name, metadata)] = served
    assert peer.id == client.id and name == "../escape.bin"  # the raw name, as asked
    assert metadata["success"] is False
    assert metadata["code"] == answer["code"] and metadata["error"] == answer["error"]


async def test_a_callback_that_raises_spoils_neither_the_download_nor_the_others(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    server, transfer, served = await _serving(server_factory, tmp_path / "server")
    order: list[str] = []

    @transfer.on_file_served
    def broken(client: Peer, name: str, metadata: dict[str, Any]) -> None:
        metadata["success"] = "edited"  # each callback has its own copy
        order.append("broken")
        raise RuntimeError("a bug in the application's callback")

    @transfer.on_file_served
    def after(client: Peer, name: str, metadata: dict[str, Any]) -> None:
        order.append(f"after saw success={metadata['success']}")

    await make_file(transfer.storage_dir / "a.bin", MiB)
    client: Client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "client")
    with trio.fail_after(30):
        for attempt in range(2):
            # Two directories: a second download into the same one would be
            # skipped as already there (issue 13), and served nothing.
            got = await local.receive_from_server(client, "a.bin", tmp_path / f"out{attempt}")
            assert got["success"], got
        await wait_until(lambda: len(order) == 4)
    assert order == ["broken", "after saw success=True"] * 2
    assert [metadata["success"] for _, _, metadata in served] == [True, True]


def test_an_async_callback_runs_in_asyncio_under_asyncio_run(tmp_path: Path) -> None:
    """Like ``on_file_received``: the application's callback runs in its own world."""
    storage = tmp_path / "server"
    storage.mkdir()
    data = b"x" * (300 * 1024)  # over the small-file size: a streamed download
    (storage / "f.bin").write_bytes(data)
    seen: list[tuple[str, bool, bool]] = []

    async def main() -> None:
        async with asyncio_file_server(storage) as (transfer, client):

            @transfer.on_file_served
            async def served(client: Peer, name: str, metadata: dict[str, Any]) -> None:
                await asyncio.sleep(0)
                seen.append((name, metadata["success"], asyncio.current_task() is not None))

            got = await FileTransferHandler().receive_from_server(client, "f.bin", tmp_path / "out")
            assert got["checksum"] == hashlib.sha256(data).hexdigest(), got
            for _ in range(500):
                if seen:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(main())
    assert seen == [("f.bin", True, True)]


async def test_conduit_serve_logs_served_and_refused_downloads(
    nursery: trio.Nursery,
    client_factory: ClientFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="conduit.cli.serve")
    options = ServeOptions(tmp_path / "served", "127.0.0.1", 0, PASSWORD)
    server, transfer = build_server(options)
    (transfer.storage_dir / "docs").mkdir(parents=True)
    (transfer.storage_dir / "docs" / "a.txt").write_bytes(b"hello\n")
    await nursery.start(server.run)
    client: Client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "client")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "conduit.cli.serve"]

    with trio.fail_after(30):
        got = await local.receive_from_server(client, "docs/a.txt", tmp_path / "out")
        assert got["success"], got
        await wait_until(lambda: any(line.startswith("download") for line in lines()))
        stream = client.server.connection.open_incoming_stream()
        await client.rpc.call(
            "file_download",
            name="../secret\n2025-01-01 00:00:00 upload forged",
            stream_id=stream.stream_id,
            size=1,
            offset=0,
            prefix_sha256="",
        )
        await server.close()
    who = rf"client {client.id} \(127\.0\.0\.1:\d+\)"
    downloads = [line for line in lines() if line.startswith("download")]
    assert len(downloads) == 2, downloads
    assert re.fullmatch(rf"download   docs/a\.txt \(6 B\) to {who}", downloads[0]), downloads
    # The refused name is the client's raw text: logged as a repr, on one line.
    assert re.fullmatch(
        rf"download   '\.\./secret\\n2025-01-01 00:00:00 upload forged' for {who} failed: .+",
        downloads[1],
    ), downloads
    assert [r.levelno for r in caplog.records if r.getMessage() in downloads] == [
        logging.INFO,
        logging.WARNING,
    ]
