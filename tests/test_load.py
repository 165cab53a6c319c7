"""Load: 200 concurrent clients, 10 verified uploads each, RPCs in between, nothing leaked.

The shape of the issue's load test, with the volume bounded for a 2-core CI
machine: 200 clients connect at once (Trio, in this process), each uploads 10
files and downloads one back while making RPCs. File sizes are random up to
256 KiB (seeded), not up to 8 MiB: 2,000 transfers of ~128 KiB on average, about
250 MiB through the server, instead of ~8 GiB. Every published file is checked
against the SHA-256 of its source, every download against the server's file.

Storage is RAM-backed (``/dev/shm`` when present) like the reference numbers in
ARCHITECTURE.md, so 2,000 fsyncs measure conduit, not this VM's disk.

Before and after, with the server still running: no descriptor opened during
the run is still open (``/proc/self/fd``), Trio's tasks (a walk of the task tree
from ``trio.lowlevel.current_root_task()``) return to their baseline, and no partial
file is left anywhere. The RPC round-trip p99 under this load is printed, never
asserted.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from conduit import Client, FileTransferHandler, _heartbeats
from conftest import ServerFactory, client_descriptor, open_descriptors, opened_since
from hostile_helpers import hostile, settle, trio_task_count, trio_task_names
from transfer_helpers import partial_files, visible_files

CLIENTS = 200
FILES_PER_CLIENT = 10
MAX_SIZE = 256 * 1024
POOL = 120  # distinct source files; each client picks 10 of them
RPCS_PER_FILE = 3
SEED = 4242


@pytest.fixture
def ram_dir(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory in RAM when the machine has /dev/shm, else under tmp_path."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="conduit-load-", dir="/dev/shm"))
    else:
        path = tmp_path / "ram"
        path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _make_pool(directory: Path, rng: random.Random) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for index in range(POOL):
        data = rng.randbytes(rng.randint(0, MAX_SIZE))
        name = f"src-{index}.bin"
        (directory / name).write_bytes(data)
        checksums[name] = hashlib.sha256(data).hexdigest()
    return checksums


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@hostile(
    "load-200-clients",
    area="load",
    attack="200 clients at once, each uploading 10 files (random sizes up to 256 KiB, "
    "seeded; ~250 MiB in all), downloading one back, with 3 RPCs per file",
    behaviour="every upload and download verified by SHA-256 against its source; no partial "
    "files; descriptors and Trio tasks back to their baseline; RPC p99 printed (not asserted)",
)
async def test_two_hundred_clients_upload_concurrently(
    server_factory: ServerFactory, ram_dir: Path
) -> None:
    rng = random.Random(SEED)
    sources = ram_dir / "sources"
    storage = ram_dir / "storage"
    checksums = await trio.to_thread.run_sync(_make_pool, sources, rng)
    transfer = FileTransferHandler(storage_dir=storage)

    async def echo(value: Any) -> Any:
        return value

    def register(server: Any) -> None:
        transfer.register_server_handlers(server)
        server.register_rpc(echo, "echo")

    server = await server_factory(register=register, auth_timeout=120)
    plans = [rng.sample(sorted(checksums), FILES_PER_CLIENT) for _ in range(CLIENTS)]
    # The clients' heartbeat timer is one task per run and interval, not one
    # per connection (conduit._heartbeats.shared): in the baseline.
    _heartbeats.shared(client_descriptor(server.port).heartbeat_interval)
    await trio.sleep(0.1)
    fds_before, tasks_before = open_descriptors(), trio_task_count()
    names_before = trio_task_names()
    latencies: list[float] = []
    problems: list[str] = []
    uploaded: dict[str, str] = {}  # published name -> expected checksum
    connecting = trio.Semaphore(25)

    async def one_client(index: int, plan: list[str]) -> None:
        client = Client(client_descriptor(server.port, connect_timeout=120, rpc_timeout=60))
        local = FileTransferHandler(storage_dir=ram_dir / "client-scratch")
        async with connecting:
            await client.connect()
        try:
            for number, source in enumerate(plan):
                for call in range(RPCS_PER_FILE):
                    start = time.perf_counter()
                    value = await client.call("echo", value=[index, number, call])
                    latencies.append(time.perf_counter() - start)
                    if value != [index, number, call]:
                        problems.append(f"client {index}: echo returned {value!r}")
                name = f"c{index:03d}/{number}-{source}"
                result = await local.send_to_server(client, sources / source, remote_name=name)
                if not result["success"] or result["checksum"] != checksums[source]:
                    problems.append(f"client {index}: upload {name}: {result}")
                else:
                    uploaded[result["path"]] = checksums[source]
            back = f"c{index:03d}/0-{plan[0]}"
            result = await local.receive_from_server(
                client, back, local_dir=ram_dir / "downloads" / f"c{index:03d}"
            )
            if not result["success"] or result["checksum"] != checksums[plan[0]]:
                problems.append(f"client {index}: download {back}: {result}")
            elif await trio.to_thread.run_sync(_sha256, Path(result["path"])) != checksums[plan[0]]:
                problems.append(f"client {index}: downloaded bytes differ for {back}")
        finally:
            await client.disconnect()

    started = time.perf_counter()
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery:
            for index, plan in enumerate(plans):
                nursery.start_soon(one_client, index, plan)
    elapsed = time.perf_counter() - started
    assert problems == [], problems[:20]
    assert len(uploaded) == CLIENTS * FILES_PER_CLIENT

    # Every published byte, re-read from disk, is what its sender had.
    def verify() -> list[str]:
        bad = [name for name, digest in uploaded.items() if _sha256(storage / name) != digest]
        listed = set(visible_files(storage))
        if listed != set(uploaded):
            bad.append(f"listing differs: {sorted(listed ^ set(uploaded))[:10]}")
        return bad

    assert await trio.to_thread.run_sync(verify) == []
    assert partial_files(storage) == []
    assert partial_files(ram_dir / "downloads") == []
    total = sum((storage / name).stat().st_size for name in uploaded)

    # Back to the baseline: only the server remains.
    await settle(lambda: not server.clients and server._open_sockets == 0)
    assert await settle(
        lambda: not opened_since(fds_before) and trio_task_count() <= tasks_before
    ), (
        opened_since(fds_before),
        sorted(set(trio_task_names()) - set(names_before)),
    )
    print(
        f"\nload: {CLIENTS} clients, {len(uploaded)} uploads + {CLIENTS} downloads, "
        f"{total / 2**20:.0f} MiB in {elapsed:.1f}s; {len(latencies)} RPCs, "
        f"p50 {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms, "
        f"p99 {_p99(latencies) * 1000:.1f} ms"
    )
