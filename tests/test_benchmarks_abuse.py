"""``python -m benchmarks.abuse`` at a small scale: each scenario does the attack it names.

The full-size runs are figures (``nox -s stress``); this runs the same code
at ``--scale 0.05`` against its real server process and checks what each
scenario now verifies of its own attack: the dropped uploads were cut after
the server had data of them (none finished uncut), and the stalled and
resume-claiming downloads were all answered (admitted or refused), some
admitted, the server hashed some of the wrong resume claims but no more
than each connection's budget allows, and the large calls of all connections,
and the small calls and messages that hold far more decoded than their bytes,
were admitted only within the server's call budget and each user's share
of it, and the messages let in past it only within its overdraft.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_every_abuse_scenario_runs_and_passes_at_a_small_scale() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.abuse", "--scale", "0.05"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split("]")[0] for line in lines] == ["[PASS"] * 9, lines
    dropped, _bad, stalled, resume, large, messages, calls, one_user, first = lines
    assert "0 finished before their cut" in dropped, dropped
    cut = re.search(r"\((\d+) MiB in their partials", dropped)
    assert cut is not None and int(cut.group(1)) > 0, dropped
    for line in (stalled, resume):
        # 6 calls on each of 4 connections: under the cap of 32, all admitted.
        assert "(24 admitted" in line, line
    # 6 claims of 256 MiB - 1 a connection, a budget of 1 GiB: 5 hashed (4 cost
    # 4 bytes less than the budget), the sixth refused unhashed.
    hashed = re.search(r"; (\d+) hashed, ([\d.]+) GiB", resume)
    assert hashed is not None, resume
    assert int(hashed.group(1)) == 20, resume
    assert float(hashed.group(2)) == pytest.approx(5.0, abs=0.01), resume
    # 3 connections (3 users: addresses) x 8 calls of 21.7 MiB (by the count)
    # against a budget of 64 MiB, 16 MiB a user: two admitted, each its
    # user's first (a user holding nothing is let one in); the third user's
    # first refused by the server's budget (its own share had room), and
    # everything behind them.
    assert "(2 admitted, 14 refused 'overloaded', 8 refused 'overloaded (server)'" in large, large
    assert "the largest user's count peaked at 22 MiB" in large, large
    # Bodies under 4 KiB of empty maps (556 KB each by the count), one
    # connection a user, against the same budgets: 2 x 100 messages, all
    # handled, each user's count at its share while they wait; 3 x 128
    # calls, 30 a user admitted (its share; each connection's own bound
    # would let in 60), the rest refused by the share.
    assert (
        "(200 of 200 handled; the server's count peaked at 32 MiB; 2 addresses (users); "
        "the largest user's count peaked at 16 MiB)"
    ) in messages, messages
    assert "(90 admitted, 294 refused 'overloaded (user)'" in calls, calls
    assert "the largest user's count peaked at 16 MiB" in calls, calls
    # The same large calls from one address: its first admitted (it held
    # nothing), the rest refused by its connections' bounds or its share;
    # another address's call (it holds nothing either) still runs, and its
    # next ones are refused by its own share, never by the server's budget.
    assert "(1 admitted, 7 refused 'overloaded', 16 refused 'overloaded (user)'" in one_user
    assert "a call each: 1 admitted, 3 refused 'overloaded (user)'" in one_user, one_user
    # 12 connections (8 users) x one message of 13.7 MB by the count, against
    # a budget of 64 MiB: 4 fit it, 5 more (each its connection's first) are
    # let into the overdraft, twice the budget, and the other 3 wait until
    # the handlers go on (before, all 12 were let in: 157 MiB by the count).
    assert "(12 of 12 handled; the server's count peaked at 118 MiB;" in first, first
