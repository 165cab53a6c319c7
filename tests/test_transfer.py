"""File transfer end to end: real loopback sockets (127.0.0.1), real files under tmp_path.

Covers the File Transfer Guide's API (``send_to_server``, ``receive_from_server``,
``send_to_client``, ``file_list``, ``on_file_received``, progress callbacks) and
the promises of ARCHITECTURE.md's "Files" section: SHA-256 verified before
anything becomes visible, hidden partial files that are never listed and that a
retry resumes, names from the network confined to the storage root, symlinks
never followed, transfers that share a connection without starving RPC.

Every test bounds its body with ``trio.fail_after``; none asserts on speed.

Helpers that are not fixtures (random files, tree snapshots, the proxy
``Cutter``) live in ``transfer_helpers.py``; the loopback server, client and
recording proxy come from ``conftest.py``. A few tests pin down defects found
while writing this suite (abandoned transfers, the restart-from-zero path of a
resumed upload, the download result's fields): their docstrings say what the
library should do.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import unicodedata
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from conduit import (
    Client,
    FileTransferHandler,
    LocalProtocolError,
    Peer,
    Server,
    TransferProgress,
    UnsafePathError,
)
from conduit._connection import Connection
from conduit.errors import failure_dict
from conduit.transfer import _engine, _sender
from conduit.transfer._names import partial_basename
from conduit.transfer._storage import PartialFile, StorageRoot
from conduit.transfer._wire import download_transfer_id, transfer_key
from conftest import ClientFactory, ProxyFactory, ServerFactory, open_descriptors, wait_until
from hostile_names import HOSTILE_NAMES
from transfer_helpers import (
    Cutter,
    MiB,
    all_files,
    file_sha256,
    make_file,
    partial_files,
    refusing_changes,
    tree_snapshot,
    upload_partial_name,
    visible_files,
    write_bytes,
)

CHUNK = 64 * 1024
#: Sizes around the chunk size and the sender's 1 MiB read block.
SIZES = [0, CHUNK, CHUNK + 1, 3 * CHUNK + 5, _engine.READ_BLOCK, _engine.READ_BLOCK + 1]
#: A transfer key of the right alphabet, for raw ``*_begin`` calls.
KEY = "k" * 32
#: Codes a refused name may come back with.
REFUSED_NAME_CODES = {"unsafe_path", "invalid_arguments"}
NON_ASCII_NAMES = [
    "r\u00e9sum\u00e9 2024.pdf",
    "\u0434\u0430\u043d\u043d\u044b\u0435.bin",
    "\u65e5\u672c\u8a9e.txt",
]

ReceivedOnServer = tuple[Peer, str, dict[str, Any]]
ReceivedOnClient = tuple[str, dict[str, Any]]


# --------------------------------------------------------------------------- fixtures


async def _echo(value: Any) -> Any:
    return value


@attrs.define
class FileServer:
    """A running server with a ``FileTransferHandler`` and what its callback saw."""

    server: Server
    transfer: FileTransferHandler
    received: list[ReceivedOnServer]

    @property
    def storage(self) -> Path:
        return self.transfer.storage_dir


FileServerFactory = Callable[..., Awaitable[FileServer]]


@pytest.fixture
async def file_server_factory(server_factory: ServerFactory, tmp_path: Path) -> FileServerFactory:
    """``await make(storage=None, **options)``: a server with transfer handlers and ``echo``."""

    async def make(storage: Path | None = None, **options: Any) -> FileServer:
        transfer = FileTransferHandler(storage_dir=storage or tmp_path / "server", **options)
        received: list[ReceivedOnServer] = []

        @transfer.on_file_received
        async def on_file(client: Peer, filepath: str, metadata: dict[str, Any]) -> None:
            received.append((client, filepath, metadata))

        def register(server: Server) -> None:
            transfer.register_server_handlers(server)
            server.register_rpc(_echo, "echo")

        server = await server_factory(register=register)
        return FileServer(server, transfer, received)

    return make


@attrs.define
class ClientSide:
    """A client's own ``FileTransferHandler`` and what its callback saw."""

    transfer: FileTransferHandler
    received: list[ReceivedOnClient]


def client_side(storage: Path, **options: Any) -> ClientSide:
    """A client-side handler whose ``on_file_received`` records ``(filepath, metadata)``."""
    transfer = FileTransferHandler(storage_dir=storage, **options)
    received: list[ReceivedOnClient] = []

    @transfer.on_file_received
    def on_file(filepath: str, metadata: dict[str, Any]) -> None:
        received.append((filepath, metadata))

    return ClientSide(transfer, received)


