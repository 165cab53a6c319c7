"""Helpers shared by the file-transfer peers (``bulk``, ``memory``, ``hol``, ``smallfiles``...).

Standard library only, like :mod:`_peerlib`: the netconduit and SFTP peers run
in other virtualenvs.

A transfer client's ``--spec`` is a JSON object with a ``kind``:

* ``{"kind": "transfer", "server_pid": 123, "ops": [{"op": "upload", "path":
  SRC, "name": NAME}, {"op": "download", "name": NAME, "dir": DIR}]}`` runs
  the operations one after another and reports one :class:`OpTimer` figure per
  operation (wall time, client CPU, server CPU read from ``/proc``);
* ``{"kind": "smallfiles", "dir": SRC_DIR, "names": [...], "concurrency": 8}``
  uploads many small files (or ``"slices": [...]``, paced over stdin: see
  :class:`SmallFileSteps`);
* ``{"kind": "hol", ...}`` times RPCs while a bulk upload runs (conduit,
  netconduit);
* ``{"kind": "idle", "connections": N}`` opens ``N`` authenticated connections,
  prints ``READY <json>`` and holds them until SIGTERM (conduit, netconduit).

Every operation's result carries the path of the file it produced, so that the
orchestrator can hash it against the source: a benchmark that moves wrong
bytes is void.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from types import TracebackType
from typing import Any

MB = 1_000_000


def proc_cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of process ``pid`` from ``/proc/<pid>/stat`` (Linux), else None."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
        fields = text[text.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class OpTimer:
    """Wall time, this process's CPU (all threads) and the server's CPU of one operation.

    ::

        with OpTimer(server_pid) as timer:
            ...
        figures = timer.figures(nbytes)
    """

    def __init__(self, server_pid: int | None, prime: dict[str, Any] | None = None) -> None:
        """``prime``: the spec's ``"prime"`` (see :func:`prime_memory`), done on entry."""
        self.server_pid = server_pid
        self.prime = prime
        self.primed: bool | None = None
        self._wall = self._cpu = 0
        self._server: float | None = None
        self.wall_ns = self.cpu_ns = 0
        self.server_cpu_s: float | None = None
        #: The operation's window on the system's monotonic clock (seconds), which
        #: other processes read too (``benchmarks.bulk_threads`` cuts its samples by it).
        self.started_s = self.ended_s = 0.0

    def __enter__(self) -> OpTimer:
        # Last thing before the clocks start: see prime_memory for why.
        if self.prime is not None:
            self.primed = prime_memory(self.prime)
        self._server = proc_cpu_seconds(self.server_pid)
        self._cpu = time.process_time_ns()
        self.started_s = time.monotonic()
        self._wall = time.perf_counter_ns()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.wall_ns = time.perf_counter_ns() - self._wall
        self.ended_s = time.monotonic()
        self.cpu_ns = time.process_time_ns() - self._cpu
        after = proc_cpu_seconds(self.server_pid)
        if self._server is not None and after is not None:
            self.server_cpu_s = after - self._server

    def figures(self, nbytes: int) -> dict[str, Any]:
        """Throughput (decimal MB/s) and CPU per GiB moved."""
        wall = self.wall_ns / 1e9
        gib = nbytes / 2**30 if nbytes else 0.0
        return {
            "bytes": nbytes,
            "wall_s": wall,
            "mb_per_s": nbytes / MB / wall if wall > 0 else None,
            "client_cpu_s": self.cpu_ns / 1e9,
            "server_cpu_s": self.server_cpu_s,
            "client_cpu_s_per_gib": self.cpu_ns / 1e9 / gib if gib else None,
            "server_cpu_s_per_gib": (
                self.server_cpu_s / gib if gib and self.server_cpu_s is not None else None
            ),
            "primed": self.primed,
            "started_s": self.started_s,
            "ended_s": self.ended_s,
        }


class DataWindow:
    """When an upload's data flowed: its first progress report to its last one below 100 %.

    Pass :meth:`on_progress` as the upload's progress callback (conduit's and
    netconduit's progress objects both have ``transferred`` and
    ``total_size``). The report of 100 % is not the end: conduit reports at
    most every 0.1 s while it sends, and its report of 100 % comes when the
    upload returns, after the server's verify, fsync and publish; netconduit
    reports after each chunk's answer. So the window ends at the last report
    of a count below the size: at most 0.1 s (conduit) or one chunk
    (netconduit) before the last data left. What comes before the first
    report (the begin's round trip) and after the window is left out, so that
    calls timed "during the data" met the data on the connection.
    """

    def __init__(self) -> None:
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self._first_cpu_ns = 0
        #: This process's CPU between the first and the last report below 100 %.
        self.cpu_ns = 0

    def on_progress(self, progress: Any) -> None:
        """The upload's progress callback."""
        if progress.transferred >= progress.total_size:
            return
        now = time.perf_counter_ns()
        if self.first_ns is None:
            self.first_ns = now
            self._first_cpu_ns = time.process_time_ns()
        self.last_ns = now
        self.cpu_ns = time.process_time_ns() - self._first_cpu_ns

    @property
    def wall_ns(self) -> int:
        """The window's length; 0 without one."""
        if self.first_ns is None or self.last_ns is None:
            return 0
        return self.last_ns - self.first_ns

    def calls_within(self, starts_ns: list[int], latencies_ns: list[int]) -> list[int]:
        """The latencies of the calls that started inside the window (none without one)."""
        if self.first_ns is None or self.last_ns is None:
            return []
        first, last = self.first_ns, self.last_ns
        return [
            latency
            for start, latency in zip(starts_ns, latencies_ns, strict=True)
            if first <= start <= last
        ]


