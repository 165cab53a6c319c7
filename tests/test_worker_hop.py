"""The persistent worker-thread hop (``conduit._worker_hop``) and the small-file looks built on it.

A :class:`WorkerHop` must behave like ``trio.to_thread.run_sync`` where a
caller can tell: results and exceptions come back, a call no thread has taken
can be cancelled (it never runs), a call under way runs to its end and its
result is delivered, no more than ``max_threads`` threads ever run, and
closing the hop (or leaving it idle) ends its threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from conduit import FileTransferHandler, _worker_hop
from conduit._worker_hop import WorkerHop
from conduit.transfer import _small
from conduit.transfer._shared_hop import SharedHop
from conftest import ClientFactory, ServerFactory
from transfer_helpers import storage_server

KiB = 1024


def _hop_threads(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(f"conduit {name}")]


async def _until(condition: Any, seconds: float = 10.0) -> None:
    """Poll ``condition`` (real time; worker threads are not on Trio's clock), bounded."""
    # A thread's exit has no Trio event to wait for: poll it, in steps.
    with trio.fail_after(seconds):
        for _ in range(int(seconds / 0.01) + 1):
            if condition():
                return
            await trio.sleep(0.01)
    raise AssertionError("the condition did not come true")


async def test_results_and_exceptions_come_back_and_the_thread_survives_an_error() -> None:
    hop = WorkerHop("results")
    try:

        def fail() -> None:
            raise KeyError("in the worker")

        assert await hop.run(pow, 2, 10) == 1024
        with pytest.raises(KeyError, match="in the worker"):
            await hop.run(fail)
        # The same thread goes on serving calls after a call raised.
        assert await hop.run(threading.get_ident) == await hop.run(threading.get_ident)
        assert await hop.run(threading.get_ident) != threading.get_ident()
        assert hop.threads == 1
    finally:
        hop.close()


async def test_a_call_no_thread_took_is_withdrawn_on_cancel_and_never_runs() -> None:
    hop = WorkerHop("withdraw", max_threads=1)
    release = threading.Event()
    ran: list[str] = []

    def blocker() -> str:
        release.wait(10)
        ran.append("blocker")
        return "blocked"

    def queued() -> None:
        ran.append("queued")

    results: dict[str, Any] = {}
    scope = trio.CancelScope()

    async def first() -> None:
        results["first"] = await hop.run(blocker)

    async def second() -> None:
        with scope:
            await hop.run(queued)
        results["second"] = "cancelled" if scope.cancelled_caught else "ran"

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(second)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()  # the only thread is busy: the call is still queued
                await trio.testing.wait_all_tasks_blocked()
                assert results == {"second": "cancelled"}
                release.set()
            # The withdrawn call is skipped when the thread reaches it.
            assert await hop.run(len, "abc") == 3
    finally:
        hop.close()
    assert results["first"] == "blocked"
    assert ran == ["blocker"]


async def test_a_call_under_way_runs_to_its_end_and_its_result_is_delivered() -> None:
    hop = WorkerHop("under way")
    started = threading.Event()
    release = threading.Event()
    done: list[bool] = []

    def work() -> str:
        started.set()
        release.wait(10)
        done.append(True)
        return "finished"

    outcome: list[str] = []
    scope = trio.CancelScope()

    async def call() -> None:
        with scope:
            outcome.append(await hop.run(work))

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await _until(started.is_set)
                scope.cancel()  # too late: the thread has the call
                await trio.testing.wait_all_tasks_blocked()
                assert outcome == [] and not done
                release.set()
    finally:
        hop.close()
    assert done == [True]
    assert outcome == ["finished"]


async def test_no_more_threads_than_the_bound() -> None:
    hop = WorkerHop("bounded", max_threads=2)
    lock = threading.Lock()
    running = 0
    most = 0
    idents: set[int] = set()

    def work(index: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            idents.add(threading.get_ident())
        threading.Event().wait(0.01)  # long enough for calls to pile up
        with lock:
            running -= 1
        return index * 2

    results: dict[int, int] = {}

    async def call(index: int) -> None:
        results[index] = await hop.run(work, index)
        assert hop.threads <= 2

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for index in range(12):
                    nursery.start_soon(call, index)
    finally:
        hop.close()
    assert results == {index: index * 2 for index in range(12)}
    assert most <= 2 and len(idents) <= 2
    assert len(_hop_threads("bounded")) <= 2


async def test_close_and_idleness_release_the_threads() -> None:
    closed = WorkerHop("closing", max_threads=2)
    idle = WorkerHop("idling", idle_timeout=0.05)
    await closed.run(int)
    await idle.run(int)
    assert closed.threads == 1 and idle.threads == 1
    closed.close()
    await _until(lambda: closed.threads == 0 and not _hop_threads("closing"))
    await _until(lambda: idle.threads == 0 and not _hop_threads("idling"))
    # Still usable: a later call starts a thread again.
    assert await closed.run(len, "ab") == 2
    closed.close()
    await _until(lambda: closed.threads == 0)


def test_one_hop_serves_successive_trio_runs() -> None:
    hop = WorkerHop("runs")

    async def main(value: int) -> int:
        result: int = await hop.run(abs, value)
        return result

    try:
        assert trio.run(main, -3) == 3
        assert trio.run(main, -4) == 4
    finally:
        hop.close()


async def test_a_shared_hops_thread_ends_once_idle_or_closed(tmp_path: Path) -> None:
    source = tmp_path / "one.bin"
    source.write_bytes(b"x" * 100)
    idle: SharedHop[Any, Any] = SharedHop(_small._probe_one, name="idle look", idle_timeout=0.05)
    closed: SharedHop[Any, Any] = SharedHop(_small._probe_one, name="closed look")
    for hop in (idle, closed):
        found = await hop.run((source, 1000))
        assert found.small is not None and found.small.data == b"x" * 100
    assert len(_hop_threads("closed look")) == 1
    closed.close()
    await _until(lambda: not _hop_threads("idle look") and not _hop_threads("closed look"))


class _RecordingHop(SharedHop[int, int]):
    hops: list[list[int]]

    def _run_all(self, jobs: list[Any]) -> None:
        self.hops.append([job.arg for job in jobs])
        super()._run_all(jobs)


async def test_a_shared_hop_leader_cancelled_as_its_hop_starts_still_answers_the_others() -> None:
    release = threading.Event()

    def work(arg: int) -> int:
        if arg == 0:
            release.wait(10)
        return arg + 100

    hop = _RecordingHop(work)
    hop.hops = []
    results: dict[int, Any] = {}
    leader = trio.CancelScope()

    async def first() -> None:
        results[0] = await hop.run(0)
        # The hop just handed the lead to 1: cancel it before it runs its hop.
        leader.cancel()

    async def led() -> None:
        with leader:
            results[1] = await hop.run(1)

    async def carried() -> None:
        results[2] = await hop.run(2)

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(led)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(carried)
                await trio.testing.wait_all_tasks_blocked()
                release.set()
    finally:
        hop.close()
    assert hop.hops == [[0], [1, 2]]
    assert results[0] == 100 and results[2] == 102


async def test_small_files_are_looked_at_inline_until_looks_are_slow(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = tmp_path / "storage"
    _, server = await storage_server(server_factory, storage)
    client = await client_factory(server)
    source = tmp_path / "source"
    source.mkdir()
    files = {f"f{index}.bin": os.urandom(4 * KiB) for index in range(6)}
    for name, data in files.items():
        (source / name).write_bytes(data)
    transfer = FileTransferHandler()
    names = sorted(files)

    result = await transfer.send_to_server(client, source / names[0])
    assert result["success"] is True
    assert _small.looks_inline()
    # Every look now counts as slow: after INLINE_SLOW_LOOKS of them, the run
    # reads in the worker thread, and the uploads go on as before.
    monkeypatch.setattr(_small, "INLINE_STALL", -1.0)
    for count, name in enumerate(names[1:], start=1):
        result = await transfer.send_to_server(client, source / name)
        assert result["success"] is True, result
        assert _small.looks_inline() is (count < _small.INLINE_SLOW_LOOKS)
    for name, data in files.items():
        assert (storage / name).read_bytes() == data


async def test_a_small_file_over_the_inline_limit_is_read_in_a_thread_and_arrives(
    server_factory: ServerFactory, client_factory: ClientFactory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    _, server = await storage_server(server_factory, storage, chunk_size=256 * KiB)
    client = await client_factory(server)
    data = os.urandom(_small.INLINE_LIMIT + 1)
    path = tmp_path / "bigger.bin"
    path.write_bytes(data)
    transfer = FileTransferHandler(chunk_size=256 * KiB)
    found = await _small.probe(path, 256 * KiB, client)
    assert found.small is None and not found.is_directory  # not read inline
    result = await transfer.send_to_server(client, path)
    assert result["success"] is True and result["size"] == len(data)
    assert (storage / "bigger.bin").read_bytes() == data


async def test_sequential_calls_keep_one_thread() -> None:
    # The thread counts itself idle before its caller hears back, so a caller
    # whose next call comes at once never finds it "busy" and starts another.
    hop = WorkerHop("sequential", max_threads=2)
    try:
        idents = {await hop.run(threading.get_ident) for _ in range(200)}
        idents |= {await hop.run(threading.get_ident, wait_inline=10.0) for _ in range(200)}
        assert len(idents) == 1 and hop.threads == 1
    finally:
        hop.close()


def _loop_answers(token: trio.lowlevel.TrioToken, seconds: float) -> bool:
    """Worker thread: does the Trio loop run a callback within ``seconds``?"""
    answered = threading.Event()
    token.run_sync_soon(answered.set)
    return answered.wait(seconds)


async def test_an_inline_wait_blocks_the_loop_for_the_call_and_brings_back_its_outcome() -> None:
    hop = WorkerHop("inline")
    token = trio.lowlevel.current_trio_token()

    def fail() -> None:
        raise KeyError("in the worker")

    try:
        await hop.run(int)  # starts the thread (a call that starts one is never waited inline)
        # Waited for inline: the loop cannot run the thread's callback meanwhile.
        assert await hop.run(_loop_answers, token, 0.2, wait_inline=30.0) is False
        assert await hop.run(pow, 2, 10, wait_inline=30.0) == 1024
        with pytest.raises(KeyError, match="in the worker"):
            await hop.run(fail, wait_inline=30.0)
        assert await hop.run(_loop_answers, token, 10.0) is True  # no inline wait asked
        assert hop.threads == 1
    finally:
        hop.close()


async def _miss_inline(hop: WorkerHop, inline_kind: Hashable = None) -> bool:
    """One call of ``inline_kind`` that outlasts its inline wait; whether the
    loop ran while it did (it must: only a Trio task lets the call finish)."""
    release = threading.Event()
    loop_ran = False

    def slow() -> str:
        release.wait(10)
        return "slow, but here"

    async def releaser() -> None:
        nonlocal loop_ran
        await trio.testing.wait_all_tasks_blocked()
        loop_ran = True
        release.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(releaser)
        assert await hop.run(slow, wait_inline=0.001, inline_kind=inline_kind) == "slow, but here"
    return loop_ran


async def test_a_call_that_outlasts_its_inline_wait_is_heard_through_the_loop_and_backs_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_worker_hop, "INLINE_BACKOFF", 3600.0)
    hop = WorkerHop("outlasting")
    token = trio.lowlevel.current_trio_token()
    try:
        await hop.run(int)
        with trio.fail_after(20):
            for _ in range(_worker_hop.INLINE_MISSES):
                assert await _miss_inline(hop)
            # That many misses in a row: no inline wait for a while, even a long one.
            assert await hop.run(_loop_answers, token, 10.0, wait_inline=30.0) is True
    finally:
        hop.close()


async def test_each_kind_of_call_backs_off_on_its_own_misses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A short kind answered in time between the misses of a long kind does
    # not excuse the long one: it backs off after INLINE_MISSES of its own,
    # and the short kind is still waited for inline.
    monkeypatch.setattr(_worker_hop, "INLINE_BACKOFF", 3600.0)
    hop = WorkerHop("kinds")
    token = trio.lowlevel.current_trio_token()
    try:
        await hop.run(int)
        with trio.fail_after(20):
            for _ in range(_worker_hop.INLINE_MISSES):
                assert await _miss_inline(hop, "long")
                # The short kind, in time: waited inline (the loop did not run).
                assert await hop.run(_loop_answers, token, 0.2, wait_inline=30.0) is False
            # The long kind backs off; the short one does not.
            assert (
                await hop.run(_loop_answers, token, 10.0, wait_inline=30.0, inline_kind="long")
                is True
            )
            assert await hop.run(_loop_answers, token, 0.2, wait_inline=30.0) is False
    finally:
        hop.close()


async def test_a_call_wakes_the_thread_idle_for_the_shortest_time_alone() -> None:
    # Two threads, both idle: each call is handed to the one that went idle
    # last (its own lock released, the other thread never woken), so
    # sequential calls after a burst all run on that one thread.
    hop = WorkerHop("handoff", max_threads=2)
    both = threading.Barrier(2, timeout=10)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(hop.run, both.wait)
        assert hop.threads == 2
        idents = [await hop.run(threading.get_ident) for _ in range(50)]
        idents += [await hop.run(threading.get_ident, wait_inline=10.0) for _ in range(50)]
        assert len(set(idents)) == 1
        assert len(_hop_threads("handoff")) == 2  # the other one stayed idle, not gone
    finally:
        hop.close()
    await _until(lambda: hop.threads == 0 and not _hop_threads("handoff"))


async def test_calls_queued_behind_busy_threads_run_in_order_even_across_close() -> None:
    hop = WorkerHop("backlog", max_threads=1)
    go = threading.Event()
    ran: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hop.run, go.wait, 10)
            await trio.testing.wait_all_tasks_blocked()
            for index in range(5):
                nursery.start_soon(hop.run, ran.append, index)
                await trio.testing.wait_all_tasks_blocked()
            # Closing while the one thread is busy and calls wait in the
            # backlog: the thread drains the backlog before it exits.
            hop.close()
            go.set()
        assert ran == [0, 1, 2, 3, 4]
        await _until(lambda: hop.threads == 0 and not _hop_threads("backlog"))
        assert await hop.run(pow, 3, 3) == 27  # usable again: a new thread
    finally:
        hop.close()
