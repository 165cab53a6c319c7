"""Crashes and cuts: nothing lost, nothing corrupt ever published.

* ``kill -9`` of a client *process* mid-upload, then the same program again:
  the upload resumes from the server's partial file and publishes the exact
  bytes; nothing visible in between.
* ``kill -9`` of the *server process* mid-upload (storage on disk), a new server
  process on the same directory, the client retries: resumed (``resumed_from >
  0``), byte-identical, no partial left.
* A proxy that cuts the link at a random point of each of 100 uploads and
  downloads (random sizes up to 2 MiB, seeded): every outcome is a
  byte-identical published file or a clean failure, never a corrupt file;
  retrying every failure afterwards completes it (resume).
* Disk full: ENOSPC injected into the storage layer's writes for one transfer
  (always), and a real 8 MiB tmpfs when this machine allows mounting one: the
  sender gets code ``no_space``, the partial file is removed, the server keeps
  serving.

Subprocesses are real Python programs using the library (written to
``tmp_path``); every one is killed and reaped in a ``finally``. Loopback only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import outcome
import pytest
import trio

from conduit import Client, ConduitError, FileTransferHandler, Server
from conftest import PASSWORD, ClientFactory, ServerFactory, TcpProxy, client_descriptor, wait_until
from hostile_helpers import MiB, hostile
from transfer_helpers import (
    Cutter,
    file_sha256,
    make_file,
    partial_files,
    storage_server,
    visible_files,
    write_random_file,
)

SRC = Path(__file__).resolve().parent.parent / "src"

CLIENT_PROGRAM = r"""
import json, os, sys
import trio
from conduit import Client, ClientDescriptor, FileTransferHandler

async def main(port, path, name, scratch):
    client = Client(ClientDescriptor(server_host="127.0.0.1", server_port=port,
                                     password=os.environ["CONDUIT_TEST_PASSWORD"],
                                     connect_timeout=10))
    await client.connect()
    print("CONNECTED", flush=True)
    handler = FileTransferHandler(storage_dir=scratch)
    result = await handler.send_to_server(client, path, remote_name=name)
    print("RESULT " + json.dumps(result), flush=True)
    await client.disconnect()

