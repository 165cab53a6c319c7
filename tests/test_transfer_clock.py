"""Transfer timers read Trio's clock, so a ``MockClock`` drives them.

The progress throttle and rate, and the expiry of abandoned partial files,
run on ``trio.current_time()``; a partial found on disk gets the expiry its
wall-clock mtime implies, checked here with real files aged by ``os.utime``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio
import trio.testing

from conduit import FileTransferHandler, TransferProgress
from conduit.transfer._backend_local import LocalBackend
from conduit.transfer._progress import REPORT_INTERVAL, ProgressReporter
from conduit.transfer._storage import StorageRoot
from transfer_helpers import partial_files


async def test_progress_reports_and_rates_follow_the_trio_clock(
    mock_clock: trio.testing.MockClock,
) -> None:
    reports: list[TransferProgress] = []
    reporter = ProgressReporter(
        reports.append, filename="f.bin", direction="upload", total_size=1000, resumed_from=100
    )
    await reporter.advance(100)
    assert len(reports) == 1  # the first advance always reports, whatever the clock reads
    await reporter.advance(100)
    assert len(reports) == 1  # no time has passed on this clock: throttled
    mock_clock.jump(REPORT_INTERVAL)
    await reporter.advance(100)
    assert len(reports) == 2
    await reporter.advance(100)
    assert len(reports) == 2  # throttled: finish() reports it
    mock_clock.jump(1.9)
    final = await reporter.finish()
    assert reports[-1] is final and len(reports) == 3
    assert final.transferred == 500
    assert final.elapsed == REPORT_INTERVAL + 1.9  # exactly the mock time
    assert final.speed == 400 / final.elapsed  # bytes of this attempt only
    # A count already reported is not reported again (the guide's example
    # printed "100.0%100.0%" for a file sent in one block).
    assert (await reporter.finish()).transferred == 500
    assert len(reports) == 3


def _stale_partial(storage: Path, name: str) -> Path:
    partial = StorageRoot(storage).open_partial(name, "a" * 32, resume=False)
    partial.write_block(b"left by a dropped connection")
    partial.close()
    [path] = [p for p in partial_files(storage) if name in p.name]
    day_ago = time.time() - 24 * 3600
    os.utime(path, (day_ago, day_ago))  # mtimes are wall clock, and so is their age
    return path


async def _until_gone(path: Path) -> None:
    """Wait (in real time: the mock clock stands still) for the sweeper's worker thread."""
    for _ in range(1000):
        if not path.exists():
            return
        await trio.to_thread.run_sync(time.sleep, 0.01)
    raise AssertionError(f"{path} was not removed")


async def test_the_stale_partial_sweep_runs_on_the_trio_clock(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    storage = tmp_path / "server"
    handler = FileTransferHandler(storage_dir=storage, partial_ttl=3600)
    backend = handler.backend
    assert isinstance(backend, LocalBackend)  # a local storage_dir
    budget = backend.budget
    first = _stale_partial(storage, "first.bin")
    fresh = StorageRoot(storage).open_partial("fresh.bin", "b" * 32, resume=False)
    fresh.close()
    await budget._ensure_running()  # what every upload begin does first
    await _until_gone(first)  # a day old by its mtime: swept at once
    [kept] = partial_files(storage)
    assert "fresh.bin" in kept.name  # written just now: an hour to go
    mock_clock.jump(3599)
    await trio.testing.wait_all_tasks_blocked()
    assert kept.exists()  # within partial_ttl of Trio time: kept
    mock_clock.jump(1)
    await _until_gone(kept)  # expired: the sweeper wakes and removes it
