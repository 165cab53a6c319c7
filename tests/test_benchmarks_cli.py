"""The benchmark suite's command line: what a run without options runs, and its quick tests.

The scenarios themselves run for real in ``tests/test_benchmarks_quick_<name>.py``
(one module per scenario, see :mod:`benchmark_helpers`); these cheap checks make
sure no scenario is left without one and that a plain ``python -m benchmarks``
still runs them all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import cli
from benchmarks._harness import RunConfig, ScenarioResult
from benchmarks.scenarios import SCENARIOS, Scenario

TESTS = Path(__file__).resolve().parent
#: Every scenario of the suite, in running order (a new one needs a quick test module).
EXPECTED = ["rpc", "bulk", "memory", "hol", "smallfiles", "sftp", "auth_abuse", "cluster"]


def test_every_scenario_has_its_quick_test_module() -> None:
    assert list(SCENARIOS) == EXPECTED
    for name in SCENARIOS:
        module = TESTS / f"test_benchmarks_quick_{name}.py"
        assert module.is_file(), module
        assert f'run_quick(tmp_path_factory, "{name}"' in module.read_text()


def test_the_default_repeat_is_at_least_five() -> None:
    assert cli.build_parser().parse_args([]).repeat >= 5


def test_a_run_without_scenario_runs_every_scenario_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[tuple[str, str, int]] = []

    def stand_in(name: str) -> Scenario:
        def run(config: RunConfig) -> ScenarioResult:
            ran.append((name, config.mode, config.repeat))
            return ScenarioResult(name=name, config={}, contenders={}, rows=[], ratio_columns=[])

        return run

    monkeypatch.setattr(cli, "SCENARIOS", {name: stand_in(name) for name in SCENARIOS})
    out = tmp_path / "run.json"
    assert cli.main(["--quick", "--repeat", "1", "--no-charts", "--json-out", str(out)]) == 0
    assert ran == [(name, "quick", 1) for name in EXPECTED]
    assert list(json.loads(out.read_text())["scenarios"]) == EXPECTED
