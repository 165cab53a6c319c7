"""What the file-transfer scenarios share: contenders, their processes, scratch files, rows.

``bulk``, ``memory``, ``hol``, ``smallfiles`` and ``sftp`` all move real files
between a server process and client processes. This module gives them:

* :class:`Contender` and :class:`Peers`: which interpreter and environment runs
  each contender (netconduit and asyncssh live in private virtualenvs), its
  server (a :class:`~benchmarks._harness.ServerProcess` given a storage
  directory) and its client runs, checked to have imported the right library;
* :func:`scratch_dir`: a fresh directory on a RAM-backed file system
  (``/dev/shm``), or on disk with ``--disk``, always removed afterwards;
* :func:`make_source` and :func:`verify`: deterministic source files, and the
  SHA-256 check of every file a transfer produced (a benchmark that moves wrong
  bytes is void: the contender is marked failed);
* :func:`build_rows`: table rows from per-repetition records, with paired
  ratios against references measured in the same run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._harness import (
    PEERS_DIR,
    SRC_DIR,
    HoldingProcess,
    PeerError,
    Row,
    RunConfig,
    ServerProcess,
    foreign_env,
    log,
    our_env,
    paired_ratio,
    probe,
    probe_asyncio_shim,
    run_client,
    spread,
)
from .._venvs import (
    VENVS_DIR,
    VenvError,
    ensure_venv,
    installed_versions,
    netconduit_python,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
RAM_DIR = Path("/dev/shm")
SERVER_START_TIMEOUT = 60.0

#: Pinned SFTP competitor, installed into ``benchmarks/.venvs/asyncssh`` on first use
#: unless this interpreter already has asyncssh (``pip install -e .[bench]``).
ASYNCSSH_REQUIREMENTS = ("asyncssh==2.24.1",)


@dataclass(frozen=True)
class Contender:
    """One implementation under test and how to run its peers."""

    name: str
    description: str
    script: str
    #: ``"trio"`` or ``"asyncio"`` (the client's world; our servers are always Trio).
    flavor: str = "trio"
    #: ``None``: this interpreter with this tree's ``src/``; else a private venv name.
    venv: str | None = None
    #: Merged into every client spec of this contender (e.g. ``{"aead": False}``).
    client_spec: dict[str, Any] = field(default_factory=dict)


def _inside(path: str | None, directory: Path) -> bool:
    if not path:
        return False
    try:
        Path(path).resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def asyncssh_python() -> tuple[str, dict[str, str]]:
    """An interpreter with asyncssh: this one if it has it, else a private virtualenv."""
    if probe(sys.executable, foreign_env(), "import asyncssh") is None:
        return sys.executable, foreign_env()
    return str(ensure_venv("asyncssh", ASYNCSSH_REQUIREMENTS)), foreign_env()


class Peers:
    """Interpreters, environments, servers and client runs of a scenario's contenders."""

    def __init__(self, scenario: str, config: RunConfig, contenders: Sequence[Contender]) -> None:
        self.scenario = scenario
        self.config = config
        self.contenders = {c.name: c for c in contenders}
        self.status: dict[str, dict[str, Any]] = {
            c.name: {"status": "pending", "description": c.description, "script": c.script}
            for c in contenders
        }
        self.pythons: dict[str, str] = {}
        self.envs: dict[str, dict[str, str]] = {}

    def fail(self, name: str, status: str, reason: str) -> None:
        """Take ``name`` out of the run, saying why (it is reported, not hidden)."""
        if self.status[name]["status"] == "pending":
            self.status[name].update(status=status, reason=reason)
            log(f"{self.scenario}: {name} {status}: {reason.splitlines()[0] if reason else ''}")

    def pending(self) -> list[str]:
        """Contenders still in the run, in declaration order."""
        return [name for name, info in self.status.items() if info["status"] == "pending"]

    def prepare(self) -> None:
        """Find each contender's interpreter (creating private venvs) and probe the shim."""
        for contender in self.contenders.values():
            name = contender.name
            try:
                if contender.venv == "netconduit":
                    python = str(netconduit_python())
                    env = foreign_env()
                    self.status[name]["versions"] = installed_versions(
                        Path(python), ["netconduit", "pydantic", "msgpack"]
                    )
                elif contender.venv == "asyncssh":
                    python, env = asyncssh_python()
                    self.status[name]["versions"] = installed_versions(
                        Path(python), ["asyncssh", "cryptography"]
                    )
                else:
                    python, env = sys.executable, our_env(self.config.profile_dir)
            except VenvError as exc:
                self.fail(name, "failed", str(exc))
                continue
            self.pythons[name], self.envs[name] = python, env
            if contender.flavor == "asyncio" and contender.script.startswith("conduit"):
                reason = probe_asyncio_shim(python, env)
                if reason is not None:
                    self.fail(name, "unavailable", reason)

    def server(self, name: str, spec: dict[str, Any]) -> ServerProcess:
        """A server process for ``name`` (enter it to start it)."""
        contender = self.contenders[name]
        argv = [
            self.pythons[name],
            str(PEERS_DIR / contender.script),
            "server",
            "--spec",
            json.dumps(spec),
        ]
        return ServerProcess(argv, self.envs[name], SERVER_START_TIMEOUT)

    def _client_argv(self, name: str, port: int, spec: dict[str, Any]) -> list[str]:
        contender = self.contenders[name]
        return [
            self.pythons[name],
            str(PEERS_DIR / contender.script),
            "client",
            "--port",
            str(port),
            "--flavor",
            contender.flavor,
            "--spec",
            json.dumps({**contender.client_spec, **spec}),
        ]

    def client(
        self, name: str, server: ServerProcess, spec: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """Run one client process of ``name`` against ``server``; return its checked result."""
        server.check_alive()
        result = run_client(
            self._client_argv(name, server.port, {"server_pid": server.pid, **spec}),
            self.envs[name],
            timeout,
        )
        self.check_runtime(name, result)
        return result

    def holder(self, name: str, port: int, spec: dict[str, Any], timeout: float) -> HoldingProcess:
        """A client process that holds connections open (enter it; it waits for ``READY``)."""
        return HoldingProcess(self._client_argv(name, port, spec), self.envs[name], timeout)

    def check_runtime(self, name: str, result: dict[str, Any]) -> None:
        """Refuse a result from the wrong library (netconduit's import name is ours too)."""
        contender = self.contenders[name]
        runtime = result.get("runtime", {})
        module_file = runtime.get("module_file")
        if contender.script.startswith("conduit") and not _inside(module_file, SRC_DIR):
            raise PeerError(f"{name} imported conduit from {module_file}, not {SRC_DIR}")
        if contender.venv == "netconduit" and not _inside(module_file, VENVS_DIR):
            raise PeerError(f"{name} imported conduit from {module_file}, not {VENVS_DIR}")
        if contender.venv == "asyncssh" and runtime.get("library") != "asyncssh":
            raise PeerError(f"{name} did not run asyncssh: {runtime!r}")
        self.status[name].setdefault("runtime", runtime)

    def finish(self, repetitions: dict[str, list[dict[str, Any]]]) -> None:
        """Mark contenders that completed every repetition ``ok`` and attach their records."""
        for name, info in self.status.items():
            if info["status"] == "pending":
                if len(repetitions.get(name, [])) == self.config.repeat:
                    info["status"] = "ok"
                else:
                    info.update(status="failed", reason="incomplete repetitions")
            info["repetitions"] = repetitions.get(name, [])

    def measured(self) -> list[str]:
        """Contenders with a complete set of repetitions."""
        return [name for name, info in self.status.items() if info["status"] == "ok"]


# ----------------------------------------------------------------------- files


def _filesystem(path: Path) -> str:
    """The file system type holding ``path`` (from ``/proc/mounts``; "?" elsewhere)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and str(path).startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


@contextlib.contextmanager
def scratch_dir(config: RunConfig, scenario: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A fresh temp directory on ``/dev/shm`` (or disk with ``--disk``), removed afterwards.

    Yields the directory and a description of where it is (for the record).
    """
    base: Path | None = None
    if not config.disk and RAM_DIR.is_dir() and os.access(RAM_DIR, os.W_OK):
        base = RAM_DIR
    elif not config.disk:
        log(f"{scenario}: {RAM_DIR} is not usable; falling back to a disk temp dir")
    directory = Path(tempfile.mkdtemp(prefix=f"conduit-bench-{scenario}-", dir=base))
    where = {
        "storage": "ram" if base == RAM_DIR else "disk",
        "directory": str(directory),
        "filesystem": _filesystem(directory),
    }
    try:
        yield directory, where
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def make_source(path: Path, size: int, seed: int = 20240601) -> str:
    """Write ``size`` deterministic, incompressible bytes to ``path``; return their SHA-256.

    A 16 MiB random pattern, with every MiB stamped with its index so that no two
    MiB are alike (a transfer that repeats or skips a block cannot hash right).
    """
    pattern = bytearray(random.Random(seed).randbytes(16 * MiB))
    hasher = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        written = 0
        while written < size:
            block = memoryview(pattern)[: min(len(pattern), size - written)]
            for offset in range(0, len(block), MiB):
                index = (written + offset) // MiB
                block[offset : offset + 8] = index.to_bytes(8, "big")[: len(block[offset:])]
            file.write(block)
            hasher.update(block)
            written += len(block)
    return hasher.hexdigest()


@contextlib.contextmanager
def priming(size: int) -> Iterator[dict[str, Any] | None]:
    """The ``"prime"`` of a transfer client's spec: before each timed operation
    the client writes ``size`` bytes to a scratch file and removes them
    (``peers/_transferlib.prime_memory`` says why). The file goes in a
    directory of its own on ``/dev/shm``, removed on exit with anything a
    killed client left in it. None without ``/dev/shm``.

    Always ``/dev/shm``, even with ``--disk``: on a disk the writes would leave
    writeback and block frees to fall inside the timed transfer.
    """
    if not (RAM_DIR.is_dir() and os.access(RAM_DIR, os.W_OK)):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="conduit-bench-prime-", dir=RAM_DIR) as directory:
        yield {"dir": directory, "bytes": size}


