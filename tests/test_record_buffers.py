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
import mmap
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
from conduit.transfer._storage import StorageRoot

KEY = bytes(range(32))
LIMIT = 2 << 20


def mapping_of(buffer: ReceiveBuffer) -> mmap.mmap | None:
    """The buffer's mapping now (a call: its reads change it behind a type checker's back)."""
    return buffer._mapping


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


def test_buffers_a_burst_needed_go_once_records_come_one_at_a_time() -> None:
    """An opener keeps only as many buffers as were in use at once since the
    last release: a burst's twelve go once large records arrive one at a time
    (a peer trickling one 64 KiB record per heartbeat interval kept all twelve,
    12 MiB of a connection no budget counts, for as long as it went on)."""
    sealer, opener = RecordSealer(KEY, LIMIT), RecordOpener(KEY, LIMIT)
    held = []
    for index in range(MAPPED_KEEP):  # a burst: every record still referenced
        opener.feed(sealed(sealer, index))
        held.append(opener.next_record())
    assert len(opener._mapped) == MAPPED_KEEP
    del held
    opener.release_idle_buffers()  # all used in this interval: kept
    assert len(opener._mapped) == MAPPED_KEEP
    for _interval in range(3):  # then one record at a time, each let go at once
        opener.feed(sealed(sealer, 1))
        record = opener.next_record()
        assert record is not None and bytes(record[:1]) == b"\x01"
        del record
        opener.release_idle_buffers()
        assert len(opener._mapped) == 1
    # A buffer past the reach but still referenced stays until its view goes.
    opener.feed(sealed(sealer, 2))
    first = opener.next_record()
    opener.feed(sealed(sealer, 3))
    second = opener.next_record()
    assert len(opener._mapped) == 2
    del first
    opener.release_idle_buffers()  # both handed out since the last call
    opener.release_idle_buffers()  # the first idle: dropped; the second referenced
    assert len(opener._mapped) == 1
    assert second is not None and bytes(second[:1]) == b"\x03"
    del second
    opener.release_idle_buffers()
    assert opener._mapped == []


