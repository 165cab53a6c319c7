"""Scenario ``smallfiles``: many small uploads on one connection (files per second).

2,000 files of 4 KiB (200 quick) are uploaded by one client process per
repetition and contender, on one connection:

* ``raw-aead`` -- the raw-socket reference from ``bulk``, one file after the other
  (request, sealed records, fsync + rename on the server, digest answer);
* ``conduit-trio`` -- ``FileTransferHandler.send_to_server`` one file after the other;
* ``conduit-trio x8`` -- the same with 8 uploads in flight (8 tasks in a nursery):
  the client reads their files in shared thread hops and sends the ones that
  queue behind a call on its way together (``file_upload_batch``);
* ``conduit-trio dir`` -- one ``send_to_server`` of the whole directory (the
  source directory holds exactly the files): its small files go many per call
  (``file_upload_batch``, one fsync pass per batch on the server);
* ``netconduit`` -- its ``send_to_server`` one file after the other.

Every uploaded file is verified (SHA-256) against its source; the server's
storage directory is emptied after every repetition.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from pathlib import Path
from typing import Any

from .._harness import PeerError, RunConfig, ScenarioResult, ServerProcess, alternating_order, log
from ._transfer import (
    Contender,
    Metric,
    Peers,
    Repetitions,
    build_rows,
    clear_dir,
    load_average,
    ratio_goal,
    scratch_dir,
    slug,
    verify,
)

NAME = "smallfiles"
REFERENCE = "raw-aead"
COMPETITOR = "netconduit"
FILES = {"quick": 200, "full": 2000}
FILE_SIZE = 4096
CONCURRENCY = 8
CLIENT_TIMEOUT = {"quick": 180.0, "full": 900.0}

CONTENDERS = (
    Contender(
        REFERENCE,
        "raw-socket reference, sequential: request, 1 sealed record, fsync+rename, digest answer",
        "raw_reference.py",
        client_spec={"aead": True, "record": 1024 * 1024},
    ),
    Contender(
        "conduit-trio",
        "conduit (this tree) FileTransferHandler.send_to_server, one file after the other, Trio",
        "conduit_transfer.py",
    ),
    Contender(
        f"conduit-trio x{CONCURRENCY}",
        f"the same with {CONCURRENCY} uploads in flight on the one connection (nursery)",
        "conduit_transfer.py",
        client_spec={"concurrency": CONCURRENCY},
    ),
    Contender(
        "conduit-trio dir",
        "the same client, one send_to_server of the directory: small files in batches "
        "(file_upload_batch)",
        "conduit_transfer.py",
        client_spec={"directory": True},
    ),
    Contender(
        COMPETITOR,
        "netconduit 5.0.0 FileTransferHandler.send_to_server, one file after the other",
        "netconduit_transfer.py",
        venv="netconduit",
    ),
)

NOTES = [
    "files/s = files / wall time of the whole batch in the client; every upload returned "
    "only after the server verified, fsynced and published the file",
    "round trips per file: conduit 1 for files up to chunk_size (file_upload_small: the "
    "data, checked, written, verified, fsynced and published in one call; larger files "
    "take begin + data stream + finish); netconduit 3 (start, one chunk, complete) after "
    "hashing the file; the raw reference 1",
    "conduit-trio x8: 8 send_to_server calls at once; a file goes alone when nothing is "
    "under way, else it queues and the queue leaves as one file_upload_batch (2 calls in "
    "flight at most); each call still returns only after its own file was stored",
    "conduit-trio dir: one call for the directory; the client reads the files, sends them "
    "64 per file_upload_batch call (within the server's max_frame_size), 4 calls in flight; "
    "each file is still checked, admitted, verified, fsynced and published on its own, and "
    "each directory is fsynced once per batch before the answer",
    "CPU ms/file: client process CPU (all threads), server CPU from /proc, over the batch",
    "ratio columns: contender / reference per repetition, median over repetitions",
]


def _get(key: str, scale: float = 1.0, per_file: bool = False) -> Any:
    def getter(record: dict[str, Any]) -> Any:
        figures = record["smallfiles"]
        value = figures[key]
        if value is None:
            return None
        return value * scale / (figures["files"] if per_file else 1)

    return getter


def _make_files(directory: Path, count: int) -> dict[str, str]:
    """``count`` files of random bytes; returns name -> SHA-256."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = random.Random(4096)
    digests: dict[str, str] = {}
    for index in range(count):
        name = f"small-{index:05d}.bin"
        data = generator.randbytes(FILE_SIZE)
        (directory / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


class _Runner:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.count = FILES[config.mode]
        self.peers = Peers(NAME, config, CONTENDERS)
        self.repetitions: Repetitions = {c.name: [] for c in CONTENDERS}
        self.where: dict[str, Any] = {}
        self.loads: list[list[float] | None] = []

    def repetition(
        self, name: str, server: ServerProcess, storage: Path, source: Path, digests: dict[str, str]
    ) -> dict[str, Any]:
        spec = {"kind": "smallfiles", "dir": str(source), "names": sorted(digests)}
        try:
            result = self.peers.client(name, server, spec, CLIENT_TIMEOUT[self.config.mode])
            for file_name, digest in digests.items():
                verify(storage / file_name, digest, f"{name} upload")
            extra = {p.name for p in storage.iterdir()} - set(digests)
            if extra:
                raise PeerError(f"{name}: unexpected files on the server: {sorted(extra)[:5]}")
        finally:
            clear_dir(storage)
        return result

    def run(self) -> None:
        self.peers.prepare()
        with scratch_dir(self.config, NAME) as (root, where):
            self.where = where
            source = root / "source"
            digests = _make_files(source, self.count)
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
                        log(f"smallfiles: repetition {repetition + 1}/{self.config.repeat}: {name}")
                        server, storage = servers[name]
                        try:
                            self.repetitions[name].append(
                                self.repetition(name, server, storage, source, digests)
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
    group = f"{runner.count} files of {FILE_SIZE // 1024} KiB, one connection"
    layout = [
        Metric(group, "files/s", "files/s", "higher", _get("files_per_s")),
        Metric(group, "client CPU/file", "ms", "lower", _get("client_cpu_s", 1e3, per_file=True)),
        Metric(group, "server CPU/file", "ms", "lower", _get("server_cpu_s", 1e3, per_file=True)),
    ]
    columns = {f"x {REFERENCE}": REFERENCE, f"x {COMPETITOR}": COMPETITOR}
    goals = [
        ratio_goal(
            f"conduit-trio{suffix} files/s >= 3x netconduit",
            usable,
            f"conduit-trio{suffix}",
            COMPETITOR,
            _get("files_per_s"),
            3.0,
            at_most=False,
        )
        for suffix in ("", f" x{CONCURRENCY}", " dir")
    ]
    return ScenarioResult(
        name=NAME,
        config={
            "mode": config.mode,
            "repeat": config.repeat,
            "files": runner.count,
            "file_bytes": FILE_SIZE,
            "concurrency": CONCURRENCY,
            "storage": runner.where,
            "order": "alternating: forward on even repetitions, reversed on odd ones",
            "load_average_per_repetition": runner.loads,
        },
        contenders=runner.peers.status,
        rows=build_rows(usable, measured, layout, columns),
        ratio_columns=list(columns),
        goals=goals,
        notes=list(NOTES),
        duration_s=time.perf_counter() - started,
    )
