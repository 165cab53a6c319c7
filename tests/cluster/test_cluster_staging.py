"""The node's sweep of the staging area: leftovers go, upload partials stay."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import pytest

from conduit.cluster.s3 import MIN_PART_SIZE, S3Store


def _uploads(store: S3Store) -> list[str]:
    answer = store.client.list_multipart_uploads(
        Bucket=store.bucket, Prefix=store.location.list_prefix
    )
    return sorted(str(upload["Key"]) for upload in answer.get("Uploads", []))


async def test_cleanup_staging_leaves_upload_partials_alone(
    s3_url: str, s3_client_factory: Callable[[], Any]
) -> None:
    store = S3Store(s3_url, client=s3_client_factory(), part_size=MIN_PART_SIZE)
    data = os.urandom(100_000)
    # A staged file nobody collected, and a staging upload its sender never finished.
    staged = await store.open_staging("t1")
    await staged.append(data)
    await staged.publish(expected_sha256=hashlib.sha256(data).hexdigest())
    unfinished = await store.open_staging("t2")
    await unfinished.close()
    # An ordinary upload's partial: the transfer handler's, not the sweep's.
    partial = await store.open_partial("kept.bin", "upload-1", resume=False)
    await partial.append(os.urandom(MIN_PART_SIZE + 10))
    await partial.close()

    assert await store.cleanup_staging(3600) == 0  # all young
    assert await store.cleanup_staging(0) == 2
    with pytest.raises(FileNotFoundError):
        await store.open_staged("t1")
    assert [key for key in _uploads(store) if "/.conduit/staging/" in key] == []
    assert await store.find_partial("kept.bin", "upload-1") == MIN_PART_SIZE
    assert await store.cleanup_staging(0) == 0
    await store.discard_partial("kept.bin", "upload-1")
    store.close()
