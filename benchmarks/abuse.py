"""Issue 11's per-connection abuse thresholds, full size: ``python -m benchmarks.abuse``.

Each scenario starts a conduit server **in its own process** on loopback with
default settings (``python -m benchmarks.abuse serve STORAGE``: a ``Server``
with a ``FileTransferHandler``, plus one ``abuse_probe`` RPC that reports the
server's RSS and how many closed ``Connection`` objects are alive), attacks it
from this process, and prints one line of figures and a verdict per scenario.
The probe reads RSS and counts closed connections first as the server is,
then after ``gc.collect()``: the verdicts use the first (what reference
counting freed), as a server's rare full collections would leave it.

* ``dropped``: 150 uploads of 64 MiB dropped mid-way (the socket closed under
  them once the server has written 2 MiB of each) plus 10 cancelled by honest
  clients -> RSS back within 40 MiB of the baseline and no closed connection
  alive, without a collection (an upload that finishes uncut fails it);
* ``bad-checksum``: 5,000 begin + bad-checksum END cycles, never finished, on
  one live connection -> RSS growth < 8 MiB;
* ``stalled``: 4 connections x 128 ``file_download`` calls that never read their
  socket -> RSS growth < 96 MiB (the server admits 32 a connection and refuses
  the rest ``overloaded``: the answers are read and reported afterwards);
* ``resume-hash``: 4 connections x 128 downloads of a 256 MiB file claiming a
  resume offset with a wrong prefix hash, while an honest client calls
  ``file_list`` every 20 ms -> its p99 < 300 ms (admitted and refused reported
  as for ``stalled``; the server hashes a connection's wrong claims only up to
  its ``resume_hash_budget`` and serves the rest from offset 0: the server
  counts the claims it hashed and their bytes, which must be some and at most
  4 x (the budget + one claim));
* ``large-calls``: 64 connections x 8 calls of 340,000 two-character strings
  (1 MiB on the wire, 20 MB in memory decoded) to a handler that waits (as
  one waiting on a slow database does) -> the calls admitted hold at most the
  server's ``server_call_budget`` (512 MiB) plus one call by its count, and
  the server's RSS grows by less than twice that budget. (The count is
  ``codec.unpack_sized``'s bound, 21.7 MiB a call here; what a call held
  costs the server's RSS was measured at about 31 MiB: 19.2 MiB of decoded
  objects, the handler's structured copy of its list, 2.8 MiB, and the
  allocator's share, with the refused calls decoded beside them.) Each
  connection's own 32 MiB bound alone lets every connection hold one: 1.8 GB
  here, and 250 connections of one user several times that. At a smaller
  ``--scale`` the budget shrinks with the connections (at least 64 MiB), so
  that it is still what refuses.
* ``small-messages``: 16 connections x 1,000 messages of 4,062 empty maps (a
  body of 4 KiB on the wire, 293 KB decoded) to a message handler that waits
  -> the server's count within the same budget plus a message per
  connection, every message handled once the handler goes on, and the RSS
  growth under twice the budget and under twice the count's peak (plus 16
  MiB): what is held is counted. Until 2026-12-07 a message of up to 4 KiB
  counted its bytes on the wire, 70 times less than it holds.
* ``small-calls``: 32 connections x 128 calls (the most a connection runs) of
  4,058 empty maps (4 KiB, 292 KB decoded) to a handler that waits -> the
  calls admitted within the budget plus one by the count, and the RSS growth
  bounded and counted as for ``small-messages``. Until 2026-12-07 calls of up
  to 4 KiB ran uncounted.
* ``one-user``: ``large-calls`` from one address (one user, with a shared
  password), then 4 such calls from another address, one a connection ->
  the first user's count within its ``user_call_budget`` (a quarter of the
  server's) plus one call, and the second user's calls run, refused if at
  all by its own share, never by the server's budget for what the first
  holds. Until 2026-12-07 one user could hold the whole server budget.
* ``first-messages``: 256 connections (32 a user) x one message of 100,000
  empty maps (100 KB on the wire, 13.7 MB by the count, about 7.2 MB
  decoded) to a message handler that waits -> the server's count within
  twice its budget (the overdraft, into which a connection's first message
  is let past the budget), each user's within twice its share, every
  message handled once the handler goes on, and the RSS growth under twice
  the budget. Until 2026-12-07 every connection's first message was let in
  past any bound: here 3.4 GB by the count.

The connections of ``large-calls``, ``small-messages``, ``small-calls`` and
``first-messages`` come from 8 loopback addresses in turn (``127.0.0.101`` on): with a shared
password each address is a user, whose count is checked against its
``user_call_budget`` too.

``--scale`` shrinks every count (0.1 for a quick look). The CI-sized versions
of the same findings are ``tests/test_resource_limits.py``; malformed answers
are checked there in full (``nox -s stress`` runs both).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from conduit import (
    Client,
    ClientDescriptor,
    FileTransferHandler,
    Server,
    ServerDescriptor,
)
from conduit.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    ClientHandshake,
    FrameKind,
    FrameReader,
    FrameWriter,
    decode_body,
)
from conduit.protocol.codec import encode_frame
from conduit.protocol.messages import Call, Message, Result
from conduit.transfer._names import PARTIAL_PREFIX
from conduit.transfer._wire import Trailer

PASSWORD = "abuse-benchmark"
MiB = 1024 * 1024
PROBE = "abuse_probe"
HOLD = "abuse_hold"
#: ``abuse_hold`` for arguments of any shape (``small-calls``).
HOLD_ANY = "abuse_hold_any"
RELEASE = "abuse_release"
#: The event of the ``small-messages`` scenario, handled by a handler that waits.
HOLD_MESSAGE = "abuse_hold_message"
#: Uploads of the ``dropped`` scenario running at once.
DROP_CONCURRENCY = 8
#: The dropped uploads' file, and how much of it the server has written when
#: its upload is cut (the server's receive window is 4 MiB: more is in flight).
DROP_SIZE = 64 * MiB
CUT_AT = 2 * MiB


# --------------------------------------------------------------------------- the server process


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def serve(storage: str, call_budget: int | None = None) -> None:
    """Run the server under test (default settings, but ``call_budget`` for
    ``server_call_budget`` if given) until killed; print ``PORT n`` first."""
    from conduit._connection import Connection
    from conduit.transfer import _sender

    descriptor = ServerDescriptor(host="127.0.0.1", port=0, password=PASSWORD)
    if call_budget is not None:
        descriptor = attrs.evolve(descriptor, server_call_budget=call_budget)
    server = Server(descriptor)
    handler = FileTransferHandler(storage_dir=storage)
    handler.register_server_handlers(server)
    # What the resume claims cost: every check of a claim goes through
    # resume_hasher, which hashes the ``start`` bytes before the claimed
    # offset. Counted around the real function, which still does the work.
    hashing = {
        "resume_claims_hashed": 0,
        "resume_bytes_hashed": 0,
        "resume_hash_budget": handler.resume_hash_budget,
    }
    resume_hasher = _sender.resume_hasher

    async def counted_resume_hasher(source: Any, start: int, *args: Any, **kwargs: Any) -> Any:
        hashing["resume_claims_hashed"] += 1
        hashing["resume_bytes_hashed"] += start
        return await resume_hasher(source, start, *args, **kwargs)

    _sender.resume_hasher = counted_resume_hasher

    def closed_alive() -> int:
        return sum(
            1 for obj in gc.get_objects() if isinstance(obj, Connection) and obj.closed.is_set()
        )

    async def abuse_probe(trim: bool = False, collect: bool = False) -> dict[str, int]:
        # First as the server is: what reference counting has freed. A full
        # pass of the cycle collector comes rarely on a server, so what only
        # it frees counts as held (a probe that collected first could hide
        # what reference cycles hold); ``collect`` then says what that is.
        closed, rss = closed_alive(), _rss_bytes()
        collected = {}
        if collect:
            gc.collect()
            collected = {"closed_alive_after_gc": closed_alive(), "rss_after_gc": _rss_bytes()}
        if trim:
            # What glibc keeps of freed memory counts as RSS too; after
            # malloc_trim what remains is memory still in use.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        call_memory = getattr(server._settings, "call_memory", None)
        # Each user's share of it (none in e54f4e2 and before).
        shares = getattr(server, "_call_shares", None)
        return {
            "rss": rss,
            **collected,
            "rss_trimmed": _rss_bytes(),
            "closed_alive": closed,
            "clients": len(server.clients),
            # -1: a server with no call memory (before 2026-12-07).
            "call_memory_held": -1 if call_memory is None else call_memory.held,
            "call_memory_limit": -1 if call_memory is None else call_memory.limit,
            "call_share_held": -1 if shares is None else max((s.held for s in shares), default=0),
            "call_share_limit": -1 if shares is None else shares.limit,
            **hashing,
        }

    # A handler that takes its time, as one awaiting a slow database does:
    # what its callers sent stays decoded until it returns (``large-calls``).
    held_calls = trio.Event()

    async def abuse_hold(items: list[str]) -> int:
        await held_calls.wait()
        return len(items)

    async def abuse_hold_any(items: Any) -> int:
        await held_calls.wait()
        return len(items)

    def abuse_release() -> None:
        held_calls.set()

    # Messages of ``small-messages``: each waits as ``abuse_hold`` does, then counts.
    async def abuse_hold_message(_peer: Any, _data: Any) -> None:
        await held_calls.wait()
        hashing["messages_handled"] += 1

    hashing["messages_handled"] = 0
    server.on(HOLD_MESSAGE)(abuse_hold_message)
    server.register_rpc(abuse_probe, PROBE)
    server.register_rpc(abuse_hold, HOLD)
    server.register_rpc(abuse_hold_any, HOLD_ANY)
    server.register_rpc(abuse_release, RELEASE)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            print(f"PORT {port}", flush=True)

    trio.run(main)


class ServerUnderTest:
    """``serve`` in a subprocess; always killed on exit."""

    def __init__(self, storage: Path, options: list[str] | None = None) -> None:
        self.storage = storage
        self.options = options or []
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> ServerUnderTest:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.abuse", "serve", str(self.storage), *self.options],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"server did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()


# --------------------------------------------------------------------------- clients


def _client(port: int) -> Client:
    # Attackers and crashed clients do not come back: no automatic reconnect,
    # so a dropped upload stays abandoned, which is what these scenarios measure.
    return Client(
        ClientDescriptor(
            server_host="127.0.0.1",
            server_port=port,
            password=PASSWORD,
            rpc_timeout=120.0,
            reconnect_enabled=False,
        )
    )


async def probe(port: int, *, trim: bool = False, collect: bool = False) -> dict[str, int]:
    """The server's RSS, closed connections alive, and connected clients.

    ``rss`` and ``closed_alive`` as the server is (no probe collects before
    it reads); with ``collect``, ``rss_after_gc`` and ``closed_alive_after_gc``
    after a ``gc.collect()`` in the server; with ``trim``, ``rss_trimmed`` is
    the RSS after ``malloc_trim`` too.
    """
    client = _client(port)
    await client.connect()
    try:
        answer: dict[str, int] = await client.call(PROBE, trim=trim, collect=collect)
    finally:
        await client.disconnect()
    return answer


class NeverReads:
    """A hand-driven client: real handshake, then sealed CALLs; never reads its socket."""

    def __init__(self, stream: trio.SocketStream, reader: FrameReader, writer: FrameWriter) -> None:
        self.stream = stream
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, port: int, receive_window: int = 4 * MiB, source: str | None = None
    ) -> NeverReads:
        """Connect and authenticate to the server on ``port`` (from the loopback
        address ``source``, if given: one user each); return once WELCOMEd."""
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
        reader = FrameReader()
        handshake = ClientHandshake(
            PASSWORD,
            name="abuser",
            max_frame_size=DEFAULT_MAX_FRAME_SIZE,
            receive_window=receive_window,
        )
        await stream.send_all(handshake.start())

        async def next_frame() -> Any:
            while (frame := reader.next_frame()) is None:
                data = await stream.receive_some(65536)
                if not data:
                    raise RuntimeError("server closed during the handshake")
                reader.feed(data)
            return frame

        while handshake.keys is None:
            reply = handshake.receive(await next_frame())
            if reply:
                await stream.send_all(reply)
        keys = handshake.keys
        reader.start_decryption(keys.receive_key, 4 * MiB)
        writer = FrameWriter()
        writer.start_encryption(keys.send_key, keys.peer_max_frame_size)
        welcome = await next_frame()
        assert welcome.kind is FrameKind.WELCOME, welcome
        decode_body(welcome)
        return cls(stream, reader, writer)

    async def send_calls(self, calls: list[tuple[str, dict[str, Any]]], first_id: int) -> None:
        """Send ``calls`` as CALL frames numbered from ``first_id``, sealed in records."""
        frames = [
            (encode_frame(FrameKind.CALL, first_id + index, Call(method, args)),)
            for index, (method, args) in enumerate(calls)
        ]
        for record in self.writer.write_frames(frames):
            await self.stream.send_all(record)

    async def send_messages(self, messages: list[tuple[str, Any]]) -> None:
        """Send ``messages`` (event, data) as MESSAGE frames, sealed in records."""
        frames = [
            (encode_frame(FrameKind.MESSAGE, 0, Message(event, data)),) for event, data in messages
        ]
        for record in self.writer.write_frames(frames):
            await self.stream.send_all(record)

    async def answers(self, expected: int, timeout: float = 10.0) -> dict[str, int]:
        """Read until ``expected`` RESULTs came (or ``timeout``): how many of each kind.

        Kinds: ``ok`` (``ok_from_zero`` too when its value says ``offset`` 0) or
        the refusal's code (``overloaded (server)`` for a refusal by the
        server's call memory rather than the connection's, ``overloaded
        (user)`` by its user's share of it). Reading lets the
        server send what it held back, so call this only once what is
        measured has been read.
        """
        counts: dict[str, int] = {}
        seen = 0
        with trio.move_on_after(timeout):
            while seen < expected:
                frame = self.reader.next_frame()
                if frame is None:
                    data = await self.stream.receive_some(1 << 20)
                    if not data:
                        break
                    self.reader.feed(data)
                    continue
                if frame.kind is not FrameKind.RESULT:
                    continue
                seen += 1
                result = decode_body(frame, Result)
                kind = "ok" if result.ok else result.code
                if kind == "overloaded" and "the server's calls" in (result.error or ""):
                    kind = "overloaded (server)"
                elif kind == "overloaded" and "user_call_budget" in (result.error or ""):
                    kind = "overloaded (user)"
                counts[kind] = counts.get(kind, 0) + 1
                if result.ok and isinstance(result.value, dict) and result.value.get("offset") == 0:
                    counts["ok_from_zero"] = counts.get("ok_from_zero", 0) + 1
        return counts

    async def aclose(self) -> None:
        """Drop the connection at once (no GOODBYE)."""
        await trio.aclose_forcefully(self.stream)


def _write_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        for _ in range(size // MiB):
            file.write(os.urandom(MiB))


# --------------------------------------------------------------------------- scenarios


async def dropped(port: int, work: Path, scale: float) -> tuple[str, bool]:
    """150 uploads dropped mid-way + 10 cancelled: RSS within 40 MiB, no closed connection alive.

    ``DROP_CONCURRENCY`` of them run at once, each holding up to a 4 MiB
    receive window on the server: what stays after they are gone follows that
    peak unless the bulk buffers are given back (they are page mappings,
    unmapped with their connection and upload), not their number.

    Each upload is cut once the server has written ``CUT_AT`` of it (its
    partial file on disk says so), not at a progress report: a report comes
    when a block is queued, before any of it is sent, and a cut there
    reached the server before a byte of data (until 2026-12-06). An upload
    that finishes before its cut fails the scenario, and one whose data the
    server has not written within 60 s stops it with an error: neither
    would be the attack it names.
    """
    concurrency = DROP_CONCURRENCY
    storage = work / "storage"
    source = work / "upload.bin"
    _write_file(source, DROP_SIZE)
    warm = _client(port)
    await warm.connect()
    await FileTransferHandler(work / "c").send_to_server(warm, source, remote_name="warm.bin")
    await warm.disconnect()
    baseline = (await probe(port))["rss"]
    drops, cancels = max(1, int(150 * scale)), max(1, int(10 * scale))
    finished_uncut = 0

    def received(index: int) -> int:
        partials = (storage / "d").glob(f"{PARTIAL_PREFIX}*-{index}.bin")
        return max((path.stat().st_size for path in partials), default=0)

    async def one(index: int, drop: bool) -> None:
        nonlocal finished_uncut
        client = _client(port)
        await client.connect()
        transfer = FileTransferHandler(work / "c")
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as scope:

                async def cut() -> None:
                    with trio.fail_after(60):
                        # Another process's file: there is no event to wait on.
                        while received(index) < CUT_AT:  # noqa: ASYNC110
                            await trio.sleep(0.002)
                    if drop:  # the socket goes away under the upload, as a crash would
                        await trio.aclose_forcefully(client.server.connection.stream)
                    scope.cancel()

                nursery.start_soon(cut)
                result = await transfer.send_to_server(client, source, remote_name=f"d/{index}.bin")
                # A dropped socket comes back as a failure dict (the
                # connection lost, no reconnect); a success means no cut.
                if result["success"]:
                    finished_uncut += 1
            nursery.cancel_scope.cancel()
        await client.disconnect()

    async with trio.open_nursery() as nursery:
        limiter = trio.CapacityLimiter(concurrency)

        async def limited(index: int, drop: bool) -> None:
            async with limiter:
                await one(index, drop)

        for index in range(drops + cancels):
            nursery.start_soon(limited, index, index < drops)
    cut_bytes = sum(received(index) for index in range(drops + cancels))
    for _ in range(100):
        report = await probe(port)
        # The probe's own connection is the one client left.
        if report["clients"] == 1 and report["closed_alive"] == 0:
            break
        await trio.sleep(0.2)
    # Trio's idle worker threads (and what their malloc arenas hold) go after 10 s.
    await trio.sleep(12)
    report = await probe(port, trim=True, collect=True)
    growth = report["rss"] - baseline
    ok = (
        growth < 40 * MiB
        and report["closed_alive"] == 0
        and report["clients"] == 1
        and finished_uncut == 0
    )
    return (
        f"{drops} dropped + {cancels} cancelled uploads, {concurrency} at a time, each cut "
        f"once the server had written {CUT_AT // MiB} MiB of its {DROP_SIZE // MiB} MiB "
        f"({cut_bytes / MiB:.0f} MiB in their partials; {finished_uncut} finished before "
        f"their cut): RSS {baseline / MiB:.0f} -> "
        f"{report['rss'] / MiB:.0f} MiB (+{growth / MiB:.1f}; "
        f"{report['rss_after_gc'] / MiB:.0f} MiB after gc.collect(), "
        f"{report['rss_trimmed'] / MiB:.0f} after malloc_trim), closed connections alive: "
        f"{report['closed_alive']} ({report['closed_alive_after_gc']} after gc.collect()), "
        f"clients left besides the probe: {report['clients'] - 1}",
        ok,
    )


async def bad_checksum(port: int, work: Path, scale: float) -> tuple[str, bool]:
    """5,000 begin + bad-checksum END cycles on one connection: RSS growth < 8 MiB."""
    cycles = max(1, int(5000 * scale))
    client = _client(port)
    await client.connect()
    body = b"\x01" * 100
    wrong = Trailer(len(body), hashlib.sha256(b"other").digest()).pack()
    baseline = (await probe(port))["rss"]
    connection = client.server.connection
    for index in range(cycles):
        begin = await client.call(
            "file_upload_begin", name=f"bad/{index}.bin", size=len(body), key=f"{index:032x}"
        )
        stream = connection.open_outgoing_stream(int(begin["stream_id"]))
        await stream.send([body])
        await stream.finish(wrong)
        connection.close_stream(stream)
    after = (await probe(port))["rss"]
    await client.disconnect()
    growth = after - baseline
    return (
        f"{cycles} begin + bad-checksum END cycles: RSS +{growth / MiB:.1f} MiB",
        growth < 8 * MiB,
    )


async def stalled(port: int, work: Path, scale: float) -> tuple[str, bool]:
    """4 connections x 128 downloads that never read: RSS growth < 96 MiB."""
    size = 16 * MiB
    _write_file(work / "storage" / "big.bin", size)
    baseline = (await probe(port))["rss"]
    per_connection = max(1, int(128 * scale))
    peers = [await NeverReads.connect(port) for _ in range(4)]
    for peer in peers:
        calls = [
            (
                "file_download",
                {
                    "name": "big.bin",
                    "stream_id": 2 * index + 1,
                    "size": size,
                    "offset": 0,
                    "prefix_sha256": "",
                },
            )
            for index in range(per_connection)
        ]
        await peer.send_calls(calls, first_id=1)
    peak = baseline
    for _ in range(25):  # 5 s: the senders fill whatever they are allowed to
        await trio.sleep(0.2)
        peak = max(peak, (await probe(port))["rss"])
    # Afterwards, what each call was answered: the server admits
    # max_transfers_per_connection (32) a connection and refuses the rest.
    answers = _added([await peer.answers(per_connection) for peer in peers])
    for peer in peers:
        await peer.aclose()
    growth = peak - baseline
    answered = sum(count for kind, count in answers.items() if kind != "ok_from_zero")
    return (
        f"4 connections x {per_connection} stalled downloads ({_answers_text(answers)}): "
        f"RSS {baseline / MiB:.0f} -> peak {peak / MiB:.0f} MiB (+{growth / MiB:.1f})",
        growth < 96 * MiB and answered == 4 * per_connection and answers.get("ok", 0) > 0,
    )


async def resume_hash(port: int, work: Path, scale: float) -> tuple[str, bool]:
    """128 wrong resume claims x 4 connections: an honest file_list p99 < 300 ms."""
    size = 256 * MiB
    _write_file(work / "storage" / "huge.bin", size)
    per_connection = max(1, int(128 * scale))
    before = await probe(port)
    honest = _client(port)
    await honest.connect()
    timings: list[float] = []
    peers = [await NeverReads.connect(port, receive_window=64 * 1024) for _ in range(4)]
    for peer in peers:
        calls = [
            (
                "file_download",
                {
                    "name": "huge.bin",
                    "stream_id": 2 * index + 1,
                    "size": size,
                    "offset": size - 1,
                    "prefix_sha256": "0" * 64,
                },
            )
            for index in range(per_connection)
        ]
        await peer.send_calls(calls, first_id=1)
    deadline = trio.current_time() + 15
    while trio.current_time() < deadline:
        started = time.perf_counter()
        await honest.call("file_list")
        timings.append(time.perf_counter() - started)
        await trio.sleep(0.02)
    answers = _added([await peer.answers(per_connection) for peer in peers])
    after = await probe(port)
    for peer in peers:
        await peer.aclose()
    await honest.disconnect()
    p99 = statistics.quantiles(timings, n=100)[98] if len(timings) > 1 else timings[0]
    answered = sum(count for kind, count in answers.items() if kind != "ok_from_zero")
    claims = after["resume_claims_hashed"] - before["resume_claims_hashed"]
    hashed = after["resume_bytes_hashed"] - before["resume_bytes_hashed"]
    # Each connection's claims are hashed until they cost resume_hash_budget
    # (checked before each claim, so at most one claim more); the rest are
    # refused unhashed. Unbounded, 4 x 32 admitted claims would hash 32 GiB.
    budget = after["resume_hash_budget"]
    claim = size - 1
    most = len(peers) * (budget + claim)
    bounded = 0 < hashed <= most and claims <= len(peers) * (-(-budget // claim) + 1)
    return (
        f"4 connections x {per_connection} wrong resume claims on a 256 MiB file "
        f"({_answers_text(answers)}; {claims} hashed, {hashed / 2**30:.2f} GiB, "
        f"at most {most / 2**30:.2f} allowed): honest "
        f"file_list p99 {p99 * 1000:.0f} ms over {len(timings)} calls in 15 s",
        p99 < 0.3 and answered == 4 * per_connection and answers.get("ok", 0) > 0 and bounded,
    )


#: ``large-calls``: 1 MiB on the wire (3 bytes each), 20 MB decoded (59 each),
#: 22.8 MB by ``codec.unpack_sized``'s bound: one per connection fits its 32 MiB.
LARGE_CALL_STRINGS = 340_000
#: The least ``server_call_budget`` that ``large-calls`` shrinks the default to.
_SMALLEST_CALL_BUDGET = 64 * MiB


def _call_budget(scale: float) -> int:
    """``large-calls``' ``server_call_budget`` at ``scale``: the default, shrunk with it."""
    default: int = ServerDescriptor(password="x").server_call_budget
    return max(_SMALLEST_CALL_BUDGET, int(default * scale))


