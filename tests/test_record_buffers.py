"""Bulk data's big buffers are page mappings, reused, and unmapped when done.

Large records are opened into kept mapped buffers, reused only once free: a
record's plaintext (and the frame payloads that are views of it) never changes
while anything still refers to it, however many records follow; buffers are
reused once no view is left (so bulk data does not make a fresh megabyte per
record), and an idle opener unmaps them. The receiver joins each batch of
chunks, a record's worth at a time, into one mapping per upload, reused, and
unmapped at the end. A
connection reads bulk data from its socket into one mapping of its own,
dropped when it is idle.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from pathlib import Path

import pytest
import trio
import trio.testing

from conduit._receive_buffer import SMALL_READ, ReceiveBuffer
from conduit.protocol.records import (
    MAPPED_KEEP,
    MAPPED_MIN,
    RecordOpener,
    RecordSealer,
    anonymous_buffer,
)
from conduit.transfer._engine import JOIN_LIMIT, JoinBuffer
from conduit.transfer._storage import PartialFile, StorageRoot

KEY = bytes(range(32))
LIMIT = 2 << 20


def sealed(sealer: RecordSealer, fill: int, size: int = 200 * 1024) -> bytes:
    return bytes(sealer.seal(bytes([fill]) * size))


def test_live_views_are_never_overwritten() -> None:
    sealer, opener = RecordSealer(KEY, LIMIT), RecordOpener(KEY, LIMIT)
    held = []
    for index in range(3 * MAPPED_KEEP):
        opener.feed(sealed(sealer, index))
        record = opener.next_record()
        assert isinstance(record, memoryview)
        held.append(record[100:200])  # a slice keeps the whole buffer
    for index, view in enumerate(held):
        assert bytes(view) == bytes([index]) * 100
    assert len(opener._mapped) == MAPPED_KEEP  # the rest were one-off mappings


def test_free_buffers_are_reused_and_idle_ones_unmapped() -> None:
    sealer, opener = RecordSealer(KEY, LIMIT), RecordOpener(KEY, LIMIT)
    for index in range(50):  # a consumer that is done with each record at once
        opener.feed(sealed(sealer, index))
        record = opener.next_record()
        assert record is not None and bytes(record[:3]) == bytes([index]) * 3
        del record
    assert len(opener._mapped) == 1
    opener.feed(sealed(sealer, 7))
    kept = opener.next_record()
    opener.release_idle_buffers()  # used since the last call: kept
    assert len(opener._mapped) == 1
    opener.release_idle_buffers()  # idle, but still referenced: kept
    assert len(opener._mapped) == 1
    assert kept is not None and bytes(kept[:1]) == b"\x07"
    del kept
    opener.release_idle_buffers()
    assert opener._mapped == []


def test_small_records_are_plain_bytes() -> None:
    sealer, opener = RecordSealer(KEY, LIMIT), RecordOpener(KEY, LIMIT)
    payload = os.urandom(MAPPED_MIN // 2)
    opener.feed(bytes(sealer.seal(payload)))
    record = opener.next_record()
    assert type(record) is bytes and record == payload
    assert opener._mapped == []


# --------------------------------------------------------------------------- the receiver's join


def test_join_buffer_writes_each_batch_whole_and_reuses_its_mapping(tmp_path: Path) -> None:
    storage = StorageRoot(tmp_path / "storage")
    partial = storage.open_partial("joined.bin", "transfer-1", resume=False)
    joined = JoinBuffer()
    batches = [
        [os.urandom(64 * 1024) for _ in range(4)],
        [memoryview(os.urandom(1000)), b"x" * 10],  # smaller: the same mapping
        [os.urandom(100)],  # one chunk: written as it is
        [os.urandom(300 * 1024), os.urandom(5)],  # larger: a new mapping
    ]
    mappings = []
    for batch in batches:
        joined.write(partial, batch)
        mappings.append(joined._buffer)
    assert mappings[1] is mappings[0] and mappings[2] is mappings[0]
    assert mappings[3] is not mappings[0] and mappings[0].closed
    joined.close()
    assert mappings[3].closed and joined._buffer is None
    data = b"".join(bytes(chunk) for batch in batches for chunk in batch)
    assert partial.publish(overwrite=False, expected_sha256=hashlib.sha256(data).hexdigest())
    assert (tmp_path / "storage" / "joined.bin").read_bytes() == data


def test_join_buffer_joins_a_large_batch_in_groups_of_a_record(tmp_path: Path) -> None:
    storage = StorageRoot(tmp_path / "storage")
    partial = storage.open_partial("grouped.bin", "transfer-1", resume=False)
    joined = JoinBuffer()
    # A whole window arrived while the disk was busy: 64 chunks of 64 KiB.
    batch = [os.urandom(64 * 1024) for _ in range(64)]
    joined.write(partial, batch)
    assert joined._buffer is not None and len(joined._buffer) <= JOIN_LIMIT
    joined.write(partial, [os.urandom(JOIN_LIMIT + 1)])  # one chunk: written as it is
    assert joined._buffer is not None and len(joined._buffer) <= JOIN_LIMIT
    data = b"".join(batch) + partial_tail(partial, JOIN_LIMIT + 1)
    joined.close()
    assert partial.publish(overwrite=False, expected_sha256=hashlib.sha256(data).hexdigest())
    assert (tmp_path / "storage" / "grouped.bin").read_bytes() == data


def partial_tail(partial: PartialFile, count: int) -> bytes:
    """The last ``count`` bytes written to ``partial``."""
    return os.pread(partial._require_open(), count, partial.offset - count)


# --------------------------------------------------------------------------- socket reads


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


async def test_bulk_socket_reads_land_in_one_reused_mapping() -> None:
    ours, peer = socket_pair()
    buffer = ReceiveBuffer(256 * 1024)

    async def receive_exactly(size: int) -> bytes:
        received = bytearray()
        while len(received) < size:
            received += await buffer.receive(ours)
        return bytes(received)

    with trio.fail_after(10):
        # Calls and results: small reads, no buffer held.
        await peer.send_all(b"small")
        assert await buffer.receive(ours) == b"small"
        assert buffer._mapping is None
        # A read that fills the small size: bulk data, read big from now on.
        bulk = os.urandom(SMALL_READ + 300 * 1024)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.send_all, bulk)
            assert await receive_exactly(len(bulk)) == bulk
        mapping = buffer._mapping
        assert mapping is not None
        await peer.send_all(b"next")
        view = await buffer.receive(ours)
        assert bytes(view) == b"next" and view.obj is mapping  # type: ignore[union-attr]
        buffer.release_idle()  # bulk data since the last heartbeat: kept
        assert buffer._mapping is mapping
        buffer.release_idle()  # idle for a whole interval: dropped
        assert buffer._mapping is None
        del view
        assert mapping.closed is False  # unmapped when collected, not closed by hand
        await peer.send_all(b"small again")
        assert await buffer.receive(ours) == b"small again"
        await peer.aclose()
        assert len(await buffer.receive(ours)) == 0  # EOF


async def test_a_closed_socket_is_a_closed_stream() -> None:
    ours, peer = socket_pair()
    buffer = ReceiveBuffer(256 * 1024)
    buffer._mapping = anonymous_buffer(buffer.size)  # as after bulk data
    await ours.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await buffer.receive(ours)
    await peer.aclose()


async def test_a_reset_socket_is_a_broken_stream() -> None:
    ours, peer = socket_pair()
    peer.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await ours.send_all(b"unread")  # so that the close is a reset
    await peer.aclose()
    buffer = ReceiveBuffer(4096)
    buffer._mapping = anonymous_buffer(buffer.size)  # as after bulk data
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
        await buffer.receive(ours)
    await ours.aclose()


async def test_other_streams_are_read_as_before() -> None:
    ours, peer = trio.testing.memory_stream_pair()
    buffer = ReceiveBuffer(4096)
    await peer.send_all(b"over memory")
    with trio.fail_after(10):
        assert await buffer.receive(ours) == b"over memory"
    assert buffer._mapping is None
