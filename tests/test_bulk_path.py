"""The bulk path's wake-ups: a record in one read, a block in one batch, a record in one write.

Each of these saves scheduler passes per megabyte (see docs/benchmark-journal.md,
"bulk: where the CPU goes"); none may cost a guarantee:

* a read waiting for the rest of a record (``SO_RCVLOWAT``) returns it whole,
  never a byte early, and the heartbeat's ``release_idle`` still makes a
  trickling record readable (so a slow peer is never taken for silent);
* the opener knows how much of the next record is missing, and a hostile length
  cannot make the reader wait for more than the record limit;
* the sender reads blocks of whole chunks that the credit covers, frame cost
  included, so a block goes out in one batch, never split by a wait;
* records still open only with the right key and order (a corrupted one fails).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from conduit._receive_buffer import SMALL_READ, ReceiveBuffer
from conduit._socket_io import SocketIO
from conduit._streams import OutgoingStream
from conduit.errors import IntegrityError, RemoteProtocolError
from conduit.protocol import FRAME_COST, OutFrame
from conduit.protocol.data_runs import DataRecord, DataRun, split_record
from conduit.protocol.records import LENGTH, TAG_SIZE, RecordOpener, RecordSealer
from conduit.transfer import _engine
from conduit.transfer._engine import READ_BLOCK, FileSource, send_file
from conduit.transfer._progress import ProgressReporter

KEY = bytes(range(32))
LIMIT = 2 << 20
CHUNK = 64 * 1024


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of a loopback TCP connection (the low-water mark is TCP's)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


async def into_bulk_mode(buffer: ReceiveBuffer, ours: trio.SocketStream, peer: Any) -> None:
    """Send and read one small-read's worth: the buffer then reads into its mapping."""
    await peer.send_all(b"x" * SMALL_READ)
    received = 0
    while received < SMALL_READ:
        received += len(await buffer.receive(ours))
    assert buffer._mapping is not None


async def test_a_read_waiting_for_a_record_returns_it_whole() -> None:
    ours, peer = await tcp_pair()
    buffer = ReceiveBuffer(LIMIT)
    record = os.urandom(512 * 1024)
    results: list[bytes] = []

    async def read_record() -> None:
        results.append(bytes(await buffer.receive(ours, len(record))))

    with trio.fail_after(20):
        await into_bulk_mode(buffer, ours, peer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_record)
            await trio.testing.wait_all_tasks_blocked()
            await peer.send_all(record[: 300 * 1024])
            await trio.testing.wait_all_tasks_blocked()
            assert results == []  # part of the record is there: not woken for it
            await peer.send_all(record[300 * 1024 :])
        assert results == [record]  # the rest arrived: one read, the whole record
        # A call or a result (nothing missing) is read at once, mark or not.
        await peer.send_all(b"call")
        assert bytes(await buffer.receive(ours)) == b"call"
    await ours.aclose()
    await peer.aclose()


async def test_the_heartbeat_makes_a_trickling_record_readable() -> None:
    ours, peer = await tcp_pair()
    buffer = ReceiveBuffer(LIMIT)
    results: list[bytes] = []

    async def read_record() -> None:
        results.append(bytes(await buffer.receive(ours, 1024 * 1024)))

    with trio.fail_after(20):
        await into_bulk_mode(buffer, ours, peer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_record)
            await trio.testing.wait_all_tasks_blocked()
            await peer.send_all(b"y" * (100 * 1024))
            await trio.testing.wait_all_tasks_blocked()
            assert results == []
            # What the connection's heartbeat does every interval: read what is there.
            buffer.release_idle()
        assert results and set(results[0]) == {ord("y")} and 0 < len(results[0]) <= 100 * 1024
    await ours.aclose()
    await peer.aclose()


