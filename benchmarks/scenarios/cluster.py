"""Scenario ``cluster``: cross-node vs same-node pushes; the S3 store vs the local store.

Three conduit node processes (``tests/cluster/conduit_node.py``) in one cluster
on the real engines the cluster tests use (``weed mini`` for S3, Valkey for
the bus, both on loopback, from ``tests/cluster_engines.py``).

Pushes. The benchmark process connects one client to node A and one to node
B, and a third client that asks A (an RPC) to ``send_to_client`` a file:

* ``same-node``: to the client of A, the plain local push;
* ``cross-node``: to the client of B: A stages the file in S3, asks B over the
  bus, B fetches it and pushes it to its client, the reply travels back.

The figure is the wall time of that RPC, as the application on A sees it.
Each repetition pushes every size a few times to each target, in
alternating order; the row is the median per repetition, and the ratio
``x same-node`` pairs the two targets of one repetition. Every received file
is checked (SHA-256) and removed.

Stores. Node A's handler keeps files in a local directory
(``FileTransferHandler(storage_dir=PATH)``), node S's in S3
(``storage_dir="s3://BUCKET/PREFIX"``, the same SeaweedFS). A client of
each uploads a file (``send_to_server``) and downloads it back
(``receive_from_server``), in alternating order; the figure is the
throughput, file size over wall time, median per repetition, and ``x local
store`` pairs the two stores of one repetition. Every download is checked
(SHA-256) and removed.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from .._harness import (
    REPO_ROOT,
    Row,
    RunConfig,
    ScenarioResult,
    alternating_order,
    log,
    paired_ratio,
    spread,
)
from ._transfer import MiB, load_average, scratch_dir

NAME = "cluster"
KiB = 1024
SAME, CROSS = "same-node", "cross-node"
TARGETS = (SAME, CROSS)
LOCAL, S3 = "local store", "S3 store"
STORES = (LOCAL, S3)
UPLOAD, DOWNLOAD = "upload", "download"
SIZES = {"quick": (64 * KiB, 4 * MiB), "full": (64 * KiB, 4 * MiB, 64 * MiB)}
PUSHES = {"quick": 3, "full": 10}
#: File size of the store comparison, and transfers each way per repetition.
STORE_SIZE = {"quick": 32 * MiB, "full": 256 * MiB}
STORE_TRANSFERS = {"quick": 2, "full": 3}
#: Bound on one push (staging a large file through S3 on a loaded machine).
PUSH_TIMEOUT = 300.0
NOTES = (
    "Wall time of transfer.send_to_client on node A, seen by the application "
    "(an RPC into A): same-node is the local push; cross-node stages the file in "
    "S3 (SeaweedFS on loopback), asks node B over the Valkey bus, and B fetches "
    "and pushes it.",
    "Cross-node moves the bytes three more times (to S3, from S3, through a "
    "temporary file on B), so its cost grows with size; small files show the "
    "fixed cost (bus round trip, S3 requests).",
    "Stores: upload / download throughput of one client through a node whose "
    "FileTransferHandler keeps files in a local directory vs one that keeps them in "
    "S3 (a multipart upload of 8 MiB parts, each with its SHA-256 and an update of "
    "the upload's state object; downloads stream one GET), same engines. The "
    "client's upload includes the server's publish (CompleteMultipartUpload).",
    "Engines, nodes and clients share this machine's cores, with other jobs.",
)


def _size_label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def _import_helpers() -> tuple[Any, Any]:
    """The engines and node helpers of the cluster tests (a source checkout has them)."""
    tests = str(REPO_ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import cluster_engines
    from cluster import node_processes

    return cluster_engines, node_processes


@attrs.define
class _Measured:
    """What one run measured, per repetition."""

    #: target -> size -> median push time (s).
    pushes: dict[str, dict[int, list[float]]]
    #: store -> direction -> median throughput (MiB/s).
    stores: dict[str, dict[str, list[float]]]
    loads: list[Any] = attrs.field(factory=list)


def _source(root: Path, size: int) -> tuple[Path, str]:
    path = root / f"source-{size}.bin"
    path.write_bytes(os.urandom(size))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


async def _push_round(
    control: Any, targets: dict[str, Any], target: str, source: tuple[Path, str], label: str
) -> float:
    """Wall time (s) of one push of ``source``, asked of node A, to the client ``target``."""
    path, digest = source
    receiver = targets[target]
    name = f"{label}.bin"
    started = time.perf_counter()
    with trio.fail_after(PUSH_TIMEOUT):
        result = await control.client.call("push", client_id=receiver.id, path=str(path), name=name)
    elapsed = time.perf_counter() - started
    if not result.get("success"):
        raise RuntimeError(f"{target} push failed: {result}")
    received = receiver.inbox / name
    if hashlib.sha256(received.read_bytes()).hexdigest() != digest:
        raise RuntimeError(f"{target} push delivered other bytes")
    received.unlink()
    return elapsed


async def _store_round(
    client: Any, transfer: Any, store: str, source: tuple[Path, str], label: str, downloads: Path
) -> dict[str, float]:
    """One upload and one download of ``source`` through the node of ``store``: MiB/s each."""
    path, digest = source
    size = path.stat().st_size
    name = f"{label}.bin"
    figures = {}
    started = time.perf_counter()
    with trio.fail_after(PUSH_TIMEOUT):
        result = await transfer.send_to_server(client, path, remote_name=name)
    figures[UPLOAD] = size / MiB / (time.perf_counter() - started)
    if not result.get("success") or result.get("checksum") != digest:
        raise RuntimeError(f"upload to the {store} failed: {result}")
    started = time.perf_counter()
    with trio.fail_after(PUSH_TIMEOUT):
        result = await transfer.receive_from_server(client, name, downloads)
    figures[DOWNLOAD] = size / MiB / (time.perf_counter() - started)
    received = downloads / name
    if not result.get("success") or result.get("skipped"):
        raise RuntimeError(f"download from the {store} failed: {result}")
    if hashlib.sha256(received.read_bytes()).hexdigest() != digest:
        raise RuntimeError(f"download from the {store} delivered other bytes")
    received.unlink()
    return figures


async def _measure(engines: Any, helpers: Any, root: Path, mode: str, repeat: int) -> _Measured:
    """Pushes and store transfers, each repetition in alternating order."""
    from conduit import FileTransferHandler

    sizes, pushes = SIZES[mode], PUSHES[mode]
    sources = {size: _source(root, size) for size in sizes}
    store_source = _source(root, STORE_SIZE[mode])
    measured = _Measured(
        pushes={target: {size: [] for size in sizes} for target in TARGETS},
        stores={store: {UPLOAD: [], DOWNLOAD: []} for store in STORES},
    )
    prefix = f"s3://{engines.s3.bucket}/bench-{os.getpid()}"
    async with (
        helpers.node_processes(
            names=["a", "b", "s"],
            bus_url=engines.bus.url,
            namespace=f"bench-{os.getpid()}",
            storage=root / "nodes",
            environment=engines.s3.environment(),
            staging=prefix,
            ttl=10.0,
            storages={"s": f"{prefix}/files"},
        ) as nodes,
        helpers.receiver(nodes["a"].port, root / "inbox-a") as control,
        helpers.receiver(nodes["a"].port, root / "inbox-same") as same,
        helpers.receiver(nodes["b"].port, root / "inbox-cross") as cross,
        helpers.receiver(nodes["s"].port, root / "inbox-s") as on_s3,
    ):
        targets = {SAME: same, CROSS: cross}
        clients = {LOCAL: control.client, S3: on_s3.client}
        transfer = FileTransferHandler(storage_dir=root / "client")
        downloads = root / "downloads"
        for repetition in range(repeat):
            measured.loads.append(load_average())
            log(f"cluster: repetition {repetition + 1}/{repeat}")
            for size in sizes:
                for target in alternating_order(TARGETS, repetition):
                    times = [
                        await _push_round(
                            control, targets, target, sources[size], f"r{repetition}-{size}-{i}"
                        )
                        for i in range(pushes)
                    ]
                    measured.pushes[target][size].append(statistics.median(times))
            for store in alternating_order(STORES, repetition):
                rounds = [
                    await _store_round(
                        clients[store],
                        transfer,
                        store,
                        store_source,
                        f"store-r{repetition}-{i}",
                        downloads,
                    )
                    for i in range(STORE_TRANSFERS[mode])
                ]
                for direction in (UPLOAD, DOWNLOAD):
                    measured.stores[store][direction].append(
                        statistics.median(figures[direction] for figures in rounds)
                    )
    return measured


def _push_rows(measured: _Measured, sizes: tuple[int, ...]) -> list[Row]:
    rows = []
    for size in sizes:
        group = f"push of {_size_label(size)}"
        reference = measured.pushes[SAME][size]
        for target in TARGETS:
            milliseconds = [seconds * 1000 for seconds in measured.pushes[target][size]]
            rows.append(
                Row(
                    group=group,
                    metric="wall time",
                    unit="ms",
                    contender=target,
                    stats=spread(milliseconds),
                    ratios={f"x {SAME}": paired_ratio(measured.pushes[target][size], reference)},
                )
            )
    return rows


def _store_rows(measured: _Measured, size: int) -> list[Row]:
    rows = []
    for direction in (UPLOAD, DOWNLOAD):
        reference = measured.stores[LOCAL][direction]
        for store in STORES:
            values = measured.stores[store][direction]
            rows.append(
                Row(
                    group=f"{direction} of {_size_label(size)}",
                    metric="throughput",
                    unit="MiB/s",
                    contender=store,
                    stats=spread(values),
                    ratios={f"x {LOCAL}": paired_ratio(values, reference)},
                    better="higher",
                )
            )
    return rows


def run(config: RunConfig) -> ScenarioResult:
    """Run the scenario on freshly started engines; an engine that cannot start is reported."""
    started = time.perf_counter()
    sizes = SIZES[config.mode]
    store_size = STORE_SIZE[config.mode]
    contenders: dict[str, dict[str, Any]] = {
        SAME: {"status": "pending", "description": "send_to_client to a client of the same node"},
        CROSS: {
            "status": "pending",
            "description": "send_to_client to a client of another node (staged in S3, bus request)",
        },
        LOCAL: {
            "status": "pending",
            "description": "upload and download through a node storing in a local directory",
        },
        S3: {
            "status": "pending",
            "description": "upload and download through a node storing in S3 (storage_dir=s3://)",
        },
    }
    rows: list[Row] = []
    loads: list[Any] = []
    try:
        engines_module, helpers = _import_helpers()
        with (
            scratch_dir(config, NAME) as (root, _where),
            engines_module.running_engines() as engines,
        ):
            measured = trio.run(_measure, engines, helpers, root, config.mode, config.repeat)
    except Exception as exc:  # engines missing, a node failed: say so, as other scenarios do
        for info in contenders.values():
            info.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
    else:
        loads = measured.loads
        for target in TARGETS:
            contenders[target].update(
                status="ok",
                repetitions=[
                    {_size_label(size): measured.pushes[target][size][index] for size in sizes}
                    for index in range(config.repeat)
                ],
            )
        for store in STORES:
            contenders[store].update(
                status="ok",
                repetitions=[
                    {
                        f"{direction} MiB/s": measured.stores[store][direction][index]
                        for direction in (UPLOAD, DOWNLOAD)
                    }
                    for index in range(config.repeat)
                ],
            )
        rows = _push_rows(measured, sizes) + _store_rows(measured, store_size)
    return ScenarioResult(
        name=NAME,
        config={
            "mode": config.mode,
            "repeat": config.repeat,
            "sizes": [_size_label(size) for size in sizes],
            "pushes_per_repetition": PUSHES[config.mode],
            "store_file_size": _size_label(store_size),
            "store_transfers_per_repetition": STORE_TRANSFERS[config.mode],
            "order": "alternating: forward on even repetitions, reversed on odd ones",
            "load_average_per_repetition": loads,
        },
        contenders=contenders,
        rows=rows,
        ratio_columns=[f"x {SAME}", f"x {LOCAL}"],
        notes=list(NOTES),
        duration_s=time.perf_counter() - started,
    )
