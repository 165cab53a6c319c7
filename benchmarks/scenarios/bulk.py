"""Scenario ``bulk``: upload and download of one large file, client and server apart.

Contenders (server and client always in separate processes on loopback):

1. ``raw-aead`` -- the reference (``peers/raw_reference.py``): the simplest
   competent implementation of the same work -- blocking sockets, one thread
   per side, 64 KiB chunks batched 16 to a 1 MiB record, one pass of SHA-256 on
   each end, AES-256-GCM with counter nonces (one seal per record), fsync and
   publish on the receiver, digest compared by the sender.
2. ``raw-aead-64k`` -- the same with one record per 64 KiB chunk (no batching).
3. ``raw-plain`` -- ``raw-aead`` without the AEAD: what encryption costs.
4. ``bare-trio`` -- ``raw-aead``'s work and wire on plain Trio
   (``peers/bare_trio_transfer.py``): each record read, hashed and sealed (or
   opened, hashed and written) in a ``trio.to_thread`` worker, sent or received
   by a task of its own; no protocol. What a Trio engine costs by itself, the
   floor under ``conduit-trio``.
5. ``conduit-trio`` -- ``FileTransferHandler.send_to_server`` /
   ``receive_from_server``, client and server on Trio.
6. ``conduit-asyncio`` -- the same client under ``asyncio.run`` through the shim.
7. ``netconduit`` -- netconduit 5.0.0's own ``FileTransferHandler`` (one RPC per
   base64 chunk), in its private virtualenv.

Each repetition runs one client process per contender (alternating order) that
uploads the source file and then downloads it back; right before each of the
two it writes and removes twice the file's size on ``/dev/shm`` (see
``peers/_transferlib.prime_memory``), then times the operation and reads the
server's CPU time from ``/proc`` around it. After every
repetition the orchestrator hashes the uploaded and the downloaded file against
the source: a contender that moved wrong bytes is marked failed, not measured.
Files live in a fresh directory on ``/dev/shm`` (``--disk``: a disk temp dir),
removed afterwards; each server has its own storage directory, emptied after
every repetition.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .._harness import PeerError, RunConfig, ScenarioResult, ServerProcess, alternating_order, log
from ._transfer import (
    RAM_DIR,
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
    priming,
    ratio_goal,
    round_trip_spec,
    scratch_dir,
    slug,
    verify,
)

NAME = "bulk"
REFERENCE = "raw-aead"
COMPETITOR = "netconduit"
SIZES = {"quick": 64 * MiB, "full": GiB}
CLIENT_TIMEOUT = {"quick": 180.0, "full": 900.0}
FILE_NAME = "bulk.bin"

CONTENDERS = (
    Contender(
        REFERENCE,
        "raw sockets, blocking, one thread per side; 64 KiB chunks in 1 MiB AES-256-GCM "
        "records; SHA-256 once per side; fsync (the reference)",
        "raw_reference.py",
        client_spec={"aead": True, "record": MiB},
    ),
    Contender(
        "raw-aead-64k",
        "raw-aead with one AES-256-GCM record per 64 KiB chunk (no batching)",
        "raw_reference.py",
        client_spec={"aead": True, "record": 64 * 1024},
    ),
    Contender(
        "raw-plain",
        "raw-aead without encryption (1 MiB records in clear): the cost of the AEAD",
        "raw_reference.py",
        client_spec={"aead": False, "record": MiB},
    ),
    Contender(
        "bare-trio",
        "raw-aead's work and wire on plain Trio: records read, hashed and sealed (or opened, "
        "hashed and written) in trio.to_thread workers, sent and received by their own tasks; "
        "no protocol: the floor of a Trio engine",
        "bare_trio_transfer.py",
    ),
    Contender(
        "conduit-trio",
        "conduit (this tree): FileTransferHandler.send_to_server / receive_from_server on Trio",
        "conduit_transfer.py",
    ),
    Contender(
        "conduit-asyncio",
        "conduit (this tree), client under asyncio.run via the shim, server on Trio",
        "conduit_transfer.py",
        flavor="asyncio",
    ),
    Contender(
        COMPETITOR,
        "netconduit 5.0.0 FileTransferHandler (one RPC per base64 64 KiB chunk), private venv",
        "netconduit_transfer.py",
        venv="netconduit",
    ),
)

NOTES = [
    "MB/s are decimal (10^6 bytes/s) = file size / wall time of the API call in the client: "
    "from the first request to the verified result (upload: the server has hashed, fsynced "
    "and published; download: this side has; netconduit fsyncs nothing)",
    "ratio columns: contender / reference per repetition (both measured in the same "
    "repetition), median over repetitions; for MB/s higher is better, for CPU lower is better",
    "CPU s/GiB: client = its process CPU time (all threads) during the operation; server = "
    "its CPU time from /proc during the operation",
    "every uploaded and downloaded file was hashed by the orchestrator against the source "
    "(SHA-256); a mismatch voids the contender",
    "raw-aead is the reference: 1 MiB records (16 x 64 KiB chunks per seal) are what conduit "
    "seals too (its writer coalesces frames into records of up to 1 MiB, and its sender reads "
    "and hashes 2 MiB blocks, two records), so the reference does the same crypto and syscall "
    "work per byte; raw-aead-64k shows what sealing every 64 KiB chunk separately costs",
    "raw-* and bare-trio: no handshake (fixed key), no resume, no name confinement, no flow "
    "control; they measure moving, hashing, sealing and writing bytes only (bare-trio reads "
    "one record ahead, in a worker thread beside the event loop)",
    "netconduit: base64 chunks in msgpack RPCs, one round trip per 64 KiB; the sender hashes "
    "the whole file before sending and the server checks it on uploads; downloads are not "
    "hashed; nothing is fsynced, in either direction; no encryption "
    "(the orchestrator still verifies every file it produced)",
    "both peers share 2 vCPUs with each other and with whatever else runs on the machine: "
    "see load_average in the config",
    "right before each upload and each download the client wrote and removed twice the file "
    "size on /dev/shm (config: primed): this VM hands freed memory back to its host, and a "
    "receiver writing into pages handed back spent up to 2.9 s of system CPU per GiB instead "
    "of ~0.33 s, "
    "depending on how long ago memory was last freed, not on the contender",
]

OPS = ("upload", "download")


def op_getter(index: int, key: str) -> Any:
    """Getter of ``key`` in the ``index``-th operation's figures of a repetition."""

    def getter(record: dict[str, Any]) -> Any:
        return record["ops"][index][key]

    return getter


