"""The ``auth_abuse`` scenario in quick mode: every attack ran against its own server.

See :mod:`benchmark_helpers` for what the quick runs are and why each scenario
has a module of its own.
"""

from __future__ import annotations

import pytest
from benchmarks._harness import goal_value_text

from benchmark_helpers import QuickRun, check_header_and_charts, check_rows, is_number, run_quick

FLOODS = ("hello_flood_1", "hello_flood_32", "hello_flood_seq", "hello_flood_spread")
ATTACKS = {"guesses", *FLOODS, "idle_flood"}
GROUPS = {
    "100 parallel wrong guesses",
    "hello flood, 32 sockets, 1 address",
    "hello flood, 32 sockets, 32 addresses",
    "hello flood, 1 socket at a time, 40,000 addresses",
    "hello flood, 32 sockets, 40,000 addresses",
    "idle-socket flood from 127.0.0.30",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    """``python -m benchmarks --quick --scenario auth_abuse --repeat 1``, once for this module."""
    # One repetition: its four attacks already start four servers, and the floods
    # last a fixed time (no figure here has a ratio whose spread needs two).
    return run_quick(tmp_path_factory, "auth_abuse", repeat=1)


@pytest.mark.slow
def test_record_header_and_charts(quick_run: QuickRun) -> None:
    check_header_and_charts(quick_run)


@pytest.mark.slow
def test_every_attack_ran_and_was_measured(quick_run: QuickRun) -> None:
    record = quick_run.record
    scenario = record["scenarios"]["auth_abuse"]
    assert set(scenario["contenders"]) == {"conduit-trio"}
    info = scenario["contenders"]["conduit-trio"]
    assert info["status"] == "ok", info.get("reason")
    results = info["repetitions"]
    assert set(results) == ATTACKS == set(scenario["config"]["attacks"])
    assert all(len(results[attack]) == record["repeat"] for attack in ATTACKS)
    for guesses in results["guesses"]:
        # Every guess that came back is counted once, and some did come back.
        answered = guesses["evaluated"] + guesses["locked_out"] + guesses["other"]
        assert 1 <= answered <= 100
    for attack in FLOODS:
        for flood in results[attack]:
            assert flood["hellos_sent"] >= 1
            assert 0 <= flood["hellos_refused"] <= flood["hellos_sent"]
            # The honest client's calls during the flood.
            assert flood["calls"] >= 1
            assert all(is_number(flood[key]) for key in ("baseline_p99_ms", "p99_ms"))
    for flood in results["hello_flood_seq"] + results["hello_flood_spread"]:
        # Sized to stay under every address's lock-out: a refused hello means
        # the flood did less work than it claims to.
        assert flood["hellos_refused"] == 0, flood
    for flood in results["hello_flood_1"]:
        # One address, 32 sockets: locked out within its first few failures.
        assert flood["hellos_refused"] > 0, flood
    tries = scenario["config"]["attacks"]["idle_flood"]["tries"]
    for flood in results["idle_flood"]:
        assert flood["tries"] == tries
        assert 0 <= flood["connected"] <= tries
        assert flood["idle_sockets_opened"] >= 1
    assert {row["group"] for row in scenario["rows"]} == GROUPS
    check_rows(scenario, record["repeat"])
    assert len(scenario["goals"]) == 2 + len(FLOODS)
    # Each goal is shown in its own unit (a count, a latency, a share), never as a ratio.
    units = [goal["unit"] for goal in scenario["goals"]]
    assert units == ["guesses", *["ms"] * len(FLOODS), "%"]
    for goal in scenario["goals"]:
        assert f"{goal['goal']}: {goal_value_text(goal)} -> " in quick_run.stdout
