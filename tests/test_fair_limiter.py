"""The shared worker threads admit the calls waiting for them by owner in turn.

In arrival order alone, one user with many connections, each keeping a call
in flight, put every other user behind all of them: 32 connections listing a
large root kept another user's listing of one file waiting 3.3 s (isolation
review). :class:`conduit.transfer._rationed.FairLimiter` gives the owners
(a user, or a client's host) turns instead.
"""

from __future__ import annotations

import trio
import trio.testing

from conduit.transfer._rationed import FairLimiter


async def test_an_owner_waits_for_one_call_of_each_other_owner_at_most() -> None:
    limiter = FairLimiter(1)
    assert limiter.acquire_nowait()
    order: list[str] = []

    async def call(owner: str, name: str) -> None:
        await limiter.acquire(owner)
        order.append(name)
        await trio.lowlevel.checkpoint()
        limiter.release()

    async with trio.open_nursery() as nursery:
        for index in range(5):  # mallory queues five calls first
            nursery.start_soon(call, "user:mallory", f"m{index}")
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "user:alice", "a0")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "user:alice", "a1")
        await trio.testing.wait_all_tasks_blocked()
        limiter.release()
    assert order == ["m0", "a0", "m1", "a1", "m2", "m3", "m4"]
    # All given back: a slot is free again, with nobody waiting.
    assert limiter.acquire_nowait() and not limiter.acquire_nowait()


async def test_a_cancelled_waiter_leaves_its_place_and_takes_no_slot() -> None:
    limiter = FairLimiter(1)
    assert limiter.acquire_nowait()
    got: list[str] = []

    async def call(owner: str) -> None:
        await limiter.acquire(owner)
        got.append(owner)
        limiter.release()

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            nursery.start_soon(call, "a")
            await trio.testing.wait_all_tasks_blocked()
        cancelled = trio.CancelScope()

        async def given_up() -> None:
            with cancelled:
                await limiter.acquire("b")
                got.append("b")  # never: cancelled while it waits

        nursery.start_soon(given_up)
        await trio.testing.wait_all_tasks_blocked()
        cancelled.cancel()
        await trio.testing.wait_all_tasks_blocked()
        limiter.release()
    assert not scope.cancelled_caught and got == ["a"]
    assert limiter.acquire_nowait() and not limiter.acquire_nowait()
