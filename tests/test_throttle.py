"""The attempt throttle's window: failures age from when they failed, and
attempts in flight never age out.

Driven with plain numbers for the clock (the throttle takes ``now`` on every
call): attempts held open for longer than ``auth_failure_window``, as an
``auth_timeout`` longer than the window allows (or a slow peer, a queue or a
thread stretching an attempt).
"""

from __future__ import annotations

import pytest

from conduit._throttle import MAX_TRUSTED_PER_USER, Attempt, AuthThrottle

ADDRESS = "10.0.0.1"


def test_attempts_held_past_the_window_fill_the_budget_and_count() -> None:
    """The reviewer's window_prune scenario: limit 3, window 2 s, each guess held
    open 2.5 s before it fails. Were attempts aged out by their reservation
    time, the budget would be empty again at each round and the failures
    would find nothing to count: unlimited guesses."""
    throttle = AuthThrottle(limit=3, window=2.0, lockout=60.0)
    granted = 0
    refused = 0
    now = 0.0
    for _ in range(10):
        held: list[Attempt] = []
        for _ in range(8):  # eight parallel guesses per round
            attempt = throttle.reserve(ADDRESS, "", now)
            if isinstance(attempt, Attempt):
                held.append(attempt)
            else:
                refused += 1
        granted += len(held)
        now += 2.5  # held longer than the window, then failed
        for attempt in held:
            throttle.failed(attempt, now)
        now += 0.1
    assert granted == 3
    assert refused == 10 * 8 - 3
    assert throttle.retry_after(ADDRESS, now) > 0


def test_a_users_budget_counts_attempts_held_past_the_window() -> None:
    throttle = AuthThrottle(limit=100, window=2.0, lockout=60.0, user_limit=2)
    first = throttle.reserve("10.0.0.1", "alice", 0.0)
    second = throttle.reserve("10.0.0.2", "alice", 0.0)
    assert isinstance(first, Attempt) and isinstance(second, Attempt)
    assert throttle.reserve("10.0.0.3", "alice", 3.0) == 0.0  # both still in flight
    throttle.failed(first, 3.0)
    throttle.failed(second, 3.0)
    assert throttle.retry_after("10.0.0.3", 3.5, "alice") == pytest.approx(59.5)


def test_a_failure_counts_for_the_window_from_when_it_failed() -> None:
    throttle = AuthThrottle(limit=2, window=2.0, lockout=60.0)
    slow = throttle.reserve(ADDRESS, "", 0.0)
    assert isinstance(slow, Attempt)
    throttle.failed(slow, 5.0)  # reserved at 0, failed at 5: counts until 7
    quick = throttle.reserve(ADDRESS, "", 6.5)
    assert isinstance(quick, Attempt)
    throttle.failed(quick, 6.5)
    assert throttle.retry_after(ADDRESS, 6.6) == pytest.approx(59.9)
    # Past the window of the first failure, one more does not lock.
    later = AuthThrottle(limit=2, window=2.0, lockout=60.0)
    slow = later.reserve(ADDRESS, "", 0.0)
    assert isinstance(slow, Attempt)
    later.failed(slow, 5.0)
    quick = later.reserve(ADDRESS, "", 7.5)
    assert isinstance(quick, Attempt)
    later.failed(quick, 7.5)
    assert later.retry_after(ADDRESS, 7.6) == 0.0


def test_a_spray_of_new_addresses_never_drops_an_attempt_in_flight() -> None:
    """Making room in a full table forgets records that no longer matter, never
    one whose attempts are still in flight: they would then fail uncounted."""
    throttle = AuthThrottle(limit=2, window=60.0, lockout=30.0, max_tracked=10)
    held = [throttle.reserve(ADDRESS, "", 0.0) for _ in range(2)]
    assert all(isinstance(a, Attempt) for a in held)
    for i in range(20):  # long after the window: the spray fills the table
        throttle.record_failure(f"10.1.0.{i}", 100.0)
    for attempt in held:
        throttle.failed(attempt, 101.0)  # type: ignore[arg-type]
    assert throttle.retry_after(ADDRESS, 102.0) == pytest.approx(29.0)


