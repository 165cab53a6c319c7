"""The S3 store against a real SeaweedFS: parts, resume on another node, publishing races."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import trio

from conduit.cluster.location import parse_s3_url
from conduit.cluster.s3 import MIN_PART_SIZE, S3Partial, S3Store
from conduit.cluster.store import FileReader, PartialUpload, Store
from conduit.errors import ChecksumMismatch, TransferError, UnsafePathError

PART = MIN_PART_SIZE
# Two whole parts and a tail: exercises full parts, the short last part and the buffer.
SIZE = 2 * PART + 123_457

ClientFactory = Callable[[], Any]


def make_store(url: str, client_factory: ClientFactory) -> S3Store:
    """A store with its own client: to the test, a separate node."""
    return S3Store(url, client=client_factory(), part_size=PART)


async def append_in_blocks(partial: PartialUpload, data: bytes, block: int = 700_001) -> None:
    # Uneven blocks, like a network delivers them: parts must be cut across them.
    for start in range(0, len(data), block):
        await partial.append(data[start : start + block])


async def read_all(reader: FileReader) -> bytes:
    chunks = []
    with trio.fail_after(30):
        while chunk := await reader.read(1 << 20):
            chunks.append(chunk)
    await reader.aclose()
    return b"".join(chunks)


def uploads_in_progress(store: S3Store) -> list[str]:
    answer = store.client.list_multipart_uploads(
        Bucket=store.bucket, Prefix=store.location.list_prefix
    )
    return [str(upload["Key"]) for upload in answer.get("Uploads", [])]


async def test_protocols_are_satisfied(s3_url: str, s3_client_factory: ClientFactory) -> None:
    store = make_store(s3_url, s3_client_factory)
    assert isinstance(store, Store)
    partial = await store.open_partial("p.bin", "t1", resume=False)
    assert isinstance(partial, PartialUpload)
    await partial.discard()


async def test_round_trip_in_parts(s3_url: str, s3_client_factory: ClientFactory) -> None:
    store = make_store(s3_url, s3_client_factory)
    data = os.urandom(SIZE)
    partial = await store.open_partial("reports/2024/q1.bin", "t-1", resume=False)
    await append_in_blocks(partial, data)
    assert partial.offset == SIZE
    assert partial.sha256_hex() == hashlib.sha256(data).hexdigest()
    name = await partial.publish(expected_sha256=hashlib.sha256(data).hexdigest())
    assert name == "reports/2024/q1.bin"

    listed = await store.list_files()
    assert [(entry.name, entry.size) for entry in listed] == [(name, SIZE)]
    stat = await store.stat(name)
    assert stat.size == SIZE
    assert await read_all(await store.open_reader(name)) == data
    # Nothing of the upload is left behind: no multipart upload, no state, no reservation.
    assert uploads_in_progress(store) == []
    assert await store.find_partial("reports/2024/q1.bin", "t-1") is None
    assert store.location_of(name) == f"{s3_url}/{name}"


async def test_ranged_read(s3_url: str, s3_client_factory: ClientFactory) -> None:
    store = make_store(s3_url, s3_client_factory)
    data = os.urandom(300_000)
    partial = await store.open_partial("r.bin", "t", resume=False)
    await partial.append(data)
    await partial.publish()
    for start in (0, 1, 65_537, len(data) - 1, len(data)):
        reader = await store.open_reader("r.bin", start=start)
        assert reader.size == len(data)
        assert await read_all(reader) == data[start:]
    with pytest.raises(ValueError, match="outside"):
        await store.open_reader("r.bin", start=len(data) + 1)
    with pytest.raises(FileNotFoundError):
        await store.open_reader("missing.bin")


async def test_empty_file(s3_url: str, s3_client_factory: ClientFactory) -> None:
    store = make_store(s3_url, s3_client_factory)
    partial = await store.open_partial("empty.txt", "t", resume=False)
    name = await partial.publish(expected_sha256=hashlib.sha256(b"").hexdigest())
    assert (await store.stat(name)).size == 0
    assert await read_all(await store.open_reader(name)) == b""


async def test_resume_on_another_node(s3_url: str, s3_client_factory: ClientFactory) -> None:
    node_a = make_store(s3_url, s3_client_factory)
    node_b = make_store(s3_url, s3_client_factory)
    data = os.urandom(SIZE)
    partial = await node_a.open_partial("big.bin", "key-1", resume=True)
    # Node A gets two parts and a bit, then the connection drops.
    await append_in_blocks(partial, data[: 2 * PART + 5000])
    assert partial.offset == 2 * PART + 5000
    await partial.close()

    # Node B knows nothing but the bucket: the state beside the upload says where to resume.
    assert await node_b.find_partial("big.bin", "key-1") == 2 * PART
    resumed = await node_b.open_partial("big.bin", "key-1", resume=True)
    assert resumed.offset == 2 * PART
    assert resumed.sha256_hex() == hashlib.sha256(data[: 2 * PART]).hexdigest()
    await append_in_blocks(resumed, data[2 * PART :])
    name = await resumed.publish(expected_sha256=hashlib.sha256(data).hexdigest())
    assert name == "big.bin"
    assert await read_all(await node_a.open_reader(name)) == data


async def test_restart_discards_stored_parts(s3_url: str, s3_client_factory: ClientFactory) -> None:
    store = make_store(s3_url, s3_client_factory)
    partial = await store.open_partial("x.bin", "k", resume=False)
    await partial.append(os.urandom(PART))
    await partial.close()
    restarted = await store.open_partial("x.bin", "k", resume=False)
    assert restarted.offset == 0
    data = os.urandom(1000)
    await restarted.append(data)
    assert await restarted.publish(expected_sha256=hashlib.sha256(data).hexdigest()) == "x.bin"
    assert await read_all(await store.open_reader("x.bin")) == data


async def test_resume_keeps_only_parts_the_store_confirms(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    store = make_store(s3_url, s3_client_factory)
    data = os.urandom(2 * PART)
    partial = await store.open_partial("v.bin", "k", resume=False)
    assert isinstance(partial, S3Partial)
    await partial.append(data)
    await partial.close()
    # The saved state claims a part 2 the store does not have (as if the part
    # were lost): a resume keeps part 1 only and the file still comes out whole.
    state_key = store._state_key("v.bin", "k")
    document = json.loads(
        store.client.get_object(Bucket=store.bucket, Key=state_key)["Body"].read()
    )
    document["parts"][1]["etag"] = '"00000000000000000000000000000000"'
    store.client.put_object(Bucket=store.bucket, Key=state_key, Body=json.dumps(document).encode())
    resumed = await store.open_partial("v.bin", "k", resume=True)
    assert resumed.offset == PART
    assert resumed.sha256_hex() == hashlib.sha256(data[:PART]).hexdigest()
    await resumed.append(data[PART:])
    await resumed.publish(expected_sha256=hashlib.sha256(data).hexdigest())
    assert await read_all(await store.open_reader("v.bin")) == data


async def test_second_writer_of_one_partial_is_refused(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    node_a = make_store(s3_url, s3_client_factory)
    node_b = make_store(s3_url, s3_client_factory)
    first = await node_a.open_partial("w.bin", "k", resume=True)
    second = await node_b.open_partial("w.bin", "k", resume=True)
    writers = {"a": first, "b": second}
    parts = [os.urandom(PART) for _ in range(2)]
    for writer in writers.values():
        await writer.append(parts[0])  # both upload part 1 in the background
    # Only one can save its state after that part; the other learns it is not
    # the writer when it next waits for its part.
    outcomes = {}
    for label, writer in writers.items():
        try:
            await writer.append(parts[1])
        except TransferError as exc:
            outcomes[label] = exc.code
        else:
            outcomes[label] = "ok"
    assert sorted(outcomes.values()) == ["busy", "ok"]
    winner = next(writers[label] for label, outcome in outcomes.items() if outcome == "ok")
    data = b"".join(parts)
    await winner.publish(expected_sha256=hashlib.sha256(data).hexdigest())
    assert await read_all(await node_a.open_reader("w.bin")) == data


async def test_existing_name_gets_a_numbered_name(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    store = make_store(s3_url, s3_client_factory)
    names = []
    for index in range(3):
        partial = await store.open_partial("report.tar.gz", f"t{index}", resume=False)
        await partial.append(b"version %d" % index)
        names.append(await partial.publish())
    assert names == ["report.tar.gz", "report (1).tar.gz", "report (2).tar.gz"]
    for index, name in enumerate(names):
        assert await read_all(await store.open_reader(name)) == b"version %d" % index


async def test_publish_race_between_nodes_never_overwrites(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    nodes = [make_store(s3_url, s3_client_factory) for _ in range(2)]
    payloads = [os.urandom(PART + 10) for _ in nodes]
    published: dict[int, str] = {}

    async def upload(index: int) -> None:
        partial = await nodes[index].open_partial("same.bin", f"node{index}", resume=False)
        await partial.append(payloads[index])
        published[index] = await partial.publish()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for index in range(len(nodes)):
                nursery.start_soon(upload, index)
    assert sorted(published.values()) == ["same (1).bin", "same.bin"]
    for index, name in published.items():
        assert await read_all(await nodes[0].open_reader(name)) == payloads[index]


async def test_name_taken_by_another_writer_before_publish(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    store = make_store(s3_url, s3_client_factory)
    partial = await store.open_partial("late.bin", "t", resume=False)
    await partial.append(b"ours")
    # A writer that is not conduit (no reservation) creates the key meanwhile.
    location = parse_s3_url(s3_url)
    store.client.put_object(Bucket=location.bucket, Key=location.key("late.bin"), Body=b"theirs")
    with pytest.raises(TransferError) as caught:
        await partial.publish()
    assert caught.value.code == "name_collision"
    assert await read_all(await store.open_reader("late.bin")) == b"theirs"
    assert uploads_in_progress(store) == []


async def test_overwrite_replaces(s3_url: str, s3_client_factory: ClientFactory) -> None:
    store = make_store(s3_url, s3_client_factory)
    for content in (b"one", b"two"):
        partial = await store.open_partial("o.txt", content.decode(), resume=False, overwrite=True)
        await partial.append(content)
        assert await partial.publish() == "o.txt"
    assert await read_all(await store.open_reader("o.txt")) == b"two"


async def test_checksum_mismatch_discards(s3_url: str, s3_client_factory: ClientFactory) -> None:
    store = make_store(s3_url, s3_client_factory)
    partial = await store.open_partial("bad.bin", "t", resume=False)
    await partial.append(os.urandom(PART + 1))
    with pytest.raises(ChecksumMismatch):
        await partial.publish(expected_sha256="00" * 32)
    assert await store.list_files() == []
    assert uploads_in_progress(store) == []
    assert await store.find_partial("bad.bin", "t") is None


class FlipAfterMarker:
    """Flip the byte that follows ``marker`` the first time it passes (client to server)."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.seen = bytearray()
        self.flipped = False

    def __call__(self, chunk: bytes) -> bytes:
        start = len(self.seen)
        self.seen += chunk
        if self.flipped:
            return chunk
        found = self.seen.find(self.marker, max(0, start - len(self.marker)))
        target = found + len(self.marker)
        if found < 0 or target >= len(self.seen):
            return chunk
        self.flipped = True
        out = bytearray(chunk)
        out[target - start] ^= 0x01
        return bytes(out)


