"""Scenario ``rpc``: small-call latency and throughput, and handshake time.

Server and client of every contender run in separate processes on loopback:

1. ``bare-trio`` -- length-prefixed echo, Trio on both ends, no auth, no crypto:
   the floor. Its client multiplexes callers on one connection (reader task +
   coalescing writer task), the minimum any RPC client needs; the extra row
   ``bare-trio (direct)`` is plain ping-pong with no helper task at all.
2. ``conduit-trio`` -- this repository, client and server on Trio.
3. ``conduit-asyncio`` -- the same client under ``asyncio.run`` through the shim
   (the server stays on Trio): the cost of the asyncio -> Trio bridge.
4. ``netconduit`` -- netconduit 5.0.0 from PyPI (asyncio + pydantic), in its own
   virtualenv because its import name is also ``conduit``.

Workloads on one connection per client process, ~100-byte ``bytes`` payload echoed
back: 1 sequential caller, 16 and 64 concurrent callers (closed loop: each caller
issues its next call when the previous one returns). A second client process
repeats ``connect()`` + authenticate + ``disconnect()``, timing ``connect()`` only.
The server's CPU time is read from ``/proc`` around each client process.

Every repetition starts fresh client processes per contender, in alternating
order (A B C D, D C B A, ...); servers live for the whole scenario.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._harness import (
    PEERS_DIR,
    SRC_DIR,
    PeerError,
    Row,
    RunConfig,
    ScenarioResult,
    ServerProcess,
    alternating_order,
    foreign_env,
    log,
    our_env,
    paired_ratio,
    probe_asyncio_shim,
    run_client,
    spread,
)
from .._venvs import VENVS_DIR, VenvError, installed_versions, netconduit_python

NAME = "rpc"

REFERENCE = "bare-trio"
COMPETITOR = "netconduit"
DIRECT = "bare-trio (direct)"
#: conduit in accounts mode: measured in the handshake group only.
ACCOUNTS = "conduit-accounts"

#: Call counts per client process (one repetition of one contender).
COUNTS: dict[str, dict[str, int]] = {
    "quick": {
        "warmup": 100,
        "seq": 500,
        "c16": 1_600,
        "c64": 3_200,
        "direct": 500,
        "handshakes": 50,
    },
    "full": {
        "warmup": 1_000,
        "seq": 20_000,
        "c16": 32_000,
        "c64": 64_000,
        "direct": 20_000,
        "handshakes": 500,
    },
}
# Why so many handshakes: the server's CPU comes from /proc in clock ticks
# (10 ms), so its CPU per connect is only as fine as 10 ms / connects: 0.2 ms
# in quick mode, 0.02 ms in full mode (it was 0.1 ms at 100 connects, the size
# of the differences being measured).
PAYLOAD_SIZE = 100

#: workload name -> (table group, number of concurrent callers)
WORKLOADS: dict[str, tuple[str, int]] = {
    "seq": ("sequential, 1 caller", 1),
    "c16": ("16 callers, 1 connection", 16),
    "c64": ("64 callers, 1 connection", 64),
}
HANDSHAKE_GROUP = "handshake (connect+auth)"

CLIENT_TIMEOUT = {"quick": 120.0, "full": 900.0}
SERVER_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Contender:
    """One implementation under test and how to start its peers."""

    name: str
    description: str
    script: str
    flavor: str = "trio"
    #: Runs in a private virtualenv instead of this interpreter.
    foreign: bool = False


CONTENDERS = (
    Contender(
        REFERENCE,
        "bare Trio echo over loopback TCP, !II length-prefixed, no auth/crypto (floor)",
        "bare_trio.py",
    ),
    Contender("conduit-trio", "conduit (this tree), client and server on Trio", "conduit_peer.py"),
    Contender(
        "conduit-asyncio",
        "conduit (this tree), client under asyncio.run via the shim, server on Trio",
        "conduit_peer.py",
        flavor="asyncio",
    ),
    Contender(
        ACCOUNTS,
        "conduit (this tree) in accounts mode (SPAKE2+), handshakes only",
        "conduit_peer.py",
        flavor="accounts",
    ),
    Contender(
        COMPETITOR,
        "netconduit 5.0.0 from PyPI (asyncio + pydantic), private virtualenv",
        "netconduit_peer.py",
        foreign=True,
    ),
)

NOTES = [
    "ratio columns: contender / reference, computed per repetition (both measured "
    "in the same repetition) and reported as the median over repetitions; for us and ms lower "
    "is better, for calls/s higher is better",
    "latencies are per call, measured in the client process (time.perf_counter_ns); "
    "calls/s = calls / wall time of the workload",
    "bare-trio (direct): send_all + receive_some ping-pong without reader/writer "
    "tasks, the absolute floor for one sequential caller",
    "netconduit serves requests inline in its connection read loop "
    "(connection/connection.py _read_loop -> server._handle_rpc_request): concurrent "
    "calls on one connection work, pipelined, but are executed one at a time",
    "netconduit's handshake sends SHA-256(password) in clear, one round trip, no "
    "key exchange, no encryption; conduit runs SPAKE2 + key confirmation + HKDF and "
    "then AES-256-GCM: the handshake figures do not measure the same work",
    "bare-trio handshake = TCP connect only (the floor of any handshake)",
    "conduit-trio's handshake is SPAKE2 on libsodium (shared password), conduit-accounts' "
    "SPAKE2+ (accounts); both exclude the client's one-time Argon2id stretch (done in the "
    "warm-up connects and kept for the life of the process / Client)",
    "CPU figures do not depend on how busy the machine is as much as latencies do: "
    "client CPU/call = process CPU time of the client during the workload / calls; "
    "server CPU/call = server process CPU (from /proc) during the whole RPC client run "
    "(warm-up and every workload, the same calls for every contender: bare-trio's direct "
    "ping-pong is a client run of its own, not counted) / calls; per connect likewise for "
    "the handshake run",
]


def _specs(counts: dict[str, int], contender: Contender) -> dict[str, dict[str, Any]]:
    """The client runs of one repetition: RPC workloads, the reference's
    direct ping-pong (a run of its own, so that the server CPU of the RPC
    run covers the same calls for every contender), then handshakes."""
    rpc: dict[str, Any] = {
        "payload_size": PAYLOAD_SIZE,
        "warmup": counts["warmup"],
        "handshakes": 0,
        "workloads": [
            {"name": name, "callers": callers, "calls": counts[name]}
            for name, (_, callers) in WORKLOADS.items()
        ],
    }
    if contender.name == ACCOUNTS:
        # Its calls run on the same engine as conduit-trio's: only the handshake differs.
        rpc.update(warmup=0, workloads=[])
    specs = {"rpc": rpc}
    if contender.name == REFERENCE:
        specs["direct"] = {
            "payload_size": PAYLOAD_SIZE,
            "warmup": counts["warmup"],
            "handshakes": 0,
            "workloads": [],
            "direct_calls": counts["direct"],
        }
    specs["handshake"] = {
        "handshakes": counts["handshakes"],
        "handshake_warmup": 2,
        "workloads": [],
    }
    return specs


def _calls_in(spec: dict[str, Any]) -> int:
    """Round trips the server answers during one client run."""
    calls = spec["warmup"] + sum(workload["calls"] for workload in spec["workloads"])
    return int(calls + spec.get("direct_calls", 0))


def _inside(path: str | None, directory: Path) -> bool:
    if not path:
        return False
    try:
        Path(path).resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def _check_runtime(contender: Contender, result: dict[str, Any]) -> None:
    """Refuse results from the wrong ``conduit`` (the two share an import name)."""
    module_file = result.get("runtime", {}).get("module_file")
    if contender.script == "conduit_peer.py" and not _inside(module_file, SRC_DIR):
        raise PeerError(f"{contender.name} imported conduit from {module_file}, not {SRC_DIR}")
    if contender.foreign and not _inside(module_file, VENVS_DIR):
        raise PeerError(f"{contender.name} imported conduit from {module_file}, not {VENVS_DIR}")


# ----------------------------------------------------------------------- running


class _Runner:
    """Holds the scenario's state while the repetitions run."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.counts = COUNTS[config.mode]
        self.timeout = CLIENT_TIMEOUT[config.mode]
        self.status: dict[str, dict[str, Any]] = {
            c.name: {"status": "pending", "description": c.description, "script": c.script}
            for c in CONTENDERS
        }
        self.pythons: dict[str, str] = {}
        self.envs: dict[str, dict[str, str]] = {}
        self.repetitions: dict[str, list[dict[str, Any]]] = {c.name: [] for c in CONTENDERS}

    def fail(self, name: str, status: str, reason: str) -> None:
        self.status[name].update(status=status, reason=reason)
        log(f"rpc: {name} {status}: {reason.splitlines()[0] if reason else ''}")

    def prepare(self) -> None:
        """Find each contender's interpreter (creating netconduit's venv) and probe the shim."""
        for contender in CONTENDERS:
            name = contender.name
            if contender.foreign:
                try:
                    python = netconduit_python()
                except VenvError as exc:
                    self.fail(name, "failed", str(exc))
                    continue
                self.pythons[name] = str(python)
                self.envs[name] = foreign_env()
                self.status[name]["versions"] = installed_versions(
                    python, ["netconduit", "pydantic", "pydantic-core", "msgpack"]
                )
            else:
                self.pythons[name] = sys.executable
                self.envs[name] = our_env(self.config.profile_dir)
            if contender.flavor == "asyncio":
                reason = probe_asyncio_shim(self.pythons[name], self.envs[name])
                if reason is not None:
                    self.fail(name, "unavailable", reason)

    def client_run(
        self, contender: Contender, server: ServerProcess, spec: dict[str, Any]
    ) -> tuple[dict[str, Any], float | None]:
        """One client process; returns its result and the server CPU seconds it caused."""
        argv = [
            self.pythons[contender.name],
            str(PEERS_DIR / contender.script),
            "client",
            "--port",
            str(server.port),
            "--flavor",
            contender.flavor,
            "--spec",
            json.dumps(spec),
        ]
        server.check_alive()
        cpu_before = server.cpu_seconds()
        result = run_client(argv, self.envs[contender.name], self.timeout)
        cpu_after = server.cpu_seconds()
        _check_runtime(contender, result)
        server_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        return result, server_cpu

    def repetition(self, contender: Contender, server: ServerProcess) -> dict[str, Any]:
        """The RPC run and the handshake run of one repetition, merged."""
        specs = _specs(self.counts, contender)
        result, rpc_cpu = self.client_run(contender, server, specs["rpc"])
        server_cpu: dict[str, Any] = {}
        if "direct" in specs:
            direct, direct_cpu = self.client_run(contender, server, specs["direct"])
            result["workloads"].update(direct["workloads"])
            # Kept apart: one-at-a-time calls cost the server more per call
            # than the multiplexed workloads' batches, and only this
            # contender makes them.
            server_cpu.update(direct_calls=_calls_in(specs["direct"]), direct_s=direct_cpu)
        handshakes, handshake_cpu = self.client_run(contender, server, specs["handshake"])
        result["handshake"] = handshakes["handshake"]
        calls = _calls_in(specs["rpc"])
        connects = specs["handshake"]["handshakes"] + specs["handshake"]["handshake_warmup"]
        server_cpu.update(
            rpc_calls=calls,
            rpc_s=rpc_cpu,
            us_per_call=None if rpc_cpu is None or not calls else rpc_cpu / calls * 1e6,
            connects=connects,
            handshake_s=handshake_cpu,
            ms_per_connect=None if handshake_cpu is None else handshake_cpu / connects * 1e3,
        )
        result["server_cpu"] = server_cpu
        return result

    def run(self) -> None:
        """Start the servers, then run the repetitions in alternating order."""
        active = [c for c in CONTENDERS if self.status[c.name]["status"] == "pending"]
        by_name = {c.name: c for c in CONTENDERS}
        with contextlib.ExitStack() as stack:
            servers: dict[str, ServerProcess] = {}
            for contender in active:
                argv = [self.pythons[contender.name], str(PEERS_DIR / contender.script), "server"]
                if contender.flavor == "accounts":
                    argv += ["--flavor", "accounts"]
                try:
                    servers[contender.name] = stack.enter_context(
                        ServerProcess(argv, self.envs[contender.name], SERVER_START_TIMEOUT)
                    )
                except PeerError as exc:
                    self.fail(contender.name, "failed", str(exc))
            running = [c.name for c in active if c.name in servers]
            for repetition in range(self.config.repeat):
                for name in alternating_order(running, repetition):
                    if self.status[name]["status"] != "pending":
                        continue
                    log(f"rpc: repetition {repetition + 1}/{self.config.repeat}: {name}")
                    server = servers[name]
                    try:
                        self.repetitions[name].append(self.repetition(by_name[name], server))
                    except PeerError as exc:
                        self.fail(
                            name,
                            "failed",
                            f"repetition {repetition + 1}: {exc}\n"
                            f"server stderr:\n{server.stderr_tail()}",
                        )
        for name, info in self.status.items():
            if info["status"] == "pending":
                info["status"] = "ok"
            info["repetitions"] = self.repetitions[name]
            if self.repetitions[name]:
                info["runtime"] = self.repetitions[name][0].get("runtime")


