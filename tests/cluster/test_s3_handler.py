"""``FileTransferHandler(storage_dir="s3://...")`` in one process, on a real SeaweedFS.

Every transfer path of the guide against the object store (uploads big and
small, batches, re-runs, listing, stat, downloads whole, resumed and ranged,
delete, rename, directory trees) and the bad input a peer may send (hostile
names, lies about sizes and checksums). The multi-node behaviour is in
``test_s3_cluster.py``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from conduit import Client, FileTransferHandler, Server
from conduit.cluster.s3 import S3Store
from conduit.errors import RPCError
from conftest import ClientFactory, ServerFactory
from transfer_helpers import record_calls

MiB = 1024 * 1024


async def _served(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    s3_url: str,
    **settings: Any,
) -> tuple[FileTransferHandler, Server, Client, list[tuple[str, dict[str, Any]]]]:
    handler = FileTransferHandler(storage_dir=s3_url, **settings)
    received: list[tuple[str, dict[str, Any]]] = []

    @handler.on_file_received
    def on_file(_client: Any, path: str, metadata: dict[str, Any]) -> None:
        received.append((path, metadata))

    server = await server_factory(handler.register_server_handlers)
    client = await client_factory(server)
    return handler, server, client, received


def _write(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.usefixtures("aws_environment")
async def test_upload_list_stat_download_delete_rename_on_s3(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    s3_url: str,
    s3_client_factory: Callable[[], Any],
    tmp_path: Path,
) -> None:
    with trio.fail_after(120):
        handler, _server, client, received = await _served(server_factory, client_factory, s3_url)
        big, small = tmp_path / "out" / "big.bin", tmp_path / "out" / "small.txt"
        big_sum = await trio.to_thread.run_sync(_write, big, 9 * MiB + 123)  # two parts
        small_sum = await trio.to_thread.run_sync(_write, small, 1000)

        result = await handler.send_to_server(client, big, remote_name="dir/big.bin")
        assert result["success"] is True, result
        assert (result["path"], result["checksum"]) == ("dir/big.bin", big_sum)
        result = await handler.send_to_server(client, small)
        assert result["success"] is True, result
        assert [path for path, _ in received] == [f"{s3_url}/dir/big.bin", f"{s3_url}/small.txt"]
        assert received[0][1]["checksum"] == big_sum

        # The objects themselves, read straight from the store, are the files.
        store = S3Store(s3_url, client=s3_client_factory())
        reader = await store.open_reader("dir/big.bin")
        stored = b""
        while block := await reader.read(4 * MiB):
            stored += block
        await reader.aclose()
        assert hashlib.sha256(stored).hexdigest() == big_sum

        listing = await handler.list_files(client)
        assert [(f["name"], f["size"]) for f in listing] == [
            ("dir/big.bin", 9 * MiB + 123),
            ("small.txt", 1000),
        ]
        assert [f["name"] for f in await handler.list_files(client, prefix="dir")] == [
            "dir/big.bin"
        ]
        stat = await client.call("file_stat", name="small.txt", sha256=True)
        assert (stat["size"], stat["sha256"]) == (1000, small_sum)

        # A re-run stores no second copy.
        again = await handler.send_to_server(client, big, remote_name="dir/big.bin")
        assert again["success"] is True and again.get("skipped") is True, again
        again = await handler.send_to_server(client, small)
        assert again.get("skipped") is True, again

        downloads = tmp_path / "downloads"
        got = await handler.receive_from_server(client, "dir/big.bin", downloads)
        assert got["success"] is True, got
        assert await trio.to_thread.run_sync(_sha256, downloads / "dir/big.bin") == big_sum
        ranged = await handler.receive_from_server(
            client, "dir/big.bin", downloads, offset=5 * MiB, length=MiB
        )
        assert ranged["success"] is True, ranged
        assert ranged["checksum"] == hashlib.sha256(stored[5 * MiB : 6 * MiB]).hexdigest()
        # A directory on the server comes down as a tree.
        tree = await handler.receive_from_server(client, "dir", tmp_path / "tree")
        assert [entry["success"] for entry in tree["files"]] == [True], tree

        renamed = await handler.rename(client, "small.txt", "dir/small.txt")
        assert renamed == {"success": True, "old": "small.txt", "path": "dir/small.txt"}
        exists = await handler.rename(client, "dir/small.txt", "dir/big.bin")
        assert exists["code"] == "exists", exists
        assert (await handler.delete(client, "dir/small.txt"))["success"] is True
        assert (await handler.delete(client, "dir/small.txt"))["code"] == "not_found"
        assert [f["name"] for f in await handler.list_files(client)] == ["dir/big.bin"]
        store.close()


@pytest.mark.usefixtures("aws_environment")
async def test_a_resumed_download_from_s3_sends_only_the_rest(
    server_factory: ServerFactory, client_factory: ClientFactory, s3_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        handler, _server, client, _received = await _served(server_factory, client_factory, s3_url)
        source = tmp_path / "out" / "resume.bin"
        checksum = await trio.to_thread.run_sync(_write, source, 3 * MiB)
        assert (await handler.send_to_server(client, source))["success"] is True
        # A download cut at 1 MiB: the partial file the client keeps for a resume.
        stat = await client.call("file_stat", name="resume.bin")
        from conduit.transfer._storage import StorageRoot
        from conduit.transfer._wire import transfer_key

        downloads = tmp_path / "downloads"
        key = transfer_key("resume.bin", stat["size"], stat["modified_ns"])
        partial = StorageRoot(downloads).open_partial("resume.bin", key, resume=False)
        partial.write_block(source.read_bytes()[:MiB])
        partial.close()
        got = await handler.receive_from_server(client, "resume.bin", downloads)
        assert got["success"] is True, got
        assert got["resumed_from"] == MiB
        assert await trio.to_thread.run_sync(_sha256, downloads / "resume.bin") == checksum


@pytest.mark.usefixtures("aws_environment")
async def test_bad_input_is_refused_and_stores_nothing_on_s3(
    server_factory: ServerFactory, client_factory: ClientFactory, s3_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        handler, _server, client, received = await _served(
            server_factory, client_factory, s3_url, max_file_size=20 * MiB
        )
        for name in ["../escape.bin", "a/../../b", "nul\x00byte", "ctl\x01char", ".hidden", ""]:
            with pytest.raises(RPCError) as caught:
                await client.call("file_upload_begin", name=name, size=10, key="k" * 32)
            assert caught.value.code in {"unsafe_path", "invalid_arguments"}, (name, caught.value)
        long_name = "x" * 1100
        with pytest.raises(RPCError) as caught:
            await client.call("file_upload_begin", name=long_name, size=10, key="k" * 32)
        assert caught.value.code == "unsafe_path"
        refusals: list[tuple[Any, str]] = [
            (-1, "invalid_size"),
            (21 * MiB, "too_large"),
            ("12", "invalid_arguments"),
        ]
        for size, code in refusals:
            with pytest.raises(RPCError) as caught:
                await client.call("file_upload_begin", name="ok.bin", size=size, key="k" * 32)
            assert caught.value.code == code, (size, caught.value)
        # A small file whose data does not match its checksum.
        with pytest.raises(RPCError) as caught:
            await client.call("file_upload_small", name="lie.txt", data=b"abc", sha256="0" * 64)
        assert caught.value.code == "checksum_mismatch"
        # A batch: one good entry, one hostile name, one lie; each its own result.
        good = b"good data"
        answer = await client.call(
            "file_upload_batch",
            files=[
                {"name": "good.txt", "data": good, "sha256": hashlib.sha256(good).hexdigest()},
                {"name": "../evil.txt", "data": b"x", "sha256": hashlib.sha256(b"x").hexdigest()},
                {"name": "lie2.txt", "data": b"y", "sha256": "1" * 64},
            ],
        )
        codes = [r.get("code") if not r["success"] else None for r in answer["results"]]
        assert codes == [None, "unsafe_path", "checksum_mismatch"], answer
        for name in ["../x", "nope.bin"]:
            with pytest.raises(RPCError) as caught:
                await client.call("file_stat", name=name)
            assert caught.value.code in {"unsafe_path", "not_found"}
        got = await handler.receive_from_server(client, "nope.bin", tmp_path / "d")
        assert got["code"] == "not_found", got
        assert [f["name"] for f in await handler.list_files(client)] == ["good.txt"]
        assert [path.rsplit("/", 1)[1] for path, _ in received] == ["good.txt"]
        # An upload that lies about its trailer checksum publishes nothing.
        source = tmp_path / "out" / "honest.bin"
        await trio.to_thread.run_sync(_write, source, 600 * 1024)
        from conduit.transfer import _engine

        real = _engine._read_records

        def lying(file: Any, stream_id: int, size: int, shape: Any, hasher: Any, *rest: Any) -> Any:
            records = real(file, stream_id, size, shape, hasher, *rest)
            hasher.update(b"\x00")
            return records

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_engine, "_read_records", lying)
            lied = await handler.send_to_server(client, source)
        assert lied["code"] == "checksum_mismatch", lied
        assert [f["name"] for f in await handler.list_files(client)] == ["good.txt"]
        honest = await handler.send_to_server(client, source)
        assert (honest["success"], honest["path"]) == (True, "honest.bin"), honest


@pytest.mark.usefixtures("aws_environment")
async def test_s3_uploads_are_bounded_per_connection(
    server_factory: ServerFactory, client_factory: ClientFactory, s3_url: str
) -> None:
    """Each open S3 upload holds parts in memory: a connection may open only a few."""
    from conduit.transfer._backend_store import MAX_UPLOADS_PER_CONNECTION

    with trio.fail_after(120):
        _handler, _server, client, _received = await _served(server_factory, client_factory, s3_url)
        for index in range(MAX_UPLOADS_PER_CONNECTION):
            begun = await client.call(
                "file_upload_begin", name=f"f{index}.bin", size=MiB, key=f"{index:032d}"
            )
            assert begun["offset"] == 0
        with pytest.raises(RPCError) as caught:
            await client.call("file_upload_begin", name="more.bin", size=MiB, key="9" * 32)
        assert caught.value.code == "overloaded"


CARL = "carl's long passphrase"


async def _server_with_carl(server_factory: ServerFactory, tmp_path: Path, s3_url: str) -> Server:
    """An accounts-mode server on S3 whose one user, carl, has a 100,000-byte quota."""
    from conduit import Accounts
    from conduit.protocol.pake import StretchParams

    accounts = Accounts(tmp_path / "accounts.json", stretch=StretchParams(1, 8 * 1024))
    accounts.add("carl", CARL, quota=100_000)
    handler = FileTransferHandler(storage_dir=s3_url)
    return await server_factory(handler.register_server_handlers, password=None, accounts=accounts)


async def _batch_as_carl(server: Server, names: list[str], size: int) -> list[dict[str, Any]]:
    """carl sends ``names`` (``size`` random bytes each) in one file_upload_batch; its results."""
    from conftest import client_descriptor

    files = []
    for name in names:
        data = os.urandom(size)
        files.append({"name": name, "data": data, "sha256": hashlib.sha256(data).hexdigest()})
    carl = Client(client_descriptor(server.port, username="carl", password=CARL))
    await carl.connect()
    try:
        answer = await carl.call("file_upload_batch", files=files)
    finally:
        await carl.disconnect()
    results: list[dict[str, Any]] = answer["results"]
    return results


@pytest.mark.usefixtures("aws_environment")
async def test_a_quota_users_batch_on_s3_is_counted_once(
    server_factory: ServerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    s3_url: str,
) -> None:
    """A call of small files lists the user's prefix once, and each file stored counts."""
    server = await _server_with_carl(server_factory, tmp_path, s3_url)
    counts: list[int] = []
    real = S3Store.used_bytes

    async def counted(store: S3Store) -> int:
        counts.append(await real(store))
        return counts[-1]

    monkeypatch.setattr(S3Store, "used_bytes", counted)
    with trio.fail_after(60):  # the third goes over 100,000 bytes
        results = await _batch_as_carl(server, ["0.bin", "1.bin", "2.bin"], 40_000)
    assert [result["success"] for result in results] == [True, True, False], results
    assert results[2]["code"] == "quota_exceeded", results
    assert counts == [0]