def prime_memory(prime: dict[str, Any]) -> bool:
    """Write ``prime["bytes"]`` to a scratch file in ``prime["dir"]``, then remove it;
    whether it could (no room, or an error: nothing done, the operation runs unprimed).

    The project's machine is a VM whose guest reports free memory back to its
    host (virtio-balloon free page reporting): a page freed more than a moment
    ago may have been handed back, and writing to it again costs the host a
    fault and a zeroed page. On that machine writing a gibibyte into such
    pages took 2.9 s of system CPU, against 0.33 s for pages freed just
    before; how many it got depended on how long ago, and in which
    contender's turn, memory was last freed. Written and freed right before
    each timed operation, as much memory as it writes is fresh for every
    contender alike.
    """
    directory, size = str(prime["dir"]), int(prime["bytes"])
    block = bytes(2**20)
    path = os.path.join(directory, f".conduit-bench-prime-{os.getpid()}")
    try:
        if shutil.disk_usage(directory).free < size:
            return False
        with open(path, "wb") as file:
            for _ in range(-(-size // len(block))):
                file.write(block)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return True


def announce_ready(info: dict[str, Any]) -> None:
    """Tell the orchestrator that a holding client is in place (``idle`` kind)."""
    print("READY " + json.dumps(info), flush=True)


def memory_status(pid: int | None = None) -> dict[str, int]:
    """VmRSS / VmHWM (KiB) of ``pid`` (default: this process) from ``/proc``; {} elsewhere."""
    figures: dict[str, int] = {}
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    figures[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return figures


def file_size(path: str) -> int:
    """Size of a local file (a plain function: async peers call it between awaits)."""
    return os.stat(path).st_size


def split(total: int, parts: int) -> list[int]:
    """``total`` items as evenly as possible over ``parts`` workers."""
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


class SmallFileSteps:
    """The ``smallfiles`` kind's work, in one step or in steps the orchestrator paces.

    Without ``"slices"`` in the spec the client uploads ``spec["names"]`` from
    ``spec["dir"]`` in one timed step, as before. With ``"slices": [{"dir": D,
    "names": [...]}, ...]`` it connects once, prints ``READY {}`` and then
    uploads one slice per ``GO <index>`` line on its stdin (answering ``DONE
    <figures>``) until ``END``: the orchestrator runs every contender's slice
    ``k`` before any contender's slice ``k + 1``, so that a change of the
    machine's state falls on all of them alike, while each contender still
    uploads all its files on one connection. Only the uploads are timed; the
    result adds the slices' wall and CPU times up.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self.stepped = "slices" in spec
        self.slices: list[dict[str, Any]] = (
            list(spec["slices"]) if self.stepped else [{"dir": spec["dir"], "names": spec["names"]}]
        )
        self.server_pid: int | None = spec.get("server_pid")
        self.steps: list[dict[str, Any]] = []
        self._given = 0

    def ready(self) -> None:
        """Tell a pacing orchestrator that the connection is up (stepped only)."""
        if self.stepped:
            announce_ready({"slices": len(self.slices)})

    def next_slice(self) -> dict[str, Any] | None:
        """The next slice to upload, or None when done (blocks on stdin when stepped)."""
        if not self.stepped:
            self._given += 1
            return self.slices[0] if self._given == 1 else None
        line = sys.stdin.readline().split()
        if not line or line[0] == "END":
            return None
        if line[0] != "GO" or len(line) != 2:
            raise ValueError(f"unexpected step line {line!r}")
        return self.slices[int(line[1])]

    def finished(self, files: int, timer: OpTimer) -> None:
        """Record one timed slice (and answer ``DONE`` when stepped)."""
        figures = timer.figures(0)
        step = {
            "files": files,
            "wall_s": figures["wall_s"],
            "client_cpu_s": figures["client_cpu_s"],
            "server_cpu_s": figures["server_cpu_s"],
        }
        self.steps.append(step)
        if self.stepped:
            print("DONE " + json.dumps(step), flush=True)

    def result(self, concurrency: int) -> dict[str, Any]:
        """The kind's figures: every slice's files over the sum of their wall times."""
        files = sum(step["files"] for step in self.steps)
        wall = sum(step["wall_s"] for step in self.steps)
        server = [step["server_cpu_s"] for step in self.steps]
        return {
            "files": files,
            "concurrency": concurrency,
            "wall_s": wall,
            "files_per_s": files / wall if wall > 0 else None,
            "client_cpu_s": sum(step["client_cpu_s"] for step in self.steps),
            "server_cpu_s": None if None in server else sum(server),
            "slices": len(self.steps),
            "slice_wall_s": [step["wall_s"] for step in self.steps],
        }
