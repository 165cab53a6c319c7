"""``FileTransferHandler.on_progress``: the receiving side hears how far each file is.

A server hears of uploads (``callback(client, progress)``), a client of the
files the server pushes to it (``callback(progress)``), as netconduit's
handler reported pushes. Real loopback sockets and real files, under
``trio.run`` and (for the callback's world) under ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import trio

from conduit import (
    Client,
    FileTransferHandler,
    Peer,
    TransferProgress,
)
from conftest import ClientFactory, ServerFactory
from transfer_helpers import MiB, asyncio_file_server, make_file


def _check_reports(reports: list[TransferProgress], name: str, size: int) -> None:
    assert reports, "no progress reported"
    assert {report.filename for report in reports} == {name}
    assert {report.direction for report in reports} == {"receive"}
    assert {report.total_size for report in reports} == {size}
    counts = [report.transferred for report in reports]
    assert counts == sorted(counts)
    assert counts[-1] == size and counts.count(size) == 1  # 100 %, once


async def test_a_server_hears_the_progress_of_uploads_with_their_client(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    transfer = FileTransferHandler(storage_dir=tmp_path / "server")
    reports: list[tuple[Peer, TransferProgress]] = []

    @transfer.on_progress
    async def progress(client: Peer, report: TransferProgress) -> None:
        await trio.sleep(0.02)  # a slow callback: the reports still come in order
        reports.append((client, report))

    server = await server_factory(register=transfer.register_server_handlers)
    client: Client = await client_factory(server)
    await make_file(tmp_path / "big.bin", 8 * MiB)
    (tmp_path / "small.txt").write_bytes(b"small")
    sender = FileTransferHandler(storage_dir=tmp_path / "client")
    with trio.fail_after(60):
        big = await sender.send_to_server(client, str(tmp_path / "big.bin"))
        small = await sender.send_to_server(client, str(tmp_path / "small.txt"))
    assert big["success"] and small["success"], (big, small)
    assert {peer.id for peer, _ in reports} == {client.id}
    _check_reports([r for _, r in reports if r.filename == "big.bin"], "big.bin", 8 * MiB)
    # A small file arrives in one call: one report, at 100 %.
    assert [r.transferred for _, r in reports if r.filename == "small.txt"] == [5]


async def test_a_client_hears_the_progress_of_pushes_and_a_raising_callback_spoils_nothing(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    served = FileTransferHandler(storage_dir=tmp_path / "server")
    server = await server_factory(register=served.register_server_handlers)
    inbox = FileTransferHandler(storage_dir=tmp_path / "inbox")
    reports: list[TransferProgress] = []

    @inbox.on_progress
    def broken(report: TransferProgress) -> None:
        raise RuntimeError("a bug in the application's callback")

    @inbox.on_progress
    def progress(report: TransferProgress) -> None:
        reports.append(report)

    client: Client = await client_factory(server, register=inbox.register_client_handlers)
    assert client.id is not None
    digest = await make_file(tmp_path / "pushed.bin", 3 * MiB)
    with trio.fail_after(60):
        pushed = await served.send_to_client(server, client.id, str(tmp_path / "pushed.bin"))
    assert pushed["success"], pushed
    assert pushed["checksum"] == digest
    assert (tmp_path / "inbox" / "pushed.bin").stat().st_size == 3 * MiB
    _check_reports(reports, "pushed.bin", 3 * MiB)


def test_an_async_callback_runs_in_asyncio_under_asyncio_run(tmp_path: Path) -> None:
    """Like ``on_file_received``: the application's callback runs in its own world."""
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * (3 * MiB))
    seen: list[tuple[int, bool]] = []

    async def main() -> None:
        async with asyncio_file_server(tmp_path / "server") as (transfer, client):

            @transfer.on_progress
            async def progress(client: Any, report: TransferProgress) -> None:
                await asyncio.sleep(0)
                seen.append((report.transferred, asyncio.current_task() is not None))

            sent = await FileTransferHandler().send_to_server(client, str(source))
            assert sent["success"], sent

    asyncio.run(main())
    assert seen and seen[-1] == (3 * MiB, True)
    assert all(in_asyncio for _, in_asyncio in seen)
