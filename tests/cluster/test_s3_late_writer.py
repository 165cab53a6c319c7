"""A node that lets go of a partial late never makes the node that resumed it start over.

When a client is cut off, its node finishes storing the part it had in
flight and records it; a retry through another node may have loaded the
state just before. Both then hold the same bytes of the same file, and the
second node's state (a superset) wins. A second writer of *different* bytes
is still refused (``busy``): nothing is mixed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

import pytest

from conduit.cluster.s3 import MIN_PART_SIZE, S3Store
from conduit.errors import TransferError

PART = MIN_PART_SIZE


async def _read_all(store: S3Store, name: str) -> bytes:
    reader = await store.open_reader(name)
    data = b""
    while block := await reader.read(PART):
        data += block
    await reader.aclose()
    return data


async def test_an_early_retry_merges_with_the_node_letting_go(
    s3_url: str, s3_client_factory: Callable[[], Any]
) -> None:
    node_a = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
    node_b = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
    data = os.urandom(4 * PART + 1000)
    first = await node_a.open_partial("m.bin", "t" * 32, resume=False)
    await first.append(data[: 2 * PART])
    await first._wait_inflight()  # two parts stored and recorded

    # The retry reaches B, which resumes from the state as it is now...
    second = await node_b.open_partial("m.bin", "t" * 32, resume=True)
    assert second.offset == 2 * PART
    # ... while A stores the part it still had and records it.
    await first.append(data[2 * PART : 3 * PART])
    await first.close()
    assert await node_a.find_partial("m.bin", "t" * 32) == 3 * PART

    # B stores the same part again: A's state is a prefix of B's, B's is kept.
    await second.append(data[2 * PART :])
    name = await second.publish(expected_sha256=hashlib.sha256(data).hexdigest())
    assert name == "m.bin"
    assert await _read_all(node_a, "m.bin") == data
    node_a.close()
    node_b.close()


async def test_a_second_writer_of_other_bytes_is_refused(
    s3_url: str, s3_client_factory: Callable[[], Any]
) -> None:
    node_a = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
    node_b = S3Store(s3_url, client=s3_client_factory(), part_size=PART)
    data = os.urandom(3 * PART)
    first = await node_a.open_partial("c.bin", "u" * 32, resume=False)
    await first.append(data[:PART])
    await first._wait_inflight()
    second = await node_b.open_partial("c.bin", "u" * 32, resume=True)
    assert second.offset == PART
    await first.append(os.urandom(PART))  # A's part 2: other bytes
    await first.close()
    await second.append(data[PART : 2 * PART])
    with pytest.raises(TransferError) as caught:
        await second.publish(expected_sha256=hashlib.sha256(data[: 2 * PART]).hexdigest())
    assert caught.value.code == "busy"
    # Nothing was published, and the partial A recorded is intact.
    with pytest.raises(FileNotFoundError):
        await node_a.stat("c.bin")
    assert await node_a.find_partial("c.bin", "u" * 32) == 2 * PART
    await node_a.discard_partial("c.bin", "u" * 32)
    node_a.close()
    node_b.close()
