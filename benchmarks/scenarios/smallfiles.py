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

Each repetition starts one client per contender (one connection each, set
up before anything is timed) and paces them slice by slice: the files are in
``SLICES`` slices (8 of 250 files in full mode, 4 of 50 quick), every contender
uploads slice ``k`` before any contender starts slice ``k + 1``, in forward
order on even slices and reversed on odd ones. A contender's figures add its
slices up (files over the sum of the slices' wall times), so every contender
ran through the same minutes of the machine's state, a few seconds at a time,
and the ratio between two contenders no longer depends on which of them a
burst of other work fell on. The work measured is the same as with one
client run per contender: all the files, one after the other (or 8 in
flight), on one connection; only the idle pauses between slices, while other
contenders run, are new (``dir`` sends one directory, i.e. one
``send_to_server`` call, per slice).

Every uploaded file is verified (SHA-256) against its source; the server's
storage directory is emptied after every repetition.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import selectors
import subprocess
import time
from pathlib import Path
from typing import Any

from .._harness import (
    PEERS_DIR,
    HoldingProcess,
    PeerError,
    RunConfig,
    ScenarioResult,
    ServerProcess,
    alternating_order,
    log,
)
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
#: Each repetition's files in this many slices; every contender uploads slice k
#: (on its one connection) before any uploads slice k + 1, in alternating order.
#: A full-mode slice (250 files) is 0.1-3 s of work, and still holds four
#: 64-file batches for the ``dir`` client's 4 calls in flight; finer slices
#: would drain and refill the x8 and dir pipelines every few dozen files.
SLICES = {"quick": 4, "full": 8}
FILE_SIZE = 4096
CONCURRENCY = 8
#: netconduit with as many uploads in flight: the like-for-like reference of
#: conduit's concurrent clients (it has no directory upload: its best way to
#: send many files is this one).
COMPETITOR_CONCURRENT = f"{COMPETITOR} x{CONCURRENCY}"
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
    Contender(
        COMPETITOR_CONCURRENT,
        f"the same with {CONCURRENCY} uploads in flight on the one connection "
        "(asyncio.gather of workers)",
        "netconduit_transfer.py",
        venv="netconduit",
        client_spec={"concurrency": CONCURRENCY},
    ),
)