@pytest.mark.usefixtures("aws_environment")
async def test_concurrent_batches_of_one_quota_user_see_each_other(
    server_factory: ServerFactory,
    tmp_path: Path,
    s3_url: str,
    s3_client_factory: Callable[[], Any],
) -> None:
    """Each call lists once, and counts what this node published since (the other's too)."""
    server = await _server_with_carl(server_factory, tmp_path, s3_url)
    accepted: list[bool] = []

    async def send_batch(tag: int) -> None:
        names = [f"{tag}-{index}.bin" for index in range(5)]
        results = await _batch_as_carl(server, names, 15_000)
        accepted.extend(result["success"] for result in results)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_batch, 1)
            nursery.start_soon(send_batch, 2)
    store = S3Store(s3_url, client=s3_client_factory())
    stored = sum(entry.size for entry in await store.list_files(prefix="carl"))
    store.close()
    # At most one file over: a check and its PUT are not one step (as with a listing per file).
    assert stored <= 100_000 + 15_000, (stored, accepted)
    assert stored == 15_000 * sum(accepted)


@pytest.mark.usefixtures("aws_environment")
async def test_accounts_on_s3_each_user_has_a_key_prefix(
    server_factory: ServerFactory,
    s3_url: str,
    s3_client_factory: Callable[[], Any],
    tmp_path: Path,
) -> None:
    """Accounts mode: a user's root is a key prefix; quota and read-only hold."""
    from conduit import Accounts, Client
    from conduit.protocol.pake import StretchParams
    from conftest import client_descriptor

    accounts = Accounts(tmp_path / "accounts.json", stretch=StretchParams(1, 8 * 1024))
    accounts.add("alice", "alice's long passphrase", quota=2 * MiB)
    accounts.add("bob", "bob's long passphrase", root="shared/bob", read_only=True)
    handler = FileTransferHandler(storage_dir=s3_url)
    server = await server_factory(
        handler.register_server_handlers, password=None, accounts=accounts
    )

    async def login(username: str, password: str) -> Client:
        client = Client(client_descriptor(server.port, username=username, password=password))
        await client.connect()
        return client

    with trio.fail_after(120):
        alice = await login("alice", "alice's long passphrase")
        bob = await login("bob", "bob's long passphrase")
        source = tmp_path / "out" / "a.bin"
        await trio.to_thread.run_sync(_write, source, MiB)
        stored = await handler.send_to_server(alice, source)
        assert stored["success"] is True, stored
        assert [f["name"] for f in await handler.list_files(alice)] == ["a.bin"]
        assert await handler.list_files(bob) == []  # bob's prefix is another
        refused = await handler.send_to_server(bob, source)
        assert refused["code"] == "forbidden", refused
        assert (await handler.delete(bob, "a.bin"))["code"] in {"forbidden", "not_found"}
        over = tmp_path / "out" / "big.bin"
        await trio.to_thread.run_sync(_write, over, int(1.5 * MiB))
        quota = await handler.send_to_server(alice, over)
        assert quota["code"] == "quota_exceeded", quota
        # Below the prefix, the object sits under alice's root.
        store = S3Store(s3_url, client=s3_client_factory())
        assert [f.name for f in await store.list_files()] == ["alice/a.bin"]
        store.close()
        await alice.disconnect()
        await bob.disconnect()


