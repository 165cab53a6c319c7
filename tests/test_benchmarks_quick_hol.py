"""The ``hol`` scenario in quick mode: RPCs ran on the connection during the upload.

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

CONTENDERS = {"conduit-trio", "netconduit"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """``python -m benchmarks --quick --scenario hol``, once for this module."""
    return run_quick(tmp_path_factory, "hol")


@pytest.mark.slow
def test_record_header_and_charts(quick_run: QuickRun) -> None:
    check_header_and_charts(quick_run)


@pytest.mark.slow
def test_hol_rpcs_ran_during_the_upload(quick_run: QuickRun) -> None:
    record = quick_run.record
    hol = scenario_of(quick_run, CONTENDERS)
    for info in hol["contenders"].values():
        for repetition in info["repetitions"]:
            figures = repetition["hol"]
            assert figures["idle"]["calls"] == hol["config"]["idle_calls"]
            assert figures["during_upload"]["calls"] >= 1
            assert is_number(figures["during_upload"]["p99_us"])
            # The data's window is inside the upload's: fewer calls, a shorter time.
            in_data = figures["during_data"]
            assert 1 <= in_data["calls"] <= figures["during_upload"]["calls"]
            assert 0 < in_data["wall_s"] <= figures["during_upload"]["wall_s"]
            assert is_number(in_data["p99_us"])
            assert figures["upload"]["bytes"] == hol["config"]["upload_bytes"]
    check_rows(hol, record["repeat"])
    assert len(hol["goals"]) == 1
    assert hol["goals"][0]["unit"] == "ms"
    assert "data flows" in hol["goals"][0]["goal"]
