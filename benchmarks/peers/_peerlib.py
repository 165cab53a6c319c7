"""Helpers shared by the benchmark peer scripts.

This module is imported by peers that run in *other* virtualenvs (netconduit's,
whose import name ``conduit`` clashes with ours), so it uses the standard
library only; Trio is imported inside the Trio helpers.

Protocol with the orchestrator (``benchmarks.scenarios``):

* a server prints ``PORT <n>`` on stdout once it listens, then serves until
  SIGTERM (:func:`trio_until_terminated`, :func:`asyncio_until_terminated`);
* a client takes ``--port`` and ``--spec`` (JSON, see :func:`parse_spec`), runs
  the workloads on one connection and prints one ``RESULT <json>`` line.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

PASSWORD = "benchmark password \N{GREEK SMALL LETTER ALPHA} 42"
HOST = "127.0.0.1"

#: Environment variable: when set to a directory, peers dump cProfile stats there.
PROFILE_ENV = "CONDUIT_BENCH_PROFILE_DIR"

Call = Callable[[], Awaitable[None]]


def payload(size: int) -> bytes:
    """The deterministic payload every contender echoes."""
    return bytes(i % 251 for i in range(size))


def percentile(sorted_values: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(latencies_ns: list[int], wall_ns: int, cpu_ns: int) -> dict[str, float]:
    """Latency percentiles (µs), throughput and client CPU cost of one workload."""
    ordered = sorted(latencies_ns)
    return {
        "calls": len(ordered),
        "wall_s": wall_ns / 1e9,
        "calls_per_s": len(ordered) / (wall_ns / 1e9),
        "cpu_us_per_call": cpu_ns / len(ordered) / 1e3,
        "p50_us": percentile(ordered, 0.50) / 1e3,
        "p90_us": percentile(ordered, 0.90) / 1e3,
        "p99_us": percentile(ordered, 0.99) / 1e3,
        "max_us": ordered[-1] / 1e3,
        "mean_us": sum(ordered) / len(ordered) / 1e3,
    }


def summarize_handshakes(durations_ns: list[int], cpu_ns: int) -> dict[str, float]:
    """Handshake durations (ms) and client CPU cost of one client process."""
    ordered = sorted(durations_ns)
    return {
        "connects": len(ordered),
        "cpu_ms_per_connect": cpu_ns / len(ordered) / 1e6,
        "p50_ms": percentile(ordered, 0.50) / 1e6,
        "min_ms": ordered[0] / 1e6,
        "max_ms": ordered[-1] / 1e6,
    }


def runtime_info(library: str, module: Any = None) -> dict[str, Any]:
    """What this peer actually ran: library, version and where it was imported from."""
    info: dict[str, Any] = {
        "library": library,
        "python": platform.python_version(),
        "executable": sys.executable,
    }
    if module is not None:
        info["module_file"] = getattr(module, "__file__", None)
        info["version"] = getattr(module, "__version__", None)
    return info


async def trio_until_terminated() -> None:
    """Return when SIGTERM or SIGINT arrives (servers shut down cleanly, profiles get saved)."""
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def asyncio_until_terminated() -> None:
    """asyncio twin of :func:`trio_until_terminated`."""
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    await stop.wait()


def announce_port(port: int) -> None:
    """Tell the orchestrator where the server listens."""
    print(f"PORT {port}", flush=True)


def emit_result(result: dict[str, Any]) -> None:
    """Hand the client's measurements to the orchestrator."""
    print("RESULT " + json.dumps(result), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``server`` or ``client --port N --spec JSON``; ``--flavor`` picks trio or asyncio
    (or ``accounts``: conduit on Trio in accounts mode, server and client)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--spec", default="{}")
    parser.add_argument("--flavor", choices=["trio", "asyncio", "accounts"], default="trio")
    return parser.parse_args(argv)


def parse_spec(text: str) -> dict[str, Any]:
    """The client's work list.

    ``{"payload_size": 100, "warmup": 200, "handshakes": 20, "handshake_warmup": 2,
    "workloads": [{"name": "seq", "callers": 1, "calls": 20000}, ...]}``
    """
    spec: dict[str, Any] = json.loads(text)
    spec.setdefault("payload_size", 100)
    spec.setdefault("warmup", 100)
    spec.setdefault("handshakes", 0)
    spec.setdefault("handshake_warmup", 2)
    spec.setdefault("workloads", [])
    return spec


@contextmanager
def maybe_profiled(tag: str) -> Iterator[None]:
    """Profile the block with cProfile when ``$CONDUIT_BENCH_PROFILE_DIR`` is set.

    The profiler's clock is the process CPU time, not the wall clock: on a busy
    machine a loopback ``send`` that wakes the peer can lose the CPU to it, and a
    wall-clock profile would blame the syscall for the time spent descheduled.
    """
    directory = os.environ.get(PROFILE_ENV)
    if not directory:
        yield
        return
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        os.makedirs(directory, exist_ok=True)
        profiler.dump_stats(os.path.join(directory, f"{tag}-{os.getpid()}.prof"))


def _split(total: int, callers: int) -> list[int]:
    base, extra = divmod(total, callers)
    return [base + (1 if index < extra else 0) for index in range(callers)]


async def trio_closed_loop(call: Call, callers: int, total: int) -> dict[str, float]:
    """``callers`` Trio tasks issue ``total`` calls back to back; time each call."""
    import trio

    latencies: list[int] = []
    record = latencies.append
    clock = time.perf_counter_ns

    async def caller(count: int) -> None:
        for _ in range(count):
            started = clock()
            await call()
            record(clock() - started)

    cpu_started = time.process_time_ns()
    started = clock()
    async with trio.open_nursery() as nursery:
        for count in _split(total, callers):
            nursery.start_soon(caller, count)
    wall = clock() - started
    return summarize(latencies, wall, time.process_time_ns() - cpu_started)


async def asyncio_closed_loop(call: Call, callers: int, total: int) -> dict[str, float]:
    """``callers`` asyncio tasks issue ``total`` calls back to back; time each call."""
    import asyncio

    latencies: list[int] = []
    record = latencies.append
    clock = time.perf_counter_ns

    async def caller(count: int) -> None:
        for _ in range(count):
            started = clock()
            await call()
            record(clock() - started)

    cpu_started = time.process_time_ns()
    started = clock()
    await asyncio.gather(*(caller(count) for count in _split(total, callers)))
    wall = clock() - started
    return summarize(latencies, wall, time.process_time_ns() - cpu_started)


async def time_handshakes(
    connect_once: Callable[[], Awaitable[int]], warmup: int, count: int
) -> dict[str, float]:
    """Run ``connect_once`` (which returns the connect duration in ns) and summarize."""
    for _ in range(warmup):
        await connect_once()
    cpu_started = time.process_time_ns()
    durations = [await connect_once() for _ in range(count)]
    return summarize_handshakes(durations, time.process_time_ns() - cpu_started)
