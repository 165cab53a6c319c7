"""The ``memory`` scenario in quick mode: upload peaks and idle connections, per contender.

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

CONTENDERS = {"conduit-trio", "raw-aead", "netconduit"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """``python -m benchmarks --quick --scenario memory``, once for this module."""
    return run_quick(tmp_path_factory, "memory")


@pytest.mark.slow
def test_record_header_and_charts(quick_run: QuickRun) -> None:
    check_header_and_charts(quick_run)


@pytest.mark.slow
def test_memory_upload_peaks_and_idle_connections(quick_run: QuickRun) -> None:
    record = quick_run.record
    memory = scenario_of(quick_run, CONTENDERS)
    small, large = memory["config"]["upload_sizes"]
    connections = memory["config"]["idle_connections"]
    assert connections == 100
    for name, info in memory["contenders"].items():
        for repetition in info["repetitions"]:
            sizes = {small} if name == "netconduit" else {small, large}
            assert set(repetition["upload"]) == sizes
            for figures in repetition["upload"].values():
                assert is_number(figures["peak_rss_mib"])
                assert is_number(figures["sampled_peak_rss_mib"])
                # The whole life's peak: never below either of its parts.
                assert figures["process_peak_rss_mib"] >= figures["peak_rss_mib"]
                assert figures["process_peak_rss_mib"] >= figures["first_handshake_peak_rss_mib"]
                assert figures["samples"] >= 1
            if name in ("conduit-trio", "netconduit"):
                idle = repetition["idle"]
                assert idle["connections"] == connections
                # Counted on the server's side, the warm-up's connections with them.
                assert idle["server_connections"] == connections + idle["warmup_connections"]
                assert is_number(idle["rss_after_mib"])
                assert isinstance(idle["kib_per_connection"], float)
    groups = {row["group"] for row in memory["rows"]}
    assert len(groups) == 3
    check_rows(memory, record["repeat"])
    assert [goal["unit"] for goal in memory["goals"]] == ["MiB", "MiB", "MiB", "MiB", "KiB"]