#: The held-attack scenarios' connections come from this many loopback
#: addresses (``127.0.0.101`` on), in turn: with a shared password each
#: address is a user, with its share of the call memory (``user_call_budget``).
USERS = 8


def _source(connection: int) -> str:
    """The loopback address the ``connection``-th attacking connection comes from."""
    return f"127.0.0.{101 + connection % USERS}"


def _per_user(share_limit: int, share_held: int, allowance: int) -> bool:
    """Whether the largest user's count stayed within ``user_call_budget``
    plus ``allowance`` (what its rules let past it); a server without shares
    (-1) has no such bound to meet."""
    return share_limit < 0 or share_held <= share_limit + allowance


def _users_text(connections: int, share_held: int) -> str:
    """How many users the connections were, and the largest one's peak count."""
    users = min(connections, USERS)
    peak = (
        "" if share_held < 0 else f"; the largest user's count peaked at {share_held / MiB:.0f} MiB"
    )
    return f"{users} addresses (users){peak}"


def _budget_text(limit: int, share_limit: int) -> str:
    """The server's ``server_call_budget`` and ``user_call_budget`` as a
    scenario's line says them (-1: none)."""
    if limit < 0:
        return "no call memory"
    share = "" if share_limit < 0 else f", user_call_budget {share_limit / MiB:.0f} MiB"
    return f"server_call_budget {limit / MiB:.0f} MiB{share}"