# ----------------------------------------------------------------------- summary

Repetitions = dict[str, list[dict[str, Any]]]


def _series(repetitions: Repetitions, name: str, section: str, key: str) -> list[float | None]:
    """One figure per repetition of ``name``: ``section`` is a workload name,
    ``"handshake"`` or ``"server_cpu"``."""
    values: list[float | None] = []
    for rep in repetitions.get(name, []):
        if section in ("handshake", "server_cpu"):
            figures = rep.get(section)
        else:
            figures = rep.get("workloads", {}).get(section)
        value = None if figures is None else figures.get(key)
        values.append(None if value is None else float(value))
    return values


def _ratio(values: list[float | None], reference: list[float | None]) -> dict[str, Any] | None:
    pairs = [(v, r) for v, r in zip(values, reference, strict=False) if v is not None and r]
    if not pairs:
        return None
    return paired_ratio([v for v, _ in pairs], [r for _, r in pairs])


#: table layout: (group, section, [(metric, key, unit, better)])
_LAYOUT: list[tuple[str, str, list[tuple[str, str, str, str]]]] = [
    (WORKLOADS["seq"][0], "seq", [
        ("p50", "p50_us", "us", "lower"),
        ("p99", "p99_us", "us", "lower"),
        ("throughput", "calls_per_s", "calls/s", "higher"),
        ("client CPU/call", "cpu_us_per_call", "us", "lower"),
    ]),
    *[
        (WORKLOADS[name][0], name, [
            ("throughput", "calls_per_s", "calls/s", "higher"),
            ("p50", "p50_us", "us", "lower"),
            ("p99", "p99_us", "us", "lower"),
            ("client CPU/call", "cpu_us_per_call", "us", "lower"),
        ])
        for name in ("c16", "c64")
    ],
    ("server CPU, all RPC workloads", "server_cpu", [
        ("server CPU/call", "us_per_call", "us", "lower"),
    ]),
    (HANDSHAKE_GROUP, "handshake", [
        ("connect p50", "p50_ms", "ms", "lower"),
        ("client CPU/connect", "cpu_ms_per_connect", "ms", "lower"),
    ]),
    (HANDSHAKE_GROUP, "server_cpu", [
        ("server CPU/connect", "ms_per_connect", "ms", "lower"),
    ]),
]  # fmt: skip


