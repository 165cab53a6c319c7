"""The benchmarks page generator keeps what people wrote below its marker."""

from __future__ import annotations

from pathlib import Path

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
