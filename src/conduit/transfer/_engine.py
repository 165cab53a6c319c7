"""Moving one file's bytes over a data stream: read+hash on one side, write+hash on the other.

Disk work happens in worker threads, in blocks of :data:`READ_BLOCK` bytes (the
sender) or whatever the credit window delivered (the receiver), so the event
loop never waits on the disk and a thread hop is paid per block, not per
chunk. The sender's worker step reads a block straight into DATA frames laid
out as records (:func:`~conduit.protocol.data_runs.lay_out`) and hashes it, so
the event loop only seals and sends; the receiver's writer thread writes each
batch with one ``pwritev`` and hashes it, and takes the next batch, queued
meanwhile, without waiting for the event loop (:mod:`._write_behind`).
``hashlib`` releases the GIL on large buffers, so hashing overlaps the event
loop's work too. Memory is bounded by the credit window (plus the two
batches, each at most a window, whose credit the receiver returns before
writing them, within the connection's receive budget) and the connection's
send buffer, whatever the file size.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio

from .. import _threads
from .._streams import IncomingStream, OutgoingStream
from .._worker_hop import WorkerHop
from ..errors import TransferError
from ..protocol import FRAME_COST
from ..protocol.connection import Buffer
from ..protocol.data_runs import DataRecord, RecordBuffers, lay_out
from ._budget import ByteBudget
from ._progress import ProgressReporter
from ._storage import IOV_MAX
from ._wire import Trailer
from ._write_behind import WRITE_BEHIND_IDLE, WriteBehind

#: Bytes read (and hashed) per worker-thread call on the sending side: two
#: records' worth, as a worker-thread hop costs ~0.1 ms of CPU on the benchmark
#: machine (GIL and futex hand-offs, Trio's wake-up), as much as hashing 200 KiB.
READ_BLOCK = 2 * 1024 * 1024
#: Bytes the receiver waits to have before it writes (unless the stream ends
#: first): two records' worth, so a worker-thread hop is paid per 2 MiB
#: written, as :data:`READ_BLOCK` does on the sending side. The stream caps it
#: at half its window.
WRITE_BATCH = 2 * 1024 * 1024
#: Seconds the receiver waits for :data:`WRITE_BATCH` once some data is here.
#: The credit of what arrived goes back only when the batch is taken, so
#: every millisecond of waiting keeps that much of the window from the link:
#: waiting 20 ms, a 4 MiB window over a 20 ms round trip moved 77 MB/s where
#: the link carried 99 (97 with 5 ms; docs/benchmark-journal.md, "Long
#: links: the receiver's batches hold less credit"). On loopback a second
#: record usually comes sooner (2.3-3.1 ms median, 4.4-5.7 ms at the 90th
#: percentile, in 1 GiB uploads and downloads): a batch cut short costs one
#: more worker-thread hop (~0.1 ms of CPU). Short enough too that bytes of a
#: sender that pauses reach the partial file (and a later resume) at once.
#: The stream waits only while one of its last two gaps between records was
#: no longer (IncomingStream.receive): at 100 MB/s, a record every 10.5 ms,
#: every wait would run out (the default window over 40 ms moved 67 MB/s of
#: 98 with it, 73 without).
WRITE_PATIENCE = 0.005
#: Bytes read per step when hashing a resume prefix.
_HASH_BLOCK = 4 * 1024 * 1024
#: Threads for the senders' read steps, all connections together (as many as
#: Trio's default limiter lets ``to_thread`` run; each connection takes its
#: share through its own limiter).
READ_THREADS = 40
#: The senders' read steps hop here rather than through ``trio.to_thread``:
#: persistent threads, no capacity-limiter round trip, no thread renamed twice
#: per call (about half the CPU of a hop: ``benchmarks.bulk_budget``).
_READS = WorkerHop("bulk reads", max_threads=READ_THREADS)


class BlockReader(Protocol):
    """Where :func:`send_file` reads from: a local file or a stored object (:mod:`._backend`)."""

    async def read_records(
        self,
        stream: OutgoingStream,
        size: int,
        shape: tuple[int, int],
        hasher: Any,
        threads: trio.CapacityLimiter | None,
    ) -> list[DataRecord] | None:
        """Up to ``size`` next bytes as DATA records of ``stream``, already added to ``hasher``.

        ``shape`` is :meth:`OutgoingStream.record_shape`'s (see
        :func:`~conduit.protocol.data_runs.lay_out`); ``threads``: the
        connection's share of the worker threads, if any. None at the end.
        """
        ...

    async def check_unchanged(
        self, sent: bytes, span: tuple[int, int], threads: trio.CapacityLimiter | None
    ) -> None:
        """``TransferError`` (``source_changed``) if what was read may not be one
        version of the source: a local file written to since it was opened.
        ``sent``: the SHA-256 of the bytes read, ``span`` (first byte, count)
        of the source (the whole of it, or a range); ``threads``: as for
        :meth:`read_records`, for a read to compare."""
        ...


class BlockWriter(Protocol):
    """Where :func:`receive_file` writes to: a partial file or a partial upload."""

    @property
    def offset(self) -> int:
        """Bytes accepted so far."""
        ...

    async def write(self, chunks: Sequence[Buffer]) -> None:
        """Append ``chunks`` at :attr:`offset`."""
        ...

    #: The same append as a blocking call a worker thread may make, for
    #: :func:`receive_file` to write behind (:mod:`._write_behind`); None
    #: where only :meth:`write` can append (it is awaited per batch).
    blocking_write: Callable[[Sequence[Buffer]], None] | None


def _read_records(
    file: io.FileIO,
    stream_id: int,
    size: int,
    shape: tuple[int, int],
    hasher: Any,
    buffers: RecordBuffers,
) -> list[DataRecord] | None:
    # In a worker thread: the file read straight into the frames' payload slots
    # (one readv), hashed in file order; the event loop then only seals and
    # sends. None if the file ended early (it shrank).
    records, slots = lay_out(stream_id, size, *shape, buffers)
    if not _fill(file.fileno(), slots, size):
        return None
    for slot in slots:
        hasher.update(slot)
    return records


def _fill(fd: int, slots: list[memoryview], size: int) -> bool:
    # readv until the slots hold ``size`` bytes: a read may be short (a network
    # or FUSE file system) without the file having ended; only 0 means it did.
    # At most IOV_MAX slots a call: a read block of small chunks has more
    # (2 MiB of 1 KiB chunks, 2,048), which the kernel refuses (EINVAL).
    pending = list(slots)  # its first slot is cut down as it fills; theirs stay whole
    index = filled = 0
    while filled < size:
        got = os.readv(fd, pending[index : index + IOV_MAX])
        if got == 0:
            return False
        filled += got
        while got:
            first = pending[index]
            if got < len(first):
                pending[index] = first[got:]
                break
            got -= len(first)
            index += 1
    return True


def _hash_prefix(file: io.FileIO, length: int) -> Any:
    hasher = hashlib.sha256()
    remaining = length
    while remaining > 0:
        block = file.read(min(_HASH_BLOCK, remaining))
        if not block:
            raise TransferError("the file is shorter than the part to resume", "source_changed")
        hasher.update(block)
        remaining -= len(block)
    return hasher


def _digest_of(fd: int, span: tuple[int, int]) -> bytes | None:
    # The SHA-256 of ``span`` (first byte, count), read with pread (the
    # file's position stays); None if the file ends before it does.
    hasher = hashlib.sha256()
    position, end = span[0], span[0] + span[1]
    while position < end:
        block = os.pread(fd, min(_HASH_BLOCK, end - position), position)
        if not block:
            return None
        hasher.update(block)
        position += len(block)
    return hasher.digest()


def _maybe(limiter: trio.CapacityLimiter | None) -> contextlib.AbstractAsyncContextManager[Any]:
    return limiter if limiter is not None else contextlib.nullcontext()


async def hash_prefix(
    file: io.FileIO, length: int, *, limiter: trio.CapacityLimiter | None = None
) -> Any:
    """Hash the first ``length`` bytes (the file position ends there). Returns the hasher."""
    return await _threads.run_sync(_hash_prefix, file, length, limiter=limiter)


class FileSource:
    """A local file as the source of :func:`send_file` and of resume checks.

    The reads run in worker threads on the file's descriptor, exactly as
    before there were other sources: the local store pays nothing for the seam.
    """

    def __init__(self, file: io.FileIO, opened: os.stat_result | None = None) -> None:
        """Wrap an open file (its position is where sending starts).

        ``opened``: its ``fstat`` when it was opened (taken now if not given):
        the version of the file the transfer sends (see :meth:`check_unchanged`).
        """
        self.file = file
        info = os.fstat(file.fileno()) if opened is None else opened
        self._version = (info.st_size, info.st_mtime_ns)
        self._ctime = info.st_ctime_ns
        # Records are laid out in buffers reused once sealed, not a fresh
        # zero-filled megabyte each (one sender at a time uses them).
        self._buffers = RecordBuffers()

    async def read_records(
        self,
        stream: OutgoingStream,
        size: int,
        shape: tuple[int, int],
        hasher: Any,
        threads: trio.CapacityLimiter | None,
    ) -> list[DataRecord] | None:
        """See :meth:`BlockReader.read_records`: read straight into the records.

        Read, laid out and hashed in one worker-thread step. None if the file
        ended before ``size`` bytes.
        """
        async with _maybe(threads):
            return await _READS.run(
                _read_records, self.file, stream.stream_id, size, shape, hasher, self._buffers
            )

    async def hash_prefix(self, length: int, limiter: trio.CapacityLimiter | None) -> Any:
        """Hash the next ``length`` bytes (the position ends after them); the hasher.

        ``TransferError`` (``source_changed``) if the file is shorter.
        """
        return await hash_prefix(self.file, length, limiter=limiter)

    async def check_unchanged(
        self, sent: bytes, span: tuple[int, int], threads: trio.CapacityLimiter | None
    ) -> None:
        """See :meth:`BlockReader.check_unchanged`: the file's size and modification
        time are still those it was opened with, and if anything else of it
        changed (its ``st_ctime``), the part sent is still what was sent.

        A file written in place while it is sent (same size) would otherwise be
        sent, hashed and published as a mix of its two versions, verified
        against a digest of that mix; one that grew, cut at its old size. A
        writer may put the modification time back (``touch -r``, ``rsync
        --inplace -t``, tar): the change time it cannot, so a file whose change
        time moved is read again and its digest compared with ``sent``. That
        costs a second read of the file, but only then; a rename or a change of
        mode, which moves it too, is not a change of content and passes.
        """
        fd = self.file.fileno()
        info = await _threads.run_sync(os.fstat, fd)
        if (info.st_size, info.st_mtime_ns) == self._version:
            if info.st_ctime_ns == self._ctime:
                return
            # Uncancellable, as every read of ours in a thread: the read
            # threads' limit (the connection's share) bounds what it holds.
            async with _maybe(threads):
                again = await _threads.run_sync(_digest_of, fd, span)
            if again == sent:
                return
        raise TransferError(
            "the file changed while it was being sent (written to since it was opened)",
            "source_changed",
        )

    async def seek(self, position: int) -> None:
        """Continue reading from byte ``position``."""
        await _threads.run_sync(self.file.seek, position)

    async def aclose(self) -> None:
        """Close the file."""
        await _threads.run_sync(self.file.close)


async def send_file(
    stream: OutgoingStream,
    source: BlockReader,
    *,
    start: int,
    size: int,
    hasher: Any,
    chunk_size: int,
    reporter: ProgressReporter,
    read_ahead: ByteBudget | None = None,
    read_threads: trio.CapacityLimiter | None = None,
    base: int = 0,
) -> Trailer:
    """Send bytes ``start..size`` of ``source`` (positioned at ``base + start``) and the trailer.

    ``base``: where the part sent begins in the source (a range's offset; 0
    for the whole file). ``hasher`` already covers ``0..start``; the trailer
    carries the digest of the whole part. A file that shrinks while it is
    sent is an error, not a short file.
    Each block read is taken from ``read_ahead`` (the connection's budget) until
    the outbox has it, and read while holding a ``read_threads`` token (the
    connection's share of the worker threads).
    """
    position = start
    block_size = max(chunk_size, READ_BLOCK - READ_BLOCK % chunk_size)
    shape = stream.record_shape(chunk_size)
    while position < size:
        want = min(block_size, size - position)
        # Read no further ahead than the peer lets us send: a receiver that never
        # grants credit must not make us hold a 1 MiB block per stream.
        await stream.wait_for_credit(min(stream.max_payload, chunk_size, want) + FRAME_COST)
        # Whole chunks the credit covers, frame costs included: a block the
        # credit cannot carry would go out as two records (15 chunks, then 1)
        # with a wait between them.
        covered = stream.credit // (chunk_size + FRAME_COST) * chunk_size
        want = min(want, max(chunk_size, covered))
        # Take the block's memory from the connection's budget only once the
        # peer has granted credit for it: a stalled stream holds no block.
        taken = await read_ahead.take(want) if read_ahead is not None else want
        try:
            want = min(want, taken)
            records = await source.read_records(stream, want, shape, hasher, read_threads)
            if records is None:
                raise TransferError(
                    f"the file shrank while it was being sent ({position} of {size} bytes)",
                    "source_changed",
                )
            await stream.send_records(records)
        finally:
            if read_ahead is not None:
                read_ahead.give_back(taken)
        amount = sum(record.payload for record in records)
        position += amount
        await reporter.advance(amount)
    # Before the trailer: the bytes sent must all be one version of the file.
    digest = hasher.digest()
    await source.check_unchanged(digest, (base, size), read_threads)
    trailer = Trailer(size, digest)
    await stream.finish(trailer.pack())
    return trailer


def records_of(stream_id: int, block: Buffer, shape: tuple[int, int]) -> list[DataRecord]:
    """``block`` copied into DATA records of ``stream_id`` (a source that cannot read into them)."""
    records, slots = lay_out(stream_id, len(block), *shape)
    position = 0
    for slot in slots:
        end = position + len(slot)
        slot[:] = block[position:end]
        position = end
    return records


async def receive_file(
    stream: IncomingStream,
    partial: BlockWriter,
    *,
    size: int,
    reporter: ProgressReporter,
    stall_after: float = math.inf,
) -> Trailer:
    """Write the stream into ``partial`` until its END; return the sender's trailer.

    Refuses (``size_mismatch``) a sender that sends more than it announced,
    and (``stalled``) one that has sent nothing for ``stall_after`` seconds
    while this side waited for data and read its socket: a peer that
    answers heartbeats but never sends held the transfer (and on a server,
    the disk space reserved for it) for as long as its connection lived.
    Once the stream has shown it is bulk (:data:`WRITE_BATCH` taken), and
    where the sink has a blocking append, a thread of the transfer's own
    writes each batch while the next one is taken (:class:`WriteBehind`);
    before that, and for other sinks, each batch's write is awaited. The
    thread is given back once the stream has brought nothing to write for
    :data:`WRITE_BEHIND_IDLE` (a stalled sender holds none); a transfer
    without one asks again each time another :data:`WRITE_BATCH` has arrived
    (after such a spell, or when none was free). Either way nothing is
    left writing when this returns or raises. Cancelled (the connection went
    away), it first writes what had arrived and was not written yet, so that
    a resume starts after it.
    """
    start = partial.offset
    # Bytes taken from the stream so far, and the batch taken but not yet
    # handed to the sink (for _keep_arrived).
    taken = 0
    unqueued: list[Buffer] = []
    # Bytes written by awaited writes and by writer threads given back (the
    # current writer counts its own), and reported as progress.
    awaited = reported = 0
    behind: WriteBehind | None = None
    # A writer thread is asked for once this much was taken: when the stream
    # has shown it is bulk, and after each batch while it has none.
    writer_from = WRITE_BATCH
    # When this side began to wait for the stream's next bytes, having
    # written the last ones (or last stopped reading its socket, which no
    # sender can be blamed for): the stall clock counts only our waits.
    heard = trio.current_time()
    brought = False
    try:
        while True:
            # Batches only once the stream has shown it is bulk: a short stream,
            # or the start of a long one, is written as it comes, so a connection
            # cut early still leaves what arrived in the partial file for a resume.
            # A writer thread only then too: a short stream holds none.
            batch = WRITE_BATCH if taken >= WRITE_BATCH else 0
            if behind is None and partial.blocking_write is not None and taken >= writer_from:
                behind = WriteBehind.start(partial.blocking_write, stream.release)
                writer_from = taken + WRITE_BATCH
            if behind is not None:
                # Taken only once the writer has room for it: the stream and
                # this side then hold at most a window and two batches.
                await behind.wait_for_room()
            # ahead: the batch's credit goes back before it is written, so the
            # sender keeps sending while this side writes; keep: it stays
            # counted against the connection's budget until stream.release()
            # says it was written (bounded: see IncomingStream.receive). A
            # wait cut short leaves the stream as it was.
            idle = WRITE_BEHIND_IDLE if behind is not None else math.inf
            now = trio.current_time()
            if brought:
                heard, brought = now, False
            with trio.move_on_at(min(now + idle, heard + stall_after)) as waiting:
                chunks, raw_trailer = await stream.receive(
                    batch, patience=WRITE_PATIENCE, ahead=True, keep=True
                )
            if waiting.cancelled_caught:
                now = trio.current_time()
                if now >= heard + stall_after:
                    if not stream.reading_paused():
                        raise TransferError(
                            f"the sender sent nothing for {stall_after:g} s", "stalled"
                        )
                    heard = now
                if behind is not None and not behind.outstanding:
                    # Nothing came to write for that long (a stalled or slow
                    # sender): the thread goes back to the run's few; another
                    # is asked for once the stream brings the next batch.
                    behind.close()
                    await behind.drain()
                    awaited += behind.bytes_written
                    behind = None
                    writer_from = taken + WRITE_BATCH
                continue
            brought = True
            if chunks:
                amount = _length(chunks)
                if start + taken + amount > size:
                    raise TransferError(
                        f"the sender sent more than the {size} bytes it announced",
                        "size_mismatch",
                    )
                taken += amount
                unqueued = chunks
                if behind is None:
                    await partial.write(chunks)
                    stream.release()
                    awaited += amount
                else:
                    await behind.put(chunks)
                # Handed over: drop the views now, not when the next batch
                # replaces them, so the decrypted records they pin can be
                # reused once written (else up to a window more of fresh
                # record buffers).
                unqueued = []
                del chunks
            if raw_trailer is not None and behind is not None:
                await behind.drain()
            written = awaited + (behind.bytes_written if behind is not None else 0)
            if written > reported:
                await reporter.advance(written - reported)
                reported = written
            if raw_trailer is not None:
                return Trailer.unpack(raw_trailer)
    except trio.Cancelled:
        with trio.CancelScope(shield=True):
            if behind is not None:
                await behind.settle()
            await _keep_arrived(stream, partial, size, unqueued, start + taken - _length(unqueued))
        raise
    finally:
        if behind is not None:
            behind.close()
            # The sink must not be closed or discarded under a write.
            with trio.CancelScope(shield=True):
                await behind.settle()


def _length(chunks: Sequence[Buffer]) -> int:
    return sum(len(chunk) for chunk in chunks)


async def _keep_arrived(
    stream: IncomingStream,
    partial: BlockWriter,
    size: int,
    unwritten: list[Buffer],
    offset: int,
) -> None:
    # Bytes that arrived (decrypted and authenticated, in order) but were not
    # written when the receive was cancelled: with credit returned before a
    # write, up to a window and the batches kept. Written now, a resume need
    # not fetch them again. Only if the sink is at ``offset``, where
    # everything handed to it ends (a sink that may have written part of the
    # interrupted batch, or failed a write, is left as it is).
    if partial.offset != offset:
        return
    chunks = [*unwritten, *stream.chunks]
    if not chunks or partial.offset + _length(chunks) > size:
        return
    # A failure here (a full disk) must not hide the cancellation.
    with contextlib.suppress(Exception):
        await partial.write(chunks)
