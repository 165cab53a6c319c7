"""The suite's plumbing: peer processes, statistics, machine info, tables, JSON.

Scenarios (``benchmarks/scenarios/``) build on four ideas:

* every contender runs in its own processes (:class:`ServerProcess`,
  :func:`run_client`): a server that prints ``PORT <n>``, and one client process
  per repetition that prints ``RESULT <json>``;
* repetitions alternate the contenders (:func:`alternating_order`) so slow drift
  of the machine hits all of them;
* every figure is the median of the repetitions, reported with min and max
  (:func:`spread`), and every comparison is a ratio against a reference measured
  in the same run, paired repetition by repetition (:func:`paired_ratio`);
* a scenario returns a :class:`ScenarioResult`; the runner prints its rows as a
  table and stores everything as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Self

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / "peers"
RESULTS_DIR = BENCH_DIR / "results"
SRC_DIR = REPO_ROOT / "src"

SCHEMA_VERSION = 1

# ----------------------------------------------------------------------- config


@dataclass(frozen=True)
class RunConfig:
    """What the command line asked for."""

    quick: bool
    repeat: int
    #: Directory for cProfile dumps of the peers (None: no profiling).
    profile_dir: Path | None = None
    #: Transfer scenarios: files in a disk temp dir instead of RAM (``/dev/shm``).
    disk: bool = False

    @property
    def mode(self) -> str:
        """``"quick"`` or ``"full"``."""
        return "quick" if self.quick else "full"


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------- processes


class PeerError(RuntimeError):
    """A peer process failed, timed out or printed nothing usable."""


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def our_env(profile_dir: Path | None = None, src: Path = SRC_DIR) -> dict[str, str]:
    """Environment for peers that import *this* repository's ``conduit`` (from ``src/``;
    ``src``: another tree's)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    if profile_dir is not None:
        env["CONDUIT_BENCH_PROFILE_DIR"] = str(profile_dir)
    return env


def foreign_env() -> dict[str, str]:
    """Environment for peers in another virtualenv: nothing of ours leaks in."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDUIT_BENCH_PROFILE_DIR"}
    }
    env["PYTHONNOUSERSITE"] = "1"
    return env


class ServerProcess:
    """A peer server: started, its port read from stdout, always stopped.

    Use as a context manager; the process is terminated (then killed) on exit,
    whatever happened inside.
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str], start_timeout: float) -> None:
        self.argv = list(argv)
        self.env = env
        self.start_timeout = start_timeout
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        # Closed in stop(), which __exit__ always calls.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _start(self) -> None:
        line = self._first_line()
        match = re.fullmatch(r"PORT (\d+)", line.strip())
        if match is None:
            raise PeerError(f"unexpected first line from server: {line!r}")
        self.port = int(match.group(1))

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        return None if self._process is None else self._process.pid

    def _launch(self) -> None:
        self._process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=self.env,
            cwd=PEERS_DIR,
        )

    def _first_line(self) -> str:
        """Start the process (unless launched) and return its first line (within the timeout)."""
        if self._process is None:
            self._launch()
        assert self._process is not None and self._process.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self._process.stdout, selectors.EVENT_READ)
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PeerError(
                        f"{self.argv[1]} printed nothing within {self.start_timeout:g}s\n"
                        + self.stderr_tail()
                    )
                if not selector.select(remaining):
                    continue
                chunk = os.read(self._process.stdout.fileno(), 4096)
                if not chunk:
                    raise PeerError(
                        f"{self.argv[1]} exited (code {self._process.wait()}) before its "
                        "first line\n" + self.stderr_tail()
                    )
                buffer += chunk
        return buffer.split(b"\n", 1)[0].decode()

    def stderr_tail(self) -> str:
        """The last lines the server wrote to stderr."""
        self._stderr.seek(0)
        return _tail(self._stderr.read().decode(errors="replace"))

    def check_alive(self) -> None:
        """Raise :class:`PeerError` if the server has died."""
        if self._process is not None and self._process.poll() is not None:
            raise PeerError(f"server died (code {self._process.returncode})\n" + self.stderr_tail())

    def cpu_seconds(self) -> float | None:
        """User + system CPU the server has used so far (Linux ``/proc``; else None)."""
        if self._process is None:
            return None
        return process_cpu_seconds(self._process.pid)

    def stop(self) -> None:
        """Terminate, wait up to 5 s, then kill. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
            if process.stdout is not None:
                process.stdout.close()
        self._stderr.close()


class HoldingProcess(ServerProcess):
    """A client that sets something up, prints ``READY <json>`` and holds it until SIGTERM.

    Used to keep many idle connections open while the server is measured;
    :attr:`ready` holds the JSON object of the ``READY`` line.
    """

    ready: dict[str, Any]

    @staticmethod
    def start_all(processes: Sequence[HoldingProcess], stack: contextlib.ExitStack) -> None:
        """Launch every process at once, then wait for each one's ``READY``.

        Each is registered on ``stack`` (stopped when it closes), even if another fails.
        """
        for process in processes:
            stack.callback(process.stop)
            process._launch()
        for process in processes:
            process._start()

    def _start(self) -> None:
        line = self._first_line().strip()
        if not line.startswith("READY "):
            raise PeerError(f"unexpected first line from client: {line!r}\n" + self.stderr_tail())
        self.ready = json.loads(line[len("READY ") :])


def memory_kib(pid: int | None) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of a live process, in KiB (Linux; else {})."""
    figures: dict[str, int] = {}
    if pid is None:
        return figures
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0])
    return figures


