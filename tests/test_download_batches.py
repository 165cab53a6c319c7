"""A directory's small files downloaded many per call: ``file_download_batch``.

The server reads each named file through its backend as a single download
does (the caller's root, its confinement) and answers it whole, leaves it to
the per-file path, or fails it alone; the client stores each batch as the
server stores an upload batch. Real loopback connections and real files.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from conduit import FileTransferHandler, RPCError, TransferProgress
from conduit.accounts import MIN_STRETCH, Accounts
from conduit.transfer import _backend_local, _local, _storage
from conduit.transfer._backend import SmallRead
from conduit.transfer._batch_store import MAX_BATCH_FILES, DirectoryAdmitter, entry_cost
from conduit.transfer._local import SmallFile
from conduit.transfer._names import partial_basename
from conduit.transfer._receiver import ANNOUNCE_GRACE
from conduit.transfer._storage import StorageRoot
from conduit.transfer._wire import download_transfer_id, transfer_key
from conftest import ClientFactory, ServerFactory
from transfer_helpers import (
    asyncio_file_server,
    partial_files,
    record_calls,
    register_replacing,
    register_without,
    storage_server,
    visible_files,
    write_bytes,
)

KiB = 1024


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tree(storage: Path, count: int) -> dict[str, bytes]:
    """``count`` small files under ``storage/d`` (half in ``d/sub``); name to bytes."""
    files = {}
    for index in range(count):
        name = f"d/sub/f{index:03d}.bin" if index % 2 else f"d/f{index:03d}.bin"
        files[name] = os.urandom(index * 53 % 5000)
        write_bytes(storage / name, files[name])
    return files


async def test_a_directory_of_small_files_downloads_in_batches(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "storage"
    handler, server = await storage_server(server_factory, storage)
    served: list[tuple[str, dict[str, Any]]] = []

    @handler.on_file_served
    def heard_served(_client: Any, name: str, metadata: dict[str, Any]) -> None:
        served.append((name, metadata))

    expected = _tree(storage, MAX_BATCH_FILES + 6)
    expected["d/big.bin"] = os.urandom(300 * KiB)  # over the small-file limit: streamed
    write_bytes(storage / "d/big.bin", expected["d/big.bin"])
    client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "unused")
    received: list[str] = []

    @local.on_file_received
    def heard(path: str, metadata: dict[str, Any]) -> None:
        received.append(metadata["filename"])

    reports: dict[str, list[TransferProgress]] = {}

    def progress(report: TransferProgress) -> None:
        reports.setdefault(report.filename, []).append(report)

    methods = record_calls(monkeypatch)
    out = tmp_path / "out"
    # What a cut download of an earlier version of d/f000.bin left, and an
    # upload's partial of the same name (not a download's: it stays).
    old_key = download_transfer_id(transfer_key("d/f000.bin", 10 * KiB, 1))
    write_bytes(out / "d" / partial_basename("f000.bin", old_key), bytes(5 * KiB))
    upload_partial = out / "d" / partial_basename("f000.bin", "a" * 32)
    write_bytes(upload_partial, b"x")
    with trio.fail_after(30):
        result = await local.receive_from_server(client, "d", out, on_progress=progress)
    assert result["success"] is True, result
    assert result["transferred"] == len(expected) and result["failed"] == 0
    assert {name: (out / name).read_bytes() for name in expected} == expected
    assert visible_files(out) == sorted(expected)
    assert partial_files(out) == [upload_partial]
    # Two batch calls for the 70 small files; the big one alone (stat, download),
    # besides the first stat that found a directory and the listing.
    assert methods.count("file_download_batch") == 2, methods
    assert methods.count("file_download") == 1 and methods.count("file_stat") == 2
    for entry in result["files"]:
        data = expected[entry["name"]]
        assert entry["checksum"] == _sha256(data) and entry["size"] == len(data)
        assert entry["path"] == str(out / entry["name"]) and entry["resumed_from"] == 0
        assert entry["elapsed"] > 0
        assert reports[entry["name"]][-1].transferred == len(data)
    assert sorted(received) == sorted(expected)
    sent = dict(served)
    assert sorted(sent) == sorted(expected)
    assert all(m["success"] is True for m in sent.values())
    assert sent["d/f000.bin"]["checksum"] == _sha256(expected["d/f000.bin"])
    assert sent["d/sub/f001.bin"]["size"] == len(expected["d/sub/f001.bin"])

    # Again: every file is already there, told by the digests of our copies,
    # so the server sends no bytes (and serves nothing) for them; a file
    # changed here comes again, under a collision name (overwrite is off).
    (out / "d/f002.bin").write_bytes(b"changed here")
    methods.clear()
    served.clear()
    with trio.fail_after(30):
        again = await local.receive_from_server(client, "d", out)
    assert again["success"] is True and again["skipped"] == len(expected) - 1, again
    assert methods.count("file_download_batch") == 2 and "file_download" not in methods
    assert [name for name, _ in served] == ["d/f002.bin"]
    assert (out / "d/f002 (1).bin").read_bytes() == expected["d/f002.bin"]


async def test_a_connection_closed_mid_directory_download_gives_per_file_results(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    handler, server = await storage_server(server_factory, storage)
    expected = _tree(storage, 12 * MAX_BATCH_FILES)
    served = 0

    @handler.on_file_served
    async def close_at_limit(peer: Any, _name: str, _metadata: dict[str, Any]) -> None:
        # A goodbye from the server, mid-batch: the client does not reconnect.
        nonlocal served
        served += 1
        if served == 5 * MAX_BATCH_FILES + 3:
            await peer.close("closed by the server for the test")

    client = await client_factory(server)
    out = tmp_path / "out"
    with trio.fail_after(30):
        result = await FileTransferHandler().receive_from_server(client, "d", out)
    by_name = {entry["name"]: entry for entry in result["files"]}
    assert sorted(by_name) == sorted(expected)  # no file missing
    stored = [e for e in result["files"] if e["success"]]
    failed = [e for e in result["files"] if not e["success"]]
    assert stored and failed, result["transferred"]
    assert {e["code"] for e in failed} == {"connection_closed"}, failed[:3]
    assert result["success"] is False and result["transferred"] == len(stored)
    assert visible_files(out) == sorted(e["name"] for e in stored)
    for entry in stored:
        assert (out / entry["name"]).read_bytes() == expected[entry["name"]]
    assert partial_files(out) == []


async def test_every_file_a_batch_stored_is_announced_when_the_caller_stops_early(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    _handler, server = await storage_server(server_factory, tmp_path / "storage")
    _tree(tmp_path / "storage", 3 * MAX_BATCH_FILES)
    client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "unused")
    announced: list[str] = []

    @local.on_file_received
    async def heard(path: str, metadata: dict[str, Any]) -> None:
        announced.append(metadata["filename"])
        await trio.lowlevel.checkpoint()  # a schedule point, where a cancellation may land

    reports = 0

    def progress(_report: TransferProgress) -> None:
        nonlocal reports
        reports += 1
        if reports == 3:
            raise RuntimeError("the application's progress bar broke")

    out = tmp_path / "out"
    with trio.fail_after(30), pytest.raises(RuntimeError, match="progress bar broke"):
        await local.receive_from_server(client, "d", out, on_progress=progress)
    stored = visible_files(out)
    assert len(stored) >= MAX_BATCH_FILES  # a whole batch was stored before the error
    assert sorted(announced) == stored
    announced.clear()
    # A caller's deadline: what was stored by then was announced too.
    with trio.move_on_after(0.05):
        await local.receive_from_server(client, "d", tmp_path / "again")
    assert sorted(announced) == visible_files(tmp_path / "again")


def test_under_asyncio_the_files_a_batch_stored_are_announced_when_cancelled(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "storage"
    _tree(storage, MAX_BATCH_FILES)  # one batch
    out = tmp_path / "out"
    announced: list[str] = []

    async def main() -> None:
        async with asyncio_file_server(storage) as (_server_side, client):
            local = FileTransferHandler(storage_dir=tmp_path / "unused")

            @local.on_file_received
            async def heard(path: str, metadata: dict[str, Any]) -> None:
                announced.append(metadata["filename"])
                await asyncio.sleep(0.001)

            reports = 0

            def progress(_report: TransferProgress) -> None:
                nonlocal reports
                reports += 1
                if reports == 3:  # the application gives up, mid-batch
                    download.cancel()

            download = asyncio.ensure_future(
                local.receive_from_server(client, "d", out, on_progress=progress)
            )
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(download, 30)

    asyncio.run(main())
    stored = visible_files(out)
    assert len(stored) == MAX_BATCH_FILES  # the batch was stored whole before the cancel
    # Each callback ran but the one the cancellation found queued on the loop:
    # asyncio cancels a task before its first step (see docs/file-transfer.md).
    assert set(announced) <= set(stored) and len(stored) - len(announced) <= 1, announced


async def test_a_caller_stops_within_a_grace_whatever_its_callbacks_wait_for(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    _handler, server = await storage_server(server_factory, tmp_path / "storage")
    _tree(tmp_path / "storage", 10)
    client = await client_factory(server)
    local = FileTransferHandler()
    send, receive = trio.open_memory_channel[str](0)

    @local.on_file_received
    async def feed(path: str, metadata: dict[str, Any]) -> None:
        await send.send(metadata["filename"])  # waits for a consumer that may be gone

    async def consumer() -> None:
        async for _name in receive:
            await trio.sleep(0.2)  # slow

    unblocked = False

    async def watchdog() -> None:
        # Without a bound on the callbacks' grace the caller never gets back
        # (the consumer is cancelled with it, and the callback waits for it for
        # ever, shielded): closing the channel is what frees it then.
        nonlocal unblocked
        await trio.sleep(10 + ANNOUNCE_GRACE)
        unblocked = True
        await send.aclose()

    async with trio.open_nursery() as outer:
        outer.start_soon(watchdog)
        with trio.move_on_after(0.3):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consumer)
                await local.receive_from_server(client, "d", tmp_path / "out")
                nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    assert not unblocked, "the caller was held until its callback could not wait any more"


async def test_a_file_whose_directory_sync_failed_is_not_announced(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _handler, server = await storage_server(server_factory, tmp_path / "storage")
    _tree(tmp_path / "storage", 3)
    client = await client_factory(server)
    local = FileTransferHandler()
    received: list[str] = []
    local.on_file_received(lambda path, metadata: received.append(metadata["filename"]))

    def failing(self: StorageRoot, names: Any) -> None:
        raise OSError(5, "EIO on fsync (simulated)")

    monkeypatch.setattr(StorageRoot, "sync_directories", failing)
    with trio.fail_after(10):
        result = await local.receive_from_server(client, "d", tmp_path / "out")
    assert [entry["code"] for entry in result["files"]] == ["io_error"] * 3, result
    assert received == []  # not known to be stored: not announced


async def test_a_download_directory_that_cannot_be_written_fails_each_file(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    _handler, server = await storage_server(server_factory, tmp_path / "storage")
    expected = _tree(tmp_path / "storage", 3)
    client = await client_factory(server)
    not_a_directory = tmp_path / "out"
    not_a_directory.write_bytes(b"a file where the download directory should be")
    with trio.fail_after(10):
        result = await FileTransferHandler().receive_from_server(client, "d", not_a_directory)
    assert sorted(entry["name"] for entry in result["files"]) == sorted(expected)
    assert result["failed"] == 3 and result["success"] is False, result
    assert all(entry["code"] for entry in result["files"])
    assert not_a_directory.read_bytes() == b"a file where the download directory should be"


async def test_receive_files_from_server_gives_one_result_per_name_in_order(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "storage"
    _handler, server = await storage_server(server_factory, storage)
    expected = _tree(storage, 30)
    write_bytes(storage / "big.bin", os.urandom(300 * KiB))
    client = await client_factory(server)
    local = FileTransferHandler()
    names = [*sorted(expected), "big.bin", "missing.txt", "../escape.txt", "d"]
    out = tmp_path / "out"
    methods = record_calls(monkeypatch)
    with trio.fail_after(30):
        results = await local.receive_files_from_server(client, names, out)
    assert len(results) == len(names)
    for name, result in zip(sorted(expected), results, strict=False):
        assert result["success"] is True and result["checksum"] == _sha256(expected[name])
        assert (out / name).read_bytes() == expected[name]
    big, missing, escape, directory = results[len(expected) :]
    assert big["success"] is True and big["size"] == 300 * KiB
    assert missing["code"] == "not_found" and escape["code"] == "unsafe_path", results
    assert directory["code"] == "is_directory", directory  # as receive_from_server finds it
    # Sizes not known: each counted as large as a small file may be (64 KiB),
    # 14 to a call; the big file and the directory by themselves.
    assert methods.count("file_download_batch") == 3
    with pytest.raises(ValueError, match="sizes"):
        await local.receive_files_from_server(client, names, out, sizes=[1])
    with pytest.raises(TypeError, match="sizes"):
        await local.receive_files_from_server(client, ["a"], out, sizes=[True])
    with pytest.raises(TypeError, match="names"):
        await local.receive_files_from_server(client, "ab", out)


async def test_each_file_of_a_download_batch_gets_its_own_answer(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"not served")
    _handler, server = await storage_server(server_factory, storage)
    write_bytes(storage / "a.txt", b"alpha")
    write_bytes(storage / "empty.txt", b"")
    write_bytes(storage / "dir/b.txt", b"beta")
    write_bytes(storage / "big.bin", bytes(300 * KiB))
    (storage / "link.txt").symlink_to(outside)
    client = await client_factory(server)
    names = [
        "a.txt",
        "missing.txt",
        "../secret.txt",
        "dir",
        "big.bin",
        "link.txt",
        "empty.txt",
        "dir/b.txt",
    ]
    with trio.fail_after(10):
        answer = await client.call("file_download_batch", names=names, max_bytes=512 * KiB)
    a, missing, escape, directory, big, link, empty, b = answer["files"]
    assert a == {
        "name": "a.txt",
        "size": 5,
        "modified_ns": (storage / "a.txt").stat().st_mtime_ns,
        "sha256": _sha256(b"alpha"),
        "data": b"alpha",
    }
    assert missing["success"] is False and missing["code"] == "not_found", missing
    assert escape["success"] is False and escape["code"] == "unsafe_path", escape
    # (as file_stat answers it: a tree is fetched by its listing, never by this call)
    assert directory["code"] == "is_directory", directory
    assert big == {"name": "big.bin", "by_itself": True}
    assert link["success"] is False and link["code"] == "unsafe_path", link
    assert empty["data"] == b"" and empty["sha256"] == _sha256(b"")
    assert b["data"] == b"beta" and b["name"] == "dir/b.txt"
    # A copy the caller has: its bytes are not sent again; another's are.
    with trio.fail_after(10):
        known = await client.call(
            "file_download_batch",
            names=["a.txt", "dir/b.txt"],
            have=[_sha256(b"alpha"), _sha256(b"an older beta")],
            max_bytes=512 * KiB,
        )
    assert known["files"] == [
        {"name": "a.txt", "size": 5, "sha256": _sha256(b"alpha"), "unchanged": True},
        {**b, "name": "dir/b.txt"},
    ]
    # Room for the first file only (each entry counts its name and some
    # framing besides its data): the next is left to the per-file path.
    room = entry_cost("a.txt", 5) + entry_cost("dir/b.txt", 4) - 1
    with trio.fail_after(10):
        tight = await client.call(
            "file_download_batch", names=["a.txt", "dir/b.txt"], max_bytes=room
        )
    assert tight["files"][0]["data"] == b"alpha"
    assert tight["files"][1] == {"name": "dir/b.txt", "by_itself": True}
    # A failure's message names the file; its length is bounded in an answer.
    long_name = "/".join(["d" * 60] * 50)
    with trio.fail_after(10):
        gone = await client.call("file_download_batch", names=[long_name], max_bytes=9000)
    assert gone["files"][0]["code"] == "not_found" and len(gone["files"][0]["error"]) == 512


async def test_a_download_batch_over_the_bounds_is_refused_whole(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    _handler, server = await storage_server(server_factory, tmp_path / "storage")
    write_bytes(tmp_path / "storage" / "a.txt", b"a")
    client = await client_factory(server)
    bad: list[tuple[Any, Any, str]] = [
        (["a.txt"] * (MAX_BATCH_FILES + 1), 1000, "batch_too_large"),
        ("a.txt", 1000, "invalid_arguments"),
        (["a.txt", 7], 1000, "invalid_arguments"),
        (["a.txt"], -1, "invalid_arguments"),
        (["a.txt"], True, "invalid_arguments"),
        (["a.txt"], "1000", "invalid_arguments"),
    ]
    bad_have: list[Any] = ["not a list", [None, None], [7]]
    with trio.fail_after(10):
        for names, max_bytes, code in bad:
            with pytest.raises(RPCError) as refused:
                await client.call("file_download_batch", names=names, max_bytes=max_bytes)
            assert refused.value.code == code, (names, max_bytes)
        for have in bad_have:
            with pytest.raises(RPCError) as refused:
                await client.call("file_download_batch", names=["a.txt"], max_bytes=1000, have=have)
            assert refused.value.code == "invalid_arguments", have
        fine = await client.call(
            "file_download_batch",
            names=["a.txt"] * MAX_BATCH_FILES,
            max_bytes=MAX_BATCH_FILES * entry_cost("a.txt", 1),
        )
    assert [entry["data"] for entry in fine["files"]] == [b"a"] * MAX_BATCH_FILES


async def test_a_batch_reaches_only_its_users_files(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    accounts = Accounts(tmp_path / "accounts.json", stretch=MIN_STRETCH)
    accounts.add("carol", "pw-carol")
    storage = tmp_path / "storage"
    _handler, server = await storage_server(server_factory, storage)
    write_bytes(storage / "carol" / "mine.txt", b"carol's")
    write_bytes(storage / "dave" / "theirs.txt", b"dave's")
    client = await client_factory(server)
    assert client.id is not None
    peer = server.clients[client.id]
    peer.username, peer.account = "carol", accounts.get("carol")
    with trio.fail_after(10):
        answer = await client.call(
            "file_download_batch",
            names=["mine.txt", "../dave/theirs.txt", "dave/theirs.txt"],
            max_bytes=1000,
        )
    mine, escape, absent = answer["files"]
    assert mine["data"] == b"carol's"
    assert escape["code"] == "unsafe_path" and absent["code"] == "not_found", answer


async def test_a_batch_takes_its_room_in_the_read_ahead_budget_before_reading(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    handler, server = await storage_server(
        server_factory, storage, read_ahead_per_connection=128 * KiB
    )
    for name in ("a.bin", "b.bin", "c.bin"):
        write_bytes(storage / name, os.urandom(50 * KiB))
    client = await client_factory(server)
    assert client.id is not None
    connection = server.clients[client.id].connection
    read_ahead = handler._sender._budget(connection).read_ahead
    names = ["a.bin", "b.bin", "c.bin"]
    with trio.fail_after(10):
        # The answer's data is the budget's capacity at most: two files of three.
        whole = await client.call("file_download_batch", names=names, max_bytes=1000 * KiB)
        assert [("data" in entry) for entry in whole["files"]] == [True, True, False]
        assert read_ahead.in_use == 0
        # With part of the budget held elsewhere, a batch waits for its whole
        # room, holding none of it meanwhile (two batches each holding a part
        # while waiting for the rest would wait for ever).
        taken = await read_ahead.take(60 * KiB)
        answers: list[Any] = []
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                answers.append(
                    await client.call("file_download_batch", names=names, max_bytes=1000 * KiB)
                )

            nursery.start_soon(ask)
            await trio.sleep(0.2)
            assert answers == [] and read_ahead.in_use == taken
            read_ahead.give_back(taken)
    assert [("data" in entry) for entry in answers[0]["files"]] == [True, True, False]
    assert read_ahead.in_use == 0


async def test_a_server_without_download_batches_gets_one_file_per_call(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "storage"
    handler = FileTransferHandler(storage_dir=storage)

    server = await server_factory(register=register_without(handler, "file_download_batch"))
    expected = _tree(storage, 5)
    client = await client_factory(server)
    methods = record_calls(monkeypatch)
    with trio.fail_after(10):
        result = await FileTransferHandler().receive_from_server(client, "d", tmp_path / "out")
    assert result["success"] is True and result["transferred"] == 5, result
    assert {name: (tmp_path / "out" / name).read_bytes() for name in expected} == expected
    assert methods.count("file_download_batch") == 1 and methods.count("file_download") == 5


async def test_a_batch_refused_as_a_whole_leaves_its_files_to_the_per_file_path(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "storage"
    handler = FileTransferHandler(storage_dir=storage)
    expected = _tree(storage, 5)

    async def busy(names: list[str], max_bytes: int, have: Any = None) -> dict[str, Any]:
        raise RPCError("too many transfers on this connection (limit 1)", "overloaded")

    server = await server_factory(register=register_replacing(handler, "file_download_batch", busy))
    client = await client_factory(server)
    methods = record_calls(monkeypatch)
    with trio.fail_after(10):
        result = await FileTransferHandler().receive_from_server(client, "d", tmp_path / "out")
    assert result["success"] is True and result["transferred"] == 5, result
    assert methods.count("file_download_batch") == 1 and methods.count("file_download") == 5
    assert {name: (tmp_path / "out" / name).read_bytes() for name in expected} == expected


async def test_unchanged_is_believed_only_of_the_copy_we_have(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    handler = FileTransferHandler(storage_dir=storage)
    expected = _tree(storage, 3)
    names = sorted(expected)
    out = tmp_path / "out"
    for name in names:  # copies of all three here
        write_bytes(out / name, expected[name])

    async def echoing(names: list[str], max_bytes: int, have: Any = None) -> dict[str, Any]:
        # The digests we sent, echoed back: right, with another size, and for a
        # file we sent none for.
        first, second, third = names
        return {
            "files": [
                {"name": first, "size": len(expected[first]), "sha256": have[0], "unchanged": True},
                {"name": second, "size": 1, "sha256": have[1], "unchanged": True},
                {"name": third, "size": 5, "sha256": have[0], "unchanged": True},
            ]
        }

    server = await server_factory(
        register=register_replacing(handler, "file_download_batch", echoing)
    )
    client = await client_factory(server)
    with trio.fail_after(10):
        result = await FileTransferHandler().receive_from_server(client, "d", out)
    codes = [entry.get("code") for entry in result["files"]]
    reasons = [entry.get("reason") for entry in result["files"]]
    assert codes == [None, "bad_answer", "bad_answer"] and reasons[0] == "already_there", result


async def test_a_servers_lies_in_a_batch_fail_their_files_alone(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    handler = FileTransferHandler(storage_dir=storage)
    expected = _tree(storage, 5)  # d/f000.bin, d/f002.bin, d/f004.bin, d/sub/f001.bin, ...
    names = sorted(expected)
    # Larger than the client's small-file limit (64 KiB): the server's may be
    # higher, and the file may have grown since the listing; it fits the answer.
    good = os.urandom(100 * KiB)

    async def lying(names: list[str], max_bytes: int, have: Any = None) -> dict[str, Any]:
        return {
            "files": [
                {"name": names[0], "size": 3, "sha256": _sha256(b"abc"), "data": b"xyz"},
                {"name": "../../escape.bin", "size": 1, "sha256": _sha256(b"e"), "data": b"e"},
                {"name": names[2], "size": 5, "sha256": _sha256(b"abc"), "data": b"abc"},
                {"name": names[3], "size": len(good), "sha256": _sha256(good), "data": good},
                # We sent no digest for it: we have no copy it could equal.
                {"name": names[4], "size": 1, "sha256": "0" * 64, "unchanged": True},
            ]
        }

    server = await server_factory(
        register=register_replacing(handler, "file_download_batch", lying)
    )
    client = await client_factory(server)
    out = tmp_path / "out"
    with trio.fail_after(10):
        result = await FileTransferHandler().receive_from_server(client, "d", out)
    codes = {entry["name"]: entry.get("code") for entry in result["files"]}
    assert codes == {
        names[0]: "checksum_mismatch",
        names[1]: "bad_answer",
        names[2]: "bad_answer",
        names[3]: None,
        names[4]: "bad_answer",
    }, result
    assert visible_files(out) == [names[3]]
    assert (out / names[3]).read_bytes() == good
    assert partial_files(out) == []
    assert not (tmp_path / "escape.bin").exists()


def test_a_file_written_to_while_it_is_read_for_a_batch_is_not_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = StorageRoot(tmp_path)
    path = tmp_path / "f.bin"
    change: list[bytes] = []
    real_read = _local.read_small

    def read_while_written(fd: int, size: int) -> SmallFile | None:
        # A writer gets in between the open and the read.
        if change:
            time.sleep(0.01)  # a modification time the file system can tell apart
            path.write_bytes(change.pop())
        return real_read(fd, size)

    monkeypatch.setattr(_backend_local, "read_small", read_while_written)
    for written, small in [
        (None, True),
        (b"other version", False),  # the same size, written to
        (b"first version, longer", False),  # grew
        (b"short", False),  # shrank
    ]:
        path.write_bytes(b"first version")
        change[:] = [] if written is None else [written]
        read = _backend_local.read_whole(storage, "f.bin", 100)
        assert read.size == 13 and (read.small is not None) is small, written
    path.write_bytes(b"first version")
    assert _backend_local.read_whole(storage, "f.bin", 100).small == SmallFile(
        b"first version", _sha256(b"first version")
    )
    # Larger than asked for: its size, not its bytes.
    assert _backend_local.read_whole(storage, "f.bin", 12) == SmallRead(
        13, path.stat().st_mtime_ns, None
    )


def test_a_partial_a_crash_leaves_in_a_download_directory_goes_with_the_next_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where there is no O_TMPFILE a batch file is written to a named partial
    # first; a process killed before the link leaves it behind.
    monkeypatch.setattr(_storage, "_TMPFILE_FLAGS", None)
    storage = StorageRoot(tmp_path)
    admission = DirectoryAdmitter(storage).admit("d/b.bin", 3)
    assert admission.partial is not None
    admission.partial.write_block(b"abc")
    admission.partial.close()  # what a crash leaves: the bytes, under a hidden name
    assert len(partial_files(tmp_path)) == 1
    assert storage.remove_download_partials(["d/b.bin"]) == 1
    assert partial_files(tmp_path) == []
