"""A conditional write whose answer is lost is told apart from a clash.

boto3 sends a request again when its answer does not come (a dropped
connection, a timeout). For a conditional write that the store had done, the
second attempt finds its own object and is refused (412, as for another
writer's). Here the first answer of one operation is dropped for real: the
request goes to SeaweedFS, which does it, and the client is then told the
connection closed (botocore's ``ConnectionClosedError``), so its standard
retry sends it again. Found by a review of the cluster mode: a publish was
then reported a name collision (the file stored, the client told it failed,
``on_file_received`` never run), a small file was stored twice (under its
name and the next free one), an upload's state rewrite made the upload
fail ``busy``, and a rename left the file under two names.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import botocore.exceptions  # type: ignore[import-untyped]

from conduit.cluster.s3 import MIN_PART_SIZE, S3Store

PART = MIN_PART_SIZE


def _drop_first_answer(store: S3Store, operation: str, key_part: str) -> list[str]:
    """Drop the answer of the first ``operation`` on a key containing ``key_part``,
    once the store has done it; the URLs it was dropped for."""
    dropped: list[str] = []

    def send_then_drop(request: Any, **_: Any) -> None:
        if dropped or key_part not in request.url:
            return
        dropped.append(request.url)
        store.client._endpoint.http_session.send(request)  # the store does it ...
        raise botocore.exceptions.ConnectionClosedError(endpoint_url=request.url)  # ... unheard

    store.client.meta.events.register(f"before-send.s3.{operation}", send_then_drop)
    return dropped


def _names(store: S3Store) -> list[str]:
    answer = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.location.list_prefix)
    keys = [str(entry["Key"]) for entry in answer.get("Contents", [])]
    return sorted(
        name for key in keys if (name := store.location.relative(key)) and ".conduit" not in name
    )


async def test_a_publish_whose_answer_was_lost_is_published(
    s3_url: str, s3_client_factory: Callable[[], Any]
) -> None:
    store = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
    data = os.urandom(PART + 1234)
    partial = await store.open_partial("report.bin", "t" * 32, resume=False)
    await partial.append(data)
    dropped = _drop_first_answer(store, "CompleteMultipartUpload", "report.bin")
    name = await partial.publish(expected_sha256=hashlib.sha256(data).hexdigest())
    assert dropped and name == "report.bin"
    assert _names(store) == ["report.bin"]
    reader = await store.open_reader("report.bin")
    assert await reader.read(2 * len(data)) == data
    store.close()


async def test_a_small_file_whose_answer_was_lost_is_stored_once(
    s3_url: str, s3_client_factory: Callable[[], Any]
) -> None:
    store = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
    data = os.urandom(1000)
    dropped = _drop_first_answer(store, "PutObject", "small.bin")
    name = await store.put_file("small.bin", data, sha256=hashlib.sha256(data).hexdigest())
    assert dropped and name == "small.bin"
    assert _names(store) == ["small.bin"]
    # A file that is really there already is still a clash: the next name.
    other = os.urandom(1000)
    assert await store.put_file("small.bin", other, sha256=hashlib.sha256(other).hexdigest()) == (
        "small (1).bin"
    )
    store.close()


async def test_a_state_rewrite_whose_answer_was_lost_keeps_the_upload_going(
    s3_url: str, s3_client_factory: Callable[[], Any]
) -> None:
    store = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
    data = os.urandom(2 * PART + 99)
    partial = await store.open_partial("big.bin", "u" * 32, resume=False)
    # The state is created at the open; the first rewrite follows the first part.
    dropped = _drop_first_answer(store, "PutObject", "/.conduit/uploads/")
    await partial.append(data[: PART + 5])
    await partial.append(data[PART + 5 :])
    name = await partial.publish(expected_sha256=hashlib.sha256(data).hexdigest())
    assert dropped and name == "big.bin"
    reader = await store.open_reader("big.bin")
    assert await reader.read(2 * len(data)) == data
    store.close()


async def test_a_rename_whose_answer_was_lost_renames_once(
    s3_url: str, s3_client_factory: Callable[[], Any]
) -> None:
    store = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
    data = os.urandom(PART + 77)  # stored in parts: its ETag is the parts'
    partial = await store.open_partial("a.bin", "r" * 32, resume=False)
    await partial.append(data)
    await partial.publish(expected_sha256=hashlib.sha256(data).hexdigest())
    dropped = _drop_first_answer(store, "CopyObject", "b.bin")
    assert await store.rename("a.bin", "b.bin") == "b.bin"
    assert dropped and _names(store) == ["b.bin"]
    reader = await store.open_reader("b.bin")
    assert await reader.read(2 * len(data)) == data
    store.close()
