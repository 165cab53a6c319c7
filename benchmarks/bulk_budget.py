"""The CPU cost of each step of moving one MiB of bulk data, measured one step at a time.

``python -m benchmarks.bulk_budget`` runs every step a megabyte of a file
transfer goes through, alone, in a loop on this process's CPU clock, and prints
microseconds per MiB: the work the raw-socket reference does too (SHA-256,
AES-256-GCM, the file read, the copies) and the work only the engine does
(sixteen DATA frames built and queued, joined and sealed into one record,
opened and split again and run through the connection state machine, the
worker-thread hop that keeps the disk off the event loop, a Trio scheduler
pass). It uses the real objects (``OutgoingStream``, ``FrameWriter``,
``FrameReader``, ``ConnectionState``), so it moves when they do.

Multiply the engine-only steps by how often they happen per MiB (the per-MiB
counts of scheduler passes, worker hops and syscalls in ``docs/benchmark-journal.md``,
"Bulk: where the CPU goes") to get the engine's share of the CPU per GiB that
``python -m benchmarks --scenario bulk`` measures end to end.

Figures are medians of ``--repeat`` runs of ``--loops`` iterations each.

A third table says which of the shared steps release the GIL (and so can
overlap the event loop's Python when run in a worker thread): how often
another Python thread runs while the call runs, against a sleep as long.
A call holding the GIL gives exactly 0 at any machine load; a positive share
means it runs without the GIL (its size then depends on free cores).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conduit._streams import IncomingStream, OutgoingStream
from conduit.protocol import FrameReader, FrameWriter, OutFrame
from conduit.protocol.codec import data_header
from conduit.protocol.connection import ConnectionState
from conduit.protocol.data_runs import DataRecord, RecordBuffers, lay_out
from conduit.protocol.records import RecordSealer
from conduit.transfer import _engine

MiB = 1024 * 1024
CHUNK = 64 * 1024
KEY = bytes(range(32))


def _per_op(step: Callable[[], Any], loops: int, clock: Callable[[], float]) -> float:
    """Microseconds of ``clock`` per call of ``step``."""
    started = clock()
    for _ in range(loops):
        step()
    return (clock() - started) / loops * 1e6


def _median(
    step: Callable[[], Any], loops: int, repeat: int, clock: Any = time.thread_time
) -> float:
    return statistics.median(_per_op(step, loops, clock) for _ in range(repeat))


def shared_steps(loops: int, repeat: int) -> dict[str, float]:
    """What the reference does per MiB too."""
    block = os.urandom(MiB)
    hasher = hashlib.sha256()
    sealer = RecordSealer(KEY, MiB + 4096)
    sealed = bytearray(MiB + 64)
    copy = bytearray(MiB)
    figures = {
        "SHA-256 of 1 MiB": _median(lambda: hasher.update(block), loops, repeat),
        "AES-256-GCM seal of 1 MiB (into a reused buffer)": _median(
            lambda: sealer.seal_into(block, sealed), loops, repeat
        ),
        "copy of 1 MiB (memcpy)": _median(
            lambda: copy.__setitem__(slice(None), block), loops, repeat
        ),
    }
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        path = os.path.join(tmp, "block.bin")
        with open(path, "wb") as out:
            out.write(block)
        fd = os.open(path, os.O_RDONLY)
        try:
            figures["read of 1 MiB from the page cache (fresh bytes)"] = _median(
                lambda: os.pread(fd, MiB, 0), loops, repeat
            )
            figures["the sender's worker step before: read (fresh bytes) + one SHA-256 update"] = (
                _median(lambda: hasher.update(os.pread(fd, MiB, 0)), loops, repeat)
            )
            figures[
                "the sender's worker step, fresh buffers: lay out + readv into the frames + "
                "16 updates (before)"
            ] = _median(lambda: _read_laid_out(fd, hasher), loops, repeat)
            buffers = RecordBuffers()
            figures["the sender's worker step, buffers reused once sealed (RecordBuffers; now)"] = (
                _median(lambda: _read_laid_out(fd, hasher, buffers), loops, repeat)
            )
        finally:
            os.close(fd)
    return figures


def _beside_call(step: Callable[[], Any], repeat: int) -> float:
    """How often a Python thread runs while ``step`` runs, against while this thread sleeps.

    The other thread notes the time, runs a little bytecode, and sleeps 0.1 ms
    (giving the GIL up of its own accord), over and over; what counts are the
    notes taken strictly between the call's start and end. The switch
    interval is set far above a step's length, so this thread is never made
    to give the GIL up meanwhile: a call that holds the GIL leaves no note
    (exactly 0, whatever the machine's load), one that releases it about as
    many as a sleep as long.
    """
    notes: list[float] = []
    stop = threading.Event()
    clock = time.perf_counter

    def spin() -> None:
        while not stop.is_set():
            notes.append(clock())
            time.sleep(0.0001)

    def inside(start: float, end: float) -> int:
        return sum(1 for note in notes if start < note < end)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        shares = []
        for _ in range(repeat):
            notes.clear()
            started = clock()
            step()
            ended = clock()
            during = inside(started, ended)
            notes.clear()
            slept_from = clock()
            time.sleep(ended - started)
            slept = inside(slept_from, clock())
            shares.append(during / slept if slept else 0.0)
        return statistics.median(shares)
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(interval)


def gil_steps(repeat: int) -> dict[str, float]:
    """Whether each shared step lets another thread run (see :func:`_beside_call`)."""
    size = 16 * MiB  # long calls: each takes milliseconds
    block = os.urandom(size)
    nonce = bytes(12)
    # The cipher the engine's sealer and opener use (protocol/records.py).
    aead = AESGCM(KEY)
    sealed = aead.encrypt(nonce, block, b"")
    out = bytearray(size + 16)
    copy = bytearray(size)
    return {
        "SHA-256 update of 16 MiB (hashlib)": _beside_call(
            lambda: hashlib.sha256().update(block), repeat
        ),
        "AES-256-GCM encrypt_into of 16 MiB (cryptography)": _beside_call(
            lambda: aead.encrypt_into(nonce, block, b"", out), repeat
        ),
        "AES-256-GCM decrypt_into of 16 MiB (cryptography)": _beside_call(
            lambda: aead.decrypt_into(nonce, sealed, b"", memoryview(out)[:size]), repeat
        ),
        "copy of 16 MiB (memcpy; holds the GIL)": _beside_call(
            lambda: copy.__setitem__(slice(None), block), repeat
        ),
    }


def _read_laid_out(fd: int, hasher: Any, buffers: RecordBuffers | None = None) -> list[DataRecord]:
    """What ``_engine._read_records`` does for one record (pread: the file position stays)."""
    records, slots = lay_out(1, MiB, CHUNK, 16, buffers)
    os.preadv(fd, slots, 0)
    for slot in slots:
        hasher.update(slot)
    return records


def engine_steps(loops: int, repeat: int) -> dict[str, float]:
    """What only the engine does per MiB (per record of 16 DATA frames)."""
    block = memoryview(os.urandom(MiB))
    chunks = [block[i : i + CHUNK] for i in range(0, MiB, CHUNK)]
    state = ConnectionState(
        is_client=False,
        receive_window=1 << 30,
        peer_receive_window=1 << 30,
        peer_max_frame_size=MiB,
        max_concurrent_calls=16,
        max_streams=16,
        receive_budget=1 << 30,
    )
    stream = state.open_inbound(
        lambda stream_id, window: IncomingStream(stream_id, window, _no_grant)
    )
    frames: list[OutFrame] = [(data_header(stream.stream_id, CHUNK), chunk) for chunk in chunks]
    writer = FrameWriter()
    writer.start_encryption(KEY, MiB)

    def seal() -> None:
        for _ in writer.iter_records(frames):
            pass

    laid_out: list[OutFrame] = [(record.buffer,) for record in _read_laid_out_block()]

    def seal_laid_out() -> None:
        for _ in writer.iter_records(laid_out):
            pass

    # Records the reader opens in order (its nonce counts from zero, as the writer's).
    sealing = FrameWriter()
    sealing.start_encryption(KEY, MiB)
    records = [bytes(r) for _ in range(loops * repeat) for r in sealing.iter_records(frames)]
    pending = iter(records)
    reader = FrameReader()
    reader.start_decryption(KEY, MiB)

    def open_and_deliver() -> None:
        reader.feed(next(pending))
        while (frame := reader.next_frame()) is not None:
            event = state.receive_frame(frame)
            if isinstance(event, IncomingStream):
                event.wake()
        stream.take()
        stream.consumed()
        state_grant = stream.credit_to_return(force=True)
        del state_grant

    return {
        "join 16 frames (copy) + seal one record (iter_records; before)": _median(
            seal, loops, repeat
        ),
        "seal one laid-out record of 16 frames (iter_records; now)": _median(
            seal_laid_out, loops, repeat
        ),
        "open (decrypt) a record, its 16 frames through ConnectionState (one run)": _median(
            open_and_deliver, loops, repeat
        ),
        **trio.run(_trio_steps, chunks, loops, repeat),
    }


def _read_laid_out_block() -> list[DataRecord]:
    records, slots = lay_out(1, MiB, CHUNK, 16)
    for slot in slots:
        slot[:] = os.urandom(len(slot))
    return records


def _no_grant(stream_id: int, amount: int) -> None:
    del stream_id, amount


async def _trio_steps(chunks: list[memoryview], loops: int, repeat: int) -> dict[str, float]:
    async def enqueue(batch: list[tuple[OutFrame, int]]) -> None:
        del batch

    stream = OutgoingStream(1, 1 << 40, CHUNK, enqueue)
    records = _read_laid_out_block()

    async def timed(
        step: Callable[[], Awaitable[object]], count: int, clock: Callable[[], float]
    ) -> float:
        runs: list[float] = []
        for _ in range(repeat):
            started = clock()
            for _ in range(count):
                await step()
            runs.append((clock() - started) / count * 1e6)
        return statistics.median(runs)

    return {
        "build + queue 16 DATA frames (OutgoingStream.send; before)": await timed(
            lambda: stream.send(chunks), loops, time.thread_time
        ),
        "queue one laid-out record (OutgoingStream.send_records; now)": await timed(
            lambda: stream.send_records(records), loops, time.thread_time
        ),
        "one Trio scheduler pass (checkpoint)": await timed(
            trio.lowlevel.checkpoint, loops * 10, time.thread_time
        ),
        # Process CPU: the hop's cost is in both threads (futex, GIL hand-offs).
        "one worker-thread hop (trio.to_thread.run_sync of nothing; before)": await timed(
            lambda: trio.to_thread.run_sync(lambda: None), loops, time.process_time
        ),
        "one hop on the sender's read threads (WorkerHop.run of nothing; now)": await timed(
            lambda: _engine._READS.run(lambda: None), loops, time.process_time
        ),
    }


def main(argv: list[str] | None = None) -> None:
    """Print the table (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=200, help="iterations per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the median is shown")
    args = parser.parse_args(argv)
    print(f"{'step':<82} {'µs':>8}")
    for title, figures in (
        ("shared with the reference, per MiB", shared_steps(args.loops, args.repeat)),
        ("engine only", engine_steps(args.loops, args.repeat)),
        (
            "GIL: another thread's progress during the call / during a sleep as long "
            "(0 = holds the GIL)",
            gil_steps(max(args.repeat, 5)),
        ),
    ):
        print(f"-- {title}")
        for name, value in figures.items():
            print(f"{name:<82} {value:8.2f}" if value < 10 else f"{name:<82} {value:8.1f}")


if __name__ == "__main__":
    main()