@attrs.frozen
class _Watched:
    """What :func:`_watch` saw: peaks over its looks."""

    #: The server's RSS.
    rss: int
    #: Its call memory's count, and the largest of its users' shares' counts.
    held: int
    share_held: int


async def _watch(port: int, baseline: int) -> _Watched:
    """The server's peak RSS (from ``baseline``), its call memory's peak
    count and its users' shares' largest, looked at every 0.2 s for 8 s (the
    server decodes what it was sent meanwhile)."""
    peak, held, share_held = baseline, 0, -1
    for _ in range(40):
        await trio.sleep(0.2)
        report = await probe(port)
        peak, held = max(peak, report["rss"]), max(held, report["call_memory_held"])
        share_held = max(share_held, report["call_share_held"])
    return _Watched(peak, held, share_held)


@attrs.frozen
class _HeldCalls:
    """What the server did with calls whose handler waits (:func:`_held_calls`)."""

    #: The server's RSS before, and its peak while the calls were held.
    baseline: int
    peak: int
    #: Its ``server_call_budget`` (-1: none), and its count's peak meanwhile.
    limit: int
    held: int
    #: Its ``user_call_budget`` (-1: none), and the largest user's peak meanwhile.
    share_limit: int
    share_held: int
    #: The calls' answers by kind (see :meth:`NeverReads.answers`).
    answers: dict[str, int]