def metrics(size_label: str) -> list[Metric]:
    """The table layout: per direction, throughput then CPU."""
    layout: list[Metric] = []
    for index, op in enumerate(OPS):
        group = f"{op} {size_label}"
        layout += [
            Metric(group, "throughput", "MB/s", "higher", op_getter(index, "mb_per_s")),
            Metric(group, "client CPU", "s/GiB", "lower", op_getter(index, "client_cpu_s_per_gib")),
            Metric(group, "server CPU", "s/GiB", "lower", op_getter(index, "server_cpu_s_per_gib")),
            Metric(
                group,
                "event-loop stall, max",
                "ms",
                "lower",
                op_getter(index, "loop_stall_max_ms"),
                only=("conduit-trio", "conduit-asyncio"),
            ),
            Metric(
                group,
                "event-loop stall, p99",
                "ms",
                "lower",
                op_getter(index, "loop_stall_p99_ms"),
                only=("conduit-trio", "conduit-asyncio"),
            ),
        ]
    return layout


def size_label(size: int) -> str:
    """``1 GiB`` / ``64 MiB``."""
    return f"{size // GiB} GiB" if size >= GiB and size % GiB == 0 else f"{size // MiB} MiB"


class TransferRunner:
    """Upload + download of one source file per repetition, for a list of contenders.

    Shared with the ``sftp`` scenario: ``server_extra(root)`` adds to every server's
    spec and every client's (e.g. where SSH keys live), ``client_extra`` to every
    client's.
    """

    def __init__(
        self,
        scenario: str,
        config: RunConfig,
        contenders: Sequence[Contender],
        *,
        server_extra: Callable[[Path], dict[str, Any]] | None = None,
        client_extra: dict[str, Any] | None = None,
    ) -> None:
        self.scenario = scenario
        self.config = config
        self.size = SIZES[config.mode]
        self.timeout = CLIENT_TIMEOUT[config.mode]
        self.peers = Peers(scenario, config, contenders)
        self.repetitions: Repetitions = {c.name: [] for c in contenders}
        self.where: dict[str, Any] = {}
        self.loads: list[list[float] | None] = []
        self.server_extra = server_extra
        self.client_extra = client_extra or {}
        self.shared: dict[str, Any] = {}
        #: The clients' "prime" (see _transfer.priming), set while the run is on.
        self.prime: dict[str, Any] | None = None
        #: Operations run right after priming the memory (True), or without
        #: (False: no room; None: no /dev/shm).
        self.primed: dict[bool | None, int] = {True: 0, False: 0, None: 0}

    def repetition(
        self, name: str, server: ServerProcess, storage: Path, source: Path, digest: str
    ) -> dict[str, Any]:
        """One client process: upload, download; both files verified, then removed."""
        downloads = storage.parent / f"client-{slug(name)}"
        clear_dir(downloads)
        spec = {
            **round_trip_spec(source, downloads, self.prime),
            **self.client_extra,
            **self.shared,
        }
        try:
            result = self.peers.client(name, server, spec, self.timeout)
            upload, download = result["ops"]
            for op in (upload, download):
                self.primed[op.get("primed")] += 1
                if op.get("primed") is False:
                    log(f"{name} {op['op']}: no room on {RAM_DIR} to prime memory: not primed")
            verify(storage / upload["result"]["path"], digest, f"{name} upload")
            downloaded = Path(download["result"]["path"])
            if not downloaded.is_absolute():
                downloaded = downloads / downloaded
            verify(downloaded, digest, f"{name} download")
            result["verified_sha256"] = digest
        finally:
            clear_dir(storage)
            clear_dir(downloads)
        return result

    def run(self) -> None:
        """Start one server per contender, then alternate client repetitions."""
        self.peers.prepare()
        with scratch_dir(self.config, self.scenario) as (root, where):
            self.where = where
            if self.server_extra is not None:
                self.shared = self.server_extra(root)
            source = root / "source" / FILE_NAME
            started = time.perf_counter()
            digest = make_source(source, self.size)
            log(
                f"{self.scenario}: source {size_label(self.size)} written "
                f"in {time.perf_counter() - started:.1f}s"
            )
            with contextlib.ExitStack() as stack:
                # As much as both ways write (see _transferlib.prime_memory).
                self.prime = stack.enter_context(priming(2 * self.size))
                servers: dict[str, tuple[ServerProcess, Path]] = {}
                for name in self.peers.pending():
                    storage = root / f"server-{slug(name)}"
                    clear_dir(storage)
                    spec = {"storage": str(storage), **self.shared}
                    try:
                        server = stack.enter_context(self.peers.server(name, spec))
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
                        log(
                            f"{self.scenario}: repetition {repetition + 1}/{self.config.repeat}: "
                            f"{name}"
                        )
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

    def config_record(self) -> dict[str, Any]:
        """What the scenario's ``config`` records about the run."""
        return {
            "mode": self.config.mode,
            "repeat": self.config.repeat,
            "file_bytes": self.size,
            "file_size": size_label(self.size),
            "chunk_bytes": 64 * 1024,
            "files": self.where,
            "order": "alternating: forward on even repetitions, reversed on odd ones",
            "primed": {
                "how": "right before each timed operation, the client wrote 2x the file size "
                "to a scratch file on /dev/shm and removed it (see _transferlib.prime_memory)",
                "ops_primed": self.primed[True],
                "ops_unprimed": self.primed[False] + self.primed[None],
            },
            "client_timeout_s": self.timeout,
            "load_average_per_repetition": self.loads,
        }


