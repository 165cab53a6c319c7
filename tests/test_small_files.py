"""The small-file path: files up to one chunk travel inside a single call.

Same guarantees as the streamed path (verified before publishing, confined,
never overwriting), with one round trip and one worker-thread hop per side.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from conduit import FileTransferHandler, LocalProtocolError, Server
from conduit.transfer import _local
from conftest import ClientFactory, ServerFactory
from hostile_names import HOSTILE_NAMES
from transfer_helpers import record_calls


async def _file_server(server_factory: ServerFactory, tmp_path: Path, **options: object) -> Server:
    handler = FileTransferHandler(storage_dir=tmp_path / "server", **options)  # type: ignore[arg-type]
    server = await server_factory(register=handler.register_server_handlers)
    return server


def _encodable(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def _visible(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def test_small_upload_is_one_call_and_verified(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await _file_server(server_factory, tmp_path)
    client = await client_factory(server)
    methods = record_calls(monkeypatch)
    source = tmp_path / "note.txt"
    source.write_bytes(os.urandom(4096))
    with trio.fail_after(10):
        result = await FileTransferHandler().send_to_server(client, source)
    assert result["success"] is True, result
    assert result["checksum"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert methods == ["file_upload_small"]
    assert (tmp_path / "server" / "note.txt").read_bytes() == source.read_bytes()
    assert _visible(tmp_path / "server") == ["note.txt"]


async def test_small_upload_with_a_wrong_checksum_publishes_nothing(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    server = await _file_server(server_factory, tmp_path)
    client = await client_factory(server)
    with trio.fail_after(10):
        answer = await client.rpc.call(
            "file_upload_small", name="x.bin", data=b"payload", sha256="0" * 64
        )
    assert answer["success"] is False
    assert answer["code"] == "checksum_mismatch"
    root = tmp_path / "server"
    assert not root.exists() or list(root.rglob("*")) == []


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_small_upload_refuses_hostile_names(
    name: str, server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    server = await _file_server(server_factory, tmp_path)
    client = await client_factory(server)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    digest = hashlib.sha256(b"x").hexdigest()
    with trio.fail_after(10):
        if not _encodable(name):
            # Lone surrogates cannot be encoded for the wire: refused on this side.
            with pytest.raises(LocalProtocolError, match="cannot be sent"):
                await client.rpc.call("file_upload_small", name=name, data=b"x", sha256=digest)
            return
        answer = await client.rpc.call("file_upload_small", name=name, data=b"x", sha256=digest)
    assert answer["success"] is False, (name, answer)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


async def test_small_upload_limits_and_collisions(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    server = await _file_server(server_factory, tmp_path, max_file_size=100)
    client = await client_factory(server)
    sender = FileTransferHandler()
    big = tmp_path / "big.bin"
    big.write_bytes(b"b" * 101)
    small = tmp_path / "small.bin"
    small.write_bytes(b"s" * 10)
    with trio.fail_after(10):
        refused = await sender.send_to_server(client, big)
        first = await sender.send_to_server(client, small)
        small.write_bytes(b"S" * 10)  # another file under the same name
        second = await sender.send_to_server(client, small)
        again = await sender.send_to_server(client, small)  # already there (issue 13)
    assert refused["success"] is False and refused["code"] == "too_large"
    assert (first["path"], second["path"]) == ("small.bin", "small (1).bin")
    assert again["skipped"] is True and again["path"] == "small (1).bin"
    assert _visible(tmp_path / "server") == ["small (1).bin", "small.bin"]


async def test_small_push_reaches_the_client(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    handler = FileTransferHandler(storage_dir=tmp_path / "server")
    server = await server_factory(register=handler.register_server_handlers)
    receiver = FileTransferHandler(storage_dir=tmp_path / "client")
    received: list[tuple[str, dict[str, object]]] = []

    @receiver.on_file_received
    def on_file(path: str, metadata: dict[str, object]) -> None:
        received.append((path, metadata))

    client = await client_factory(server, register=receiver.register_client_handlers)
    source = tmp_path / "hello.txt"
    source.write_bytes(b"hello")
    assert client.id is not None
    with trio.fail_after(10):
        result = await handler.send_to_client(server, client.id, source)
    assert result["success"] is True, result
    assert (tmp_path / "client" / "hello.txt").read_bytes() == b"hello"
    assert received[0][1]["checksum"] == hashlib.sha256(b"hello").hexdigest()


def test_a_small_files_look_reads_it_whole_and_sees_a_size_that_changed(tmp_path: Path) -> None:
    data = os.urandom(4096)
    path = tmp_path / "four.bin"
    path.write_bytes(data)
    found = _local.probe_source(path, 64 * 1024)
    assert found.small is not None
    assert found.small.data == data and found.small.sha256 == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert _local.probe_source(empty, 64 * 1024).small == _local.SmallFile(
        b"", hashlib.sha256(b"").hexdigest()
    )
    # The size fstat gave no longer holds (the file grew, or shrank, meanwhile):
    # nothing is taken as the file.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert _local.read_small(fd, 4000) is None
        os.lseek(fd, 0, os.SEEK_SET)
        assert _local.read_small(fd, 5000) is None
        os.lseek(fd, 0, os.SEEK_SET)
        assert _local.read_small(fd, 4096) is not None
    finally:
        os.close(fd)


def test_a_fifo_is_looked_at_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert _local.probe_source(fifo, 64 * 1024) == _local.Probe()