async def _held_calls(
    port: int, connections: int, per_connection: int, method: str, args: dict[str, Any]
) -> _HeldCalls:
    """``connections`` raw peers send ``per_connection`` calls of ``method``
    (a handler that waits) each; the server is watched for 8 s, then its
    handlers are released and every answer is read."""
    before = await probe(port)
    peers = [await NeverReads.connect(port, source=_source(i)) for i in range(connections)]
    calls = [(method, args)] * per_connection
    for peer in peers:
        await peer.send_calls(calls, first_id=1)
    watched = await _watch(port, before["rss"])
    releaser = _client(port)
    await releaser.connect()
    await releaser.call(RELEASE)
    await releaser.disconnect()
    answers = _added([await peer.answers(per_connection, timeout=30) for peer in peers])
    for peer in peers:
        await peer.aclose()
    return _HeldCalls(
        before["rss"],
        watched.rss,
        before["call_memory_limit"],
        watched.held,
        before["call_share_limit"],
        watched.share_held,
        answers,
    )


async def large_calls(port: int, work: Path, scale: float) -> tuple[str, bool]:
    """64 connections x 8 large calls that wait: within the server's call budget."""
    connections = max(2, int(64 * scale))
    per_connection = 8
    items = ["ab"] * LARGE_CALL_STRINGS
    # Every call read and decided: each connection's first admitted (alone,
    # it fits its 32 MiB), those behind it refused by that bound or the server's.
    seen = await _held_calls(port, connections, per_connection, HOLD, {"items": items})
    baseline, peak, held, answers = seen.baseline, seen.peak, seen.held, seen.answers
    growth = peak - baseline
    limit = seen.limit
    admitted = answers.get("ok", 0)
    answered = sum(answers.values())
    # Bounded: the calls admitted hold at most the limit plus one (each is
    # 22.8 MB by the count), and the RSS grew by less than twice the limit
    # (see the module docstring for what a call held costs beyond its count).
    bound = 22_000_000
    bounded = limit > 0 and admitted <= limit // bound + 1 and growth < 2 * limit
    # And each user (address) within its share plus the one call a user
    # holding nothing is let in with (one is 22.8 MB by the count).
    shared = _per_user(seen.share_limit, seen.share_held, 23_000_000)
    budget = _budget_text(limit, seen.share_limit)
    return (
        f"{connections} connections x {per_connection} calls of {len(items):,} strings "
        f"(1 MiB each on the wire) to a handler that waits, {budget} "
        f"({_answers_text(answers)}; the server's count peaked at {held / MiB:.0f} MiB; "
        f"{_users_text(connections, seen.share_held)}): "
        f"RSS {baseline / MiB:.0f} -> peak {peak / MiB:.0f} MiB (+{growth / MiB:.1f})",
        bounded
        and shared
        and answered == connections * per_connection
        and 0 < admitted < connections,
    )


