"""``conduit demo``: a server and a client on loopback, every feature exercised once.

It is the README's first command, so it must succeed on a fresh machine, print
what it does, and exit non-zero if anything did not match: RPC both ways, a
one-way message, a wrong password refused, then a file of a few hundred MiB
(random bytes, written in blocks so memory stays small) uploaded with a live
progress bar, listed, downloaded back and compared by SHA-256, with the
throughput of each direction.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import trio
from rich.console import Console
from rich.progress import Progress

from .. import (
    AuthenticationError,
    Client,
    ClientDescriptor,
    FileTransferHandler,
    Peer,
    Server,
    ServerDescriptor,
    TransferProgress,
    _threads,
)
from ._common import ExitCode, Signals, human_bytes, human_rate, human_seconds
from ._display import ProgressCallback, progress_columns

#: Bytes generated (and hashed) per worker-thread call: small enough that
#: Ctrl-C is noticed quickly, large enough that thread hops cost nothing.
_BLOCK = 1 << 20
_BLOCKS_PER_STEP = 16


@attrs.frozen
class Point:
    """A structured RPC argument, to show cattrs at work."""

    x: float
    y: float


def _say(step: str, detail: str) -> None:
    print(f"  {step:<31} {detail}", flush=True)


async def generate_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` in blocks; return their SHA-256 (hex)."""
    hasher = hashlib.sha256()
    remaining = size
    with open(path, "wb") as file:  # noqa: ASYNC230 (opening is instant; writes are in threads)

        def step() -> bool:
            nonlocal remaining
            for _ in range(_BLOCKS_PER_STEP):
                if remaining <= 0:
                    break
                block = os.urandom(min(_BLOCK, remaining))
                file.write(block)
                hasher.update(block)
                remaining -= len(block)
            return remaining > 0

        while await _threads.run_sync(step):
            pass
    return hasher.hexdigest()


async def sha256_of(path: Path) -> str:
    """SHA-256 of a file, read in worker threads a few MiB at a time."""
    hasher = hashlib.sha256()
    with open(path, "rb") as file:  # noqa: ASYNC230 (opening is instant; reads are in threads)

        def step() -> bool:
            for _ in range(_BLOCKS_PER_STEP):
                block = file.read(_BLOCK)
                if not block:
                    return False
                hasher.update(block)
            return True

        while await _threads.run_sync(step):
            pass
    return hasher.hexdigest()


@contextlib.contextmanager
def _progress_bar(console: Console, label: str, size: int) -> Iterator[ProgressCallback | None]:
    """A live bar on an interactive terminal; no callback (and no output) otherwise."""
    if not console.is_interactive:
        yield None
        return
    with Progress(
        *progress_columns(console.width, 12), console=console, refresh_per_second=10
    ) as progress:
        task = progress.add_task(label, total=size)

        def on_progress(update: TransferProgress) -> None:
            progress.update(
                task,
                total=update.total_size,
                completed=update.transferred,
                speed=update.speed,
                eta=update.eta,
            )

        yield on_progress


def _build_server(password: str, storage: Path) -> tuple[Server, FileTransferHandler, list[object]]:
    server = Server(
        ServerDescriptor(host="127.0.0.1", port=0, password=password, name="demo-server")
    )
    transfer = FileTransferHandler(storage)
    transfer.register_server_handlers(server)
    inbox: list[object] = []

    @server.rpc
    async def add(a: int, b: int) -> int:
        return a + b

    @server.rpc
    async def norm(point: Point) -> float:
        return float((point.x**2 + point.y**2) ** 0.5)

    @server.rpc
    async def greet_back(caller: Peer) -> str:
        # A handler may call back into the client that called it.
        name = await caller.call("whoami")
        return f"hello {name}, you are client {caller.id}"

    @server.on("note")
    async def note(client: Peer, data: object) -> None:
        inbox.append(data)

    return server, transfer, inbox


async def _rpc_tour(client: Client, server: Server, port: int, inbox: list[object]) -> bool:
    result = await client.rpc.call("add", a=2, b=40)
    _say("rpc.call('add', a=2, b=40)", repr(result))
    ok = result == {"success": True, "data": 42}
    # Once a call is answered, the server has checked our confirmation and
    # serves us (connect() may return before: the server confirms first).
    ok &= client.id in server.clients

    length = await client.call("norm", point=Point(3, 4))
    _say("call('norm', Point(3, 4))", repr(length))
    ok &= length == 5.0

    greeting = await client.call("greet_back")
    _say("server calls client back", repr(greeting))
    ok &= greeting == f"hello demo-client, you are client {client.id}"

    missing = await client.rpc.call("no_such_method")
    _say("unknown method", repr(missing))
    ok &= missing.get("code") == "not_found"

    await client.send("note", {"text": "one-way message"})
    with trio.fail_after(5):
        while not inbox:  # noqa: ASYNC110 (the handler runs on the server's schedule)
            await trio.sleep(0.005)
    _say("one-way message", repr(inbox[0]))

    intruder = Client(ClientDescriptor(server_host="127.0.0.1", server_port=port, password="guess"))
    try:
        await intruder.connect()
        ok = False
        _say("wrong password", "was ACCEPTED (bug)")
        await intruder.disconnect()
    except AuthenticationError as exc:
        _say("wrong password", f"refused: {exc}")
    return ok