@pytest.fixture
def client_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every RPC method a *client* connection calls from now on (a spy on ``Connection.call``)."""
    calls: list[str] = []
    original = Connection.call

    async def spy(
        self: Connection, method: str, args: dict[str, Any], timeout: float | None
    ) -> Any:
        if self.is_client:
            calls.append(method)
        return await original(self, method, args, timeout)

    monkeypatch.setattr(Connection, "call", spy)
    return calls


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _released(gate: threading.Event) -> Iterator[None]:
    """Open ``gate`` on the way out, so a failing test never leaves a worker thread parked."""
    try:
        yield
    finally:
        gate.set()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utf8_encodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_refusal(result: dict[str, Any]) -> bool:
    """A ``{"success": False, ...}`` with a refusal code and a non-empty message."""
    return (
        result.get("success") is False
        and result.get("code") in REFUSED_NAME_CODES
        and bool(result.get("error"))
    )


async def assert_uploaded(
    fs: FileServer,
    client: Client,
    result: dict[str, Any],
    *,
    name: str,
    size: int,
    checksum: str,
) -> None:
    """The checks every successful upload must pass, on both ends."""
    assert result["success"] is True, result
    assert result["path"] == name
    assert result["size"] == size
    assert result["checksum"] == checksum
    stored = fs.storage / name
    assert stored.is_file() and not stored.is_symlink()
    assert stored.stat().st_size == size
    assert await file_sha256(stored) == checksum
    assert partial_files(fs.storage) == []
    assert len(fs.received) == 1
    peer, filepath, metadata = fs.received[0]
    assert isinstance(peer, Peer)
    assert peer.id == client.id
    assert Path(filepath) == stored
    assert metadata["filename"] == name
    assert metadata["size"] == size
    assert metadata["checksum"] == checksum


# --------------------------------------------------------------------------- 1. upload


@pytest.mark.parametrize("size", SIZES)
async def test_upload_sizes(
    size: int,
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        fs = await file_server_factory()
        client = await client_factory(fs.server)
        source = tmp_path / "outbox" / f"upload-{size}.bin"
        checksum = await make_file(source, size)
        sender = FileTransferHandler(storage_dir=tmp_path / "client", chunk_size=CHUNK)
        result = await sender.send_to_server(client, source)
        await assert_uploaded(fs, client, result, name=source.name, size=size, checksum=checksum)
        # Byte-identical, not just equal hashes of what each side believed it had.
        assert (fs.storage / source.name).read_bytes() == source.read_bytes()
        assert checksum == sha256_bytes(source.read_bytes())
        assert result["resumed_from"] == 0


async def test_the_smallest_chunk_size_streams_both_ways(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    # 1 KiB chunks (the least chunk_size allows): a read block of them is more
    # buffers than one readv may take (EINVAL from Linux past 1,024), so
    # every streamed file over 1 MiB failed with "io_error: Invalid argument".
    size = 2 * _engine.READ_BLOCK + 5
    with trio.fail_after(60):
        fs = await file_server_factory(chunk_size=1024)
        client = await client_factory(fs.server)
        source = tmp_path / "outbox" / "small-chunks.bin"
        checksum = await make_file(source, size)
        sender = FileTransferHandler(storage_dir=tmp_path / "client", chunk_size=1024)
        result = await sender.send_to_server(client, source)
        await assert_uploaded(fs, client, result, name=source.name, size=size, checksum=checksum)
        downloaded = await sender.receive_from_server(
            client, source.name, local_dir=tmp_path / "downloads"
        )
        assert downloaded["success"] is True, downloaded
        assert (tmp_path / "downloads" / source.name).read_bytes() == source.read_bytes()


async def test_the_servers_own_storage_failures_are_in_its_log(
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A directory the server may not write: the client is told
    # permission_denied, and until 2026-12-05 the server's log said nothing.
    fs = await file_server_factory()
    client = await client_factory(fs.server)
    (fs.storage / "sub").mkdir(parents=True)
    sender = FileTransferHandler(storage_dir=tmp_path / "client")
    sources = []
    for name, size in (("small.bin", 1000), ("big.bin", _engine.READ_BLOCK + 1)):
        sources.append(tmp_path / "outbox" / name)
        await make_file(sources[-1], size)
    with refusing_changes(fs.storage / "sub"), caplog.at_level(logging.WARNING, "conduit"):
        for source in sources:
            with trio.fail_after(30):
                result = await sender.send_to_server(
                    client, source, remote_name=f"sub/{source.name}"
                )
            assert result["code"] == "permission_denied", result
        # A size over the free space is the peer's request refused, not a
        # fault of the storage: not in the log (one peer could spend the
        # budget that a real full disk needs).
        huge = tmp_path / "outbox" / "huge.bin"
        with open(huge, "wb") as file:
            file.truncate(shutil.disk_usage(fs.storage).free + (1 << 40))  # sparse
        with trio.fail_after(30):
            refused = await sender.send_to_server(client, huge)
        assert refused["code"] == "no_space", refused
    lines = [r.getMessage() for r in caplog.records if "storage failure" in r.getMessage()]
    assert len(lines) == 2, caplog.text
    for line, source in zip(lines, sources, strict=True):
        assert line.startswith(f"storage failure (permission_denied) for 'sub/{source.name}': ")
        assert "Permission denied" in line or "Operation not permitted" in line, line


@pytest.mark.slow
async def test_upload_300_mb(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    size = 300 * 1000 * 1000 + 7
    with trio.fail_after(120):
        source = tmp_path / "outbox" / "big.bin"
        checksum = await make_file(source, size)
        fs = await file_server_factory()
        client = await client_factory(fs.server)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        result = await sender.send_to_server(client, source)
        await assert_uploaded(fs, client, result, name="big.bin", size=size, checksum=checksum)


# --------------------------------------------------------------------------- 2. download


async def _download_and_check(
    fs: FileServer, client: Client, tmp_path: Path, name: str, checksum: str, size: int
) -> None:
    receiver = client_side(tmp_path / "client-storage")
    local_dir = tmp_path / "downloads"
    result = await receiver.transfer.receive_from_server(client, name, local_dir=local_dir)
    assert result["success"] is True, result
    local = local_dir / name
    assert Path(result["path"]) == local
    assert result["size"] == size
    assert result["checksum"] == checksum
    assert local.stat().st_size == size
    assert await file_sha256(local) == checksum
    assert partial_files(local_dir) == []
    assert visible_files(local_dir) == [name]
    # The client-side callback sees downloads as (filepath, metadata).
    assert len(receiver.received) == 1
    filepath, metadata = receiver.received[0]
    assert Path(filepath) == local
    assert metadata["filename"] == name
    assert metadata["size"] == size
    assert metadata["checksum"] == checksum
    # Downloading publishes nothing on the server and calls no server callback.
    assert fs.received == []


@pytest.mark.parametrize("size", SIZES)
async def test_download_sizes(
    size: int,
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        fs = await file_server_factory()
        name = f"download-{size}.bin"
        checksum = await make_file(fs.storage / name, size)
        client = await client_factory(fs.server)
        await _download_and_check(fs, client, tmp_path, name, checksum, size)
        assert (tmp_path / "downloads" / name).read_bytes() == (fs.storage / name).read_bytes()


@pytest.mark.slow
async def test_download_100_mb(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    size = 100 * 1000 * 1000 + 3
    with trio.fail_after(60):
        fs = await file_server_factory()
        checksum = await make_file(fs.storage / "big.bin", size)
        client = await client_factory(fs.server)
        await _download_and_check(fs, client, tmp_path, "big.bin", checksum, size)


@pytest.mark.parametrize("name", NON_ASCII_NAMES)
async def test_non_ascii_names_round_trip(
    name: str,
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        fs = await file_server_factory()
        client = await client_factory(fs.server)
        source = tmp_path / "outbox" / name
        checksum = await make_file(source, 3 * CHUNK + 5)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        result = await sender.send_to_server(client, source)
        await assert_uploaded(fs, client, result, name=name, size=3 * CHUNK + 5, checksum=checksum)
        listing = await client.rpc.call("file_list")
        assert [f["name"] for f in listing["data"]["files"]] == [name]
        fs.received.clear()
        await _download_and_check(fs, client, tmp_path, name, checksum, 3 * CHUNK + 5)


async def test_nfd_name_is_stored_as_nfc(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    nfd = unicodedata.normalize("NFD", "r\u00e9sum\u00e9.pdf")
    nfc = unicodedata.normalize("NFC", nfd)
    assert nfd != nfc
    with trio.fail_after(30):
        fs = await file_server_factory()
        client = await client_factory(fs.server)
        source = tmp_path / "outbox" / "cv.pdf"
        checksum = await make_file(source, 1000)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        result = await sender.send_to_server(client, source, remote_name=nfd)
        await assert_uploaded(fs, client, result, name=nfc, size=1000, checksum=checksum)
        # The NFD spelling finds the same file.
        stat = await client.rpc.call("file_stat", name=nfd)
        assert stat["success"] is True and stat["data"]["name"] == nfc


async def test_subdirectory_names(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    name = "reports/2024/q1.pdf"
    size = 2 * CHUNK + 11
    with trio.fail_after(30):
        fs = await file_server_factory()
        client = await client_factory(fs.server)
        source = tmp_path / "outbox" / "q1-local.pdf"
        checksum = await make_file(source, size)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        result = await sender.send_to_server(client, source, remote_name=name)
        await assert_uploaded(fs, client, result, name=name, size=size, checksum=checksum)
        assert (fs.storage / "reports" / "2024").is_dir()
        listing = await client.rpc.call("file_list")
        assert [f["name"] for f in listing["data"]["files"]] == [name]
        fs.received.clear()
        await _download_and_check(fs, client, tmp_path, name, checksum, size)
        assert (tmp_path / "downloads" / "reports" / "2024" / "q1.pdf").is_file()


async def test_download_of_missing_file_fails_cleanly(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        fs = await file_server_factory()
        await make_file(fs.storage / "present.bin", 10)
        client = await client_factory(fs.server)
        receiver = FileTransferHandler(storage_dir=tmp_path / "client")
        local_dir = tmp_path / "downloads"
        result = await receiver.receive_from_server(client, "absent.bin", local_dir=local_dir)
        assert result["success"] is False
        assert result["code"] == "not_found"
        assert result["error"]
        assert all_files(local_dir) == []


# --------------------------------------------------------------------------- 3. push


async def test_push_reaches_only_the_chosen_client(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        fs = await file_server_factory()
        sides = [client_side(tmp_path / f"client-{i}") for i in range(3)]
        clients = [
            await client_factory(fs.server, register=side.transfer.register_client_handlers)
            for side in sides
        ]
        assert len(fs.server.clients) == 3
        source = tmp_path / "outbox" / "monthly.pdf"
        checksum = await make_file(source, 3 * CHUNK + 5)
        chosen = 1
        target_id = clients[chosen].id
        assert target_id is not None
        result = await fs.transfer.send_to_client(fs.server, target_id, source)
        assert result["success"] is True, result
        assert result["path"] == "monthly.pdf"
        assert result["checksum"] == checksum
        assert result["size"] == 3 * CHUNK + 5
        for index, side in enumerate(sides):
            storage = tmp_path / f"client-{index}"
            if index == chosen:
                assert visible_files(storage) == ["monthly.pdf"]
                assert partial_files(storage) == []
                assert await file_sha256(storage / "monthly.pdf") == checksum
                assert len(side.received) == 1
                filepath, metadata = side.received[0]
                assert Path(filepath) == storage / "monthly.pdf"
                assert metadata["filename"] == "monthly.pdf"
                assert metadata["size"] == 3 * CHUNK + 5
                assert metadata["checksum"] == checksum
            else:
                assert all_files(storage) == []
                assert side.received == []
        # A push is not a server-side receive.
        assert fs.received == []


# --------------------------------------------------------------------------- 4. file_list


async def test_file_list_shows_published_files_only(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        fs = await file_server_factory()
        client = await client_factory(fs.server)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        a = tmp_path / "outbox" / "a.txt"
        b = tmp_path / "outbox" / "b.bin"
        await make_file(a, 123)
        await make_file(b, CHUNK + 1)
        assert (await sender.send_to_server(client, a))["success"]
        assert (await sender.send_to_server(client, b, remote_name="sub/dir/b.bin"))["success"]

        outside = tmp_path / "outside"
        write_bytes(outside / "secret.txt", b"outside secret")
        write_bytes(outside / "deeper" / "more.txt", b"more")
        storage = fs.storage
        write_bytes(storage / ".hidden", b"hidden")
        write_bytes(storage / ".conduit-partial-abc-x.txt", b"half a file")
        write_bytes(storage / "sub" / ".conduit-partial-def-y.txt", b"another half")
        write_bytes(storage / ".hiddendir" / "inside.txt", b"in a hidden dir")
        (storage / "dirlink").symlink_to(outside, target_is_directory=True)
        (storage / "filelink.txt").symlink_to(outside / "secret.txt")
        (storage / "sub" / "dangling").symlink_to(tmp_path / "nowhere")
        os.mkfifo(storage / "fifo")

        result = await client.rpc.call("file_list")
        assert result["success"] is True
        files = result["data"]["files"]
        assert [f["name"] for f in files] == ["a.txt", "sub/dir/b.bin"]
        assert [f["size"] for f in files] == [123, CHUNK + 1]
        for entry in files:
            assert {"name", "size"} <= set(entry)
        # The convenience wrapper agrees.
        assert await sender.list_files(client) == files


# --------------------------------------------------------------------------- 5. hostile names


def plant_decoys(jail: Path) -> None:
    """Files where a traversal out of ``jail/storage`` would land, to make escapes observable."""
    for relative in ["x", "b", "secret", "etc/passwd", "root/.ssh/authorized_keys"]:
        write_bytes(jail / relative, b"decoy " + relative.encode())


async def test_hostile_names_refused_by_upload_begin(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    jail = tmp_path / "jail"
    storage = jail / "storage"
    plant_decoys(jail)
    with trio.fail_after(60):
        fs = await file_server_factory(storage)
        client = await client_factory(fs.server)
        before = tree_snapshot(tmp_path, skip=storage)
        problems: list[tuple[str, object]] = []
        for name in HOSTILE_NAMES:
            if not utf8_encodable(name):
                # Cannot even be put on the wire (msgpack strings are UTF-8).
                with pytest.raises(LocalProtocolError):
                    await client.rpc.call("file_upload_begin", name=name, size=10, key=KEY)
                continue
            result = await client.rpc.call("file_upload_begin", name=name, size=10, key=KEY)
            if not is_refusal(result):
                problems.append((name, result))
        # The transfer key becomes part of the partial file's name: same rules.
        for key in ["../../evil", "/tmp/evil", "a/b", "", "k" * 65, "..", "x\x00y"]:
            result = await client.rpc.call("file_upload_begin", name="ok.bin", size=10, key=key)
            if not is_refusal(result):
                problems.append((f"key {key!r}", result))
        assert problems == []
        assert tree_snapshot(tmp_path, skip=storage) == before
        assert all_files(storage) == []
        assert fs.received == []
        # The connection survived every refusal.
        assert await client.rpc.call("echo", value="still here") == {
            "success": True,
            "data": "still here",
        }


async def test_hostile_names_refused_by_download(
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    client_calls: list[str],
    tmp_path: Path,
) -> None:
    jail = tmp_path / "jail"
    storage = jail / "storage"
    plant_decoys(jail)
    write_bytes(storage / "ok.txt", b"a legitimate file")
    with trio.fail_after(60):
        fs = await file_server_factory(storage)
        client = await client_factory(fs.server)
        receiver = FileTransferHandler(storage_dir=tmp_path / "client")
        local_dir = jail / "downloads"
        before = tree_snapshot(tmp_path)
        problems: list[tuple[str, str, object]] = []
        empty = sha256_bytes(b"")
        for name in HOSTILE_NAMES:
            if not utf8_encodable(name):
                with pytest.raises(LocalProtocolError):
                    await client.rpc.call("file_stat", name=name)
            else:
                stat = await client.rpc.call("file_stat", name=name)
                if not is_refusal(stat):
                    problems.append(("file_stat", name, stat))
                # A stream id the client never opened: a server that accepted the
                # name would break the connection, which the echo below notices.
                download = await client.rpc.call(
                    "file_download", name=name, stream_id=1, size=10, offset=0, prefix_sha256=empty
                )
                if not is_refusal(download):
                    problems.append(("file_download", name, download))
            calls_before = len(client_calls)
            with pytest.raises(UnsafePathError):
                await receiver.receive_from_server(client, name, local_dir=local_dir)
            if len(client_calls) != calls_before:
                problems.append(("receive_from_server sent", name, client_calls[calls_before:]))
        assert problems == []
        assert tree_snapshot(tmp_path) == before
        assert not local_dir.exists()
        assert await client.rpc.call("echo", value=1) == {"success": True, "data": 1}
        assert client_calls[-1] == "echo"  # the spy does see calls that are made


async def test_hostile_names_refused_by_push_begin(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    jail = tmp_path / "jail"
    client_storage = jail / "storage"
    plant_decoys(jail)
    with trio.fail_after(60):
        fs = await file_server_factory()
        side = client_side(client_storage)
        client = await client_factory(fs.server, register=side.transfer.register_client_handlers)
        assert client.id is not None
        peer = fs.server.clients[client.id]
        before = tree_snapshot(tmp_path, skip=client_storage)
        problems: list[tuple[str, object]] = []
        for name in HOSTILE_NAMES:
            if not utf8_encodable(name):
                with pytest.raises(LocalProtocolError):
                    await peer.rpc.call("file_push_begin", name=name, size=10, key=KEY)
                continue
            result = await peer.rpc.call("file_push_begin", name=name, size=10, key=KEY)
            if not is_refusal(result):
                problems.append((name, result))
        assert problems == []
        assert tree_snapshot(tmp_path, skip=client_storage) == before
        assert all_files(client_storage) == []
        assert side.received == []
        # And the public API refuses such names before sending anything.
        source = tmp_path / "outbox" / "f.bin"
        await make_file(source, 10)
        for name in ["../escape.bin", "/etc/passwd", "a\\b", ".hidden"]:
            with pytest.raises(UnsafePathError):
                await fs.transfer.send_to_client(fs.server, client.id, source, remote_name=name)
        assert all_files(client_storage) == []


async def test_symlinked_directory_in_storage_is_never_followed(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    write_bytes(outside / "secret", b"top secret")
    storage = tmp_path / "storage"
    storage.mkdir()
    (storage / "link").symlink_to(outside, target_is_directory=True)
    outside_before = tree_snapshot(outside)
    with trio.fail_after(30):
        fs = await file_server_factory(storage)
        client = await client_factory(fs.server)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        source = tmp_path / "outbox" / "x.bin"
        await make_file(source, 3 * CHUNK + 5)

        upload = await sender.send_to_server(client, source, remote_name="link/x.bin")
        assert upload["success"] is False
        assert upload["code"] == "unsafe_path", upload
        raw = await client.rpc.call("file_upload_begin", name="link/y.bin", size=10, key=KEY)
        assert is_refusal(raw), raw
        assert raw["code"] == "unsafe_path"

        download = await sender.receive_from_server(
            client, "link/secret", local_dir=tmp_path / "downloads"
        )
        assert download["success"] is False
        assert download["code"] in {"unsafe_path", "not_found"}, download
        stat = await client.rpc.call("file_stat", name="link/secret")
        assert stat["success"] is False
        assert not (tmp_path / "downloads" / "link").exists()

        listing = await client.rpc.call("file_list")
        assert listing == {"success": True, "data": {"files": []}}
        assert tree_snapshot(outside) == outside_before
        assert all_files(storage) == []
        assert fs.received == []


@pytest.mark.parametrize("overwrite", [False, True])
async def test_symlinked_file_in_storage_is_never_followed(
    overwrite: bool,
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside"
    write_bytes(outside / "secret.txt", b"top secret")
    storage = tmp_path / "storage"
    storage.mkdir()
    link = storage / "escape.txt"
    link.symlink_to(outside / "secret.txt")
    # A symlink planted where the partial file for "victim.bin" (key KEY) would go.
    (storage / upload_partial_name("victim.bin", KEY)).symlink_to(outside / "secret.txt")
    outside_before = tree_snapshot(outside)
    with trio.fail_after(30):
        fs = await file_server_factory(storage, overwrite=overwrite)
        client = await client_factory(fs.server)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")

        download = await sender.receive_from_server(
            client, "escape.txt", local_dir=tmp_path / "downloads"
        )
        assert download["success"] is False
        assert download["code"] == "unsafe_path", download
        assert all_files(tmp_path / "downloads") == []

        for restart in (False, True):
            raw = await client.rpc.call(
                "file_upload_begin", name="victim.bin", size=10, key=KEY, restart=restart
            )
            assert is_refusal(raw), raw

        source = tmp_path / "outbox" / "escape.txt"
        checksum = await make_file(source, 1000)
        upload = await sender.send_to_server(client, source)
        assert upload["success"] is True, upload
        if overwrite:
            # The link itself is replaced by the file; its target is untouched.
            assert upload["path"] == "escape.txt"
            assert not link.is_symlink()
        else:
            assert upload["path"] == "escape (1).txt"
            assert link.is_symlink()
        assert await file_sha256(storage / upload["path"]) == checksum
        assert tree_snapshot(outside) == outside_before

        listing = await client.rpc.call("file_list")
        assert [f["name"] for f in listing["data"]["files"]] == [upload["path"]]


# --------------------------------------------------------------------------- 6. concurrency


async def test_twenty_clients_upload_at_once(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    count, size = 20, 2 * MiB
    with trio.fail_after(60):
        fs = await file_server_factory()
        sources = [tmp_path / "outbox" / f"file-{i:02d}.bin" for i in range(count)]
        checksums = [await make_file(path, size + i) for i, path in enumerate(sources)]
        clients: list[Client | None] = [None] * count

        async def connect(index: int) -> None:
            clients[index] = await client_factory(fs.server)

        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(connect, index)
        assert len(fs.server.clients) == count

        results: list[dict[str, Any] | None] = [None] * count

        async def upload(index: int) -> None:
            client = clients[index]
            assert client is not None
            sender = FileTransferHandler(storage_dir=tmp_path / f"client-{index}")
            results[index] = await sender.send_to_server(client, sources[index])

        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(upload, index)

        for index, result in enumerate(results):
            assert result is not None and result["success"] is True, result
            assert result["path"] == sources[index].name
            assert result["checksum"] == checksums[index]
            assert await file_sha256(fs.storage / sources[index].name) == checksums[index]
        assert visible_files(fs.storage) == sorted(p.name for p in sources)
        assert partial_files(fs.storage) == []
        # Each callback names the client that sent that file.
        by_name = {metadata["filename"]: peer.id for peer, _, metadata in fs.received}
        assert len(fs.received) == count
        for index, client in enumerate(clients):
            assert client is not None
            assert by_name[sources[index].name] == client.id


async def test_transfers_share_one_connection_with_rpc(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    size = 6 * MiB
    echo_calls = 200
    with trio.fail_after(60):
        fs = await file_server_factory()
        client = await client_factory(fs.server)
        sources = [tmp_path / "outbox" / f"up-{i}.bin" for i in range(3)]
        up_sums = [await make_file(path, size + i) for i, path in enumerate(sources)]
        down_sum = await make_file(fs.storage / "down.bin", size)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        echoes: list[dict[str, Any]] = []
        mid_transfer: dict[str, list[dict[str, Any]]] = {}

        async def probe(kind: str) -> None:
            replies = [await client.rpc.call("echo", value=f"{kind}-{i}") for i in range(5)]
            mid_transfer[kind] = replies

        def progress_probe(kind: str) -> Callable[[TransferProgress], Awaitable[None]]:
            # On the first report of an unfinished transfer, call RPCs from inside
            # it: for the download this also stalls its consumer, so the server's
            # sender runs out of credit while the calls must still be answered.
            async def on_progress(progress: TransferProgress) -> None:
                if kind not in mid_transfer and progress.transferred < progress.total_size:
                    await probe(kind)

            return on_progress

        uploads: list[dict[str, Any] | None] = [None] * 3
        download: dict[str, Any] = {}

        async def upload(index: int) -> None:
            callback = progress_probe("upload") if index == 0 else None
            uploads[index] = await sender.send_to_server(client, sources[index], callback)

        async def fetch() -> None:
            download.update(
                await sender.receive_from_server(
                    client, "down.bin", tmp_path / "downloads", progress_probe("download")
                )
            )

        async def echo_loop() -> None:
            for i in range(echo_calls):
                echoes.append(await client.rpc.call("echo", value=i))

        async with trio.open_nursery() as nursery:
            for index in range(3):
                nursery.start_soon(upload, index)
            nursery.start_soon(fetch)
            nursery.start_soon(echo_loop)

        assert echoes == [{"success": True, "data": i} for i in range(echo_calls)]
        for kind in ("upload", "download"):
            assert mid_transfer[kind] == [
                {"success": True, "data": f"{kind}-{i}"} for i in range(5)
            ]
        for index, result in enumerate(uploads):
            assert result is not None and result["success"] is True, result
            assert result["checksum"] == up_sums[index]
            assert await file_sha256(fs.storage / sources[index].name) == up_sums[index]
        assert download["success"] is True, download
        assert await file_sha256(tmp_path / "downloads" / "down.bin") == down_sum


async def test_same_name_from_many_clients_at_once(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """Concurrent publishers of one name each get their own name; no upload is lost."""
    count = 6
    with trio.fail_after(30):
        fs = await file_server_factory()
        sources = [tmp_path / f"sender-{i}" / "shared.bin" for i in range(count)]
        checksums = [await make_file(path, 200_000 + i) for i, path in enumerate(sources)]
        clients = [await client_factory(fs.server) for _ in range(count)]
        results: list[dict[str, Any]] = [{} for _ in range(count)]

        async def upload(index: int) -> None:
            sender = FileTransferHandler(storage_dir=tmp_path / f"client-{index}")
            results[index] = await sender.send_to_server(clients[index], sources[index])

        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(upload, index)

        assert all(result["success"] is True for result in results), results
        names = [result["path"] for result in results]
        assert sorted(names) == [
            "shared (1).bin",
            "shared (2).bin",
            "shared (3).bin",
            "shared (4).bin",
            "shared (5).bin",
            "shared.bin",
        ]
        for name, checksum in zip(names, checksums, strict=True):
            assert await file_sha256(fs.storage / name) == checksum
        assert partial_files(fs.storage) == []


# --------------------------------------------------------------------------- 7. integrity


async def test_checksum_mismatch_publishes_nothing(
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    read_records = _engine._read_records

    def lying_read_records(
        file: Any, stream_id: int, size: int, shape: Any, hasher: Any, *rest: Any
    ) -> Any:
        # The sender sends the right bytes but hashes something else, so its
        # trailer announces a digest the receiver's bytes do not have.
        records = read_records(file, stream_id, size, shape, hasher, *rest)
        hasher.update(b"\x00")
        return records

    size = 3 * CHUNK + 5
    with trio.fail_after(30):
        fs = await file_server_factory()
        client = await client_factory(fs.server)
        source = tmp_path / "outbox" / "tampered.bin"
        checksum = await make_file(source, size)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")

        monkeypatch.setattr(_engine, "_read_records", lying_read_records)
        result = await sender.send_to_server(client, source)
        monkeypatch.undo()

        assert result["success"] is False, result
        assert result["code"] == "checksum_mismatch"
        assert result["error"]
        assert all_files(fs.storage) == []  # nothing visible, no partial left behind
        listing = await client.rpc.call("file_list")
        assert listing == {"success": True, "data": {"files": []}}
        assert fs.received == []

        # The connection is fine, and an honest retry publishes under the original name.
        retry = await sender.send_to_server(client, source)
        await assert_uploaded(fs, client, retry, name="tampered.bin", size=size, checksum=checksum)


# --------------------------------------------------------------------------- 8. resume

RESUME_SIZE = 40 * MiB
#: Protocol overhead allowed on top of the file bytes that cross the second link.
RESUME_SLACK = 1 * MiB


async def test_upload_resumes_after_the_connection_is_cut(
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    size = RESUME_SIZE
    with trio.fail_after(60):
        fs = await file_server_factory()
        source = tmp_path / "outbox" / "resume.bin"
        checksum = await make_file(source, size)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")

        cutter = Cutter("c2s", size // 2)
        proxy = await proxy_factory(fs.server.port, cutter)
        cutter.proxy = proxy
        # The manual resume path: no automatic reconnect (test_reconnect.py has that).
        first_client = await client_factory(proxy.port, reconnect_enabled=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cutter.cut_when_tripped)
            first = await sender.send_to_server(first_client, source)
            nursery.cancel_scope.cancel()
        assert cutter.tripped.is_set()
        assert first["success"] is False, first
        assert first["code"] == "connection_closed", first
        # Wait until the server has noticed and released the partial file.
        await wait_until(lambda: first_client.id not in fs.server.clients)

        assert visible_files(fs.storage) == []
        partials = partial_files(fs.storage)
        assert len(partials) == 1
        kept = partials[0].stat().st_size
        assert 0 < kept < size
        assert fs.received == []

        counter = await proxy_factory(fs.server.port)
        second_client = await client_factory(counter.port)
        listing = await second_client.rpc.call("file_list")
        assert listing == {"success": True, "data": {"files": []}}
        second = await sender.send_to_server(second_client, source)

        await assert_uploaded(
            fs, second_client, second, name="resume.bin", size=size, checksum=checksum
        )
        resumed = second["resumed_from"]
        assert resumed == kept
        assert 0.3 * size < resumed < 0.7 * size
        assert fs.received[0][2]["resumed_from"] == resumed
        moved = len(counter.c2s)
        assert size - resumed <= moved <= size - resumed + RESUME_SLACK
        assert moved < 0.7 * size


async def test_download_resumes_after_the_connection_is_cut(
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    proxy_factory: ProxyFactory,
    tmp_path: Path,
) -> None:
    size = RESUME_SIZE
    name = "resume-download.bin"
    with trio.fail_after(60):
        fs = await file_server_factory()
        checksum = await make_file(fs.storage / name, size)
        receiver = client_side(tmp_path / "client")
        local_dir = tmp_path / "downloads"

        cutter = Cutter("s2c", size // 2)
        proxy = await proxy_factory(fs.server.port, cutter)
        cutter.proxy = proxy
        # The manual resume path: no automatic reconnect (test_reconnect.py has that).
        first_client = await client_factory(proxy.port, reconnect_enabled=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cutter.cut_when_tripped)
            first = await receiver.transfer.receive_from_server(
                first_client, name, local_dir=local_dir
            )
            nursery.cancel_scope.cancel()
        assert cutter.tripped.is_set()
        assert first["success"] is False, first
        assert first["code"] == "connection_closed", first
        assert visible_files(local_dir) == []
        partials = partial_files(local_dir)
        assert len(partials) == 1
        kept = partials[0].stat().st_size
        assert 0 < kept < size
        assert receiver.received == []

        counter = await proxy_factory(fs.server.port)
        second_client = await client_factory(counter.port)
        second = await receiver.transfer.receive_from_server(
            second_client, name, local_dir=local_dir
        )
        assert second["success"] is True, second
        assert second["checksum"] == checksum
        assert await file_sha256(local_dir / name) == checksum
        assert partial_files(local_dir) == []
        assert len(receiver.received) == 1
        resumed = receiver.received[0][1]["resumed_from"]
        assert resumed == kept
        assert 0.3 * size < resumed < 0.7 * size
        moved = len(counter.s2c)
        assert size - resumed <= moved <= size - resumed + RESUME_SLACK
        assert moved < 0.7 * size


async def test_download_result_reports_resumed_from_like_upload(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """``receive_from_server`` should report the same bookkeeping as ``send_to_server``."""
    with trio.fail_after(30):
        fs = await file_server_factory()
        checksum = await make_file(fs.storage / "f.bin", 3 * CHUNK + 5)
        client = await client_factory(fs.server)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        source = tmp_path / "outbox" / "g.bin"
        await make_file(source, 3 * CHUNK + 5)
        upload = await sender.send_to_server(client, source)
        download = await sender.receive_from_server(client, "f.bin", tmp_path / "downloads")
        assert download["success"] is True and download["checksum"] == checksum
        assert set(upload) - set(download) == set(), "keys only the upload result has"
        assert download["resumed_from"] == 0


async def test_upload_restarts_when_the_kept_partial_does_not_match(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """The server holds a partial file under this upload's key whose bytes are not a
    prefix of the file being sent (another sender's file with the same name, size
    and mtime, or a file rewritten in place with its mtime restored). The prefix
    hashes differ, so the sender must start over from zero, not fail.
    """
    size = 3 * CHUNK + 5
    with trio.fail_after(30):
        fs = await file_server_factory()
        source = tmp_path / "outbox" / "same-key.bin"
        checksum = await make_file(source, size)
        key = transfer_key("same-key.bin", size, source.stat().st_mtime_ns)
        stale = fs.storage / upload_partial_name("same-key.bin", key)
        write_bytes(stale, os.urandom(CHUNK))
        client = await client_factory(fs.server)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        result = await sender.send_to_server(client, source)
        await assert_uploaded(fs, client, result, name="same-key.bin", size=size, checksum=checksum)
        assert result["resumed_from"] == 0


async def test_download_restarts_when_the_kept_partial_does_not_match(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """The download-side twin: a local partial with the right key but wrong bytes."""
    size = 3 * CHUNK + 5
    name = "same-key.bin"
    with trio.fail_after(30):
        fs = await file_server_factory()
        checksum = await make_file(fs.storage / name, size)
        key = download_transfer_id(transfer_key(name, size, (fs.storage / name).stat().st_mtime_ns))
        local_dir = tmp_path / "downloads"
        write_bytes(local_dir / partial_basename(name, key), os.urandom(CHUNK))
        client = await client_factory(fs.server)
        receiver = client_side(tmp_path / "client")
        result = await receiver.transfer.receive_from_server(client, name, local_dir=local_dir)
        assert result["success"] is True, result
        assert await file_sha256(local_dir / name) == checksum
        assert partial_files(local_dir) == []
        assert receiver.received[0][1]["resumed_from"] == 0


# The begin call itself never times out (re-hashing a large partial for a resume
# may take long; the heartbeat catches a dead peer), so the way a sender gives up
# during it is cancellation.
@pytest.mark.parametrize("how", ["cancelled"])
async def test_abandoned_upload_does_not_lock_out_a_retry(
    how: str,
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A sender that gives up while the receiver is still opening its partial file
    (slow disk, or a big partial being re-hashed for a resume) must be able to send
    the same file again on the same connection.

    The receiver's ``file_upload_begin`` is held in its worker thread until the
    client has given up (its call timed out, or the caller cancelled), then let go.
    Held in a system call, as on a slow disk, it cannot stop early: the cancelled
    sender waits for it to let go at most ``_ABANDON_TIMEOUT`` (shortened here).
    """
    gate = threading.Event()
    entered = threading.Event()
    opened = threading.Event()
    original = StorageRoot.open_partial
    monkeypatch.setattr(_sender, "_ABANDON_TIMEOUT", 0.5)

    def held_open_partial(
        self: StorageRoot,
        name: str,
        transfer_id: str,
        *,
        resume: bool,
        stop: threading.Event | None = None,
    ) -> PartialFile:
        if not gate.is_set():
            entered.set()
            assert gate.wait(20), "the test never released the gate"
            partial = original(self, name, transfer_id, resume=resume, stop=stop)
            opened.set()
            return partial
        return original(self, name, transfer_id, resume=resume, stop=stop)

    monkeypatch.setattr(StorageRoot, "open_partial", held_open_partial)
    with trio.fail_after(30), _released(gate):
        fs = await file_server_factory()
        client = await client_factory(fs.server, rpc_timeout=0.5 if how == "rpc_timeout" else 10.0)
        source = tmp_path / "outbox" / "retry.bin"
        checksum = await make_file(source, 3 * CHUNK + 5)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")

        if how == "rpc_timeout":
            first = await sender.send_to_server(client, source)
            assert first["success"] is False
            assert first["code"] == "timeout", first
        else:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:

                    async def cancel_once_entered() -> None:
                        await wait_until(entered.is_set)
                        scope.cancel()

                    nursery.start_soon(cancel_once_entered)
                    await sender.send_to_server(client, source)
            assert scope.cancelled_caught
        gate.set()
        await wait_until(opened.is_set)  # the server finished opening the abandoned partial
        client.server.rpc.default_timeout = 10.0  # the short timeout was for the first try only

        retry = await sender.send_to_server(client, source)
        await assert_uploaded(
            fs, client, retry, name="retry.bin", size=3 * CHUNK + 5, checksum=checksum
        )


