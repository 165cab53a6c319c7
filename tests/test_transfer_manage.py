"""Issue 13's file operations over real loopback connections and real files.

Directories in both directions, re-runs that store no second copy, delete and
rename (confined, atomic, never following links, refusing to overwrite or to
touch a file being written), and ranged downloads. Every test is bounded by
``trio.fail_after``; none asserts on speed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from conduit import Client, FileTransferHandler, RPCError, Server, TransferError
from conduit.protocol.codec import encode_value, pack
from conduit.protocol.frames import HEADER_SIZE, MIN_FRAME_SIZE
from conduit.transfer import _tree as tree_module
from conduit.transfer._answers import listing_answer
from conduit.transfer._listing import (
    ENTRY_OVERHEAD,
    LISTING_OVERHEAD,
    listing_page,
    listing_within,
)
from conduit.transfer._storage import StorageRoot
from conftest import ClientFactory, ServerFactory, client_descriptor, server_descriptor
from transfer_helpers import register_replacing

BIG = 3 * 1024 * 1024 + 7  # streamed, not sent in one call


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _visible(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and not p.is_symlink()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def _hidden(root: Path) -> list[Path]:
    return list(root.rglob(".conduit-partial-*"))


async def _pair(
    server_factory: ServerFactory, client_factory: ClientFactory, storage: Path
) -> tuple[FileTransferHandler, Client]:
    transfer = FileTransferHandler(storage_dir=storage)
    server = await server_factory(register=transfer.register_server_handlers)
    client = await client_factory(server)
    return transfer, client


def _tree(root: Path) -> Path:
    top = root / "photos"
    _write(top / "a.txt", b"hello\n")
    _write(top / "empty.bin", b"")
    _write(top / "2024" / "summer" / "beach.raw", os.urandom(BIG))
    _write(top / "2024" / "caf\u00e9.txt", b"unicode\n")
    _write(top / ".DS_Store", b"hidden")
    return top


# --------------------------------------------------------------------------- directories


async def test_send_a_directory_keeps_its_layout_and_reports_each_file(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    transfer, client = await _pair(server_factory, client_factory, tmp_path / "server")
    top = _tree(tmp_path / "local")
    os.symlink("/etc/passwd", top / "link.txt")
    os.symlink(top / "2024", top / "linkdir")
    os.mkfifo(top / "pipe")
    with trio.fail_after(60):
        result = await transfer.send_to_server(client, top)
    files = {entry["name"]: entry for entry in result["files"]}
    assert result["directory"] == "photos"
    assert result["success"] is False and result["failed"] == 3
    assert files["photos/link.txt"]["code"] == "unsafe_path"
    assert files["photos/linkdir"]["code"] == "unsafe_path"
    assert files["photos/pipe"]["code"] == "not_a_file"
    assert files["photos/.DS_Store"] == {
        "name": "photos/.DS_Store",
        "local": str(top / ".DS_Store"),
        "success": True,
        "skipped": True,
        "reason": "hidden",
    }
    for name in ("a.txt", "empty.bin", "2024/summer/beach.raw", "2024/caf\u00e9.txt"):
        entry = files[f"photos/{name}"]
        assert entry["success"] is True and "skipped" not in entry, entry
        assert entry["checksum"] == hashlib.sha256((top / name).read_bytes()).hexdigest()
    assert result["transferred"] == 4
    stored = _visible(tmp_path / "server")
    assert stored == {
        f"photos/{n}": (top / n).read_bytes()
        for n in ("a.txt", "empty.bin", "2024/summer/beach.raw", "2024/caf\u00e9.txt")
    }


async def test_directories_replaced_after_the_walk_are_not_followed_out_of_the_tree(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between the walk of a directory and the opening of its files, another
    local program replaces a subdirectory by a link to a directory outside
    the tree, an intermediate one by a link, and one by another directory
    moved into its place: every file below them is refused ``unsafe_path``
    (small ones, read for batches, and a large one, sent alone), and nothing
    from outside reaches the server. Opened by its path with ``O_NOFOLLOW``
    (a link refused only in the path's last part), each sent the outside
    file under the tree's name (a review, 2026-12-07)."""
    transfer, client = await _pair(server_factory, client_factory, tmp_path / "server")
    top = tmp_path / "local" / "top"
    _write(top / "kept.txt", b"kept\n")
    _write(top / "sub" / "small.txt", b"inside\n")
    _write(top / "sub" / "big.bin", b"i" * BIG)
    _write(top / "deep" / "er" / "small.txt", b"inside deeper\n")
    _write(top / "moved" / "small.txt", b"inside moved\n")
    outside = tmp_path / "outside"
    for directory in (outside, outside / "er"):
        _write(directory / "small.txt", b"OUTSIDE SECRET\n")
        _write(directory / "big.bin", b"O" * BIG)
    real_walk = tree_module.walk_local

    def walk_then_swap(walked: Path, prefix: str) -> Any:
        entries = real_walk(walked, prefix)
        for name, target in (("sub", outside), ("deep", outside)):
            (top / name).rename(tmp_path / f"away-{name}")
            (top / name).symlink_to(target, target_is_directory=True)
        (top / "moved").rename(tmp_path / "away-moved")
        outside.rename(top / "moved")  # a real directory, not the one walked
        outside.symlink_to(
            top / "moved", target_is_directory=True
        )  # the links above still lead there
        return entries

    monkeypatch.setattr(tree_module, "walk_local", walk_then_swap)
    with trio.fail_after(60):
        result = await transfer.send_to_server(client, top)
    files = {entry["name"]: entry for entry in result["files"]}
    assert files["top/kept.txt"]["success"] is True, files
    for name in ("sub/small.txt", "sub/big.bin", "deep/er/small.txt", "moved/small.txt"):
        entry = files[f"top/{name}"]
        assert entry["success"] is False and entry["code"] == "unsafe_path", entry
    stored = _visible(tmp_path / "server")
    assert stored == {"top/kept.txt": b"kept\n"}, sorted(stored)