def _build_rows(repetitions: Repetitions, measured: list[str]) -> list[Row]:
    """Table rows: per group, per metric, per contender (plus the direct floor)."""
    columns = {f"x {REFERENCE}": REFERENCE, f"x {COMPETITOR}": COMPETITOR}
    rows: list[Row] = []
    for group, section, figures in _LAYOUT:
        for metric, key, unit, better in figures:
            entries = [(name, _series(repetitions, name, section, key)) for name in measured]
            if section == "seq" and key != "calls_per_s" and REFERENCE in measured:
                entries.insert(1, (DIRECT, _series(repetitions, REFERENCE, "seq-direct", key)))
            for name, values in entries:
                present = [v for v in values if v is not None]
                if not present:
                    continue
                ratios = {
                    column: _ratio(values, _series(repetitions, reference, section, key))
                    for column, reference in columns.items()
                    if reference in measured
                }
                rows.append(Row(group, metric, unit, name, spread(present), ratios, better))
    return rows


def _goal(
    goal: str, ratio: dict[str, Any] | None, target: float, *, at_most: bool
) -> dict[str, Any]:
    value = None if ratio is None else float(ratio["median"])
    met = None if value is None else (value <= target if at_most else value >= target)
    return {"goal": goal, "value": value, "target": target, "met": met, "ratio": ratio}