def test_small_records_are_plain_bytes() -> None:
    sealer, opener = RecordSealer(KEY, LIMIT), RecordOpener(KEY, LIMIT)
    payload = os.urandom(MAPPED_MIN // 2)
    opener.feed(bytes(sealer.seal(payload)))
    record = opener.next_record()
    assert type(record) is bytes and record == payload
    assert opener._mapped == []


# --------------------------------------------------------------------------- the receiver's write


def test_chunks_are_written_in_order_and_hashed_without_a_join(tmp_path: Path) -> None:
    storage = StorageRoot(tmp_path / "storage")
    partial = storage.open_partial("chunks.bin", "transfer-1", resume=False)
    record = bytearray(os.urandom(3 * (64 * 1024 + 14)))
    view = memoryview(record)
    batches: list[list[bytes | bytearray | memoryview]] = [
        # Views of a decrypted record (frame headers between them), as the receiver has.
        [view[14 + i * (64 * 1024 + 14) :][: 64 * 1024] for i in range(3)],
        [memoryview(os.urandom(1000)), b"", b"x" * 10],  # an empty chunk is skipped
        [os.urandom(100)],
        # More chunks than one pwritev takes.
        [os.urandom(7) for _ in range(1300)],
    ]
    for batch in batches:
        partial.write_chunks(batch)
    data = b"".join(bytes(chunk) for batch in batches for chunk in batch)
    assert partial.offset == len(data)
    assert partial.sha256_hex() == hashlib.sha256(data).hexdigest()
    assert partial.publish(overwrite=False, expected_sha256=hashlib.sha256(data).hexdigest())
    assert (tmp_path / "storage" / "chunks.bin").read_bytes() == data


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
        mapping = mapping_of(buffer)
        assert mapping is not None
        await peer.send_all(b"next")
        view = await buffer.receive(ours)
        assert bytes(view) == b"next" and isinstance(view, memoryview) and view.obj is mapping
        buffer.release_idle()  # bulk data since the last heartbeat: kept
        assert mapping_of(buffer) is mapping
        buffer.release_idle()  # idle for a whole interval: dropped
        assert mapping_of(buffer) is None
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


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of a loopback TCP connection (the low-water mark is TCP's)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


def test_a_lent_read_is_opened_in_place_and_a_record_begun_is_kept() -> None:
    # A read into the connection's mapping is fed as a view and decrypted from
    # it (no copy); the start of a record behind it is copied before the next
    # read reuses the memory, so overwriting the read afterwards changes nothing.
    sealer, opener = RecordSealer(KEY, LIMIT), RecordOpener(KEY, LIMIT)
    first, second = sealed(sealer, 1), sealed(sealer, 2)
    read = bytearray(first + second[:1000])
    opener.feed(memoryview(read))
    assert opener._buffer.obj is read  # type: ignore[union-attr]  # lent, not copied
    record = opener.next_record()
    assert record is not None and bytes(record) == bytes([1]) * 200 * 1024
    assert opener.next_record() is None
    read[:] = bytes(len(read))  # the next read lands in the same memory
    assert bytes(opener.partial()) == second[:1000]
    opener.feed(memoryview(second)[1000:])
    record = opener.next_record()
    assert record is not None and bytes(record) == bytes([2]) * 200 * 1024
    # A read that holds only the start of a record is copied too.
    third = sealed(sealer, 3)
    read = bytearray(third[:5000])
    opener.feed(memoryview(read))
    assert opener.next_record() is None
    read[:] = bytes(len(read))
    opener.feed(third[5000:])
    record = opener.next_record()
    assert record is not None and bytes(record) == bytes([3]) * 200 * 1024


async def test_the_rest_of_a_record_is_read_behind_its_start() -> None:
    # The start of a record (from an earlier read) goes in front of the mapping
    # and the rest is read behind it: the read is the whole record, and the
    # opener, its start discarded, opens it from the read.
    ours, peer = await tcp_pair()
    buffer = ReceiveBuffer(LIMIT)
    buffer._mapping = anonymous_buffer(buffer.size)  # as after bulk data
    sealer, opener = RecordSealer(KEY, LIMIT), RecordOpener(KEY, LIMIT)
    record = sealed(sealer, 7, 600 * 1024)
    with trio.fail_after(10):
        opener.feed(record[:3000])
        assert opener.next_record() is None
        missing = opener.missing
        assert missing == len(record) - 3000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.send_all, record[3000:])
            read = await buffer.receive(ours, missing, opener)
        assert isinstance(read, memoryview) and read.obj is buffer._mapping
        assert bytes(read) == record
        assert len(opener.partial()) == 0  # discarded: it came back with the rest
        opener.feed(read)
        opened = opener.next_record()
        assert opened is not None and bytes(opened) == bytes([7]) * 600 * 1024
        del read
        assert opener.next_record() is None
    await ours.aclose()
    await peer.aclose()


async def test_a_cancelled_read_of_a_rest_leaves_the_start_with_the_opener() -> None:
    ours, peer = await tcp_pair()
    buffer = ReceiveBuffer(LIMIT)
    buffer._mapping = anonymous_buffer(buffer.size)
    sealer, opener = RecordSealer(KEY, LIMIT), RecordOpener(KEY, LIMIT)
    record = sealed(sealer, 9, 600 * 1024)
    opener.feed(record[:3000])
    assert opener.next_record() is None
    with trio.move_on_after(0.05):
        await buffer.receive(ours, opener.missing, opener)
    assert bytes(opener.partial()) == record[:3000]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.send_all, record[3000:])
            read = await buffer.receive(ours, opener.missing, opener)
        opener.feed(read)
        opened = opener.next_record()
        assert opened is not None and bytes(opened) == bytes([9]) * 600 * 1024
    await ours.aclose()
    await peer.aclose()


async def test_a_start_larger_than_the_rest_stays_with_the_opener() -> None:
    ours, peer = await tcp_pair()
    buffer = ReceiveBuffer(LIMIT)
    buffer._mapping = anonymous_buffer(buffer.size)
    sealer, opener = RecordSealer(KEY, LIMIT), RecordOpener(KEY, LIMIT)
    record = sealed(sealer, 4, 600 * 1024)
    begun = 500 * 1024
    opener.feed(record[:begun])
    assert opener.next_record() is None
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.send_all, record[begun:])
            read = await buffer.receive(ours, opener.missing, opener)
        assert bytes(read) == record[begun:]  # only the rest: the opener appends it
        assert bytes(opener.partial()) == record[:begun]
        opener.feed(read)
        opened = opener.next_record()
        assert opened is not None and bytes(opened) == bytes([4]) * 600 * 1024
    await ours.aclose()
    await peer.aclose()


async def test_a_record_larger_than_the_mapping_is_joined_by_the_opener() -> None:
    ours, peer = await tcp_pair()
    buffer = ReceiveBuffer(256 * 1024)
    buffer._mapping = anonymous_buffer(buffer.size)
    sealer, opener = RecordSealer(KEY, LIMIT), RecordOpener(KEY, LIMIT)
    record = sealed(sealer, 5, 600 * 1024)
    opener.feed(record[:3000])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.send_all, record[3000:])
            opened = None
            while opened is None:
                assert opener.next_record() is None
                opener.feed(await buffer.receive(ours, opener.missing, opener))
                opened = opener.next_record()
        assert bytes(opened) == bytes([5]) * 600 * 1024
    await ours.aclose()
    await peer.aclose()
