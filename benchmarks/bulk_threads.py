"""Where a bulk transfer's time goes, thread by thread: ``python -m benchmarks.bulk_threads``.

The ``bulk`` scenario gives each operation's wall time and each process's CPU.
On the two-core benchmark machine a 1 GiB transfer keeps four threads busy
(each side's event loop, the sender's reader and the receiver's writer), so
what sets its pace is how they share the cores: who runs, who waits for a
core, who sleeps waiting for another. This tool runs the scenario's conduit
peers (``peers/conduit_transfer.py``) once: one upload of a ``--size`` MiB
file, then ``--downloads`` downloads of it, memory primed before each as the
scenario does. Meanwhile it reads every thread's scheduler counters of both
processes from ``/proc`` every ``--interval`` seconds (``schedstat``: time run
and time runnable but waiting for a core; ``status``: voluntary and
involuntary context switches) and prints, per operation, per thread:

* **run**: share of the operation's wall time it ran on a core;
* **wait**: share it was runnable but waited for one (the cores were taken,
  or a halted virtual core took that long to wake);
* **sleeps/MiB**: times it went to sleep (waiting for work or a lock);
* **preempted/MiB**: times it was taken off a core while it could still run.

and the cores busy in all (the sum of the run shares). The window of each
operation is the client's own timer (its ``started_s`` and ``ended_s``, the
system's monotonic clock), matched to the nearest samples. A thread started
within the window counts from zero. Each thread is shown with the name it had
in most samples of the window: Trio's cached worker threads take the name of
the job they run (the receiver's writer is ``conduit write-b``: Linux keeps
15 characters) and are ``Trio thread N`` between jobs; each process's main
thread (its event loop) is marked ``(main)``.

``--tree DIR`` runs another tree's peers and ``src/`` (as ``benchmarks.ab``
does). Linux only (``/proc``). Figures come from real processes on a shared
machine: compare runs minutes apart with care, and never as a timing
assertion.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._harness import PeerError, ServerProcess, TaskTimes, client_result, format_table, task_times
from .ab import CLIENT_TIMEOUT, START_TIMEOUT, Tree
from .scenarios._transfer import RAM_DIR, make_source, priming, verify

MiB = 1024 * 1024

#: One reading of both processes: (monotonic seconds, side -> thread id -> counters).
Sample = tuple[float, dict[str, dict[str, TaskTimes]]]


@dataclass(frozen=True)
class ThreadShare:
    """One thread's part of one operation (see the module docstring)."""

    side: str
    name: str
    run: float
    wait: float
    sleeps_per_mib: float
    preempted_per_mib: float


def nearest(samples: Sequence[Sample], moment: float) -> Sample:
    """The sample taken closest to ``moment``."""
    return min(samples, key=lambda sample: abs(sample[0] - moment))


def shares(
    samples: Sequence[Sample],
    start: float,
    end: float,
    mib: float,
    main_threads: dict[str, str] | None = None,
) -> list[ThreadShare]:
    """Each thread's shares between the samples nearest ``start`` and ``end``.

    Threads that ran less than 1 % of the window are left out, but each
    side's main thread (its event loop), which is always shown: on a loaded
    machine a side's loop fell under the cut in a short window, and its row
    went missing (a CI run on 2026-12-07). One absent from the first sample
    (started within the window) counts from zero.
    ``main_threads`` (side -> thread id: the process id) marks each side's
    main thread, whose name is the interpreter's, with ``(main)``.
    """
    (first_at, first), (last_at, last) = nearest(samples, start), nearest(samples, end)
    wall = last_at - first_at
    if wall <= 0:
        raise ValueError("the operation's window holds no two samples: lower --interval")
    within = [found for moment, found in samples if first_at <= moment <= last_at]
    found: list[ThreadShare] = []
    for side, threads in last.items():
        for tid, now in threads.items():
            then = first.get(side, {}).get(tid, TaskTimes(now.name, 0, 0, 0, 0))
            # The name it had most of the window: a Trio worker thread's is its
            # job's only while it runs the job.
            names = Counter(
                sample[side][tid].name for sample in within if tid in sample.get(side, {})
            )
            name = names.most_common(1)[0][0]
            main = main_threads is not None and main_threads.get(side) == tid
            if main:
                name = f"{name} (main)"
            run = (now.run_ns - then.run_ns) / 1e9 / wall
            if run < 0.01 and not main:
                continue
            found.append(
                ThreadShare(
                    side,
                    name,
                    run,
                    (now.wait_ns - then.wait_ns) / 1e9 / wall,
                    (now.voluntary - then.voluntary) / mib,
                    (now.involuntary - then.involuntary) / mib,
                )
            )
    return sorted(found, key=lambda share: (share.side != "server", -share.run))