@pytest.mark.usefixtures("aws_environment")
async def test_overwrite_on_s3_replaces_instead_of_a_variant(
    server_factory: ServerFactory, client_factory: ClientFactory, s3_url: str, tmp_path: Path
) -> None:
    with trio.fail_after(120):
        plain, _server, client, _received = await _served(server_factory, client_factory, s3_url)
        source = tmp_path / "out" / "same.bin"
        await trio.to_thread.run_sync(_write, source, 700 * 1024)
        assert (await plain.send_to_server(client, source))["path"] == "same.bin"
        await trio.to_thread.run_sync(_write, source, 700 * 1024)  # other bytes, same name
        assert (await plain.send_to_server(client, source))["path"] == "same (1).bin"

        plain.overwrite = True  # read at each use, as every setting
        # Same size, other bytes, within the same second as the digests the
        # re-run check took of both files: a digest cached by modification
        # time (S3 gives it to the second) would now be wrong.
        newest = await trio.to_thread.run_sync(_write, source, 700 * 1024)
        replaced = await plain.send_to_server(client, source)
        assert (replaced["path"], replaced["checksum"]) == ("same.bin", newest), replaced
        listing = await plain.list_files(client)
        assert [(f["name"], f["size"]) for f in listing] == [
            ("same (1).bin", 700 * 1024),
            ("same.bin", 700 * 1024),
        ]
        stat = await client.call("file_stat", name="same.bin", sha256=True)
        assert stat["sha256"] == newest


