"""Scenario ``cluster``: a push to a client of another node vs one to a client of the same node.

Two conduit node processes (``tests/cluster/conduit_node.py``) in one cluster
on the real engines the cluster tests use (``weed mini`` for S3, Valkey for
the bus, both on loopback, from ``tests/cluster_engines.py``). The benchmark
process connects one client to node A and one to node B, and a third client
that asks A (an RPC) to ``send_to_client`` a file:

* ``same-node``: to the client of A, the plain local push;
* ``cross-node``: to the client of B: A stages the file in S3, asks B over the
  bus, B fetches it and pushes it to its client, the reply travels back.

The figure is the wall time of that RPC, as the application on A sees it.
Each repetition pushes every size a few times to each target, in
alternating order; the row is the median per repetition, and the ratio
``x same-node`` pairs the two targets of one repetition. Every received file
is checked (SHA-256) and removed.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

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
SIZES = {"quick": (64 * KiB, 4 * MiB), "full": (64 * KiB, 4 * MiB, 64 * MiB)}
PUSHES = {"quick": 3, "full": 10}
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


async def _measure(
    engines: Any,
    helpers: Any,
    root: Path,
    sizes: tuple[int, ...],
    pushes: int,
    repeat: int,
) -> tuple[dict[str, dict[int, list[float]]], list[Any]]:
    """Per target and size, the median push time (s) of each repetition; load averages."""
    sources = {}
    for size in sizes:
        path = root / f"source-{size}.bin"
        path.write_bytes(os.urandom(size))
        sources[size] = (path, hashlib.sha256(path.read_bytes()).hexdigest())
    medians: dict[str, dict[int, list[float]]] = {t: {s: [] for s in sizes} for t in TARGETS}
    loads = []
    async with (
        helpers.node_processes(
            names=["a", "b"],
            bus_url=engines.bus.url,
            namespace=f"bench-{os.getpid()}",
            storage=root / "nodes",
            environment=engines.s3.environment(),
            staging=f"s3://{engines.s3.bucket}/bench-{os.getpid()}",
            ttl=10.0,
        ) as nodes,
        helpers.receiver(nodes["a"].port, root / "inbox-a") as control,
        helpers.receiver(nodes["a"].port, root / "inbox-same") as same,
        helpers.receiver(nodes["b"].port, root / "inbox-cross") as cross,
    ):
        targets = {SAME: same, CROSS: cross}
        for repetition in range(repeat):
            loads.append(load_average())
            log(f"cluster: repetition {repetition + 1}/{repeat}")
            for size in sizes:
                path, digest = sources[size]
                for target in alternating_order(TARGETS, repetition):
                    receiver = targets[target]
                    times = []
                    for push in range(pushes):
                        name = f"r{repetition}-{size}-{push}.bin"
                        started = time.perf_counter()
                        with trio.fail_after(PUSH_TIMEOUT):
                            result = await control.client.call(
                                "push", client_id=receiver.id, path=str(path), name=name
                            )
                        times.append(time.perf_counter() - started)
                        if not result.get("success"):
                            raise RuntimeError(f"{target} push failed: {result}")
                        received = receiver.inbox / name
                        if hashlib.sha256(received.read_bytes()).hexdigest() != digest:
                            raise RuntimeError(f"{target} push delivered other bytes")
                        received.unlink()
                    medians[target][size].append(statistics.median(times))
    return medians, loads


def run(config: RunConfig) -> ScenarioResult:
    """Run the scenario on freshly started engines; an engine that cannot start is reported."""
    started = time.perf_counter()
    sizes = SIZES[config.mode]
    pushes = PUSHES[config.mode]
    contenders: dict[str, dict[str, Any]] = {
        SAME: {"status": "pending", "description": "send_to_client to a client of the same node"},
        CROSS: {
            "status": "pending",
            "description": "send_to_client to a client of another node (staged in S3, bus request)",
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
            medians, loads = trio.run(
                _measure, engines, helpers, root, sizes, pushes, config.repeat
            )
    except Exception as exc:  # engines missing, a node failed: say so, as other scenarios do
        for info in contenders.values():
            info.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
    else:
        for target in TARGETS:
            contenders[target].update(
                status="ok",
                repetitions=[
                    {_size_label(size): medians[target][size][index] for size in sizes}
                    for index in range(config.repeat)
                ],
            )
        for size in sizes:
            group = f"push of {_size_label(size)}"
            reference = medians[SAME][size]
            for target in TARGETS:
                milliseconds = [seconds * 1000 for seconds in medians[target][size]]
                rows.append(
                    Row(
                        group=group,
                        metric="wall time",
                        unit="ms",
                        contender=target,
                        stats=spread(milliseconds),
                        ratios={f"x {SAME}": paired_ratio(medians[target][size], reference)},
                    )
                )
    return ScenarioResult(
        name=NAME,
        config={
            "mode": config.mode,
            "repeat": config.repeat,
            "sizes": [_size_label(size) for size in sizes],
            "pushes_per_repetition": pushes,
            "order": "alternating: forward on even repetitions, reversed on odd ones",
            "load_average_per_repetition": loads,
        },
        contenders=contenders,
        rows=rows,
        ratio_columns=[f"x {SAME}"],
        notes=list(NOTES),
        duration_s=time.perf_counter() - started,
    )