def test_the_opener_says_how_much_of_the_next_record_is_missing() -> None:
    sealer = RecordSealer(KEY, LIMIT)
    opener = RecordOpener(KEY, LIMIT)
    record = bytes(sealer.seal(os.urandom(300 * 1024)))
    assert opener.missing == 0  # nothing here: the length is unknown
    opener.feed(record[:3])
    assert opener.missing == 0  # still unknown
    opener.feed(record[3:1000])
    assert opener.missing == len(record) - 1000
    opener.feed(record[1000:])
    assert opener.missing == 0
    assert opener.next_record() is not None
    # A hostile length is refused by next_record; missing never asks for more than a record.
    hostile = RecordOpener(KEY, LIMIT)
    hostile.feed(LENGTH.pack(2**32 - 1) + b"z" * 10)
    assert hostile.missing <= LENGTH.size + LIMIT + TAG_SIZE
    with pytest.raises(RemoteProtocolError):
        hostile.next_record()


def test_a_corrupted_bulk_record_still_fails() -> None:
    sealer = RecordSealer(KEY, LIMIT)
    opener = RecordOpener(KEY, LIMIT)
    record = bytearray(sealer.seal(os.urandom(1024 * 1024)))
    record[LENGTH.size + 500_000] ^= 1
    opener.feed(bytes(record))
    assert opener.missing == 0
    with pytest.raises(IntegrityError):
        opener.next_record()


class CountedSource(FileSource):
    """A local file source that remembers the size of every block it read."""

    def __init__(self, file: io.FileIO) -> None:
        super().__init__(file)
        self.blocks: list[int] = []

    async def read_records(
        self,
        stream: OutgoingStream,
        size: int,
        shape: tuple[int, int],
        hasher: Any,
        threads: trio.CapacityLimiter | None,
    ) -> list[DataRecord] | None:
        records = await super().read_records(stream, size, shape, hasher, threads)
        self.blocks.append(sum(record.payload for record in records or []))
        return records