trio.run(main, int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
"""

SERVER_PROGRAM = r"""
import os, sys
import trio
from conduit import FileTransferHandler, Server, ServerDescriptor

async def main(storage):
    server = Server(ServerDescriptor(host="127.0.0.1", port=0,
                                     password=os.environ["CONDUIT_TEST_PASSWORD"]))
    FileTransferHandler(storage_dir=storage).register_server_handlers(server)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        print(f"PORT {port}", flush=True)

trio.run(main, sys.argv[1])
"""


# --------------------------------------------------------------------------- subprocesses


@attrs.define(eq=False)
class Program:
    """A Python subprocess using conduit, with its stdout read line by line."""

    process: trio.Process
    lines: list[str] = attrs.field(factory=list)
    _buffer: bytes = b""

    async def next_line(self, prefix: str, *, timeout: float = 30) -> str:
        """The next stdout line starting with ``prefix`` (earlier lines are kept)."""
        with trio.fail_after(timeout):
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        self.lines.remove(line)
                        return line
                assert self.process.stdout is not None
                data = await self.process.stdout.receive_some(65536)
                if not data:
                    raise AssertionError(f"program ended before {prefix!r}: {self.lines}")
                self._buffer += data
                *complete, self._buffer = self._buffer.split(b"\n")
                self.lines += [line.decode() for line in complete]

    def kill9(self) -> None:
        self.process.kill()  # SIGKILL on POSIX: no cleanup, no goodbye


@pytest.fixture
async def programs(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await start(source, *args)``: run a Python program; all are killed at teardown."""
    started: list[Program] = []

    async def start(source: str, *args: str) -> Program:
        script = tmp_path / f"program-{len(started)}.py"
        script.write_text(source)
        env = {**os.environ, "CONDUIT_TEST_PASSWORD": PASSWORD, "PYTHONPATH": str(SRC)}
        process = await trio.lowlevel.open_process(
            [sys.executable, str(script), *args], stdout=subprocess.PIPE, env=env
        )
        program = Program(process)
        started.append(program)
        return program

    yield start
    with trio.CancelScope(shield=True), trio.move_on_after(10):
        for program in started:
            with contextlib.suppress(OSError):
                program.process.kill()
            await program.process.wait()


def _proxy_killer(threshold: int, kill: Callable[[], None]) -> Any:
    """A tamper factory: after ``threshold`` client->server bytes, stop forwarding and kill."""
    state = {"forwarded": 0, "done": False}

    def factory(direction: str) -> Any:
        if direction != "c2s":
            return None

        def tamper(chunk: bytes) -> bytes:
            if state["done"]:
                return b""
            state["forwarded"] += len(chunk)
            if state["forwarded"] >= threshold:
                state["done"] = True
                kill()
            return chunk

        return tamper

    return factory


# --------------------------------------------------------------------------- kill -9


@hostile(
    "kill-9-client",
    area="crashes and cuts",
    attack="kill -9 of a client process (a program using the library) in the middle of a "
    "48 MiB upload, then the same program run again",
    behaviour="nothing visible on the server in between (a hidden partial only); the rerun "
    "resumes (resumed_from > 0) and publishes byte-identical data; no partial left",
)
async def test_kill_9_client_mid_upload_then_rerun(
    server_factory: ServerFactory, tmp_path: Path, programs: Any, nursery: trio.Nursery
) -> None:
    storage = tmp_path / "storage"
    transfer = FileTransferHandler(storage_dir=storage)
    server = await server_factory(register=transfer.register_server_handlers)
    source = tmp_path / "big.bin"
    checksum = await trio.to_thread.run_sync(write_random_file, source, 48 * MiB)
    killed = trio.Event()
    client_holder: list[Program] = []

    def kill() -> None:
        client_holder[0].kill9()
        killed.set()

    proxy = TcpProxy(server.port, _proxy_killer(12 * MiB, kill))
    await nursery.start(proxy.run)
    with trio.fail_after(60):
        first = await programs(
            CLIENT_PROGRAM, str(proxy.port), str(source), "big.bin", str(tmp_path / "scratch1")
        )
        client_holder.append(first)
        await first.next_line("CONNECTED")
        await killed.wait()
        assert await first.process.wait() == -9
        await wait_until(lambda: not server.clients, timeout=10)
        assert visible_files(storage) == []
        (partial,) = partial_files(storage)
        assert 0 < partial.stat().st_size < 48 * MiB

        second = await programs(
            CLIENT_PROGRAM, str(server.port), str(source), "big.bin", str(tmp_path / "scratch2")
        )
        line = await second.next_line("RESULT ")
        result = json.loads(line.removeprefix("RESULT "))
        assert await second.process.wait() == 0
    assert result["success"] is True, result
    assert result["resumed_from"] > 0, result
    assert result["checksum"] == checksum
    assert await file_sha256(storage / "big.bin") == checksum
    assert visible_files(storage) == ["big.bin"]
    assert partial_files(storage) == []


@hostile(
    "kill-9-server",
    area="crashes and cuts",
    attack="kill -9 of the server process (storage on disk) in the middle of a 48 MiB upload; "
    "a new server process started on the same directory; the client retries",
    behaviour="the interrupted upload fails cleanly (connection_closed); nothing visible, a "
    "hidden partial kept; the retry resumes (resumed_from > 0), byte-identical, no partial left",
)
async def test_kill_9_server_mid_upload_then_restart(
    client_factory: ClientFactory, tmp_path: Path, programs: Any, nursery: trio.Nursery
) -> None:
    storage = tmp_path / "storage"
    source = tmp_path / "big.bin"
    checksum = await trio.to_thread.run_sync(write_random_file, source, 48 * MiB)
    sender = FileTransferHandler(storage_dir=tmp_path / "client")
    with trio.fail_after(90):
        server = await programs(SERVER_PROGRAM, str(storage))
        port = int((await server.next_line("PORT ")).split()[1])
        proxy = TcpProxy(port, _proxy_killer(12 * MiB, server.kill9))
        await nursery.start(proxy.run)
        # No automatic reconnect: the killed server never comes back on this port, and
        # five reconnect attempts would only add a minute of back-off before the result.
        client = await client_factory(proxy.port, reconnect_enabled=False)
        first = await sender.send_to_server(client, source)
        assert first["success"] is False and first["code"] == "connection_closed", first
        assert await server.process.wait() == -9
        assert visible_files(storage) == []
        (partial,) = partial_files(storage)
        kept = partial.stat().st_size
        assert 0 < kept < 48 * MiB

        restarted = await programs(SERVER_PROGRAM, str(storage))
        port = int((await restarted.next_line("PORT ")).split()[1])
        client = await client_factory(port)
        second = await sender.send_to_server(client, source)
    assert second["success"] is True, second
    assert 0 < second["resumed_from"] <= kept, (second, kept)
    assert second["checksum"] == checksum
    assert await file_sha256(storage / "big.bin") == checksum
    assert visible_files(storage) == ["big.bin"]
    assert partial_files(storage) == []


# --------------------------------------------------------------------------- random cuts

CUT_SEED = 20_240_611
CUT_TRANSFERS = 100
_COLLISION = re.compile(r" \(\d+\)(?=\.bin$)")


@attrs.define
class CutOutcome:
    index: int
    kind: str
    name: str
    size: int
    threshold: int
    result: str


async def _through_cutting_proxy(
    target_port: int, direction: str, threshold: int, run: Callable[[int], Any]
) -> Any:
    """Run ``await run(proxy_port)`` through a proxy that cuts after ``threshold`` bytes."""
    cutter = Cutter(direction, threshold)  # type: ignore[arg-type]
    proxy = TcpProxy(target_port, cutter)
    cutter.proxy = proxy
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        nursery.start_soon(cutter.cut_when_tripped)
        # Captured, so that a failure is not wrapped in the nursery's ExceptionGroup.
        result = await outcome.acapture(run, proxy.port)
        nursery.cancel_scope.cancel()
    return result.unwrap()


@hostile(
    "random-cuts-100",
    area="crashes and cuts",
    attack="100 uploads and downloads (random sizes up to 2 MiB, seeded RNG) through a proxy "
    "that cuts the link after a random number of bytes (anywhere from the handshake to after "
    "the last byte)",
    behaviour="each outcome is a success whose published file is byte-identical, or a clean "
    "failure (a result dict or a ConduitError/OSError); every published file on both sides "
    "hashes to its source; retrying each failure directly completes it",
)
async def test_random_cuts_never_publish_a_corrupt_file(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    rng = random.Random(CUT_SEED)
    storage = tmp_path / "storage"
    downloads = tmp_path / "downloads"
    transfer = FileTransferHandler(storage_dir=storage)
    server = await server_factory(register=transfer.register_server_handlers)
    local = FileTransferHandler(storage_dir=tmp_path / "client-storage")
    sources: dict[str, str] = {}  # name -> sha256 of what the sender had
    plan = []
    for index in range(CUT_TRANSFERS):
        kind = rng.choice(["upload", "download"])
        size = rng.randint(0, 2 * MiB)
        name = f"{kind}-{index}.bin"
        # Bytes of that direction before the cut: from inside the handshake (one in
        # six) to past the end of the data.
        if rng.random() < 1 / 6:
            threshold = rng.randint(1, 600)
        else:
            threshold = rng.randint(1, size + 256 * 1024)
        plan.append((index, kind, name, size, threshold))
        path = (tmp_path / "outbox" / name) if kind == "upload" else (storage / "served" / name)
        sources[name] = await make_file(path, size)
    results: list[CutOutcome] = []

    async def one(index: int, kind: str, name: str, size: int, threshold: int) -> str:
        async def run(port: int) -> dict[str, Any]:
            # Without automatic reconnect: what is checked here is that each cut
            # ends cleanly and a direct retry completes it (the proxy black-holes
            # the direction for good, so a reconnect could never get through).
            client = Client(
                client_descriptor(port, connect_timeout=5, rpc_timeout=10, reconnect_enabled=False)
            )
            try:
                await client.connect()
                if kind == "upload":
                    return await local.send_to_server(
                        client, tmp_path / "outbox" / name, remote_name=f"up/{name}"
                    )
                return await local.receive_from_server(
                    client, f"served/{name}", local_dir=downloads
                )
            finally:
                await client.disconnect()

        direction = "c2s" if kind == "upload" else "s2c"
        try:
            with trio.fail_after(30):
                result = await _through_cutting_proxy(server.port, direction, threshold, run)
        except (ConduitError, OSError) as exc:
            return f"raised {type(exc).__name__}"
        if result["success"]:
            return "success"
        assert set(result) >= {"error", "code"} and result["error"], result
        return f"failed {result['code']}"

    with trio.fail_after(150):
        for index, kind, name, size, threshold in plan:
            what = await one(index, kind, name, size, threshold)
            results.append(CutOutcome(index, kind, name, size, threshold, what))
        summary: dict[str, int] = {}
        for cut in results:
            summary[cut.result] = summary.get(cut.result, 0) + 1
        print(f"\nrandom cuts (seed {CUT_SEED}): {summary}")

        # Nothing corrupt was published anywhere, whatever the outcome.
        await _check_published(storage / "up", sources)
        await _check_published(downloads / "served", sources)
        assert all(
            o.result == "success" or o.result.startswith(("failed", "raised")) for o in results
        )
        assert any(o.result != "success" for o in results), "no cut ever hit a transfer"

        # Nothing lost: every failure completes when retried directly.
        client = Client(client_descriptor(server.port, rpc_timeout=30))
        await client.connect()
        try:
            for cut in results:
                if cut.result == "success":
                    continue
                if cut.kind == "upload":
                    retry = await local.send_to_server(
                        client, tmp_path / "outbox" / cut.name, remote_name=f"up/{cut.name}"
                    )
                else:
                    retry = await local.receive_from_server(
                        client, f"served/{cut.name}", local_dir=downloads
                    )
                assert retry["success"], (cut, retry)
                assert retry["checksum"] == sources[cut.name]
        finally:
            await client.disconnect()
    await _check_published(
        storage / "up", sources, expect_all=[n for _, k, n, _, _ in plan if k == "upload"]
    )
    await _check_published(
        downloads / "served", sources, expect_all=[n for _, k, n, _, _ in plan if k == "download"]
    )


async def _check_published(
    directory: Path, sources: dict[str, str], expect_all: list[str] | None = None
) -> None:
    """Every visible file in ``directory`` hashes to the source it was sent from."""
    names = visible_files(directory)
    for name in names:
        original = _COLLISION.sub("", name)
        assert original in sources, name
        assert await file_sha256(directory / name) == sources[original], f"corrupt: {name}"
    if expect_all is not None:
        assert {_COLLISION.sub("", n) for n in names} == set(expect_all)
        assert partial_files(directory) == []


# --------------------------------------------------------------------------- disk full


def _enospc_after(
    limit: int,
    marker: str,
    real_pwrite: Callable[..., int],
    *,
    vector: bool = False,
    whole_writes: bool = False,
) -> Callable[..., int]:
    """An os.pwrite (``vector``: os.pwritev) that fails with ENOSPC once ``limit``
    bytes went to files named ``marker`` (``whole_writes``: a write that starts
    under ``limit`` goes through whole, so the first one always does)."""
    written = {"bytes": 0}

    def pwrite(fd: int, data: Any, offset: int) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if marker in target:
            size = sum(len(buffer) for buffer in data) if vector else len(data)
            if written["bytes"] >= limit if whole_writes else written["bytes"] + size > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written["bytes"] += size
        return real_pwrite(fd, data, offset)

    return pwrite


@hostile(
    "disk-full-injected",
    area="crashes and cuts",
    attack="ENOSPC injected into the storage layer's os.pwrite after 1 MiB of one 4 MiB upload",
    behaviour="the sender gets success=False, code 'no_space'; the partial file is removed; "
    "an upload of another file at the same moment and the same file once space is back succeed",
)
async def test_disk_full_injected(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "storage"
    transfer = FileTransferHandler(storage_dir=storage)
    server = await server_factory(register=transfer.register_server_handlers)
    client = await client_factory(server)
    sender = FileTransferHandler(storage_dir=tmp_path / "client")
    doomed = tmp_path / "doomed.bin"
    other = tmp_path / "other.bin"
    doomed_sum = await make_file(doomed, 4 * MiB)
    other_sum = await make_file(other, 2 * MiB)
    # The os module conduit.transfer._storage writes with.
    monkeypatch.setattr(os, "pwrite", _enospc_after(1 * MiB, "doomed", os.pwrite))
    # Uploads write their batches with pwritev (PartialFile.write_chunks).
    monkeypatch.setattr(os, "pwritev", _enospc_after(1 * MiB, "doomed", os.pwritev, vector=True))
    results: dict[str, dict[str, Any]] = {}

    async def send(path: Path) -> None:
        results[path.name] = await sender.send_to_server(client, path)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, doomed)
            nursery.start_soon(send, other)
    assert results["doomed.bin"]["success"] is False
    assert results["doomed.bin"]["code"] == "no_space", results["doomed.bin"]
    assert "disk space" in results["doomed.bin"]["error"]
    assert results["other.bin"]["success"] is True, results["other.bin"]
    assert partial_files(storage) == []
    assert visible_files(storage) == ["other.bin"]
    assert await file_sha256(storage / "other.bin") == other_sum
    monkeypatch.undo()
    with trio.fail_after(30):
        again = await sender.send_to_server(client, doomed)
    assert again["success"] is True and again["checksum"] == doomed_sum, again


@hostile(
    "disk-full-download",
    area="crashes and cuts",
    attack="ENOSPC injected into the downloading client's os.pwrite/os.pwritev after 1 MiB "
    "of a 6 MiB download",
    behaviour="the download fails with 'no_space' and keeps its partial file (a prefix of the "
    "file, as many bytes as reached it); once there is room again, the same download resumes "
    "from there and the file is whole",
)
async def test_a_download_the_disk_fills_under_keeps_its_partial_for_a_resume(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "storage"
    served = await make_file(storage / "doomed.bin", 6 * MiB)
    _, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    local = FileTransferHandler(storage_dir=tmp_path / "client")
    downloads = tmp_path / "downloads"
    full = {"whole_writes": True}
    monkeypatch.setattr(os, "pwrite", _enospc_after(1 * MiB, "doomed", os.pwrite, **full))
    monkeypatch.setattr(
        os, "pwritev", _enospc_after(1 * MiB, "doomed", os.pwritev, vector=True, **full)
    )
    with trio.fail_after(30):
        failed = await local.receive_from_server(client, "doomed.bin", local_dir=downloads)
    assert failed["success"] is False and failed["code"] == "no_space", failed
    kept = partial_files(downloads)
    assert len(kept) == 1, kept
    kept_bytes = kept[0].read_bytes()
    assert 1 * MiB <= len(kept_bytes) < 6 * MiB
    assert kept_bytes == (storage / "doomed.bin").read_bytes()[: len(kept_bytes)]
    monkeypatch.undo()
    with trio.fail_after(30):
        again = await local.receive_from_server(client, "doomed.bin", local_dir=downloads)
    assert again["success"] is True, again
    assert again["resumed_from"] == len(kept_bytes)
    assert await file_sha256(downloads / "doomed.bin") == served
    assert partial_files(downloads) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Any:
    """An 8 MiB tmpfs mounted for the test (root only); skipped where mounting is refused."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); "
            "the injected ENOSPC test covers the same path"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


@hostile(
    "disk-full-tmpfs",
    area="crashes and cuts",
    attack="storage on a real 8 MiB tmpfs: a 12 MiB upload, then two 5 MiB uploads at once "
    "(both pass the free-space check, together they do not fit)",
    behaviour="12 MiB: refused before any data with 'no_space'; of the two: every failure is "
    "'no_space' with its partial removed, at least one fails, whatever succeeds is intact; "
    "afterwards a small upload succeeds",
)
async def test_disk_full_on_a_real_tmpfs(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path, small_tmpfs: Path
) -> None:
    storage = small_tmpfs / "storage"
    transfer = FileTransferHandler(storage_dir=storage)
    server = await server_factory(register=transfer.register_server_handlers)
    client = await client_factory(server)
    sender = FileTransferHandler(storage_dir=tmp_path / "client")
    big = tmp_path / "big.bin"
    await make_file(big, 12 * MiB)
    halves = {name: await make_file(tmp_path / name, 5 * MiB) for name in ("a.bin", "b.bin")}
    with trio.fail_after(60):
        refused = await sender.send_to_server(client, big)
        assert refused["success"] is False and refused["code"] == "no_space", refused
        results: dict[str, dict[str, Any]] = {}

        async def send(name: str) -> None:
            results[name] = await sender.send_to_server(client, tmp_path / name)

        async with trio.open_nursery() as nursery:
            for name in halves:
                nursery.start_soon(send, name)
    failures = {n: r for n, r in results.items() if not r["success"]}
    assert failures, results
    assert all(r["code"] == "no_space" for r in failures.values()), results
    assert partial_files(storage) == []
    for name in visible_files(storage):
        assert await file_sha256(storage / name) == halves[name]
    small = tmp_path / "small.bin"
    small_sum = await make_file(small, 64 * 1024)
    with trio.fail_after(30):
        after = await sender.send_to_server(client, small)
    assert after["success"] is True and after["checksum"] == small_sum, after
    assert isinstance(server, Server)
