"""The ``rpc`` scenario in quick mode: every contender, from the right library, every row.

See :mod:`benchmark_helpers` for what the quick runs are and why each scenario
has a module of its own.
"""

from __future__ import annotations

import sys

import pytest

from benchmark_helpers import (
    REPO,
    ROW_KEYS,
    QuickRun,
    check_header_and_charts,
    inside,
    is_number,
    run_quick,
)

CONTENDERS = {"bare-trio", "conduit-trio", "conduit-asyncio", "netconduit"}
#: Measured in the handshake group only: accounts mode (SPAKE2+), one reconnecting Client.
HANDSHAKE_ONLY = {"conduit-accounts"}
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


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """``python -m benchmarks --quick --scenario rpc``, once for this module."""
    return run_quick(tmp_path_factory, "rpc")


@pytest.mark.slow
def test_record_header_and_charts(quick_run: QuickRun) -> None:
    check_header_and_charts(quick_run)


@pytest.mark.slow
def test_every_contender_measured_from_the_right_library(quick_run: QuickRun) -> None:
    record = quick_run.record
    rpc = record["scenarios"]["rpc"]
    repeat = record["repeat"]
    counts = rpc["config"]["counts_per_repetition"]
    assert set(rpc["contenders"]) == CONTENDERS | HANDSHAKE_ONLY
    for name, info in rpc["contenders"].items():
        assert info["status"] == "ok", (name, info.get("reason"))
        assert len(info["repetitions"]) == repeat
        for repetition in info["repetitions"]:
            if name in HANDSHAKE_ONLY:
                assert repetition["workloads"] == {}
                assert repetition["handshake"]["connects"] == counts["handshakes"]
                assert is_number(repetition["handshake"]["p50_ms"])
                continue
            assert set(repetition["workloads"]) >= WORKLOADS
            for workload in WORKLOADS:
                figures = repetition["workloads"][workload]
                assert set(figures) >= WORKLOAD_KEYS
                assert figures["calls"] == counts[workload]
                assert all(is_number(figures[key]) for key in WORKLOAD_KEYS)
            assert repetition["handshake"]["connects"] == counts["handshakes"]
            assert is_number(repetition["handshake"]["p50_ms"])
            assert is_number(repetition["handshake"]["cpu_ms_per_connect"])
            server_cpu = repetition["server_cpu"]
            # The same calls for every contender: the reference's direct
            # ping-pong is counted apart.
            assert server_cpu["rpc_calls"] == counts["warmup"] + sum(counts[w] for w in WORKLOADS)
            if name == "bare-trio":
                assert server_cpu["direct_calls"] == counts["warmup"] + counts["direct"]
            if sys.platform.startswith("linux"):
                assert is_number(server_cpu["us_per_call"])
                assert is_number(server_cpu["ms_per_connect"])
    # The two libraries share the import name `conduit`: each side must have
    # imported its own.
    ours = rpc["contenders"]["conduit-trio"]["runtime"]
    assert inside(ours["module_file"], REPO / "src")
    assert rpc["contenders"]["conduit-asyncio"]["runtime"]["flavor"] == "asyncio"
    theirs = rpc["contenders"]["netconduit"]
    assert theirs["versions"]["netconduit"] == "5.0.0"
    assert theirs["runtime"]["distribution_version"] == "5.0.0"
    assert inside(theirs["runtime"]["module_file"], REPO / "benchmarks" / ".venvs")
    assert "seq-direct" in rpc["contenders"]["bare-trio"]["repetitions"][0]["workloads"]


@pytest.mark.slow
def test_rows_ratios_and_goals(quick_run: QuickRun) -> None:
    record, stdout = quick_run.record, quick_run.stdout
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
    handshake_rows = {(m, c) for g, m, c in covered if g.startswith("handshake")}
    assert {m for m, c in handshake_rows if c in HANDSHAKE_ONLY} == {
        m for m, c in handshake_rows if c == "conduit-trio"
    }
    references = [row for row in rows if row["contender"] == "bare-trio"]
    assert references
    for row in references:
        ratio = row["ratios"]["x bare-trio"]
        # A reference that measured zero (server CPU of a TCP connect, below the
        # kernel's tick) has no ratio to itself.
        assert (ratio is None and row["metric"].startswith("server CPU")) or ratio["median"] == 1.0
    assert len(rpc["goals"]) == 11
    for goal in rpc["goals"]:
        assert is_number(goal["value"])
        assert isinstance(goal["met"], bool)
    assert rpc["notes"]
    assert "== scenario rpc" in stdout
    assert "goals (reported, not asserted; quick mode" in stdout
