"""Small files many per call: ``file_upload_batch`` and the directory sends that use it.

Each file of a batch keeps every rule of a single small upload (names,
re-runs, budget and quota, SHA-256, the no-overwrite publish) and gets its own
result; the batch is bounded, and everything it reserved is released.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from conduit import FileTransferHandler, LocalProtocolError, RPCError
from conduit._connection import Connection
from conduit.accounts import MIN_STRETCH, Accounts
from conduit.protocol.frames import MIN_FRAME_SIZE
from conduit.transfer import _backend_local
from conduit.transfer._backend_local import INLINE_BATCH_BYTES, INLINE_BATCH_FILES, LocalBackend
from conduit.transfer._batch_store import MAX_BATCH_FILES, store_batch
from conduit.transfer._tree import PARALLEL_FILES
from conftest import ClientFactory, ServerFactory
from transfer_helpers import (
    partial_files,
    record_calls,
    register_without,
    storage_server,
    visible_files,
)

KiB = 1024


def _entry(name: str, data: bytes, sha256: str | None = None) -> dict[str, Any]:
    return {"name": name, "data": data, "sha256": sha256 or hashlib.sha256(data).hexdigest()}


def _nothing_held(handler: FileTransferHandler, storage: Path) -> None:
    """Every reservation released, no partial file left behind."""
    backend = handler.backend
    assert isinstance(backend, LocalBackend)  # a local storage_dir
    assert backend.budget._active == set()
    assert partial_files(storage) == []


async def test_a_directory_of_small_files_goes_in_batches(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "storage"
    handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    top = tmp_path / "tree"
    expected: dict[str, bytes] = {}
    for index in range(MAX_BATCH_FILES + 6):
        data = os.urandom(index * 37 % 4096)
        name = f"sub/f{index:03d}.bin" if index % 2 else f"f{index:03d}.bin"
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_bytes(data)
        expected[f"up/{name}"] = data
    big = os.urandom(300 * KiB)  # over the small-file limit: streamed on its own
    (top / "big.bin").write_bytes(big)
    expected["up/big.bin"] = big
    methods = record_calls(monkeypatch)
    with trio.fail_after(30):
        result = await FileTransferHandler().send_to_server(client, top, remote_name="up")
    assert result["success"] is True, result
    assert result["transferred"] == len(expected) and result["failed"] == 0
    assert methods.count("file_upload_batch") == 2
    assert "file_upload_small" not in methods
    assert methods.count("file_upload_begin") == 1
    assert {name: (storage / name).read_bytes() for name in expected} == expected
    for entry in result["files"]:
        assert entry["checksum"] == hashlib.sha256(expected[entry["name"]]).hexdigest()
    _nothing_held(handler, storage)


async def test_the_batches_of_one_group_of_files_go_out_side_by_side(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "storage"
    _handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    top = tmp_path / "tree"
    top.mkdir()
    for index in range(MAX_BATCH_FILES):  # one group, some 60 KiB each: several batches
        (top / f"f{index:02d}.bin").write_bytes(os.urandom(60 * KiB))
    in_flight, most = 0, 0
    original = Connection.call

    async def counting(
        self: Connection, method: str, args: dict[str, object], timeout: float | None
    ) -> object:
        nonlocal in_flight, most
        if method != "file_upload_batch":
            return await original(self, method, args, timeout)
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await original(self, method, args, timeout)
        finally:
            in_flight -= 1

    monkeypatch.setattr(Connection, "call", counting)
    with trio.fail_after(30):
        result = await FileTransferHandler().send_to_server(client, top, remote_name="up")
    assert result["success"] is True and result["transferred"] == MAX_BATCH_FILES, result
    # Over a long link one after the other cost a round trip each; never more
    # than PARALLEL_FILES at once.
    assert 2 <= most <= PARALLEL_FILES, most
    assert len(visible_files(storage)) == MAX_BATCH_FILES


async def test_each_file_of_a_batch_gets_its_own_result(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    received: list[str] = []

    @handler.on_file_received
    async def heard(_client: Any, path: str, metadata: dict[str, Any]) -> None:
        received.append(metadata["filename"])

    storage.mkdir()
    (storage / "again.txt").write_bytes(b"same bytes")
    (storage / "taken.txt").write_bytes(b"someone else's")
    files = [
        _entry("fresh.txt", b"new"),
        _entry("again.txt", b"same bytes"),
        _entry("../escape.txt", b"hostile"),
        _entry("wrong.txt", b"payload", "0" * 64),
        _entry("taken.txt", b"mine"),
        _entry("dir/nested.txt", b"deep"),
    ]
    with trio.fail_after(10):
        answer = await client.call("file_upload_batch", files=files)
    results = answer["results"]
    assert len(results) == len(files)
    fresh, again, escape, wrong, taken, nested = results
    assert fresh["success"] is True and fresh["path"] == "fresh.txt"
    assert fresh["checksum"] == hashlib.sha256(b"new").hexdigest()
    assert again["success"] is True and again["skipped"] is True
    assert again["reason"] == "already_there" and again["path"] == "again.txt"
    assert escape["success"] is False and escape["code"] == "unsafe_path", escape
    assert wrong["success"] is False and wrong["code"] == "checksum_mismatch", wrong
    assert taken["success"] is True and taken["path"] == "taken (1).txt"
    assert nested["success"] is True and nested["path"] == "dir/nested.txt"
    assert (storage / "taken.txt").read_bytes() == b"someone else's"
    assert (storage / "taken (1).txt").read_bytes() == b"mine"
    assert visible_files(storage) == sorted(
        ["again.txt", "dir/nested.txt", "fresh.txt", "taken (1).txt", "taken.txt"]
    )
    assert not (tmp_path / "escape.txt").exists()
    assert sorted(received) == ["dir/nested.txt", "fresh.txt", "taken (1).txt"]
    _nothing_held(handler, storage)


async def test_a_short_batch_is_waited_for_inline_and_a_long_one_through_the_loop(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A batch of up to INLINE_BATCH_FILES files and INLINE_BATCH_BYTES is
    # waited for on a lock (as a lone file is), a longer one through the loop:
    # seen from the store thread, whether the Trio loop runs a callback while
    # it stores.
    storage = tmp_path / "storage"
    handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    monkeypatch.setattr(_backend_local, "STORE_WAIT_INLINE", 30.0)  # never outlasted here
    token = trio.lowlevel.current_trio_token()
    loop_ran: list[bool] = []
    real_store = store_batch

    def watched_store(*args: Any) -> None:
        answered = threading.Event()
        token.run_sync_soon(answered.set)
        # The loop, idle meanwhile, answers at once unless it is blocked on
        # this store; seconds of room for a loaded machine.
        loop_ran.append(answered.wait(2.0))
        real_store(*args)

    monkeypatch.setattr(_backend_local, "store_batch", watched_store)
    await client.call("file_upload_batch", files=[_entry("first.txt", b"starts a thread")])
    loop_ran.clear()
    half = INLINE_BATCH_BYTES // 2
    batches = [
        [b"x" * index for index in range(2)],
        [b"x" * index for index in range(INLINE_BATCH_FILES)],
        [b"x" * index for index in range(INLINE_BATCH_FILES + 1)],  # too many files
        [b"y" * half, b"z" * (half + 1)],  # too many bytes
        [b"w" * (2 * INLINE_BATCH_BYTES)],  # a lone file: any small size
    ]
    for number, contents in enumerate(batches):
        files = [_entry(f"{number}-{index}.txt", data) for index, data in enumerate(contents)]
        with trio.fail_after(10):
            answer = await client.call("file_upload_batch", files=files)
        assert all(result["success"] for result in answer["results"]), answer
    assert loop_ran == [False, False, True, True, False]
    _nothing_held(handler, storage)


@pytest.fixture
def accounts(tmp_path: Path) -> Accounts:
    store = Accounts(tmp_path / "accounts.json", stretch=MIN_STRETCH)
    store.add("carol", "pw-carol", quota=256 * KiB)
    store.add("dave", "pw-dave", read_only=True)
    return store


async def test_a_batch_keeps_quotas_and_read_only(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path, accounts: Accounts
) -> None:
    storage = tmp_path / "storage"
    handler, server = await storage_server(server_factory, storage)
    carol, dave = await client_factory(server), await client_factory(server)
    for client, username in ((carol, "carol"), (dave, "dave")):
        assert client.id is not None
        peer = server.clients[client.id]
        peer.username = username
        peer.account = accounts.get(username)
    files = [
        _entry("a.bin", os.urandom(100 * KiB)),
        _entry("b.bin", os.urandom(200 * KiB)),  # a + b exceed the 256 KiB quota
        _entry("c.bin", os.urandom(10 * KiB)),
    ]
    with trio.fail_after(10):
        answer = await carol.call("file_upload_batch", files=files)
        refused = await dave.call("file_upload_batch", files=files)
    first, second, third = answer["results"]
    assert first["success"] is True and third["success"] is True
    assert second["success"] is False and second["code"] == "quota_exceeded", second
    assert visible_files(storage / "carol") == ["a.bin", "c.bin"]
    assert [result["code"] for result in refused["results"]] == ["forbidden"] * 3
    assert not (storage / "dave").exists()
    _nothing_held(handler, storage)
    top = tmp_path / "tree"
    top.mkdir()
    (top / "x.txt").write_bytes(b"x")
    with trio.fail_after(10):
        tree = await FileTransferHandler().send_to_server(dave, top)
    assert tree["success"] is False and tree["files"][0]["code"] == "forbidden", tree


async def test_a_batch_over_the_bounds_is_refused_whole(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    too_many = [_entry(f"f{i}.txt", b"x") for i in range(MAX_BATCH_FILES + 1)]
    with trio.fail_after(10):
        with pytest.raises(RPCError) as counted:
            await client.call("file_upload_batch", files=too_many)
        with pytest.raises(RPCError) as shaped:
            await client.call("file_upload_batch", files={"not": "a list"})
        with pytest.raises(RPCError) as malformed:
            await client.call(
                "file_upload_batch",
                files=[_entry("fine.txt", b"fine"), {"name": "m.txt", "data": "str", "sha256": ""}],
            )
        # More bytes than a frame may carry never leaves this side...
        with pytest.raises(LocalProtocolError):
            await client.call(
                "file_upload_batch", files=[_entry(f"g{i}.bin", bytes(300 * KiB)) for i in range(4)]
            )
        # ... and the connection is still good for a batch within the bounds.
        fine = await client.call("file_upload_batch", files=too_many[:MAX_BATCH_FILES])
    assert counted.value.code == "batch_too_large"
    assert shaped.value.code == "invalid_arguments"
    assert malformed.value.code == "invalid_arguments"
    assert all(result["success"] for result in fine["results"])
    assert len(visible_files(storage)) == MAX_BATCH_FILES
    _nothing_held(handler, storage)


async def test_a_server_without_batches_gets_one_file_per_call(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    handler = FileTransferHandler(storage_dir=storage)

    server = await server_factory(register=register_without(handler, "file_upload_batch"))
    client = await client_factory(server)
    top = tmp_path / "tree"
    top.mkdir()
    for index in range(5):
        (top / f"f{index}.txt").write_bytes(b"%d" % index)
    with trio.fail_after(10):
        result = await FileTransferHandler().send_to_server(client, top, remote_name="up")
    assert result["success"] is True and result["transferred"] == 5, result
    assert visible_files(storage) == [f"up/f{index}.txt" for index in range(5)]


async def test_send_files_to_server_gives_one_result_per_file(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    small = [outbox / f"s{index}.txt" for index in range(MAX_BATCH_FILES + 1)]
    for index, path in enumerate(small):
        path.write_bytes(b"small %d" % index)
    big = outbox / "big.bin"
    big.write_bytes(os.urandom(200 * KiB))  # over the default chunk_size: streamed
    link = outbox / "link.txt"
    link.symlink_to(small[0])  # an explicit path is followed, as send_to_server does
    files: list[Any] = [
        *small,
        (big, "deep/big.bin"),
        outbox / "missing.txt",
        (small[1], "../escape.txt"),
        (link, "via-link.txt"),
    ]
    with trio.fail_after(30):
        results = await FileTransferHandler().send_files_to_server(client, files)
        again = await FileTransferHandler().send_files_to_server(client, small[:2])
    assert len(results) == len(files)
    assert all(result["success"] for result in results[: len(small) + 1]), results
    *_, missing, escape, via_link = results
    assert missing["success"] is False and missing["code"] == "not_found", missing
    assert escape["success"] is False and escape["code"] == "unsafe_path", escape
    assert via_link["success"] is True and via_link["path"] == "via-link.txt"
    assert (storage / "deep" / "big.bin").read_bytes() == big.read_bytes()
    assert (storage / "via-link.txt").read_bytes() == b"small 0"
    assert [result.get("reason") for result in again] == ["already_there"] * 2
    assert len(visible_files(storage)) == len(small) + 2
    _nothing_held(handler, storage)


def _long_named(top: Path, count: int, parts: int = 4) -> dict[str, bytes]:
    """``count`` small files under ``top`` whose names are about ``parts`` x 191 bytes."""
    files: dict[str, bytes] = {}
    for index in range(count):
        name = f"{index:02}/" + "/".join(["n" * 190] * parts)
        files[name] = b"small %d" % index
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_bytes(files[name])
    return files


@pytest.mark.parametrize("way", ["send_files_to_server", "send_to_server side by side"])
async def test_a_batchs_answer_fits_in_the_senders_frame(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path, way: str
) -> None:
    """Each file's result names it (twice, and maybe in an error's text): 40
    files of 800-byte names made an answer of about 100 KB, past a client's
    16 KiB ``max_frame_size``, and every file of the batch failed
    (``bad_result``) though the server had stored it (until 2026-12-08). A
    batch is cut to what both its call and its answer fit in."""
    storage = tmp_path / "storage"
    _handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server, max_frame_size=MIN_FRAME_SIZE)
    files = _long_named(tmp_path / "out", 40)
    sender = FileTransferHandler()
    with trio.fail_after(60):
        if way == "send_files_to_server":
            results = await sender.send_files_to_server(
                client, [(tmp_path / "out" / name, name) for name in files]
            )
        else:
            results = []

            async def one(name: str) -> None:
                path = tmp_path / "out" / name
                results.append(await sender.send_to_server(client, path, remote_name=name))

            async with trio.open_nursery() as nursery:
                for name in files:
                    nursery.start_soon(one, name)
    assert all(result["success"] for result in results), results
    assert {name: (storage / name).read_bytes() for name in files} == files


async def test_a_download_batchs_call_fits_in_the_servers_frame(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The names a batch download asks for fit in the server's frame: 40 names
    of 2,900 bytes are past a server's 16 KiB ``max_frame_size``, the call
    could not be sent, and every file took a call of its own (until
    2026-12-08)."""
    storage = tmp_path / "storage"
    handler = FileTransferHandler(storage_dir=storage)
    server = await server_factory(
        register=handler.register_server_handlers, max_frame_size=MIN_FRAME_SIZE
    )
    client = await client_factory(server)
    files = _long_named(storage, 40, parts=15)
    methods = record_calls(monkeypatch)
    with trio.fail_after(60):
        results = await FileTransferHandler().receive_files_from_server(
            client, list(files), tmp_path / "in"
        )
    assert all(result["success"] for result in results), results
    batches = methods.count("file_download_batch")
    assert 1 < batches < len(files) and "file_download" not in methods, methods
    assert {name: (tmp_path / "in" / name).read_bytes() for name in files} == files


