"""Scenario ``hol``: head-of-line blocking -- RPC latency on a connection busy with a bulk upload.

One client process per repetition and contender, one connection:

1. ``idle``: sequential ~100-byte ``echo`` calls on the idle connection (the
   baseline);
2. ``during upload``: the same calls, back to back, from a second task while a
   bulk upload (128 MiB quick, 1 GiB full) runs on the *same* connection; the
   loop stops when the upload returns. Of these, the calls that started while
   the upload's data flowed (from its first progress report to its last one
   below 100 %: see ``peers/_transferlib.DataWindow``) are reported again on
   their own, ``during data``: the begin's round trip and the server's
   verify, fsync and publish would otherwise dilute the tail with calls that
   met no data. The goal is on those.

conduit's writer sends control frames (calls, results, credit) before queued
data frames, and seals at most ~1 MiB per record, so a call should wait for at
most about one record on each side. netconduit (one RPC per base64 chunk,
served inline in its read loop) is measured the same way with its own API.
Uploaded files are verified (SHA-256) against the source and removed.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from .._harness import PeerError, RunConfig, ScenarioResult, ServerProcess, alternating_order, log
from ._transfer import (
    Contender,
    GiB,
    Metric,
    MiB,
    Peers,
    Repetitions,
    build_rows,
    clear_dir,
    goal,
    load_average,
    make_source,
    median_of,
    scratch_dir,
    slug,
    verify,
)
from .bulk import size_label

NAME = "hol"
SIZES = {"quick": 128 * MiB, "full": GiB}
IDLE_CALLS = {"quick": 300, "full": 2000}
CLIENT_TIMEOUT = {"quick": 180.0, "full": 900.0}
FILE_NAME = "hol.bin"
REFERENCE = "conduit-trio"

CONTENDERS = (
    Contender(
        "conduit-trio",
        "conduit (this tree): echo RPCs + FileTransferHandler upload on one connection, Trio",
        "conduit_transfer.py",
    ),
    Contender(
        "netconduit",
        "netconduit 5.0.0: echo RPCs + its FileTransferHandler upload on one connection",
        "netconduit_transfer.py",
        venv="netconduit",
    ),
)

NOTES = [
    "latency = one echo call (~100-byte payload) measured in the client "
    "(time.perf_counter_ns), calls issued back to back by one task; 'during upload' "
    "calls run on the same connection as the upload, from another task, until it returns",
    "'while its data flows': the calls of 'during upload' that started between the "
    "upload's first progress report and its last one below 100 % (conduit reports at most "
    "every 0.1 s while it sends, and 100 % only once the upload returns; netconduit after "
    "each chunk's answer), so neither the begin's round trip nor the server's verify, "
    "fsync and publish dilute them; the goal is on these",
    "upload throughput is with the RPC loop running beside it (compare with `bulk`)",
    "ratio column: contender / conduit-trio, per repetition",
    "both peers share 2 vCPUs with each other and with whatever else runs on the machine: "
    "tail latencies move with the load (see load_average in the config)",
]


def _get(section: str, key: str) -> Any:
    def getter(record: dict[str, Any]) -> Any:
        return record["hol"][section][key]

    return getter


def _ms(section: str, key: str) -> Any:
    def getter(record: dict[str, Any]) -> Any:
        return record["hol"][section][key] / 1000.0

    return getter


class _Runner:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.size = SIZES[config.mode]
        self.peers = Peers(NAME, config, CONTENDERS)
        self.repetitions: Repetitions = {c.name: [] for c in CONTENDERS}
        self.where: dict[str, Any] = {}
        self.loads: list[list[float] | None] = []

    def repetition(
        self, name: str, server: ServerProcess, storage: Path, source: Path, digest: str
    ) -> dict[str, Any]:
        spec = {
            "kind": "hol",
            "path": str(source),
            "name": FILE_NAME,
            "payload_size": 100,
            "warmup": 50,
            "idle_calls": IDLE_CALLS[self.config.mode],
        }
        try:
            result = self.peers.client(name, server, spec, CLIENT_TIMEOUT[self.config.mode])
            verify(storage / result["hol"]["upload"]["result"]["path"], digest, f"{name} upload")
            if result["hol"]["during_data"] is None:
                raise PeerError(f"{name}: no RPC started while the upload's data flowed")
        finally:
            clear_dir(storage)
        return result

    def run(self) -> None:
        self.peers.prepare()
        with scratch_dir(self.config, NAME) as (root, where):
            self.where = where
            source = root / "source" / FILE_NAME
            digest = make_source(source, self.size)
            with contextlib.ExitStack() as stack:
                servers: dict[str, tuple[ServerProcess, Path]] = {}
                for name in self.peers.pending():
                    storage = root / f"server-{slug(name)}"
                    clear_dir(storage)
                    try:
                        server = stack.enter_context(
                            self.peers.server(name, {"storage": str(storage)})
                        )
                    except PeerError as exc:
                        self.peers.fail(name, "failed", str(exc))
                        continue
                    servers[name] = (server, storage)
                running = [name for name in self.peers.pending() if name in servers]
                for repetition in range(self.config.repeat):
                    self.loads.append(load_average())
                    for name in alternating_order(running, repetition):
                        if self.peers.status[name]["status"] != "pending":
                            continue
                        log(f"hol: repetition {repetition + 1}/{self.config.repeat}: {name}")
                        server, storage = servers[name]
                        try:
                            self.repetitions[name].append(
                                self.repetition(name, server, storage, source, digest)
                            )
                        except PeerError as exc:
                            self.peers.fail(
                                name,
                                "failed",
                                f"repetition {repetition + 1}: {exc}\n"
                                f"server stderr:\n{server.stderr_tail()}",
                            )
        self.peers.finish(self.repetitions)


def run(config: RunConfig) -> ScenarioResult:
    """Run the scenario: one server per contender, alternating client repetitions."""
    started = time.perf_counter()
    runner = _Runner(config)
    runner.run()
    measured = runner.peers.measured()
    usable = {name: runner.repetitions[name] for name in measured}
    label = size_label(runner.size)
    idle_group = "RPC on an idle connection"
    busy_group = f"RPC during a {label} upload, same connection"
    data_group = f"RPC while the {label} upload's data flows, same connection"
    layout = [
        Metric(idle_group, "p50", "ms", "lower", _ms("idle", "p50_us")),
        Metric(idle_group, "p99", "ms", "lower", _ms("idle", "p99_us")),
        Metric(idle_group, "max", "ms", "lower", _ms("idle", "max_us")),
        Metric(busy_group, "p50", "ms", "lower", _ms("during_upload", "p50_us")),
        Metric(busy_group, "p99", "ms", "lower", _ms("during_upload", "p99_us")),
        Metric(busy_group, "max", "ms", "lower", _ms("during_upload", "max_us")),
        Metric(busy_group, "calls completed", "calls", "higher", _get("during_upload", "calls")),
        Metric(busy_group, "upload throughput", "MB/s", "higher", _get("upload", "mb_per_s")),
        Metric(data_group, "p50", "ms", "lower", _ms("during_data", "p50_us")),
        Metric(data_group, "p99", "ms", "lower", _ms("during_data", "p99_us")),
        Metric(data_group, "max", "ms", "lower", _ms("during_data", "max_us")),
        Metric(data_group, "calls completed", "calls", "higher", _get("during_data", "calls")),
    ]
    goals = [
        goal(
            f"conduit-trio RPC p99 < 20 ms while a {label} upload's data flows on the same "
            "connection",
            median_of(usable, REFERENCE, _ms("during_data", "p99_us")),
            20.0,
            at_most=True,
            unit="ms",
        )
    ]
    return ScenarioResult(
        name=NAME,
        config={
            "mode": config.mode,
            "repeat": config.repeat,
            "upload_bytes": runner.size,
            "upload_size": label,
            "idle_calls": IDLE_CALLS[config.mode],
            "payload_bytes": 100,
            "files": runner.where,
            "order": "alternating: forward on even repetitions, reversed on odd ones",
            "load_average_per_repetition": runner.loads,
        },
        contenders=runner.peers.status,
        rows=build_rows(usable, measured, layout, {f"x {REFERENCE}": REFERENCE}),
        ratio_columns=[f"x {REFERENCE}"],
        goals=goals,
        notes=list(NOTES),
        duration_s=time.perf_counter() - started,
    )
