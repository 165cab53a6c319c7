"""The Store protocol's contract, run against both stores: local directory and S3.

Each test gets two store instances over the same storage ("node A" and "node
B"): two LocalStores on one directory, or two S3Stores with their own clients
on one bucket prefix.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from conduit.cluster.local import LocalStore
from conduit.cluster.s3 import MIN_PART_SIZE, S3Store
from conduit.cluster.store import FileReader, PartialUpload, Store
from conduit.errors import ChecksumMismatch, TransferError, UnsafePathError
from conduit.transfer._names import LINEAR_COLLISION_ATTEMPTS
from conduit.transfer._storage import ENTRY_ALLOWANCE

PART = MIN_PART_SIZE
SIZE = 2 * PART + 123_457

StorePair = tuple[Store, Store]


@pytest.fixture(params=["local", "s3"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> StorePair:
    if request.param == "local":
        return LocalStore(tmp_path / "store"), LocalStore(str(tmp_path / "store"))
    url: str = request.getfixturevalue("s3_url")
    make_client: Callable[[], Any] = request.getfixturevalue("s3_client_factory")
    return (
        S3Store(url, client=make_client(), part_size=PART),
        S3Store(url, client=make_client(), part_size=PART),
    )


async def append_in_blocks(partial: PartialUpload, data: bytes, block: int = 700_001) -> None:
    for start in range(0, len(data), block):
        await partial.append(data[start : start + block])


async def read_all(reader: FileReader) -> bytes:
    chunks = []
    with trio.fail_after(30):
        while chunk := await reader.read(1 << 20):
            chunks.append(chunk)
    await reader.aclose()
    return b"".join(chunks)


async def put(store: Store, name: str, data: bytes, transfer_id: str = "t") -> str:
    partial = await store.open_partial(name, transfer_id, resume=False)
    await partial.append(data)
    return await partial.publish(expected_sha256=hashlib.sha256(data).hexdigest())


async def test_protocols(stores: StorePair) -> None:
    node_a, _ = stores
    assert isinstance(node_a, Store)
    partial = await node_a.open_partial("p.bin", "t", resume=False)
    assert isinstance(partial, PartialUpload)
    await partial.discard()
    await put(node_a, "r.bin", b"x")
    reader = await node_a.open_reader("r.bin")
    assert isinstance(reader, FileReader)
    await reader.aclose()


async def test_round_trip_and_ranged_reads(stores: StorePair) -> None:
    node_a, node_b = stores
    data = os.urandom(SIZE)
    partial = await node_a.open_partial("reports/2024/q1.bin", "t-1", resume=False)
    await append_in_blocks(partial, data)
    assert partial.offset == SIZE
    assert partial.sha256_hex() == hashlib.sha256(data).hexdigest()
    name = await partial.publish(expected_sha256=hashlib.sha256(data).hexdigest())
    assert name == "reports/2024/q1.bin"
    # Visible from the other node.
    assert [(e.name, e.size) for e in await node_b.list_files()] == [(name, SIZE)]
    stat = await node_b.stat(name)
    assert (stat.name, stat.size) == (name, SIZE)
    assert stat.modified_ns > 0
    for start in (0, 1, PART + 3, SIZE - 1, SIZE):
        reader = await node_b.open_reader(name, start=start)
        assert reader.size == SIZE
        assert await read_all(reader) == data[start:]
    with pytest.raises(ValueError, match="outside"):
        await node_b.open_reader(name, start=SIZE + 1)
    with pytest.raises(FileNotFoundError):
        await node_b.stat("missing.bin")
    assert await node_b.find_partial("reports/2024/q1.bin", "t-1") is None


async def test_empty_file(stores: StorePair) -> None:
    node_a, node_b = stores
    assert await put(node_a, "empty.txt", b"") == "empty.txt"
    assert (await node_b.stat("empty.txt")).size == 0
    assert await read_all(await node_b.open_reader("empty.txt")) == b""


async def test_interrupted_upload_resumes_on_the_other_node(stores: StorePair) -> None:
    node_a, node_b = stores
    data = os.urandom(SIZE)
    partial = await node_a.open_partial("big.bin", "key-1", resume=True)
    await append_in_blocks(partial, data[: 2 * PART + 5000])
    await partial.close()  # the connection dropped

    durable = await node_b.find_partial("big.bin", "key-1")
    # The local store keeps every byte written; S3 keeps whole parts.
    assert durable is not None and 2 * PART <= durable <= 2 * PART + 5000
    resumed = await node_b.open_partial("big.bin", "key-1", resume=True)
    assert resumed.offset == durable
    assert resumed.sha256_hex() == hashlib.sha256(data[:durable]).hexdigest()
    await append_in_blocks(resumed, data[durable:])
    assert await resumed.publish(expected_sha256=hashlib.sha256(data).hexdigest()) == "big.bin"
    assert await read_all(await node_a.open_reader("big.bin")) == data


async def test_restart_instead_of_resume(stores: StorePair) -> None:
    node_a, node_b = stores
    partial = await node_a.open_partial("x.bin", "k", resume=False)
    await partial.append(os.urandom(PART + 1))
    await partial.close()
    restarted = await node_b.open_partial("x.bin", "k", resume=False)
    assert restarted.offset == 0
    await restarted.append(b"fresh")
    assert await restarted.publish() == "x.bin"
    assert await read_all(await node_a.open_reader("x.bin")) == b"fresh"


async def test_collisions_get_numbered_names(stores: StorePair) -> None:
    node_a, node_b = stores
    names = [
        await put(node, "report.tar.gz", b"version %d" % index, f"t{index}")
        for index, node in enumerate((node_a, node_b, node_a))
    ]
    assert names == ["report.tar.gz", "report (1).tar.gz", "report (2).tar.gz"]
    for index, name in enumerate(names):
        assert await read_all(await node_b.open_reader(name)) == b"version %d" % index


async def test_a_crowded_name_gets_the_next_number(stores: StorePair) -> None:
    # Past the first 16 numbers the free one is searched for (a few looks),
    # not tried one by one: each way of storing still lands on the next number.
    node_a, node_b = stores
    crowd = LINEAR_COLLISION_ATTEMPTS + 4
    await node_a.put_file("c.txt", b"0", sha256=hashlib.sha256(b"0").hexdigest())
    for number in range(1, crowd + 1):
        name = f"c ({number}).txt"
        data = b"%d" % number
        assert await node_a.put_file(name, data, sha256=hashlib.sha256(data).hexdigest()) == name
    assert await put(node_b, "c.txt", b"upload", "t1") == f"c ({crowd + 1}).txt"
    small = hashlib.sha256(b"small").hexdigest()
    assert await node_a.put_file("c.txt", b"small", sha256=small) == f"c ({crowd + 2}).txt"
    assert await node_b.rename("c (3).txt", "c.txt") == f"c ({crowd + 3}).txt"
    assert await read_all(await node_a.open_reader(f"c ({crowd + 1}).txt")) == b"upload"
    assert await read_all(await node_a.open_reader(f"c ({crowd + 3}).txt")) == b"3"


async def test_concurrent_publishers_never_overwrite(stores: StorePair) -> None:
    payloads = [os.urandom(PART + 10) for _ in stores]
    published: dict[int, str] = {}

    async def upload(index: int) -> None:
        partial = await stores[index].open_partial("same.bin", f"node{index}", resume=False)
        await partial.append(payloads[index])
        published[index] = await partial.publish()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for index in range(len(stores)):
                nursery.start_soon(upload, index)
    assert sorted(published.values()) == ["same (1).bin", "same.bin"]
    for index, name in published.items():
        assert await read_all(await stores[0].open_reader(name)) == payloads[index]


async def test_overwrite_replaces(stores: StorePair) -> None:
    for node, content in zip(stores, (b"one", b"two"), strict=True):
        partial = await node.open_partial("o.txt", content.decode(), resume=False, overwrite=True)
        await partial.append(content)
        assert await partial.publish() == "o.txt"
    assert await read_all(await stores[0].open_reader("o.txt")) == b"two"


async def test_checksum_mismatch_discards(stores: StorePair) -> None:
    node_a, node_b = stores
    partial = await node_a.open_partial("bad.bin", "t", resume=False)
    await partial.append(os.urandom(PART + 1))
    with pytest.raises(ChecksumMismatch):
        await partial.publish(expected_sha256="00" * 32)
    assert await node_b.list_files() == []
    assert await node_b.find_partial("bad.bin", "t") is None


async def test_put_file_publishes_at_once_without_overwriting(stores: StorePair) -> None:
    """``put_file``: a whole small file in one call, with the rules of a publish."""
    node_a, node_b = stores

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    assert await node_a.put_file("s/a.txt", b"one", sha256=digest(b"one")) == "s/a.txt"
    assert await node_b.put_file("s/a.txt", b"two", sha256=digest(b"two")) == "s/a (1).txt"
    with pytest.raises(ChecksumMismatch):
        await node_a.put_file("s/c.txt", b"three", sha256=digest(b"other"))
    with pytest.raises(UnsafePathError):
        await node_a.put_file("../c.txt", b"x", sha256=digest(b"x"))
    # A name an upload in progress aims at is not taken from under it.
    partial = await node_a.open_partial("s/b.txt", "up", resume=False)
    await partial.append(b"streamed")
    put_name = await node_b.put_file("s/b.txt", b"small", sha256=digest(b"small"))
    published = await partial.publish(expected_sha256=digest(b"streamed"))
    assert sorted([put_name, published]) == ["s/b (1).txt", "s/b.txt"]
    replaced = await node_b.put_file("s/a.txt", b"four", sha256=digest(b"four"), overwrite=True)
    assert replaced == "s/a.txt"
    contents = {
        entry.name: await read_all(await node_b.open_reader(entry.name))
        for entry in await node_b.list_files()
    }
    assert contents == {
        "s/a.txt": b"four",
        "s/a (1).txt": b"two",
        put_name: b"small",
        published: b"streamed",
    }


async def test_listing_hides_partials(stores: StorePair) -> None:
    node_a, node_b = stores
    pending = await node_a.open_partial("pending.bin", "t", resume=False)
    await pending.append(os.urandom(PART + 7))
    await put(node_a, "done.txt", b"done", "t2")
    assert [entry.name for entry in await node_b.list_files()] == ["done.txt"]
    assert await node_b.list_files(max_entries=0) == []
    await pending.discard()
    assert await node_b.find_partial("pending.bin", "t") is None


#: Names whose order SeaweedFS's listing does not keep: it lists a directory
#: before the names that extend its own with a character below "/".
PAGED_NAMES = ["d/a b", "d/a-z.txt", "d/a.txt", "d/a/b", "d/a/c-1", "d/a/c/x", "d/a/é", "d/a0", "z"]


@pytest.mark.parametrize("page", [1, 2, 3, 4])
async def test_pages_going_on_from_the_last_name_list_every_file_once(
    stores: StorePair, page: int
) -> None:
    """``list_files(after=LAST)`` goes on where the page before ended, in the
    store's order (a local directory's is the names', SeaweedFS's is not), so
    the pages list every file once; with ``prefix``, those below it. (Until
    2026-12-08 an S3 store's page was sorted, and the last by name skipped the
    files of the store's order between.)"""
    node_a, node_b = stores
    for index, name in enumerate(PAGED_NAMES):
        await put(node_a, name, name.encode(), f"t{index}")
    for prefix, expected in (
        (None, PAGED_NAMES),
        ("d/a", [name for name in PAGED_NAMES if name.startswith("d/a/")]),
    ):
        listed: list[str] = []
        after: str | None = None
        for _ in range(len(PAGED_NAMES) + 1):
            entries = await node_b.list_files(max_entries=page, prefix=prefix, after=after)
            if not entries:
                break
            listed += [entry.name for entry in entries]
            after = entries[-1].name
        assert sorted(listed) == expected, (prefix, listed)
    if isinstance(node_b, LocalStore):  # whose order is the names'
        assert [entry.name for entry in await node_b.list_files(after="d/a.txt")] == [
            name for name in PAGED_NAMES if name > "d/a.txt"
        ]


async def test_a_page_goes_on_after_a_last_entry_deleted_meanwhile(stores: StorePair) -> None:
    """The next page starts after the last name of the one before even once
    that file (and its directory) is gone: the rest still comes, once."""
    node_a, node_b = stores
    for index, name in enumerate(PAGED_NAMES):
        await put(node_a, name, name.encode(), f"t{index}")
    everything = [entry.name for entry in await node_b.list_files()]
    cut = everything.index("d/a/c/x") + 1
    first = [entry.name for entry in await node_b.list_files(max_entries=cut)]
    assert first == everything[:cut]
    assert await node_a.delete("d/a/c/x")
    rest = [entry.name for entry in await node_b.list_files(after=first[-1])]
    assert rest == everything[cut:]


async def test_used_bytes_counts_every_published_file(stores: StorePair) -> None:
    node_a, node_b = stores
    assert await node_b.used_bytes() == 0
    pending = await node_a.open_partial("pending.bin", "t", resume=False)
    await pending.append(os.urandom(PART + 7))  # partials are not counted
    sizes = {"a.txt": 10, "d/b.bin": 2000, "d/e/c.bin": 30_000}
    for index, (name, size) in enumerate(sizes.items()):
        await put(node_a, name, os.urandom(size), f"t{index}")
    files = sum(sizes.values())
    # More than a listing of one entry shows: the count is never cut short.
    assert len(await node_b.list_files(max_entries=1)) == 1
    if isinstance(node_b, LocalStore):
        # and its directories (the root's too), at their size, and its entries
        root = node_b.root.path
        directories = root, root / "d", root / "d" / "e"
        entries = len(sizes) * ENTRY_ALLOWANCE
        assert await node_b.used_bytes() == files + entries + sum(
            d.stat().st_size for d in directories
        )
    else:
        assert await node_b.used_bytes() == files
    await pending.discard()


async def test_delete_and_rename(stores: StorePair) -> None:
    node_a, node_b = stores
    await put(node_a, "a.txt", b"a")
    await put(node_a, "b.txt", b"b")
    assert await node_b.rename("a.txt", "b.txt") == "b (1).txt"
    assert await node_b.rename("b (1).txt", "moved/c.txt") == "moved/c.txt"
    assert [entry.name for entry in await node_a.list_files()] == ["b.txt", "moved/c.txt"]
    assert await read_all(await node_a.open_reader("moved/c.txt")) == b"a"
    assert await node_b.rename("b.txt", "moved/c.txt", overwrite=True) == "moved/c.txt"
    assert await read_all(await node_a.open_reader("moved/c.txt")) == b"b"
    with pytest.raises(FileNotFoundError):
        await node_b.rename("b.txt", "d.txt")
    assert await node_b.delete("moved/c.txt") is True
    assert await node_b.delete("moved/c.txt") is False
    assert await node_a.list_files() == []


async def test_stale_partials_are_cleaned_up(stores: StorePair) -> None:
    node_a, node_b = stores
    stale = await node_a.open_partial("stale.bin", "old", resume=False)
    await stale.append(os.urandom(PART + 1))
    await stale.close()
    assert await node_b.cleanup_stale_partials(3600) == 0
    assert await node_b.find_partial("stale.bin", "old") is not None
    await trio.sleep(0.05)
    assert await node_b.cleanup_stale_partials(0) == 1
    assert await node_b.find_partial("stale.bin", "old") is None


async def test_size_checks(stores: StorePair) -> None:
    node_a, _ = stores
    await node_a.check_can_accept(10, 10)
    for size, limit, offset, code in [
        (-1, None, 0, "invalid_size"),
        (10, None, 11, "invalid_size"),
        (11, 10, 0, "too_large"),
    ]:
        with pytest.raises(TransferError) as caught:
            await node_a.check_can_accept(size, limit, offset=offset)
        assert caught.value.code == code


HOSTILE = [
    "../escape.txt",
    "a/../../b.txt",
    "/etc/passwd",
    "nul\x00byte.txt",
    "bell\x07.txt",
    ".conduit/uploads/x.json",
    ".conduit-partial-t-x.bin",
    "dir/",
    "",
]


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_names_refused(name: str, stores: StorePair) -> None:
    node_a, _ = stores
    await put(node_a, "fine.txt", b"fine")
    with pytest.raises(UnsafePathError):
        await node_a.open_partial(name, "t", resume=False)
    with pytest.raises(UnsafePathError):
        await node_a.stat(name)
    with pytest.raises(UnsafePathError):
        await node_a.open_reader(name)
    with pytest.raises(UnsafePathError):
        await node_a.delete(name)
    with pytest.raises(UnsafePathError):
        await node_a.rename("fine.txt", name)
    with pytest.raises(UnsafePathError):
        await node_a.find_partial(name, "t")
    with pytest.raises(UnsafePathError):
        await node_a.open_partial("fine.txt", "../t", resume=False)
    assert [entry.name for entry in await node_a.list_files()] == ["fine.txt"]
