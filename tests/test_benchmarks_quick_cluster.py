"""The ``cluster`` scenario in quick mode: pushes to both nodes, both stores.

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

CONTENDERS = {"same-node", "cross-node", "local store", "S3 store"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """``python -m benchmarks --quick --scenario cluster``, once for this module."""
    return run_quick(tmp_path_factory, "cluster")


@pytest.mark.slow
def test_record_header_and_charts(quick_run: QuickRun) -> None:
    check_header_and_charts(quick_run)


@pytest.mark.slow
def test_cluster_pushes_to_both_nodes(quick_run: QuickRun) -> None:
    record = quick_run.record
    cluster = scenario_of(quick_run, CONTENDERS)
    sizes = cluster["config"]["sizes"]
    assert sizes == ["64 KiB", "4 MiB"]
    for name in ("same-node", "cross-node"):
        for repetition in cluster["contenders"][name]["repetitions"]:
            assert set(repetition) == set(sizes)
            assert all(is_number(seconds) and seconds > 0 for seconds in repetition.values())
    # The store comparison: the same file up and down through each store.
    stored = cluster["config"]["store_file_size"]
    for name in ("local store", "S3 store"):
        for repetition in cluster["contenders"][name]["repetitions"]:
            assert set(repetition) == {"upload MiB/s", "download MiB/s"}
            assert all(is_number(rate) and rate > 0 for rate in repetition.values())
    assert {row["group"] for row in cluster["rows"]} == {
        *(f"push of {size}" for size in sizes),
        f"upload of {stored}",
        f"download of {stored}",
    }
    check_rows(cluster, record["repeat"])
