"""The transfer peers prime memory right before each timed operation, when asked.

``_transferlib.prime_memory`` writes a scratch file and removes it; the
``OpTimer`` of a transfer operation does it before its clocks start and
reports whether it could (``"primed"``). Real files in a temp directory; the
whole ``bulk`` scenario's use of it is checked by ``test_benchmarks_quick_bulk``.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest
from benchmarks._harness import PEERS_DIR
from benchmarks.scenarios._transfer import RAM_DIR, priming


@pytest.fixture(scope="module")
def transferlib() -> ModuleType:
    # The peers import it as a top-level module from their own directory.
    spec = importlib.util.spec_from_file_location("_transferlib", PEERS_DIR / "_transferlib.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_priming_writes_whole_mebibytes_then_removes_them(
    transferlib: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    removed: list[str] = []
    # Keep the file to look at it: the removal is only recorded.
    monkeypatch.setattr(transferlib.os, "unlink", removed.append)
    assert transferlib.prime_memory({"dir": str(tmp_path), "bytes": 3 * 2**20 + 1}) is True
    (scratch,) = tmp_path.iterdir()
    assert removed == [str(scratch)]
    assert scratch.stat().st_size == 4 * 2**20  # at least as many bytes as asked


def test_priming_leaves_nothing_behind(transferlib: ModuleType, tmp_path: Path) -> None:
    assert transferlib.prime_memory({"dir": str(tmp_path), "bytes": 2**20}) is True
    assert list(tmp_path.iterdir()) == []


def test_priming_without_the_room_does_nothing(transferlib: ModuleType, tmp_path: Path) -> None:
    more_than_free = shutil.disk_usage(tmp_path).free + 2**30
    assert transferlib.prime_memory({"dir": str(tmp_path), "bytes": more_than_free}) is False
    assert list(tmp_path.iterdir()) == []


def test_priming_into_a_missing_directory_reports_it(
    transferlib: ModuleType, tmp_path: Path
) -> None:
    assert transferlib.prime_memory({"dir": str(tmp_path / "gone"), "bytes": 2**20}) is False


def test_the_timer_primes_before_it_starts_and_says_so(
    transferlib: ModuleType, tmp_path: Path
) -> None:
    with transferlib.OpTimer(None, {"dir": str(tmp_path), "bytes": 2**20}) as timer:
        pass
    assert timer.figures(2**20)["primed"] is True
    with transferlib.OpTimer(None) as unprimed:
        pass
    assert unprimed.figures(2**20)["primed"] is None
    assert list(tmp_path.iterdir()) == []


def test_the_priming_directory_goes_with_what_a_killed_client_left() -> None:
    with priming(2**20) as prime:
        if not RAM_DIR.is_dir():
            assert prime is None  # nowhere to prime: the clients run unprimed
            return
        assert prime is not None and prime["bytes"] == 2**20
        directory = Path(prime["dir"])
        assert directory.parent == RAM_DIR and directory.is_dir()
        # What a client killed in the middle of priming would leave.
        (directory / ".conduit-bench-prime-12345").write_bytes(b"x" * 4096)
    assert not directory.exists()
