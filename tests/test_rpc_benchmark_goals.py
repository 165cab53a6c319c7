"""The rpc scenario's goals on server CPU: per RPC beside the bare Trio echo, per connect."""

from __future__ import annotations

from typing import Any

from benchmarks.report import _goal_line
from benchmarks.scenarios.rpc import _goals


def _repetition(server_cpu_us: float) -> dict[str, Any]:
    return {"server_cpu": {"us_per_call": server_cpu_us}, "workloads": {}}


def _server_cpu_goal(repetitions: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (goal,) = [g for g in _goals(repetitions) if "server CPU per RPC" in g["goal"]]
    return goal


def test_server_cpu_goal_names_the_bare_trio_floor_of_the_same_run() -> None:
    repetitions = {
        "bare-trio": [_repetition(45.3), _repetition(40.0), _repetition(50.0)],
        "conduit-trio": [_repetition(43.8), _repetition(30.0), _repetition(44.0)],
    }
    goal = _server_cpu_goal(repetitions)
    assert goal["value"] == 43.8
    assert goal["met"] is False
    assert "45.3 us" in goal["context"]
    line = _goal_line(goal)
    assert line.startswith("- conduit-trio server CPU per RPC <= 25 us: **43.8 us** -> MISSED (")
    assert "bare Trio echo" in line and "45.3 us" in line


def test_server_cpu_goal_without_the_reference_has_no_floor() -> None:
    goal = _server_cpu_goal({"conduit-trio": [_repetition(20.0)]})
    assert goal["met"] is True
    assert "context" not in goal
    assert _goal_line(goal).endswith("-> met")


def _connect_repetition(ms_per_connect: float | None) -> dict[str, Any]:
    return {"server_cpu": {"ms_per_connect": ms_per_connect}, "workloads": {}}


def test_server_cpu_per_connect_goals_take_each_modes_median() -> None:
    repetitions = {
        "conduit-trio": [_connect_repetition(v) for v in (0.46, 0.9, 0.44)],
        "conduit-accounts": [_connect_repetition(v) for v in (1.2, 1.1, 0.6)],
    }
    goals = {g["goal"]: g for g in _goals(repetitions) if "per connect" in g["goal"]}
    assert set(goals) == {
        "conduit-trio server CPU per connect <= 1 ms",
        "conduit-accounts server CPU per connect <= 1 ms",
    }
    shared = goals["conduit-trio server CPU per connect <= 1 ms"]
    accounts = goals["conduit-accounts server CPU per connect <= 1 ms"]
    assert (shared["value"], shared["met"]) == (0.46, True)
    assert (accounts["value"], accounts["met"]) == (1.1, False)
    assert _goal_line(shared) == "- conduit-trio server CPU per connect <= 1 ms: **0.46 ms** -> met"


def test_server_cpu_per_connect_goal_without_figures_is_not_judged() -> None:
    goals = _goals({"conduit-trio": [_connect_repetition(None)]})
    (shared,) = [g for g in goals if g["goal"].startswith("conduit-trio server CPU per connect")]
    assert shared["value"] is None and shared["met"] is None
