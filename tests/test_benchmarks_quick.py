"""The benchmark suite runs end to end in ``--quick`` mode and writes a complete record.

This runs the real thing: separate server and client processes for every
contender, netconduit 5.0.0 in its private virtualenv (created by pip on first
use under ``benchmarks/.venvs/``), conduit natively and through the asyncio
shim. It checks the shape of the JSON record only: timings depend on the
machine, so nothing here asserts a number.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = {"bare-trio", "conduit-trio", "conduit-asyncio", "netconduit"}
WORKLOADS = {"seq", "c16", "c64"}
WORKLOAD_KEYS = {
    "calls",
    "wall_s",
    "calls_per_s",
    "cpu_us_per_call",
    "p50_us",
    "p90_us",
    "p99_us",
    "max_us",
}
ROW_KEYS = {"group", "metric", "unit", "better", "contender", "median", "min", "max", "n"}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _inside(path: str, directory: Path) -> bool:
    return Path(path).resolve().is_relative_to(directory.resolve())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """Run ``python -m benchmarks --quick`` once; return the JSON record and stdout."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json-out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(out.read_text()), completed.stdout


@pytest.mark.slow
def test_record_header_and_machine(quick_run: tuple[dict[str, Any], str]) -> None:
    record, _ = quick_run
    assert record["schema_version"] == 1
    assert record["mode"] == "quick"
    assert record["repeat"] >= 5
    assert record["created_utc"].endswith("Z")
    assert "--quick" in record["command"]
    assert _is_number(record["duration_s"])
    machine = record["machine"]
    assert machine["cpu_model"]
    assert machine["logical_cores"] >= 1
    assert machine["python"].startswith("3.")
    for library in ("conduit", "trio", "cryptography"):
        assert machine["versions"][library]
    assert set(record["scenarios"]) == {"rpc"}


@pytest.mark.slow
def test_every_contender_measured_from_the_right_library(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    record, _ = quick_run
    rpc = record["scenarios"]["rpc"]
    repeat = record["repeat"]
    counts = rpc["config"]["counts_per_repetition"]
    assert set(rpc["contenders"]) == CONTENDERS
    for name, info in rpc["contenders"].items():
        assert info["status"] == "ok", (name, info.get("reason"))
        assert len(info["repetitions"]) == repeat
        for repetition in info["repetitions"]:
            assert set(repetition["workloads"]) >= WORKLOADS
            for workload in WORKLOADS:
                figures = repetition["workloads"][workload]
                assert set(figures) >= WORKLOAD_KEYS
                assert figures["calls"] == counts[workload]
                assert all(_is_number(figures[key]) for key in WORKLOAD_KEYS)
            assert repetition["handshake"]["connects"] == counts["handshakes"]
            assert _is_number(repetition["handshake"]["p50_ms"])
            assert _is_number(repetition["handshake"]["cpu_ms_per_connect"])
            server_cpu = repetition["server_cpu"]
            assert server_cpu["rpc_calls"] > sum(counts[w] for w in WORKLOADS)
            if sys.platform.startswith("linux"):
                assert _is_number(server_cpu["us_per_call"])
                assert _is_number(server_cpu["ms_per_connect"])
    # The two libraries share the import name `conduit`: each side must have
    # imported its own.
    ours = rpc["contenders"]["conduit-trio"]["runtime"]
    assert _inside(ours["module_file"], REPO / "src")
    assert rpc["contenders"]["conduit-asyncio"]["runtime"]["flavor"] == "asyncio"
    theirs = rpc["contenders"]["netconduit"]
    assert theirs["versions"]["netconduit"] == "5.0.0"
    assert theirs["runtime"]["distribution_version"] == "5.0.0"
    assert _inside(theirs["runtime"]["module_file"], REPO / "benchmarks" / ".venvs")
    assert "seq-direct" in rpc["contenders"]["bare-trio"]["repetitions"][0]["workloads"]


@pytest.mark.slow
def test_rows_ratios_and_goals(quick_run: tuple[dict[str, Any], str]) -> None:
    record, stdout = quick_run
    rpc = record["scenarios"]["rpc"]
    rows = rpc["rows"]
    assert rpc["ratio_columns"] == ["x bare-trio", "x netconduit"]
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert row["n"] == record["repeat"]
        assert row["min"] <= row["median"] <= row["max"]
        assert set(row["ratios"]) == set(rpc["ratio_columns"])
        for ratio in row["ratios"].values():
            # None only where the reference measured zero (server CPU of a TCP
            # connect is below the kernel's tick).
            assert ratio is not None or row["metric"].startswith("server CPU")
            assert ratio is None or ratio["min"] <= ratio["median"] <= ratio["max"]
    covered = {(row["group"], row["metric"], row["contender"]) for row in rows}
    groups = {row["group"] for row in rows}
    # sequential, 16 callers, 64 callers, server CPU, handshake
    assert len(groups) == 5
    for group in groups:
        metrics = {metric for g, metric, _ in covered if g == group}
        for metric in metrics:
            assert {c for g, m, c in covered if g == group and m == metric} >= CONTENDERS
    references = [row for row in rows if row["contender"] == "bare-trio"]
    assert references
    assert all(row["ratios"]["x bare-trio"]["median"] == 1.0 for row in references)
    assert len(rpc["goals"]) == 5
    for goal in rpc["goals"]:
        assert _is_number(goal["value"])
        assert isinstance(goal["met"], bool)
    assert rpc["notes"]
    assert "== scenario rpc" in stdout
    assert "goals (reported, not asserted)" in stdout
