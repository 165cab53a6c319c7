"""Where a sequential small upload's CPU goes, per thread of the server.

``python -m benchmarks.smallfiles_budget`` starts the ``smallfiles`` scenario's
own server peer (``peers/conduit_transfer.py server``), uploads ``--files``
files of 4 KiB one after the other with the scenario's client
(``send_to_server``), and prints, per thread of the server, the CPU per file
from ``/proc/PID/task/*/schedstat`` (nanoseconds: finer than the 10 ms ticks
``/proc/PID/stat`` counts in) and the voluntary context switches per file;
then the same for a sequential 4 KiB ``echo`` call on the same set-up (the
round trip under every upload). Runs alternate ``--repeat`` times; each
figure is the median. ``--concurrency 8`` uploads eight at a time (the
scenario's ``x8``: ``send_to_server`` calls in flight together). ``--src``
points at another tree's ``src`` for a before/after comparison (the server
and client import conduit from there).

The storage is ``--storage`` (default: a directory under ``/dev/shm``, as
the scenario's; an ext4 directory shows what a real disk's fsyncs do).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ._harness import PEERS_DIR, SRC_DIR, thread_stats

FILE_SIZE = 4096
#: Uploads run before the measured ones (thread start, imports, caches).
WARMUP = 20

_ECHO_CLIENT = """
import json, os, sys, time
import trio
sys.path.insert(0, sys.argv[3])
import _peerlib
from conduit import Client, ClientDescriptor

async def main(port, count):
    client = Client(ClientDescriptor(
        server_host=_peerlib.HOST, server_port=port, password=_peerlib.PASSWORD))
    await client.connect()
    body = os.urandom(4096)
    started = time.perf_counter()
    cpu = time.process_time()
    for _ in range(count):
        await client.rpc.call("echo", data=body)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    await client.disconnect()
    print("RESULT " + json.dumps({"wall_s": wall, "client_cpu_s": cpu}))

trio.run(main, int(sys.argv[1]), int(sys.argv[2]))
"""


def _result(output: str) -> dict[str, Any]:
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    return result


class _Setup:
    def __init__(
        self, src: Path, storage: Path, names: list[str], source: Path, concurrency: int
    ) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(src)}
        self.storage, self.names, self.source = storage, names, source
        self.concurrency = concurrency

    def _client(self, port: int, spec: dict[str, object]) -> dict[str, float]:
        argv = [sys.executable, str(PEERS_DIR / "conduit_transfer.py"), "client"]
        argv += ["--port", str(port), "--flavor", "trio", "--spec", json.dumps(spec)]
        done = subprocess.run(argv, env=self.env, check=True, capture_output=True, text=True)
        figures: dict[str, float] = _result(done.stdout)["smallfiles"]
        return figures

    def measure(self, kind: str) -> dict[str, float]:
        """One run of ``kind`` (``upload`` or ``echo``): figures per file (or call)."""
        server_spec = {"storage": str(self.storage)}
        argv = [sys.executable, str(PEERS_DIR / "conduit_transfer.py"), "server"]
        server = subprocess.Popen(
            [*argv, "--spec", json.dumps(server_spec)],
            env=self.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline().split()[1])
            base: dict[str, object] = {
                "kind": "smallfiles",
                "dir": str(self.source),
                "server_pid": server.pid,
            }
            self._client(port, {**base, "names": self.names[:WARMUP]})
            _empty(self.storage)
            before = thread_stats(server.pid)
            count = len(self.names)
            if kind == "upload":
                spec = {**base, "names": self.names, "concurrency": self.concurrency}
                client = self._client(port, spec)
                wall, client_cpu = count / client["files_per_s"], client["client_cpu_s"]
            else:
                argv = [sys.executable, "-c", _ECHO_CLIENT, str(port), str(count), str(PEERS_DIR)]
                done = subprocess.run(
                    argv, env=self.env, check=True, capture_output=True, text=True
                )
                echo = _result(done.stdout)
                wall, client_cpu = echo["wall_s"], echo["client_cpu_s"]
            after = thread_stats(server.pid)
        finally:
            server.terminate()
            server.wait(30)
            _empty(self.storage)
        figures = {"per_s": count / wall, "client_us": client_cpu / count * 1e6}
        busy: list[tuple[float, float]] = []
        for tid, (name, cpu, switched) in after.items():
            _, cpu0, switched0 = before.get(tid, (name, 0, 0))
            if cpu > cpu0:
                busy.append(((cpu - cpu0) / count / 1000, (switched - switched0) / count))
        busy.sort(reverse=True)  # the Trio thread first: it works most
        for index, (cpu_us, per_call) in enumerate(busy):
            figures[f"server thread {index + 1} us"] = cpu_us
            figures[f"server thread {index + 1} switches"] = per_call
        figures["server us"] = sum(cpu for cpu, _ in busy)
        figures["server switches"] = sum(switch for _, switch in busy)
        return figures


def _empty(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def main() -> None:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--concurrency", type=int, default=1, help="uploads in flight (the scenario's x8: 8)"
    )
    parser.add_argument("--src", type=Path, default=SRC_DIR, help="the conduit tree's src")
    parser.add_argument("--storage", type=Path, default=None, help="default: under /dev/shm")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="smallfiles-budget-", dir=args.storage or "/dev/shm"))
    try:
        source, storage = scratch / "source", scratch / "storage"
        source.mkdir()
        storage.mkdir()
        generator = random.Random(FILE_SIZE)
        names = [f"small-{index:05d}.bin" for index in range(args.files)]
        for name in names:
            (source / name).write_bytes(generator.randbytes(FILE_SIZE))
        setup = _Setup(args.src.resolve(), storage, names, source, args.concurrency)
        runs: dict[str, list[dict[str, float]]] = {"upload": [], "echo": []}
        for _ in range(args.repeat):
            for kind in runs:
                runs[kind].append(setup.measure(kind))
        print(
            f"{args.files} calls, {args.concurrency} uploads in flight (echo: 1),"
            f" conduit from {args.src}, load {os.getloadavg()}"
        )
        for kind, figures in runs.items():
            print(f"{kind} (4 KiB), median of {args.repeat}:")
            for key in figures[0]:
                values = [run[key] for run in figures if key in run]
                print(f"  {key:28s} {statistics.median(values):10.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
