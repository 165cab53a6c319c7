"""The receiver's write-behind thread (``conduit.transfer._write_behind``) and its use.

A :class:`WriteBehind` must write every batch in order, in a real thread,
report each one written (in order) to the Trio side, keep at most
``WRITE_DEPTH`` batches queued or being written, surface a write's failure and
write nothing after it, leave nothing writing once settled, and give its
thread back. A transfer that finds no write-behind thread free writes with a
hop per batch and moves the same bytes.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import os
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from conduit import FileTransferHandler
from conduit._streams import IncomingStream
from conduit.protocol.connection import Buffer
from conduit.transfer import _engine, _write_behind
from conduit.transfer._storage import PartialFile
from conduit.transfer._write_behind import WRITE_DEPTH, WriteBehind
from conftest import ClientFactory, ServerFactory
from transfer_helpers import storage_server

MiB = 1024 * 1024


class _Sink:
    """A blocking append that records what it wrote, and in which thread;
    ``gate`` (when set) holds each write until the test opens it."""

    def __init__(self, *, gated: bool = False, fail_at: int | None = None) -> None:
        self.data = bytearray()
        self.threads: set[int] = set()
        self.calls = 0
        self.gate: threading.Semaphore | None = threading.Semaphore(0) if gated else None
        self.fail_at = fail_at

    def write(self, chunks: Sequence[Buffer]) -> None:
        if self.gate is not None:
            assert self.gate.acquire(timeout=10), "the test never opened the gate"
        self.threads.add(threading.get_ident())
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(28, "No space left on device")
        for chunk in chunks:
            self.data += chunk


@contextlib.asynccontextmanager
async def _writer(
    write: Callable[[Sequence[Buffer]], None], written: Callable[[], None] = lambda: None
) -> AsyncIterator[WriteBehind]:
    """A started :class:`WriteBehind`, closed and settled on the way out."""
    behind = WriteBehind.start(write, written)
    assert behind is not None
    try:
        yield behind
    finally:
        behind.close()
        await behind.settle()


def _record_writers(monkeypatch: pytest.MonkeyPatch) -> list[WriteBehind | None]:
    """What each ``WriteBehind.start`` returns from now on (None: no thread was free)."""
    writers: list[WriteBehind | None] = []
    real_start = WriteBehind.start.__func__  # type: ignore[attr-defined]

    def start(cls: type[WriteBehind], *args: object) -> WriteBehind | None:
        writers.append(real_start(cls, *args))
        return writers[-1]

    monkeypatch.setattr(WriteBehind, "start", classmethod(start))
    return writers


async def _until(condition: object, seconds: float = 10.0) -> None:
    """Wait (real time: the writer is a real thread) until ``condition()`` holds, bounded."""
    with trio.fail_after(seconds):
        for _ in range(int(seconds / 0.005) + 1):
            if condition():  # type: ignore[operator]
                return
            await trio.sleep(0.005)


Upload = Callable[[str], Awaitable[None]]


@contextlib.asynccontextmanager
async def _uploads(
    tmp_path: Path,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    payloads: dict[str, bytes],
) -> AsyncIterator[tuple[Upload, dict[str, dict[str, object]]]]:
    """A storage server, and ``upload(name)`` sending ``tmp_path / name`` (each
    of ``payloads`` written there first) on a connection of its own, its
    result recorded by name. On the way out every upload succeeded and
    stored its payload."""
    for name, payload in payloads.items():
        (tmp_path / name).write_bytes(payload)
    results: dict[str, dict[str, object]] = {}
    _handler, server = await storage_server(server_factory, tmp_path / "store")
    transfer = FileTransferHandler(storage_dir=tmp_path / "client")

    async def upload(name: str) -> None:
        client = await client_factory(server.port)
        results[name] = await transfer.send_to_server(client, str(tmp_path / name))

    yield upload, results
    assert all(result["success"] for result in results.values()), results
    for name, payload in payloads.items():
        assert (tmp_path / "store" / name).read_bytes() == payload


async def test_batches_are_written_in_order_in_one_other_thread() -> None:
    sink = _Sink()
    released: list[int] = []
    batches = [[os.urandom(1000), os.urandom(10)] for _ in range(20)]
    async with _writer(sink.write, lambda: released.append(len(released))) as behind:
        for batch in batches:
            await behind.put(batch)
        await behind.drain()
    assert bytes(sink.data) == b"".join(b"".join(batch) for batch in batches)
    assert released == list(range(20))  # one release per batch, after its write
    assert behind.bytes_written == len(sink.data)
    assert len(sink.threads) == 1 and threading.get_ident() not in sink.threads


async def test_an_empty_batch_is_reported_written_and_its_stream_gets_all_credit_back() -> None:
    """A peer may send zero-length DATA frames; a batch of them alone is still
    a batch its stream keeps: it must be reported written like any other, or
    every later report releases the batch before it and the last one's credit
    never goes back (a sender waiting for it would wait for ever)."""
    sink = _Sink()
    grants: list[int] = []
    window = 64 * 1024
    stream = IncomingStream(1, window, lambda _stream, amount: grants.append(amount))
    async with _writer(sink.write, stream.release) as behind:
        for payload in (b"a" * 1000, b"", b"b" * 2000):
            stream.on_data(memoryview(payload), 0)
            chunks, trailer = await stream.receive(keep=True)
            assert trailer is None
            await behind.put(chunks)
            del chunks
        await behind.drain()
    assert bytes(sink.data) == b"a" * 1000 + b"b" * 2000
    assert behind.bytes_written == 3000
    assert stream.available == window  # every batch's credit came back
    assert sum(grants) > 3000  # granted back: the payloads and their frames' costs


async def test_at_most_write_depth_batches_are_queued_or_being_written() -> None:
    """While the sink holds its first write, ``WRITE_DEPTH`` batches are let in
    and the next waits for room; it goes in once a write finished."""
    sink = _Sink(gated=True)
    assert sink.gate is not None
    async with _writer(sink.write) as behind:
        for number in range(WRITE_DEPTH):
            await behind.put([bytes([number])])
        assert behind.outstanding == WRITE_DEPTH
        with trio.move_on_after(0.2) as waited:
            await behind.put([b"late"])
        assert waited.cancelled_caught  # no room: put() waited, and was not queued
        sink.gate.release()  # the first write may finish
        with trio.fail_after(10):
            await behind.put([b"next"])
        for _ in range(WRITE_DEPTH):
            sink.gate.release()
        await behind.drain()
    assert bytes(sink.data) == bytes(range(WRITE_DEPTH)) + b"next"


async def test_a_failed_write_is_raised_and_nothing_is_written_after_it() -> None:
    sink = _Sink(fail_at=2)
    released: list[None] = []
    async with _writer(sink.write, lambda: released.append(None)) as behind:
        await behind.put([b"first"])
        await behind.put([b"second"])  # fails in the thread
        await _until(lambda: behind.outstanding == 0)
        with pytest.raises(OSError, match="No space"):
            await behind.put([b"third"])
        with pytest.raises(OSError, match="No space"):
            await behind.drain()
    assert bytes(sink.data) == b"first"
    assert sink.calls == 2
    assert len(released) == 1  # the failed batch was not released as written
    assert behind.bytes_written == len(b"first")


class _Record(bytearray):
    """A record buffer that can be watched (``weakref``) for being let go."""


async def test_a_failed_write_keeps_its_error_and_not_its_batch() -> None:
    """The failure outlives the write (raised by the next call, kept as the
    stream's error); the frames of its traceback must not keep the batch's
    records alive with it."""

    def write(chunks: Sequence[Buffer]) -> None:
        views = [memoryview(chunk) for chunk in chunks]
        raise OSError(28, f"No space left on device ({len(views)} chunks)")

    record = _Record(b"x" * 4096)
    watched = weakref.ref(record)
    async with _writer(write) as behind:
        await behind.put([memoryview(record)[:100], memoryview(record)[100:]])
        del record
        await behind.settle()
        gc.collect()
        assert watched() is None  # let go, while the failure is still kept:
        with pytest.raises(OSError, match=r"No space left on device \(2 chunks\)"):
            await behind.drain()


async def test_batches_queued_behind_a_failure_are_skipped() -> None:
    sink = _Sink(gated=True, fail_at=1)
    assert sink.gate is not None
    async with _writer(sink.write) as behind:
        await behind.put([b"fails"])
        await behind.put([b"queued behind it"])
        sink.gate.release()
        sink.gate.release()
        await behind.settle()  # settles, whatever happened
        assert behind.outstanding == 0
        with pytest.raises(OSError):
            await behind.drain()
    assert sink.data == b"" and sink.calls == 1


async def test_a_failing_report_is_the_transfers_failure_not_the_runs() -> None:
    """``written()`` runs outside any task (through the Trio token): what it
    raises is raised by the writer's next call, and the run goes on."""
    sink = _Sink()

    def written() -> None:
        raise RuntimeError("the stream could not take its credit back")

    async with _writer(sink.write, written) as behind:
        await behind.put([b"data"])
        with pytest.raises(RuntimeError, match="credit back"):
            await behind.drain()
    assert sink.data == b"data"


async def test_the_thread_is_given_back_and_the_run_limit_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At most ``WRITE_BEHIND_THREADS`` writers per run: one more gets None
    (its transfer writes with a hop per batch); a writer closed gives its
    thread back, and the next one gets it."""
    monkeypatch.setattr(_write_behind, "WRITE_BEHIND_THREADS", 2)
    sinks = [_Sink() for _ in range(3)]
    first = WriteBehind.start(sinks[0].write, lambda: None)
    second = WriteBehind.start(sinks[1].write, lambda: None)
    assert first is not None and second is not None
    assert WriteBehind.start(sinks[2].write, lambda: None) is None
    for behind in (first, second):
        await behind.put([b"x"])
        behind.close()
        await behind.settle()
    third: WriteBehind | None = None

    def started() -> bool:
        nonlocal third
        third = third or WriteBehind.start(sinks[2].write, lambda: None)
        return third is not None

    await _until(started)
    assert third is not None
    await third.put([b"y"])
    third.close()
    await third.settle()
    assert sinks[2].data == b"y"


@pytest.mark.parametrize("threads", [16, 0])
async def test_a_transfer_writes_the_same_bytes_with_or_without_a_writer_thread(
    tmp_path: Path,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
    threads: int,
) -> None:
    """An upload and a download of several batches: with write-behind threads
    (the default) and with none free (each batch's write awaited), both
    sides end with the source's bytes, and no writer thread is left."""
    monkeypatch.setattr(_write_behind, "WRITE_BEHIND_THREADS", threads)
    writers = _record_writers(monkeypatch)
    source = tmp_path / "source.bin"
    payload = os.urandom(9 * MiB + 12345)
    source.write_bytes(payload)
    downloads = tmp_path / "down"
    downloads.mkdir()
    with trio.fail_after(60):
        _handler, server = await storage_server(server_factory, tmp_path / "store")
        client = await client_factory(server.port)
        transfer = FileTransferHandler(storage_dir=tmp_path / "client")
        sent = await transfer.send_to_server(client, str(source))
        assert sent["success"], sent
        got = await transfer.receive_from_server(client, "source.bin", local_dir=str(downloads))
        assert got["success"], got
        await _until(lambda: not _writer_threads())
    # One receiver each way (the server's for the upload, ours for the download);
    # with none free, each asks again after every batch.
    assert len(writers) == 2 if threads else len(writers) >= 2
    assert all(writer is not None for writer in writers) == bool(threads)
    assert any(writer is not None for writer in writers) == bool(threads)
    expected = hashlib.sha256(payload).hexdigest()
    for copy in (tmp_path / "store" / "source.bin", downloads / "source.bin"):
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == expected


def _writer_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "conduit write-behind"]


async def test_a_transfer_finds_no_writer_free_and_still_completes(
    tmp_path: Path,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With one writer thread per run, held by an upload whose writes are
    stuck (a stalled disk, or a peer that stopped sending), a second upload
    gets none: it writes with a hop per batch and completes while the first
    still holds the thread; the first completes once its writes go on."""
    monkeypatch.setattr(_write_behind, "WRITE_BEHIND_THREADS", 1)
    writers = _record_writers(monkeypatch)
    stuck = threading.Event()
    real_write = PartialFile.write_chunks

    def write_chunks(self: PartialFile, chunks: Sequence[Buffer]) -> None:
        # Only the writer thread's writes are stuck, until the gate opens.
        if threading.current_thread().name == "conduit write-behind":
            assert stuck.wait(timeout=30), "the test never opened the gate"
        real_write(self, chunks)

    monkeypatch.setattr(PartialFile, "write_chunks", write_chunks)
    payloads = {f"{name}.bin": os.urandom(9 * MiB + number) for number, name in enumerate("ab")}
    with trio.fail_after(60):
        uploads = _uploads(tmp_path, server_factory, client_factory, payloads)
        async with uploads as (upload, results), trio.open_nursery() as nursery:
            nursery.start_soon(upload, "a.bin")
            nursery.start_soon(upload, "b.bin")
            await _until(lambda: len(results) == 1)  # one finished, one is stuck
            # One got the thread; the other asked again after each batch, in vain.
            assert len(writers) >= 2 and len([w for w in writers if w is not None]) == 1
            held = next(writer for writer in writers if writer is not None)
            # The upload with the thread is the one still going, its writes held.
            assert held.outstanding > 0 and len(results) == 1
            stuck.set()


async def test_a_stalled_sender_gives_its_writer_thread_back(
    tmp_path: Path,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With one writer thread per run: an upload whose sender stops after
    4 MiB holds the thread only until its stream has brought nothing for
    ``WRITE_BEHIND_IDLE``; a second upload then gets it and completes while
    the first is still stalled; the first completes once its sender goes on,
    and asks for a thread again."""
    monkeypatch.setattr(_write_behind, "WRITE_BEHIND_THREADS", 1)
    writers = _record_writers(monkeypatch)
    go_on = threading.Event()
    reads: dict[str, int] = {}
    real_read = _engine._read_records

    def read_records(file: io.FileIO, *args: Any) -> Any:
        # The stalled upload's third read (4 MiB sent) waits for the gate.
        name = inodes[os.fstat(file.fileno()).st_ino]
        reads[name] = reads.get(name, 0) + 1
        if name == "stalls.bin" and reads[name] == 3:
            assert go_on.wait(timeout=30), "the test never let the sender go on"
        return real_read(file, *args)

    monkeypatch.setattr(_engine, "_read_records", read_records)
    payloads = {name: os.urandom(9 * MiB + len(name)) for name in ("stalls.bin", "flows.bin")}
    inodes: dict[int, str] = {}
    with trio.fail_after(60):
        uploads = _uploads(tmp_path, server_factory, client_factory, payloads)
        async with uploads as (upload, results), trio.open_nursery() as nursery:
            inodes.update({(tmp_path / name).stat().st_ino: name for name in payloads})
            nursery.start_soon(upload, "stalls.bin")
            await _until(lambda: reads.get("stalls.bin", 0) == 3 and len(writers) == 1)
            assert writers[0] is not None  # it had the run's one thread...
            limiter = _write_behind._threads()
            await _until(lambda: limiter.borrowed_tokens == 0)  # ...and gave it back
            assert not results
            stalled_writers = len(writers)
            await upload("flows.bin")
            assert not go_on.is_set() and "stalls.bin" not in results
            assert any(writer is not None for writer in writers[stalled_writers:])
            go_on.set()
    assert len([writer for writer in writers if writer is not None]) >= 3
