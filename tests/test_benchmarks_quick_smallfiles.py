"""The ``smallfiles`` scenario in quick mode: every contender uploaded every file.

See :mod:`benchmark_helpers` for what the quick runs are and why each scenario
has a module of its own.
"""

from __future__ import annotations

import pytest

from benchmark_helpers import (
    QuickRun,
    check_header_and_charts,
    check_rows,
    is_number,
    run_quick,
    scenario_of,
)

CONTENDERS = {
    "raw-aead",
    "conduit-trio",
    "conduit-trio x8",
    "conduit-trio dir",
    "netconduit",
    "netconduit x8",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """``python -m benchmarks --quick --scenario smallfiles``, once for this module."""
    return run_quick(tmp_path_factory, "smallfiles")


@pytest.mark.slow
def test_record_header_and_charts(quick_run: QuickRun) -> None:
    check_header_and_charts(quick_run)


@pytest.mark.slow
def test_smallfiles_every_file_uploaded(quick_run: QuickRun) -> None:
    record = quick_run.record
    smallfiles = scenario_of(quick_run, CONTENDERS)
    for name, info in smallfiles["contenders"].items():
        for repetition in info["repetitions"]:
            figures = repetition["smallfiles"]
            assert figures["files"] == smallfiles["config"]["files"] == 200
            assert figures["concurrency"] == (8 if name.endswith("x8") else 1)
            assert is_number(figures["files_per_s"])
            # Paced slice by slice with the other contenders, on one connection.
            assert figures["slices"] == smallfiles["config"]["slices"] == 4
    check_rows(smallfiles, record["repeat"])
    # Like for like: concurrent against netconduit with as many in flight.
    assert [goal["goal"] for goal in smallfiles["goals"]] == [
        "conduit-trio files/s >= 3x netconduit",
        "conduit-trio x8 files/s >= 3x netconduit x8",
        "conduit-trio dir files/s >= 3x netconduit x8",
    ]
