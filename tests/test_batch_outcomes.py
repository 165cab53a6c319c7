"""What a directory upload returns when its small files go in batches.

* A connection lost for good in the middle (the server closes it) is each
  unfinished file's ``connection_closed`` failure, never an exception group;
  the files already stored keep their success results, and no file is missing.
* Each file's ``elapsed`` and ``speed`` cover the batch call it travelled in.
* A directory given as ``".."`` or ``"."`` is sent under its own name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from conduit import FileTransferHandler, TransferProgress
from conduit.transfer._batch_store import MAX_BATCH_FILES
from conftest import ClientFactory, ServerFactory
from transfer_helpers import record_calls, storage_server, visible_files

KiB = 1024


def _write_tree(top: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (relative name → bytes) under ``top``."""
    for name, data in files.items():
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_bytes(data)


async def test_a_connection_closed_mid_directory_gives_per_file_results(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    # At most four batches are in flight: past four batches' worth of files,
    # at least one batch was answered in full before the connection closes.
    close_after = 4 * MAX_BATCH_FILES + 6
    received = 0

    @handler.on_file_received
    async def close_at_limit(peer: Any, _path: str, _metadata: dict[str, Any]) -> None:
        # A goodbye from the server: the client does not reconnect after it.
        nonlocal received
        received += 1
        if received == close_after:
            await peer.close("closed by the server for the test")

    # Twelve batches, four at a time: the ones that start after the first
    # failures meet a connection already closed for good.
    top = tmp_path / "tree"
    count = 12 * MAX_BATCH_FILES
    files = {f"d{i % 3}/f{i:04d}.txt": b"x" * 100 + str(i).encode() for i in range(count)}
    files["big.bin"] = os.urandom(300 * KiB)  # over the small-file limit: the per-file path
    await trio.to_thread.run_sync(_write_tree, top, files)

    with trio.fail_after(30):
        result = await FileTransferHandler().send_to_server(client, top, remote_name="up")

    by_name = {entry["name"]: entry for entry in result["files"]}
    assert sorted(by_name) == sorted(f"up/{name}" for name in files)  # no file missing
    stored = [e for e in result["files"] if e["success"]]
    failed = [e for e in result["files"] if not e["success"]]
    assert stored, "the files of the first batch were stored and answered"
    assert failed, "the connection closed before the last batches"
    assert {e["code"] for e in failed} == {"connection_closed"}, failed[:3]
    assert result["success"] is False
    assert result["transferred"] == len(stored) and result["failed"] == len(failed)
    assert by_name["up/big.bin"]["code"] == "connection_closed"
    for entry in stored:
        relative = entry["name"].removeprefix("up/")
        assert (storage / entry["name"]).read_bytes() == files[relative], entry
    # Files stored whose answer the closing cut off are failures, never the reverse.
    assert len(visible_files(storage)) >= len(stored)


async def test_a_batched_file_elapsed_covers_its_batch_call(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "storage"
    handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    delay = 0.2

    @handler.on_file_received
    async def slow(_peer: Any, _path: str, _metadata: dict[str, Any]) -> None:
        # The server answers a batch once every file's callbacks ran: each
        # file's batch call takes at least this long.
        await trio.sleep(delay)

    top = tmp_path / "tree"
    size = 50 * KiB
    files = {f"f{i}.bin": os.urandom(size) for i in range(3)}
    await trio.to_thread.run_sync(_write_tree, top, files)
    methods = record_calls(monkeypatch)
    reports: list[TransferProgress] = []

    with trio.fail_after(30):
        result = await FileTransferHandler().send_to_server(client, top, on_progress=reports.append)

    assert result["success"] is True, result
    assert methods.count("file_upload_batch") == 1
    assert len(result["files"]) == len(files)
    for entry in result["files"]:
        # Lower bounds only, from the deliberate delay: a loaded machine is slower, never faster.
        assert entry["elapsed"] >= delay, entry
        assert entry["speed"] == pytest.approx(size / entry["elapsed"])
        assert entry["speed"] <= size / delay
    assert sorted(report.filename for report in reports) == sorted(f"tree/{n}" for n in files)
    for report in reports:
        assert report.transferred == report.total_size == size
        assert report.elapsed >= delay, report
        assert report.speed <= size / delay


@pytest.mark.parametrize(
    ("given", "cwd"),
    [("..", "photos/inner"), ("inner/..", "photos"), (".", "photos")],
)
async def test_a_directory_given_as_a_step_is_sent_under_its_own_name(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    given: str,
    cwd: str,
) -> None:
    storage = tmp_path / "storage"
    _handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    files = {"a.txt": b"top level", "inner/b.txt": b"one level down"}
    await trio.to_thread.run_sync(_write_tree, tmp_path / "photos", files)
    monkeypatch.chdir(tmp_path / cwd)  # restored at teardown

    with trio.fail_after(10):
        result = await FileTransferHandler().send_to_server(client, given)

    assert result["success"] is True, result
    assert result["directory"] == "photos"
    assert sorted(e["name"] for e in result["files"]) == ["photos/a.txt", "photos/inner/b.txt"]
    assert {name: (storage / "photos" / name).read_bytes() for name in files} == files