#: issue 14's calls/s goals against netconduit, per workload
CALLS_GOALS: dict[str, float] = {"seq": 1.5, "c16": 3.0, "c64": 3.0}


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _median_goal(
    goal: str, values: list[float | None], target: float, unit: str, context: str = ""
) -> dict[str, Any]:
    """An absolute goal (at most ``target`` ``unit``) on the median of one contender's figures.

    ``context`` (optional) is shown after the verdict: what to read the figure against.
    """
    value = _median(values)
    met = None if value is None else value <= target
    entry = {"goal": goal, "value": value, "target": target, "met": met, "unit": unit}
    if context:
        entry["context"] = context
    return entry


def _server_cpu_floor(repetitions: Repetitions) -> str:
    """The bare Trio echo's server CPU per call in the same run: the floor of the 25 us goal.

    That server answers the same calls (the same workloads, in the same
    order; its direct ping-pong is not counted) with the same socket work
    and no protocol at all, so on a machine where it costs more than 25 us
    the goal is out of reach of any protocol work; the report shows the two
    side by side.
    """
    floor = _median(_series(repetitions, REFERENCE, "server_cpu", "us_per_call"))
    if floor is None:
        return ""
    return f"the bare Trio echo server, no protocol, in the same run: {floor:.1f} us"