#: ``small-messages``: each message's data, a list of this many empty maps:
#: a MESSAGE body of 4,096 bytes (the most a body counted by its bytes on the
#: wire had until 2026-12-07), 293 KB decoded (measured with tracemalloc),
#: 556,928 bytes by ``codec.unpack_sized``'s bound.
SMALL_MESSAGE_MAPS = 4062


async def small_messages(port: int, work: Path, scale: float) -> tuple[str, bool]:
    """16 connections x 1,000 messages of 4 KiB of empty maps to a handler that
    waits: what they hold decoded within the server's call budget."""
    connections = max(2, int(16 * scale))
    per_connection = max(100, int(1000 * scale))
    data: list[dict[str, Any]] = [{}] * SMALL_MESSAGE_MAPS
    before = await probe(port)
    baseline = before["rss"]
    peers = [await NeverReads.connect(port, source=_source(i)) for i in range(connections)]
    messages = [(HOLD_MESSAGE, data)] * per_connection
    async with trio.open_nursery() as nursery:
        # The sends block once the server stops reading a connection (TCP).
        for peer in peers:
            nursery.start_soon(peer.send_messages, messages)
        watched = await _watch(port, baseline)
        total = connections * per_connection
        handled = await _release_messages(port, total)
    for peer in peers:
        await peer.aclose()
    peak, held = watched.rss, watched.held
    growth = peak - baseline
    limit = before["call_memory_limit"]
    # Bounded: the count within the limit plus the messages let in past it
    # (one a connection: none of these awaits answers), and the RSS grew by
    # less than twice the limit; and counted: by less than twice the count's
    # peak (and 16 MiB of the connections' own buffers), which a count of
    # the bytes on the wire, 70 times less than what is held, is not.
    bound = 556_928
    bounded = limit > 0 and held <= limit + connections * bound and growth < 2 * limit
    counted = growth < 2 * held + 16 * MiB
    # Each user within its share plus a message per connection of its own.
    share_limit = before["call_share_limit"]
    most_connections = -(-connections // USERS)
    shared = _per_user(share_limit, watched.share_held, most_connections * bound)
    budget = _budget_text(limit, share_limit)
    return (
        f"{connections} connections x {per_connection} messages of {SMALL_MESSAGE_MAPS:,} "
        f"empty maps (4 KiB each on the wire) to a handler that waits, {budget} "
        f"({handled} of {total} handled; the server's count peaked at {held / MiB:.0f} MiB; "
        f"{_users_text(connections, watched.share_held)}): "
        f"RSS {baseline / MiB:.0f} -> peak {peak / MiB:.0f} MiB (+{growth / MiB:.1f})",
        bounded and counted and shared and handled == total,
    )


async def _release_messages(port: int, total: int) -> int:
    """Let the server's message handlers go on; how many messages were
    handled once ``total`` were, or after 60 s."""
    releaser = _client(port)
    await releaser.connect()
    await releaser.call(RELEASE)
    handled = 0
    for _ in range(300):
        handled = (await probe(port))["messages_handled"]
        if handled >= total:
            break
        await trio.sleep(0.2)
    await releaser.disconnect()
    return handled


#: ``first-messages``: each connection's one message, a list of this many
#: empty maps: 100 KB on the wire, about 7.2 MB decoded, 13.7 MB by
#: ``codec.unpack_sized``'s bound (at most this, with its event's name).
FIRST_MESSAGE_MAPS = 100_000
FIRST_MESSAGE_COUNT = 13_701_000


async def first_messages(port: int, work: Path, scale: float) -> tuple[str, bool]:
    """256 connections x one message of 100,000 empty maps to a handler that
    waits: the messages let in past the call budget within its overdraft."""
    connections = max(12, int(256 * scale))
    data: list[dict[str, Any]] = [{}] * FIRST_MESSAGE_MAPS
    before = await probe(port)
    baseline = before["rss"]
    peers = [await NeverReads.connect(port, source=_source(i)) for i in range(connections)]
    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(peer.send_messages, [(HOLD_MESSAGE, data)])
        watched = await _watch(port, baseline)
        handled = await _release_messages(port, connections)
    for peer in peers:
        await peer.aclose()
    peak, held = watched.rss, watched.held
    growth = peak - baseline
    limit, share_limit = before["call_memory_limit"], before["call_share_limit"]
    # Bounded: each connection's first message is let in past the limit
    # (its own large call could be what fills it), but only into the
    # overdraft, twice the limit, the server's and each user's; the RSS
    # grew by less than that.
    bound = FIRST_MESSAGE_COUNT
    bounded = limit > 0 and held <= max(2 * limit, bound) and growth < 2 * limit
    shared = share_limit < 0 or watched.share_held <= max(2 * share_limit, bound)
    budget = _budget_text(limit, share_limit)
    return (
        f"{connections} connections x one message of {FIRST_MESSAGE_MAPS:,} empty maps "
        f"(100 KB on the wire, 13.7 MB by the count) to a handler that waits, {budget} "
        f"({handled} of {connections} handled; the server's count peaked at "
        f"{held / MiB:.0f} MiB; {_users_text(connections, watched.share_held)}): "
        f"RSS {baseline / MiB:.0f} -> peak {peak / MiB:.0f} MiB (+{growth / MiB:.1f})",
        bounded and shared and handled == connections,
    )


#: ``small-calls``: each call's ``items``, a list of this many empty maps: a
#: CALL body of 4,096 bytes (the most a call ran uncounted with until
#: 2026-12-07), 292 KB decoded (tracemalloc), 556,584 bytes by the bound.
SMALL_CALL_MAPS = 4058


async def small_calls(port: int, work: Path, scale: float) -> tuple[str, bool]:
    """32 connections x 128 calls of 4 KiB of empty maps to a handler that
    waits: what they hold decoded within the server's call budget."""
    connections = max(3, int(32 * scale))
    per_connection = 128  # the server's max_concurrent_calls
    items: list[dict[str, Any]] = [{}] * SMALL_CALL_MAPS
    seen = await _held_calls(port, connections, per_connection, HOLD_ANY, {"items": items})
    baseline, peak, held, answers = seen.baseline, seen.peak, seen.held, seen.answers
    growth = peak - baseline
    limit = seen.limit
    admitted = answers.get("ok", 0)
    # Bounded and counted, as for ``small-messages``: the calls admitted by
    # the count within the limit plus one, the RSS growth under twice the
    # limit and under twice the count's peak (and 16 MiB).
    bound = 556_584
    bounded = limit > 0 and admitted <= limit // bound + 1 and growth < 2 * limit
    counted = growth < 2 * held + 16 * MiB
    # Each user within its share plus one call.
    shared = _per_user(seen.share_limit, seen.share_held, bound)
    budget = _budget_text(limit, seen.share_limit)
    return (
        f"{connections} connections x {per_connection} calls of {SMALL_CALL_MAPS:,} empty "
        f"maps (4 KiB each on the wire) to a handler that waits, {budget} "
        f"({_answers_text(answers)}; the server's count peaked at {held / MiB:.0f} MiB; "
        f"{_users_text(connections, seen.share_held)}): "
        f"RSS {baseline / MiB:.0f} -> peak {peak / MiB:.0f} MiB (+{growth / MiB:.1f})",
        bounded and counted and shared and sum(answers.values()) == connections * per_connection,
    )


#: ``one-user``: the large calls the second user makes once the first holds
#: what it may, one a connection (a connection holds one such call at once).
OTHER_USER_CALLS = 4


async def one_user(port: int, work: Path, scale: float) -> tuple[str, bool]:
    """``large-calls`` from one address, then a second user's large calls:
    the first holds at most its share, the second's are not refused for it."""
    connections = max(2, int(64 * scale))
    per_connection = 8
    call = (HOLD, {"items": ["ab"] * LARGE_CALL_STRINGS})
    before = await probe(port)
    hog = [await NeverReads.connect(port, source=_source(0)) for _ in range(connections)]
    for peer in hog:
        await peer.send_calls([call] * per_connection, first_id=1)
    watched = await _watch(port, before["rss"])
    others = [await NeverReads.connect(port, source=_source(1)) for _ in range(OTHER_USER_CALLS)]
    for peer in others:
        await peer.send_calls([call], first_id=1)
    for _ in range(50):  # read and decided by the server: its count moves
        await trio.sleep(0.2)
        if (await probe(port))["call_memory_held"] > watched.held:
            break
    releaser = _client(port)
    await releaser.connect()
    await releaser.call(RELEASE)
    await releaser.disconnect()
    first = _added([await peer.answers(per_connection, timeout=30) for peer in hog])
    second = _added([await peer.answers(1, timeout=30) for peer in others])
    for peer in (*hog, *others):
        await peer.aclose()
    share_limit = before["call_share_limit"]
    # The first user within its share plus the one call a user holding
    # nothing is let in with (22.8 MB by the count); the second's calls
    # refused, if at all, by its own share, never for what the first holds.
    shared = share_limit > 0 and _per_user(share_limit, watched.share_held, 23_000_000)
    admitted = second.get("ok", 0)
    answered = sum(first.values()) + sum(second.values())
    budget = _budget_text(before["call_memory_limit"], share_limit)
    users = "" if share_limit < 0 else f", that user's at {watched.share_held / MiB:.0f} MiB"
    return (
        f"{connections} connections of one address x {per_connection} calls of "
        f"{LARGE_CALL_STRINGS:,} strings to a handler that waits, {budget} "
        f"({_answers_text(first)}; the server's count peaked at "
        f"{watched.held / MiB:.0f} MiB{users}); then another address's "
        f"{OTHER_USER_CALLS} connections, a call each: {_answers_text(second)}; RSS "
        f"{before['rss'] / MiB:.0f} -> peak {watched.rss / MiB:.0f} MiB before the other's",
        shared
        and admitted > 0
        and "overloaded (server)" not in second
        and answered == connections * per_connection + OTHER_USER_CALLS,
    )


def _added(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for kind, number in count.items():
            total[kind] = total.get(kind, 0) + number
    return total


def _answers_text(answers: dict[str, int]) -> str:
    """:meth:`NeverReads.answers` in words: ``32 admitted, 96 refused 'overloaded'``."""
    parts = [f"{answers.get('ok', 0)} admitted"]
    if "ok_from_zero" in answers:
        parts[0] += f" ({answers['ok_from_zero']} from offset 0)"
    parts += [
        f"{number} refused {kind!r}"
        for kind, number in sorted(answers.items())
        if kind not in ("ok", "ok_from_zero")
    ]
    return ", ".join(parts)


SCENARIOS: dict[str, Callable[[int, Path, float], Any]] = {
    "dropped": dropped,
    "bad-checksum": bad_checksum,
    "stalled": stalled,
    "resume-hash": resume_hash,
    "large-calls": large_calls,
    "small-messages": small_messages,
    "small-calls": small_calls,
    "one-user": one_user,
    "first-messages": first_messages,
}


#: Options of the server process a scenario needs at a ``--scale`` (none at 1:
#: every scenario's server has the default settings at full size).
def _scaled_call_budget(scale: float) -> list[str]:
    return [] if scale == 1 else ["--call-budget", str(_call_budget(scale))]


def _no_options(_scale: float) -> list[str]:
    return []


SERVER_OPTIONS: dict[str, Callable[[float], list[str]]] = {
    "large-calls": _scaled_call_budget,
    "small-messages": _scaled_call_budget,
    "small-calls": _scaled_call_budget,
    "one-user": _scaled_call_budget,
    "first-messages": _scaled_call_budget,
}


def run(names: list[str], scale: float) -> bool:
    """Run the scenarios, each against a fresh server process; print figures; all passed?"""
    passed = True
    for name in names:
        with tempfile.TemporaryDirectory(prefix="conduit-abuse-") as tmp:
            work = Path(tmp)
            (work / "storage").mkdir()
            options = SERVER_OPTIONS.get(name, _no_options)(scale)
            with ServerUnderTest(work / "storage", options) as server:
                started = time.monotonic()
                line, ok = trio.run(SCENARIOS[name], server.port, work, scale)
            verdict = "PASS" if ok else "FAIL"
            print(f"[{verdict}] {name}: {line} ({time.monotonic() - started:.0f} s)", flush=True)
            passed = passed and ok
    return passed


def main(argv: list[str] | None = None) -> int:
    """Command line: ``serve STORAGE`` (the server under test) or the scenarios."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:
        budget = int(args[3]) if args[2:3] == ["--call-budget"] else None
        serve(args[1], budget)
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.abuse", description=__doc__)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--scale", type=float, default=1.0, help="shrink every count")
    options = parser.parse_args(args)
    return 0 if run(options.scenario or list(SCENARIOS), options.scale) else 1


if __name__ == "__main__":
    sys.exit(main())