class RssSampler:
    """Sample a process's RSS every ``interval`` seconds in a thread while the block runs.

    ::

        with RssSampler(pid) as sampler:
            run_client(...)
        sampler.peak_kib, sampler.samples
    """

    def __init__(self, pid: int | None, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while True:
            rss = memory_kib(self.pid).get("VmRSS")
            if rss is not None:
                self.samples.append(rss)
            if self._stop.wait(self.interval):
                return

    @property
    def peak_kib(self) -> int | None:
        """The largest RSS sampled."""
        return max(self.samples) if self.samples else None

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process from ``/proc/<pid>/stat``, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class TaskTimes:
    """One thread's scheduler counters, from ``/proc/<pid>/task/<tid>``."""

    #: Its name (``comm``): Trio names its worker threads while they run a job.
    name: str
    #: Nanoseconds it ran on a core (``schedstat``, first field).
    run_ns: int
    #: Nanoseconds it was runnable but waited for a core (``schedstat``, second field).
    wait_ns: int
    #: Times it slept (``voluntary_ctxt_switches``).
    voluntary: int
    #: Times it was taken off a core while it could still run (``nonvoluntary_ctxt_switches``).
    involuntary: int


def task_times(pid: int) -> dict[str, TaskTimes]:
    """Thread id -> :class:`TaskTimes` of each live thread of ``pid``; empty without ``/proc``."""
    found: dict[str, TaskTimes] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            name = (task / "comm").read_text().strip()
            run_ns, wait_ns = map(int, (task / "schedstat").read_text().split()[:2])
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        voluntary = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        involuntary = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
        found[task.name] = TaskTimes(name, run_ns, wait_ns, voluntary, involuntary)
    return found


def established_connections(pid: int, port: int) -> int | None:
    """TCP connections of ``pid`` ESTABLISHED on its local ``port``, or None without ``/proc``.

    Counted on the server's side, from its own descriptors (``/proc/<pid>/fd``)
    and the kernel's socket tables (``/proc/<pid>/net/tcp`` and ``tcp6``): what a
    client reports holding proves nothing about what the server still holds.
    """
    try:
        entries = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    inodes = set()
    for entry in entries:
        try:
            link = os.readlink(entry)
        except OSError:
            continue  # closed since the listing (the listing's own descriptor, for one)
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def thread_stats(pid: int) -> dict[str, tuple[str, int, int]]:
    """Thread id -> (name, CPU ns, voluntary switches) of each live thread of ``pid``.

    From ``/proc/<pid>/task/*`` (:func:`task_times`): nanoseconds
    (``schedstat``), where ``/proc/<pid>/stat`` counts 10 ms ticks. Empty
    where there is no ``/proc``.
    """
    return {
        tid: (times.name, times.run_ns, times.voluntary) for tid, times in task_times(pid).items()
    }


def run_client(argv: Sequence[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run one client process to completion and return its ``RESULT`` object."""
    try:
        completed = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            cwd=PEERS_DIR,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if exc.stderr else ""
        raise PeerError(f"client timed out after {timeout:g}s\n{_tail(stderr)}") from None
    return client_result(completed.returncode, completed.stdout, completed.stderr)


def client_result(returncode: int, stdout_bytes: bytes, stderr_bytes: bytes) -> dict[str, Any]:
    """The ``RESULT`` of a client process that ended, or :class:`PeerError` saying why not."""
    stdout = stdout_bytes.decode(errors="replace")
    stderr = stderr_bytes.decode(errors="replace")
    if returncode != 0:
        raise PeerError(f"client exited with code {returncode}\n{_tail(stderr)}")
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    raise PeerError(f"client printed no RESULT line\n{_tail(stdout)}\n{_tail(stderr)}")


# ----------------------------------------------------------------------- statistics


def alternating_order(names: Sequence[str], repetition: int) -> list[str]:
    """Forward on even repetitions, reversed on odd ones (A B C, C B A, ...).

    Each contender runs once per repetition, neighbours are interleaved, and no
    contender is always first or always last.
    """
    return list(names) if repetition % 2 == 0 else list(reversed(names))


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of one figure over the repetitions (plus the raw values)."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": list(values),
    }


def paired_ratio(values: Sequence[float], reference: Sequence[float]) -> dict[str, Any] | None:
    """``value / reference`` per repetition (same run, adjacent in time); median, min, max."""
    pairs = [(v, r) for v, r in zip(values, reference, strict=False) if r]
    if not pairs:
        return None
    return spread([v / r for v, r in pairs])


# ----------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the table: one figure of one contender."""

    group: str
    metric: str
    unit: str
    contender: str
    stats: dict[str, Any]
    #: ratio name (``"x bare-trio"``) -> :func:`paired_ratio` result.
    ratios: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    #: ``"lower"`` or ``"higher"`` is better.
    better: str = "lower"

    def as_json(self) -> dict[str, Any]:
        """The row as stored in the JSON document."""
        return {
            "group": self.group,
            "metric": self.metric,
            "unit": self.unit,
            "better": self.better,
            "contender": self.contender,
            **{key: self.stats[key] for key in ("median", "min", "max", "n", "values")},
            "ratios": self.ratios,
        }


@dataclass
class ScenarioResult:
    """Everything one scenario measured, ready for the table and the JSON file."""

    name: str
    config: dict[str, Any]
    contenders: dict[str, dict[str, Any]]
    rows: list[Row]
    ratio_columns: list[str]
    goals: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        """The scenario as stored in the JSON document."""
        return {
            "config": self.config,
            "contenders": self.contenders,
            "rows": [row.as_json() for row in self.rows],
            "ratio_columns": self.ratio_columns,
            "goals": self.goals,
            "notes": self.notes,
            "duration_s": self.duration_s,
        }


def _format_number(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table; first column left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(cell).ljust(width) if index < 3 else str(cell).rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def goal_value_text(goal: dict[str, Any]) -> str:
    """A measured goal's value in its unit: ``0.54x`` for a ratio, ``6.5 ms``, ``100.0 %``.

    A value under 1 in its unit keeps two decimals (``0.46 ms``): one would
    round a goal's figure by up to a tenth of its own size.
    """
    unit = goal.get("unit", "x")
    value = goal["value"]
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.2f} {unit}" if abs(value) < 1 else f"{value:.1f} {unit}"


def render_scenario(result: ScenarioResult, mode: str) -> str:
    """The scenario's table, unavailable contenders, goals and notes as text.

    ``mode`` ("quick" or "full") heads it: a quick run's sizes are too small
    to judge a goal by, and its verdicts say so.
    """
    headers = ["group", "metric", "contender", "median", "min", "max", "unit"]
    headers += result.ratio_columns
    body: list[list[str]] = []
    previous_group = None
    for row in result.rows:
        ratio_cells = []
        for column in result.ratio_columns:
            ratio = row.ratios.get(column)
            ratio_cells.append("" if ratio is None else f"{ratio['median']:.2f}x")
        body.append(
            [
                row.group if row.group != previous_group else "",
                row.metric,
                row.contender,
                _format_number(row.stats["median"]),
                _format_number(row.stats["min"]),
                _format_number(row.stats["max"]),
                row.unit,
                *ratio_cells,
            ]
        )
        previous_group = row.group
    parts = [
        f"== scenario {result.name} ({mode} mode, {result.duration_s:.0f} s) ==",
        format_table(headers, body),
    ]
    missing = {name: info for name, info in result.contenders.items() if info.get("status") != "ok"}
    if missing:
        parts.append("not measured:")
        for name, info in missing.items():
            lines = str(info.get("reason", "")).strip().splitlines() or [""]
            summary = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
            parts.append(f"  {name}: {info.get('status')}: {summary}")
    if result.goals:
        parts.append(
            "goals (reported, not asserted):"
            if mode == "full"
            else f"goals (reported, not asserted; {mode} mode: sizes too small to judge a goal):"
        )
        for goal in result.goals:
            if goal.get("value") is None:
                verdict = "not measured"
            else:
                verdict = f"{goal_value_text(goal)} -> {'met' if goal['met'] else 'MISSED'}"
            context = f" ({goal['context']})" if goal.get("context") else ""
            parts.append(f"  {goal['goal']}: {verdict}{context}")
    if result.notes:
        parts.append("notes:")
        parts += [f"  - {note}" for note in result.notes]
    return "\n".join(parts)


# ----------------------------------------------------------------------- machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_total_mib() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _conduit_version() -> str | None:
    with contextlib.suppress(OSError):
        text = (SRC_DIR / "conduit" / "_version.py").read_text()
        match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
        if match:
            return match.group(1)
    return None


def _git(*args: str, cwd: Path = REPO_ROOT) -> str | None:
    """Read-only git queries (commit, dirty state) for the record."""
    if shutil.which("git") is None:
        return None
    try:
        completed = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    # Only the end is stripped: `status --porcelain` lines begin with a space
    # for a change not staged, which is part of the line's format.
    return completed.stdout.rstrip() if completed.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    """CPU, cores, OS, Python and library versions of the machine running the suite."""
    try:
        usable_cores: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count()
    try:
        load: list[float] | None = list(os.getloadavg())
    except OSError:
        load = None
    status = _git("status", "--porcelain")
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores,
        "memory_total_mib": _memory_total_mib(),
        "load_average_at_start": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "versions": {
            "conduit": _conduit_version(),
            "trio": _version("trio"),
            "cryptography": _version("cryptography"),
            "attrs": _version("attrs"),
            "cattrs": _version("cattrs"),
            "msgpack": _version("msgpack"),
            "spake2": _version("spake2"),
        },
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        # What made it dirty, so that a record can be told apart from its
        # commit's code: the results of an earlier run are not code changes.
        "git_changes": None if status is None else _changed_paths(status),
    }


#: The most changed paths a record lists (the count says when there were more).
_MAX_CHANGES_LISTED = 50


def _changed_paths(porcelain: str) -> dict[str, Any]:
    """``git status --porcelain`` as a count, the paths (up to
    :data:`_MAX_CHANGES_LISTED`), and whether any is code the suite runs."""
    paths = [line[3:] for line in porcelain.splitlines() if len(line) > 3]
    code = [p for p in paths if p.startswith(("src/", "benchmarks/")) and p.endswith(".py")]
    return {"count": len(paths), "paths": paths[:_MAX_CHANGES_LISTED], "code_changed": bool(code)}


def default_results_path(now: float | None = None) -> Path:
    """``benchmarks/results/<UTC timestamp>.json``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return RESULTS_DIR / f"{stamp}.json"


def write_json(document: dict[str, Any], path: Path) -> None:
    """Write atomically (``.tmp`` then rename), creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    temporary.replace(path)


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as elapsed: ...`` then ``elapsed[0]`` holds the seconds."""
    box: list[float] = []
    started = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - started)


def probe(python: str, env: dict[str, str], code: str) -> str | None:
    """None if ``code`` runs under ``python``, else the last line of its error."""
    completed = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    if completed.returncode == 0:
        return None
    return (completed.stderr.strip().splitlines() or ["?"])[-1]


def probe_asyncio_shim(python: str, env: dict[str, str]) -> str | None:
    """None if this tree's asyncio shim imports under ``python``, else why not.

    Probes a public name of the shim (``run_in_trio``), so that moving a
    private helper between modules never disables the asyncio contenders.
    """
    reason = probe(python, env, "import conduit, conduit._asyncio as shim; shim.run_in_trio")
    return None if reason is None else f"asyncio shim not importable in this tree: {reason}"
