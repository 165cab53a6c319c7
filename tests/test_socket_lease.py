"""A bulk sender's worker thread seals and writes its records itself (conduit._socket_lease).

Over real sockets between two connections: the records are sealed off the
event loop and arrive intact and in nonce order beside RPC traffic; a
cancelled send never leaves a record cut in half (its rest goes out through
the writer, and the connection stays usable); a connection that ends while
the thread waits for room stops the thread and closes its descriptor; and
``WorkerHop.run(on_cancel=...)`` tells a running call that its caller left.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from conduit import _connection, _socket_lease
from conduit._connection import Connection
from conduit._streams import IncomingStream
from conduit._worker_hop import WorkerHop
from conduit.errors import ConduitError
from conduit.protocol.data_runs import RecordBuffers
from conduit.protocol.records import RecordSealer
from conduit.transfer import _engine
from conduit.transfer._engine import FileSource, send_file
from conduit.transfer._progress import ProgressReporter
from conftest import open_fd_count, wait_until
from test_connection import _consume, _pair, _settings, _socket_pair

CHUNK = 64 * 1024
WINDOW = 4 * 1024 * 1024


def _file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    return path, data


async def _send(connection: Connection, stream_id: int, path: Path, size: int) -> str:
    stream = connection.open_outgoing_stream(stream_id)
    reporter = ProgressReporter(None, filename="f", direction="upload", total_size=size)
    with io.FileIO(path, "r") as file:
        trailer = await send_file(
            stream,
            FileSource(file),
            start=0,
            size=size,
            hasher=hashlib.sha256(),
            chunk_size=CHUNK,
            reporter=reporter,
        )
    connection.close_stream(stream)
    return trailer.checksum


async def _echo(_c: Connection, x: Any) -> Any:
    return x


async def test_bulk_records_are_sealed_by_the_reading_thread_and_rpcs_still_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone on the connection, every bulk record is sealed (and written) in a
    bulk-read thread, not on the event loop. Then, beside calls in both
    directions (which the thread yields the socket to), every call is
    answered and the file arrives whole: the nonces went out in order."""
    sealed_in: list[str] = []
    real = RecordSealer.seal_into

    def spy(self: RecordSealer, plaintext: Any, out: bytearray) -> memoryview:
        if len(plaintext) >= CHUNK:
            sealed_in.append(threading.current_thread().name)
        return real(self, plaintext, out)

    monkeypatch.setattr(RecordSealer, "seal_into", spy)
    size = 6 * 1024 * 1024 + 17
    path, data = _file(tmp_path, size)
    settings = _settings(receive_window=WINDOW)
    p = _pair(*_socket_pair(), settings, settings)
    p.server_dispatch.methods["echo"] = _echo
    p.client_dispatch.methods["echo"] = _echo
    answers: list[Any] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.client.run)
            nursery.start_soon(p.server.run)
            received = bytearray()
            incoming = p.server.open_incoming_stream()
            nursery.start_soon(_consume, incoming, received)
            checksum = await _send(p.client, incoming.stream_id, path, size)
            await wait_until(lambda: len(received) >= size, timeout=30)
            assert bytes(received) == data
            assert checksum == hashlib.sha256(data).hexdigest()
            assert sealed_in and all(name.startswith("conduit bulk reads") for name in sealed_in)

            async def calls() -> None:
                for n in range(40):
                    answers.append(await p.client.call("echo", {"x": n}, None))
                    answers.append(await p.server.call("echo", {"x": -n}, None))

            received = bytearray()
            incoming = p.server.open_incoming_stream()
            async with trio.open_nursery() as work:
                work.start_soon(calls)
                work.start_soon(_consume, incoming, received)
                checksum = await _send(p.client, incoming.stream_id, path, size)
            await p.client.close("done")
    assert bytes(received) == data
    assert checksum == hashlib.sha256(data).hexdigest()
    assert answers == [x for n in range(40) for x in (n, -n)]


async def _consume_until_gone(stream: IncomingStream, sink: bytearray) -> None:
    with contextlib.suppress(ConduitError):
        await _consume(stream, sink)


