"""The ``bulk`` scenario in quick mode: every contender moved the right bytes, both ways.

See :mod:`benchmark_helpers` for what the quick runs are and why each scenario
has a module of its own.
"""

from __future__ import annotations

import sys

import pytest

from benchmark_helpers import (
    REPO,
    QuickRun,
    check_header_and_charts,
    check_op,
    check_rows,
    inside,
    run_quick,
    scenario_of,
)

CONTENDERS = {
    "raw-aead",
    "raw-aead-64k",
    "raw-plain",
    "bare-trio",
    "conduit-trio",
    "conduit-asyncio",
    "netconduit",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """``python -m benchmarks --quick --scenario bulk``, once for this module."""
    return run_quick(tmp_path_factory, "bulk")


@pytest.mark.slow
def test_record_header_and_charts(quick_run: QuickRun) -> None:
    check_header_and_charts(quick_run)


@pytest.mark.slow
def test_bulk_every_contender_moved_the_right_bytes(quick_run: QuickRun) -> None:
    record = quick_run.record
    bulk = scenario_of(quick_run, CONTENDERS)
    size = bulk["config"]["file_bytes"]
    assert size == 64 * 1024 * 1024
    if sys.platform.startswith("linux"):
        assert bulk["config"]["files"]["storage"] == "ram"
    primed = bulk["config"]["primed"]
    if sys.platform.startswith("linux"):
        assert primed["ops_primed"] == 2 * len(CONTENDERS) * record["repeat"]
        assert primed["ops_unprimed"] == 0
    for info in bulk["contenders"].values():
        assert len(info["repetitions"]) == record["repeat"]
        for repetition in info["repetitions"]:
            upload, download = repetition["ops"]
            check_op(upload, "upload", size)
            check_op(download, "download", size)
            assert len(repetition["verified_sha256"]) == 64
    contenders = bulk["contenders"]
    assert inside(contenders["conduit-trio"]["runtime"]["module_file"], REPO / "src")
    assert contenders["conduit-asyncio"]["runtime"]["flavor"] == "asyncio"
    assert contenders["netconduit"]["runtime"]["distribution_version"] == "5.0.0"
    assert contenders["raw-aead"]["runtime"]["aead"] is True
    assert contenders["raw-plain"]["runtime"]["aead"] is False
    assert contenders["raw-aead-64k"]["runtime"]["record"] == 64 * 1024
    assert contenders["bare-trio"]["runtime"]["library"] == "bare-trio-transfer"
    assert bulk["ratio_columns"] == ["x raw-aead", "x netconduit"]
    groups = {row["group"] for row in bulk["rows"]}
    assert groups == {"upload 64 MiB", "download 64 MiB"}
    for group in groups:
        throughput = {
            r["contender"]
            for r in bulk["rows"]
            if r["group"] == group and r["metric"] == "throughput"
        }
        assert throughput == CONTENDERS
    check_rows(bulk, record["repeat"])
    # vs the reference and netconduit (both directions), the shim's cost and
    # the asyncio event-loop stall (both directions)
    assert len(bulk["goals"]) == 8
    stalls = [goal for goal in bulk["goals"] if "event-loop stall" in goal["goal"]]
    assert [goal["unit"] for goal in stalls] == ["ms", "ms"]
    stall_rows = {
        (row["group"], row["contender"])
        for row in bulk["rows"]
        if row["metric"].startswith("event-loop stall")
    }
    assert stall_rows == {(g, c) for g in groups for c in ("conduit-trio", "conduit-asyncio")}