@pytest.mark.usefixtures("aws_environment")
async def test_s3_partial_bytes_are_capped(
    server_factory: ServerFactory, client_factory: ClientFactory, s3_url: str
) -> None:
    """``max_partial_bytes`` holds on S3: unfinished uploads beyond it are refused."""
    with trio.fail_after(120):
        _handler, _server, client, _received = await _served(
            server_factory, client_factory, s3_url, max_partial_bytes=3 * MiB
        )
        first = await client.call("file_upload_begin", name="a.bin", size=2 * MiB, key="a" * 32)
        assert first["offset"] == 0
        with pytest.raises(RPCError) as caught:
            await client.call("file_upload_begin", name="b.bin", size=2 * MiB, key="b" * 32)
        assert caught.value.code == "no_space"
        small = await client.call("file_upload_begin", name="c.bin", size=MiB, key="c" * 32)
        assert small["offset"] == 0


@pytest.mark.usefixtures("aws_environment")
async def test_edge_sizes_on_s3(
    server_factory: ServerFactory, client_factory: ClientFactory, s3_url: str, tmp_path: Path
) -> None:
    """An empty file, and files of exactly one part and one byte over (8 MiB parts)."""
    with trio.fail_after(120):
        handler, _server, client, _received = await _served(server_factory, client_factory, s3_url)
        sizes = {"empty.bin": 0, "one-part.bin": 8 * MiB, "one-over.bin": 8 * MiB + 1}
        sums = {}
        for name, size in sizes.items():
            sums[name] = await trio.to_thread.run_sync(_write, tmp_path / "out" / name, size)
            result = await handler.send_to_server(client, tmp_path / "out" / name)
            assert (result["success"], result["checksum"]) == (True, sums[name]), result
        listing = await handler.list_files(client)
        assert {f["name"]: f["size"] for f in listing} == sizes
        for name in sizes:
            got = await handler.receive_from_server(client, name, tmp_path / "back")
            assert got["success"] is True, got
            assert await trio.to_thread.run_sync(_sha256, tmp_path / "back" / name) == sums[name]