async def test_a_cancelled_send_leaves_no_record_cut_in_half(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer is not reading, so the thread waits for room inside a record;
    cancelled, the send returns (the thread stops within a wait), the record's
    rest goes to the writer, and once the peer reads, the connection still
    works: the rest went out first and whole."""
    entered = threading.Event()
    real = _socket_lease.SocketLease.send

    def spy(self: _socket_lease.SocketLease, plaintext: Any) -> bool:
        entered.set()
        return real(self, plaintext)

    monkeypatch.setattr(_socket_lease.SocketLease, "send", spy)
    size = 3 * 1024 * 1024
    path, data = _file(tmp_path, size)
    settings = _settings(receive_window=WINDOW)
    p = _pair(*_socket_pair(send_buffer=16 * 1024), settings, settings)
    p.server_dispatch.methods["echo"] = _echo
    received = bytearray()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.client.run)
            incoming = p.server.open_incoming_stream()
            with trio.CancelScope() as scope:

                async def cancel_once_waiting() -> None:
                    await wait_until(entered.is_set, timeout=20)
                    # Long enough for the thread to fill the socket and wait.
                    await trio.sleep(0.2)
                    scope.cancel()

                nursery.start_soon(cancel_once_waiting)
                await _send(p.client, incoming.stream_id, path, size)
            assert scope.cancelled_caught
            # The rest of the record the thread had begun waits for the writer.
            assert p.client._outbox.sealed_queued or not p.client._outbox.writer_idle
            assert not p.client._direct_sending
            nursery.start_soon(p.server.run)  # now the peer reads
            nursery.start_soon(_consume_until_gone, incoming, received)
            assert await p.client.call("echo", {"x": 7}, None) == 7
            await p.client.close("done")
    # What arrived is a prefix of the file made of whole frames, nothing torn.
    assert 0 < len(received) < size and len(received) % CHUNK == 0
    assert bytes(received) == data[: len(received)]


async def test_a_connection_closed_while_the_thread_waits_stops_it(tmp_path: Path) -> None:
    """The peer never reads; the connection is aborted while the thread waits
    for room: the send ends with an error, the thread stops, and its duplicate
    descriptor is closed with the lease."""
    size = 3 * 1024 * 1024
    path, _ = _file(tmp_path, size)
    settings = _settings(receive_window=WINDOW)
    client_stream, server_stream = _socket_pair(send_buffer=16 * 1024)
    p = _pair(client_stream, server_stream, settings, settings)
    before = open_fd_count()
    outcome: list[BaseException] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.client.run)
            incoming = p.server.open_incoming_stream()

            async def send() -> None:
                try:
                    await _send(p.client, incoming.stream_id, path, size)
                except ConduitError as exc:
                    outcome.append(exc)

            nursery.start_soon(send)
            await wait_until(lambda: p.client._direct_sending, timeout=20)
            await trio.sleep(0.2)
            p.client.abort("gone")
        await p.client.closed.wait()
    assert outcome, "the send must fail once its connection is gone"
    assert not p.client._direct_sending
    # The client's socket is closed with the connection; the lease's duplicate too.
    assert open_fd_count() <= before - 1
    await server_stream.aclose()


class _Lease:
    """A stand-in lease: records what it was given; others want the socket from
    its ``quiet + 1``-th look on (the thread looks before reading a record, and
    again before sealing it)."""

    rest = None

    def __init__(self, quiet: int) -> None:
        self.quiet = quiet
        self.sent: list[bytes] = []

    def stopped(self) -> bool:
        return False

    def wanted(self) -> bool:
        self.quiet -= 1
        return self.quiet < 0

    def send(self, plaintext: Any) -> bool:
        self.sent.append(bytes(plaintext))
        return True


@pytest.mark.parametrize("quiet", [0, 3, 100])
def test_the_thread_hands_back_the_record_it_read_when_others_want_the_socket(
    tmp_path: Path, quiet: int
) -> None:
    """Others want the socket while the second record is read: the thread sent
    the first, hands back the second read and hashed but not sealed, and reads
    no further (the file position and the hash end with it). Wanted before the
    first record, it reads nothing; never wanted, it sends the whole block."""
    record = 16 * CHUNK
    path, data = _file(tmp_path, 2 * 1024 * 1024 + 5)
    lease = _Lease(quiet)
    hasher = hashlib.sha256()
    with io.FileIO(path, "r") as file:
        done = _engine._read_and_send(
            file, 1, len(data), (CHUNK, 16), hasher, RecordBuffers(), cast(Any, lease)
        )
        position = file.tell()
    assert done is not None
    sent, handed_back = done
    if quiet == 0:
        assert (sent, handed_back, position, lease.sent) == (0, None, 0, [])
        assert hasher.digest() == hashlib.sha256().digest()
    elif quiet == 100:
        assert (sent, handed_back, position) == (len(data), None, len(data))
        assert len(lease.sent) == 3
        assert hasher.digest() == hashlib.sha256(data).digest()
    else:
        assert sent == record and len(lease.sent) == 1
        assert handed_back is not None and handed_back.payload == record
        assert position == 2 * record
        assert hasher.digest() == hashlib.sha256(data[: 2 * record]).digest()


async def test_a_hop_call_hears_that_its_caller_was_cancelled() -> None:
    """``on_cancel`` runs when the caller of a call a thread already runs is
    cancelled; the call still ends and its caller then sees ``Cancelled``."""
    hop = WorkerHop("test lease")
    started = threading.Event()
    stop = threading.Event()
    ended: list[bool] = []
    after: list[bool] = []

    def work() -> None:
        started.set()
        ended.append(stop.wait(10))

    with trio.fail_after(20):
        with trio.CancelScope() as scope:

            async def cancel_when_started() -> None:
                await wait_until(started.is_set, timeout=10)
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when_started)
                await hop.run(work, on_cancel=stop.set)
                # The call's outcome came back; the cancellation comes next.
                after.append(True)
                await trio.lowlevel.checkpoint()
                after.append(False)
        assert scope.cancelled_caught
    # The call ended because it heard of the cancellation, not by its timeout.
    assert ended == [True]
    assert after == [True]
    hop.close()


async def test_the_socket_is_not_lent_again_soon_after_others_interrupted_a_lease(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A lease nobody interrupted is followed by another at once; one that ended
    with a frame waiting for the writer (RPC traffic beside the bulk data) is
    not, for ``_LEASE_QUIET`` seconds: bulk records then go through the writer,
    where control frames overtake them at every record."""
    p = _pair(*_socket_pair())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(p.client.run)
            nursery.start_soon(p.server.run)
            await trio.testing.wait_all_tasks_blocked()
            lease = p.client.lend_socket()
            assert lease is not None
            lease.end()
            lease = p.client.lend_socket()
            assert lease is not None
            # A ping queued meanwhile waits for the writer: the lease was wanted.
            p.client._outbox.put_control((p.client._state.ping(),))
            lease.end()
            await trio.testing.wait_all_tasks_blocked()
            assert p.client._outbox.writer_idle  # the writer sent it
            assert p.client.lend_socket() is None
            mock_clock.jump(_connection._LEASE_QUIET)
            lease = p.client.lend_socket()
            assert lease is not None
            lease.end()
            nursery.cancel_scope.cancel()