def _goals(repetitions: Repetitions) -> list[dict[str, Any]]:
    """Issue 14's goals (and issue 12's handshake one), as measured: reported, never asserted."""
    conduit = "conduit-trio"
    seq_p50 = _series(repetitions, conduit, "seq", "p50_us")
    goals = [
        _goal(
            "conduit-trio sequential p50 <= 1.3x bare-trio (multiplexing client)",
            _ratio(seq_p50, _series(repetitions, REFERENCE, "seq", "p50_us")),
            1.3,
            at_most=True,
        ),
        _goal(
            "conduit-trio sequential p50 <= 1.3x bare-trio (direct ping-pong, strict reading)",
            _ratio(seq_p50, _series(repetitions, REFERENCE, "seq-direct", "p50_us")),
            1.3,
            at_most=True,
        ),
        _goal(
            "conduit-asyncio sequential p50 <= 1.25x conduit-trio (the shim's cost)",
            _ratio(_series(repetitions, "conduit-asyncio", "seq", "p50_us"), seq_p50),
            1.25,
            at_most=True,
        ),
        _median_goal(
            "conduit-trio server CPU per RPC <= 25 us",
            _series(repetitions, conduit, "server_cpu", "us_per_call"),
            25.0,
            "us",
            _server_cpu_floor(repetitions),
        ),
    ]
    for workload, target in CALLS_GOALS.items():
        group = WORKLOADS[workload][0]
        goals.append(
            _goal(
                f"conduit-trio calls/s >= {target:g}x netconduit ({group})",
                _ratio(
                    _series(repetitions, conduit, workload, "calls_per_s"),
                    _series(repetitions, COMPETITOR, workload, "calls_per_s"),
                ),
                target,
                at_most=False,
            )
        )
    # Issue 12's: connect p50, and the server's CPU per handshake (here the
    # server process's CPU over the whole handshake run, accept, session and
    # goodbye included, so the handshake alone costs less than the figure).
    handshake_goals = (
        ("connect + authenticate p50 <= 2 ms", "handshake", "p50_ms", 2.0),
        ("server CPU per connect <= 1 ms", "server_cpu", "ms_per_connect", 1.0),
    )
    for goal, section, key, target in handshake_goals:
        for name in (conduit, "conduit-accounts"):
            goals.append(
                _median_goal(
                    f"{name} {goal}", _series(repetitions, name, section, key), target, "ms"
                )
            )
    return goals


def run(config: RunConfig) -> ScenarioResult:
    """Run the scenario: start servers, alternate client repetitions, summarise."""
    started = time.perf_counter()
    runner = _Runner(config)
    runner.prepare()
    runner.run()
    measured = [c.name for c in CONTENDERS if runner.status[c.name]["status"] == "ok"]
    # Only fully measured contenders enter the table: each has `repeat` repetitions,
    # and repetition i of every contender ran in the same round.
    usable = {name: runner.repetitions[name] for name in measured}
    return ScenarioResult(
        name=NAME,
        config={
            "mode": config.mode,
            "repeat": config.repeat,
            "payload_bytes": PAYLOAD_SIZE,
            "counts_per_repetition": runner.counts,
            "workloads": {name: {"group": g, "callers": c} for name, (g, c) in WORKLOADS.items()},
            "order": "alternating: forward on even repetitions, reversed on odd ones",
            "client_timeout_s": runner.timeout,
        },
        contenders=runner.status,
        rows=_build_rows(usable, measured),
        ratio_columns=[f"x {REFERENCE}", f"x {COMPETITOR}"],
        goals=_goals(usable),
        notes=list(NOTES),
        duration_s=time.perf_counter() - started,
    )