async def test_part_corrupted_in_transit_is_bad_digest(
    s3_url: str, s3_client_factory: ClientFactory, engines: Any, proxy_factory: Any
) -> None:
    from conduit.cluster.s3 import make_s3_client

    s3_port = int(engines.s3.endpoint_url.rsplit(":", 1)[1])
    marker = os.urandom(32)
    proxy = await proxy_factory(
        s3_port, lambda direction: FlipAfterMarker(marker) if direction == "c2s" else None
    )
    client = make_s3_client(
        endpoint_url=f"http://127.0.0.1:{proxy.port}",
        aws_access_key_id=engines.s3.access_key,
        aws_secret_access_key=engines.s3.secret_key,
        region_name=engines.s3.region,
    )
    store = S3Store(s3_url, client=client, part_size=PART)
    partial = await store.open_partial("flipped.bin", "t", resume=False)
    await partial.append(marker + os.urandom(PART))  # the part goes up in the background
    with pytest.raises(TransferError) as caught:
        await partial.publish()
    assert caught.value.code == "bad_digest"
    assert "BadDigest" in caught.value.message
    client.close()


async def test_listing_hides_partials_and_foreign_keys(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    store = make_store(s3_url, s3_client_factory)
    partial = await store.open_partial("pending.bin", "t", resume=False)
    await partial.append(os.urandom(PART))  # one part stored, upload still open
    location = parse_s3_url(s3_url)
    # Objects another S3 writer put there, under names conduit would refuse
    # (SeaweedFS itself refuses "a/../b" and control characters in keys).
    for foreign in (".hidden", "dir/", "sub/.git/config", "CON.txt", "trailing. "):
        store.client.put_object(Bucket=location.bucket, Key=location.key(foreign), Body=b"x")
    done = await store.open_partial("done.txt", "t2", resume=False)
    await done.append(b"done")
    await done.publish()
    assert [entry.name for entry in await store.list_files()] == ["done.txt"]
    assert [entry.name for entry in await store.list_files(max_entries=0)] == []
    assert uploads_in_progress(store) == [location.key("pending.bin")]
    await partial.discard()
    assert uploads_in_progress(store) == []


@pytest.mark.parametrize(
    "name",
    [
        "../escape.txt",
        "a/../../b.txt",
        "/etc/passwd",
        "nul\x00byte.txt",
        "bell\x07.txt",
        ".conduit/uploads/x.json",
        "dir/",
        "",
        "x" * 200 + "/" + "y" * 200 + "/" + "z" * 200 + "/" + "w" * 200 + "/" + "v" * 250,
    ],
)
async def test_hostile_names_refused(
    name: str, s3_url: str, s3_client_factory: ClientFactory
) -> None:
    store = make_store(s3_url, s3_client_factory)
    with pytest.raises(UnsafePathError):
        await store.open_partial(name, "t", resume=False)
    with pytest.raises(UnsafePathError):
        await store.stat(name)
    with pytest.raises(UnsafePathError):
        await store.open_reader(name)
    with pytest.raises(UnsafePathError):
        await store.delete(name)
    with pytest.raises(UnsafePathError):
        await store.rename("fine.txt", name)
    with pytest.raises(UnsafePathError):
        await store.open_partial("fine.txt", "../t", resume=False)


async def test_delete_rename_and_cleanup(s3_url: str, s3_client_factory: ClientFactory) -> None:
    store = make_store(s3_url, s3_client_factory)
    for name in ("a.txt", "b.txt"):
        partial = await store.open_partial(name, "t", resume=False)
        await partial.append(name.encode())
        await partial.publish()
    assert await store.rename("a.txt", "b.txt") == "b (1).txt"
    assert await store.rename("b (1).txt", "moved/c.txt") == "moved/c.txt"
    assert [entry.name for entry in await store.list_files()] == ["b.txt", "moved/c.txt"]
    assert await read_all(await store.open_reader("moved/c.txt")) == b"a.txt"
    assert await store.delete("b.txt") is True
    assert await store.delete("b.txt") is False

    stale = await store.open_partial("stale.bin", "old", resume=False)
    await stale.append(os.urandom(PART))
    await stale.close()
    assert await store.cleanup_stale_partials(3600) == 0
    assert await store.cleanup_stale_partials(0) == 1
    assert await store.find_partial("stale.bin", "old") is None
    assert uploads_in_progress(store) == []


async def test_size_checks(s3_url: str, s3_client_factory: ClientFactory) -> None:
    store = make_store(s3_url, s3_client_factory)
    await store.check_can_accept(10, 10)
    for size, limit, offset, code in [
        (-1, None, 0, "invalid_size"),
        (10, None, 11, "invalid_size"),
        (11, 10, 0, "too_large"),
        (PART * 10_000 + 1, None, 0, "too_large"),
    ]:
        with pytest.raises(TransferError) as caught:
            await store.check_can_accept(size, limit, offset=offset)
        assert caught.value.code == code


def test_url_parsing() -> None:
    location = parse_s3_url("s3://my-bucket//a/b/")
    assert (location.bucket, location.prefix) == ("my-bucket", "a/b")
    assert location.key("x.txt") == "a/b/x.txt"
    assert location.relative("a/b/x.txt") == "x.txt"
    assert location.relative("a/bx.txt") is None
    assert parse_s3_url("s3://bucket").key("x") == "x"
    for bad in ("s3://B", "s3://a", "s3://bucket/../x", "s3://bucket/a\\b", "/tmp/x", "s3://x..y"):
        with pytest.raises(ValueError, match=r"(?i)s3"):
            parse_s3_url(bad)


async def test_unreadable_state_starts_afresh(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    store = make_store(s3_url, s3_client_factory)
    state_key = store._state_key("g.bin", "k")
    for garbage in (b"not json", b'{"version": 1}', b"[]"):
        store.client.put_object(Bucket=store.bucket, Key=state_key, Body=garbage)
        assert await store.find_partial("g.bin", "k") is None
        partial = await store.open_partial("g.bin", "k", resume=True)
        assert partial.offset == 0
        await partial.discard()
    store.client.put_object(Bucket=store.bucket, Key=state_key, Body=b"garbage")
    assert await store.discard_partial("g.bin", "k") is True
    assert await store.discard_partial("g.bin", "k") is False
