"""Scenario ``memory``: server memory while receiving a large upload, and per idle connection.

Part 1, **upload**: a fresh server per measurement (``VmHWM``, the kernel's
peak-RSS mark, cannot be reset) receives one upload from a client in another
process. The orchestrator reads the server's RSS once it listens (baseline),
samples ``VmRSS`` from ``/proc/<pid>/status`` every 20 ms during the upload, and
reads ``VmHWM`` at the end. Two file sizes (64 MiB and 256 MiB quick; 1 GiB and
4 GiB full) show whether memory is flat in the file size. Contenders:
``conduit-trio`` (the goal: peak <= 100 MiB), ``raw-aead`` (the same-work
reference from ``bulk``: the floor of a Python process doing it) and
``netconduit`` (the smaller size only: it moves ~0.15-0.2 GB/s).

Part 2, **idle connections**: one fresh server per repetition; a warm-up
client process holds 8 connections (so one-time costs are paid), the server's
RSS is read, then client processes open N more authenticated connections
(1000 full, 100 quick; a few processes with many ``Client`` objects each) and
hold them; the RSS is read again once all report ``READY`` and the server has
settled, and the server's own count of its established connections (from
``/proc``) must match what the clients hold. KiB per connection = growth / N
(goal <= 64 KiB).

Uploaded files are verified (SHA-256) against the source and removed.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from .._harness import (
    HoldingProcess,
    PeerError,
    RssSampler,
    RunConfig,
    ScenarioResult,
    alternating_order,
    established_connections,
    log,
    memory_kib,
)
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

NAME = "memory"
SIZES = {"quick": (64 * MiB, 256 * MiB), "full": (GiB, 4 * GiB)}
CONNECTIONS = {"quick": 100, "full": 1000}
HOLDER_PROCESSES = {"quick": 2, "full": 4}
#: Connects each holder process runs at once. Four processes of four stay
#: within a conduit server's ``max_unauthenticated_per_address`` (32): the
#: server confirms first, so a ``connect()`` returns before the server has
#: checked that client's confirmation and an opener's next socket can arrive
#: while its last one still holds a slot.
OPENERS_PER_HOLDER = 4
WARMUP_CONNECTIONS = 8
CLIENT_TIMEOUT = {"quick": 180.0, "full": 900.0}
HOLD_TIMEOUT = {"quick": 120.0, "full": 600.0}
SETTLE_S = 0.2
FILE_NAME = "memory.bin"

UPLOAD_CONTENDERS = (
    Contender(
        "conduit-trio",
        "conduit (this tree) server on Trio; client on Trio in another process",
        "conduit_transfer.py",
    ),
    Contender(
        "raw-aead",
        "raw-socket reference server (blocking, thread per connection, 1 MiB AES-GCM records)",
        "raw_reference.py",
        client_spec={"aead": True, "record": MiB},
    ),
    Contender(
        "netconduit",
        "netconduit 5.0.0 server (asyncio), private venv; smaller size only",
        "netconduit_transfer.py",
        venv="netconduit",
    ),
)
SMALL_ONLY = {"netconduit"}
IDLE_CONTENDERS = ("conduit-trio", "netconduit")

NOTES = [
    "peak RSS = VmHWM of the server process at the end of the upload (it includes the "
    "interpreter, imports and the listening server); process peak RSS = the larger of that "
    "and the VmHWM after the first connection (below): the process's peak over its whole "
    "life, what a memory limit must allow; sampled peak = largest VmRSS seen every 20 ms; "
    "growth = peak - RSS before the upload",
    "one fresh server process per measurement; one connection (connect, authenticate, "
    "close) before the upload, then VmHWM is reset (/proc/PID/clear_refs): the one-time "
    "costs before it, above all conduit's Argon2id stretch of the shared password when "
    "the server starts (64 MiB for ~0.07 s, once per server process, before it serves), are "
    "not the upload's; they are in the process peak (and in the JSON record, "
    "first_handshake_peak_rss_mib)",
    "files live on tmpfs (/dev/shm) unless --disk: page-cache/tmpfs pages are not counted "
    "in a process's RSS unless it maps them, and no contender maps the file",
    "idle connections: KiB per connection = (server VmRSS with N more connections held - "
    "VmRSS with the 8 warm-up connections) / N, after a 0.2 s settle",
    "netconduit is measured at the smaller upload size only (about 0.15-0.2 GB/s)",
]


def _upload_getter(label: str, key: str) -> Any:
    def getter(record: dict[str, Any]) -> Any:
        return record["upload"][label][key]

    return getter


def _idle_getter(key: str) -> Any:
    def getter(record: dict[str, Any]) -> Any:
        return record["idle"][key]

    return getter


def reset_peak_rss(pid: int | None) -> bool:
    """Reset the kernel's peak RSS (VmHWM) of ``pid``; whether it could (Linux)."""
    if pid is None:
        return False
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _Runner:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.sizes = SIZES[config.mode]
        self.connections = CONNECTIONS[config.mode]
        self.holders = HOLDER_PROCESSES[config.mode]
        self.peers = Peers(NAME, config, UPLOAD_CONTENDERS)
        self.records: Repetitions = {
            c.name: [{} for _ in range(config.repeat)] for c in UPLOAD_CONTENDERS
        }
        self.where: dict[str, Any] = {}
        self.loads: list[list[float] | None] = []

    def _record(self, name: str, repetition: int) -> dict[str, Any]:
        return self.records[name][repetition]

    def upload_once(
        self, name: str, root: Path, source: Path, digest: str, label: str
    ) -> dict[str, Any]:
        storage = root / f"server-{slug(name)}"
        clear_dir(storage)
        timeout = CLIENT_TIMEOUT[self.config.mode]
        spec = {
            "kind": "transfer",
            "ops": [{"op": "upload", "path": str(source), "name": FILE_NAME}],
        }
        try:
            with self.peers.server(name, {"storage": str(storage)}) as server:
                # One connection first: the one-time costs come before it ends
                # (conduit's Argon2id stretch of the shared password, when the
                # server starts: 64 MiB, once per process, freed at once),
                # reported apart from the upload.
                self.peers.client(name, server, {"kind": "transfer", "ops": []}, timeout)
                time.sleep(0.1)
                first_handshake = memory_kib(server.pid).get("VmHWM")
                peak_was_reset = reset_peak_rss(server.pid)
                baseline = memory_kib(server.pid)
                with RssSampler(server.pid) as sampler:
                    result = self.peers.client(name, server, spec, timeout)
                final = memory_kib(server.pid)
                server.check_alive()
            (op,) = result["ops"]
            verify(storage / op["result"]["path"], digest, f"{name} upload ({label})")
        finally:
            clear_dir(storage)
        peak = final.get("VmHWM")
        base = baseline.get("VmRSS")
        return {
            "bytes": op["bytes"],
            "mb_per_s": op["mb_per_s"],
            "baseline_rss_mib": None if base is None else base / 1024,
            "peak_rss_mib": None if peak is None else peak / 1024,
            "sampled_peak_rss_mib": None if sampler.peak_kib is None else sampler.peak_kib / 1024,
            "growth_mib": None if peak is None or base is None else (peak - base) / 1024,
            "first_handshake_peak_rss_mib": None
            if first_handshake is None
            else first_handshake / 1024,
            # The process's own peak over its whole life, the first
            # handshake's stretch included: what a memory limit must allow.
            "process_peak_rss_mib": None
            if peak is None or first_handshake is None
            else max(peak, first_handshake) / 1024,
            "peak_reset_after_first_handshake": peak_was_reset,
            "samples": len(sampler.samples),
        }

    def idle_once(self, name: str, root: Path) -> dict[str, Any]:
        storage = root / f"idle-{slug(name)}"
        clear_dir(storage)
        timeout = HOLD_TIMEOUT[self.config.mode]
        per_process = [
            self.connections // self.holders + (1 if i < self.connections % self.holders else 0)
            for i in range(self.holders)
        ]
        # All from this machine's one address: its share must be the whole server.
        limit = self.connections + 100
        spec = {
            "storage": str(storage),
            "max_connections": limit,
            "max_connections_per_user": limit,
        }
        with self.peers.server(name, spec) as server, contextlib.ExitStack() as stack:
            warmup = stack.enter_context(
                self.peers.holder(
                    name, server.port, {"kind": "idle", "connections": WARMUP_CONNECTIONS}, timeout
                )
            )
            time.sleep(SETTLE_S)
            before = memory_kib(server.pid)
            started = time.perf_counter()
            holders = [
                self.peers.holder(
                    name,
                    server.port,
                    {"kind": "idle", "connections": n, "parallel": OPENERS_PER_HOLDER},
                    timeout,
                )
                for n in per_process
            ]
            HoldingProcess.start_all(holders, stack)
            opened = time.perf_counter() - started
            time.sleep(SETTLE_S)
            after = memory_kib(server.pid)
            on_server = (
                None if server.pid is None else established_connections(server.pid, server.port)
            )
            server.check_alive()
        held = sum(int(h.ready["connections"]) for h in holders)
        if held != self.connections:
            raise PeerError(f"{name}: {held} connections held, {self.connections} wanted")
        # The clients' word is not enough: the growth is per connection the
        # server still holds when its RSS is read.
        warmup_held = int(warmup.ready["connections"])
        if on_server is None:
            raise PeerError(f"{name}: cannot count the server's connections (no /proc)")
        if on_server != held + warmup_held:
            raise PeerError(
                f"{name}: the server holds {on_server} connections, "
                f"its clients {held + warmup_held}"
            )
        growth = after["VmRSS"] - before["VmRSS"]
        return {
            "connections": held,
            "warmup_connections": warmup_held,
            "server_connections": on_server,
            "rss_before_mib": before["VmRSS"] / 1024,
            "rss_after_mib": after["VmRSS"] / 1024,
            "kib_per_connection": growth / held,
            "open_s": opened,
            "client_kib_per_connection": sum(
                (h.ready["client_rss_kib_after"] - h.ready["client_rss_kib_before"])
                for h in holders
                if h.ready.get("client_rss_kib_after") is not None
            )
            / held,
        }

    def run(self) -> None:
        self.peers.prepare()
        with scratch_dir(self.config, NAME) as (root, where):
            self.where = where
            source = root / "source" / FILE_NAME
            for index, size in enumerate(self.sizes):
                label = size_label(size)
                started = time.perf_counter()
                digest = make_source(source, size)
                log(f"memory: source {label} written in {time.perf_counter() - started:.1f}s")
                names = [n for n in self.peers.pending() if index == 0 or n not in SMALL_ONLY]
                for repetition in range(self.config.repeat):
                    self.loads.append(load_average())
                    for name in alternating_order(names, repetition):
                        if self.peers.status[name]["status"] != "pending":
                            continue
                        log(f"memory: upload {label} {repetition + 1}/{self.config.repeat}: {name}")
                        try:
                            figures = self.upload_once(name, root, source, digest, label)
                        except PeerError as exc:
                            self.peers.fail(name, "failed", f"upload {label}: {exc}")
                            continue
                        self._record(name, repetition).setdefault("upload", {})[label] = figures
                source.unlink()
            names = [n for n in IDLE_CONTENDERS if self.peers.status[n]["status"] == "pending"]
            for repetition in range(self.config.repeat):
                for name in alternating_order(names, repetition):
                    if self.peers.status[name]["status"] != "pending":
                        continue
                    log(
                        f"memory: {self.connections} idle connections "
                        f"{repetition + 1}/{self.config.repeat}: {name}"
                    )
                    try:
                        self._record(name, repetition)["idle"] = self.idle_once(name, root)
                    except PeerError as exc:
                        self.peers.fail(name, "failed", f"idle connections: {exc}")
        self.peers.finish(self.records)