async def test_a_directory_that_cannot_be_listed_is_a_failed_entry_not_an_exception(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A directory named to send that may not be read (mode 000) is the tree
    result's one failed entry, ``io_error`` "cannot read", as one below it
    is; opening it for the walk raised ``PermissionError`` (the review of the
    change that opened it so, 2026-12-07). Root reads any directory: there
    the refusal is the one the kernel gives anyone else, put in ``os.open``'s
    place for that path alone."""
    transfer, client = await _pair(server_factory, client_factory, tmp_path / "server")
    top = tmp_path / "local" / "locked"
    _write(top / "a.txt", b"a\n")
    if os.geteuid() == 0:
        real_open = os.open

        def refusing(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if os.fspath(path) == str(top):
                raise PermissionError(13, "Permission denied", str(top))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing)  # the module _tree calls
    else:
        top.chmod(0o000)
    try:
        with trio.fail_after(30):
            result = await transfer.send_to_server(client, top)
    finally:
        top.chmod(0o700)
    assert result["success"] is False and result["failed"] == 1, result
    (entry,) = result["files"]
    assert entry["code"] == "io_error" and "cannot read" in entry["error"], entry


async def test_a_directory_named_through_a_link_is_sent(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """The directory the caller names may be a link (its choice): it is walked
    and its files are sent; links below it are not followed."""
    transfer, client = await _pair(server_factory, client_factory, tmp_path / "server")
    real = _tree(tmp_path / "local")
    link = tmp_path / "album"
    link.symlink_to(real, target_is_directory=True)
    with trio.fail_after(60):
        result = await transfer.send_to_server(client, link)
    assert result["success"] is True and result["transferred"] == 4, result
    assert _visible(tmp_path / "server" / "album") == _visible(real)


async def test_directory_rerun_skips_what_arrived_and_sends_what_changed(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    transfer, client = await _pair(server_factory, client_factory, tmp_path / "server")
    top = _tree(tmp_path / "local")
    with trio.fail_after(60):
        first = await transfer.send_to_server(client, top, remote_name="backup/photos")
        assert first["success"] is True and first["directory"] == "backup/photos"
        again = await transfer.send_to_server(client, top, remote_name="backup/photos")
        assert again["success"] is True and again["transferred"] == 0
        for entry in again["files"]:
            assert entry["skipped"] is True, entry
        before = _visible(tmp_path / "server")
        _write(top / "a.txt", b"HELLO\n")  # same size, different bytes
        third = await transfer.send_to_server(client, top, remote_name="backup/photos")
    after = _visible(tmp_path / "server")
    assert third["transferred"] == 1
    assert after.pop("backup/photos/a (1).txt") == b"HELLO\n"
    assert after == before
    assert not _hidden(tmp_path / "server")


async def test_receive_a_directory_and_rerun(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    _, client = await _pair(server_factory, client_factory, tmp_path / "server")
    _tree(tmp_path / "server")
    os.symlink("/etc", tmp_path / "server" / "photos" / "etc")  # never listed, never followed
    local = FileTransferHandler(storage_dir=tmp_path / "unused")
    out = tmp_path / "out"
    with trio.fail_after(60):
        result = await local.receive_from_server(client, "photos", local_dir=out)
        assert result["success"] is True, result
        again = await local.receive_from_server(client, "photos", local_dir=out)
    expected = {name: data for name, data in _visible(tmp_path / "server").items() if "/" in name}
    assert _visible(out) == expected
    assert result["transferred"] == 4 and result["directory"] == "photos"
    assert again["success"] is True and again["skipped"] == 4, again
    assert all(e["reason"] == "already_there" for e in again["files"])
    assert not (out / "photos" / "etc").exists()


async def test_list_files_with_a_prefix(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    transfer, client = await _pair(server_factory, client_factory, tmp_path / "server")
    _write(tmp_path / "server" / "a" / "x.txt", b"x")
    _write(tmp_path / "server" / "ab.txt", b"y")
    _write(tmp_path / "server" / "a" / "b" / "y.txt", b"y")
    with trio.fail_after(10):
        names = [f["name"] for f in await transfer.list_files(client, prefix="a")]
        assert names == ["a/b/y.txt", "a/x.txt"]
        assert await transfer.list_files(client, prefix="missing") == []
        with pytest.raises(RPCError) as refused:
            await transfer.list_files(client, prefix="../etc")
        assert refused.value.code == "unsafe_path"


# --------------------------------------------------------------------------- re-runs


@pytest.mark.parametrize("size", [300, BIG])
async def test_single_file_rerun_is_skipped_and_a_different_file_is_kept(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path, size: int
) -> None:
    transfer, client = await _pair(server_factory, client_factory, tmp_path / "server")
    source = _write(tmp_path / "local" / "f.bin", os.urandom(size))
    with trio.fail_after(60):
        first = await transfer.send_to_server(client, source)
        again = await transfer.send_to_server(client, source)
        assert first["success"] is True and "skipped" not in first
        assert again["success"] is True and again["skipped"] is True
        assert again["reason"] == "already_there" and again["checksum"] == first["checksum"]
        assert again["path"] == "f.bin"
        other = _write(tmp_path / "other" / "f.bin", os.urandom(size))
        third = await transfer.send_to_server(client, other)
        fourth = await transfer.send_to_server(client, other)  # found under its variant
    assert third["success"] is True and third["path"] == "f (1).bin"
    assert fourth["skipped"] is True and fourth["path"] == "f (1).bin"
    assert _visible(tmp_path / "server") == {
        "f.bin": source.read_bytes(),
        "f (1).bin": other.read_bytes(),
    }


async def test_download_rerun_is_skipped_not_copied(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    transfer, client = await _pair(server_factory, client_factory, tmp_path / "server")
    data = os.urandom(BIG)
    _write(tmp_path / "server" / "big.bin", data)
    out = tmp_path / "out"
    with trio.fail_after(60):
        for _ in range(3):
            result = await transfer.receive_from_server(client, "big.bin", local_dir=out)
            assert result["success"] is True
        assert result["skipped"] is True and result["reason"] == "already_there"
        assert result["path"] == str(out / "big.bin")
        _write(out / "big.bin", os.urandom(BIG))  # a different local file: kept, not replaced
        changed = await transfer.receive_from_server(client, "big.bin", local_dir=out)
    assert changed["success"] is True and "skipped" not in changed
    assert (out / "big (1).bin").read_bytes() == data
    assert len(_visible(out)) == 2


@pytest.mark.parametrize("direction", ["download", "upload"])
async def test_a_rerun_past_a_directory_taking_the_name_is_skipped(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path, direction: str
) -> None:
    # The first copy went past a directory holding the name ("f (1).bin"); a
    # re-run must find it there, not store "f (2).bin", "f (3).bin", ...
    transfer, client = await _pair(server_factory, client_factory, tmp_path / "server")
    data = os.urandom(BIG)
    source = tmp_path / ("server" if direction == "download" else "outbox") / "f.bin"
    _write(source, data)
    target = tmp_path / "out" if direction == "download" else tmp_path / "server" / "in"
    (target / "f.bin").mkdir(parents=True)
    with trio.fail_after(60):
        for _ in range(3):
            if direction == "download":
                result = await transfer.receive_from_server(client, "f.bin", local_dir=target)
            else:
                result = await transfer.send_to_server(client, source, remote_name="in/f.bin")
            assert result["success"] is True, result
    assert result["skipped"] is True and result["reason"] == "already_there", result
    assert (target / "f (1).bin").read_bytes() == data
    assert sorted(path.name for path in target.iterdir()) == ["f (1).bin", "f.bin"]


# --------------------------------------------------------------------------- delete and rename


async def test_delete(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "server"
    transfer, client = await _pair(server_factory, client_factory, storage)
    _write(storage / "dir" / "deeper" / "a.txt", b"a")
    _write(storage / "dir" / "b.txt", b"b")
    _write(tmp_path / "outside.txt", b"keep me")
    os.symlink(tmp_path / "outside.txt", storage / "link.txt")
    with trio.fail_after(10):
        deleted = await transfer.delete(client, "dir/deeper/a.txt")
        assert deleted == {"success": True, "path": "dir/deeper/a.txt"}
        # The directory it leaves empty goes with it; one still holding a file stays.
        assert not (storage / "dir" / "deeper").exists()
        assert (storage / "dir" / "b.txt").read_bytes() == b"b"
        missing = await transfer.delete(client, "dir/deeper/a.txt")
        assert missing["success"] is False and missing["code"] == "not_found"
        link = await transfer.delete(client, "link.txt")
        assert link["code"] == "unsafe_path"
        assert (storage / "link.txt").is_symlink()
        directory = await transfer.delete(client, "dir")
        assert directory["code"] == "unsafe_path" and (storage / "dir").is_dir()
        assert await transfer.delete(client, "dir/b.txt") == {"success": True, "path": "dir/b.txt"}
        assert not (storage / "dir").exists() and storage.is_dir()
        for bad in ("../outside.txt", "/etc/passwd", ".hidden"):
            refused = await transfer.delete(client, bad)
            assert refused["success"] is False and refused["code"] == "unsafe_path", bad
    assert (tmp_path / "outside.txt").read_bytes() == b"keep me"


async def test_rename(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "server"
    transfer, client = await _pair(server_factory, client_factory, storage)
    _write(storage / "a.txt", b"a")
    _write(storage / "b.txt", b"b")
    os.symlink(tmp_path, storage / "escape")
    with trio.fail_after(10):
        moved = await transfer.rename(client, "a.txt", "new/dir/a2.txt")
        assert moved == {"success": True, "old": "a.txt", "path": "new/dir/a2.txt"}
        taken = await transfer.rename(client, "new/dir/a2.txt", "b.txt")
        assert taken["success"] is False and taken["code"] == "exists"
        assert _visible(storage) == {"new/dir/a2.txt": b"a", "b.txt": b"b"}
        replaced = await transfer.rename(client, "new/dir/a2.txt", "b.txt", overwrite=True)
        assert replaced["success"] is True
        assert _visible(storage) == {"b.txt": b"a"}
        assert not (storage / "new").exists()  # left empty by the rename: pruned
        gone = await transfer.rename(client, "a.txt", "c.txt")
        assert gone["code"] == "not_found"
        (storage / "adir").mkdir()
        for overwrite in (False, True):
            onto_a_directory = await transfer.rename(client, "b.txt", "adir", overwrite=overwrite)
            # Said so, not "already exists" (a review, 2026-12-07).
            assert onto_a_directory["code"] == "exists", onto_a_directory
            assert "is a directory" in onto_a_directory["error"], onto_a_directory
        (storage / "adir").rmdir()
        through_link = await transfer.rename(client, "b.txt", "escape/b.txt")
        assert through_link["code"] == "unsafe_path"
        link_source = await transfer.rename(client, "escape", "e2")
        assert link_source["code"] == "unsafe_path"
        bad = await transfer.rename(client, "b.txt", "../b.txt")
        assert bad["code"] == "unsafe_path"
    assert _visible(storage) == {"b.txt": b"a"} and not (tmp_path / "b.txt").exists()


async def test_delete_and_rename_refuse_a_file_being_written(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "server"
    transfer, client = await _pair(server_factory, client_factory, storage)
    _write(storage / "d" / "f.bin", b"old")
    _write(storage / "g.bin", b"g")
    # An upload of a new d/f.bin in progress holds its partial file's lock.
    partial = StorageRoot(storage).open_partial("d/f.bin", "t" * 32, resume=False)
    try:
        with trio.fail_after(10):
            assert (await transfer.delete(client, "d/f.bin"))["code"] == "busy"
            assert (await transfer.rename(client, "d/f.bin", "x.bin"))["code"] == "busy"
            into = await transfer.rename(client, "g.bin", "d/f.bin", overwrite=True)
            assert into["code"] == "busy"
    finally:
        partial.close()
    with trio.fail_after(10):
        assert (await transfer.delete(client, "d/f.bin"))["success"] is True
    assert _visible(storage) == {"g.bin": b"g"}


async def test_a_file_is_not_busy_while_a_name_ending_like_it_is_written(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """``x-b.bin``'s partial (``.conduit-partial-ID-x-b.bin``) also ends in
    ``-b.bin``: it must not make ``b.bin`` busy, long names (whose partial name
    is shortened) included."""
    storage = tmp_path / "server"
    transfer, client = await _pair(server_factory, client_factory, storage)
    long_name = "n" * 240 + ".bin"
    for name in ("b.bin", long_name):
        _write(storage / name, b"published")
    writing = [
        StorageRoot(storage).open_partial(name, "t" * 32, resume=False)
        for name in ("x-b.bin", "x-" + long_name)
    ]
    try:
        with trio.fail_after(10):
            assert (await transfer.rename(client, "b.bin", "c.bin"))["success"] is True
            assert (await transfer.delete(client, long_name))["success"] is True
            assert (await transfer.delete(client, "c.bin"))["success"] is True
    finally:
        for partial in writing:
            partial.close()
    assert _visible(storage) == {}


async def test_a_failed_rename_leaves_no_directories_behind(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file is deleted (by another connection) between the rename's checks and
    its move, after the new name's directories were made: the rename fails with
    ``not_found``, and those directories go too, or each such try would leave up
    to 63 directories that no quota counts."""
    storage = tmp_path / "server"
    transfer, client = await _pair(server_factory, client_factory, storage)
    _write(storage / "kept" / "other.bin", b"other")
    _write(storage / "a.bin", b"a")
    real_move = StorageRoot._move

    def deleted_meanwhile(src_fd: int, src_base: str, *args: Any) -> None:
        os.unlink(src_base, dir_fd=src_fd)
        real_move(src_fd, src_base, *args)

    monkeypatch.setattr(StorageRoot, "_move", staticmethod(deleted_meanwhile))
    with trio.fail_after(10):
        failed = await transfer.rename(client, "a.bin", "new/deep/dirs/b.bin")
        assert failed["code"] == "not_found", failed
        _write(storage / "c.bin", b"c")
        kept = await transfer.rename(client, "c.bin", "kept/c.bin")
        assert kept["code"] == "not_found", kept
    assert sorted(p.relative_to(storage).as_posix() for p in storage.rglob("*")) == [
        "kept",
        "kept/other.bin",
    ]


def test_directories_delete_and_rename_under_asyncio(tmp_path: Path) -> None:
    storage = tmp_path / "server"
    _write(storage / "a.txt", b"a")
    top = _tree(tmp_path / "local")

    async def main() -> dict[str, Any]:
        transfer = FileTransferHandler(storage_dir=storage)
        server = Server(server_descriptor())
        transfer.register_server_handlers(server)
        task = asyncio.create_task(server.run())
        await asyncio.wait_for(server.wait_listening(), 5)
        try:
            async with Client(client_descriptor(server.port)) as client:
                sent = await transfer.send_to_server(client, top)
                assert sent["success"] is True and sent["transferred"] == 4, sent
                got = await transfer.receive_from_server(
                    client, "photos", local_dir=tmp_path / "out"
                )
                assert got["success"] is True and got["transferred"] == 4, got
                moved = await transfer.rename(client, "a.txt", "b.txt")
                assert moved["success"] is True
                return await transfer.delete(client, "b.txt")
        finally:
            await server.close()
            await asyncio.wait_for(task, 5)

    assert asyncio.run(asyncio.wait_for(main(), 30)) == {"success": True, "path": "b.txt"}
    assert _visible(storage) == {
        f"photos/{n}": (top / n).read_bytes()
        for n in ("a.txt", "empty.bin", "2024/summer/beach.raw", "2024/caf\u00e9.txt")
    }
    assert _visible(tmp_path / "out") == _visible(storage)


# --------------------------------------------------------------------------- ranges


async def test_ranged_download(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    transfer, client = await _pair(server_factory, client_factory, tmp_path / "server")
    data = os.urandom(BIG)
    _write(tmp_path / "server" / "r" / "big.bin", data)
    out = tmp_path / "out"
    cases = [(0, 10), (1_000_000, 2_000_000), (BIG - 5, 100), (BIG, None), (17, None)]
    with trio.fail_after(60):
        for offset, length in cases:
            result = await transfer.receive_from_server(
                client, "r/big.bin", local_dir=out, offset=offset, length=length
            )
            expected = data[offset:] if length is None else data[offset : offset + length]
            name = f"r/big.bin.range-{offset}-{len(expected)}"
            assert result["success"] is True, result
            assert result["path"] == str(out / name)
            assert (out / name).read_bytes() == expected
            assert result["checksum"] == hashlib.sha256(expected).hexdigest()
            assert result["size"] == len(expected)
            assert result["range_offset"] == offset
            assert result["range_length"] == len(expected)
        past = await transfer.receive_from_server(
            client, "r/big.bin", local_dir=out, offset=BIG + 1, length=1
        )
        negative = await transfer.receive_from_server(client, "r/big.bin", local_dir=out, offset=-1)
    assert past["success"] is False and past["code"] == "invalid_range"
    assert negative["success"] is False and negative["code"] == "invalid_range"
    assert not (out / "r" / "big.bin").exists()  # a part never passes for the whole
    assert not _hidden(out)


async def test_a_range_of_a_file_with_a_longest_name_is_saved_under_a_shortened_one(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    # NAME.range-OFF-LEN is longer than a file name may be (255 bytes) when
    # NAME nearly is: it was refused as unsafe_path. Now the name is
    # shortened, with a digest of it, as a partial file's is: two such
    # names do not meet.
    transfer, client = await _pair(server_factory, client_factory, tmp_path / "server")
    names = [f"r/{'é' * 120}{tail}.bin" for tail in ("a", "b")]  # 250 bytes each
    out = tmp_path / "out"
    saved = []
    with trio.fail_after(30):
        for index, name in enumerate(names):
            _write(tmp_path / "server" / name, bytes([index]) * 100)
            result = await transfer.receive_from_server(
                client, name, local_dir=out, offset=10, length=20
            )
            assert result["success"] is True, result
            path = Path(result["path"])
            assert path.name.endswith(".range-10-20") and len(path.name.encode()) <= 255
            assert path.read_bytes() == bytes([index]) * 20
            saved.append(path)
    assert saved[0] != saved[1]


async def test_server_refuses_a_bad_range_from_a_raw_call(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    _, client = await _pair(server_factory, client_factory, tmp_path / "server")
    _write(tmp_path / "server" / "f.bin", b"x" * 100)
    connection = client.server.connection
    with trio.fail_after(10):
        for offset, length in [(101, 1), (-1, 5), (0, -3)]:
            stream = connection.open_incoming_stream()
            with pytest.raises(RPCError) as refused:
                await client.call(
                    "file_download",
                    name="f.bin",
                    stream_id=stream.stream_id,
                    size=100,
                    offset=0,
                    prefix_sha256="",
                    range_offset=offset,
                    range_length=length,
                )
            connection.close_stream(stream)
            assert refused.value.code == "invalid_range", (offset, length)


async def test_a_download_naming_a_stream_id_of_the_servers_parity_is_refused_first(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """``file_download(stream_id=2)``: an id the server allocates itself (its
    uploads' streams), not one a client may give. Refused ``invalid_arguments``
    before the server takes a slot or opens the file; it answered, then
    stopped the download when it opened the stream (the review of that
    check's diff, 2026-12-07)."""
    transfer, client = await _pair(server_factory, client_factory, tmp_path / "server")
    _write(tmp_path / "server" / "f.bin", b"x" * 100)
    slots = transfer._sender._slots
    with trio.fail_after(10):
        with pytest.raises(RPCError, match="a client allocates odd ids") as refused:
            await client.call(
                "file_download", name="f.bin", stream_id=2, size=100, offset=0, prefix_sha256=""
            )
        assert refused.value.code == "invalid_arguments"
        assert slots.total == 0
        assert await client.call("file_stat", name="f.bin")  # the connection goes on


# --------------------------------------------------------------------------- a server's answers


def _listed(name: Any, size: Any = 1, modified: Any = 0.0) -> dict[str, Any]:
    return {"files": [{"name": name, "size": size, "modified": modified}]}


#: ``file_list`` answers a hostile server may give for ``prefix="photos"``.
_BAD_LISTINGS: dict[str, Any] = {
    "not-a-map": 5,
    "nothing": None,
    "a-list": [],
    "no-files": {},
    "files-not-a-list": {"files": 7},
    "an-entry-not-a-map": {"files": [5]},
    "a-name-not-text": _listed(5),
    "outside-the-prefix": _listed("docs/important.txt"),
    "the-prefix-itself": _listed("photos"),
    "dot-dot": _listed("photos/../docs/important.txt"),
    "absolute": _listed("/etc/passwd"),
    "an-escape-sequence": _listed("photos/a\x1b[2J.txt"),
    "a-size-not-a-number": _listed("photos/a.txt", size="many"),
    "a-size-that-is-a-bool": _listed("photos/a.txt", size=True),
    "a-negative-size": _listed("photos/a.txt", size=-1),
    "no-modified": {"files": [{"name": "photos/a.txt", "size": 1}]},
    "a-next-not-on-the-page": {**_listed("photos/a.txt"), "truncated": True, "next": "photos/z"},
    "a-next-of-a-whole-listing": {**_listed("photos/a.txt"), "next": "photos/a.txt"},
    "a-next-not-text": {**_listed("photos/a.txt"), "truncated": True, "next": 5},
    "names-out-of-order": {
        "files": [
            {"name": "photos/c.txt", "size": 1, "modified": 0.0},
            {"name": "photos/b.txt", "size": 1, "modified": 0.0},
        ],
    },
    "a-name-twice": {
        "files": [{"name": "photos/a.txt", "size": 1, "modified": 0.0}] * 2,
    },
}


async def _serving_a_listing(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    file_list: Callable[..., Awaitable[Any]],
) -> tuple[Client, FileTransferHandler, Path]:
    """A server storing ``photos/a.txt`` whose ``file_list`` is ``file_list``; a
    client of it, a handler to list and download with, and where to."""
    transfer = FileTransferHandler(storage_dir=tmp_path / "server")
    _write(tmp_path / "server" / "photos" / "a.txt", b"a")

    def register(server: Server) -> None:
        transfer.register_server_handlers(server)
        server.register_rpc(file_list, "file_list")

    server = await server_factory(register=register)
    client = await client_factory(server)
    return client, FileTransferHandler(storage_dir=tmp_path / "unused"), tmp_path / "out"


@pytest.mark.parametrize("case", sorted(_BAD_LISTINGS))
async def test_a_malformed_listing_is_a_bad_answer_and_fetches_nothing(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path, case: str
) -> None:
    """``list_files`` checks the server's answer (until 2026-12-07 it took
    whatever came: ``conduit get photos`` then wrote, and with
    ``--overwrite`` replaced, ``docs/important.txt`` in its output
    directory; a listing of another shape raised ``TypeError`` out of it);
    a directory download of such a listing fetches nothing."""

    async def file_list(prefix: str = "") -> Any:
        return _BAD_LISTINGS[case]

    client, local, out = await _serving_a_listing(
        server_factory, client_factory, tmp_path, file_list
    )
    with trio.fail_after(30):
        with pytest.raises(TransferError) as refused:
            await local.list_files(client, prefix="photos")
        assert refused.value.code == "bad_answer", refused.value
        result = await local.receive_from_server(client, "photos", local_dir=out)
    assert result["success"] is False and result["code"] == "bad_answer", result
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.parametrize(
    "answer",
    [
        5,
        None,
        {"nofiles": 1},
        {"success": False},
        [1, 2],
        {"success": True, "path": ["a.txt"]},
        {"success": True, "old": 7, "path": "b.txt"},
    ],
)
async def test_a_malformed_answer_to_delete_or_rename_is_a_bad_answer(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path, answer: Any
) -> None:
    """Until 2026-12-07 ``dict(answer)`` raised ``TypeError`` or ``ValueError``
    out of ``delete`` and ``rename`` (a traceback from ``conduit rm``), or
    took a map without ``success`` for a result; and a name (``path``,
    ``old``) that was not a string was handed on as the result's."""
    transfer = FileTransferHandler(storage_dir=tmp_path / "server")

    def register(server: Server) -> None:
        transfer.register_server_handlers(server)

        async def hostile(**_ignored: Any) -> Any:
            return answer

        server.register_rpc(hostile, "file_delete")
        server.register_rpc(hostile, "file_rename")

    server = await server_factory(register=register)
    client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "unused")
    with trio.fail_after(30):
        deleted = await local.delete(client, "a.txt")
        renamed = await local.rename(client, "a.txt", "b.txt")
    for result in (deleted, renamed):
        assert result["success"] is False and result["code"] == "bad_answer", result


async def test_max_file_size_bounds_downloads_too(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """The receiver's ``max_file_size`` holds for what a client downloads, a
    file the server picks in a directory download among them (until
    2026-12-07 only uploads and pushes were checked): ``too_large``, and
    nothing written."""
    _, client = await _pair(server_factory, client_factory, tmp_path / "server")
    _write(tmp_path / "server" / "big.bin", os.urandom(5000))
    _write(tmp_path / "server" / "photos" / "large.bin", os.urandom(3000))
    _write(tmp_path / "server" / "photos" / "small.bin", b"s" * 500)
    _write(tmp_path / "server" / "huge.bin", os.urandom(BIG))
    local = FileTransferHandler(storage_dir=tmp_path / "unused", max_file_size=1000)
    out = tmp_path / "out"
    with trio.fail_after(60):
        for name in ("big.bin", "huge.bin"):
            single = await local.receive_from_server(client, name, local_dir=out)
            assert single["success"] is False and single["code"] == "too_large", single
        tree = await local.receive_from_server(client, "photos", local_dir=out)
    outcomes = {entry["name"]: entry.get("code", "ok") for entry in tree["files"]}
    assert outcomes == {"photos/large.bin": "too_large", "photos/small.bin": "ok"}, tree
    assert _visible(out) == {"photos/small.bin": b"s" * 500}


async def test_a_download_refused_before_any_byte_leaves_nothing_in_the_destination(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """A server that lists files and then refuses each ``file_download`` (the
    file deleted since its ``file_stat``, or a hostile server listing many
    names): the downloads fail, and the destination holds neither their empty
    hidden partials nor the directories made for them (a review found 20
    partials and 21 directories left for good after 20 such names). A
    directory that was there before stays, empty or not."""
    transfer = FileTransferHandler(storage_dir=tmp_path / "server")
    for index in range(3):  # over the small-file limit: one download each, not a batch
        _write(tmp_path / "server" / "d" / f"s{index}" / "f.bin", b"x" * 100_000)

    async def file_download(**_ignored: Any) -> dict[str, Any]:
        raise RPCError("gone since", "not_found")

    server = await server_factory(
        register=register_replacing(transfer, "file_download", file_download)
    )
    client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "unused")
    out = tmp_path / "out"
    (out / "d" / "mine").mkdir(parents=True)  # the user's own, empty
    with trio.fail_after(30):
        result = await local.receive_from_server(client, "d", local_dir=out)
        single = await local.receive_from_server(client, "d/s0/f.bin", local_dir=out)
    assert result["success"] is False and result["failed"] == 3, result
    assert single["success"] is False and single["code"] == "not_found", single
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert left == ["d", "d/mine"], left


def test_a_download_into_a_directory_that_cannot_take_it_is_a_result(tmp_path: Path) -> None:
    """The destination is a regular file (or read-only): the download's result
    says so, under asyncio as under Trio, naming the file asked for; it
    raised an OSError naming the hidden partial (a review, 2026-12-07),
    which in a nursery of downloads cancelled the others."""
    storage = tmp_path / "server"
    _write(storage / "f.bin", b"x" * 10)
    _write(storage / "big.bin", os.urandom(BIG))
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_bytes(b"")

    async def main() -> list[dict[str, Any]]:
        transfer = FileTransferHandler(storage_dir=storage)
        server = Server(server_descriptor(port=0))
        transfer.register_server_handlers(server)
        task = asyncio.create_task(server.run())
        try:
            port = await server.wait_listening()
            async with Client(client_descriptor(port)) as client:
                local = FileTransferHandler(storage_dir=tmp_path / "unused")
                return [
                    await local.receive_from_server(client, name, local_dir=not_a_directory)
                    for name in ("f.bin", "big.bin")
                ]
        finally:
            await server.close()
            task.cancel()

    results = asyncio.run(main())
    for name, result in zip(("f.bin", "big.bin"), results, strict=True):
        assert result["success"] is False and result["code"] == "io_error", result
        assert result["error"].startswith(f"cannot store {name!r} in {str(not_a_directory)!r}: ")
        assert ".conduit-partial" not in result["error"], result
    assert not_a_directory.read_bytes() == b""


async def test_a_download_whose_data_never_comes_fails_stalled_and_keeps_its_partial(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """A server that answers ``file_download`` and then sends nothing (while
    it answers heartbeats): the download fails ``stalled`` after twice the
    client's ``heartbeat_timeout`` (here 2 x 1 s), its partial kept for a
    resume had it held bytes (this one, empty, is removed). Until 2026-12-07
    it waited for as long as the connection lived. The same file from an
    honest server then downloads whole."""
    transfer = FileTransferHandler(storage_dir=tmp_path / "server")
    data = os.urandom(BIG)
    _write(tmp_path / "server" / "big.bin", data)
    answered: list[int] = []

    async def file_download(stream_id: int, **_ignored: Any) -> dict[str, int]:
        answered.append(stream_id)
        return {"offset": 0}  # and never a byte

    hostile = await server_factory(
        register=register_replacing(transfer, "file_download", file_download)
    )
    client = await client_factory(hostile, heartbeat_interval=0.2, heartbeat_timeout=1.0)
    local = FileTransferHandler(storage_dir=tmp_path / "unused")
    out = tmp_path / "out"
    with trio.fail_after(30):
        stalled = await local.receive_from_server(client, "big.bin", local_dir=out)
    assert stalled["success"] is False and stalled["code"] == "stalled", stalled
    assert answered and client.connected
    assert not (out / "big.bin").exists()
    honest = await client_factory(await server_factory(register=transfer.register_server_handlers))
    with trio.fail_after(30):
        whole = await local.receive_from_server(honest, "big.bin", local_dir=out)
    assert whole["success"] is True, whole
    assert (out / "big.bin").read_bytes() == data


async def test_a_listing_is_cut_to_what_fits_in_the_callers_frame(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """Long names: the answer is cut (``truncated``, with the ``next`` page's
    start) where it would pass the caller's ``max_frame_size``, well below
    ``max_listed``, and the directory's download goes page after page. Until
    2026-12-07 the whole call failed (``bad_result``: "RESULT of ... bytes
    exceeds the peer's max_frame_size"): the directory could be neither
    listed nor downloaded (a review: 300 files of 4 KB names, at the default
    1 MiB)."""
    storage = tmp_path / "server"
    names = [f"long/{'x' * 200}{index:04d}.txt" for index in range(2 * MIN_FRAME_SIZE // 250)]
    for name in names:
        _write(storage / name, name[-8:].encode())
    transfer = FileTransferHandler(storage_dir=storage)
    server = await server_factory(register=transfer.register_server_handlers)
    client = await client_factory(server, max_frame_size=MIN_FRAME_SIZE)
    local = FileTransferHandler(storage_dir=tmp_path / "unused")
    out = tmp_path / "out"
    with trio.fail_after(60):
        whole = await local.list_files(client)
        under = await local.list_files(client, prefix="long")
        fetched = await local.receive_from_server(client, "long", local_dir=out)
    for listing in (whole, under):
        assert listing.truncated and listing.next == listing[-1]["name"]
        assert [entry["name"] for entry in listing] == sorted(names)[: len(listing)]
        # As many as fit, with the envelope's room kept and the last name
        # again as "next": not one more.
        per_entry = ENTRY_OVERHEAD + len(names[0])
        left = MIN_FRAME_SIZE - len(listing) * per_entry - len(names[0])
        assert LISTING_OVERHEAD <= left < LISTING_OVERHEAD + per_entry
    assert fetched["success"] is True, fetched
    assert sorted(entry["name"] for entry in fetched["files"]) == sorted(names)
    for name in names:
        assert (out / name).read_bytes() == name[-8:].encode()


@pytest.mark.parametrize("room", [MIN_FRAME_SIZE, 20_000, 1 << 20])
def test_a_cut_listing_always_fits_its_frame_whatever_its_entries(room: int) -> None:
    """The bound ``listing_within`` counts per entry is an upper bound of what
    the codec packs (names at each string-header boundary, in 1- to 4-byte
    UTF-8, the largest sizes, a time as int or float), and the envelope's room
    covers the rest: the RESULT frame never passes ``room``."""
    widths = {1: "x", 2: "é", 3: "€", 4: "😀"}
    name_bytes = [1, 31, 32, 255, 256, 4096, 65_536]
    names = [widths[width] * max(1, size // width) for width in widths for size in name_bytes]
    sizes = [0, 127, 128, 2**31, 2**63 - 1, 2**64 - 1]
    times: list[float] = [0, 0.5, 2**62, 1e308]
    for name in names:
        for size in sizes:
            for modified in times:
                entry = {"name": name, "size": size, "modified": modified}
                assert len(pack(entry)) <= len(name.encode()) + ENTRY_OVERHEAD, entry
    rng = random.Random(room)
    for _ in range(100):
        entries = [
            {"name": rng.choice(names), "size": rng.choice(sizes), "modified": rng.choice(times)}
            for _ in range(rng.randint(1, 400))
        ]
        kept, truncated = listing_within(entries, 10_000, room)
        answer: dict[str, Any] = {"files": kept, **({"truncated": True} if truncated else {})}
        assert len(encode_value(2**32 - 1, answer)) - HEADER_SIZE <= room
        assert truncated == (len(kept) < len(entries))


async def test_a_page_that_lists_what_came_before_is_a_bad_answer(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    """A hostile server's third page names a file of the second: the directory
    download and ``list_all_files`` (``conduit ls``) stop there
    (``bad_answer``), fetching nothing,
    instead of listing without end or fetching a file twice at once. (A page
    of names before the last page's is no fault: a store's order may not be
    the names', so the check is across every page gathered.)"""

    async def file_list(prefix: str = "", after: str | None = None) -> Any:
        if after is None:
            return {**_listed("photos/b.txt"), "truncated": True, "next": "photos/b.txt"}
        return {**_listed("photos/a.txt"), "truncated": True, "next": "photos/a.txt"}

    client, local, out = await _serving_a_listing(
        server_factory, client_factory, tmp_path, file_list
    )
    with trio.fail_after(30):
        result = await local.receive_from_server(client, "photos", local_dir=out)
        second = await local.list_files(client, prefix="photos", after="photos/b.txt")
        with pytest.raises(TransferError) as refused:
            await local.list_all_files(client)
    assert result["success"] is False and result["code"] == "bad_answer", result
    assert "listed 'photos/a.txt' again, on a later page" in result["error"], result
    assert [entry["name"] for entry in second] == ["photos/a.txt"]
    assert refused.value.code == "bad_answer"
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.parametrize("max_listed", [0, -1, True, 2.5])
def test_a_handler_that_could_list_nothing_is_refused(tmp_path: Path, max_listed: Any) -> None:
    """``max_listed=0`` answered every listing with no file and no next page:
    a directory could never be listed or downloaded."""
    with pytest.raises(ValueError, match="max_listed must be at least 1"):
        FileTransferHandler(storage_dir=tmp_path, max_listed=max_listed)


def test_a_page_is_sorted_and_goes_on_from_its_last_in_the_storages_order() -> None:
    """The storage's first files in its own order (SeaweedFS's, not the
    names'): the answer sorts them, and its ``next`` is the last in the
    storage's order, which the client takes though it is not the page's last
    name; a ``next`` not on the page is refused."""
    in_store_order = [
        {"name": name, "size": 1, "modified": 0.0}
        for name in ("d/a/b", "d/a/c", "d/a-z.txt", "d/a.txt")
    ]
    answer = listing_page(in_store_order, 3, 1 << 20)
    assert [entry["name"] for entry in answer["files"]] == ["d/a-z.txt", "d/a/b", "d/a/c"]
    assert answer["truncated"] is True and answer["next"] == "d/a-z.txt", answer
    page = listing_answer(answer, "d")
    assert page.next == "d/a-z.txt" and page.truncated
    whole = listing_page(in_store_order, 10, 1 << 20)
    assert "next" not in whole and "truncated" not in whole
    assert [entry["name"] for entry in whole["files"]] == sorted(
        entry["name"] for entry in in_store_order
    )
    with pytest.raises(TransferError, match="not a name of a cut listing"):
        listing_answer({**answer, "next": "d/a.txt"}, "d")


@pytest.mark.parametrize("after", [5, "../etc", "/abs", ".hidden", "a\x00b"])
async def test_a_listing_after_a_name_no_listing_gives_is_refused(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path, after: Any
) -> None:
    """The next page's start is a name (a listing gave it), checked as every
    name from the network is; a name that no longer exists is fine."""
    _, client = await _pair(server_factory, client_factory, tmp_path / "server")
    for name in ("a.txt", "b.txt"):
        _write(tmp_path / "server" / name, name.encode())
    with trio.fail_after(10):
        after_a = await client.call("file_list", after="a.txt")
        after_gone = await client.call("file_list", after="a.zip")
        with pytest.raises(RPCError) as refused:
            await client.call("file_list", after=after)
    assert [entry["name"] for entry in after_a["files"]] == ["b.txt"], after_a
    assert [entry["name"] for entry in after_gone["files"]] == ["b.txt"], after_gone
    assert refused.value.code == "invalid_arguments", refused.value


async def test_a_directory_listing_gathers_no_more_than_this_side_takes(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Page after page, up to ``MAX_GATHERED_FILES`` files or
    ``MAX_GATHERED_NAME_BYTES`` of names: a server that listed without end must
    not take all of this side's memory; past either, the download is cut."""
    from conduit.transfer import _listing

    storage = tmp_path / "server"
    for index in range(9):
        _write(storage / "d" / f"f{index}.txt", b"%d" % index)
    transfer = FileTransferHandler(storage_dir=storage, max_listed=2)
    server = await server_factory(register=transfer.register_server_handlers)
    client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "unused")
    monkeypatch.setattr(_listing, "MAX_GATHERED_FILES", 5)
    with trio.fail_after(30):
        by_count = await local.receive_from_server(client, "d", local_dir=tmp_path / "a")
    monkeypatch.setattr(_listing, "MAX_GATHERED_FILES", 1000)
    monkeypatch.setattr(_listing, "MAX_GATHERED_NAME_BYTES", 3 * len("d/f0.txt"))
    with trio.fail_after(30):
        by_bytes = await local.receive_from_server(client, "d", local_dir=tmp_path / "b")
    assert by_count["code"] == "truncated" and len(by_count["files"]) == 6, by_count
    assert by_bytes["code"] == "truncated" and len(by_bytes["files"]) == 4, by_bytes
    assert all(entry["success"] for entry in by_count["files"] + by_bytes["files"])