def run(config: RunConfig) -> ScenarioResult:
    """Run the scenario: one server per contender, alternating client repetitions."""
    started = time.perf_counter()
    runner = TransferRunner(NAME, config, CONTENDERS)
    runner.run()
    measured = runner.peers.measured()
    usable = {name: runner.repetitions[name] for name in measured}
    label = size_label(runner.size)
    columns = {f"x {REFERENCE}": REFERENCE, f"x {COMPETITOR}": COMPETITOR}
    goals = []
    for index, op in enumerate(OPS):
        goals.append(
            ratio_goal(
                f"conduit-trio {op} throughput >= 0.9x raw-aead (same work, raw sockets)",
                usable,
                "conduit-trio",
                REFERENCE,
                op_getter(index, "mb_per_s"),
                0.9,
                at_most=False,
            )
        )
    for index, op in enumerate(OPS):
        goals.append(
            ratio_goal(
                f"conduit-trio {op} throughput >= 5x netconduit",
                usable,
                "conduit-trio",
                COMPETITOR,
                op_getter(index, "mb_per_s"),
                5.0,
                at_most=False,
            )
        )
    for index, op in enumerate(OPS):
        goals.append(
            ratio_goal(
                f"conduit-asyncio {op} throughput >= 0.9x conduit-trio (the shim's cost)",
                usable,
                "conduit-asyncio",
                "conduit-trio",
                op_getter(index, "mb_per_s"),
                0.9,
                at_most=False,
            )
        )
        goals.append(
            goal(
                f"conduit-asyncio {op}: longest asyncio event-loop stall < 50 ms",
                median_of(usable, "conduit-asyncio", op_getter(index, "loop_stall_max_ms")),
                50.0,
                at_most=True,
                unit="ms",
            )
        )
    return ScenarioResult(
        name=NAME,
        config=runner.config_record(),
        contenders=runner.peers.status,
        rows=build_rows(usable, measured, metrics(label), columns),
        ratio_columns=list(columns),
        goals=goals,
        notes=list(NOTES),
        duration_s=time.perf_counter() - started,
    )
