"""The quick benchmark runs of ``tests/test_benchmarks_quick_*.py`` and their shared checks.

Each scenario of the suite has its own test module, which runs ``python -m
benchmarks --quick --scenario <name>`` once (a module-scoped fixture) and checks
that scenario's record. One module per scenario lets ``--dist loadfile`` spread
the scenarios over both workers, where one module running them all back to
back (about five minutes) was the whole suite's long pole.

These run the real thing: separate server and client processes for every
contender, netconduit 5.0.0 in its private virtualenv (created by pip on first
use under ``benchmarks/.venvs/``, like asyncssh and matplotlib when this
interpreter lacks them), conduit natively and through the asyncio shim, real
files on /dev/shm whose SHA-256 the suite checks after every transfer. The
checks are about the record's shape, that every contender ran, and the charts:
timings depend on the machine, so nothing here asserts a number.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

REPO = Path(__file__).resolve().parents[1]
#: Two repetitions are enough to check the record's shape (medians, min/max, paired
#: ratios) at under half the time of the default five; the default itself is checked
#: on the parser (tests/test_benchmarks_cli.py).
REPEAT = 2
ROW_KEYS = {"group", "metric", "unit", "better", "contender", "median", "min", "max", "n"}
OP_KEYS = {"bytes", "wall_s", "mb_per_s", "client_cpu_s", "client_cpu_s_per_gib"}
#: Generous: a quick scenario takes 15-90 s on a quiet 2-core machine.
RUN_TIMEOUT = 900


@attrs.frozen
class QuickRun:
    """One ``python -m benchmarks --quick --scenario <name>`` run: its JSON record and stdout."""

    scenario: str
    repeat: int
    record: dict[str, Any]
    stdout: str


def run_quick(
    tmp_path_factory: pytest.TempPathFactory, scenario: str, repeat: int = REPEAT
) -> QuickRun:
    """Run one scenario in quick mode, ``repeat`` repetitions; it must exit 0."""
    out = tmp_path_factory.mktemp(f"bench-{scenario}") / "quick.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--scenario",
            scenario,
            "--repeat",
            str(repeat),
            "--json-out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return QuickRun(scenario, repeat, json.loads(out.read_text()), completed.stdout)


def is_number(value: Any) -> bool:
    """A non-negative int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def inside(path: str, directory: Path) -> bool:
    """Whether ``path`` lies under ``directory``."""
    return Path(path).resolve().is_relative_to(directory.resolve())


def check_header_and_charts(run: QuickRun) -> None:
    """The record's header, its machine description, and one PNG chart per row group."""
    record = run.record
    assert record["schema_version"] == 1
    assert record["mode"] == "quick"
    assert record["repeat"] == run.repeat
    assert record["created_utc"].endswith("Z")
    assert "--quick" in record["command"]
    assert is_number(record["duration_s"])
    machine = record["machine"]
    assert machine["cpu_model"]
    assert machine["logical_cores"] >= 1
    assert machine["python"].startswith("3.")
    for library in ("conduit", "trio", "cryptography"):
        assert machine["versions"][library]
    assert set(record["scenarios"]) == {run.scenario}
    assert f"== scenario {run.scenario} (quick mode, " in run.stdout
    if record["scenarios"][run.scenario]["goals"]:
        assert "quick mode: sizes too small to judge a goal" in run.stdout
    assert "charts_error" not in record
    groups = {
        (name, row["group"])
        for name, scenario in record["scenarios"].items()
        for row in scenario["rows"]
    }
    assert len(record["charts"]) == len(groups)
    results = Path(run.stdout.split("results: ", 1)[1].splitlines()[0])
    for chart in record["charts"]:
        assert (results.parent / chart).read_bytes().startswith(b"\x89PNG")


def scenario_of(run: QuickRun, contenders: set[str]) -> dict[str, Any]:
    """The scenario's record, once exactly ``contenders`` ran, each ``repeat`` times."""
    scenario: dict[str, Any] = run.record["scenarios"][run.scenario]
    assert set(scenario["contenders"]) == contenders
    for contender, info in scenario["contenders"].items():
        assert info["status"] == "ok", (run.scenario, contender, info.get("reason"))
        assert len(info["repetitions"]) == run.record["repeat"]
    return scenario


def check_rows(scenario: dict[str, Any], repeat: int) -> None:
    """Every row has its keys, ``repeat`` samples and ordered spreads; goals are reported."""
    assert scenario["rows"]
    for row in scenario["rows"]:
        assert set(row) >= ROW_KEYS
        assert row["n"] == repeat
        assert row["min"] <= row["median"] <= row["max"]
        assert set(row["ratios"]) <= set(scenario["ratio_columns"])
    for goal in scenario["goals"]:
        assert is_number(goal["value"]), goal
        assert isinstance(goal["met"], bool)
    assert scenario["notes"]


def check_op(op: dict[str, Any], kind: str, size: int) -> None:
    """One transfer's figures: its kind, all its keys, and the full size moved."""
    assert op["op"] == kind
    assert set(op) >= OP_KEYS
    assert op["bytes"] == size == op["result"]["size"]
    assert all(is_number(op[key]) for key in OP_KEYS)