async def _timed_calls(client: Client, calls: int) -> None:
    timings = []
    for i in range(calls):
        t0 = time.perf_counter()
        await client.call("add", a=i, b=1)
        timings.append(time.perf_counter() - t0)
    if timings:
        timings.sort()
        p50 = statistics.median(timings) * 1e6
        p99 = timings[max(0, int(len(timings) * 0.99) - 1)] * 1e6
        _say(f"{calls} sequential calls", f"p50 {p50:.0f} us, p99 {p99:.0f} us (same process)")


def _throughput(size: int, seconds: float) -> str:
    rate = size / seconds if seconds > 0 else float("inf")
    return f"{human_bytes(size)} in {human_seconds(seconds)}: {human_rate(rate)}"


async def _file_tour(client: Client, workdir: Path, size: int, console: Console) -> bool:
    """Generate, upload, list, download, verify; return whether everything matched."""
    source = workdir / "client" / "random.bin"
    source.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    digest = await generate_file(source, size)
    seconds = human_seconds(time.perf_counter() - t0)
    _say(
        f"generate {human_bytes(size)}",
        f"os.urandom in 1 MiB blocks, sha256 {digest[:16]}... ({seconds})",
    )
    transfer = FileTransferHandler(workdir / "client")
    ok = True

    with _progress_bar(console, "upload", size) as on_progress:
        t0 = time.perf_counter()
        sent = await transfer.send_to_server(client, source, on_progress)
        upload_seconds = time.perf_counter() - t0
    upload_line = _throughput(size, upload_seconds)
    ok &= bool(sent.get("success")) and sent.get("checksum") == digest
    _say("upload (send_to_server)", "verified by the server" if ok else f"FAILED: {sent}")
    _say("upload throughput", upload_line)

    listing = await transfer.list_files(client)
    _say("list_files", ", ".join(f"{f['name']} ({human_bytes(f['size'])})" for f in listing))
    ok &= any(f["name"] == sent.get("path") and f["size"] == size for f in listing)

    downloads = workdir / "downloads"
    with _progress_bar(console, "download", size) as on_progress:
        t0 = time.perf_counter()
        got = await transfer.receive_from_server(client, "random.bin", downloads, on_progress)
        download_seconds = time.perf_counter() - t0
    download_line = _throughput(size, download_seconds)
    fetched = bool(got.get("success")) and got.get("checksum") == digest
    ok &= fetched
    _say("download (receive_from_server)", "verified" if fetched else f"FAILED: {got}")
    _say("download throughput", download_line)

    round_trip = await sha256_of(downloads / "random.bin") if fetched else ""
    same = round_trip == digest
    ok &= same
    _say("sha256 after the round trip", "identical" if same else f"DIFFERENT: {round_trip}")
    return ok


async def demo(signals: Signals, *, workdir: Path, size: int, calls: int) -> int:
    """Run the whole demo in ``workdir``; 0 when everything matched, 1 otherwise."""
    console = Console()
    password = secrets.token_urlsafe(12)
    server, _, inbox = _build_server(password, workdir / "server")
    ok = True
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        print(f"conduit demo: server listening on 127.0.0.1:{port}, files in {workdir}")
        client = Client(
            ClientDescriptor(
                server_host="127.0.0.1", server_port=port, password=password, name="demo"
            )
        )

        @client.rpc
        async def whoami() -> str:
            return "demo-client"

        started = time.perf_counter()
        await client.connect()
        try:
            _say("connect + SPAKE2 handshake", f"{(time.perf_counter() - started) * 1000:.1f} ms")
            ok &= await _rpc_tour(client, server, port, inbox)
            await _timed_calls(client, calls)
            ok &= await _file_tour(client, workdir, size, console)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await client.disconnect()
                await server.close()
        nursery.cancel_scope.cancel()
    print("conduit demo:", "everything matched" if ok else "MISMATCH")
    return ExitCode.OK if ok else ExitCode.TRANSFER_FAILED