def run(config: RunConfig) -> ScenarioResult:
    """Run both parts; rows per upload size and for idle connections."""
    started = time.perf_counter()
    runner = _Runner(config)
    runner.run()
    measured = runner.peers.measured()
    usable = {name: runner.records[name] for name in measured}
    labels = [size_label(size) for size in runner.sizes]
    layout: list[Metric] = []
    for label in labels:
        group = f"server memory, {label} upload"
        layout += [
            Metric(
                group, "peak RSS (VmHWM)", "MiB", "lower", _upload_getter(label, "peak_rss_mib")
            ),
            Metric(
                group,
                "process peak RSS",
                "MiB",
                "lower",
                _upload_getter(label, "process_peak_rss_mib"),
            ),
            Metric(
                group,
                "sampled peak RSS",
                "MiB",
                "lower",
                _upload_getter(label, "sampled_peak_rss_mib"),
            ),
            Metric(group, "growth over idle", "MiB", "lower", _upload_getter(label, "growth_mib")),
            Metric(group, "throughput", "MB/s", "higher", _upload_getter(label, "mb_per_s")),
        ]
    group = f"server memory, {runner.connections} idle connections"
    layout += [
        Metric(
            group,
            "server RSS per connection",
            "KiB",
            "lower",
            _idle_getter("kib_per_connection"),
            only=IDLE_CONTENDERS,
        ),
        Metric(
            group,
            "server RSS after",
            "MiB",
            "lower",
            _idle_getter("rss_after_mib"),
            only=IDLE_CONTENDERS,
        ),
        Metric(
            group,
            "client RSS per connection",
            "KiB",
            "lower",
            _idle_getter("client_kib_per_connection"),
            only=IDLE_CONTENDERS,
        ),
        Metric(
            group, "time to open all", "s", "lower", _idle_getter("open_s"), only=IDLE_CONTENDERS
        ),
    ]
    goals = [
        goal(
            f"conduit-trio server peak RSS <= 100 MiB receiving {label}",
            median_of(usable, "conduit-trio", _upload_getter(label, "peak_rss_mib")),
            100.0,
            at_most=True,
            unit="MiB",
        )
        for label in labels
    ]
    goals += [
        goal(
            f"conduit-trio server process peak RSS <= 100 MiB receiving {label}, "
            "its start-up Argon2id stretch of the password included",
            median_of(usable, "conduit-trio", _upload_getter(label, "process_peak_rss_mib")),
            100.0,
            at_most=True,
            unit="MiB",
        )
        for label in labels
    ]
    goals.append(
        goal(
            "conduit-trio server RSS per idle authenticated connection <= 64 KiB",
            median_of(usable, "conduit-trio", _idle_getter("kib_per_connection")),
            64.0,
            at_most=True,
            unit="KiB",
        )
    )
    return ScenarioResult(
        name=NAME,
        config={
            "mode": config.mode,
            "repeat": config.repeat,
            "upload_bytes": list(runner.sizes),
            "upload_sizes": labels,
            "idle_connections": runner.connections,
            "idle_client_processes": runner.holders,
            "warmup_connections": WARMUP_CONNECTIONS,
            "files": runner.where,
            "order": "alternating: forward on even repetitions, reversed on odd ones",
            "load_average_per_repetition": runner.loads,
        },
        contenders=runner.peers.status,
        rows=build_rows(usable, measured, layout, {"x conduit-trio": "conduit-trio"}),
        ratio_columns=["x conduit-trio"],
        goals=goals,
        notes=list(NOTES),
        duration_s=time.perf_counter() - started,
    )
