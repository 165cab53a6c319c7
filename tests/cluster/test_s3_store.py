"""The S3 store against a real SeaweedFS: parts, resume on another node, publishing races."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import botocore.exceptions  # type: ignore[import-untyped]
import pytest
import trio

from conduit.cluster import _s3_partial, s3
from conduit.cluster._s3_wire import is_precondition, is_write_conflict
from conduit.cluster.location import parse_s3_url
from conduit.cluster.s3 import MIN_PART_SIZE, S3Partial, S3Store
from conduit.cluster.store import FileReader, PartialUpload
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


async def test_published_upload_leaves_nothing_behind(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    store = make_store(s3_url, s3_client_factory)
    data = os.urandom(SIZE)
    partial = await store.open_partial("reports/q1.bin", "t-1", resume=False)
    await append_in_blocks(partial, data)
    name = await partial.publish(expected_sha256=hashlib.sha256(data).hexdigest())
    assert await read_all(await store.open_reader(name)) == data
    # No multipart upload, no state, no name reservation left.
    assert uploads_in_progress(store) == []
    location = parse_s3_url(s3_url)
    keys = store.client.list_objects_v2(Bucket=location.bucket, Prefix=location.list_prefix)
    assert [entry["Key"] for entry in keys["Contents"]] == [location.key(name)]
    assert store.location_of(name) == f"{s3_url}/{name}"


async def test_resume_starts_at_the_last_whole_part(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
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


async def test_a_page_reads_only_the_keys_after_its_start(
    s3_url: str, s3_client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next page asks the store for the keys after the last one's
    (``StartAfter``): one listing request for a page of fewer keys than a
    request brings, however deep in the prefix it starts, not one per
    ``LIST_PAGE`` keys before it. A long key another tool wrote (past the
    room kept for our suffixes) can end a page and start the next."""
    monkeypatch.setattr(s3, "LIST_PAGE", 5)
    store = make_store(s3_url, s3_client_factory)
    location = parse_s3_url(s3_url)
    # A key of 1022 bytes, in parts of at most 200 (SeaweedFS's limit on one).
    room = 1022 - len(location.key("").encode())
    long_name = "/".join("l" * min(200, room - start) for start in range(0, room, 201))
    assert len(location.key(long_name).encode()) == 1022
    names = [f"f{index:02}" for index in range(40)] + [long_name, "z"]
    for name in names:
        store.client.put_object(Bucket=location.bucket, Key=location.key(name), Body=b"x")
    requests: list[dict[str, Any]] = []
    store.client.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2", lambda params, **_: requests.append(params)
    )
    everything = [entry.name for entry in await store.list_files()]
    assert sorted(everything) == sorted(names)
    requests.clear()
    page = await store.list_files(max_entries=3, after=everything[30])
    assert [entry.name for entry in page] == everything[31:34]
    assert len(requests) == 1, requests
    last = everything.index(long_name)
    after_long = await store.list_files(after=everything[last])
    assert [entry.name for entry in after_long] == everything[last + 1 :]


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