async def test_the_read_step_runs_on_the_bulk_read_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file's blocks are read, laid out and hashed on the persistent bulk-read
    threads (a WorkerHop), not through a trio.to_thread hop, and arrive intact."""
    threads: list[str] = []
    real = _engine._read_records

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(_engine, "_read_records", spy)
    data = os.urandom(3 * CHUNK + 5)
    (tmp_path / "f.bin").write_bytes(data)

    async def enqueue(frames: list[tuple[OutFrame, int]]) -> None:
        del frames

    stream = OutgoingStream(1, 4 * 1024 * 1024, CHUNK, enqueue)
    hasher = hashlib.sha256()
    with trio.fail_after(30), io.FileIO(tmp_path / "f.bin", "r") as file:
        source = FileSource(file)
        records = await source.read_records(
            stream, len(data), stream.record_shape(CHUNK), hasher, None
        )
    assert records is not None
    assert threads and all(name.startswith("conduit bulk reads") for name in threads)
    assert b"".join(b"".join(_payloads((record.buffer,))) for record in records) == data
    assert hasher.digest() == hashlib.sha256(data).digest()


def _payloads(frame: OutFrame) -> list[bytes]:
    """The DATA payloads of a laid-out record, in order (as the receiver splits it)."""
    (buffer,) = frame
    payloads: list[bytes] = []
    for item in split_record(memoryview(buffer), CHUNK):
        views = item.payloads if isinstance(item, DataRun) else [item.payload]
        payloads.extend(bytes(view) for view in views)
    return payloads


async def test_blocks_are_whole_chunks_the_credit_covers(tmp_path: Path) -> None:
    """However the credit comes back, each block goes out in one batch of whole chunks."""
    size = 5 * READ_BLOCK + 12345
    data = os.urandom(size)
    (tmp_path / "f.bin").write_bytes(data)
    batches: list[list[tuple[OutFrame, int]]] = []
    # Credit comes back a quarter window at a time, as a receiver grants it:
    # never a multiple of a chunk plus its frame cost.
    window = 4 * 1024 * 1024  # the default receive window

    arrivals, arrived = trio.open_memory_channel[list[tuple[OutFrame, int]]](math.inf)

    async def enqueue(frames: list[tuple[OutFrame, int]]) -> None:
        batches.append(frames)
        arrivals.send_nowait(frames)

    stream = OutgoingStream(1, window, CHUNK, enqueue)

    async def receiver() -> None:
        # Woken by each batch, never polling: a loop of checkpoints would keep
        # the GIL from the thread that reads the file, and starve the sender.
        spent = granted = 0
        step = window // 4
        async for batch in arrived:
            if stream.finished:  # the END frame, with the trailer: no DATA to grant for
                break
            spent += sum(length + len(_payloads(frame)) * FRAME_COST for frame, length in batch)
            while spent - granted >= step:
                stream.credit += step
                granted += step
                stream.wake()

    with trio.fail_after(30), io.FileIO(tmp_path / "f.bin", "r") as file:
        source = CountedSource(file)
        reporter = ProgressReporter(None, filename="f", direction="upload", total_size=size)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            trailer = await send_file(
                stream,
                source,
                start=0,
                size=size,
                hasher=hashlib.sha256(),
                chunk_size=CHUNK,
                reporter=reporter,
            )
            arrivals.close()
    assert trailer.sha256 == hashlib.sha256(data).digest()
    data_batches = batches[:-1]  # the last is the END frame with the trailer
    sent = [payload for batch in data_batches for frame, _ in batch for payload in _payloads(frame)]
    assert b"".join(sent) == data
    # Every frame a whole chunk but the file's last: what send() made too.
    assert {len(payload) for payload in sent[:-1]} == {CHUNK}
    # One batch per block read: no block was split by a wait for credit...
    assert [sum(length for _, length in batch) for batch in data_batches] == source.blocks
    # ... and every block but the file's last is whole chunks.
    assert all(block % CHUNK == 0 for block in source.blocks[:-1])
    assert len(source.blocks) >= 6


async def test_a_bulk_socket_may_hold_unsent_bytes_and_others_are_left_alone() -> None:
    ours, peer = await tcp_pair()
    io_path = SocketIO(ours.socket)
    io_path.allow_unsent(256 * 1024)
    # Trio's own mark is 16 KiB; a bulk sender's socket may hold more unsent.
    notsent = ours.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
    assert notsent == 256 * 1024
    left, right = trio.socket.socketpair()  # not TCP: nothing to set, no error
    SocketIO(left).allow_unsent(256 * 1024)
    left.close()
    right.close()
    await ours.aclose()
    await peer.aclose()


async def test_short_reads_of_the_source_are_continued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A readv that returns less than asked (as a network file system may) is
    continued where it stopped, mid-frame included; only a read of 0 is the end."""
    data = os.urandom(3 * CHUNK + 1000)
    (tmp_path / "f.bin").write_bytes(data)
    real_readv = os.readv

    def dribble(fd: int, buffers: list[memoryview]) -> int:
        first = next(buffer for buffer in buffers if buffer)
        return real_readv(fd, [first[:1000]])

    monkeypatch.setattr(os, "readv", dribble)
    stream = OutgoingStream(1, 4 * 1024 * 1024, CHUNK, _swallow)
    hasher = hashlib.sha256()
    with io.FileIO(tmp_path / "f.bin", "r") as file:
        records = await FileSource(file).read_records(
            stream, len(data), stream.record_shape(CHUNK), hasher, None
        )
        assert records is not None
        sent = [payload for record in records for payload in _payloads((record.buffer,))]
        assert b"".join(sent) == data
        assert hasher.digest() == hashlib.sha256(data).digest()
        # At the end of the file: nothing more, which send_file reports as a shrink.
        more = await FileSource(file).read_records(
            stream, CHUNK, stream.record_shape(CHUNK), hasher, None
        )
        assert more is None


async def _swallow(frames: list[tuple[OutFrame, int]]) -> None:
    del frames