async def test_a_batchs_answer_fits_whatever_the_server_makes_of_its_names(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """What a result may hold past a name's bytes: the server's NFC form of it
    (U+1D160, 4 bytes, is 12) and a failure's text, which quotes the name
    and a part of it, escaped (U+0378, 2 bytes, is ``\\u0378``): both made an
    answer past a client's 16 KiB frame, every file of the batch
    ``bad_result``, the stored ones too. A failure's text is cut now, and a
    name's bytes counted as NFC may make them."""
    storage = tmp_path / "storage"
    _handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server, max_frame_size=MIN_FRAME_SIZE)
    sender = FileTransferHandler()
    top = tmp_path / "tree"
    deep = top.joinpath(*["\U0001d160" * 21] * 14)  # 252 bytes a part once NFC
    deep.mkdir(parents=True)
    for index in range(6):
        (deep / f"f{index}").write_bytes(b"x%d" % index)
    unprintable = "\u0378" * 127
    (tmp_path / "plain").write_bytes(b"first")
    (tmp_path / "ok").write_bytes(b"stored")
    with trio.fail_after(60):
        tree = await sender.send_to_server(client, top, remote_name="up")
        seeded = await sender.send_to_server(client, tmp_path / "plain", remote_name=unprintable)
        # Each of these fails (a file is in the way of its directory), and
        # its error quotes its name and that part.
        results = await sender.send_files_to_server(
            client,
            [(tmp_path / "plain", f"{unprintable}/x{index}") for index in range(11)]
            + [(tmp_path / "ok", "ok.txt")],
        )
    assert tree["success"] is True and tree["transferred"] == 6, tree
    assert seeded["success"] is True, seeded
    assert [result.get("code") for result in results] == ["conflict"] * 11 + [None], results
    assert all(len(result["error"].encode()) <= 512 for result in results[:11])
    assert (storage / "ok.txt").read_bytes() == b"stored"


async def test_a_directorys_file_whose_name_is_not_text_fails_alone(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """A local name that is not UTF-8 (bytes Python keeps as surrogates) is
    that file's failure: sent, it raised out of the directory's upload (the
    batch's size counted its bytes; until 2026-12-08), and once counted, it
    failed its whole batch's call."""
    storage = tmp_path / "storage"
    _handler, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    top = tmp_path / "tree"
    top.mkdir()
    (top / "good").write_bytes(b"good")
    with open(os.path.join(os.fsencode(top), b"bad\xff"), "wb") as file:
        file.write(b"bad")
    with trio.fail_after(30):
        result = await FileTransferHandler().send_to_server(client, top, remote_name="up")
    outcomes = {entry["name"]: entry.get("code") for entry in result["files"]}
    assert outcomes == {"up/bad\udcff": "unsafe_path", "up/good": None}, result
    assert (storage / "up" / "good").read_bytes() == b"good"