class Sampler:
    """Reads both processes' thread counters every ``interval`` seconds in a thread of its own."""

    def __init__(self, pids: dict[str, int], interval: float) -> None:
        self.samples: list[Sample] = []
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bulk_threads sampler")

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            moment = time.monotonic()
            self.samples.append(
                (moment, {side: task_times(pid) for side, pid in self._pids.items()})
            )
            if self._stop.wait(self._interval):
                return


def measure(tree: Tree, options: argparse.Namespace, scratch: Path) -> list[dict[str, Any]]:
    """Run the upload and downloads; each operation's figures and thread shares."""
    source = scratch / f"threads-{options.size}MiB.bin"
    expected = make_source(source, options.size * MiB)
    storage, downloads = scratch / "store", scratch / "down"
    storage.mkdir()
    ops: list[dict[str, Any]] = [{"op": "upload", "path": str(source), "name": source.name}]
    for number in range(options.downloads):
        directory = downloads / str(number)
        directory.mkdir(parents=True)
        ops.append({"op": "download", "name": source.name, "dir": str(directory)})
    peer = [sys.executable, tree.peer("conduit_transfer.py")]
    server_spec = json.dumps({"storage": str(storage)})
    with (
        priming(2 * options.size * MiB) as prime,
        ServerProcess(
            [*peer, "server", "--spec", server_spec], tree.env(), START_TIMEOUT
        ) as server,
    ):
        assert server.pid is not None
        spec = {"kind": "transfer", "ops": ops, "prime": prime, "server_pid": server.pid}
        argv = [*peer, "client", "--port", str(server.port), "--spec", json.dumps(spec)]
        client = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=tree.env(),
        )  # fmt: skip
        try:
            pids = {"server": server.pid, "client": client.pid}
            main_threads = {side: str(pid) for side, pid in pids.items()}
            with Sampler(pids, options.interval) as sampler:
                stdout, stderr = client.communicate(timeout=CLIENT_TIMEOUT)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        result = client_result(client.returncode, stdout, stderr)
    verify(storage / source.name, expected, "uploaded copy")
    for number in range(options.downloads):
        verify(downloads / str(number) / source.name, expected, f"download {number + 1}")
    measured = []
    for op in result["ops"]:
        if "started_s" not in op:
            raise PeerError(f"{tree.label}: its client reports no operation windows (too old)")
        threads = shares(
            sampler.samples, op["started_s"], op["ended_s"], options.size, main_threads
        )
        measured.append({**op, "threads": threads})
    return measured


def render(measured: Sequence[dict[str, Any]]) -> str:
    """One table per operation."""
    parts = []
    for number, op in enumerate(measured, 1):
        threads: list[ThreadShare] = op["threads"]
        busy = sum(share.run for share in threads)
        heading = (
            f"{number}. {op['op']}: {op['mb_per_s']:.0f} MB/s, {op['wall_s']:.2f} s, "
            f"cores busy {busy:.2f} of the wall time"
        )
        rows = [
            [
                share.side,
                share.name,
                f"{share.run:.0%}",
                f"{share.wait:.0%}",
                f"{share.sleeps_per_mib:.2f}",
                f"{share.preempted_per_mib:.2f}",
            ]
            for share in threads
        ]
        headers = ["side", "thread", "run", "wait", "sleeps/MiB", "preempted/MiB"]
        parts.append(f"{heading}\n{format_table(headers, rows)}")
    return "\n\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bulk_threads", description=__doc__)
    parser.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--size", type=int, default=1024, help="MiB (default 1024)")
    parser.add_argument("--downloads", type=int, default=2, help="after the upload (default 2)")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between samples")
    parser.add_argument("--disk", action="store_true", help="files in the temporary directory")
    options = parser.parse_args(argv)
    if options.size < 1 or options.downloads < 0 or options.interval <= 0:
        parser.error("--size must be at least 1, --downloads at least 0, --interval above 0")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Run once and print the tables."""
    options = parse_args(argv)
    tree = Tree.checked("tree", options.tree)
    if not Path("/proc/self/task").is_dir():
        raise SystemExit("bulk_threads reads /proc: Linux only")
    base = None if options.disk or not RAM_DIR.is_dir() else str(RAM_DIR)
    scratch = Path(tempfile.mkdtemp(prefix="conduit-bulk-threads-", dir=base))
    try:
        print(f"tree: {tree.describe()}; files in {scratch.parent}", file=sys.stderr)
        print(render(measure(tree, options, scratch)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