NOTES = [
    "files/s = files / wall time of the whole batch in the client; every upload returned "
    "only after the server verified, fsynced and published the file (netconduit: verified; "
    "it fsyncs nothing)",
    "round trips per file: conduit 1 for files up to chunk_size (file_upload_small: the "
    "data, checked, written, verified, fsynced and published in one call; larger files "
    "take begin + data stream + finish); netconduit 3 (start, one chunk, complete) after "
    "hashing the file; the raw reference 1",
    "conduit-trio x8: 8 send_to_server calls at once; a file goes alone when nothing is "
    "under way, else it queues and the queue leaves as one file_upload_batch (2 calls in "
    "flight at most); each call still returns only after its own file was stored",
    "conduit-trio dir: one call per slice's directory (250 files, quick 50); the client reads "
    "the files, sends them up to 64 per file_upload_batch call (within the server's "
    "max_frame_size), up to 4 calls in flight; "
    "each file is still checked, admitted, verified, fsynced and published on its own, and "
    "each directory is fsynced once per batch before the answer",
    "CPU ms/file: client process CPU (all threads), server CPU from /proc, over the batch",
    "pacing: one connection per contender and repetition; the files in slices (8 x 250 "
    "full, 4 x 50 quick), every contender's slice k before anyone's slice k + 1, order "
    "reversed on alternate slices; figures add the slices' timed uploads up",
    f"netconduit x{CONCURRENCY}: netconduit's send_to_server with {CONCURRENCY} uploads in "
    "flight on its one connection, the reference of conduit's x8 and dir goals (like for "
    "like; before 2026-12-05 18:00 those goals were against sequential netconduit)",
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


def _make_files(
    directory: Path, count: int, slices: int
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``count`` files of random bytes in ``slices`` subdirectories of ``directory``.

    Returns the slices (``{"dir": ..., "names": [...]}``, in upload order) and
    name -> SHA-256 (names are unique across slices: uploads land side by side).
    """
    generator = random.Random(4096)
    digests: dict[str, str] = {}
    parts: list[dict[str, Any]] = []
    for number, size in enumerate(_split(count, slices)):
        where = directory / f"slice-{number:02d}"
        where.mkdir(parents=True, exist_ok=True)
        names: list[str] = []
        for _ in range(size):
            name = f"small-{len(digests):05d}.bin"
            data = generator.randbytes(FILE_SIZE)
            (where / name).write_bytes(data)
            digests[name] = hashlib.sha256(data).hexdigest()
            names.append(name)
        parts.append({"dir": str(where), "names": names})
    return parts, digests


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


class _PacedClient(HoldingProcess):
    """A contender's client for one repetition: one connection, one slice per :meth:`step`.

    The peer (``SmallFileSteps`` in ``peers/_transferlib.py``) connects, prints
    ``READY``, then uploads slice ``k`` on ``GO k`` and answers ``DONE``; on
    ``END`` it hangs up and prints its ``RESULT`` (the slices' figures added up).
    """

    def __init__(self, argv: list[str], env: dict[str, str], timeout: float) -> None:
        super().__init__(argv, env, timeout)
        self.timeout = timeout
        self._buffer = b""

    def _launch(self) -> None:
        self._process = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=self.env,
            cwd=PEERS_DIR,
        )

    def _send(self, line: str) -> None:
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write(line.encode() + b"\n")
            self._process.stdin.flush()
        except OSError as exc:
            raise PeerError(f"client gone ({exc})\n" + self.stderr_tail()) from None

    def _line(self, prefix: str) -> str:
        """The rest of the next stdout line starting with ``prefix`` (within the timeout)."""
        assert self._process is not None and self._process.stdout is not None
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self._process.stdout, selectors.EVENT_READ)
            while True:
                while b"\n" in self._buffer:
                    raw, self._buffer = self._buffer.split(b"\n", 1)
                    line = raw.decode(errors="replace")
                    if line.startswith(prefix):
                        return line[len(prefix) :]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PeerError(f"client printed no {prefix.strip()} within {self.timeout:g}s")
                if not selector.select(remaining):
                    continue
                chunk = os.read(self._process.stdout.fileno(), 65536)
                if not chunk:
                    raise PeerError(
                        f"client exited (code {self._process.wait()}) before {prefix.strip()}\n"
                        + self.stderr_tail()
                    )
                self._buffer += chunk

    def step(self, index: int) -> None:
        """Upload slice ``index`` and wait until the peer has timed it."""
        self._send(f"GO {index}")
        self._line("DONE ")

    def finish(self) -> dict[str, Any]:
        """Hang up and return the peer's ``RESULT`` object."""
        self._send("END")
        result: dict[str, Any] = json.loads(self._line("RESULT "))
        return result

    def stop(self) -> None:
        """Close our end of its stdin, then stop it as any held process."""
        if self._process is not None and self._process.stdin is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()
        super().stop()


class _Runner:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.count = FILES[config.mode]
        self.slices = SLICES[config.mode]
        self.peers = Peers(NAME, config, CONTENDERS)
        self.repetitions: Repetitions = {c.name: [] for c in CONTENDERS}
        self.where: dict[str, Any] = {}
        self.loads: list[list[float] | None] = []

    def _start(
        self,
        name: str,
        server: ServerProcess,
        parts: list[dict[str, Any]],
        stack: contextlib.ExitStack,
    ) -> _PacedClient | None:
        """Launch ``name``'s client for one repetition and wait until it is connected."""
        spec = {"kind": "smallfiles", "slices": parts, "server_pid": server.pid}
        paced = _PacedClient(
            self.peers._client_argv(name, server.port, spec),
            self.peers.envs[name],
            CLIENT_TIMEOUT[self.config.mode],
        )
        stack.callback(paced.stop)
        try:
            server.check_alive()
            paced._start()
        except PeerError as exc:
            self._fail(name, server, f"connect: {exc}")
            return None
        return paced

    def _fail(self, name: str, server: ServerProcess, why: str) -> None:
        self.peers.fail(
            name,
            "failed",
            f"repetition {len(self.loads)}: {why}\nserver stderr:\n{server.stderr_tail()}",
        )

    def repetition(
        self,
        repetition: int,
        servers: dict[str, tuple[ServerProcess, Path]],
        parts: list[dict[str, Any]],
        digests: dict[str, str],
    ) -> None:
        """Every pending contender uploads every slice, slice by slice, alternating."""
        self.loads.append(load_average())
        running = [name for name in servers if self.peers.status[name]["status"] == "pending"]
        with contextlib.ExitStack() as stack:
            clients: dict[str, _PacedClient] = {}
            for name in running:
                paced = self._start(name, servers[name][0], parts, stack)
                if paced is not None:
                    clients[name] = paced
            for index in range(len(parts)):
                # Forward, then reversed, slice after slice: A B C, C B A, A B C...
                for name in alternating_order(list(clients), repetition * len(parts) + index):
                    if self.peers.status[name]["status"] != "pending":
                        continue
                    try:
                        clients[name].step(index)
                    except PeerError as exc:
                        self._fail(name, servers[name][0], f"slice {index + 1}: {exc}")
            log(f"smallfiles: repetition {repetition + 1}/{self.config.repeat} uploaded")
            for name, paced in clients.items():
                server, storage = servers[name]
                try:
                    if self.peers.status[name]["status"] != "pending":
                        continue
                    result = paced.finish()
                    self.peers.check_runtime(name, result)
                    for file_name, digest in digests.items():
                        verify(storage / file_name, digest, f"{name} upload")
                    extra = {p.name for p in storage.iterdir()} - set(digests)
                    if extra:
                        raise PeerError(
                            f"{name}: unexpected files on the server: {sorted(extra)[:5]}"
                        )
                    self.repetitions[name].append(result)
                except PeerError as exc:
                    self._fail(name, server, str(exc))
                finally:
                    clear_dir(storage)

    def run(self) -> None:
        self.peers.prepare()
        with scratch_dir(self.config, NAME) as (root, where):
            self.where = where
            parts, digests = _make_files(root / "source", self.count, self.slices)
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
                for repetition in range(self.config.repeat):
                    self.repetition(repetition, servers, parts, digests)
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
    columns = {
        f"x {REFERENCE}": REFERENCE,
        f"x {COMPETITOR}": COMPETITOR,
        f"x {COMPETITOR_CONCURRENT}": COMPETITOR_CONCURRENT,
    }
    # Like for like: sequential against sequential, concurrent (and the
    # directory call) against netconduit with as many uploads in flight.
    goals = [
        ratio_goal(
            f"conduit-trio{suffix} files/s >= 3x {reference}",
            usable,
            f"conduit-trio{suffix}",
            reference,
            _get("files_per_s"),
            3.0,
            at_most=False,
        )
        for suffix, reference in (
            ("", COMPETITOR),
            (f" x{CONCURRENCY}", COMPETITOR_CONCURRENT),
            (" dir", COMPETITOR_CONCURRENT),
        )
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
            "slices": runner.slices,
            "order": (
                "one client (one connection) per contender and repetition; the files in "
                "slices, every contender's slice k before any contender's slice k + 1, "
                "contenders forward and reversed on alternate slices"
            ),
            "load_average_per_repetition": runner.loads,
        },
        contenders=runner.peers.status,
        rows=build_rows(usable, measured, layout, columns),
        ratio_columns=list(columns),
        goals=goals,
        notes=list(NOTES),
        duration_s=time.perf_counter() - started,
    )
