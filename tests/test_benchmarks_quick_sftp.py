"""The ``sftp`` scenario in quick mode: transfers and handshakes, conduit and asyncssh.

See :mod:`benchmark_helpers` for what the quick runs are and why each scenario
has a module of its own.
"""

from __future__ import annotations

import pytest

from benchmark_helpers import (
    QuickRun,
    check_header_and_charts,
    check_op,
    check_rows,
    run_quick,
    scenario_of,
)

CONTENDERS = {"conduit-trio", "sftp"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """``python -m benchmarks --quick --scenario sftp``, once for this module."""
    return run_quick(tmp_path_factory, "sftp")


@pytest.mark.slow
def test_record_header_and_charts(quick_run: QuickRun) -> None:
    check_header_and_charts(quick_run)


@pytest.mark.slow
def test_sftp_transfers_and_handshakes(quick_run: QuickRun) -> None:
    record = quick_run.record
    sftp = scenario_of(quick_run, CONTENDERS)
    size = sftp["config"]["file_bytes"]
    for info in sftp["contenders"].values():
        for repetition in info["repetitions"]:
            upload, download = repetition["ops"]
            check_op(upload, "upload", size)
            check_op(download, "download", size)
            assert repetition["handshake"]["connects"] == sftp["config"]["connects"]
    runtime = sftp["contenders"]["sftp"]["runtime"]
    assert runtime["library"] == "asyncssh"
    assert runtime["cipher"] == "aes256-gcm@openssh.com"
    check_rows(sftp, record["repeat"])
