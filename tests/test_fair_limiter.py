"""The shared worker threads admit the calls waiting for them by owner in turn.

In arrival order alone, one user with many connections, each keeping a call
in flight, put every other user behind all of them: 32 connections listing a
large root kept another user's listing of one file waiting 3.3 s (isolation
review). :class:`conduit.transfer._rationed.FairLimiter` gives the owners
(a user, or a client's host) turns instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from conduit import FileTransferHandler
from conduit.transfer import _sender
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


async def test_resume_claims_are_checked_owner_by_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server checks the resume claims of downloads (a hash of everything
    before the resume point) two at a time, owners in turn: four claims of
    one owner, then one of another's, are checked a0 a1 a2 b0 a3 (each let
    go in turn here). Until 2026-12-07 a plain limiter took them in arrival
    order: 16 connections of one owner claiming resumes near the end of a
    512 MiB file held another owner's claim on 1 MiB 3.4 s."""
    sender = FileTransferHandler(storage_dir=tmp_path)._sender
    checked: list[str] = []
    done: dict[str, trio.Event] = {}

    async def hashing(source: str, start: int, their_prefix: str) -> Any:
        checked.append(source)
        done[source] = trio.Event()
        await done[source].wait()
        return hashlib.sha256()

    monkeypatch.setattr(_sender, "resume_hasher", hashing)
    monkeypatch.setattr(_sender, "partial_owner", lambda caller: caller.owner)

    def caller(owner: str) -> Any:
        return SimpleNamespace(owner=owner, connection=SimpleNamespace(owned={}))

    check: Any = sender._checked_resume  # (its sources are names here)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for index in range(4):
                nursery.start_soon(check, caller("a"), "f", f"a{index}", 9, "")
                await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(check, caller("b"), "f", "b0", 9, "")
            await trio.testing.wait_all_tasks_blocked()
            for index in range(5):
                done[checked[index]].set()
                await trio.testing.wait_all_tasks_blocked()
    assert checked == ["a0", "a1", "a2", "b0", "a3"]