async def test_cleanup_aborts_abandoned_uploads(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    store = make_store(s3_url, s3_client_factory)
    stale = await store.open_partial("stale.bin", "old", resume=False)
    await stale.append(os.urandom(PART))
    await stale.close()
    # An upload whose state was never written (a node died right after creating it).
    location = parse_s3_url(s3_url)
    store.client.create_multipart_upload(Bucket=location.bucket, Key=location.key("orphan.bin"))
    assert len(uploads_in_progress(store)) == 2
    assert await store.cleanup_stale_partials(3600) == 0
    assert len(uploads_in_progress(store)) == 2
    await trio.sleep(1.1)  # S3 timestamps have one-second resolution
    assert await store.cleanup_stale_partials(1) == 1
    assert uploads_in_progress(store) == []


async def test_a_sweep_leaves_alone_uploads_still_written_whose_state_it_does_not_hold(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    """The store above a user's root (accounts) holds none of that user's
    upload states, and another node's staging sweep none of the sender's:
    their sweeps judged those uploads by their creation only, so a long
    upload, or one resumed after a pause, was aborted under its writer
    (NoSuchUpload at its next part). Now an upload that had a part stored
    since the cutoff is left; one not written to for as long is abandoned."""
    parent = make_store(s3_url, s3_client_factory)
    alice = parent.child("alice")
    other_node = make_store(s3_url, s3_client_factory)
    upload = await alice.open_partial("big.bin", "upload-1", resume=False)
    idle = await alice.open_partial("idle.bin", "upload-2", resume=False)
    staging = await parent.open_staging("a" * 32)
    first = os.urandom(PART)
    for partial in (upload, idle, staging):
        await partial.append(first)
    await idle.close()
    await trio.sleep(2.5)  # all created before the cutoff (S3 timestamps: 1 s)
    second, third = os.urandom(PART), os.urandom(PART)
    await upload.append(second)
    await upload.close()  # its second part stored after the cutoff
    await staging.append(second)
    await staging.append(third)  # queued once the second part is stored

    await parent.cleanup_stale_partials(2)
    assert await other_node.cleanup_staging(2) == 0
    # The idle upload went (its writer is gone: nothing since the cutoff), the others stay.
    expected = sorted([alice.location.key("big.bin"), staging.key])
    assert sorted(uploads_in_progress(parent)) == expected
    resumed = await alice.open_partial("big.bin", "upload-1", resume=True)
    assert resumed.offset == 2 * PART
    await resumed.append(b"end")
    await resumed.publish(expected_sha256=hashlib.sha256(first + second + b"end").hexdigest())
    await staging.publish(expected_sha256=hashlib.sha256(first + second + third).hexdigest())
    assert await parent.delete_staged("a" * 32)
    assert uploads_in_progress(parent) == []
    for store in (parent, other_node):
        store.close()


async def test_over_long_key_refused(s3_url: str, s3_client_factory: ClientFactory) -> None:
    store = make_store(s3_url, s3_client_factory)
    # A fine local name (under 4096 bytes, segments under 255) but over S3's 1024-byte keys.
    name = "/".join(letter * 200 for letter in "abcde") + ".txt"
    with pytest.raises(UnsafePathError, match="too long"):
        await store.open_partial(name, "t", resume=False)
    with pytest.raises(UnsafePathError, match="too long"):
        await store.stat(name)


async def test_part_limit(s3_url: str, s3_client_factory: ClientFactory) -> None:
    store = make_store(s3_url, s3_client_factory)
    await store.check_can_accept(PART * 10_000)
    with pytest.raises(TransferError) as caught:
        await store.check_can_accept(PART * 10_000 + 1)
    assert caught.value.code == "too_large"


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
    for garbage in (b"not json", b'{"version": 1}', b"[]", b"null", b"7", b"\xff", b"[" * 100_000):
        store.client.put_object(Bucket=store.bucket, Key=state_key, Body=garbage)
        assert await store.find_partial("g.bin", "k") is None
        partial = await store.open_partial("g.bin", "k", resume=True)
        assert partial.offset == 0
        await partial.discard()
    store.client.put_object(Bucket=store.bucket, Key=state_key, Body=b"garbage")
    assert await store.discard_partial("g.bin", "k") is True
    assert await store.discard_partial("g.bin", "k") is False


async def test_a_rename_never_lands_on_a_name_an_upload_reserved(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    store = make_store(s3_url, s3_client_factory)
    other = make_store(s3_url, s3_client_factory)  # another node
    data = os.urandom(PART + 10)
    upload = await store.open_partial("big.bin", "t-big", resume=False)  # reserves big.bin
    await append_in_blocks(upload, data)
    small = b"small"
    await other.put_file("small.txt", small, sha256=hashlib.sha256(small).hexdigest())
    assert await other.rename("small.txt", "big.bin") == "big (1).bin"
    with pytest.raises(TransferError) as refused:
        await other.rename("big (1).bin", "big.bin", overwrite=True)
    assert refused.value.code == "busy"
    assert await upload.publish(expected_sha256=hashlib.sha256(data).hexdigest()) == "big.bin"
    assert await read_all(await store.open_reader("big.bin")) == data
    assert await read_all(await store.open_reader("big (1).bin")) == small


@pytest.mark.parametrize("when", ["before the copy", "between the copy and the delete"])
async def test_a_rename_keeps_a_file_written_at_its_source_meanwhile(
    s3_url: str, s3_client_factory: ClientFactory, when: str
) -> None:
    store = make_store(s3_url, s3_client_factory)
    old, new = b"old bytes", b"new bytes, written during the rename"
    await store.put_file("a.txt", old, sha256=hashlib.sha256(old).hexdigest())
    source = store.location.key("a.txt")
    real_copy = store.client.copy_object

    def overwrite_source() -> None:  # what another node's overwrite=True upload does
        store.client.put_object(Bucket=store.bucket, Key=source, Body=new)

    def copy_object(**kwargs: Any) -> Any:
        if when == "before the copy":
            overwrite_source()
        answer = real_copy(**kwargs)
        if when != "before the copy":
            overwrite_source()
        return answer

    store.client.copy_object = copy_object
    if when == "before the copy":
        with pytest.raises(TransferError) as refused:
            await store.rename("a.txt", "b.txt")
        assert refused.value.code == "busy"
    else:
        assert await store.rename("a.txt", "b.txt") == "b.txt"
        assert await read_all(await store.open_reader("b.txt")) == old
    assert await read_all(await store.open_reader("a.txt")) == new


@pytest.fixture
def copies_in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rename past CopyObject's limit from 8 MiB, in parts of 5 MiB (AWS: 5 GiB, 1 GiB)."""
    monkeypatch.setattr(s3, "MAX_COPY_OBJECT", 8 * 1024 * 1024)
    monkeypatch.setattr(s3, "COPY_PART_SIZE", PART)


def count_part_copies(
    store: S3Store, before_each: Callable[[int], None] | None = None
) -> list[int]:
    """Wrap the store's UploadPartCopy: the part numbers copied, in order."""
    real = store.client.upload_part_copy
    copied: list[int] = []

    def upload_part_copy(**kwargs: Any) -> Any:
        if before_each is not None:
            before_each(kwargs["PartNumber"])
        answer = real(**kwargs)
        copied.append(kwargs["PartNumber"])
        return answer

    store.client.upload_part_copy = upload_part_copy
    return copied


@pytest.mark.usefixtures("copies_in_parts")
async def test_a_rename_past_the_copy_limit_copies_in_parts(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    store = make_store(s3_url, s3_client_factory)
    data = os.urandom(SIZE)  # over the (lowered) limit: three parts, the last short
    digest = hashlib.sha256(data).hexdigest()
    await store.put_file("big.bin", data, sha256=digest)
    await store.put_file("taken.bin", b"taken", sha256=hashlib.sha256(b"taken").hexdigest())
    copied = count_part_copies(store)
    # A taken name is looked at first (not copied in parts to be refused at the end).
    assert await store.rename("big.bin", "taken.bin") == "taken (1).bin"
    assert copied == [1, 2, 3]
    assert await read_all(await store.open_reader("taken (1).bin")) == data
    assert await read_all(await store.open_reader("taken.bin")) == b"taken"
    with pytest.raises(FileNotFoundError):
        await store.stat("big.bin")
    # overwrite=True replaces the target.
    assert await store.rename("taken (1).bin", "taken.bin", overwrite=True) == "taken.bin"
    assert await read_all(await store.open_reader("taken.bin")) == data
    assert uploads_in_progress(store) == []


def test_a_conditional_write_conflict_is_told_from_a_refusal() -> None:
    # AWS answers a conditional write racing another with 409 ConditionalRequestConflict:
    # a rename takes it as a taken name, a publish does not (the name may be free).
    def refusal(status: int, code: str) -> botocore.exceptions.ClientError:
        response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return botocore.exceptions.ClientError(response, "CompleteMultipartUpload")

    assert is_precondition(refusal(412, "PreconditionFailed"))
    assert not is_precondition(refusal(409, "ConditionalRequestConflict"))
    assert is_write_conflict(refusal(409, "ConditionalRequestConflict"))
    assert not is_write_conflict(refusal(409, "OperationAborted"))
    assert not is_write_conflict(refusal(412, "PreconditionFailed"))


@pytest.mark.usefixtures("copies_in_parts")
async def test_a_rename_in_parts_stops_when_its_source_is_rewritten(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    store = make_store(s3_url, s3_client_factory)
    data, new = os.urandom(SIZE), b"new bytes, written during the rename"
    await store.put_file("big.bin", data, sha256=hashlib.sha256(data).hexdigest())
    source = store.location.key("big.bin")

    def overwrite_before_part_two(number: int) -> None:
        if number == 2:  # what another node's overwrite=True upload does
            store.client.put_object(Bucket=store.bucket, Key=source, Body=new)

    copied = count_part_copies(store, overwrite_before_part_two)
    with pytest.raises(TransferError) as refused:
        await store.rename("big.bin", "moved.bin")
    assert refused.value.code == "busy"
    assert copied == [1]
    with pytest.raises(FileNotFoundError):
        await store.stat("moved.bin")
    assert await read_all(await store.open_reader("big.bin")) == new
    assert uploads_in_progress(store) == []  # the copy's upload was aborted


async def test_a_name_reserved_by_an_upload_that_never_began_is_freed(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    store = make_store(s3_url, s3_client_factory)
    real_create = store.client.create_multipart_upload

    def failing_create(**kwargs: Any) -> Any:
        store.client.create_multipart_upload = real_create
        raise RuntimeError("the store failed once")

    # A store error after the name was reserved: the reservation is released.
    store.client.create_multipart_upload = failing_create
    with pytest.raises(RuntimeError):
        await store.open_partial("report.pdf", "t1", resume=False)
    # A node that died between the reservation and its state: the sweeper
    # frees the name once it is older than the cutoff.
    store._reserve("notes.txt", "someone", False)
    data = b"mine"
    assert await store.put_file("report.pdf", data, sha256=hashlib.sha256(data).hexdigest()) == (
        "report.pdf"
    )
    await trio.sleep(1.1)  # S3 timestamps have one-second resolution
    await store.cleanup_stale_partials(1)
    assert await store.put_file("notes.txt", data, sha256=hashlib.sha256(data).hexdigest()) == (
        "notes.txt"
    )
    # A reservation of an upload still under way is not swept. (A state
    # written just now may look up to a second old, the timestamps being
    # whole seconds: a cutoff of 1 s swept one in a CI run. Its reservation
    # is 2.1 s old, past a 2 s cutoff; the state written again is not.)
    upload = await store.open_partial("live.bin", "t2", resume=False)
    await upload.append(data)
    await trio.sleep(2.1)
    await upload.close()  # its state is written again now: the upload is alive
    await store.cleanup_stale_partials(2)
    assert await store.put_file("live.bin", data, sha256=hashlib.sha256(data).hexdigest()) == (
        "live (1).bin"
    )


async def test_a_forged_upload_state_steers_no_deletion(
    s3_url: str, s3_client_factory: ClientFactory
) -> None:
    # A state object written by someone else (not by this store) names
    # another user's object as its "reservation": neither the sweeper nor a
    # discard may delete it.
    root = make_store(s3_url, s3_client_factory)
    alice = root.child("alice")
    precious = b"alice's thesis"
    await alice.put_file("thesis.pdf", precious, sha256=hashlib.sha256(precious).hexdigest())
    victim = alice.location.key("thesis.pdf")
    forged = {
        "version": 1,
        "updated": 0,
        "name": "x.bin",
        "transfer_id": "x",
        "key": root.location.key("x.bin"),
        "upload_id": "none",
        "part_size": PART,
        "overwrite": False,
        "reservation": victim,
        "parts": [],
        "closing": False,
    }
    root.client.put_object(
        Bucket=root.bucket, Key=root._state_key("x.bin", "x"), Body=json.dumps(forged).encode()
    )
    await trio.sleep(1.1)  # S3 timestamps have one-second resolution
    assert await root.cleanup_stale_partials(1) == 0
    assert await root.discard_partial("x.bin", "x") is True  # the unreadable state goes
    assert await read_all(await alice.open_reader("thesis.pdf")) == precious


async def test_staging_for_another_node(s3_url: str, s3_client_factory: ClientFactory) -> None:
    node_a = make_store(s3_url, s3_client_factory)
    node_b = make_store(s3_url, s3_client_factory)
    data = os.urandom(SIZE)
    first = await node_a.open_staging("push-1")
    await first.append(b"abandoned attempt")
    await first.close()
    staging = await node_a.open_staging("push-1")  # starts over
    assert staging.offset == 0
    await append_in_blocks(staging, data)
    await staging.publish(expected_sha256=hashlib.sha256(data).hexdigest())
    # Never listed, but node B reads it by token, from any offset.
    assert await node_b.list_files() == []
    reader = await node_b.open_staged("push-1", start=3)
    assert reader.size == SIZE
    assert await read_all(reader) == data[3:]
    assert await node_b.delete_staged("push-1") is True
    assert await node_b.delete_staged("push-1") is False
    with pytest.raises(FileNotFoundError):
        await node_b.open_staged("push-1")
    assert uploads_in_progress(node_a) == []
    for token in ("../x", "a/b", "", "x" * 65):
        with pytest.raises(UnsafePathError):
            await node_a.open_staging(token)
        with pytest.raises(UnsafePathError):
            await node_b.open_staged(token)


def _stalling_client(engines: Any, proxy: Any, timeout: float) -> Any:
    """A client of the test store through ``proxy``, with both of its timeouts ``timeout``."""
    from conduit.cluster.s3 import make_s3_client

    return make_s3_client(
        endpoint_url=f"http://127.0.0.1:{proxy.port}",
        aws_access_key_id=engines.s3.access_key,
        aws_secret_access_key=engines.s3.secret_key,
        region_name=engines.s3.region,
        connect_timeout=timeout,
        read_timeout=timeout,
    )


async def test_a_store_that_stops_answering_fails_calls_within_the_clients_timeouts(
    s3_url: str, engines: Any, proxy_factory: Any
) -> None:
    """A store that stops answering (a frozen process, a dropped route: the
    proxy swallows both directions) fails each call within the client's
    timeouts and its retries, as ``storage_unavailable``. With botocore's
    60 s timeouts, which conduit's client used until 2026-12-07, a call took
    about 4 minutes (a review); here they are 1 s, to keep the test short."""
    proxy = await proxy_factory(int(engines.s3.endpoint_url.rsplit(":", 1)[1]))
    client = _stalling_client(engines, proxy, 1.0)
    store = S3Store(s3_url, client=client, part_size=PART)
    await store.put_file("before.bin", b"x", sha256=hashlib.sha256(b"x").hexdigest())
    proxy.blackhole("c2s")
    proxy.blackhole("s2c")
    with trio.fail_after(60), pytest.raises(TransferError) as caught:
        await store.put_file("small.bin", b"x", sha256=hashlib.sha256(b"x").hexdigest())
    assert caught.value.code == "storage_unavailable", caught.value
    assert "Read timeout" in caught.value.message, caught.value
    store.close()
    client.close()


async def test_closing_a_partial_whose_part_never_ends_waits_only_so_long(
    s3_url: str, engines: Any, proxy_factory: Any
) -> None:
    """The part in flight into a store that stopped answering: closing the
    partial (as a node's clean close does) gives up on it after
    ``CLOSE_PATIENCE`` instead of waiting out the client's timeouts and
    retries (60 s each here, botocore's defaults: a close with an upload in
    flight had not ended 8 minutes into such a stall, a review found on
    2026-12-07). The part's thread goes on until those end it."""
    proxy = await proxy_factory(int(engines.s3.endpoint_url.rsplit(":", 1)[1]))
    client = _stalling_client(engines, proxy, 60.0)
    store = S3Store(s3_url, client=client, part_size=PART)
    partial = await store.open_partial("stalled.bin", "t", resume=False)
    proxy.blackhole("c2s")
    proxy.blackhole("s2c")
    await partial.append(os.urandom(PART))  # its part goes up in the background, into the stall
    started = trio.current_time()
    with trio.fail_after(_s3_partial.CLOSE_PATIENCE + 20):
        await partial.close()
    assert trio.current_time() - started >= _s3_partial.CLOSE_PATIENCE
    # The abandoned part's thread ends once the proxy goes (refused at once).
    store.close()
