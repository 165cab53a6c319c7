"""``python -m benchmarks.ab``: two trees, the same work, run pair by pair.

The runs start real peer servers and clients of the tree under test (this
repository stands for both trees) on loopback and check the bytes they moved;
the assertions are about the structure of the comparison, never a timing.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
from benchmarks import ab

REPO = Path(__file__).resolve().parent.parent

#: The smallest run of each work, and the figures it must report.
SMALL_RUNS = {
    "rpc": (["--callers", "2", "--calls", "300"], "calls/s"),
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
    assert 0 <= summary[rate]["better_pairs"] <= 2
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
    runs = ab.run_pairs(trees, work, argparse.Namespace(pairs=3), REPO)
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
