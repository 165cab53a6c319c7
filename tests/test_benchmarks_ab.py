"""``python -m benchmarks.ab``: two trees, the same work, run pair by pair.

The runs start real peer servers and clients of the tree under test (this
repository stands for both trees) on loopback and check the bytes they moved;
the assertions are about the structure of the comparison, never a timing.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from benchmarks import ab
from benchmarks._harness import PeerError

REPO = Path(__file__).resolve().parent.parent

#: The smallest run of each work, and the figures it must report.
SMALL_RUNS = {
    # Enough calls that the server's CPU for them stands out of the warm-up's noise.
    "rpc": (["--callers", "2", "--calls", "5000"], "calls/s"),
    "smallfiles": (["--files", "12", "--concurrency", "2"], "files/s"),
    "bulk": (["--size", "3"], "download MB/s"),
}


@pytest.mark.parametrize("work", sorted(SMALL_RUNS))
def test_each_work_runs_on_both_trees_pair_by_pair(
    work: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options, rate = SMALL_RUNS[work]
    out = tmp_path / "ab.json"
    argv = [str(REPO), str(REPO), "--work", work, "--pairs", "2", *options, "--disk"]
    assert ab.main([*argv, "--json-out", str(out)]) == 0
    document = json.loads(out.read_text())
    names = [figure.name for figure in ab.WORKS[work][1]]
    assert rate in names
    for label in ("A", "B"):
        assert len(document["runs"][label]) == 2
        for run in document["runs"][label]:
            assert list(run) == names
            assert all(math.isfinite(value) and value >= 0 for value in run.values())
            assert run[rate] > 0
    summary = document["summary"]
    assert list(summary) == names
    assert summary[rate]["ratio"]["n"] == 2
    table = capsys.readouterr().out
    assert f"work: {work}, 2 pairs" in table
    assert all(name in table for name in names)


def test_the_trees_alternate_and_each_pair_is_compared_in_time_order() -> None:
    order: list[str] = []
    speeds = {"A": iter([10.0, 12.0, 9.0]), "B": iter([11.0, 11.0, 10.0])}

    def work(tree: ab.Tree, options: argparse.Namespace, scratch: Path) -> ab.Figures:
        order.append(tree.label)
        speed = next(speeds[tree.label])
        return {"calls/s": speed, "p50, us": 1000 / speed}

    trees = [ab.Tree("A", REPO), ab.Tree("B", REPO)]
    runs: dict[str, list[ab.Figures]] = {}
    ab.run_pairs(trees, work, argparse.Namespace(pairs=3), REPO, runs)
    assert order == ["A", "B", "B", "A", "A", "B"]
    figures = (ab.Figure("calls/s", True), ab.Figure("p50, us", False))
    summary = ab.compare(runs, figures, "A", "B")
    # B is faster in pairs 1 and 3, slower in pair 2, on both figures.
    assert summary["calls/s"]["better_pairs"] == 2
    assert summary["p50, us"]["better_pairs"] == 2
    assert summary["calls/s"]["ratio"]["values"] == pytest.approx([1.1, 11 / 12, 10 / 9])
    assert summary["calls/s"]["A"]["median"] == 10.0


def test_a_directory_without_conduit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not a conduit tree"):
        ab.main([str(tmp_path), str(REPO)])


def test_sizes_below_one_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ab.parse_args([str(REPO), str(REPO), "--pairs", "0"])
    assert "--pairs must be at least 1" in capsys.readouterr().err


def _copy_of_this_tree(into: Path) -> Path:
    """A second tree: this repository's ``src/conduit`` and peers, copied."""
    shutil.copytree(REPO / "src" / "conduit", into / "src" / "conduit")
    shutil.copytree(REPO / "benchmarks" / "peers", into / "benchmarks" / "peers")
    return into


def test_each_tree_runs_its_own_conduit(tmp_path: Path) -> None:
    # Were tree B's peers run with this repository's src/, the import check
    # would stop the comparison (exit status 1).
    other = _copy_of_this_tree(tmp_path / "other")
    out = tmp_path / "ab.json"
    argv = [str(REPO), str(other), "--pairs", "1", "--callers", "2", "--calls", "200", "--disk"]
    assert ab.main([*argv, "--json-out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["error"] is None
    assert str(other) in document["trees"]["B"]


@pytest.mark.parametrize("module_file", [None, "/elsewhere/conduit/__init__.py"])
def test_a_client_that_imported_another_conduit_is_refused(
    module_file: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def stand_in(argv: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
        return {"runtime": {"module_file": module_file}}

    monkeypatch.setattr(ab, "run_client", stand_in)
    with pytest.raises(PeerError, match="imported conduit from"):
        ab._measured(ab.Tree("A", REPO), ["client"])


def test_a_failed_run_keeps_what_was_measured_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _copy_of_this_tree(tmp_path / "broken")
    (broken / "benchmarks" / "peers" / "conduit_peer.py").write_text(
        "import sys\nsys.exit('this peer is broken')\n"
    )
    scratch_parent = tmp_path / "scratch"
    scratch_parent.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_parent))
    out = tmp_path / "ab.json"
    argv = [str(REPO), str(broken), "--pairs", "2", "--callers", "2", "--calls", "200"]
    assert ab.main([*argv, "--disk", "--json-out", str(out)]) == 1
    document = json.loads(out.read_text())
    assert len(document["runs"]["A"]) == 1  # A ran first, B's server never started
    assert document["runs"]["B"] == []
    assert document["summary"] == {}  # no whole pair
    assert "exited (code 1) before its first line" in document["error"]
    assert "stopped by a failed run" in capsys.readouterr().out
    assert list(scratch_parent.iterdir()) == []