def round_trip_spec(
    source: Path, downloads: Path, prime: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A transfer client's work: upload ``source`` under its own name, then
    download it again into ``downloads``; memory primed before each as
    ``prime`` says (see :func:`priming`; the scenarios prime twice the file's
    size: less left some of the receiver's writes to land on pages handed back
    to the host)."""
    return {
        "kind": "transfer",
        "ops": [
            {"op": "upload", "path": str(source), "name": source.name},
            {"op": "download", "name": source.name, "dir": str(downloads)},
        ],
        "prime": prime,
    }


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, hex."""
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def verify(path: Path, expected: str, what: str) -> None:
    """Raise :class:`PeerError` unless ``path`` exists and hashes to ``expected``."""
    if not path.is_file():
        raise PeerError(f"{what}: {path} does not exist: the transfer is void")
    actual = sha256_of(path)
    if actual != expected:
        raise PeerError(f"{what}: {path} has SHA-256 {actual}, expected {expected}: void")


def clear_dir(directory: Path) -> None:
    """Remove everything inside ``directory`` (hidden partial files too), keep the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def slug(name: str) -> str:
    """A file-name-safe form of a contender name."""
    return "".join(ch if ch.isalnum() else "-" for ch in name)


# ----------------------------------------------------------------------- rows

Repetitions = dict[str, list[dict[str, Any]]]
Getter = Callable[[dict[str, Any]], float | None]


@dataclass(frozen=True)
class Metric:
    """One table line per contender: ``getter`` pulls the figure from a repetition record."""

    group: str
    metric: str
    unit: str
    better: str
    getter: Getter
    #: Limit the line to these contenders (None: every measured one).
    only: tuple[str, ...] | None = None


def series(repetitions: Repetitions, name: str, getter: Getter) -> list[float | None]:
    """The figure of each repetition of ``name`` (None where it is missing)."""
    values: list[float | None] = []
    for record in repetitions.get(name, []):
        try:
            value = getter(record)
        except (KeyError, IndexError, TypeError):
            value = None
        values.append(None if value is None else float(value))
    return values


def ratio(
    values: Sequence[float | None], reference: Sequence[float | None]
) -> dict[str, Any] | None:
    """Per-repetition ``value / reference`` (pairs where both exist), median/min/max."""
    pairs = [(v, r) for v, r in zip(values, reference, strict=False) if v is not None and r]
    if not pairs:
        return None
    return paired_ratio([v for v, _ in pairs], [r for _, r in pairs])


def build_rows(
    repetitions: Repetitions,
    measured: Sequence[str],
    metrics: Sequence[Metric],
    columns: dict[str, str],
) -> list[Row]:
    """Rows for every metric and contender; ``columns`` maps a ratio column to its reference."""
    rows: list[Row] = []
    for metric in metrics:
        names = [n for n in measured if metric.only is None or n in metric.only]
        for name in names:
            values = series(repetitions, name, metric.getter)
            present = [v for v in values if v is not None]
            if not present:
                continue
            ratios = {
                column: ratio(values, series(repetitions, reference, metric.getter))
                for column, reference in columns.items()
                if reference in measured
            }
            rows.append(
                Row(
                    metric.group,
                    metric.metric,
                    metric.unit,
                    name,
                    spread(present),
                    ratios,
                    metric.better,
                )
            )
    return rows


def goal(
    text: str,
    value: float | None,
    target: float,
    *,
    at_most: bool,
    unit: str = "x",
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A goal as measured (reported, never asserted)."""
    met = None if value is None else (value <= target if at_most else value >= target)
    return {
        "goal": text,
        "value": value,
        "target": target,
        "met": met,
        "unit": unit,
        "ratio": detail,
    }


def ratio_goal(
    text: str,
    repetitions: Repetitions,
    name: str,
    reference: str,
    getter: Getter,
    target: float,
    *,
    at_most: bool,
) -> dict[str, Any]:
    """A goal on the median paired ratio ``name / reference``."""
    detail = ratio(series(repetitions, name, getter), series(repetitions, reference, getter))
    value = None if detail is None else float(detail["median"])
    return goal(text, value, target, at_most=at_most, detail=detail)


def median_of(repetitions: Repetitions, name: str, getter: Getter) -> float | None:
    """Median of a contender's figure over its repetitions."""
    present = [v for v in series(repetitions, name, getter) if v is not None]
    return float(spread(present)["median"]) if present else None


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages now (None where unknown)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None