@pytest.mark.usefixtures("aws_environment")
async def test_a_directory_goes_up_and_comes_back_through_s3(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    s3_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(120):
        handler, _server, client, _received = await _served(server_factory, client_factory, s3_url)
        tree = tmp_path / "photos"
        sums = {
            "photos/a.jpg": await trio.to_thread.run_sync(_write, tree / "a.jpg", 5000),
            "photos/empty.txt": await trio.to_thread.run_sync(_write, tree / "empty.txt", 0),
            "photos/2024/b.jpg": await trio.to_thread.run_sync(_write, tree / "2024/b.jpg", MiB),
            "photos/2024/c.jpg": await trio.to_thread.run_sync(_write, tree / "2024/c.jpg", 9000),
        }
        sent = await handler.send_to_server(client, tree)
        assert sent["success"] is True, sent
        assert sorted(f["name"] for f in await handler.list_files(client)) == sorted(sums)
        methods = record_calls(monkeypatch)
        back = await handler.receive_from_server(client, "photos", tmp_path / "back")
        assert [entry["success"] for entry in back["files"]] == [True] * 4, back
        for name, checksum in sums.items():
            assert await trio.to_thread.run_sync(_sha256, tmp_path / "back" / name) == checksum
        # The three small files in one batch, read from the store; b.jpg streamed.
        assert methods.count("file_download_batch") == 1 and methods.count("file_download") == 1
        again = await handler.receive_from_server(client, "photos", tmp_path / "back")
        assert again["skipped"] == 4, again
        # A directory named in a batch: is_directory, as file_stat says (and
        # the local store's batch), not not_found.
        named = await handler.receive_files_from_server(
            client, ["photos/2024", "photos/none.txt"], tmp_path / "named"
        )
        assert [r.get("code") for r in named] == ["is_directory", "not_found"], named


@pytest.mark.usefixtures("aws_environment")
@pytest.mark.parametrize("size", [1000, 3 * 1024 * 1024], ids=["small", "streamed"])
async def test_overwriting_replaces_the_name_even_when_a_variant_holds_its_bytes(
    size: int,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    s3_url: str,
    tmp_path: Path,
) -> None:
    """An S3 store that overwrites publishes under the name itself, so ``a (1).txt``
    holding the new bytes says nothing about ``a.txt``: the upload replaces it."""
    with trio.fail_after(60):
        handler, _server, client, _ = await _served(
            server_factory, client_factory, s3_url, overwrite=True
        )
        old, new = tmp_path / "old" / "a.txt", tmp_path / "new" / "a.txt"
        _write(old, size)
        checksum = _write(new, size)
        assert (await handler.send_to_server(client, old))["path"] == "a.txt"
        copy = await handler.send_to_server(client, new, remote_name="a (1).txt")
        assert copy["path"] == "a (1).txt", copy

        result = await handler.send_to_server(client, new)

        assert result["success"] is True and result.get("skipped") is not True, result
        assert result["path"] == "a.txt"
        fetched = await handler.receive_from_server(client, "a.txt", tmp_path / "fetched")
        assert fetched["success"] is True, fetched
        assert _sha256(tmp_path / "fetched" / "a.txt") == checksum


@pytest.mark.usefixtures("aws_environment")
@pytest.mark.parametrize("per_page", [2, 3])
async def test_an_s3_listing_goes_page_after_page_in_the_stores_order(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    s3_url: str,
    tmp_path: Path,
    per_page: int,
) -> None:
    """An S3 store's pages follow its own order (SeaweedFS: ``d/a/b`` before
    ``d/a-z.txt``): each page sorted, ``next`` its last in the store's order,
    and together every file once; a directory's download and
    ``list_all_files`` (``conduit ls``) get them all, whatever the page's
    size. (Until 2026-12-08 it did not page: a directory past ``max_listed``
    was ``truncated``; a version that read every key below the prefix to page
    by name made each listing cost the whole prefix.)"""
    names = ["d/a-z.txt", "d/a.txt", "d/a/b", "d/a/é", "d/a0", "d/b", "top.txt"]
    with trio.fail_after(120):
        handler, _server, client, _received = await _served(
            server_factory, client_factory, s3_url, max_listed=per_page
        )
        digests = {
            name: _write(tmp_path / "src" / name, 100 + index) for index, name in enumerate(names)
        }
        sent = await handler.send_files_to_server(
            client, [(tmp_path / "src" / name, name) for name in names]
        )
        assert all(result["success"] for result in sent), sent
        pages = [await handler.list_files(client, prefix="d")]
        while pages[-1].next is not None and len(pages) <= len(names):
            pages.append(await handler.list_files(client, prefix="d", after=pages[-1].next))
        listed = [entry["name"] for page in pages for entry in page]
        assert sorted(listed) == sorted(name for name in names if name.startswith("d/")), pages
        assert all(page == sorted(page, key=lambda entry: entry["name"]) for page in pages)
        assert [page.truncated for page in pages] == [True] * (len(pages) - 1) + [False]
        everything = await handler.list_all_files(client)
        assert sorted(entry["name"] for entry in everything) == sorted(names)
        assert everything.truncated is False
        assert [entry["name"] for entry in everything] == sorted(names)
        tree = await handler.receive_from_server(client, "d", tmp_path / "out")
        assert tree["success"] is True, tree
        # In name order, as from a local storage, whatever the store's order.
        assert [entry["name"] for entry in tree["files"]] == sorted(listed), tree
    for name in names:
        if name.startswith("d/"):
            assert _sha256(tmp_path / "out" / name) == digests[name], name
