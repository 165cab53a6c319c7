"""Accounts mode: a user's root is confined, its files all count, its partials are found.

Each test is a hostile input of docs/hostile-inputs.md (see hostile_helpers):
- a user's root that a local process turned into a symbolic link is refused,
  never followed out of the storage directory;
- empty files in a user's root count against its quota (their entries, the
  root directory's own size);
- a user's partial files as deep as names go are found again after a restart
  (indexed, expired, evicted), though they lie below the user's root.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import trio

from conduit import Client, FileTransferHandler
from conduit.accounts import MIN_STRETCH, Accounts
from conduit.transfer._names import MAX_DEPTH, partial_basename
from conduit.transfer._space import owned_transfer_id
from conduit.transfer._storage import ENTRY_ALLOWANCE, StorageRoot
from conftest import ClientFactory, ServerFactory, wait_until
from hostile_helpers import hostile
from test_disk_abuse import as_user, quota_user

AREA = "disk"


def _small(name: str, data: bytes) -> dict[str, Any]:
    return {"name": name, "data": data, "sha256": hashlib.sha256(data).hexdigest()}


@hostile(
    "accounts-root-symlink",
    area=AREA,
    attack="a local process replaces a user's root (storage/alice) with a symbolic link to a "
    "directory outside the storage; the user then uploads, lists, stats and deletes",
    behaviour="every operation is refused with 'unsafe_path' (the root is reached from the "
    "storage directory without following links, as every name below it is); nothing "
    "outside is read, written or deleted",
    found="the user's root was opened by its full path, following links: the upload landed "
    "outside, the listing showed and the delete removed a file there",
)
async def test_a_user_root_that_is_a_symlink_is_refused(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    accounts = Accounts(tmp_path / "accounts.json", stretch=MIN_STRETCH)
    accounts.add("alice", "pw-alice")
    storage, outside = tmp_path / "storage", tmp_path / "outside"
    storage.mkdir()
    outside.mkdir()
    (outside / "victim.txt").write_text("private")
    os.symlink(outside, storage / "alice")
    transfer = FileTransferHandler(storage_dir=storage)
    server = await server_factory(register=transfer.register_server_handlers)
    client = await client_factory(server)
    await as_user(server, client, accounts, "alice")
    with trio.fail_after(30):
        answers = [
            await client.rpc.call("file_upload_small", **_small("planted.txt", b"hello")),
            await client.rpc.call("file_list"),
            await client.rpc.call("file_stat", name="victim.txt"),
        ]
        deleted = await transfer.delete(client, "victim.txt")
    for answer in answers:
        assert answer["success"] is False and answer["code"] == "unsafe_path", answer
    assert deleted["success"] is False and deleted["code"] == "unsafe_path", deleted
    assert sorted(path.name for path in outside.iterdir()) == ["victim.txt"]


@hostile(
    "accounts-quota-empty-files",
    area=AREA,
    attack="a user with a 16 KiB quota uploads batches of 64 empty files with 246-character "
    "names into its root, 50 batches",
    behaviour="each file counts what its entry may take (528 bytes) and the root directory "
    "its own size: refused with 'quota_exceeded' after a few dozen files; what the user "
    "stores stays within its quota and one file's allowance",
    found="empty files in a user's root counted nothing (the walk saw what is below the root "
    "and each file's size, 0): 3,200 files and a 1.1 MB directory under a 16 KiB quota",
)
async def test_empty_files_count_against_the_quota(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    accounts = Accounts(tmp_path / "accounts.json", stretch=MIN_STRETCH)
    storage = tmp_path / "storage"
    quota = 16 * 1024
    _, eve = await quota_user(server_factory, client_factory, storage, accounts, "eve", quota)
    stored = refused = 0
    with trio.fail_after(240):
        for batch in range(50):
            files = [_small(f"{batch:03d}{i:03d}" + "n" * 240, b"") for i in range(64)]
            answer = await eve.rpc.call("file_upload_batch", files=files)
            for result in answer["data"]["results"]:
                if result["success"]:
                    stored += 1
                else:
                    assert result["code"] == "quota_exceeded", result
                    refused += 1
    assert 0 < stored < quota // ENTRY_ALLOWANCE, stored
    assert refused == 50 * 64 - stored
    assert StorageRoot(storage / "eve").stored_bytes() <= quota + ENTRY_ALLOWANCE + 4096


async def restart_with_expired_partials(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    storage: Path,
    partials: dict[tuple[str, ...], int],
) -> tuple[Client, list[Path]]:
    """What a restarted server finds: long-expired partials of alice's (their
    directories below her root, and sizes), partial_ttl 1 s; a client logged
    in as alice (quota 600 KB). Returns it and the partials' paths."""
    accounts = Accounts(storage.parent / "accounts.json", stretch=MIN_STRETCH)
    accounts.add("alice", "pw-alice", quota=600_000)
    transfer_id = owned_transfer_id("k" * 32, "user:alice")
    paths = []
    for index, (directories, size) in enumerate(partials.items()):
        directory = storage.joinpath("alice", *directories)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / partial_basename(f"f{index}.bin", transfer_id)
        path.write_bytes(b"p" * size)
        os.utime(path, (1_000_000_000, 1_000_000_000))  # 2001: long expired
        paths.append(path)
    transfer = FileTransferHandler(storage_dir=storage, partial_ttl=1)
    server = await server_factory(register=transfer.register_server_handlers)
    client = await client_factory(server)
    await as_user(server, client, accounts, "alice")
    return client, paths


@hostile(
    "accounts-deep-partials-restart",
    area=AREA,
    attack="expired partials a user left 63 directories deep (a 64-segment name, allowed) "
    "and at its root are on disk when the server starts (partial_ttl 1 s)",
    behaviour="the budget's index and its sweep walk as deep as a user's names go below "
    "the storage directory: both partials are found and expire",
    found="the walks stopped at 64 levels below the storage directory, one level short of "
    "a user's deepest names: that partial was never indexed, expired, counted or evicted",
)
async def test_deep_partials_of_a_user_are_found_after_a_restart(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    deepest = tuple(f"d{level}" for level in range(MAX_DEPTH - 1))
    client, partials = await restart_with_expired_partials(
        server_factory, client_factory, tmp_path / "storage", {deepest: 1_000_000, (): 1000}
    )
    with trio.fail_after(30):
        answer = await client.rpc.call("file_upload_small", **_small("x.bin", b"x" * 150_000))
        assert answer["success"], answer
        await wait_until(lambda: not any(path.exists() for path in partials), timeout=20)


@hostile(
    "accounts-root-pruned-under-a-batch",
    area=AREA,
    attack="a user's root holds only an expired partial when the server starts "
    "(partial_ttl 1 s); the user's first request is a small upload",
    behaviour="the sweep removes the partial and the root it left empty while the batch "
    "holds that root open; the one-shot file sees its directory gone, makes it again and "
    "is stored",
    found="the upload failed with 'permission_denied': the anonymous file was created in "
    "the held root the sweep had removed (EPERM)",
)
async def test_a_root_pruned_under_a_batch_is_made_again(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    client, (expired,) = await restart_with_expired_partials(
        server_factory, client_factory, storage, {(): 1000}
    )
    with trio.fail_after(30):
        answer = await client.rpc.call("file_upload_small", **_small("x.bin", b"x" * 150_000))
    assert answer["success"], answer
    assert (storage / "alice" / "x.bin").read_bytes() == b"x" * 150_000
    # The sweeper runs in a thread of its own, beside the upload: on a loaded
    # machine it may finish after the answer.
    await wait_until(lambda: not expired.exists(), timeout=20)
