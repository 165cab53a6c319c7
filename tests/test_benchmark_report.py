"""The benchmarks page generator keeps what people wrote below its marker."""

from __future__ import annotations

import subprocess
from pathlib import Path

from benchmarks._harness import _changed_paths, _git
from benchmarks.report import HAND_WRITTEN_MARKER, hand_written_tail, update_docs


def test_regeneration_keeps_the_hand_written_tail(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    tail = f"{HAND_WRITTEN_MARKER}\n\n## Per-call budget\n\n| step | µs |\n"
    page.write_text("# Benchmarks\n\nold generated figures\n\n" + tail)
    update_docs(results_dir=tmp_path / "no-results", page=page)
    text = page.read_text()
    assert "old generated figures" not in text
    assert text.endswith(tail)
    assert text.count(HAND_WRITTEN_MARKER) == 1


def test_a_page_without_the_marker_has_no_tail(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    assert hand_written_tail(page) == ""
    page.write_text("# Benchmarks\n\nall generated\n")
    assert hand_written_tail(page) == ""


def test_a_record_names_each_changed_path_whole(tmp_path: Path) -> None:
    """``git status --porcelain`` starts a line with a space for a change not
    staged: the record must keep it, or the first path loses a character and a
    changed source file reads as no code changed."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "client.py").write_text("a = 1\n")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    (tmp_path / "src" / "client.py").write_text("a = 2\n")
    (tmp_path / "notes.md").write_text("new\n")
    status = _git("status", "--porcelain", cwd=tmp_path)
    assert status is not None
    changes = _changed_paths(status)
    assert changes == {
        "count": 2,
        "paths": ["src/client.py", "notes.md"],
        "code_changed": True,
    }