async def test_abandoned_download_does_not_leave_the_server_sending(
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A download the client gave up on (its ``file_download`` call timed out while
    the server was still opening the file) must not leave the server holding the
    file open and waiting for credit on a stream nobody reads, for as long as the
    connection lasts.
    """
    gate = threading.Event()
    entered = threading.Event()
    original = StorageRoot.open_for_read
    reads = 0

    def held_open_for_read(self: StorageRoot, name: str) -> Any:
        nonlocal reads
        reads += 1
        if reads == 2:  # the first is file_stat, the second file_download
            entered.set()
            assert gate.wait(20), "the test never released the gate"
        return original(self, name)

    monkeypatch.setattr(StorageRoot, "open_for_read", held_open_for_read)
    name = "abandoned.bin"
    with trio.fail_after(30), _released(gate):
        fs = await file_server_factory()
        # Bigger than the 4 MiB receive window, so the server cannot just send it all.
        checksum = await make_file(fs.storage / name, 6 * MiB)
        served = os.path.realpath(fs.storage / name)  # as /proc/self/fd names it
        client = await client_factory(fs.server, rpc_timeout=1.0)
        receiver = FileTransferHandler(storage_dir=tmp_path / "client")
        first = await receiver.receive_from_server(client, name, tmp_path / "downloads")
        assert first["success"] is False
        assert first["code"] == "timeout", first
        assert entered.is_set()
        gate.set()
        client.server.rpc.default_timeout = 10.0  # the short timeout was for the first try only

        retry = await receiver.receive_from_server(client, name, tmp_path / "downloads")
        assert retry["success"] is True, retry
        assert await file_sha256(tmp_path / "downloads" / name) == checksum
        # Nothing of the server's is still reading the file once both attempts are over.
        await wait_until(lambda: served not in open_descriptors(), timeout=5)


# -------------------------------------------------------------------- 9. limits, local errors


async def test_max_file_size(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    limit = 100_000
    with trio.fail_after(30):
        fs = await file_server_factory(max_file_size=limit)
        client = await client_factory(fs.server)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        too_big = tmp_path / "outbox" / "too-big.bin"
        await make_file(too_big, limit + 1)
        result = await sender.send_to_server(client, too_big)
        assert result["success"] is False
        assert result["code"] == "too_large"
        assert result["error"]
        assert not fs.storage.exists()  # refused before anything was created
        assert fs.received == []
        for size in (-1, limit + 1):
            raw = await client.rpc.call("file_upload_begin", name="raw.bin", size=size, key=KEY)
            assert raw["success"] is False
            assert raw["code"] == ("invalid_size" if size < 0 else "too_large"), raw
        assert not fs.storage.exists()

        just_right = tmp_path / "outbox" / "just-right.bin"
        checksum = await make_file(just_right, limit)
        result = await sender.send_to_server(client, just_right)
        await assert_uploaded(
            fs, client, result, name="just-right.bin", size=limit, checksum=checksum
        )


async def test_missing_or_directory_source_raises_before_sending(
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    client_calls: list[str],
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        fs = await file_server_factory()
        side = client_side(tmp_path / "client-storage")
        client = await client_factory(fs.server, register=side.transfer.register_client_handlers)
        assert client.id is not None
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        directory = tmp_path / "a-directory"
        directory.mkdir()
        calls_before = list(client_calls)

        with pytest.raises(FileNotFoundError):
            await sender.send_to_server(client, tmp_path / "does-not-exist.bin")
        # A directory is sent file by file (issue 13); an empty one sends nothing.
        empty = await sender.send_to_server(client, directory)
        assert empty["success"] is True and empty["files"] == []
        assert client_calls == calls_before  # nothing went to the server
        assert not fs.storage.exists()
        assert await client.rpc.call("echo", value=2) == {"success": True, "data": 2}
        assert client_calls == [*calls_before, "echo"]  # the spy does see calls that are made

        with pytest.raises(FileNotFoundError):
            await fs.transfer.send_to_client(fs.server, client.id, tmp_path / "nope.bin")
        with pytest.raises(IsADirectoryError):
            await fs.transfer.send_to_client(fs.server, client.id, directory)
        assert not (tmp_path / "client-storage").exists()
        assert side.received == []
        assert fs.received == []


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("direction", ["upload", "download", "push"])
async def test_progress_callbacks(
    flavour: str,
    direction: str,
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
) -> None:
    size = 3 * MiB + 5
    reports: list[TransferProgress] = []

    def sync_progress(progress: TransferProgress) -> None:
        reports.append(progress)

    async def async_progress(progress: TransferProgress) -> None:
        await trio.lowlevel.checkpoint()
        reports.append(progress)

    on_progress = sync_progress if flavour == "sync" else async_progress
    with trio.fail_after(30):
        fs = await file_server_factory()
        side = client_side(tmp_path / "client-storage")
        client = await client_factory(fs.server, register=side.transfer.register_client_handlers)
        assert client.id is not None
        source = tmp_path / "outbox" / "progress.bin"
        if direction == "download":
            source = fs.storage / "progress.bin"
        await make_file(source, size)
        if direction == "upload":
            result = await side.transfer.send_to_server(client, source, on_progress)
        elif direction == "download":
            result = await side.transfer.receive_from_server(
                client, "progress.bin", tmp_path / "downloads", on_progress
            )
        else:
            result = await fs.transfer.send_to_client(fs.server, client.id, source, on_progress)
        assert result["success"] is True, result

    assert reports, "the progress callback was never called"
    last = reports[-1]
    assert last.percent == 100
    assert last.transferred == last.total_size == size
    assert last.filename == "progress.bin"
    assert last.direction == direction
    assert last.eta == 0
    assert last.elapsed >= 0
    assert last.speed >= 0
    transferred = [report.transferred for report in reports]
    assert transferred == sorted(transferred)
    assert set(last.to_dict()) >= {
        "filename",
        "direction",
        "transferred",
        "total_size",
        "percent",
        "speed",
        "eta",
        "elapsed",
    }


async def test_handler_creates_nothing_until_a_transfer(
    file_server_factory: FileServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    FileTransferHandler()  # the default "./transfers"
    assert not (tmp_path / "transfers").exists()
    storage = tmp_path / "new" / "nested"
    with trio.fail_after(30):
        fs = await file_server_factory(storage)
        side = client_side(tmp_path / "client-new")
        client = await client_factory(fs.server, register=side.transfer.register_client_handlers)
        assert await client.rpc.call("file_list") == {"success": True, "data": {"files": []}}
        stat = await client.rpc.call("file_stat", name="missing.bin")
        assert stat["success"] is False
        assert stat["code"] == "not_found"
        assert not (tmp_path / "new").exists()

        source = tmp_path / "outbox" / "first.bin"
        checksum = await make_file(source, 100)
        result = await side.transfer.send_to_server(client, source)
        await assert_uploaded(fs, client, result, name="first.bin", size=100, checksum=checksum)
        # Uploading is not receiving: the client's own storage is still untouched.
        assert not (tmp_path / "client-new").exists()
    assert not (tmp_path / "transfers").exists()


async def test_same_name_twice_never_overwrites(
    file_server_factory: FileServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        fs = await file_server_factory()
        client = await client_factory(fs.server)
        sender = FileTransferHandler(storage_dir=tmp_path / "client")
        first = tmp_path / "one" / "report.txt"
        second = tmp_path / "two" / "report.txt"
        write_bytes(first, b"first version")
        write_bytes(second, b"second version, longer")
        third = tmp_path / "three" / "report.txt"
        write_bytes(third, b"first VERSION")  # the first's size, other bytes
        r1 = await sender.send_to_server(client, first)
        r2 = await sender.send_to_server(client, second)
        r3 = await sender.send_to_server(client, third)
        assert [r["path"] for r in (r1, r2, r3)] == [
            "report.txt",
            "report (1).txt",
            "report (2).txt",
        ]
        assert (fs.storage / "report.txt").read_bytes() == b"first version"
        assert (fs.storage / "report (1).txt").read_bytes() == b"second version, longer"
        assert (fs.storage / "report (2).txt").read_bytes() == b"first VERSION"
        # The very same bytes again are already there: no second copy (issue 13).
        r4 = await sender.send_to_server(client, first)
        assert r4["skipped"] is True and r4["path"] == "report.txt"

        archive = tmp_path / "outbox" / "data.tar.gz"
        write_bytes(archive, b"gz")
        a1 = await sender.send_to_server(client, archive)
        write_bytes(archive, b"g2")
        a2 = await sender.send_to_server(client, archive)
        assert [a1["path"], a2["path"]] == ["data.tar.gz", "data (1).tar.gz"]
        assert [metadata["filename"] for _, _, metadata in fs.received] == [
            "report.txt",
            "report (1).txt",
            "report (2).txt",
            "data.tar.gz",
            "data (1).tar.gz",
        ]
        nested = await sender.send_to_server(client, first, remote_name="reports/2024/report.txt")
        again = await sender.send_to_server(client, second, remote_name="reports/2024/report.txt")
        assert [nested["path"], again["path"]] == [
            "reports/2024/report.txt",
            "reports/2024/report (1).txt",
        ]
        assert (fs.storage / "reports/2024/report.txt").read_bytes() == b"first version"
        assert partial_files(fs.storage) == []


def test_an_s3_storage_dir_is_an_object_store_never_a_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``storage_dir="s3://..."`` used to become the local folder ``s3:/bucket/prefix``."""
    monkeypatch.chdir(tmp_path)  # where a silently made "s3:" folder would appear
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    handler = FileTransferHandler(storage_dir="s3://bucket/prefix")  # contacts nothing yet
    assert handler.storage_url == "s3://bucket/prefix"
    with pytest.raises(ValueError, match="not a local directory"):
        handler.storage_dir  # noqa: B018 (the property raises)
    with pytest.raises(ValueError, match="invalid S3 bucket"):
        FileTransferHandler(storage_dir="S3://Bucket")
    with pytest.raises(ValueError, match="invalid S3 prefix"):
        FileTransferHandler(storage_dir="s3://bucket/a/../b")
    assert list(tmp_path.iterdir()) == []


async def test_a_fifo_swapped_in_after_a_stat_cannot_block_an_upload(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upload of a path that becomes a FIFO is refused (``not_a_file``) and blocks no thread.

    The race is made certain: right after ``send_to_server``'s first look at
    the path (the open that tells a directory or a small file apart; this file
    is too large to be read there), a FIFO is swapped in, so the sender's own
    open finds it (an open that stat-ed first, or did not ask for
    ``O_NONBLOCK``, would block in it). A watchdog sees a reader blocked on the
    FIFO (a non-blocking open for writing succeeds only then) and releases it.
    """
    source = tmp_path / "data.bin"
    source.write_bytes(b"x" * (300 * 1024))
    real_open = os.open
    opens: list[object] = []

    def open_then_swap(path: Any, *args: Any, **kwargs: Any) -> Any:
        result = real_open(path, *args, **kwargs)
        if os.fspath(path) == str(source):
            opens.append(path)
            if len(opens) == 1:
                os.unlink(source)
                os.mkfifo(source)
        return result

    transfer = FileTransferHandler(storage_dir=tmp_path / "storage")
    server = await server_factory(register=transfer.register_server_handlers)
    client = await client_factory(server)
    blocked: list[bool] = []

    async def watchdog() -> None:
        for _ in range(500):
            await trio.sleep(0.01)
            try:
                fd = os.open(source, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue  # no reader blocked (ENXIO), or not a FIFO yet
            blocked.append(True)
            os.close(fd)  # the blocked reader's open returns

    monkeypatch.setattr(os, "open", open_then_swap)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog)
            # Raised before anything is sent, as for a missing file (the guide's contract).
            with contextlib.suppress(IsADirectoryError):
                await FileTransferHandler(storage_dir=tmp_path / "c").send_to_server(client, source)
            nursery.cancel_scope.cancel()
    assert len(opens) >= 2, "the sender never opened the swapped-in FIFO"
    assert not blocked, "a worker thread blocked opening the FIFO"
    monkeypatch.undo()
    source.unlink()
    os.mkfifo(source)  # a FIFO from the start: refused at once
    with trio.fail_after(30), pytest.raises(IsADirectoryError) as refused:
        await FileTransferHandler(storage_dir=tmp_path / "c").send_to_server(client, source)
    assert failure_dict(refused.value)["code"] == "not_a_file"
