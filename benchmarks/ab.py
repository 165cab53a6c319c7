"""Compare two source trees of conduit pair by pair: ``python -m benchmarks.ab A B``.

The scenarios (``python -m benchmarks``) measure this tree against other
libraries. A change to conduit is measured against the tree before it, and on
a shared machine two runs minutes apart do not decide a 5 % question: the
machine's speed moves more than that from one minute to the next. This tool
runs the same work on tree A and on tree B back to back, ``--pairs`` times,
the order swapped on every other pair (A B, B A, A B, ...), and prints each
figure's median (min-max) per tree, the paired ratio B / A (each pair's two
runs are neighbours in time), and in how many pairs B did better.

A tree is a directory holding conduit's ``src/`` and ``benchmarks/peers/``,
for example ``git worktree add --detach /tmp/base HEAD~1``. Each tree runs its
own peer scripts with its own ``src/`` first on ``PYTHONPATH``, so the trees
may differ anywhere, peers included, as long as the peers keep their command
line. The interpreter is this one (``sys.executable``).

Work (``--work``), each on its scenario's peer scripts:

* ``rpc``: the ``rpc`` scenario's 100-byte echo (``peers/conduit_peer.py``),
  one workload of ``--callers`` concurrent callers and ``--calls`` calls on
  one connection, after the scenario's warm-up; calls/s, p50, and the
  client's and the server's CPU per timed call. The server's comes from
  ``/proc/<pid>/task/*/schedstat``: its CPU over the whole client run, less
  its CPU over a client run of the warm-up and one call on the same server
  just before, per call of the difference (``--calls`` less one). Too few
  calls make that difference noise (give the timed run at least a few
  hundred milliseconds).
* ``smallfiles``: the ``smallfiles`` scenario's upload
  (``peers/conduit_transfer.py``), ``--files`` files of 4 KiB with
  ``--concurrency`` in flight (1: one after the other), in one step (the
  scenario paces its slices between contenders instead); files/s, CPU per
  file. Every stored file is checked against its SHA-256.
* ``bulk``: one file of ``--size`` MiB uploaded, then downloaded again; MB/s
  and CPU per GiB each way. The downloaded copy is checked against the source.

Each client runs on Trio, or with ``--flavor asyncio`` under ``asyncio.run``
through the shim (the servers always on Trio).

Files live in a scratch directory on ``/dev/shm`` (``--disk``, or where
``/dev/shm`` is not writable: the system's temporary directory; the output
says which), removed at the end. Each client must have imported conduit from
its tree's ``src/`` (the server runs with the same environment). A run that
fails ends the comparison: the runs done so far are printed (and written to
``--json-out``) with the error, and the exit status is 1. Figures are
wall-clock and CPU measurements of real processes over loopback: read them as
the scenarios' (see ``benchmarks/README.md``), and never as a timing
assertion.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._harness import (
    PeerError,
    ServerProcess,
    _format_number,
    alternating_order,
    format_table,
    our_env,
    paired_ratio,
    run_client,
    spread,
    thread_stats,
)
from .scenarios._transfer import RAM_DIR, make_source, priming, round_trip_spec, verify
from .scenarios.rpc import COUNTS, PAYLOAD_SIZE
from .scenarios.smallfiles import FILE_SIZE

MiB = 1024 * 1024
#: Seconds a peer server may take to print its port.
START_TIMEOUT = 30.0
#: Seconds one client run may take before it counts as hung.
CLIENT_TIMEOUT = 900.0
#: Calls before the timed ones (the ``rpc`` scenario's full-mode warm-up).
RPC_WARMUP = COUNTS["full"]["warmup"]


@dataclass(frozen=True)
class Tree:
    """One side of the comparison: a directory with conduit's sources and peers."""

    label: str
    path: Path

    @classmethod
    def checked(cls, label: str, path: str) -> Tree:
        """``path`` as a tree, or :class:`SystemExit` saying what it lacks."""
        root = Path(path).resolve()
        for needed in ("src/conduit/__init__.py", "benchmarks/peers/_peerlib.py"):
            if not (root / needed).is_file():
                raise SystemExit(f"{path}: not a conduit tree (no {needed})")
        return cls(label, root)

    def peer(self, script: str) -> str:
        """The absolute path of one of this tree's peer scripts."""
        return str(self.path / "benchmarks" / "peers" / script)

    def env(self) -> dict[str, str]:
        """The environment for this tree's peers: its ``src/`` first on the path, no profiling."""
        env = our_env(src=self.path / "src")
        env.pop("CONDUIT_BENCH_PROFILE_DIR", None)
        return env

    def describe(self) -> str:
        """The tree's path and, when it is a git checkout, its commit (``+`` if changed)."""
        try:
            commit = self._git("rev-parse", "--short", "HEAD")
            # Untracked files count where they can change what runs.
            changed = self._git("status", "--porcelain", "--", "src", "benchmarks/peers")
        except (OSError, subprocess.SubprocessError):
            return str(self.path)
        return f"{self.path} ({commit}{'+' if changed else ''})"

    def _git(self, *args: str) -> str:
        command = ["git", "-C", str(self.path), *args]
        return subprocess.run(
            command, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()


@dataclass(frozen=True)
class Figure:
    """One figure a work reports: its name, and which way is better."""

    name: str
    higher_is_better: bool


Figures = dict[str, float]
Work = Callable[[Tree, argparse.Namespace, Path], Figures]


def _measured(tree: Tree, argv: list[str]) -> dict[str, Any]:
    """Run one client of ``tree``; its result, once sure it ran this tree's conduit."""
    result = run_client(argv, tree.env(), CLIENT_TIMEOUT)
    module_file = result.get("runtime", {}).get("module_file")
    if not module_file or not Path(module_file).resolve().is_relative_to(tree.path / "src"):
        raise PeerError(f"{tree.label}: the client imported conduit from {module_file}")
    return result


def _rpc(tree: Tree, options: argparse.Namespace, scratch: Path) -> Figures:
    def spec(callers: int, calls: int) -> dict[str, Any]:
        workload = {"name": "ab", "callers": callers, "calls": calls}
        return {"payload_size": PAYLOAD_SIZE, "warmup": RPC_WARMUP, "workloads": [workload]}

    # The peer makes its warm-up calls only before a workload: one call stands in.
    warm_up_only, timed = spec(1, 1), spec(options.callers, options.calls)
    argv = [sys.executable, tree.peer("conduit_peer.py")]
    server_cpu: list[float | None] = []
    with ServerProcess([*argv, "server"], tree.env(), START_TIMEOUT) as server:
        assert server.pid is not None
        # The server's CPU for the timed calls alone: a client run of the
        # warm-up alone, then the measured run; the difference of their costs
        # (the warm-up is one caller's, far dearer per call than a burst's).
        for run in (warm_up_only, timed):
            before = thread_stats(server.pid)
            client = [*argv, "client", "--port", str(server.port), "--spec", json.dumps(run)]
            result = _measured(tree, [*client, "--flavor", options.flavor])
            server_cpu.append(cpu_seconds_since(before, thread_stats(server.pid)))
    figures = result["workloads"]["ab"]
    warm, measured = server_cpu
    return {
        "calls/s": figures["calls_per_s"],
        "p50, us": figures["p50_us"],
        "client CPU per call, us": figures["cpu_us_per_call"],
        "server CPU per call, us": _per_unit(
            None if warm is None or measured is None else measured - warm, options.calls - 1
        ),
    }


def cpu_seconds_since(
    before: dict[str, tuple[str, int, int]], after: dict[str, tuple[str, int, int]]
) -> float | None:
    """CPU seconds a process's threads used between two :func:`thread_stats` readings.

    Nanoseconds, where ``/proc/<pid>/stat`` counts 10 ms ticks: the difference
    of two client runs is only some tens of ticks. A thread that ended in
    between is left out (its time before ``before`` must not count against
    the others); one that started counts whole. None without ``/proc``.
    """
    if not before or not after:
        return None
    used = sum(cpu - before.get(tid, (name, 0, 0))[1] for tid, (name, cpu, _) in after.items())
    return used / 1e9


def _per_unit(seconds: float | None, count: int) -> float:
    """Microseconds per unit, or NaN where the CPU time could not be read (no ``/proc``)."""
    return float("nan") if seconds is None else seconds / count * 1e6


def _transfer(tree: Tree, storage: Path, spec: dict[str, Any], flavor: str) -> dict[str, Any]:
    """Run ``spec`` on a transfer client of ``tree`` (under ``flavor``), its server
    storing into ``storage``."""
    argv = [sys.executable, tree.peer("conduit_transfer.py")]
    with ServerProcess(
        [*argv, "server", "--spec", json.dumps({"storage": str(storage)})],
        tree.env(),
        START_TIMEOUT,
    ) as server:
        spec = {**spec, "server_pid": server.pid}
        client = [*argv, "client", "--port", str(server.port), "--spec", json.dumps(spec)]
        return _measured(tree, [*client, "--flavor", flavor])


def _small_sources(scratch: Path, count: int) -> tuple[Path, dict[str, str]]:
    """``count`` files of random bytes and name -> SHA-256, made once per comparison."""
    source = scratch / "small-source"
    listing = scratch / "small-source.json"
    if listing.exists():
        digests: dict[str, str] = json.loads(listing.read_text())
        return source, digests
    source.mkdir()
    digests = {}
    for number in range(count):
        name, data = f"small-{number:05d}.bin", os.urandom(FILE_SIZE)
        (source / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    listing.write_text(json.dumps(digests))
    return source, digests


def _smallfiles(tree: Tree, options: argparse.Namespace, scratch: Path) -> Figures:
    source, digests = _small_sources(scratch, options.files)
    storage = Path(tempfile.mkdtemp(prefix="store-", dir=scratch))
    spec = {
        "kind": "smallfiles",
        "dir": str(source),
        "names": sorted(digests),
        "concurrency": options.concurrency,
    }
    try:
        result = _transfer(tree, storage, spec, options.flavor)
        for name, digest in digests.items():
            verify(storage / name, digest, f"{tree.label}: stored {name}")
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    figures = result["smallfiles"]
    files = figures["files"]
    return {
        "files/s": figures["files_per_s"],
        "client CPU per file, us": _per_unit(figures["client_cpu_s"], files),
        "server CPU per file, us": _per_unit(figures["server_cpu_s"], files),
    }


def _bulk(tree: Tree, options: argparse.Namespace, scratch: Path) -> Figures:
    source = scratch / f"bulk-{options.size}MiB.bin"
    digest_file = source.with_suffix(".sha256")
    if not source.exists():
        digest_file.write_text(make_source(source, options.size * MiB))
    expected = digest_file.read_text()
    work = Path(tempfile.mkdtemp(prefix="bulk-", dir=scratch))
    storage, downloads = work / "store", work / "down"
    storage.mkdir()
    downloads.mkdir()
    try:
        with priming(2 * options.size * MiB) as prime:
            result = _transfer(
                tree, storage, round_trip_spec(source, downloads, prime), options.flavor
            )
        verify(storage / source.name, expected, f"{tree.label}: uploaded copy")
        verify(downloads / source.name, expected, f"{tree.label}: downloaded copy")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    upload, download = result["ops"]
    return {
        "upload MB/s": upload["mb_per_s"],
        "download MB/s": download["mb_per_s"],
        "upload client CPU, s/GiB": upload["client_cpu_s_per_gib"],
        "upload server CPU, s/GiB": upload["server_cpu_s_per_gib"],
        "download client CPU, s/GiB": download["client_cpu_s_per_gib"],
        "download server CPU, s/GiB": download["server_cpu_s_per_gib"],
    }


#: Each work, and which way each of its figures is better.
WORKS: dict[str, tuple[Work, tuple[Figure, ...]]] = {
    "rpc": (
        _rpc,
        (
            Figure("calls/s", True),
            Figure("p50, us", False),
            Figure("client CPU per call, us", False),
            Figure("server CPU per call, us", False),
        ),
    ),
    "smallfiles": (
        _smallfiles,
        (
            Figure("files/s", True),
            Figure("client CPU per file, us", False),
            Figure("server CPU per file, us", False),
        ),
    ),
    "bulk": (
        _bulk,
        (
            Figure("upload MB/s", True),
            Figure("download MB/s", True),
            Figure("upload client CPU, s/GiB", False),
            Figure("upload server CPU, s/GiB", False),
            Figure("download client CPU, s/GiB", False),
            Figure("download server CPU, s/GiB", False),
        ),
    ),
}


def run_pairs(
    trees: Sequence[Tree],
    work: Work,
    options: argparse.Namespace,
    scratch: Path,
    runs: dict[str, list[Figures]],
) -> None:
    """``options.pairs`` runs of ``work`` on each tree, alternating, into ``runs`` (per tree).

    Filled run by run, so that what was measured before a failure is kept.
    """
    for tree in trees:
        runs.setdefault(tree.label, [])
    by_label = {tree.label: tree for tree in trees}
    for pair in range(options.pairs):
        for label in alternating_order(list(by_label), pair):
            figures = work(by_label[label], options, scratch)
            runs[label].append(figures)
            shown = ", ".join(f"{name} {_format_number(value)}" for name, value in figures.items())
            print(f"pair {pair + 1}/{options.pairs} {label}: {shown}", file=sys.stderr, flush=True)


def compare(
    runs: dict[str, list[Figures]], figures: Sequence[Figure], base: str, other: str
) -> dict[str, dict[str, Any]]:
    """Per figure: each tree's spread, the paired ratio ``other / base``, pairs ``other`` won.

    Only whole pairs count (a comparison cut short by a failure may end with
    one tree's run alone); none at all gives an empty summary.
    """
    summary: dict[str, dict[str, Any]] = {}
    pairs = min(len(runs[base]), len(runs[other]))
    if not pairs:
        return summary
    for figure in figures:
        values = {
            label: [run[figure.name] for run in runs[label][:pairs]] for label in (base, other)
        }
        better = sum(
            (b > a) if figure.higher_is_better else (b < a)
            for a, b in zip(values[base], values[other], strict=True)
        )
        summary[figure.name] = {
            base: spread(values[base]),
            other: spread(values[other]),
            "ratio": paired_ratio(values[other], values[base]),
            "better_pairs": better,
            "higher_is_better": figure.higher_is_better,
        }
    return summary


def _median_text(figures: dict[str, Any]) -> str:
    median, low, high = (_format_number(figures[key]) for key in ("median", "min", "max"))
    return f"{median} ({low}-{high})"


def render(summary: dict[str, dict[str, Any]], base: str, other: str) -> str:
    """The comparison as a plain-text table, one row per figure."""
    rows = []
    for name, entry in summary.items():
        pairs = entry[base]["n"]
        ratio = entry["ratio"]
        rows.append(
            [
                name + ("" if entry["higher_is_better"] else " (lower is better)"),
                _median_text(entry[base]),
                _median_text(entry[other]),
                "-" if ratio is None else f"{ratio['median']:.3f}x",
                f"{entry['better_pairs']} of {pairs}",
            ]
        )
    headers = [
        "figure",
        f"{base}: median (min-max)",
        other,
        f"{other} / {base}, paired",
        f"{other} better in",
    ]
    return format_table(headers, rows)


def _load() -> str:
    try:
        return " / ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ab",
        description="Compare two source trees of conduit pair by pair (see benchmarks/README.md).",
    )
    parser.add_argument(
        "base", help="tree A, the reference (a directory with src/ and benchmarks/)"
    )
    parser.add_argument("other", help="tree B, the change")
    parser.add_argument("--work", choices=sorted(WORKS), default="rpc")
    parser.add_argument("--pairs", type=int, default=4, help="runs per tree (default 4)")
    parser.add_argument("--callers", type=int, default=16, help="rpc: concurrent callers")
    parser.add_argument("--calls", type=int, default=100_000, help="rpc: timed calls per run")
    parser.add_argument(
        "--flavor", choices=("trio", "asyncio"), default="trio", help="the client's (default trio)"
    )
    parser.add_argument("--files", type=int, default=2000, help="smallfiles: files per run")
    parser.add_argument("--concurrency", type=int, default=1, help="smallfiles: in flight")
    parser.add_argument("--size", type=int, default=1024, help="bulk: MiB per transfer")
    parser.add_argument("--disk", action="store_true", help="files on disk, not /dev/shm")
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    options = parser.parse_args(argv)
    for name, least in (
        ("pairs", 1),
        ("callers", 1),
        ("calls", 2),
        ("files", 1),
        ("concurrency", 1),
        ("size", 1),
    ):
        if getattr(options, name) < least:
            parser.error(f"--{name} must be at least {least}")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; print the table (stdout) and each run (stderr)."""
    options = parse_args(argv)
    trees = [Tree.checked("A", options.base), Tree.checked("B", options.other)]
    described = {tree.label: tree.describe() for tree in trees}  # before anything runs
    work, figures = WORKS[options.work]
    on_ram = not options.disk and os.access(RAM_DIR, os.W_OK)
    scratch = Path(tempfile.mkdtemp(prefix="conduit-ab-", dir=RAM_DIR if on_ram else None))
    storage = f"{'RAM' if on_ram else 'disk'} ({scratch.parent})"
    load_before = _load()
    runs: dict[str, list[Figures]] = {}
    error = None
    try:
        run_pairs(trees, work, options, scratch, runs)
    except PeerError as exc:
        error = str(exc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = compare(runs, figures, "A", "B")
    print(f"work: {options.work}, {options.pairs} pairs, alternating (A B, B A, ...)")
    for label, description in described.items():
        print(f"{label}: {description}")
    print(f"files: {storage}")
    print(f"load average (1/5/15 min): start {load_before}; end {_load()}")
    print()
    print(render(summary, "A", "B") if summary else "no whole pair was measured")
    if error is not None:
        print(f"\nstopped by a failed run: {error}")
    if options.json_out is not None:
        document = {
            "work": options.work,
            "options": {key: str(value) for key, value in vars(options).items()},
            "trees": described,
            "files": storage,
            "runs": runs,
            "summary": summary,
            "error": error,
        }
        options.json_out.write_text(json.dumps(document, indent=1) + "\n")
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