def test_a_released_attempt_frees_its_slot_uncounted() -> None:
    """The server's own fault (not the peer's): the attempt is given back, neither
    counted as a failure nor taken for a success."""
    throttle = AuthThrottle(limit=2, window=60.0, lockout=30.0)
    failed = throttle.reserve(ADDRESS, "bob", 0.0)
    assert isinstance(failed, Attempt)
    throttle.failed(failed, 0.0)
    for _ in range(5):
        attempt = throttle.reserve(ADDRESS, "bob", 1.0)
        assert isinstance(attempt, Attempt)
        throttle.released(attempt, 1.0)
    assert throttle.retry_after(ADDRESS, 2.0, "bob") == 0.0
    # The earlier failure still counts (nothing was forgiven): one more locks.
    last = throttle.reserve(ADDRESS, "bob", 2.0)
    assert isinstance(last, Attempt)
    throttle.failed(last, 2.0)
    assert throttle.retry_after(ADDRESS, 3.0) == pytest.approx(29.0)


def test_records_of_addresses_and_names_that_never_return_are_forgotten() -> None:
    """A spray of failures from addresses (and unknown names) that never come
    back: once their window and lock-out have passed, later attempts sweep
    them out, a few each, instead of keeping them until the table is full."""
    throttle = AuthThrottle(limit=2, window=5.0, lockout=3.0, user_limit=2)
    for i in range(1000):
        throttle.record_failure(f"10.2.{i // 256}.{i % 256}", 0.0, f"nobody-{i}")
    assert throttle.tracked() >= 2000
    # Long after: an honest client's attempts, one a second.
    for second in range(300):
        attempt = throttle.reserve(ADDRESS, "alice", 60.0 + second)
        assert isinstance(attempt, Attempt)
        throttle.succeeded(attempt, 60.0 + second)
    assert throttle.tracked() <= 3  # alice's trust, and what her next attempt adds
    # A lock-out in force is never swept away.
    for _ in range(2):
        throttle.record_failure("10.9.9.9", 400.0)
    for second in range(50):
        throttle.reserve(ADDRESS, "", 400.5 + second * 0.01)
    assert throttle.retry_after("10.9.9.9", 401.0) > 0


def test_the_sweep_keeps_attempts_in_flight() -> None:
    """An attempt still in flight counts however long it is held: the sweep,
    which forgets records that no longer matter, must not forget its record
    (the attempt would then fail uncounted)."""
    throttle = AuthThrottle(limit=1, window=5.0, lockout=60.0)
    held = throttle.reserve(ADDRESS, "", 0.0)
    assert isinstance(held, Attempt)
    for index in range(200):  # long after the window, many sweeps
        throttle.record_failure(f"10.4.0.{index}", 100.0 + index)
    throttle.failed(held, 400.0)
    assert throttle.retry_after(ADDRESS, 401.0) == pytest.approx(59.0)


def test_one_user_logging_in_from_many_addresses_keeps_the_others_trusted() -> None:
    """The trust of (user, address) pairs is one bounded table: a user logging in
    from address after address pushes out its own oldest, never alice's, which
    keeps her usual address exempt from a lock-out strangers cause."""
    throttle = AuthThrottle(limit=5, window=60.0, lockout=30.0, user_limit=2, max_tracked=40)

    def log_in(address: str, username: str, now: float) -> None:
        attempt = throttle.reserve(address, username, now)
        assert isinstance(attempt, Attempt)
        throttle.succeeded(attempt, now)

    log_in(ADDRESS, "alice", 0.0)
    for i in range(500):
        log_in(f"10.5.{i // 256}.{i % 256}", "mallory", 1.0 + i * 0.001)
    assert len(throttle._trusted) == 1 + MAX_TRUSTED_PER_USER
    for i in range(2):  # a stranger locks alice out of new addresses...
        throttle.record_failure(f"10.6.0.{i}", 2.0, "alice")
    assert throttle.retry_after("10.6.0.9", 2.5, "alice") > 0
    assert throttle.retry_after(ADDRESS, 2.5, "alice") == 0  # ...not of her own
    # The user's latest addresses are the ones kept; logging in again renews one.
    log_in("10.5.0.0", "mallory", 3.0)
    assert throttle.retry_after("10.5.0.0", 3.5, "mallory") == 0
    assert len(throttle._trusted) == 1 + MAX_TRUSTED_PER_USER
